"""Gateway overhead: an instant upstream behind nothing, servelm (SQLite, PostgreSQL)
and LiteLLM, at several concurrencies, streaming and not.

    .venv/bin/python bench/gateway_overhead.py                 # everything it can run
    .venv/bin/python bench/gateway_overhead.py --contenders direct,servelm-sqlite

The gateway under test runs pinned to CPU 0; the instant upstream and this load
generator share CPU 1, so the gateway has one whole core and nothing else competes
for it. Each point is run ``--repeats`` times and the median is reported. Results go
to bench/results/gateway_overhead.json; render them with bench/report.py.

LiteLLM runs from its own virtualenv (``--litellm`` path, default /tmp/litellm-venv)
in master-key mode: its virtual-key mode needs Prisma engine binaries that cannot be
downloaded here.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

from servelm.cli.loadgen import bench

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
BIN = Path(sys.executable).parent
GATEWAY_CPU, CLIENT_CPU = 0, 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pinned(cpu: int, argv: list[str]) -> list[str]:
    return ["taskset", "-c", str(cpu), *argv]


def wait_http(url: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.TransportError:
            time.sleep(0.2)
    raise RuntimeError(f"{url} did not come up")


class Proc:
    def __init__(self, argv: list[str], env: dict[str, str] | None = None) -> None:
        self.log = Path(tempfile.mkstemp(suffix=".log")[1])
        with self.log.open("wb") as out:
            self.p = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)

    def stop(self) -> None:
        self.p.terminate()
        try:
            self.p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.p.kill()


def first_key(data: Path, proc: Proc) -> str:
    """The first start's API key: in ``first-api-key`` beside the data where stdout is
    no terminal (a benchmark's), in the log otherwise."""
    path = data / "first-api-key"
    text = path.read_text() if path.exists() else proc.log.read_text()
    match = re.search(r"slm_[a-z0-9]{12}_[A-Za-z0-9_-]{43}", text)
    assert match, "no first-start key, in the data folder or the log"
    return match.group(0)


def start_upstream(chunk_delay: float = 0.0) -> tuple[Proc, str]:
    """The instant upstream on the load generator's CPU; ``chunk_delay`` spaces its
    stream's chunks out (to hold streams open)."""
    port = free_port()
    argv = [
        str(BIN / "python"),
        "-m",
        "tests.support.instant_upstream",
        "--port",
        str(port),
    ]
    proc = Proc(pinned(CLIENT_CPU, [*argv, "--chunk-delay", str(chunk_delay)]))
    wait_http(f"http://127.0.0.1:{port}/v1/models")
    return proc, f"http://127.0.0.1:{port}/v1"


def start_servelm(
    upstream: str,
    database: str = "sqlite",
    *,
    slots: int | None = None,
    cpu: int | None = None,
    workers: int = 1,
    model_options: str = "",
    context_window: int = 8192,
) -> tuple[Proc, str, str]:
    """servelm as a gateway node in front of ``upstream`` (the built-in local model
    disabled), keys and credits on; returns the process, its /v1 URL and a key.
    ``model_options``: more TOML lines for the "instant" entry (e.g. vision)."""
    data = Path(tempfile.mkdtemp(prefix="servelm-bench-"))
    models = data / "servelm.toml"
    models.write_text(
        f'[models.instant]\nengine = "openai"\nbase_url = "{upstream}"\n'
        f"context_window = {context_window}\nmax_output_tokens = 4096\n"
        + (f"slots = {slots}\n" if slots else "")
        + model_options
        + "[models.smollm2-135m-instruct]\nenabled = false\n"
    )
    env = {
        **os.environ,
        "SERVELM_DATA_DIR": str(data),
        "SERVELM_MODELS_FILE": str(models),
        "SERVELM_STARTER_CREDITS": "1000000000",
        "SERVELM_LOG_LEVEL": "warning",
        "SERVELM_QUEUE_SIZE": "4096",
    }
    if database in ("postgresql", "postgresql-noflush"):
        name = f"servelm_bench_{uuid.uuid4().hex[:8]}"
        import psycopg

        with psycopg.connect("postgresql://postgres@127.0.0.1/postgres", autocommit=True) as c:
            c.execute(f'CREATE DATABASE "{name}"')
            if database == "postgresql-noflush":
                # A diagnostic only (scale_path.py --diagnose-flush): commits that do
                # not wait for the WAL flush, as SQLite's NORMAL mode does not, to see
                # what the durable commits cost. servelm itself never runs this way.
                c.execute(f'ALTER DATABASE "{name}" SET synchronous_commit = off')
        env["SERVELM_DATABASE_URL"] = f"postgresql://postgres@127.0.0.1/{name}"
    port = free_port()
    argv = [str(BIN / "servelm"), "serve", "--port", str(port)]
    if workers != 1:
        argv += ["--workers", str(workers)]
        # Workers share rate limits through Redis (no limits are set here: this is
        # what any --workers deployment runs with).
        env["SERVELM_REDIS_URL"] = "redis://127.0.0.1:6379/0"
        env["SERVELM_REDIS_PREFIX"] = f"bench{uuid.uuid4().hex[:8]}"
    proc = Proc(pinned(cpu, argv) if cpu is not None else argv, env)
    wait_http(f"http://127.0.0.1:{port}/health")
    return proc, f"http://127.0.0.1:{port}/v1", first_key(data, proc)


def start_litellm(upstream: str, venv: Path) -> tuple[Proc, str, str]:
    config = Path(tempfile.mkstemp(suffix=".yaml")[1])
    config.write_text(
        "model_list:\n  - model_name: instant\n    litellm_params:\n"
        f"      model: openai/instant\n      api_base: {upstream}\n      api_key: none\n"
    )
    port = free_port()
    key = "sk-bench-master"
    env = {**os.environ, "LITELLM_MASTER_KEY": key, "LITELLM_LOG": "ERROR"}
    argv = [str(venv / "bin" / "litellm"), "--config", str(config), "--port", str(port)]
    proc = Proc(pinned(GATEWAY_CPU, argv), env)
    wait_http(f"http://127.0.0.1:{port}/health/liveliness", timeout=180)
    return proc, f"http://127.0.0.1:{port}/v1", key


_TICK = os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"VmRSS:\s+(\d+) kB", status)
    assert match
    return int(match.group(1)) / 1024


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its descendants (all threads), from /proc."""
    children: dict[int, list[int]] = {}
    times: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the process ended while we looked
        child = int(entry.name)
        children.setdefault(int(fields[1]), []).append(child)
        times[child] = (int(fields[11]) + int(fields[12])) / _TICK
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        total += times.get(p, 0.0)
        todo.extend(children.get(p, ()))
    return total


def run_load(
    url: str,
    key: str | None,
    args: argparse.Namespace,
    load: bench.Load,
    requests: int,
    stream: bool,
) -> dict[str, Any]:
    """``requests`` chat requests to the model "instant" under ``load``, after 20
    unmeasured ones."""
    return asyncio.run(
        bench.run(
            f"{url}/chat/completions",
            model="instant",
            load=load,
            requests=requests,
            input_len=args.input_len,
            output_len=args.output_len,
            stream=stream,
            api_key=key,
            warmup=20,
        )
    )


def one_run(
    url: str,
    key: str | None,
    args: argparse.Namespace,
    stream: bool,
    c: int,
    pid: int | None,
    requests: int,
) -> dict[str, Any]:
    """One point; with the gateway's pid, also the gateway CPU it took per request."""
    before = cpu_seconds(pid) if pid else 0.0
    result = run_load(url, key, args, bench.Load(concurrency=c), requests, stream)
    if pid:
        # Warm-up requests ran inside the window too; they are counted.
        done = result["completed"] + result["failed"] + 20
        result["gateway_cpu_ms"] = (cpu_seconds(pid) - before) * 1000 / done
    return result


