"""Points 2, 4 (image fetches) and 13 of issue 17: image work off the event loop,
a total deadline on fetches, fetches stopped with their request, and SSRF holes."""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import threading
from typing import Any

import pytest
from PIL import Image as PILImage

from servelm.api.services import services
from servelm.chat.media import ImageLoader, MediaLimits, inline_images, non_global_reason
from servelm.errors import InvalidRequest
from tests.conftest import LiveServer
from tests.hostile.conftest import Drip, jpeg


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def load(loader: ImageLoader, url: str) -> Any:
    try:
        return await loader.load(url)
    finally:
        await loader.aclose()


def test_a_dripping_image_hits_the_fetch_deadline(drip: Drip) -> None:
    """1 byte every 0.2 s never trips a 10 s read timeout; the total deadline stops it."""
    limits = MediaLimits(allow_hosts=(f"127.0.0.1:{drip.port}",), read_timeout=10, fetch_deadline=2)
    with pytest.raises(InvalidRequest, match="took longer than 2 s"):
        run(load(ImageLoader(limits), f"http://127.0.0.1:{drip.port}/drip.png"))
    drip.wait_closed(1)


def test_one_bad_image_stops_the_other_fetches(drip: Drip) -> None:
    limits = MediaLimits(allow_hosts=(f"127.0.0.1:{drip.port}",), fetch_deadline=600)
    body = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": f"http://127.0.0.1:{drip.port}/a"}},
                    {"type": "image_url", "image_url": {"url": f"http://127.0.0.1:{drip.port}/b"}},
                    {
                        "type": "image_url",
                        "image_url": {"url": f"http://127.0.0.1:{drip.port}/fail-when-all-started"},
                    },
                ],
            }
        ]
    }

    async def go() -> None:
        loader = ImageLoader(limits)
        try:
            with pytest.raises(InvalidRequest, match="HTTP 404"):
                await inline_images(body, loader)
            # The loop keeps running (as a server's does): the fetches must not.
            await asyncio.sleep(0.5)
        finally:
            await loader.aclose()

    run(go())
    drip.wait_closed(2)


def test_a_cancelled_request_stops_its_fetches(drip: Drip) -> None:
    limits = MediaLimits(allow_hosts=(f"127.0.0.1:{drip.port}",), fetch_deadline=600)
    body = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": f"http://127.0.0.1:{drip.port}/a"}}
                ],
            }
        ]
    }

    async def go() -> None:
        loader = ImageLoader(limits)
        task = asyncio.ensure_future(inline_images(body, loader))
        while drip.started < 1:
            await asyncio.sleep(0.02)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.5)
        await loader.aclose()

    run(go())
    drip.wait_closed(1)


def test_image_decoding_runs_off_the_event_loop(
    live: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Eight large JPEGs in one request stalled /health for seconds: Pillow ran on the
    loop. The server's own loader decodes them; Pillow must never run on the loop's
    thread, and the loop keeps answering while it works."""
    loop = services(live.app).loop
    loop_thread: list[int] = []
    loop.call_soon_threadsafe(lambda: loop_thread.append(threading.get_ident()))
    threads: set[int] = set()
    real_open = PILImage.open

    def spy(*args: Any, **kw: Any) -> Any:
        threads.add(threading.get_ident())
        return real_open(*args, **kw)

    monkeypatch.setattr(PILImage, "open", spy)
    uri = "data:image/jpeg;base64," + base64.b64encode(jpeg(3000)).decode()
    body = {
        "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}}] * 8}
        ]
    }
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    async def go() -> int:
        ticker = asyncio.ensure_future(tick())
        try:
            return await inline_images(body, services(live.app).chat.media)
        finally:
            ticker.cancel()

    count = asyncio.run_coroutine_threadsafe(go(), loop).result(timeout=300)
    assert count == 8
    assert threads and loop_thread[0] not in threads
    assert ticks > 0  # the loop ran other work while the images were decoded


@pytest.mark.parametrize(
    "address",
    [
        "2002:7f00:1::",
        "2002:a00:1::1",
        "2002:c0a8:101::",
        "fec0::1",
        "fec0:1::ab",
        "64:ff9b::7f00:1",
    ],
)
def test_addresses_that_are_not_global_are_refused(address: str) -> None:
    assert non_global_reason(ipaddress.ip_address(address))
    loader = ImageLoader(MediaLimits())
    with pytest.raises(InvalidRequest, match="refused"):
        run(load(loader, f"http://[{address}]:8080/x.png"))


@pytest.mark.parametrize(
    "address",
    ["8.8.8.8", "2001:4860:4860::8888", "2002:808:808::1", "::ffff:8.8.8.8", "64:ff9b::808:808"],
)
def test_global_addresses_pass_the_check(address: str) -> None:
    assert non_global_reason(ipaddress.ip_address(address)) == ""


def test_the_allow_list_is_scoped_to_host_and_port(drip: Drip) -> None:
    other = Drip()
    try:
        limits = MediaLimits(allow_hosts=(f"127.0.0.1:{drip.port}",), fetch_deadline=10)
        image = run(load(ImageLoader(limits), f"http://127.0.0.1:{drip.port}/cat.jpg"))
        assert image.width == 32
        # Another port on the allowed host: refused, directly or through a redirect.
        with pytest.raises(InvalidRequest, match="loopback"):
            run(load(ImageLoader(limits), f"http://127.0.0.1:{other.port}/cat.jpg"))
        with pytest.raises(InvalidRequest, match="loopback"):
            run(load(ImageLoader(limits), f"http://127.0.0.1:{drip.port}/redirect/{other.port}"))
        assert other.started == 0
    finally:
        other.httpd.shutdown()
        other.httpd.server_close()
