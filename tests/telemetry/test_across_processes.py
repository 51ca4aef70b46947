"""Observability across processes and hops (issue 26, point 3), all real processes:
``servelm serve --workers 2`` (Redis, JSON logs, traces to a file) in front of two
``servelm worker``s. Every log line of every process is JSON; /metrics, whichever
worker answers it, counts every process's requests and only grows; a request's id
is in the gateway's access line (with the replica that served it) and in that
replica's; the request's trace has the gateway's span and the worker's, its child."""

from __future__ import annotations

import asyncio
import itertools
import json
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from servelm.store.db import Database
from tests import procs
from tests.conftest import provision
from tests.fleet import fleetprocs

pytestmark = pytest.mark.slow  # two workers and three gateway processes: seconds

MODEL = "traced-smol"
WORKER_KEY = "worker-key-for-observability-tests"
METRICS_TOKEN = "metrics-token-for-observability-tests"
REQUESTS = 100
SCRAPES = 8
REDIS = "redis://127.0.0.1:6379/0"


def json_lines(path: Path) -> list[dict[str, Any]]:
    """Every line of a process's output, each of which must be one JSON object."""
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        try:
            record = json.loads(line)
        except ValueError:
            pytest.fail(f"{path.name}:{number} is not JSON: {line!r}")
        assert isinstance(record, dict), line
        records.append(record)
    return records


