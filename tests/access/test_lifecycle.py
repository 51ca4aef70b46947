"""Graceful shutdown and operator signals on a real gateway process: SIGTERM during
10 running streams, ``/readyz`` during the drain, the ledger afterwards, and the JSON
access log (one object per line, no key material).
"""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from servelm.billing import audit
from servelm.store.db import Database
from servelm.store.tables import usage
from tests import procs
from tests.conftest import provision

PRICES = """
[models.smollm2-135m-instruct]
input_price = 1000
output_price = 1000000
"""
SLUG = "smollm2-135m-instruct"
DRAIN = 4
LONG = 1000  # tokens: far more than a stream gets through in the drain window


class Stream(threading.Thread):
    """One streaming client; records every SSE payload it gets."""

    def __init__(self, url: str, key: str, max_tokens: int) -> None:
        super().__init__(daemon=True)
        self.url, self.key, self.max_tokens = url, key, max_tokens
        self.events: list[str] = []
        self.status = 0
        self.started = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        body = {
            "model": SLUG,
            "messages": [{"role": "user", "content": "Tell me a long story."}],
            "max_tokens": self.max_tokens,
            "ignore_eos": True,
            "stream": True,
        }
        try:
            with httpx.stream(
                "POST", self.url, json=body, headers={"x-api-key": self.key}, timeout=120
            ) as r:
                self.status = r.status_code
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        self.events.append(line.removeprefix("data: "))
                        self.started.set()
        except BaseException as exc:  # recorded and asserted on, not swallowed
            self.error = exc
        finally:
            self.started.set()

    @property
    def content_chunks(self) -> int:
        n = 0
        for e in self.events:
            if e != "[DONE]":
                for c in json.loads(e).get("choices") or ():
                    n += bool(c.get("delta", {}).get("content"))
        return n


@pytest.mark.timeout(300)
def test_sigterm_drains_streams_and_the_json_log_is_clean(tmp_path: Path, models_dir: Path) -> None:
    models_file = tmp_path / "servelm.toml"
    models_file.write_text(PRICES)
    db_url = f"sqlite:///{tmp_path / 'data' / 'servelm.db'}"
    (tmp_path / "data").mkdir()
    db = Database(db_url)
    db.upgrade()
    # Provisioned before start, so no first-start key is ever printed.
    key = provision(db, "drained", 10_000)
    env = procs.gateway_env(
        tmp_path / "data",
        models_dir,
        SERVELM_MODELS_FILE=str(models_file),
        SERVELM_DRAIN_SECONDS=str(DRAIN),
        SERVELM_SLOTS="10",
        SERVELM_LOG_FORMAT="json",
    )
    (gw,) = procs.start(env, tmp_path / "logs")
    try:
        _drain_and_check(gw, key, db, env)
    finally:
        gw.stop()


def _drain_and_check(gw: procs.Gateway, key: str, db: Database, env: dict[str, str]) -> None:
    url = f"{gw.base_url}/v1/chat/completions"
    # Four finish inside the drain window, six are far too long to. All ten fit the
    # model's KV cache together (each reserves its prompt and max_tokens: 6 x 1,000 +
    # 4 x 8 and the prompts, under 8,192), so all start at once.
    streams = [Stream(url, key, 8) for _ in range(4)] + [Stream(url, key, LONG) for _ in range(6)]
    for s in streams:
        s.start()
    for s in streams:
        assert s.started.wait(60), "a stream never started"
    assert all(s.status == 200 for s in streams)

    gw.proc.send_signal(signal.SIGTERM)
    # During the drain: not ready, new requests refused, alive all the same.
    deadline = time.monotonic() + 5
    ready = httpx.get(f"{gw.base_url}/readyz", timeout=5)
    while ready.status_code == 200 and time.monotonic() < deadline:
        ready = httpx.get(f"{gw.base_url}/readyz", timeout=5)
    assert ready.status_code == 503 and ready.json()["problems"] == ["draining"]
    assert httpx.get(f"{gw.base_url}/healthz", timeout=5).status_code == 200
    refused = httpx.post(
        url,
        json={"model": SLUG, "messages": [{"role": "user", "content": "hi"}]},
        headers={"x-api-key": key},
        timeout=5,
    )
    assert refused.status_code == 503 and refused.headers["retry-after"]

    assert gw.proc.wait(timeout=60) == 0
    for s in streams:
        s.join(timeout=30)
        assert s.error is None, s.error

    finished = [s for s in streams if s.events[-1] == "[DONE]"]
    stopped = [s for s in streams if s.events[-1] != "[DONE]"]
    assert len(finished) >= 4 and all(s.max_tokens == 8 for s in finished)
    assert len(stopped) == 6
    for s in stopped:
        error = json.loads(s.events[-1])["error"]
        assert "shutting down" in error["message"]
    with db.read() as conn:
        rows = conn.execute(select(usage).order_by(usage.c.id)).all()
    cut = [r for r in rows if r.status == "cancelled"]
    assert len(cut) == 6
    # Each stopped stream paid for what it was sent, no more than was produced.
    assert sorted(r.completion_tokens for r in cut) >= sorted(s.content_chunks for s in stopped)
    assert all(0 < r.completion_tokens < LONG and r.cost > 0 for r in cut)
    assert audit.ledger_check(db) == []
    db.dispose()
    check = procs.cli(env, "ledger", "check")
    assert check.returncode == 0, check.stdout + check.stderr

    # The log: one JSON object per line, one access line per request, no secrets.
    text = gw.log.read_text()
    lines = [json.loads(line) for line in text.splitlines() if line.strip()]
    access = [entry for entry in lines if entry["logger"] == "servelm.access"]
    chat = [entry for entry in access if entry["msg"].startswith("POST /v1/chat")]
    assert len(chat) == 11
    served = [entry for entry in chat if entry["status"] == 200]
    assert len(served) == 10
    for entry in served:
        assert entry["key_id"] == key.split("_")[1]
        assert entry["model"] == SLUG
        assert entry["request_id"].startswith("req_")
        assert {"account_id", "prompt_tokens", "completion_tokens", "cost", "ms"} <= set(entry)
    secret = key.split("_", 2)[2]
    assert key not in text and secret not in text


@pytest.mark.timeout(300)
def test_a_second_signal_exits_at_once(tmp_path: Path, models_dir: Path) -> None:
    env = procs.gateway_env(
        tmp_path / "data", models_dir, SERVELM_DRAIN_SECONDS="120", SERVELM_SLOTS="1"
    )
    (gw,) = procs.start(env, tmp_path / "logs")
    try:
        key = provision(Database(f"sqlite:///{tmp_path / 'data' / 'servelm.db'}"), "impatient", 100)
        stream = Stream(f"{gw.base_url}/v1/chat/completions", key, 1500)
        stream.start()
        assert stream.started.wait(60) and stream.status == 200
        gw.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        while httpx.get(f"{gw.base_url}/readyz", timeout=5).status_code == 200:
            assert time.monotonic() < deadline, "never started draining"
            time.sleep(0.05)
        gw.proc.send_signal(signal.SIGTERM)
        # Far sooner than the 120 s drain: the second signal does not wait.
        assert gw.proc.wait(timeout=30) == 1
        stream.join(timeout=30)
        assert stream.events[-1] != "[DONE]"
    finally:
        gw.stop()
