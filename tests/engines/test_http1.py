"""The lean HTTP/1.1 client (servelm.engines.http1) against raw servers on loopback.

Every server here is ``asyncio.start_server`` on 127.0.0.1 writing literal HTTP/1.1
bytes, so each test decides exactly what reaches the client and when: lengths, chunks,
closes, garbage, stalls. The servers run in the test's own event loop. Production runs
the client on uvloop, whose transports differ from asyncio's (flow control, closes), so
the scenarios run once more on a uvloop event loop (``test_under_uvloop``).
"""

from __future__ import annotations

import asyncio
import inspect
import json
import shutil
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import aclosing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import uvloop

from servelm.engines import wire
from servelm.engines.http1 import (
    ConnectError,
    HTTPError,
    Pool,
    ProtocolError,
    Response,
    Timeout,
    sse_data,
)
from servelm.errors import StreamCut
from tests.conftest import free_port

# A client that stops noticing an answer would otherwise wait out a 300 s read timeout.
pytestmark = pytest.mark.timeout(60)

# -- a raw HTTP/1.1 server -------------------------------------------------------------


@dataclass
class Request:
    """One request as it arrived at the server."""

    method: str
    target: str
    version: str
    headers: list[tuple[str, str]]
    body: bytes = b""

    def header(self, name: str) -> str | None:
        values = [v for k, v in self.headers if k.lower() == name]
        assert len(values) <= 1, f"{name} sent {len(values)} times: {self.headers}"
        return values[0] if values else None


async def read_request(reader: asyncio.StreamReader) -> Request | None:
    """The next request on a connection; None where the client closed it cleanly."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise
        return None
    start, *lines = head[:-4].decode("latin-1").split("\r\n")
    method, target, version = start.split(" ")
    headers = [(name, value) for name, _, value in (line.partition(": ") for line in lines)]
    request = Request(method, target, version, headers)
    request.body = await reader.readexactly(int(request.header("content-length") or 0))
    return request


class Peer:
    """The server's side of one accepted connection."""

    def __init__(
        self,
        server: Server,
        index: int,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        self.server = server
        self.index = index  # 0 for the first connection the server accepted
        self.reader = reader
        self.writer = writer

    async def request(self) -> Request | None:
        request = await read_request(self.reader)
        if request is not None:
            self.server.requests.append((self.index, request))
        return request

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def closed_by_client(self) -> str:
        """Wait until the client closes the connection: "eof" (FIN) or "reset" (RST)."""
        try:
            data = await self.reader.read(65536)
        except ConnectionResetError:
            outcome = "reset"
        else:
            assert data == b"", f"bytes where the client should have closed: {data!r}"
            outcome = "eof"
        self.server.client_closes.append((self.index, outcome))
        return outcome


Handler = Callable[[Peer], Awaitable[None]]


class Server:
    """Runs ``handler`` for every connection; the connection closes when it returns.

    Counts accepted connections and records requests; an exception in a handler fails
    the test when the server stops.
    """

    def __init__(
        self, handler: Handler, host: str = "127.0.0.1", tls: ssl.SSLContext | None = None
    ) -> None:
        self.handler = handler
        self.host = host
        self.tls = tls
        self.connections = 0
        self.requests: list[tuple[int, Request]] = []  # (connection index, request)
        self.client_closes: list[tuple[int, str]] = []
        self.errors: list[BaseException] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stopping = False

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}"

    @property
    def targets(self) -> list[tuple[int, str]]:
        return [(index, request.target) for index, request in self.requests]

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, 0, ssl=self.tls)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        self._stopping = True
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def __aenter__(self) -> Server:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        await self.stop()
        if exc_type is None:
            assert not self.errors, f"a server handler failed: {self.errors!r}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        index = self.connections
        self.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self.handler(Peer(self, index, reader, writer))
        except asyncio.CancelledError:
            # stop() cancels the handlers still running; ending normally then spares
            # Python 3.11's start_server a "task.exception()" error on a cancelled task.
            if not self._stopping:
                raise
        except Exception as exc:
            self.errors.append(exc)
        finally:
            writer.close()
            self._tasks.discard(task)


def reply(
    body: bytes = b"", status: str = "200 OK", headers: dict[str, str] | None = None
) -> bytes:
    """A whole content-length response."""
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    head = f"HTTP/1.1 {status}\r\ncontent-length: {len(body)}\r\n{extra}\r\n"
    return head.encode("latin-1") + body


def chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


CHUNKED_HEAD = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
)
LAST_CHUNK = b"0\r\n\r\n"


def echo(request: Request) -> bytes:
    """Answers with the request's target as the body."""
    return reply(request.target.encode())


