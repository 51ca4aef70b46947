"""Images: decoding and checking data URIs, and fetching URLs without SSRF."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import struct
import threading
import zlib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image as PILImage
from pydantic import ValidationError

from servelm.chat.media import (
    ImageLoader,
    MediaLimits,
    decode_data_uri,
    inline_images,
    split_allow_entry,
)
from servelm.config import Settings
from servelm.errors import InvalidRequest, PayloadTooLarge

LIMITS = MediaLimits()


def encode(fmt: str, size: tuple[int, int] = (40, 30), mode: str = "RGB", **kw: object) -> bytes:
    out = io.BytesIO()
    PILImage.new(mode, size, "red" if mode != "1" else 0).save(out, fmt, **kw)
    return out.getvalue()


def uri(raw: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(raw).decode()}"


def png_claiming(width: int, height: int) -> bytes:
    """A small PNG whose header claims other dimensions (CRC fixed up)."""
    raw = bytearray(encode("PNG"))
    ihdr = raw[12:29]  # b"IHDR" + 13 bytes of header
    ihdr[4:12] = struct.pack(">II", width, height)
    raw[12:29] = ihdr
    raw[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    return bytes(raw)


def bomb() -> bytes:
    """A 1-bit 30000x30000 PNG: a few KB on the wire, 900 megapixels decoded."""
    return encode("PNG", (30000, 30000), mode="1")


BAD = [
    ("png-as-jpeg", uri(encode("PNG"), "image/jpeg"), InvalidRequest, "declared as image/jpeg"),
    ("truncated-png", uri(encode("PNG", (300, 300))[:200]), InvalidRequest, "truncated"),
    (
        "truncated-jpeg",
        uri(encode("JPEG", (300, 300))[:300], "image/jpeg"),
        InvalidRequest,
        "truncated",
    ),
    ("huge-dimensions", uri(png_claiming(100_000, 100_000)), InvalidRequest, "pixels"),
    ("bomb", uri(bomb()), InvalidRequest, "pixels"),
    ("bad-base64", "data:image/png;base64,@@@not*base64@@@", InvalidRequest, "base64"),
    ("svg", uri(b"<svg/>", "image/svg+xml"), InvalidRequest, "SVG"),
    ("empty", "data:image/png;base64,", InvalidRequest, "empty"),
    ("text-as-png", uri(b"hello, I am not an image"), InvalidRequest, "not an image"),
    ("bmp", uri(encode("BMP"), "image/png"), InvalidRequest, "BMP"),
    ("tiff", uri(encode("TIFF"), "image/png"), InvalidRequest, "TIFF"),
    ("text-plain", uri(b"hi", "text/plain"), InvalidRequest, "Unsupported image type"),
    ("not-base64-encoded", "data:image/png,rawbytes", InvalidRequest, "base64-encoded"),
    ("no-comma", "data:image/png;base64", InvalidRequest, "must look like"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "url", "error", "words"), BAD, ids=[b[0] for b in BAD])
def test_bad_images_are_refused_clearly(
    name: str, url: str, error: type[Exception], words: str
) -> None:
    with pytest.raises(error) as exc:
        decode_data_uri(url, LIMITS)
    assert words in str(exc.value)
    assert exc.value.status_code in (400, 413)  # type: ignore[attr-defined]


def test_oversize_bytes_are_413_before_decoding() -> None:
    with pytest.raises(PayloadTooLarge, match="limit of 100 bytes"):
        decode_data_uri(uri(encode("PNG", (200, 200))), MediaLimits(max_image_bytes=100))


def test_too_many_images_is_400() -> None:
    part = {"type": "image_url", "image_url": {"url": uri(encode("PNG"))}}
    body = {"messages": [{"role": "user", "content": [part] * 3}]}
    loader = ImageLoader(MediaLimits(max_images=2))
    with pytest.raises(InvalidRequest, match="3 images; the limit is 2"):
        asyncio.run(inline_images(body, loader))


@pytest.mark.parametrize(
    ("fmt", "mime"), [("PNG", "image/png"), ("JPEG", "image/jpeg"), ("WEBP", "image/webp")]
)
def test_good_images_pass_through_unchanged(fmt: str, mime: str) -> None:
    raw = encode(fmt)
    image = decode_data_uri(uri(raw, mime), LIMITS)
    assert (image.mime, image.width, image.height, image.data) == (mime, 40, 30, raw)
    assert image.data_uri() == uri(raw, mime)


def test_gif_becomes_its_first_frame_as_png() -> None:
    frames = [PILImage.new("RGB", (20, 10), c) for c in ("red", "blue")]
    out = io.BytesIO()
    frames[0].save(out, "GIF", save_all=True, append_images=frames[1:])
    image = decode_data_uri(uri(out.getvalue(), "image/gif"), LIMITS)
    assert (image.mime, image.width, image.height) == ("image/png", 20, 10)
    first = PILImage.open(io.BytesIO(image.data)).convert("RGB").getpixel((0, 0))
    assert first == (255, 0, 0)


def test_large_images_are_scaled_down_to_the_max_side() -> None:
    image = decode_data_uri(uri(encode("PNG", (4000, 1000))), MediaLimits(max_side=1024))
    assert (image.width, image.height) == (1024, 256)
    assert PILImage.open(io.BytesIO(image.data)).size == (1024, 256)


# -- fetching ----------------------------------------------------------------------------

PNG = encode("PNG", (24, 16))


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        assert isinstance(self.server, ThreadingHTTPServer)
        port = self.server.server_port
        if self.path == "/cat.png":
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(PNG)))
            self.end_headers()
            self.wfile.write(PNG)
        elif self.path == "/to-private":
            self.send_response(302)
            self.send_header("Location", f"http://127.0.0.2:{port}/cat.png")
            self.end_headers()
        elif self.path.startswith("/loop"):
            self.send_response(302)
            self.send_header("Location", f"/loop{len(self.path)}")
            self.end_headers()
        elif self.path == "/endless":
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()  # no Content-Length: the cap must hold while streaming
            # The fetcher hangs up once past its cap; that is the behaviour under test.
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                for _ in range(100):
                    self.wfile.write(b"\0" * 1024)
        elif self.path == "/slow":
            self.server.stop.wait(5)  # type: ignore[attr-defined]
        else:
            self.send_response(404)
            self.end_headers()

    def log_message(self, *args: object) -> None:
        return  # keep test output clean


@pytest.fixture(scope="module")
def server() -> Iterator[int]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.stop = threading.Event()  # type: ignore[attr-defined]
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd.server_address[1]
    httpd.stop.set()  # type: ignore[attr-defined]
    httpd.shutdown()
    httpd.server_close()


class Resolver:
    """Stands in for DNS: fixed answers per host name, and a record of every lookup."""

    def __init__(self, answers: dict[str, list[list[str]]]) -> None:
        self.answers = answers
        self.calls: list[str] = []

    async def __call__(self, host: str, port: int) -> list[str]:
        self.calls.append(host)
        replies = self.answers[host]
        return replies[min(len(self.calls), len(replies)) - 1]


def fetch(url: str, limits: MediaLimits = LIMITS, resolver: Resolver | None = None) -> object:
    async def go() -> object:
        loader = ImageLoader(limits, resolver or Resolver({}))
        try:
            return await loader.load(url)
        finally:
            await loader.aclose()

    return asyncio.run(go())


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("http://127.0.0.1/x.png", "loopback"),
        ("http://10.0.0.1/x.png", "private"),
        ("http://169.254.169.254/latest/meta-data", "link-local"),
        ("http://[::1]/x.png", "loopback"),
        ("http://[::ffff:127.0.0.1]/x", "loopback"),
        ("http://0.0.0.0/", "unspecified"),
        ("http://100.64.1.1/x.png", "reserved"),
        ("http://224.0.0.1/x.png", "multicast"),
        ("http://intranet.example/x.png", "a private address (192.168.1.5)"),
        ("ftp://example.com/x.png", "not 'ftp'"),
        ("file:///etc/passwd", "not 'file'"),
        ("http:///x.png", "no host"),
    ],
)
def test_urls_to_non_public_places_are_refused(url: str, words: str) -> None:
    resolver = Resolver({"intranet.example": [["192.168.1.5"]]})
    with pytest.raises(InvalidRequest) as exc:
        fetch(url, resolver=resolver)
    assert words in str(exc.value)


def test_allow_listed_loopback_server_is_fetched(server: int) -> None:
    limits = MediaLimits(allow_hosts=(f"127.0.0.1:{server}",))
    image = fetch(f"http://127.0.0.1:{server}/cat.png", limits)
    assert (image.width, image.height, image.source) == (24, 16, "127.0.0.1")  # type: ignore[attr-defined]
    with pytest.raises(InvalidRequest, match="loopback"):
        fetch(f"http://127.0.0.1:{server}/cat.png")


def test_an_entry_without_a_port_allows_only_the_web_ports(server: int) -> None:
    """The image server listens on some high port: a bare entry does not reach it,
    ``:*`` does."""
    with pytest.raises(InvalidRequest, match="loopback"):
        fetch(f"http://127.0.0.1:{server}/cat.png", MediaLimits(allow_hosts=("127.0.0.1",)))
    with pytest.raises(InvalidRequest, match="loopback"):
        fetch(f"http://127.0.0.1:{server}/cat.png", MediaLimits(allow_hosts=("127.0.0.0/8",)))
    image = fetch(f"http://127.0.0.1:{server}/cat.png", MediaLimits(allow_hosts=("127.0.0.1:*",)))
    assert image.width == 24  # type: ignore[attr-defined]


def test_a_redirect_to_a_private_address_is_refused(server: int) -> None:
    resolver = Resolver({"images.example": [["127.0.0.1"]]})
    limits = MediaLimits(allow_hosts=(f"images.example:{server}",))
    assert fetch(f"http://images.example:{server}/cat.png", limits, resolver)
    with pytest.raises(InvalidRequest, match=r"host 127\.0\.0\.2 resolves to a loopback"):
        fetch(f"http://images.example:{server}/to-private", limits, resolver)


def test_redirect_chains_are_capped(server: int) -> None:
    limits = MediaLimits(allow_hosts=(f"127.0.0.1:{server}",), max_redirects=2)
    with pytest.raises(InvalidRequest, match="more than 2 times"):
        fetch(f"http://127.0.0.1:{server}/loop", limits)


def test_byte_cap_holds_while_streaming(server: int) -> None:
    limits = MediaLimits(allow_hosts=(f"127.0.0.1:{server}",), max_image_bytes=10_000)
    with pytest.raises(PayloadTooLarge, match="limit of 10000 bytes"):
        fetch(f"http://127.0.0.1:{server}/endless", limits)


def test_fetch_failures_name_the_host_and_reason(server: int) -> None:
    limits = MediaLimits(allow_hosts=(f"127.0.0.1:{server}", "127.0.0.1:1"), read_timeout=0.5)
    with pytest.raises(InvalidRequest, match=r"127\.0\.0\.1 failed: HTTP 404"):
        fetch(f"http://127.0.0.1:{server}/missing.png", limits)
    with pytest.raises(InvalidRequest, match="timed out"):
        fetch(f"http://127.0.0.1:{server}/slow", limits)
    with pytest.raises(InvalidRequest, match=r"from 127\.0\.0\.1 failed"):
        fetch("http://127.0.0.1:1/x.png", limits)


def test_the_connection_goes_to_the_address_that_was_checked(server: int) -> None:
    """DNS rebinding: a second lookup would say 10.0.0.1. There is no second lookup."""
    resolver = Resolver({"rebind.example": [["127.0.0.1"], ["10.0.0.1"]]})
    limits = MediaLimits(allow_hosts=(f"127.0.0.1:{server}",))
    image = fetch(f"http://rebind.example:{server}/cat.png", limits, resolver)
    assert image.width == 24  # type: ignore[attr-defined]
    assert resolver.calls == ["rebind.example"]


@pytest.mark.parametrize("entry", ["127.0.0.1:abc", "images.example:0", "[::1]:70000", "h:-1"])
def test_an_allow_list_entry_with_a_bad_port_stops_start_up(entry: str) -> None:
    with pytest.raises(ValidationError, match="the port must be 1-65535 or"):
        Settings(image_allow_hosts=f"10.0.0.1, {entry}")  # type: ignore[arg-type]  # as the env gives it


def test_allow_list_entries_parse_to_their_ports() -> None:
    assert split_allow_entry("images.example") == ("images.example", frozenset({80, 443}))
    assert split_allow_entry("10.0.0.0/8:8080") == ("10.0.0.0/8", frozenset({8080}))
    assert split_allow_entry("[fd00::1]:*") == ("fd00::1", None)
    assert split_allow_entry("fd00::1") == ("fd00::1", frozenset({80, 443}))
