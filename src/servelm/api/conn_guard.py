"""Limits on connections that hold before any key is read: the gateway's HTTP/1.1
protocol is uvicorn's httptools protocol plus the guards it lacks.

uvicorn bounds neither the time nor the size of a request head with the httptools
parser (``h11_max_incomplete_event_size`` applies to h11 only, and its keep-alive
timer runs only between requests), and an ASGI app never sees a head until it is
complete. So the guards sit in the protocol, where the bytes arrive:

- **head deadline**: a request head (request line and headers) must be complete
  within ``header_timeout_seconds`` of the connection's start, or of its first byte on
  a kept-alive connection; otherwise 408 (or a plain close when nothing came);
- **head size and count**: more than ``max_header_bytes`` of head, or more than
  ``max_header_count`` fields, is answered 431 and closed. What is buffered per
  connection is bounded by the cap plus one socket read (256 KiB);
- **connections**: past ``max_connections`` open connections, or
  ``max_connections_per_ip`` from one address, a new connection gets 503 / 429 and is
  closed at once, so one address cannot take every socket;
- **idle keep-alive**: ``keep_alive_timeout_seconds`` (uvicorn's own timer).

Measured against the unguarded protocol in docs/benchmarks.md ("Connection
guards"). Counts are per process: under ``--workers`` each worker has its own.
"""

from __future__ import annotations

import asyncio
import logging
import resource
from dataclasses import dataclass
from typing import Any, ClassVar

import httptools
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from servelm.api.errors import render
from servelm.api.paths import dialect_for_path
from servelm.config import Settings
from servelm.errors import HeadersTooLarge, Overloaded, RateLimited, RequestTimeout, ServelmError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ConnLimits:
    header_timeout: float = 10.0
    max_header_bytes: int = 64 * 1024
    max_header_count: int = 100
    max_connections: int = 4096
    max_connections_per_ip: int = 256

    @classmethod
    def from_settings(cls, settings: Settings) -> ConnLimits:
        return cls(
            header_timeout=settings.header_timeout_seconds,
            max_header_bytes=settings.max_header_bytes,
            max_header_count=settings.max_header_count,
            max_connections=settings.max_connections,
            max_connections_per_ip=settings.max_connections_per_ip,
        )


class _HeadTooLarge(Exception):
    """Raised inside a parser callback to stop the parser; turned into a 431."""


