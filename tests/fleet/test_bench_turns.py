"""``servelm bench --conversations``: multi-turn load through a real gateway over two
instant upstreams, with each replica's share read from the gateway's /metrics."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from servelm.cli import app
from tests.conftest import LiveServer, make_settings, start_server
from tests.servers import serve_in_thread
from tests.support.instant_upstream import make_app


@pytest.fixture(scope="module")
def upstreams() -> Iterator[list[str]]:
    servers = [serve_in_thread(make_app()) for _ in range(2)]
    yield [f"{srv.base_url}/v1" for srv in servers]
    for srv in servers:
        srv.stop()


@pytest.fixture(scope="module")
def gateway(
    upstreams: list[str], models_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    tmp = tmp_path_factory.mktemp("turns")
    models_file = tmp / "servelm.toml"
    replicas = ", ".join(f'"{u}"' for u in upstreams)
    models_file.write_text(
        f'[models.fleet-instant]\nengine = "openai"\nreplicas = [{replicas}]\n'
        'routing = "round_robin"\ncontext_window = 65536\nmax_output_tokens = 1024\n'
        "[models.smollm2-135m-instruct]\nenabled = false\n"
    )
    srv = start_server(make_settings(tmp, models_dir, models_file=models_file))
    yield srv
    srv.stop()


def test_multi_turn_mode_reports_later_turns_and_replica_shares(
    gateway: LiveServer, upstreams: list[str], tmp_path: Path
) -> None:
    out = tmp_path / "turns.json"
    args = ["bench", gateway.v1, "--model", "fleet-instant", "--api-key", gateway.api_key,
            "--conversations", "6", "--turns", "3", "--system-tokens", "200",
            "--concurrency", "3", "--output-len", "4", "--out", str(out)]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    r = json.loads(out.read_text())
    assert (r["completed"], r["failed"]) == (18, 0)
    assert r["ttft_later_turns_ms"]["p50"] > 0 and r["ttft_first_turn_ms"]["p50"] > 0
    assert r["output_throughput"] == pytest.approx(4 * r["request_throughput"])
    # Round robin over two replicas: 9 calls each, as the gateway counted them.
    # Replicas are named by their place in the models file, never by address.
    assert r["replica_share"] == {"0": 9.0, "1": 9.0}


def test_think_time_pauses_are_seeded_exponential_draws_of_the_mean() -> None:
    import random
    import statistics

    from servelm.cli.loadgen.bench_turns import think_pauses

    a = think_pauses(random.Random(7), 50, 4, 2.0)
    assert a == think_pauses(random.Random(7), 50, 4, 2.0)  # a seed, the same pauses
    assert a != think_pauses(random.Random(8), 50, 4, 2.0)
    flat = [p for row in a for p in row]
    assert len(a) == 50 and all(len(row) == 4 for row in a) and min(flat) > 0
    # 200 draws of an exponential of mean 2: the sample mean is within a few standard
    # errors (2 / sqrt(200) = 0.14) of it, and the spread is that of an exponential.
    assert statistics.mean(flat) == pytest.approx(2.0, abs=0.5)
    assert statistics.stdev(flat) == pytest.approx(2.0, abs=0.6)
    assert think_pauses(random.Random(7), 3, 4, 0.0) == [[0.0] * 4] * 3


def test_multi_turn_mode_with_think_time_completes_every_turn(
    gateway: LiveServer, tmp_path: Path
) -> None:
    out = tmp_path / "turns.json"
    args = ["bench", gateway.v1, "--model", "fleet-instant", "--api-key", gateway.api_key,
            "--conversations", "4", "--turns", "3", "--system-tokens", "50",
            "--concurrency", "4", "--output-len", "4", "--think-time", "0.05",
            "--seed", "3", "--out", str(out)]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    r = json.loads(out.read_text())
    assert (r["completed"], r["failed"], r["think_time_s"]) == (12, 0, 0.05)
