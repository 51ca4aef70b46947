"""A lean HTTP/1.1 client for the gateway's hot path: keep-alive pool, streamed bodies.

Every chat request the gateway relays is one POST to an engine and one streamed
answer back, so the client's cost is paid once per request and once per token. On
the instant upstream (docs/benchmarks.md, "HTTP clients"), a streamed 16-token chat
completion cost 1.6-2.2 ms of CPU through httpx, 0.41-0.68 ms through aiohttp and
0.25-0.35 ms through this: an asyncio ``Protocol`` feeding uvicorn's own HTTP parser
(httptools, the C parser Node.js used), with nothing else between socket and caller.

What it does, and no more: HTTP/1.1 POST/GET with a body of bytes, ``http`` and
``https`` (the standard ``ssl`` module), content-length and chunked responses,
keep-alive reuse, a connect timeout and a read timeout (the longest wait for the next
bytes), backpressure (the socket stops being read while too much is unread).
Closing a response before its end closes the connection: that is how vLLM, SGLang and
llama.cpp learn that the client left and stop generating.
"""

from __future__ import annotations

import asyncio
import collections
import json
import ssl
from collections.abc import AsyncIterator
from typing import Any, cast
from urllib.parse import urlsplit

import httptools


class HTTPError(Exception):
    """Base of every failure to get an answer over HTTP."""


class ConnectError(HTTPError):
    """The server could not be reached."""


class Timeout(HTTPError):
    """Connecting or waiting for the next bytes took longer than allowed."""


class ProtocolError(HTTPError):
    """The connection broke, or the server sent something that is not HTTP/1.1."""


# Above this many unread body bytes the socket is no longer read (flow control), so a
# slow consumer cannot make the gateway buffer an engine's whole output.
_HIGH_WATER = 256 * 1024


