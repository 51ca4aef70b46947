"""Passive health: a replica serving traffic is judged by that traffic, not probed
each interval; an ejected or idle one is probed, and an ejected one that passes comes
back. A real engine (``OpenAIUpstreamEngine``) relays real HTTP to two fault
upstreams (``tests.support.fault_upstream``, in-thread), whose ``/stats`` count the
probes they got."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from servelm.catalog.specs import ModelSpec
from servelm.engines.fleet.health import HealthChecker
from servelm.engines.upstream import OpenAIUpstreamEngine
from servelm.errors import ServelmError
from tests.servers import ThreadServer, serve_in_thread
from tests.support import fault_upstream

# The engine's own probe loop: too slow to fire while a test runs, so the rounds the
# tests count are the ones they run themselves.
OWN_INTERVAL = 600.0


@pytest.fixture
def upstreams() -> Iterator[tuple[ThreadServer, ThreadServer]]:
    a = serve_in_thread(fault_upstream.make_app())
    b = serve_in_thread(fault_upstream.make_app())
    try:
        yield a, b
    finally:
        a.stop()
        b.stop()


def probes(server: ThreadServer) -> int:
    return int(httpx.get(f"{server.base_url}/stats", timeout=10).json().get("probes", 0))


def engine(urls: list[str]) -> OpenAIUpstreamEngine:
    spec = ModelSpec(
        slug="passive",
        engine="openai",
        replicas=tuple(urls),  # type: ignore[arg-type]  # coerced by the validator
        routing="round_robin",
        health_interval=OWN_INTERVAL,
    )
    return OpenAIUpstreamEngine(spec, queue_size=8)


async def chat(e: OpenAIUpstreamEngine) -> list[dict[str, Any]]:
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    return [chunk async for chunk in e.stream(body)]


async def test_a_busy_healthy_replica_gets_no_probe_and_an_idle_one_does(
    upstreams: tuple[ThreadServer, ThreadServer],
) -> None:
    a, b = upstreams
    e = engine([f"{a.base_url}/ok/v1", f"{b.base_url}/ok/v1"])
    await e.start()
    try:
        for _ in range(4):  # round-robin: two answers from each
            await chat(e)
        before = probes(a), probes(b)
        # Traffic within the last interval: both are judged by it.
        busy = HealthChecker(e.replicas, interval=OWN_INTERVAL)
        assert await busy.probe_round() == []
        assert (probes(a), probes(b)) == before
        # No answer within the last interval: idle, so probed.
        idle = HealthChecker(e.replicas, interval=0.2)
        await asyncio.sleep(0.3)
        assert len(await idle.probe_round()) == 2
        assert (probes(a), probes(b)) == (before[0] + 1, before[1] + 1)
    finally:
        await e.close()


async def test_an_ejected_replica_is_probed_and_returns(
    upstreams: tuple[ThreadServer, ThreadServer],
) -> None:
    a, b = upstreams
    # b drops its connection mid-stream: sick, and with a healthy a beside it, ejected.
    e = engine([f"{a.base_url}/ok/v1", f"{b.base_url}/close/v1"])
    await e.start()
    try:
        good, bad = e.replicas.all
        outcomes = []
        for _ in range(2):  # round-robin: one lands on each
            try:
                await chat(e)
                outcomes.append("answered")
            except ServelmError as exc:  # b's cut stream, the client's to see
                outcomes.append(type(exc).__name__)
        assert sorted(outcomes) == ["UpstreamError", "answered"]
        assert not bad.healthy and good.healthy
        before = probes(a), probes(b)
        checker = HealthChecker(e.replicas, interval=0.2)
        await asyncio.sleep(0.3)  # past the cool-down (one interval) and a's idle window
        await chat(e)  # a serves again: busy, so not probed; b is probed
        assert await checker.probe_round() == [bad]
        assert bad.healthy
        assert (probes(a), probes(b)) == (before[0], before[1] + 1)
    finally:
        await e.close()
