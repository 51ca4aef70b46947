"""Images in chat content: decode and check data URIs, fetch http(s) URLs safely.

Every image a request carries ends up here before any engine sees it, and leaves as
a verified ``data:`` URI of a format the engines read (PNG, JPEG, WebP). Nothing a
client sends reaches Pillow's decoder before its byte size and pixel count have been
checked, and no URL is fetched from an address the operator did not allow: the host
and every redirect target must resolve to public addresses, and the connection goes
to the address that was checked (no second DNS lookup to rebind).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import functools
import io
import ipaddress
import re
import socket
import warnings
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urljoin, urlsplit

import httpx
from PIL import Image as PILImage
from PIL import UnidentifiedImageError

from servelm.errors import InvalidRequest, PayloadTooLarge

Resolver = Callable[[str, int], Awaitable[list[str]]]

# Pillow format name → MIME type, for the formats we accept.
_FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp", "GIF": "image/gif"}
_DATA_URI = re.compile(r"^data:(?P<mime>[^;,]*)(?P<params>(;[^;,]*)*),(?P<data>.*)$", re.S)
# Not in ipaddress's is_private but no business of an image fetcher either.
_SHARED = ipaddress.ip_network("100.64.0.0/10")
_THIS_NET = ipaddress.ip_network("0.0.0.0/8")


@dataclass(frozen=True)
class MediaLimits:
    max_image_bytes: int = 10 * 1024 * 1024
    max_pixels: int = 40_000_000
    # Larger images are scaled down to fit; vision encoders resize far below this.
    max_side: int = 2048
    max_images: int = 8
    connect_timeout: float = 5.0
    read_timeout: float = 10.0
    max_redirects: int = 3
    # The whole fetch, redirects and body included: a read timeout alone is per read,
    # and a server dripping a byte every few seconds never trips it (issue 17).
    fetch_deadline: float = 30.0
    # Threads decoding images (Pillow), off the event loop; more requests wait for one.
    decode_workers: int = 2
    # Host names, addresses or networks (CIDR) that may be fetched although private,
    # each scoped to ports: ``entry`` alone allows the web's ports (80, 443) only,
    # ``entry:port`` (``[v6]:port``) that port, ``entry:*`` any port (issue 17: an entry
    # that allowed a whole host let a redirect reach its other services).
    allow_hosts: tuple[str, ...] = ()


@dataclass(frozen=True)
class Image:
    data: bytes
    mime: str
    width: int
    height: int
    source: str = "data"

    def data_uri(self) -> str:
        return f"data:{self.mime};base64,{base64.b64encode(self.data).decode()}"


def decode_data_uri(uri: str, limits: MediaLimits) -> Image:
    m = _DATA_URI.match(uri)
    if m is None:
        raise InvalidRequest("An image data URI must look like data:image/png;base64,<data>.")
    mime = m["mime"].strip().lower()
    if mime == "image/svg+xml":
        raise InvalidRequest("SVG images are not supported; send PNG, JPEG, WebP or GIF.")
    if mime == "image/jpg":
        mime = "image/jpeg"
    if mime not in _FORMATS.values():
        raise InvalidRequest(
            f"Unsupported image type '{mime or 'none'}'; send PNG, JPEG, WebP or GIF."
        )
    if ";base64" not in m["params"].lower():
        raise InvalidRequest("An image data URI must be base64-encoded (';base64,').")
    payload = m["data"].strip()
    # Checked before decoding: base64 is 4 characters per 3 bytes.
    if len(payload) * 3 // 4 > limits.max_image_bytes:
        raise PayloadTooLarge(
            f"The image is larger than the limit of {limits.max_image_bytes} bytes."
        )
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest("The image data URI is not valid base64.") from None
    return check_image_bytes(raw, mime, limits, "data")


def check_image_bytes(raw: bytes, declared: str | None, limits: MediaLimits, source: str) -> Image:
    """Verify ``raw`` is one whole image of an accepted kind within the limits; return
    it ready for an engine (GIF's first frame as PNG, oversize images scaled down)."""
    where = "" if source == "data" else f" from {source}"
    if not raw:
        raise InvalidRequest(f"The image{where} is empty.")
    if len(raw) > limits.max_image_bytes:
        raise PayloadTooLarge(
            f"The image{where} is larger than the limit of {limits.max_image_bytes} bytes."
        )
    with warnings.catch_warnings():
        # Pillow warns (rather than fails) between 1x and 2x its bomb threshold.
        warnings.simplefilter("error", PILImage.DecompressionBombWarning)
        try:
            im = PILImage.open(io.BytesIO(raw))
        except UnidentifiedImageError:
            raise InvalidRequest(f"The data{where} is not an image Pillow can read.") from None
        except (PILImage.DecompressionBombError, PILImage.DecompressionBombWarning):
            raise _bomb(where, limits) from None
        except (OSError, SyntaxError, ValueError) as exc:
            raise InvalidRequest(f"The image{where} is truncated or corrupt ({exc}).") from None
        mime = _FORMATS.get(im.format or "")
        if mime is None:
            raise InvalidRequest(f"The image{where} is {im.format}; send PNG, JPEG, WebP or GIF.")
        if declared and declared != mime:
            raise InvalidRequest(
                f"The image{where} is declared as {declared} but its bytes are {mime}."
            )
        width, height = im.size
        if width * height > limits.max_pixels:
            raise InvalidRequest(
                f"The image{where} is {width}x{height} pixels, more than the limit of "
                f"{limits.max_pixels} pixels."
            )
        try:
            im.load()  # decode every byte now: truncated files fail here, not later
        except (PILImage.DecompressionBombError, PILImage.DecompressionBombWarning):
            raise _bomb(where, limits) from None
        except (OSError, SyntaxError, ValueError) as exc:
            raise InvalidRequest(f"The image{where} is truncated or corrupt ({exc}).") from None
    if mime == "image/gif":
        im.seek(0)
        return _encode(im.convert("RGBA"), "PNG", source)
    if max(width, height) > limits.max_side:
        im.thumbnail((limits.max_side, limits.max_side))
        return _encode(im, im.format or "PNG", source)
    return Image(raw, mime, width, height, source)


def _bomb(where: str, limits: MediaLimits) -> InvalidRequest:
    return InvalidRequest(
        f"The image{where} would decompress to far more than the limit of "
        f"{limits.max_pixels} pixels (a decompression bomb)."
    )


def _encode(im: PILImage.Image, fmt: str, source: str) -> Image:
    out = io.BytesIO()
    if fmt == "JPEG":
        im.convert("RGB").save(out, "JPEG", quality=90)
    else:
        im.save(out, fmt)
    return Image(out.getvalue(), _FORMATS[fmt], im.width, im.height, source)


async def _system_resolver(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


@dataclass
class ImageLoader:
    """Turns ``image_url`` values into checked images; one pooled client for fetches."""

    limits: MediaLimits
    resolver: Resolver = _system_resolver
    _client: httpx.AsyncClient | None = field(default=None, init=False, repr=False)
    _pool: ThreadPoolExecutor | None = field(default=None, init=False, repr=False)

    async def load(self, url: str) -> Image:
        if url[:5].lower() == "data:":
            return await self._off_loop(decode_data_uri, url, self.limits)
        try:
            async with asyncio.timeout(self.limits.fetch_deadline):
                return await self.fetch(url)
        except TimeoutError:
            host = urlsplit(url).hostname or "its host"
            raise InvalidRequest(
                f"Fetching the image from {host} took longer than {self.limits.fetch_deadline:g} s."
            ) from None

    async def _off_loop(self, fn: Callable[..., Image], *args: Any) -> Image:
        """Base64 and Pillow work on a bounded pool: 8 large JPEGs decoded on the loop
        stalled every other request for seconds (issue 17)."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(
                max_workers=self.limits.decode_workers, thread_name_prefix="images"
            )
        return await asyncio.get_running_loop().run_in_executor(
            self._pool, functools.partial(fn, *args)
        )

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    # -- fetching --------------------------------------------------------------------

    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(
                timeout=httpx.Timeout(
                    self.limits.read_timeout, connect=self.limits.connect_timeout
                ),
                follow_redirects=False,  # every hop is checked by us
                trust_env=False,  # a proxy from the environment would bypass the checks
            )
        return self._client

    async def fetch(self, url: str) -> Image:
        for _ in range(self.limits.max_redirects + 1):
            host, request = await self._checked_request(url)
            try:
                response = await self.client().send(request, stream=True)
            except httpx.TimeoutException:
                raise InvalidRequest(f"Fetching the image from {host} timed out.") from None
            except httpx.TransportError as exc:
                raise InvalidRequest(
                    f"Fetching the image from {host} failed: {exc or type(exc).__name__}."
                ) from None
            try:
                if response.is_redirect and "location" in response.headers:
                    url = urljoin(url, response.headers["location"])
                    continue
                if response.status_code != 200:
                    raise InvalidRequest(
                        f"Fetching the image from {host} failed: HTTP {response.status_code}."
                    )
                raw = await self._read_capped(response, host)
                ctype = response.headers.get("content-type", "").split(";")[0].strip().lower()
            finally:
                await response.aclose()
            declared = ctype if ctype.startswith("image/") else None
            if declared == "image/jpg":
                declared = "image/jpeg"
            return await self._off_loop(check_image_bytes, raw, declared, self.limits, host)
        raise InvalidRequest(
            f"The image URL redirected more than {self.limits.max_redirects} times."
        )

    async def _read_capped(self, response: httpx.Response, host: str) -> bytes:
        cap = self.limits.max_image_bytes
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > cap:
            raise PayloadTooLarge(f"The image from {host} is larger than the limit of {cap} bytes.")
        chunks: list[bytes] = []
        size = 0
        try:
            async for chunk in response.aiter_bytes():
                size += len(chunk)
                if size > cap:
                    raise PayloadTooLarge(
                        f"The image from {host} is larger than the limit of {cap} bytes."
                    )
                chunks.append(chunk)
        except httpx.TimeoutException:
            raise InvalidRequest(f"Fetching the image from {host} timed out.") from None
        except httpx.TransportError as exc:
            raise InvalidRequest(f"Fetching the image from {host} failed: {exc}.") from None
        return b"".join(chunks)

    async def _checked_request(self, url: str) -> tuple[str, httpx.Request]:
        return await self.checked_request(url)

    async def checked_request(
        self,
        url: str,
        *,
        method: str = "GET",
        what: str = "image",
        content: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[str, httpx.Request]:
        """A request to the checked address of ``url``'s host, with the real Host
        header (and TLS server name), so DNS cannot change between check and use.
        ``what`` names the URL in refusals (webhooks use these checks too)."""
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        label = what[:1].upper() + what[1:]
        if scheme not in ("http", "https"):
            data_too = " (or a data URI)" if what == "image" else ""
            raise InvalidRequest(
                f"{label} URLs must be http or https{data_too}, not '{scheme or url[:16]}'."
            )
        host = parts.hostname
        if not host:
            raise InvalidRequest(f"The {what} URL has no host.")
        try:
            port = parts.port or (443 if scheme == "https" else 80)
        except ValueError:
            raise InvalidRequest(f"The {what} URL has an invalid port.") from None
        address = await self._allowed_address(host, port, what)
        netloc = f"[{address}]" if ":" in address else address
        target = parts._replace(netloc=f"{netloc}:{port}").geturl()
        host_header = parts.netloc.rsplit("@", 1)[-1]
        extensions: dict[str, Any] = {"sni_hostname": host} if scheme == "https" else {}
        request = self.client().build_request(
            method,
            target,
            headers={**(headers or {}), "Host": host_header},
            content=content,
            extensions=extensions,
        )
        return host, request

    async def _allowed_address(self, host: str, port: int, what: str = "image") -> str:
        try:
            addresses = [str(ipaddress.ip_address(host))]
        except ValueError:
            try:
                addresses = await self.resolver(host, port)
            except OSError:
                raise InvalidRequest(f"The {what} host {host} could not be resolved.") from None
        if not addresses:
            raise InvalidRequest(f"The {what} host {host} could not be resolved.")
        for address in addresses:
            reason = self._refusal(host, port, ipaddress.ip_address(address))
            if reason:
                label = what[:1].upper() + what[1:]
                raise InvalidRequest(f"{label} URL refused: host {host} resolves to {reason}.")
        return addresses[0]

    def _refusal(
        self, host: str, port: int, ip: ipaddress.IPv4Address | ipaddress.IPv6Address
    ) -> str:
        if self._allowed(host, port, ip):
            return ""
        return non_global_reason(ip)

    def _allowed(
        self, host: str, port: int, ip: ipaddress.IPv4Address | ipaddress.IPv6Address
    ) -> bool:
        for entry in self.limits.allow_hosts:
            name, ports = split_allow_entry(entry)
            if ports is not None and port not in ports:
                continue
            if name.lower() == host.lower():
                return True
            with contextlib.suppress(ValueError):
                if ip in ipaddress.ip_network(name, strict=False):
                    return True
        return False


# The ports an allow-list entry without one covers.
WEB_PORTS = frozenset({80, 443})


def split_allow_entry(entry: str) -> tuple[str, frozenset[int] | None]:
    """``host``, ``host:port``, ``host:*``, ``[v6]:port``, ``cidr:port`` → (host, the
    ports it allows, None for any); ValueError for a port that is none of these."""
    name, port = entry, ""
    if entry.startswith("[") and "]:" in entry:
        name, _, port = entry[1:].partition("]:")
    elif entry.count(":") == 1:
        name, _, port = entry.partition(":")
    else:
        name = entry.strip("[]")
    if port == "*":
        return name, None
    if port.isdigit() and 0 < int(port) < 65536:
        return name, frozenset({int(port)})
    if port:
        raise ValueError(f"image allow-list entry {entry!r}: the port must be 1-65535 or *")
    return name, WEB_PORTS


# IPv6 forms that carry an IPv4 address a gateway may route to: NAT64's well-known
# prefixes (RFC 6052, 8215).
_NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))


def non_global_reason(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """Why ``ip`` is no place for an image fetch, or "" for a public address.

    ``is_global`` is the whole test (issue 17: a list of special cases missed 6to4
    and site-local); the cases before it only make the message precise, and addresses
    that embed an IPv4 one (mapped, 6to4, Teredo, NAT64) are judged by that too."""
    if isinstance(ip, ipaddress.IPv6Address):
        # Forms that reach exactly the IPv4 address inside them (mapped, 6to4, NAT64)
        # are that address: judged by it alone, since Python's own verdict on their
        # IPv6 prefixes changed between 3.11 releases (2002::/16 was private before
        # 3.11.4). Teredo tunnels through a relay, so it must pass both checks.
        translated: list[ipaddress.IPv4Address] = []
        if ip.ipv4_mapped is not None:
            translated.append(ip.ipv4_mapped)
        if ip.sixtofour is not None:
            translated.append(ip.sixtofour)
        if any(ip in net for net in _NAT64):
            translated.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
        for inner in [*translated, *(ip.teredo or ())]:
            reason = non_global_reason(inner)
            if reason:
                return f"{reason}, inside {ip}"
        if translated:
            return ""
        if ip.is_site_local:
            return f"a site-local address ({ip})"
    for test, what in (
        (ip.is_loopback, "a loopback address"),
        (ip.is_link_local, "a link-local address"),
        (ip.is_multicast, "a multicast address"),
        (ip.is_unspecified, "an unspecified address"),
        (ip.version == 4 and (ip in _SHARED or ip in _THIS_NET), "a reserved address"),
        (ip.is_private, "a private address"),
        (ip.is_reserved, "a reserved address"),
        (not ip.is_global, "a non-global address"),
    ):
        if test:
            return f"{what} ({ip})"
    return ""


async def inline_images(body: dict[str, Any], loader: ImageLoader) -> int:
    """Replace every ``image_url`` in an engine body by its checked data URI; returns
    how many there were."""
    parts = [
        part
        for message in body["messages"]
        if isinstance(message.get("content"), list)
        for part in message["content"]
        if part.get("type") == "image_url"
    ]
    if len(parts) > loader.limits.max_images:
        raise InvalidRequest(
            f"The request has {len(parts)} images; the limit is {loader.limits.max_images}.",
            param="messages",
        )
    tasks = [asyncio.ensure_future(loader.load(p["image_url"]["url"])) for p in parts]
    try:
        images = await asyncio.gather(*tasks)
    finally:
        # One image failing (or the caller leaving) stops the others' fetches and
        # decodes too, instead of leaving them running unobserved (issue 17).
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    for part, image in zip(parts, images, strict=True):
        part["image_url"] = {**part["image_url"], "url": image.data_uri()}
    return len(parts)
