"""Hostile servers and the money checks every hostile test ends with (issue 17)."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from PIL import Image as PILImage
from sqlalchemy import func, select

from servelm.store.db import Database
from servelm.store.tables import holds
from tests.conftest import LiveServer, free_port, make_settings, provision, start_server
from tests.procs import cli

LIAR = "liar"


def wait_listening(port: int, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {port} after {timeout}s")


@pytest.fixture(scope="session")
def liar_port() -> Iterator[int]:
    """``tests.support.lying_upstream`` as its own process."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.support.lying_upstream", "--port", str(port)]
    )
    try:
        wait_listening(port, proc)
        yield port
    finally:
        proc.kill()
        proc.wait()


def liar_models_file(directory: Path, port: int, **fields: str) -> Path:
    """The liar as a known kind of engine (vLLM): those get plain calls for plain
    clients once warm, which the tests of malformed plain answers need; an upstream of
    unknown kind is always streamed (``OpenAIUpstreamEngine``)."""
    fields = {"upstream_kind": '"vllm"', **fields}
    extra = "".join(f"{k} = {v}\n" for k, v in fields.items())
    path = directory / "servelm.toml"
    path.write_text(
        f'[models.{LIAR}]\nengine = "openai"\nbase_url = "http://127.0.0.1:{port}/v1"\n'
        "context_window = 4096\nmax_output_tokens = 512\ninput_price = 1000\n"
        f"output_price = 2000\ntools = true\n{extra}"
        "[models.smollm2-135m-instruct]\nenabled = false\n"
    )
    return path


def start_liar_gateway(
    tmp: Path, models_dir: Path, port: int, database_url: str | None = None, **fields: str
) -> LiveServer:
    settings = make_settings(
        tmp,
        models_dir,
        models_file=liar_models_file(tmp, port, **fields),
        database_url=database_url,
    )
    return start_server(settings)


@pytest.fixture(scope="module")
def liar_gateway(
    liar_port: int, models_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    """A gateway (SQLite) whose one model is the lying upstream."""
    live = start_liar_gateway(tmp_path_factory.mktemp("liar"), models_dir, liar_port)
    warm_up(live)
    yield live
    live.stop()


def warm_up(live: LiveServer, model: str = LIAR) -> None:
    """One honest streamed answer with usage: from then on the gateway makes plain
    upstream calls for plain clients (``OpenAIUpstreamEngine``), which the tests of
    malformed plain answers need whatever test runs first."""
    key = provision(live.db, f"warm-{model}", 1)
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": True}
    with httpx.stream(
        "POST", f"{live.v1}/chat/completions", json=body, headers={"x-api-key": key}, timeout=60
    ) as r:
        assert r.status_code == 200
        assert r.read().endswith(b"data: [DONE]\n\n")


def open_holds(db: Database) -> int:
    with db.read() as conn:
        return int(
            conn.execute(
                select(func.count()).select_from(holds).where(holds.c.settled_at.is_(None))
            ).scalar_one()
        )


def wait_no_open_holds(db: Database, timeout: float = 30) -> None:
    """Settlement may commit a moment after the response (a hang-up, group commit)."""
    deadline = time.monotonic() + timeout
    while open_holds(db) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert open_holds(db) == 0, "a hold is still open"


def assert_money_sound(live: LiveServer) -> None:
    """`servelm ledger check` passes on the server's database, with no hold open."""
    wait_no_open_holds(live.db)
    env = {**os.environ, "SERVELM_DATA_DIR": str(live.settings.data_dir)}
    env.pop("SERVELM_DATABASE_URL", None)
    if live.settings.database_url:
        env["SERVELM_DATABASE_URL"] = live.settings.database_url
    done = cli(env, "ledger", "check")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "ledger ok" in done.stdout


def jpeg(side: int) -> bytes:
    out = io.BytesIO()
    PILImage.new("RGB", (side, side), (200, 30, 90)).save(out, "JPEG", quality=95)
    return out.getvalue()


class Drip:
    """An image server for the hostile tests: ``/cat.jpg`` and ``/cat.png`` are a small
    real image, ``/redirect/PORT`` redirects, anything else trickles one byte at a
    time. It counts the requests it got (``started``) and the connections its client
    closed (``closed``)."""

    def __init__(self) -> None:
        self.started = 0
        self.closed = 0
        drip = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                drip.started += 1
                if self.path.startswith("/redirect/"):
                    self.send_response(302)
                    self.send_header("Location", f"http://127.0.0.1:{self.path.split('/')[2]}/x")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if self.path == "/fail-when-all-started":
                    deadline = time.monotonic() + 10
                    while drip.started < 3 and time.monotonic() < deadline:
                        time.sleep(0.01)
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if self.path in ("/cat.jpg", "/cat.png"):
                    body = jpeg(32)
                    self.send_response(200)
                    self.send_header("Content-Type", "image/jpeg")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", "100000")
                self.end_headers()
                try:
                    for _ in range(100_000):
                        self.wfile.write(b"\x89")
                        self.wfile.flush()
                        time.sleep(0.2)
                except OSError:
                    drip.closed += 1

            def log_message(self, *args: object) -> None:
                return

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def wait_closed(self, count: int, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while self.closed < count and time.monotonic() < deadline:
            time.sleep(0.05)
        assert self.closed >= count, f"{self.closed} of {count} dripping fetches were stopped"


@pytest.fixture
def drip() -> Iterator[Drip]:
    server = Drip()
    yield server
    server.httpd.shutdown()
    server.httpd.server_close()
