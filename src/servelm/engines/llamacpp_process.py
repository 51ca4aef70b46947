"""One local model's llama.cpp server, in a process of its own.

``engines.llamacpp`` starts one per loaded model::

    python -m servelm.engines.llamacpp_process

and talks to it over loopback HTTP, as it would to the embedded server in its own
process. Why a process: xllamacpp builds llama.cpp's server, and tears it down, with
Python's GIL held for the whole load (0.6-1.3 s for the tiny test model); in the
serving process every other request stalled that long (docs/benchmarks.md,
"Serverless models"). Here the load stalls nobody, and an unload gives back every
page the model took, since the process ends.

The exchange: the parent writes one JSON line on stdin, ``{"parent": PID, "params":
{"model.path": ..., "cpuparams.n_threads": 2, ...}, "nice": 0}``
(``xllamacpp.CommonParams`` fields by dotted name, and the CPU priority to run at;
``engines.llamacpp`` chooses them), and keeps stdin open. This process loads the
model and writes ``READY http://127.0.0.1:PORT`` on stdout, or writes why it could
not on stderr and exits with status 1. It serves until its stdin closes or its
parent dies (``PR_SET_PDEATHSIG``): no orphan keeps a model's memory, even after a
SIGKILLed gateway. It ignores SIGINT and SIGTERM: those are for the gateway, which
may get them with its whole process group (a Ctrl+C at the terminal, a service
manager stopping every process of the service) and then drains its requests, which
need their models to the end.

Only the standard library and xllamacpp are imported here: what this process holds
besides the model is counted in every model's footprint (``llamacpp_lane.PROCESS_BYTES``).
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
from typing import Any

READY = "READY"
FAILED_LOAD = 1
PARENT_GONE = 2


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    die_with_parent(signal.SIGKILL)
    order = json.loads(sys.stdin.buffer.readline() or b"{}")
    if os.getppid() != order.get("parent"):
        # The parent died before prctl above took effect (or sent nothing): nobody
        # would ever stop this process.
        sys.exit(PARENT_GONE)
    # llama.cpp may print on stdout: only the READY line goes there, the rest joins
    # stderr, which the parent reads as it comes.
    ready = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    # Before llama.cpp starts a thread: each inherits it (Linux keeps a nice value
    # per thread), and an unprivileged process may raise it, never lower it again.
    os.nice(int(order.get("nice", 0)))

    import xllamacpp

    params = xllamacpp.CommonParams()
    for name, value in order["params"].items():
        _set(params, name, value)
    try:
        server = xllamacpp.Server(params)
    except (RuntimeError, ValueError) as exc:
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        sys.exit(FAILED_LOAD)
    ready.write(f"{READY} {server.listening_address}\n")
    ready.close()
    sys.stdin.buffer.read()  # until the parent closes it, or dies
    # Without the server's destructor, which joins llama.cpp's threads one by one:
    # the system takes the memory back at exit either way.
    os._exit(0)


def _set(params: Any, name: str, value: object) -> None:
    """``params.a.b = value`` for the name ``"a.b"``: xllamacpp's nested structs are
    views into the one C struct, so setting a field of one sets it in ``params``."""
    *path, field = name.split(".")
    target = params
    for part in path:
        target = getattr(target, part)
    setattr(target, field, value)


def die_with_parent(sig: int) -> None:
    """Have the kernel send ``sig`` to this process when the thread that started it
    ends (``PR_SET_PDEATHSIG``). Here SIGKILL: the parent is the gateway's event loop
    thread (however it ended) or a test's server thread. Standard library only, so the
    processes of ``serve --workers`` (``processes.multiproc``) use it too."""
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, sig)


if __name__ == "__main__":
    main()
