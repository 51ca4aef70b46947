"""Connection-level limits that hold before any key is read (issue 25, points 2 and 3):
a flood of unfinished request heads from one address, and heads too large.

One real server (the small model) with a short header deadline; the flood comes from
sockets bound to 127.0.0.2 and the normal user from 127.0.0.1, so the per-address
share is what keeps the normal user served.
"""

from __future__ import annotations

import contextlib
import re
import resource
import selectors
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from servelm.api import conn_guard
from servelm.catalog.specs import DEFAULT_MODEL_SLUG
from tests.conftest import LiveServer, make_settings, start_server

FLOOD = 3000
PER_IP = 200
HEADER_TIMEOUT = 2.0
MAX_HEAD = 32 * 1024


@pytest.fixture(scope="module")
def guarded(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 2 * FLOOD + 1024  # the flood's sockets, the server's side, the rest
    if soft < wanted:
        if hard != resource.RLIM_INFINITY and hard < wanted:
            pytest.skip(f"open-file hard limit {hard} is below the {wanted} this test needs")
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    settings = make_settings(
        tmp_path_factory.mktemp("guarded"),
        models_dir,
        header_timeout_seconds=HEADER_TIMEOUT,
        max_connections_per_ip=PER_IP,
        max_header_bytes=MAX_HEAD,
        max_header_count=50,
    )
    live = start_server(settings)
    yield live
    live.stop()
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def port_of(live: LiveServer) -> int:
    return int(live.base_url.rsplit(":", 1)[1])


def read_all(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes (the socket has a timeout)."""
    out = b""
    while chunk := sock.recv(65536):
        out += chunk
    return out


def status_of(answer: bytes) -> int | None:
    match = re.match(rb"HTTP/1\.1 (\d{3}) ", answer)
    return int(match.group(1)) if match else None


def test_unfinished_heads_from_one_address_do_not_starve_another(guarded: LiveServer) -> None:
    port = port_of(guarded)
    flood: list[socket.socket] = []
    try:
        for i in range(FLOOD):
            sock = socket.socket()
            sock.bind(("127.0.0.2", 0))
            sock.settimeout(10)
            sock.connect(("127.0.0.1", port))
            # Every head unfinished: the last header never ends.
            sock.sendall(f"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow-{i}: ".encode())
            flood.append(sock)

        # The address holds no more than its share...
        protocol = guarded.server.config.http
        assert isinstance(protocol, type) and issubclass(protocol, conn_guard.GuardedHttpTools)
        assert 0 < protocol.per_ip["127.0.0.2"] <= PER_IP
        # ...and another address is served meanwhile: the health check and a real chat.
        with httpx.Client(base_url=guarded.base_url, timeout=60) as client:
            assert client.get("/health").status_code == 200
            r = client.post(
                "/v1/chat/completions",
                headers=guarded.headers(),
                json={
                    "model": DEFAULT_MODEL_SLUG,
                    "messages": [{"role": "user", "content": "Say hi"}],
                    "max_tokens": 4,
                },
            )
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["message"]["content"] is not None

        # The server ends every flood connection: past the per-address share at once
        # (429), the rest at the header deadline (408). Waited for with a bound well
        # above the deadline; nothing is left open.
        sel = selectors.DefaultSelector()
        answers: dict[socket.socket, bytes] = {s: b"" for s in flood}
        for sock in flood:
            sock.setblocking(False)
            sel.register(sock, selectors.EVENT_READ)
        deadline = time.monotonic() + HEADER_TIMEOUT + 30
        open_count = len(flood)
        while open_count and time.monotonic() < deadline:
            for key, _ in sel.select(timeout=1):
                fileobj = key.fileobj
                assert isinstance(fileobj, socket.socket)
                sock = fileobj
                try:
                    chunk = sock.recv(65536)
                except ConnectionResetError:
                    chunk = b""
                if chunk:
                    answers[sock] += chunk
                else:
                    sel.unregister(sock)
                    open_count -= 1
        sel.close()
        assert open_count == 0, f"{open_count} flood connections still open"
        # Each got 429 (past the share) or 408 (the deadline); how many of each depends
        # on how fast this machine opened them (a 408 frees a place in the share).
        statuses = [status_of(a) for a in answers.values()]
        assert set(statuses) == {408, 429}, set(statuses)
        assert statuses.count(408) >= PER_IP
        assert b"retry-after: 1" in next(a for a in answers.values() if status_of(a) == 429)
    finally:
        for sock in flood:
            sock.close()


def test_a_connection_that_sends_nothing_is_closed_silently(guarded: LiveServer) -> None:
    with socket.create_connection(
        ("127.0.0.1", port_of(guarded)), timeout=HEADER_TIMEOUT + 30
    ) as s:
        assert read_all(s) == b""


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        match = re.search(r"VmRSS:\s+(\d+) kB", f.read())
    assert match
    return int(match.group(1)) * 1024


def send_huge_header(port: int, total: int, result: list[tuple[int, bytes]]) -> None:
    """One header of ``total`` bytes, sent until the server refuses; records how much
    went out and what came back."""
    chunk = b"a" * (1024 * 1024)
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        # The server closing mid-send is the refusal; what it answered is read below.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: ")
            while sent < total:
                s.sendall(chunk)
                sent += len(chunk)
        try:
            answer = read_all(s)
        except ConnectionResetError:
            answer = b""
    result.append((sent, answer))


def test_forty_megabyte_headers_are_refused_early(guarded: LiveServer) -> None:
    port = port_of(guarded)
    before = rss_bytes()
    peak = before
    results: list[tuple[int, bytes]] = []
    threads = [
        threading.Thread(target=send_huge_header, args=(port, 40 * 1024 * 1024, results))
        for _ in range(10)
    ]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        peak = max(peak, rss_bytes())
        time.sleep(0.01)
    assert len(results) == 10
    for sent, answer in results:
        # Refused long before the end: what got out is the kernel's buffers, not 40 MB.
        assert sent < 40 * 1024 * 1024
        assert status_of(answer) in (431, None), answer[:200]
    assert any(status_of(answer) == 431 for _, answer in results)
    assert peak - before < 50 * 1024 * 1024, f"RSS grew {(peak - before) >> 20} MiB"


def raw_request(port: int, head: bytes) -> bytes:
    """Sends ``head`` and returns the answer. The server may close before it has read
    all of it (that is the point of a cap): the answer was written before the close."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            s.sendall(head)
        return read_all(s)


@pytest.mark.parametrize(
    "head",
    [
        # One header past the cap, complete and sent at once.
        b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (MAX_HEAD + 1) + b"\r\n\r\n",
        # Too many small headers.
        b"GET /health HTTP/1.1\r\nHost: x\r\n"
        + b"".join(b"X-%d: 1\r\n" % i for i in range(51))
        + b"\r\n",
        # A URL past the cap.
        b"GET /health?" + b"q" * (MAX_HEAD + 1) + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    ],
    ids=["big-header", "many-headers", "long-url"],
)
def test_heads_past_the_caps_get_431(guarded: LiveServer, head: bytes) -> None:
    answer = raw_request(port_of(guarded), head)
    assert status_of(answer) == 431, answer[:200]
    assert b'"code":"headers_too_large"' in answer


def test_431_on_the_segmind_route_speaks_segmind(guarded: LiveServer) -> None:
    head = (
        f"POST /v1/{DEFAULT_MODEL_SLUG} HTTP/1.1\r\nHost: x\r\n".encode()
        + b"".join(b"X-%d: 1\r\n" % i for i in range(60))
        + b"\r\n"
    )
    answer = raw_request(port_of(guarded), head)
    assert status_of(answer) == 431
    assert answer.endswith(
        b'{"error":"The request\'s headers are too large (at most 32768 bytes and 50 fields)."}'
    )


def test_heads_within_the_caps_are_served(guarded: LiveServer) -> None:
    """Just under both caps, over one keep-alive connection twice."""
    headers = {f"X-{i}": "v" for i in range(40)} | {"X-Pad": "p" * (MAX_HEAD // 2)}
    with httpx.Client(base_url=guarded.base_url, timeout=30) as client:
        for _ in range(2):
            assert client.get("/health", headers=headers).status_code == 200