class GuardedHttpTools(HttpToolsProtocol):
    """uvicorn's httptools protocol with the limits above. Subclassed once per server
    (``protocol_for``) so that each server has its own limits and address counts."""

    limits: ClassVar[ConnLimits] = ConnLimits()
    per_ip: ClassVar[dict[str, int]] = {}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # One timer per connection, not per request: it fires every header timeout
        # and checks the head being read (if any) against when it began.
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_began = 0.0
        self._in_head = True  # from the connection's start until its first head is in
        self._head_bytes = 0  # socket bytes of the head being read (approximately)
        self._head_size = 0  # bytes of the URL and fields parsed so far
        self._head_fields = 0
        self._ip: str | None = None  # set while counted in per_ip
        self._refused = False
        self._too_large = False
        self._began = False  # a head began in the read being parsed

    # -- the connection ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        limits = self.limits
        # ``connections`` includes this one already.
        if len(self.connections) > limits.max_connections:
            self._refuse(Overloaded("The server has too many open connections; retry shortly."))
            return
        ip = self.client[0] if self.client else None
        if ip is not None:
            count = self.per_ip.get(ip, 0)
            if count >= limits.max_connections_per_ip:
                self._refuse(
                    RateLimited(
                        "Too many open connections from your address; close some and retry.",
                        code="too_many_connections",
                        headers={"Retry-After": "1"},
                    )
                )
                return
            self.per_ip[ip] = count + 1
            self._ip = ip
        self._head_began = self.loop.time()
        self._head_timer = self.loop.call_later(limits.header_timeout, self._head_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._ip is not None:
            left = self.per_ip[self._ip] - 1
            if left:
                self.per_ip[self._ip] = left
            else:
                del self.per_ip[self._ip]
            self._ip = None
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        # uvicorn's own, with the head's bytes counted and a 431 for a head too large.
        self._unset_keepalive_if_required()
        self._began = False
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        except httptools.HttpParserError:
            if self._too_large:
                self._refuse_head()
                return
            msg = "Invalid HTTP request received."
            self.logger.warning(msg)
            self.send_400_response(msg)
            return
        # Not counted: the read in which a head began, since it may also end an
        # earlier request's body; one read (256 KiB at most) bounds what that misses.
        if self._in_head and not self._began:
            self._head_bytes += len(data)
            if self._head_bytes > self.limits.max_header_bytes:
                self._refuse_head()

    # -- parser callbacks (uvicorn's, plus the counting) ---------------------------------

    def on_message_begin(self) -> None:
        if self.headers is not None:
            # A later request on a kept-alive connection: its head's time starts now
            # (the first one's started with the connection).
            self._head_began = self.loop.time()
        super().on_message_begin()
        self._in_head = self._began = True
        self._head_bytes = self._head_size = self._head_fields = 0

    def on_url(self, url: bytes) -> None:
        self.url += url
        self._head_size += len(url)
        if self._head_size > self.limits.max_header_bytes:
            self._too_large = True
            raise _HeadTooLarge

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_size += len(name) + len(value) + 4
        self._head_fields += 1
        limits = self.limits
        if self._head_size > limits.max_header_bytes or self._head_fields > limits.max_header_count:
            self._too_large = True
            raise _HeadTooLarge
        name = name.lower()
        if name == b"expect" and value.lower() == b"100-continue":
            self.expect_100_continue = True
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self._in_head = False
        super().on_headers_complete()

    # -- refusals ------------------------------------------------------------------------

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timeout(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        timeout = self.limits.header_timeout
        late = self.loop.time() - self._head_began
        if not self._in_head or late < timeout:
            # No head being read, or one that began since: look again later.
            wait = timeout if not self._in_head else timeout - late
            self._head_timer = self.loop.call_later(wait, self._head_timeout)
            return
        if self.headers is not None:  # a head began (on_message_begin)
            self._refuse(RequestTimeout("The request's headers did not arrive in time."))
        else:
            # Nothing asked, nothing to answer (a browser's spare connection).
            self._refused = True
            self.transport.close()

    def _refuse_head(self) -> None:
        limits = self.limits
        self._refuse(
            HeadersTooLarge(
                f"The request's headers are too large (at most {limits.max_header_bytes} "
                f"bytes and {limits.max_header_count} fields)."
            )
        )

    def _refuse(self, exc: ServelmError) -> None:
        """Answer ``exc`` in the route's dialect, as far as the URL is known, and close."""
        self._refused = True
        self._disarm()
        path = getattr(self, "url", b"").split(b"?", 1)[0]
        rendered = render(exc, dialect_for_path(path.decode("latin-1")))
        head = [STATUS_LINE[rendered.status]]
        for name, value in [*rendered.headers, (b"connection", b"close")]:
            head += [name, b": ", value, b"\r\n"]
        self.transport.write(b"".join([*head, b"\r\n", rendered.body]))
        self.transport.close()


def protocol_for(limits: ConnLimits) -> type[GuardedHttpTools]:
    """The protocol class of one server: its limits, its own count per address."""
    return type("GuardedHttpTools", (GuardedHttpTools,), {"limits": limits, "per_ip": {}})


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """What every gateway server is run with (``serve``, each ``--workers`` worker)."""
    return {
        "log_config": None,
        "access_log": False,
        "timeout_graceful_shutdown": 10,
        "timeout_keep_alive": settings.keep_alive_timeout_seconds,
    }


def raise_fd_limit(wanted: int) -> int:
    """Raise this process's open-file limit toward ``wanted`` (within the hard limit):
    each connection is a descriptor, and the default soft limit (often 1024) would
    refuse connections long before ``max_connections``. Returns the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    if soft != resource.RLIM_INFINITY and soft < wanted:
        log.warning(
            "open-file limit %d is below max_connections + 256 (%d): raise it (ulimit -n)",
            soft,
            wanted,
        )
    return int(soft)
