"""The load generator against real servers: the instant upstream, and servelm."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from servelm.cli import app
from servelm.cli.loadgen import bench
from tests.conftest import LiveServer
from tests.servers import running
from tests.support.instant_upstream import make_app


@pytest.fixture(scope="module")
def instant() -> Iterator[str]:
    with running(make_app()) as srv:
        yield f"{srv.base_url}/v1"


@pytest.mark.parametrize("stream", [True, False])
def test_closed_loop_counts_every_request_and_token(instant: str, stream: bool) -> None:
    r = asyncio.run(
        bench.run(
            f"{instant}/chat/completions",
            model="instant",
            load=bench.Load(concurrency=4),
            requests=40,
            input_len=16,
            output_len=8,
            stream=stream,
        )
    )
    assert (r["completed"], r["failed"]) == (40, 0)
    assert r["output_throughput"] == pytest.approx(8 * r["request_throughput"])
    assert 0 < r["ttft_ms"]["p50"] <= r["e2e_ms"]["p50"] <= r["e2e_ms"]["p99"]
    if stream:
        assert r["itl_ms"]["p50"] > 0 and r["tpot_ms"]["mean"] > 0
    else:
        assert r["itl_ms"]["p50"] == 0


def test_poisson_arrivals_and_failures_are_reported(instant: str) -> None:
    r = asyncio.run(
        bench.run(
            f"{instant}/chat/missing",
            model="instant",
            load=bench.Load(rate=200.0),
            requests=10,
        )
    )
    assert (r["completed"], r["failed"]) == (0, 10)
    assert r["errors"] == ['HTTP 404: {"error":{"message":"not found"}}']


def test_cli_benchmarks_servelm_and_writes_json(live: LiveServer, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(
        app,
        [
            "bench",
            live.v1,
            "--api-key",
            live.api_key,
            "--concurrency",
            "1,2",
            "--requests",
            "4",
            "--output-len",
            "4",
            "--input-len",
            "8",
            "--warmup",
            "0",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    runs = json.loads(out.read_text())
    assert [r["load"]["concurrency"] for r in runs] == [1, 2]
    for r in runs:
        assert (r["completed"], r["failed"]) == (4, 0)
        assert r["output_throughput"] > 0 and r["ttft_ms"]["p99"] > 0