def measure(
    url: str, key: str | None, args: argparse.Namespace, pid: int | None, requests: int
) -> list[dict[str, Any]]:
    points = []
    for stream in (False, True):
        for c in args.concurrency:
            runs = [one_run(url, key, args, stream, c, pid, requests) for _ in range(args.repeats)]
            points.append(median_point(runs, stream, c))
            p = points[-1]
            cpu = f"  gw cpu {p['gateway_cpu_ms']:.3f} ms/req" if "gateway_cpu_ms" in p else ""
            print(
                f"  {'stream' if stream else 'plain '} c={c:<3}"
                f" {p['request_throughput']:7.1f} req/s"
                f"  e2e p50 {p['e2e_p50']:7.2f} p99 {p['e2e_p99']:7.2f} ms"
                f"  ttft p50 {p['ttft_p50']:6.2f}  itl p50 {p['itl_p50']:.3f} ms"
                f"  failed {p['failed']}{cpu}",
                flush=True,
            )
    return points


def rate_sweep(
    url: str, key: str | None, args: argparse.Namespace, most: int
) -> list[dict[str, Any]]:
    """Open loop (Poisson arrivals), non-streaming: the latency each offered rate gets,
    for "requests/s at p99 under a bound". About three seconds of traffic per rate."""
    points = []
    for rate in args.rates:
        requests = max(150, min(most, int(rate * 3)))
        r = run_load(url, key, args, bench.Load(rate=rate), requests, stream=False)
        points.append(
            {
                "rate": rate,
                "requests": requests,
                "failed": r["failed"],
                "request_throughput": r["request_throughput"],
                "e2e_p50": r["e2e_ms"]["p50"],
                "e2e_p99": r["e2e_ms"]["p99"],
            }
        )
        print(
            f"  rate {rate:>6}/s: {r['request_throughput']:7.1f} req/s"
            f"  e2e p50 {r['e2e_ms']['p50']:8.2f} p99 {r['e2e_ms']['p99']:8.2f} ms"
            f"  failed {r['failed']}",
            flush=True,
        )
    return points


