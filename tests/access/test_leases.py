"""A concurrency lease cannot outlive its request, whatever happened to Redis (issue 25,
point 4): Redis is paused (SIGSTOP) while a key with ``concurrency = 2`` has two
streams running, and a third request is admitted meanwhile (its check times out at the
gateway, falls back to the process's counts, and Redis runs the check late, when it
wakes: a lease the gateway never heard of). Ten seconds after the streams end, no
lease is left in Redis (leases last ``SERVELM_RATELIMIT_LEASE_SECONDS``, 6 s, renewed
while their request runs).

Redis is a ``redis-server`` of this test's own (the shared one must not be paused).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import redis

from servelm.access.limits.records import set_key_limits, set_plan
from servelm.api.services import services
from servelm.billing import accounts
from servelm.billing.money import MICRO
from tests.conftest import LiveServer, free_port, make_settings, provision, start_server
from tests.hostile.conftest import wait_listening

MODEL = "slow"
SHARED = "shared"  # two slots

pytestmark = pytest.mark.skipif(not shutil.which("redis-server"), reason="needs redis-server")


@pytest.fixture(scope="module")
def redis_port() -> Iterator[int]:
    port = free_port()
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = redis.Redis(port=port, socket_timeout=0.5)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise
            time.sleep(0.05)
    yield port
    os.kill(proc.pid, signal.SIGCONT)
    proc.kill()
    proc.wait()


@pytest.fixture(scope="module")
def upstream_port() -> Iterator[int]:
    """An instant upstream whose chunks come 50 ms apart: streams that last."""
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.support.instant_upstream",
            "--port",
            str(port),
            "--chunk-delay",
            "0.05",
        ]
    )
    try:
        wait_listening(port, proc)
        yield port
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def gateway(
    redis_port: int,
    upstream_port: int,
    models_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[LiveServer]:
    tmp = tmp_path_factory.mktemp("leases")
    models = tmp / "servelm.toml"
    models.write_text(
        f'[models.{MODEL}]\nengine = "openai"\n'
        f'base_url = "http://127.0.0.1:{upstream_port}/v1"\n'
        "context_window = 4096\nmax_output_tokens = 512\n"
        f'[models.{SHARED}]\nengine = "openai"\n'
        f'base_url = "http://127.0.0.1:{upstream_port}/v1"\n'
        "context_window = 4096\nmax_output_tokens = 512\nslots = 2\n"
        "[models.smollm2-135m-instruct]\nenabled = false\n"
        "[plans.big]\nslots = 2\n"
    )
    settings = make_settings(
        tmp,
        models_dir,
        models_file=models,
        redis_url=f"redis://127.0.0.1:{redis_port}/0",
        redis_prefix=f"t{uuid.uuid4().hex[:8]}",
        # Not the default 0.1 s: on a loaded test machine a check could time out (and
        # fall back to the process's own counts) while Redis is up.
        ratelimit_redis_timeout=1.0,
    )
    live = start_server(settings)
    yield live
    live.stop()


def redis_pid(port: int) -> int:
    info = redis.Redis(port=port).info("server")
    return int(info["process_id"])


def live_leases(port: int, prefix: str) -> int:
    """Leases whose end is still ahead, in every in-flight set of ``prefix``."""
    client = redis.Redis(port=port)
    seconds, micros = client.time()
    now_ms = seconds * 1000 + micros // 1000
    return sum(
        int(client.zcount(name, f"({now_ms}", "+inf"))
        for name in client.scan_iter(f"{prefix}:rl:*:cc")
    )


def test_a_redis_pause_leaves_no_lease_behind(gateway: LiveServer, redis_port: int) -> None:
    key = provision(gateway.db, "leases", credits=100)
    set_key_limits(gateway.db, key.split("_")[1], concurrency=2)
    prefix = gateway.settings.redis_prefix
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Count from one to a hundred."}],
        "max_tokens": 40,  # 2 s of stream
        "stream": True,
    }
    url = f"{gateway.v1}/chat/completions"
    started = threading.Barrier(3)
    resume = threading.Event()
    outcome: list[tuple[int, str]] = []

    def stream() -> None:
        with (
            httpx.Client(timeout=120, headers={"x-api-key": key}) as client,
            client.stream("POST", url, json=body) as r,
        ):
            lines = r.iter_lines()
            first = next(lines)  # admitted: its lease is in Redis
            started.wait()
            resume.wait()
            outcome.append((r.status_code, first + "".join(lines)))

    threads = [threading.Thread(target=stream) for _ in range(2)]
    for t in threads:
        t.start()
    started.wait(timeout=120)
    assert live_leases(redis_port, prefix) == 2
    pid = redis_pid(redis_port)
    os.kill(pid, signal.SIGSTOP)
    try:
        # Both places are taken in Redis, but Redis does not answer: the check falls
        # back to this process's counts (fail-open), and Redis will run it late.
        with httpx.Client(timeout=120, headers={"x-api-key": key}) as client:
            third = client.post(url, json={**body, "stream": False, "max_tokens": 2})
        assert third.status_code == 200, third.text
        resume.set()
        for t in threads:
            t.join(timeout=120)
        streams_ended = time.monotonic()
        assert [code for code, _ in outcome] == [200, 200]
        assert all("[DONE]" in text for _, text in outcome)
        # Redis stays paused a while after the streams (their settlements time out).
        time.sleep(2)
    finally:
        os.kill(pid, signal.SIGCONT)
    # The acceptance bound: 10 s after the streams end, no lease remains.
    time.sleep(max(0.0, streams_ended + 10 - time.monotonic()))
    assert live_leases(redis_port, prefix) == 0
    # And the key has both its places back.
    with httpx.Client(timeout=120, headers={"x-api-key": key}) as client:
        for _ in range(2):
            r = client.post(url, json={**body, "stream": False, "max_tokens": 2})
            assert r.status_code == 200, r.text


def test_a_refusal_for_requests_in_flight_says_so(gateway: LiveServer) -> None:
    key = provision(gateway.db, "busy", credits=100)
    set_key_limits(gateway.db, key.split("_")[1], concurrency=1)
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Count from one to a hundred."}],
        "max_tokens": 400,  # 20 s of stream, cut short when the client leaves
        "stream": True,
    }
    url = f"{gateway.v1}/chat/completions"
    with (
        httpx.Client(timeout=120, headers={"x-api-key": key}) as client,
        client.stream("POST", url, json=body) as running,
    ):
        assert running.status_code == 200
        # Kept: a dropped iterator closes the response, and the stream would end.
        lines = running.iter_lines()
        next(lines)
        refused = client.post(url, json={**body, "stream": False})
        assert refused.status_code == 429, refused.text
        assert refused.headers["retry-after"] == "1"
        message = refused.json()["error"]["message"]
        assert "at most 1 request in flight at once" in message
        assert "Retry when one ends" in message


def wait_until(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 60
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


@pytest.mark.parametrize(("plan", "share"), [(None, 1), ("big", 2)])
def test_one_account_cannot_hold_every_slot(
    gateway: LiveServer, plan: str | None, share: int
) -> None:
    """Three long streams of one account on a two-slot model: by default they run one
    at a time (all but one slot), so another account's request is answered while they
    run; a plan with ``slots = 2`` lets the account use both."""
    account = accounts.create_account(gateway.db, f"greedy-{plan}")
    accounts.grant(gateway.db, account.id, 100 * MICRO, note="test")
    _, greedy = accounts.create_key(gateway.db, account.id, "greedy")
    if plan is not None:
        set_plan(gateway.db, account.id, plan)
    other = provision(gateway.db, f"other-{plan}", credits=100)
    chat = services(gateway.app).chat
    engine = chat.engines[SHARED]
    body = {
        "model": SHARED,
        "messages": [{"role": "user", "content": "Go on."}],
        "max_tokens": 400,  # 20 s of stream each; cut short when the client leaves
        "stream": True,
    }
    url = f"{gateway.v1}/chat/completions"
    leave = threading.Event()

    def stream() -> None:
        with (
            httpx.Client(timeout=120, headers={"x-api-key": greedy}) as client,
            client.stream("POST", url, json=body) as r,
        ):
            for _ in r.iter_lines():
                if leave.is_set():
                    return

    threads = [threading.Thread(target=stream) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        key = (account.id, SHARED)
        if share < 2:
            wait_until(lambda: chat.shares._shares.get(key, [None, 0])[1] == 3, "3 in share")
        wait_until(lambda: engine.stats.running == share, f"{share} running")
        assert engine.stats.running == share
        # Another account is served at once by the slot left free, while those run.
        if share < 2:
            r = httpx.post(
                url,
                json={**body, "stream": False, "max_tokens": 2},
                headers={"x-api-key": other},
                timeout=120,
            )
            assert r.status_code == 200, r.text
            assert all(t.is_alive() for t in threads), "the long streams ended first"
    finally:
        leave.set()
        for t in threads:
            t.join(timeout=120)
