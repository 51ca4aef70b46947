"""One way to run an ASGI app under uvicorn in a thread of the test process.

The gateway under test, scripted upstreams and paced engines all start here, so a
server that cannot start says why the same way everywhere, and waits are for
readiness (``server.started``), not for a fixed time.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import uvicorn


def bound_socket() -> socket.socket:
    """A listening socket on a port of the kernel's choosing, for an in-process
    server: no window in which another process can take the port."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(2048)
    return sock


@dataclass
class ThreadServer:
    server: uvicorn.Server
    thread: threading.Thread
    port: int

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self, timeout: float = 30) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=timeout)


def serve_in_thread(app: Any, *, timeout: float = 60, **config: Any) -> ThreadServer:
    """Start ``app`` on a loopback port and return once it accepts connections.

    server.run, not asyncio.run(server.serve()): the same event loop as production
    (uvloop), whose transports behave differently in places (engines/http1.py).
    uvicorn installs no signal handlers off the main thread, so none are patched out.
    """
    sock = bound_socket()
    port = int(sock.getsockname()[1])
    config.setdefault("log_level", "warning")
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, **config))
    failure: list[BaseException] = []

    def run() -> None:
        try:
            server.run(sockets=[sock])
        except BaseException as exc:  # reported by the waiting thread, below
            failure.append(exc)
            raise

    thread = threading.Thread(target=run, daemon=True, name=f"uvicorn:{port}")
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive():
            sock.close()
            why = repr(failure[0]) if failure else "it exited (see the log above)"
            raise RuntimeError(f"in-thread server on port {port} did not start: {why}")
        if time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError(f"in-thread server on port {port} not started after {timeout} s")
        time.sleep(0.01)
    return ThreadServer(server, thread, port)


@contextmanager
def running(app: Any, **config: Any) -> Iterator[ThreadServer]:
    """``serve_in_thread`` for the length of a ``with`` block."""
    srv = serve_in_thread(app, **config)
    try:
        yield srv
    finally:
        srv.stop()