def keep_alive(respond: Callable[[Request], bytes] = echo) -> Handler:
    """Answers every request on the connection with ``respond(request)``."""

    async def handle(peer: Peer) -> None:
        while (request := await peer.request()) is not None:
            await peer.send(respond(request))

    return handle


async def until(condition: Callable[[], object], limit: float = 5.0) -> None:
    """Poll ``condition`` until it holds; TimeoutError after ``limit`` seconds."""
    async with asyncio.timeout(limit):
        while not condition():
            await asyncio.sleep(0.005)


async def get(pool: Pool, path: str) -> tuple[int, bytes]:
    async with await pool.request("GET", path) as resp:
        return resp.status_code, await resp.read()


# -- bodies: content-length, chunked, until close ------------------------------------


async def test_content_length_body_is_read_whole() -> None:
    body = b'{"object": "list", "data": []}'

    def respond(request: Request) -> bytes:
        if request.target == "/missing":
            return reply(b"no such thing", "404 Not Found")
        return reply(body, headers={"Content-Type": "application/json", "X-Upstream": "e1"})

    async with Server(keep_alive(respond)) as srv, aclosing(Pool(srv.url)) as pool:
        async with await pool.request("GET", "/models") as resp:
            assert resp.status_code == 200
            # Header names are lower-cased, values kept as sent.
            assert resp.headers == {
                "content-length": str(len(body)),
                "content-type": "application/json",
                "x-upstream": "e1",
            }
            assert await resp.read() == body
        assert await get(pool, "/missing") == (404, b"no such thing")


async def test_chunked_body_streams_in_pieces() -> None:
    pieces = [b"alpha", b"beta " * 100, b"gamma"]
    received: list[bytes] = []

    async def handle(peer: Peer) -> None:
        await peer.request()
        await peer.send(CHUNKED_HEAD)
        for i, piece in enumerate(pieces):
            await peer.send(chunk(piece))
            # The next chunk only once the client has this one: it streams, not buffers.
            while len(received) <= i:
                await asyncio.sleep(0.005)
        await peer.send(LAST_CHUNK)

    async with Server(handle) as srv, aclosing(Pool(srv.url)) as pool:
        async with await pool.request("POST", "/stream", b"{}") as resp:
            assert resp.status_code == 200
            assert resp.headers["transfer-encoding"] == "chunked"
            async for piece in resp.iter_bytes():
                received.append(piece)
        assert received == pieces


