"""``servelm serve --workers 3``: three gateway processes on one port share money
through the database and rate limits through Redis, and the model is loaded once, in
the engine process.

The same crowd as test_concurrency.py (200 concurrent requests against a balance that
pays for exactly 20), but through one port that three worker processes accept on.
"""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from pathlib import Path

import pytest

from servelm.access.limits.records import set_key_limits
from servelm.billing import accounts
from servelm.store.db import Database
from tests import procs
from tests.access.test_limits import burst
from tests.billing.test_concurrency import (
    AFFORDABLE,
    TOKENS,
    assert_spent_exactly,
    crowd_env,
    fire,
)
from tests.conftest import provision

pytestmark = pytest.mark.slow  # a real engine process and three workers: seconds

WORKERS = 3
REDIS = "redis://127.0.0.1:6379/0"  # the machine's own; each test its own prefix


def workers_env(db_url: str, tmp_path: Path, models_dir: Path) -> dict[str, str]:
    """The crowd's settings, with Redis, which ``--workers`` above 1 requires."""
    env = crowd_env(db_url, tmp_path, models_dir)
    env["SERVELM_REDIS_URL"] = REDIS
    env["SERVELM_REDIS_PREFIX"] = f"t{uuid.uuid4().hex[:8]}"
    # What these tests check is one count across workers. With the default 0.1 s, a
    # loop held up by a loaded machine turned one check into a timeout and so into
    # this worker's own count (fail-open, as designed: tests/access/test_shared.py):
    # 6 of 20 through once, not 5.
    env["SERVELM_RATELIMIT_REDIS_TIMEOUT"] = "5"
    return env


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue  # ended while we looked
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def cmdline(pid: int) -> str:
    return (Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")).decode()


def mapped_weights(pid: int) -> set[str]:
    """The GGUF files a process has mapped (llama.cpp mmaps its weights)."""
    lines = Path(f"/proc/{pid}/maps").read_text().splitlines()
    return {line.split()[-1] for line in lines if line.endswith(".gguf")}


def gone(pid: int, timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not Path(f"/proc/{pid}").exists():
            return True
        time.sleep(0.1)
    return False


@pytest.mark.timeout(600)
def test_workers_share_one_balance_and_one_model(
    db_url: str, tmp_path: Path, models_dir: Path
) -> None:
    env = workers_env(db_url, tmp_path, models_dir)
    (gw,) = procs.start(env, tmp_path / "logs", 1, "--workers", str(WORKERS))
    try:
        kids = children(gw.proc.pid)
        hosts = [p for p in kids if "servelm.processes.multiproc host" in cmdline(p)]
        workers = [p for p in kids if "multiprocessing" in cmdline(p) and p not in hosts]
        assert len(hosts) == 1, [cmdline(p) for p in kids]
        assert len(workers) >= WORKERS, [cmdline(p) for p in kids]
        # The weights are mapped once, by the model's process under the engine
        # process (``engines.llamacpp_process``), not once per worker.
        models = children(hosts[0])
        assert len(models) == 1, [cmdline(p) for p in models]
        assert "-m servelm.engines.llamacpp_process" in cmdline(models[0])
        assert mapped_weights(models[0])
        assert all(not mapped_weights(p) for p in [gw.proc.pid, hosts[0], *workers])

        db = Database(db_url)
        key = provision(db, "crowd", AFFORDABLE * TOKENS)
        account = accounts.get_account(db, "crowd")
        responses = asyncio.run(fire([gw], key))
        # Rate limits are one count across the workers, not one per worker.
        limited = provision(db, "limited", 100)
        set_key_limits(db, limited.split("_")[1], rpm=5)
        body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
        url = f"{gw.base_url}/v1/smollm2-135m-instruct"
        codes = [r.status_code for r in asyncio.run(burst(url, limited, body, 20))]
    finally:
        gw.stop()
    # SIGTERM is enough: each worker drains, its server stops, and the supervisor ends
    # without being killed (it used to wait for workers that drained and served on).
    assert gw.proc.returncode != -signal.SIGKILL, "the supervisor had to be killed"
    assert all(gone(p) for p in workers), "a worker outlived its supervisor"
    assert gone(hosts[0]), "the engine process outlived its supervisor"
    assert gone(models[0]), "the model's process outlived the engine process"
    assert sorted(codes) == [200] * 5 + [429] * 15, codes

    try:
        assert_spent_exactly(responses, db, account.id, env)
    finally:
        db.dispose()


@pytest.mark.timeout(300)
def test_workers_end_when_their_supervisor_is_killed(tmp_path: Path, models_dir: Path) -> None:
    """SIGKILL leaves the supervisor no chance to stop anyone: the workers and the
    engine process must notice on their own (a parent-death signal) and not serve on
    as orphans holding the port."""
    env = workers_env(f"sqlite:///{tmp_path / 'servelm.db'}", tmp_path, models_dir)
    (gw,) = procs.start(env, tmp_path / "logs", 1, "--workers", "2")
    kids = children(gw.proc.pid)
    assert len(kids) >= 3, [cmdline(p) for p in kids]  # two workers, the engine process
    gw.proc.kill()
    gw.proc.wait()
    survivors = [p for p in kids if not gone(p)]
    assert survivors == [], [cmdline(p) for p in survivors]


def test_workers_without_redis_are_refused(tmp_path: Path, models_dir: Path) -> None:
    """Without a shared store each worker would count limits on its own: N times the
    limit. The command says so and stops before starting anything."""
    env = crowd_env(f"sqlite:///{tmp_path / 'servelm.db'}", tmp_path, models_dir)
    env.pop("SERVELM_REDIS_URL", None)
    done = procs.cli(env, "serve", "--port", "0", "--workers", "2")
    assert done.returncode == 2, done.stdout + done.stderr
    assert "--redis-url" in done.stderr and "SERVELM_REDIS_URL" in done.stderr