def median_point(runs: list[dict[str, Any]], stream: bool, c: int) -> dict[str, Any]:
    def med(path: tuple[str, ...]) -> float:
        values = []
        for r in runs:
            v: Any = r
            for k in path:
                v = v[k]
            values.append(float(v))
        return statistics.median(values)

    extra = {"gateway_cpu_ms": med(("gateway_cpu_ms",))} if "gateway_cpu_ms" in runs[0] else {}
    return {
        **extra,
        "stream": stream,
        "concurrency": c,
        "repeats": len(runs),
        "failed": sum(r["failed"] for r in runs),
        "request_throughput": med(("request_throughput",)),
        "e2e_p50": med(("e2e_ms", "p50")),
        "e2e_p99": med(("e2e_ms", "p99")),
        "ttft_p50": med(("ttft_ms", "p50")),
        "ttft_p99": med(("ttft_ms", "p99")),
        "itl_p50": med(("itl_ms", "p50")),
        "itl_p99": med(("itl_ms", "p99")),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contenders", default="direct,servelm-sqlite,servelm-postgresql,litellm")
    parser.add_argument("--concurrency", default="1,16,64")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--litellm-requests", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--rates",
        default="25,50,100,250,500,750,1000,1250,1500",
        help="Poisson request rates for the capacity sweep; empty for none.",
    )
    parser.add_argument("--input-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=16)
    parser.add_argument("--litellm", type=Path, default=Path("/tmp/litellm-venv"))
    parser.add_argument("--out", type=Path, default=RESULTS / "gateway_overhead.json")
    args = parser.parse_args()
    args.concurrency = [int(c) for c in args.concurrency.split(",") if c]
    args.rates = [float(r) for r in args.rates.split(",") if r]
    os.sched_setaffinity(0, {CLIENT_CPU})

    upstream_proc, upstream = start_upstream()
    results: dict[str, Any] = {
        "machine": machine(),
        "settings": {k: v for k, v in vars(args).items() if k not in ("litellm", "out")},
        "contenders": {},
        "capacity": {},
    }
    if args.out.exists():
        # Contenders not rerun keep their earlier results (e.g. LiteLLM, which is slow).
        earlier = json.loads(args.out.read_text())
        rerun = {
            "contenders": set(args.contenders.split(",")) if args.concurrency else set(),
            "capacity": set(args.contenders.split(",")) if args.rates else set(),
        }
        for part, names in rerun.items():
            results[part] = {k: v for k, v in earlier.get(part, {}).items() if k not in names}
    try:
        for name in args.contenders.split(","):
            print(name, flush=True)
            proc: Proc | None = None
            if name == "direct":
                url, key = upstream, None
            elif name.startswith("servelm-"):
                database = name.removeprefix("servelm-")
                proc, url, key = start_servelm(upstream, database, cpu=GATEWAY_CPU)
            elif name == "litellm":
                if not (args.litellm / "bin" / "litellm").exists():
                    print(f"  skipped: no LiteLLM at {args.litellm}")
                    continue
                proc, url, key = start_litellm(upstream, args.litellm)
            else:
                raise SystemExit(f"unknown contender {name}")
            try:
                pid = proc.p.pid if proc is not None else None
                # LiteLLM serves 30-75 requests/s: fewer requests keep its runs minutes.
                requests = args.litellm_requests if name == "litellm" else args.requests
                if args.concurrency:
                    results["contenders"][name] = measure(url, key, args, pid, requests)
                if args.rates:
                    results["capacity"][name] = rate_sweep(url, key, args, requests)
            finally:
                if proc is not None:
                    proc.stop()
    finally:
        upstream_proc.stop()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


def machine() -> dict[str, Any]:
    cpu = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
         if line.startswith("model name")),
        "unknown",
    )  # fmt: skip
    return {"cpu": cpu, "cores": os.cpu_count(), "python": sys.version.split()[0]}


if __name__ == "__main__":
    main()