class _Connection(asyncio.Protocol):
    """One TCP connection; carries one request/response at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.reused = False
        self._waiter: asyncio.Future[None] | None = None
        self._reset()

    def _reset(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.headers_done = False
        self._interim = False
        self.keep_alive = False
        self.until_close = False
        self.complete = False
        self.received_any = False
        self.error: HTTPError | None = None
        self.body: collections.deque[bytes] = collections.deque()
        self.buffered = 0
        self.paused = False

    # -- asyncio.Protocol ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Not an isinstance check: uvloop's transports do not subclass asyncio's.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.received_any = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.error = ProtocolError(f"malformed HTTP response: {exc}")
            self._close()
        self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.until_close and exc is None:
            # A response with neither a length nor chunks ends when the server closes.
            self.complete = True
        if not self.complete and self.error is None:
            self.error = ProtocolError(
                "the server closed the connection before the response ended"
                + (f" ({exc})" if exc else "")
            )
        self._wake()

    # -- httptools callbacks ---------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            # An interim answer (100 Continue, 103 Early Hints): the real one follows.
            self.headers = []
            self._interim = True
            return
        self.status = status
        # Asked now: once the message is complete the parser has reset for the next.
        self.keep_alive = self.parser.should_keep_alive()
        self.headers_done = True
        names = {name for name, _ in self.headers}
        self.until_close = b"content-length" not in names and not any(
            name == b"transfer-encoding" and b"chunked" in value.lower()
            for name, value in self.headers
        )

    def on_body(self, body: bytes) -> None:
        self.body.append(body)
        self.buffered += len(body)
        if self.buffered > _HIGH_WATER and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        self.complete = True

    # -- used by Response ------------------------------------------------------------

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self, limit: float) -> None:
        """Until the parser or the socket has news; raises Timeout after ``limit`` s."""
        # A timer handle, not asyncio.timeout(): this runs once per received chunk.
        loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        timer = loop.call_later(limit, _expire, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiter = None

    def take_body(self) -> bytes:
        data = b"".join(self.body) if len(self.body) != 1 else self.body[0]
        self.body.clear()
        self.buffered = 0
        if self.paused and self.transport is not None and not self.closed:
            self.paused = False
            self.transport.resume_reading()
        return data

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.close()
        self.closed = True


def _limit(read_timeout: float, deadline: float | None) -> float:
    """The longest the next read may wait: the read timeout, or less near a deadline."""
    if deadline is None:
        return read_timeout
    return max(0.0, min(read_timeout, deadline - asyncio.get_running_loop().time()))


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(Timeout("no answer within the read timeout"))


class Response:
    """Status and headers are in; the body streams through ``iter_bytes``/``read``."""

    def __init__(self, pool: Pool, conn: _Connection, deadline: float | None = None) -> None:
        self._pool = pool
        self._conn = conn
        self._deadline = deadline
        self.status_code = conn.status
        self.headers = dict((k.decode("latin-1"), v.decode("latin-1")) for k, v in conn.headers)
        self._done = False

    async def iter_bytes(self) -> AsyncIterator[bytes]:
        conn = self._conn
        while True:
            if conn.body:
                yield conn.take_body()
            elif conn.complete:
                break
            elif conn.error is not None:
                raise conn.error
            else:
                await conn.wait(_limit(self._pool.read_timeout, self._deadline))
        await self.aclose()

    async def read(self) -> bytes:
        return b"".join([chunk async for chunk in self.iter_bytes()])

    async def aclose(self) -> None:
        """Give the connection back if the body was read to its end, else close it."""
        if self._done:
            return
        self._done = True
        conn = self._conn
        if conn.complete and not conn.body and conn.keep_alive and not conn.closed:
            self._pool.release(conn)
        else:
            conn._close()

    async def __aenter__(self) -> Response:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class Pool:
    """Keep-alive connections to one origin (``scheme://host:port``)."""

    def __init__(
        self,
        base_url: str,
        *,
        headers: dict[str, str] | None = None,
        connect_timeout: float = 5.0,
        read_timeout: float = 300.0,
        max_idle: int = 64,
    ) -> None:
        url = urlsplit(base_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        self.host = url.hostname
        self.port = url.port or (443 if url.scheme == "https" else 80)
        self.prefix = url.path.rstrip("/")
        self._ssl = ssl.create_default_context() if url.scheme == "https" else None
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.max_idle = max_idle
        default_port = self.port == (443 if self._ssl else 80)
        authority = self.host if default_port else f"{self.host}:{self.port}"
        if ":" in self.host:  # an IPv6 literal
            authority = f"[{self.host}]" if default_port else f"[{self.host}]:{self.port}"
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        self._fixed_headers = f"host: {authority}\r\n{extra}".encode("latin-1")
        self._idle: list[_Connection] = []
        self._closed = False

    async def request(
        self,
        method: str,
        path: str,
        body: bytes = b"",
        *,
        headers: dict[str, str] | None = None,
        content_type: str = "application/json",
        deadline: float | None = None,
    ) -> Response:
        """Send one request; return once the response's status and headers are in.

        ``deadline`` (event-loop time) bounds the whole exchange, body included: the
        read timeout alone is per read, and an answer trickling one byte a second
        would never trip it."""
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        head = (
            f"{method} {self.prefix}{path} HTTP/1.1\r\n".encode("latin-1")
            + self._fixed_headers
            + (
                f"{extra}content-type: {content_type}\r\ncontent-length: {len(body)}\r\n\r\n"
            ).encode("latin-1")
        )
        message = head + body
        conn = await self._acquire()
        try:
            return await self._exchange(conn, message, deadline)
        except ProtocolError:
            # A kept-alive connection that fails before any byte of an answer was, in
            # all likelihood, closed by the server while it sat idle: the request is
            # sent once more on a new connection (as browsers and httpx do). At worst
            # an engine generates twice; the gateway charges for the answer it relays.
            if not (conn.reused and not conn.received_any):
                raise
        return await self._exchange(await self._connect(), message, deadline)

    async def post_json(self, path: str, payload: Any) -> tuple[int, Any]:
        """POST ``payload`` as JSON; the status and the parsed JSON answer (None when
        the answer is not JSON)."""
        resp = await self.request("POST", path, json.dumps(payload).encode())
        async with resp:
            raw = await resp.read()
        try:
            return resp.status_code, json.loads(raw)
        except ValueError:
            return resp.status_code, None

    async def _exchange(
        self, conn: _Connection, message: bytes, deadline: float | None = None
    ) -> Response:
        assert conn.transport is not None
        try:
            conn.transport.write(message)
            while not conn.headers_done:
                if conn.error is not None:
                    raise conn.error
                await conn.wait(_limit(self.read_timeout, deadline))
        except BaseException:
            conn._close()
            raise
        return Response(self, conn, deadline)

    async def _acquire(self) -> _Connection:
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed and conn.transport is not None and not conn.transport.is_closing():
                conn.reused = True
                conn._reset()
                return conn
        return await self._connect()

    async def _connect(self) -> _Connection:
        if self._closed:
            raise ConnectError("the connection pool is closed")
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, conn = await loop.create_connection(
                    _Connection,
                    self.host,
                    self.port,
                    ssl=self._ssl,
                    server_hostname=self.host if self._ssl else None,
                )
        except TimeoutError as exc:
            raise Timeout(f"could not connect to {self.host}:{self.port} in time") from exc
        except OSError as exc:
            raise ConnectError(f"could not connect to {self.host}:{self.port}: {exc}") from exc
        return conn

    def release(self, conn: _Connection) -> None:
        if self._closed or len(self._idle) >= self.max_idle:
            conn._close()
        else:
            self._idle.append(conn)

    async def aclose(self) -> None:
        self._closed = True
        for conn in self._idle:
            conn._close()
        self._idle.clear()


async def sse_data(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """The ``data:`` payloads of a server-sent event stream, as raw bytes.

    Comments, ``event:`` and ``id:`` lines are skipped; CRLF and LF both end lines.
    """
    # The pieces of a line not yet ended, joined once its newline arrives: adding
    # each piece to one bytes object copied a large event over and over (a 16 MB
    # event in 64 KB reads took 0.4 s, quadratic in its size; issue 15).
    pending: list[bytes] = []
    async for chunk in chunks:
        pending.append(chunk)
        if b"\n" not in chunk:
            continue
        *lines, rest = b"".join(pending).split(b"\n")
        pending = [rest]
        for line in lines:
            if line.startswith(b"data:"):
                yield line[5:].strip()
    tail = b"".join(pending)
    if tail.startswith(b"data:"):
        yield tail[5:].strip()