async def test_body_without_length_or_chunks_ends_when_the_server_closes() -> None:
    async def handle(peer: Peer) -> None:
        await peer.request()
        await peer.send(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\nfirst part, ")
        await peer.send(b"second part")
        # Returning closes the connection: that is the end of the body.

    async with Server(handle) as srv, aclosing(Pool(srv.url)) as pool:
        async with await pool.request("GET", "/until-close") as resp:
            assert resp.status_code == 200
            assert await resp.read() == b"first part, second part"
            assert resp._conn.closed
        assert pool._idle == []
        assert await get(pool, "/again") == (200, b"first part, second part")
        assert srv.connections == 2


async def test_bodyless_answers_are_complete_at_once_and_keep_the_connection() -> None:
    """204 and 304 have no body even without a length, and content-length 0 is empty:
    none of them waits for the server to close, and the connection is reused."""
    answers = {
        "/no-content": b"HTTP/1.1 204 No Content\r\n\r\n",
        "/not-modified": b"HTTP/1.1 304 Not Modified\r\netag: x\r\n\r\n",
        "/empty": reply(b""),
        "/chunked-empty": CHUNKED_HEAD + LAST_CHUNK,
    }

    async with (
        Server(keep_alive(lambda r: answers[r.target])) as srv,
        aclosing(Pool(srv.url, read_timeout=5.0)) as pool,
    ):
        for path in answers:
            async with asyncio.timeout(2):
                status, body = await get(pool, path)
            assert body == b""
            assert status == int(answers[path][9:12])
        assert srv.connections == 1


async def test_interim_1xx_response_is_skipped() -> None:
    """RFC 9110 §15.2: a client must accept 1xx responses it did not ask for (103 Early
    Hints from a proxy, say) and wait for the final one. A client that took the 103 for
    the answer would hand the connection back with the real answer still on its way,
    and the next request on it would read the previous request's answer.
    """
    pending: list[asyncio.Task[Response]] = []

    async def handle(peer: Peer) -> None:
        while (request := await peer.request()) is not None:
            await peer.send(b"HTTP/1.1 103 Early Hints\r\nlink: </a.css>; rel=preload\r\n\r\n")
            # The final answer once a client has returned on the 103 alone (wrongly), or
            # after 0.3 s (a client that waits, as it should).
            for _ in range(60):
                if pending and pending[-1].done():
                    break
                await asyncio.sleep(0.005)
            await peer.send(reply(b"answer to " + request.target.encode()))

    async with Server(handle) as srv, aclosing(Pool(srv.url, read_timeout=5.0)) as pool:
        for path in ("/a", "/b"):
            pending.append(asyncio.create_task(pool.request("GET", path)))
            async with await pending[-1] as resp:
                got = (resp.status_code, await resp.read())
            assert got == (200, b"answer to " + path.encode())


# -- keep-alive ------------------------------------------------------------------------


async def test_sequential_requests_reuse_one_connection() -> None:
    def respond(request: Request) -> bytes:
        if request.target == "/chunked":
            return CHUNKED_HEAD + chunk(b"chun") + chunk(b"ked") + LAST_CHUNK
        if request.target == "/trailers":  # a chunk extension, and trailers after the body
            return CHUNKED_HEAD + b"3;ext=1\r\ntra\r\n" + chunk(b"iled") + b"0\r\nx-t: 1\r\n\r\n"
        return echo(request)

    async with Server(keep_alive(respond)) as srv, aclosing(Pool(srv.url)) as pool:
        paths = ["/a", "/chunked", "/b", "/trailers", "/chunked", "/c"]
        bodies = [(await get(pool, path))[1] for path in paths]
        assert bodies == [b"/a", b"chunked", b"/b", b"trailed", b"chunked", b"/c"]
        assert srv.connections == 1
        assert srv.targets == [(0, path) for path in paths]


async def test_connection_close_answer_is_not_reused() -> None:
    # The server would go on serving the connection; the client must not ask it to.
    close = keep_alive(lambda r: reply(r.target.encode(), headers={"connection": "close"}))
    async with Server(close) as srv, aclosing(Pool(srv.url)) as pool:
        for path in ("/a", "/b", "/c"):
            assert await get(pool, path) == (200, path.encode())
        assert srv.connections == 3
        assert srv.targets == [(0, "/a"), (1, "/b"), (2, "/c")]
        assert pool._idle == []


async def test_http10_answer_is_not_reused() -> None:
    http10 = keep_alive(lambda r: b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nok")
    async with Server(http10) as srv, aclosing(Pool(srv.url)) as pool:
        assert await get(pool, "/a") == (200, b"ok")
        assert await get(pool, "/b") == (200, b"ok")
        assert srv.connections == 2


async def test_concurrent_requests_use_separate_connections_and_max_idle_holds() -> None:
    async with Server(keep_alive()) as srv, aclosing(Pool(srv.url, max_idle=1)) as pool:
        first = await pool.request("GET", "/first")
        second = await pool.request("GET", "/second")
        assert srv.connections == 2
        async with first, second:
            assert await first.read() == b"/first"
            assert await second.read() == b"/second"
        # One idle connection kept, the other closed (max_idle=1).
        assert len(pool._idle) == 1
        assert second._conn.closed
        assert await get(pool, "/third") == (200, b"/third")
        assert srv.connections == 2
        assert srv.targets == [(0, "/first"), (1, "/second"), (0, "/third")]


async def test_closing_the_pool_closes_idle_connections() -> None:
    async def handle(peer: Peer) -> None:
        await keep_alive()(peer)
        peer.server.client_closes.append((peer.index, "eof"))

    async with Server(handle) as srv:
        pool = Pool(srv.url)
        assert await get(pool, "/a") == (200, b"/a")
        await pool.aclose()
        await until(lambda: srv.client_closes)
        assert srv.client_closes == [(0, "eof")]
        with pytest.raises(ConnectError, match="pool is closed"):
            await pool.request("GET", "/b")
        assert srv.connections == 1


# -- a kept-alive connection the server closed -----------------------------------------


async def test_idle_connection_closed_by_the_server_is_replaced() -> None:
    async def one_answer(peer: Peer) -> None:
        await peer.request()
        await peer.send(reply(b"answer %d" % peer.index))

    async with Server(one_answer) as srv, aclosing(Pool(srv.url)) as pool:
        async with await pool.request("GET", "/a") as resp:
            assert await resp.read() == b"answer 0"
        stale = resp._conn
        await until(lambda: stale.closed)  # the client saw the close while idle
        assert await get(pool, "/b") == (200, b"answer 1")
        assert srv.connections == 2
        assert stale not in pool._idle


async def test_server_closing_right_after_answering_does_not_fail_the_next_request() -> None:
    """The next request goes out at once, before the client has seen the close: it
    fails on the old connection without an answer and is sent again on a new one."""

    async def one_answer(peer: Peer) -> None:
        await peer.request()
        await peer.send(reply(b"answer %d" % peer.index))

    async with Server(one_answer) as srv, aclosing(Pool(srv.url)) as pool:
        for i in range(3):
            assert await get(pool, f"/{i}") == (200, b"answer %d" % i)
        assert srv.connections == 3
        assert srv.targets == [(0, "/0"), (1, "/1"), (2, "/2")]


async def test_request_lost_on_a_reused_connection_is_sent_once_more() -> None:
    async def handle(peer: Peer) -> None:
        if peer.index == 0:
            await peer.request()
            await peer.send(reply(b"first"))
            await peer.request()  # then the connection closes with no byte of an answer
            return
        await keep_alive(lambda r: reply(b"retried"))(peer)

    async with Server(handle) as srv, aclosing(Pool(srv.url)) as pool:
        assert await get(pool, "/a") == (200, b"first")
        assert await get(pool, "/b") == (200, b"retried")
        assert srv.connections == 2
        assert srv.targets == [(0, "/a"), (0, "/b"), (1, "/b")]


async def test_request_is_retried_once_only() -> None:
    async def handle(peer: Peer) -> None:
        if peer.index == 0:
            await peer.request()
            await peer.send(reply(b"first"))
        await peer.request()  # closes without an answer, the retry's connection too

    async with Server(handle) as srv, aclosing(Pool(srv.url)) as pool:
        assert await get(pool, "/a") == (200, b"first")
        with pytest.raises(ProtocolError, match="closed the connection"):
            await pool.request("POST", "/b", b"{}")
        assert srv.connections == 2
        assert srv.targets == [(0, "/a"), (0, "/b"), (1, "/b")]


async def test_no_retry_when_a_new_connection_closes_without_an_answer() -> None:
    async def handle(peer: Peer) -> None:
        await peer.request()

    async with Server(handle) as srv, aclosing(Pool(srv.url)) as pool:
        with pytest.raises(ProtocolError, match="closed the connection"):
            await pool.request("POST", "/a", b"{}")
        assert srv.connections == 1


async def test_no_retry_once_part_of_an_answer_arrived() -> None:
    async def handle(peer: Peer) -> None:
        await peer.request()
        await peer.send(reply(b"first"))
        await peer.request()
        await peer.send(b"HTTP/1.1 200 OK\r\ncontent-")  # then the connection closes

    async with Server(handle) as srv, aclosing(Pool(srv.url)) as pool:
        assert await get(pool, "/a") == (200, b"first")
        with pytest.raises(ProtocolError, match="closed the connection"):
            await pool.request("POST", "/b", b"{}")
        assert srv.connections == 1


# -- failures ----------------------------------------------------------------------


async def test_connection_refused_is_connect_error() -> None:
    pool = Pool(f"http://127.0.0.1:{free_port()}")
    with pytest.raises(ConnectError, match="could not connect") as info:
        await pool.request("GET", "/models")
    assert isinstance(info.value, HTTPError)
    assert isinstance(info.value.__cause__, OSError)


async def test_connect_timeout() -> None:
    """A listener whose accept queue is full drops new SYNs: connecting never ends."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    listener.setblocking(False)
    port = listener.getsockname()[1]
    fillers: list[asyncio.StreamWriter] = []
    try:
        for _ in range(8):
            try:
                async with asyncio.timeout(0.3):
                    _, writer = await asyncio.open_connection("127.0.0.1", port)
            except TimeoutError:
                break
            fillers.append(writer)
        else:
            pytest.skip("this system completes connections beyond the listen backlog")
        pool = Pool(f"http://127.0.0.1:{port}", connect_timeout=0.2)
        async with asyncio.timeout(5):
            with pytest.raises(Timeout, match="could not connect"):
                await pool.request("GET", "/models")
    finally:
        for writer in fillers:
            writer.close()
        listener.close()


async def test_server_that_never_answers_is_a_timeout() -> None:
    async def silent(peer: Peer) -> None:
        await peer.request()
        await peer.closed_by_client()

    async with Server(silent) as srv, aclosing(Pool(srv.url, read_timeout=0.2)) as pool:
        # The guard is asyncio's TimeoutError, which http1.Timeout is not.
        async with asyncio.timeout(5):
            with pytest.raises(Timeout, match="read timeout"):
                await pool.request("POST", "/chat/completions", b"{}")
        # The client gave up on the connection, and the server saw it go.
        await until(lambda: srv.client_closes)
        assert srv.client_closes[0][1] in ("eof", "reset")


async def test_stall_in_the_middle_of_a_body_is_a_timeout() -> None:
    async def stalls(peer: Peer) -> None:
        await peer.request()
        await peer.send(CHUNKED_HEAD + chunk(b"data: 1\n\n"))
        await peer.closed_by_client()

    async with Server(stalls) as srv, aclosing(Pool(srv.url, read_timeout=0.2)) as pool:
        received: list[bytes] = []
        async with asyncio.timeout(5), await pool.request("POST", "/stream", b"{}") as resp:
            with pytest.raises(Timeout):
                async for piece in resp.iter_bytes():
                    received.append(piece)
        assert received == [b"data: 1\n\n"]
        await until(lambda: srv.client_closes)
        assert pool._idle == []


async def test_garbage_instead_of_http_is_protocol_error() -> None:
    async def ssh(peer: Peer) -> None:
        await peer.request()
        await peer.send(b"SSH-2.0-OpenSSH_9.6\r\n")
        await peer.closed_by_client()

    async with Server(ssh) as srv, aclosing(Pool(srv.url, read_timeout=5.0)) as pool:
        with pytest.raises(ProtocolError, match="malformed HTTP response"):
            await pool.request("GET", "/models")
        await until(lambda: srv.client_closes)  # the client closed the connection
        assert pool._idle == []


async def test_malformed_chunk_is_protocol_error() -> None:
    async def bad_chunk(peer: Peer) -> None:
        await peer.request()
        await peer.send(CHUNKED_HEAD + chunk(b"ok") + b"zz\r\nnot a chunk\r\n")
        await peer.closed_by_client()

    async with Server(bad_chunk) as srv, aclosing(Pool(srv.url, read_timeout=5.0)) as pool:
        async with await pool.request("GET", "/stream") as resp:
            with pytest.raises(ProtocolError, match="malformed HTTP response"):
                await resp.read()
        await until(lambda: srv.client_closes)


async def test_server_closing_in_the_middle_of_a_body_is_protocol_error() -> None:
    async def cut(peer: Peer) -> None:
        request = await peer.request()
        assert request is not None
        if request.target == "/length":
            await peer.send(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n" + b"x" * 10)
        else:
            await peer.send(CHUNKED_HEAD + chunk(b"x" * 10))
        # Returning closes the connection before the body's end.

    async with Server(cut) as srv, aclosing(Pool(srv.url, read_timeout=5.0)) as pool:
        async with await pool.request("GET", "/length") as resp:
            with pytest.raises(ProtocolError, match="before the response ended"):
                await resp.read()
        received: list[bytes] = []
        async with await pool.request("GET", "/chunked") as resp:
            with pytest.raises(ProtocolError, match="before the response ended"):
                async for piece in resp.iter_bytes():
                    received.append(piece)
        assert received == [b"x" * 10]
        assert pool._idle == []
        assert srv.connections == 2


# -- leaving a response before its end -------------------------------------------------


def endless_stream() -> Handler:
    """A stream that sends one chunk per request, then waits for the client to leave;
    a second request on the same connection would fail the test (closed_by_client)."""

    async def handle(peer: Peer) -> None:
        await peer.request()
        await peer.send(CHUNKED_HEAD + chunk(b"data: first\n\n"))
        await peer.closed_by_client()

    return handle


async def test_aclose_before_the_end_closes_the_connection() -> None:
    async with Server(endless_stream()) as srv, aclosing(Pool(srv.url)) as pool:
        resp = await pool.request("POST", "/stream", b"{}")
        pieces = aiter(resp.iter_bytes())
        assert await anext(pieces) == b"data: first\n\n"
        await resp.aclose()
        assert resp._conn.closed
        await until(lambda: srv.client_closes)  # the engine learns the client left
        assert srv.client_closes[0] in ((0, "eof"), (0, "reset"))
        assert pool._idle == []
        # The next request gets a new connection.
        resp = await pool.request("POST", "/stream", b"{}")
        await resp.aclose()
        assert srv.connections == 2


async def test_leaving_async_with_early_closes_the_connection() -> None:
    async with Server(endless_stream()) as srv, aclosing(Pool(srv.url)) as pool:
        async with await pool.request("POST", "/stream", b"{}") as resp:
            async for piece in resp.iter_bytes():
                assert piece == b"data: first\n\n"
                break
        await until(lambda: len(srv.client_closes) == 1)
        # Not read at all: closed as well.
        async with await pool.request("POST", "/stream", b"{}"):
            pass
        await until(lambda: len(srv.client_closes) == 2)
        assert [index for index, _ in srv.client_closes] == [0, 1]
        assert pool._idle == []
        assert srv.connections == 2


async def test_cancelled_request_closes_the_connection() -> None:
    asked = asyncio.Event()

    async def handle(peer: Peer) -> None:
        await peer.request()
        asked.set()
        await peer.closed_by_client()

    async with Server(handle) as srv, aclosing(Pool(srv.url)) as pool:
        task = asyncio.create_task(pool.request("POST", "/slow", b"{}"))
        async with asyncio.timeout(5):
            await asked.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await until(lambda: srv.client_closes)
        assert pool._idle == []


# -- the request on the wire -----------------------------------------------------------


async def test_request_as_the_server_receives_it() -> None:
    body = b'{"messages": "a\r\n\r\nb"}' + bytes(range(256))
    async with Server(keep_alive()) as srv:
        pool = Pool(
            f"{srv.url}/v1",
            headers={"authorization": "Bearer sk-test", "X-Pool": "p"},
        )
        async with aclosing(pool):
            resp = await pool.request(
                "POST",
                "/chat/completions",
                body,
                headers={"x-request-id": "r-1"},
                content_type="application/json; charset=utf-8",
            )
            async with resp:
                assert await resp.read() == b"/v1/chat/completions"
        [(_, request)] = srv.requests
        assert (request.method, request.target, request.version) == (
            "POST",
            "/v1/chat/completions",
            "HTTP/1.1",
        )
        assert sorted(request.headers) == sorted(
            [
                ("host", f"127.0.0.1:{srv.port}"),
                ("authorization", "Bearer sk-test"),
                ("X-Pool", "p"),
                ("x-request-id", "r-1"),
                ("content-type", "application/json; charset=utf-8"),
                ("content-length", str(len(body))),
            ]
        )
        assert request.body == body


async def test_get_without_body_and_path_prefixes() -> None:
    async with Server(keep_alive()) as srv:
        for base, path, target in [
            (srv.url, "/models", "/models"),
            (f"{srv.url}/v1/", "/models", "/v1/models"),
            (f"{srv.url}/api/v1", "/models?limit=2", "/api/v1/models?limit=2"),
        ]:
            async with aclosing(Pool(base)) as pool:
                assert await get(pool, path) == (200, target.encode())
        assert [(r.method, r.target, r.body) for _, r in srv.requests] == [
            ("GET", "/models", b""),
            ("GET", "/v1/models", b""),
            ("GET", "/api/v1/models?limit=2", b""),
        ]
        assert all(r.header("content-length") == "0" for _, r in srv.requests)


async def test_large_request_body_arrives_intact() -> None:
    body = bytes(range(256)) * 8192  # 2 MiB
    async with Server(keep_alive()) as srv, aclosing(Pool(srv.url)) as pool:
        async with await pool.request("POST", "/upload", body) as resp:
            assert await resp.read() == b"/upload"
        [(_, request)] = srv.requests
        assert request.body == body


async def test_ipv6_literal_host() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 here")
    srv = Server(keep_alive(), host="::1")
    try:
        await srv.start()
    except OSError as exc:
        pytest.skip(f"cannot listen on ::1: {exc}")
    try:
        async with aclosing(Pool(f"{srv.url}/v1")) as pool:
            assert await get(pool, "/models") == (200, b"/v1/models")
        [(_, request)] = srv.requests
        assert request.header("host") == f"[::1]:{srv.port}"
    finally:
        await srv.stop()
    assert not srv.errors


def test_pool_rejects_what_is_not_an_http_url() -> None:
    for url in ("ftp://127.0.0.1/", "127.0.0.1:8000", "http://", "unix:///tmp/sock"):
        with pytest.raises(ValueError, match="not an http"):
            Pool(url)


# -- post_json ---------------------------------------------------------------------


async def test_post_json() -> None:
    def respond(request: Request) -> bytes:
        if request.target == "/json":
            seen = {"got": json.loads(request.body), "type": request.header("content-type")}
            return reply(json.dumps(seen).encode(), headers={"content-type": "application/json"})
        if request.target == "/error":
            return reply(b'{"error": {"message": "bad model"}}', "400 Bad Request")
        if request.target == "/text":
            return reply(b"<html>Bad Gateway</html>", "502 Bad Gateway")
        return b"HTTP/1.1 204 No Content\r\n\r\n"

    payload = {"model": "m", "messages": [{"role": "user", "content": "héllo"}], "n": 1}
    async with Server(keep_alive(respond)) as srv, aclosing(Pool(srv.url)) as pool:
        assert await pool.post_json("/json", payload) == (
            200,
            {"got": payload, "type": "application/json"},
        )
        assert await pool.post_json("/error", {}) == (400, {"error": {"message": "bad model"}})
        assert await pool.post_json("/text", {}) == (502, None)
        assert await pool.post_json("/nothing", {}) == (204, None)
        assert {r.method for _, r in srv.requests} == {"POST"}
        assert srv.connections == 1


# -- sse_data ----------------------------------------------------------------------

SSE_STREAM = (
    b": ping\n\n"
    b'event: message\nid: 1\ndata: {"a":1}\n\n'
    b'data: {"b":2}\r\n\r\n'
    b"retry: 1000\n: another comment\r\n\r\n"
    b'data:{"c":3}\n\n'
    b"event: done\n"
    b"data: [DONE]"
)
SSE_EXPECTED = [b'{"a":1}', b'{"b":2}', b'{"c":3}', b"[DONE]"]


async def chunks_of(chunks: list[bytes]) -> AsyncIterator[bytes]:
    for piece in chunks:
        yield piece


async def sse(chunks: list[bytes]) -> list[bytes]:
    return [data async for data in sse_data(chunks_of(chunks))]


async def test_sse_data_in_one_chunk() -> None:
    got = await sse([SSE_STREAM])
    assert got == SSE_EXPECTED
    assert all(type(data) is bytes for data in got)


async def test_sse_data_split_at_every_position() -> None:
    for cut in range(len(SSE_STREAM) + 1):
        got = await sse([SSE_STREAM[:cut], SSE_STREAM[cut:]])
        assert got == SSE_EXPECTED, f"split at {cut}"


async def test_sse_data_one_byte_at_a_time() -> None:
    got = await sse([SSE_STREAM[i : i + 1] for i in range(len(SSE_STREAM))])
    assert got == SSE_EXPECTED


async def test_sse_data_one_large_event_in_many_reads() -> None:
    # A 1 MB event arriving in 4 KB reads with no newline until its end (issue 15:
    # the pieces are joined once, not added to one buffer read after read).
    payload = bytes(range(33, 127)) * 11_155
    stream = b"data: " + payload + b"\r\n\r\ndata: [DONE]\n\n"
    pieces = [stream[i : i + 4096] for i in range(0, len(stream), 4096)]
    assert await sse(pieces) == [payload, b"[DONE]"]


async def test_sse_data_line_ends_and_edges() -> None:
    assert await sse([]) == []
    assert await sse([b": keep-alive\n\n: keep-alive\n\n"]) == []
    assert await sse([b"data: [DONE]\r\n\r\n"]) == [b"[DONE]"]
    assert await sse([b"data: last\r"]) == [b"last"]  # no newline after the last line
    assert await sse([b"data: one\r", b"\ndata: two\r", b"\n"]) == [b"one", b"two"]
    assert await sse([b"data: x\n", b"", b"data: y\n"]) == [b"x", b"y"]


async def test_sse_over_a_chunked_stream() -> None:
    # Chunk boundaries fall inside lines, inside a CRLF and inside "[DONE]".
    pieces = [
        b'data: {"a"',
        b':1}\n\ndata: {"b":2}\r',
        b"\n\r\n: ping\n\nevent: x\ndata: [DO",
        b"NE]\n\n",
    ]
    received: list[bytes] = []

    async def handle(peer: Peer) -> None:
        while await peer.request() is not None:
            await peer.send(SSE_HEAD)
            for i, piece in enumerate(pieces):
                await peer.send(chunk(piece))
                while len(received) <= i:  # one chunk at a time reaches the client
                    await asyncio.sleep(0.005)
            await peer.send(LAST_CHUNK)

    async def tap(stream: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        async for piece in stream:
            received.append(piece)
            yield piece

    async with Server(handle) as srv, aclosing(Pool(srv.url)) as pool:
        async with await pool.request("POST", "/chat/completions", b"{}") as resp:
            assert resp.headers["content-type"] == "text/event-stream"
            got = [data async for data in sse_data(tap(resp.iter_bytes()))]
        assert received == pieces
        assert got == [b'{"a":1}', b'{"b":2}', b"[DONE]"]
        assert len(pool._idle) == 1  # read to its end: the connection is kept
        assert srv.connections == 1


# -- backpressure ------------------------------------------------------------------

BOUND = 1024 * 1024  # most unread body bytes the client may hold


async def test_slow_consumer_holds_the_server_back() -> None:
    piece_size = 64 * 1024
    count = 512  # 32 MiB: far more than the kernel's socket buffers hold
    expected = b"".join(i.to_bytes(4, "big") * (piece_size // 4) for i in range(count))
    sent: list[int] = []
    done = asyncio.Event()

    async def big(peer: Peer) -> None:
        while await peer.request() is not None:
            await peer.send(CHUNKED_HEAD)
            for i in range(count):
                await peer.send(chunk(expected[i * piece_size : (i + 1) * piece_size]))
                sent.append(i)
            await peer.send(LAST_CHUNK)
            done.set()

    async with Server(big) as srv, aclosing(Pool(srv.url, read_timeout=10.0)) as pool:
        async with await pool.request("GET", "/big") as resp:
            conn = resp._conn
            # Nothing is consumed: wait until the server can send no more.
            peak, last, still = 0, -1, 0
            async with asyncio.timeout(20):
                while still < 10 and not done.is_set():
                    await asyncio.sleep(0.02)
                    peak = max(peak, conn.buffered)
                    still = still + 1 if len(sent) == last else 0
                    last = len(sent)
            assert not done.is_set(), "the server sent the whole body to a reader that read none"
            assert conn.paused
            assert 0 < peak <= BOUND
            # Now a slow reader: every piece stays bounded, and the body arrives intact.
            received: list[bytes] = []
            async with asyncio.timeout(40):
                async for piece in resp.iter_bytes():
                    received.append(piece)
                    await asyncio.sleep(0.001)
                    peak = max(peak, conn.buffered)
        assert peak <= BOUND
        assert max(len(piece) for piece in received) <= BOUND
        assert len(received) > 1
        assert b"".join(received) == expected
        assert done.is_set()
        assert len(pool._idle) == 1


# -- https -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A self-signed certificate for 127.0.0.1 (cert.pem, key.pem)."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command")
    path = tmp_path_factory.mktemp("tls")
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2"),
            *("-keyout", str(path / "key.pem"), "-out", str(path / "cert.pem")),
            *("-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"),
        ],
        check=True,
        capture_output=True,
    )
    return path


async def https_round_trips(tls_dir: Path) -> None:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tls_dir / "cert.pem", tls_dir / "key.pem")
    async with Server(keep_alive(), tls=context) as srv:
        assert srv.url.startswith("https://")
        async with aclosing(Pool(f"{srv.url}/v1")) as pool:
            for path in ("/a", "/b", "/c"):
                assert await get(pool, path) == (200, f"/v1{path}".encode())
        assert srv.connections == 1
        assert srv.requests[0][1].header("host") == f"127.0.0.1:{srv.port}"


async def test_https(tls_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The pool trusts the system's CAs; OpenSSL reads SSL_CERT_FILE when they load.
    monkeypatch.setenv("SSL_CERT_FILE", str(tls_dir / "cert.pem"))
    await https_round_trips(tls_dir)


def test_https_under_uvloop(tls_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", str(tls_dir / "cert.pem"))
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(https_round_trips(tls_dir))


async def test_untrusted_certificate_is_connect_error(
    tls_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tls_dir / "cert.pem", tls_dir / "key.pem")

    async def handle(peer: Peer) -> None:
        await peer.request()

    srv = Server(handle, tls=context)
    await srv.start()
    try:
        async with aclosing(Pool(srv.url)) as pool:
            with pytest.raises(ConnectError, match="certificate verify failed"):
                await pool.request("GET", "/models")
    finally:
        await srv.stop()
    assert srv.requests == []


# -- the same scenarios on uvloop ----------------------------------------------------

# Every test above that needs no fixture (a coroutine function of no arguments), with
# its marks (xfail).
UVLOOP_SCENARIOS = [
    pytest.param(test, marks=getattr(test, "pytestmark", []), id=name.removeprefix("test_"))
    for name, test in list(globals().items())
    if name.startswith("test_")
    and inspect.iscoroutinefunction(test)
    and not inspect.signature(test).parameters
]


@pytest.mark.parametrize("scenario", UVLOOP_SCENARIOS)
def test_under_uvloop(scenario: Callable[[], Coroutine[Any, Any, None]]) -> None:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(scenario())


# -- SSE events over the client (engines/wire.sse_json) --------------------------------


@pytest.mark.parametrize("ends_with_done", [True, False])
async def test_sse_events_up_to_done_and_a_stream_cut_short(ends_with_done: bool) -> None:
    events = [b'data: {"n": 1}\n\n', b'data: {"n": 2}\n\n']
    tail = [b"data: [DONE]\n\n"] if ends_with_done else []

    async def handle(peer: Peer) -> None:
        await peer.request()
        await peer.send(SSE_HEAD + b"".join(chunk(e) for e in [*events, *tail]) + LAST_CHUNK)

    got: list[Any] = []
    async with (
        Server(handle) as srv,
        aclosing(Pool(srv.url)) as pool,
        await pool.request("POST", "/v1/chat/completions", b"{}") as resp,
    ):
        if ends_with_done:
            got = [e async for e in wire.sse_json(resp, require_done=True)]
        else:
            with pytest.raises(StreamCut, match=r"ended before \[DONE\]"):
                async for event in wire.sse_json(resp, require_done=True):
                    got.append(event)
    assert got == [{"n": 1}, {"n": 2}]