def chat_total(text: str) -> tuple[float, dict[tuple[str, tuple[tuple[str, str], ...]], float]]:
    """The chat requests /metrics counted, and every counter sample (to check that
    none went down between scrapes)."""
    counters: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    chats = 0.0
    for family in text_string_to_metric_families(text):
        if family.type != "counter":
            continue
        for sample in family.samples:
            if not sample.name.endswith("_total"):
                continue
            counters[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
            if sample.name == "servelm_requests_total" and sample.labels["route"] == "openai_chat":
                chats += sample.value
    return chats, counters


async def load_and_scrape(base: str, key: str) -> tuple[list[httpx.Response], list[str]]:
    """``REQUESTS`` chats, six at a time on fresh connections (the kernel spreads them
    over the workers), and a scrape of /metrics each time another eighth is done."""
    done = 0
    progress = asyncio.Condition()
    scrapes: list[str] = []

    async def one(client: httpx.AsyncClient, i: int, gate: asyncio.Semaphore) -> httpx.Response:
        nonlocal done
        async with gate:
            r = await client.post(
                f"{base}/v1/chat/completions",
                json={
                    "model": MODEL,
                    "messages": [{"role": "user", "content": f"Say hi {i}."}],
                    "max_tokens": 2,
                    "stream": i % 2 == 0,
                },
                headers={"x-api-key": key, "connection": "close"},
            )
        async with progress:
            done += 1
            progress.notify_all()
        return r

    async def scraper(client: httpx.AsyncClient) -> None:
        for k in range(1, SCRAPES + 1):
            due = k * REQUESTS // (SCRAPES + 1)
            async with progress:
                while done < due:
                    await progress.wait()
            r = await client.get(
                f"{base}/metrics",
                headers={"authorization": f"Bearer {METRICS_TOKEN}", "connection": "close"},
            )
            assert r.status_code == 200, r.text
            scrapes.append(r.text)

    gate = asyncio.Semaphore(6)
    async with httpx.AsyncClient(timeout=120) as client:
        scraping = asyncio.create_task(scraper(client))
        responses = await asyncio.gather(*(one(client, i, gate) for i in range(REQUESTS)))
        await scraping
        final = await client.get(
            f"{base}/metrics", headers={"authorization": f"Bearer {METRICS_TOKEN}"}
        )
        assert final.status_code == 200, final.text
        scrapes.append(final.text)
    return list(responses), scrapes


def test_serve_workers_observed_across_processes(tmp_path: Path, models_dir: Path) -> None:
    traces = tmp_path / "traces.jsonl"
    observed = {
        "SERVELM_LOG_FORMAT": "json",
        "SERVELM_TRACE_EXPORTER": "file",
        "SERVELM_TRACE_FILE": str(traces),
    }
    workers = [
        fleetprocs.worker(tmp_path, models_dir, "--slots", "4", "--api-key", WORKER_KEY, **observed)
        for _ in range(2)
    ]
    for w in workers:
        w.start()
    gw: procs.Gateway | None = None
    try:
        for w in workers:
            w.wait_ready()
        replicas = ", ".join(f'"{w.url}/v1"' for w in workers)
        models_file = tmp_path / "gateway.toml"
        models_file.write_text(
            f"""
[models.{MODEL}]
engine = "openai"
replicas = [{replicas}]
routing = "round_robin"
api_key = "{WORKER_KEY}"
upstream_model = "{fleetprocs.SLUG}"
health_interval = 0.5
context_window = 8192
max_output_tokens = 1024
input_price = 1000
output_price = 1000000
"""
        )
        env = procs.gateway_env(
            tmp_path / "gateway-data",
            models_dir,
            SERVELM_MODELS_FILE=str(models_file),
            SERVELM_REDIS_URL=REDIS,
            SERVELM_REDIS_PREFIX=f"t{uuid.uuid4().hex[:8]}",
            SERVELM_METRICS_TOKEN=METRICS_TOKEN,
            SERVELM_QUEUE_SIZE="200",
            **observed,
        )
        (gw,) = procs.start(env, tmp_path / "logs", 1, "--workers", "2")
        db = Database(f"sqlite:///{tmp_path / 'gateway-data' / 'servelm.db'}")
        key = provision(db, "observed", 100_000)
        db.dispose()

        # /metrics is behind its token, in multiprocess mode too.
        assert httpx.get(f"{gw.base_url}/metrics", timeout=10).status_code == 401

        responses, scrapes = asyncio.run(load_and_scrape(gw.base_url, key))
        assert [r.status_code for r in responses] == [200] * REQUESTS

        # Eight scrapes during the load and one after: the chat count never went down,
        # nor did any other counter, and the last one is every request, whichever
        # worker served it and whichever answered the scrape.
        assert len(scrapes) == SCRAPES + 1
        read = [chat_total(text) for text in scrapes]
        totals = [total for total, _ in read]
        assert totals == sorted(totals), totals
        assert totals[-1] == REQUESTS, totals
        for (_, before), (_, after) in itertools.pairwise(read):
            for sample, value in before.items():
                assert after.get(sample, 0.0) >= value, (sample, value, after.get(sample))

        # The replica counters are one sum too: each process mirrors its own every
        # second (and when it answers a scrape), so the other's last requests show
        # within a second.
        def replica_calls() -> float:
            r = httpx.get(
                f"{gw.base_url}/metrics",
                headers={"authorization": f"Bearer {METRICS_TOKEN}"},
                timeout=10,
            )
            _, counters = chat_total(r.text)
            return sum(v for (n, _), v in counters.items() if n == "servelm_replica_requests_total")

        assert gw is not None
        fleetprocs.wait_until(lambda: replica_calls() >= REQUESTS, 30, "mirrored replica calls")
        assert replica_calls() == REQUESTS
    finally:
        if gw is not None:
            gw.stop()
        for w in workers:
            w.stop()

    # Every line every process wrote is JSON: the supervisor, both gateway workers,
    # uvicorn's own lines, and both servelm workers.
    assert gw is not None
    gateway_lines = json_lines(gw.log)
    worker_lines = [json_lines(w.log) for w in workers]
    assert any(r["logger"] == "uvicorn.error" for r in gateway_lines)
    assert any(r["logger"] == "servelm.access" for r in gateway_lines)

    # One request followed through both access lines: the gateway's names the replica
    # (its index in the model's replicas, as /metrics labels it), and that replica's
    # access line has the same request id.
    rid = responses[7].headers["x-request-id"]
    (gw_line,) = [
        r for r in gateway_lines if r["logger"] == "servelm.access" and r["request_id"] == rid
    ]
    replica = gw_line["replica"]
    assert replica in (0, 1), gw_line
    assert "127.0.0.1" not in json.dumps(gw_line)  # the replica's address is not in it
    (worker_line,) = [
        r
        for r in worker_lines[replica]
        if r["logger"] == "servelm.access" and r["request_id"] == rid
    ]
    assert worker_line["msg"] == "POST /v1/chat/completions 200", worker_line
    assert not [r for r in worker_lines[1 - replica] if r["request_id"] == rid]
    # Both replicas served (round robin), each request's id in its replica's lines.
    assert {
        r["replica"]
        for r in gateway_lines
        if r["logger"] == "servelm.access" and r["msg"].startswith("POST")
    } == {0, 1}

    # The trace: the gateway's span of that request, and the worker's as its child.
    spans = [json.loads(line) for line in traces.read_text().splitlines()]
    (gw_span,) = [
        s
        for s in spans
        if s["service"] == "servelm-gateway" and s["attributes"]["servelm.request_id"] == rid
    ]
    (worker_span,) = [
        s
        for s in spans
        if s["service"] == "servelm-worker" and s["attributes"]["servelm.request_id"] == rid
    ]
    assert gw_span["parent_span_id"] is None
    assert worker_span["trace_id"] == gw_span["trace_id"]
    assert worker_span["parent_span_id"] == gw_span["span_id"]
    assert gw_span["attributes"]["servelm.replica"] == replica
    assert gw_span["kind"] == worker_span["kind"] == "SERVER"
    # One gateway span per chat request, none for the scrapes.
    assert len([s for s in spans if s["service"] == "servelm-gateway"]) == REQUESTS
    # Nor for the supervisor asking the engine process what it hosts (a GET).
    assert [s for s in spans if s["service"] == "servelm-engine"] == []
