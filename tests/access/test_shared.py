"""Two gateway processes sharing PostgreSQL and Redis: one limit across both, a key
revoked on one refused by the other within a second, and Redis stopped mid-test with
requests still served (fail-open) and the fallback counted in ``/metrics``.

Redis here is a ``redis-server`` of this test's own (the shared one must stay up),
stopped in the last test.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from servelm.access.limits.records import set_key_limits
from servelm.store.db import Database
from tests import procs
from tests.conftest import ADMIN_TOKEN, drop_pg_database, free_port, new_pg_database, provision

SLUG = "smollm2-135m-instruct"
BODY = {"model": SLUG, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}

pytestmark = pytest.mark.skipif(not shutil.which("redis-server"), reason="needs redis-server")


class Fleet:
    def __init__(self, gateways: list[procs.Gateway], db: Database, redis: subprocess.Popen[bytes]):
        self.gateways = gateways
        self.db = db
        self.redis = redis

    def key(self, name: str, **limits: int) -> str:
        key = provision(self.db, name, credits=100)
        if limits:
            set_key_limits(self.db, key.split("_")[1], **limits)
        return key


def _wait_redis(port: int) -> None:
    import redis

    deadline = time.monotonic() + 10
    while True:
        try:
            redis.Redis(port=port, socket_timeout=0.5).ping()
            return
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@pytest.fixture(scope="module")
def fleet(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("fleet")
    port = free_port()
    redis_proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    db_url = new_pg_database()
    db = Database(db_url)
    db.upgrade()
    env = procs.gateway_env(
        tmp / "data",
        models_dir,
        SERVELM_DATABASE_URL=db_url,
        SERVELM_REDIS_URL=f"redis://127.0.0.1:{port}/0",
        SERVELM_REDIS_PREFIX=f"t{uuid.uuid4().hex[:8]}",
        SERVELM_ADMIN_TOKEN=ADMIN_TOKEN,
        # Long enough that only the invalidation can explain a refusal within 1 s.
        SERVELM_KEY_CACHE_SECONDS="300",
        SERVELM_SLOTS="4",
    )
    try:
        _wait_redis(port)
        gateways = procs.start(env, tmp / "logs", 2)
    except BaseException:
        redis_proc.kill()
        db.dispose()
        drop_pg_database(db_url)
        raise
    yield Fleet(gateways, db, redis_proc)
    for gw in gateways:
        gw.stop()
    redis_proc.kill()
    redis_proc.wait()
    db.dispose()
    drop_pg_database(db_url)


async def _spread(fleet: Fleet, key: str, n: int) -> list[int]:
    async with httpx.AsyncClient(timeout=120, headers={"x-api-key": key}) as client:
        responses = await asyncio.gather(
            *(
                client.post(f"{fleet.gateways[i % 2].base_url}/v1/chat/completions", json=BODY)
                for i in range(n)
            )
        )
    return [r.status_code for r in responses]


def test_one_limit_across_two_gateways(fleet: Fleet) -> None:
    key = fleet.key("shared-10", rpm=10)
    codes = asyncio.run(_spread(fleet, key, 24))
    assert sorted(codes) == [200] * 10 + [429] * 14


def test_key_revoked_on_one_gateway_is_refused_by_the_other_within_a_second(
    fleet: Fleet,
) -> None:
    one, other = fleet.gateways
    key = fleet.key("revoked")
    headers = {"x-api-key": key}
    # The other gateway has the key cached (for 300 s).
    assert httpx.post(f"{other.base_url}/v1/chat/completions", json=BODY, headers=headers,
                      timeout=60).status_code == 200  # fmt: skip
    r = httpx.post(
        f"{one.base_url}/admin/keys/{key.split('_')[1]}/revoke",
        headers={"authorization": f"Bearer {ADMIN_TOKEN}"},
    )
    assert r.status_code == 200, r.text
    revoked_at = time.monotonic()
    while True:
        # A request for an unknown model: authentication runs first, the engine never.
        r = httpx.post(
            f"{other.base_url}/v1/chat/completions",
            json={**BODY, "model": "no-such-model"},
            headers=headers,
        )
        if r.status_code == 401:
            break
        assert r.status_code == 404
        assert time.monotonic() - revoked_at < 1.0, "still accepted a second after revoking"
        time.sleep(0.02)
    assert "revoked" in r.json()["error"]["message"]


def test_redis_stopped_mid_test_fails_open(fleet: Fleet) -> None:
    key = fleet.key("fail-open", rpm=1000)
    assert asyncio.run(_spread(fleet, key, 4)) == [200] * 4
    fleet.redis.kill()
    fleet.redis.wait()
    codes = asyncio.run(_spread(fleet, key, 8))
    assert codes == [200] * 8
    for gw in fleet.gateways:
        metrics = httpx.get(f"{gw.base_url}/metrics").text
        fallbacks = [
            float(line.rsplit(" ", 1)[1])
            for line in metrics.splitlines()
            if line.startswith('servelm_ratelimit_fallbacks_total{op="acquire"}')
        ]
        assert fallbacks and fallbacks[0] >= 1, metrics[-2000:]
