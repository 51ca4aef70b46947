"""The scale path, measured as ratios inside one run (issue 15): contenders started
together and measured interleaved (A, B, A, B, ...), so a noisy shared machine slows
them alike and the ratio holds where absolute times do not.

    .venv/bin/python bench/scale_path.py postgres   # PostgreSQL against SQLite
    .venv/bin/python bench/scale_path.py workers    # serve --workers 2 against 1
    .venv/bin/python bench/scale_path.py litellm    # SQLite against LiteLLM (goal 2)

``postgres``: the instant upstream, servelm on SQLite and servelm on PostgreSQL, all
three measured each round at each concurrency (the gateway pinned to CPU 0, the
upstream and this load generator on CPU 1, as bench/gateway_overhead.py does).
Reports gateway CPU per request and the latency servelm adds to the upstream alone
(e2e p50 minus the direct p50 of the same round), and their ratios PostgreSQL/SQLite
per round: median, min and max.

``workers``: closed-loop capacity of one gateway process against two, on SQLite and
on PostgreSQL, nothing pinned (two workers need both cores, which the upstream and
the load generator share with them).

``litellm``: the instant upstream, servelm on SQLite and LiteLLM's proxy (from
``--litellm``, bench/gateway_overhead.py's way), at one request in flight, each round
all three in alternating order; the ratios LiteLLM/servelm of the added p50 and p99
per round. Then servelm's capacity: the closed-loop maximum at 16 in flight against
a Poisson sweep, the highest offered rate whose p99 stays under 5 ms.

Results go to bench/results/scale_<mode>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gateway_overhead as go

from servelm.cli.loadgen import bench


def spread(values: list[float]) -> dict[str, float]:
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "runs": len(values),
    }


def one(
    url: str, key: str | None, args: argparse.Namespace, c: int, pid: int | None
) -> dict[str, Any]:
    r = go.one_run(url, key, args, stream=args.stream, c=c, pid=pid, requests=args.requests)
    return {
        "req_s": r["request_throughput"],
        "p50": r["e2e_ms"]["p50"],
        "p99": r["e2e_ms"]["p99"],
        "failed": r["failed"],
        **({"cpu_ms": r["gateway_cpu_ms"]} if pid else {}),
    }


def postgres(args: argparse.Namespace) -> dict[str, Any]:
    os.sched_setaffinity(0, {go.CLIENT_CPU})
    up_proc, upstream = go.start_upstream()
    gateways: dict[str, tuple[go.Proc | None, str, str | None]] = {"direct": (None, upstream, None)}
    try:
        for db in ("sqlite", "postgresql"):
            proc, url, key = go.start_servelm(upstream, db, cpu=go.GATEWAY_CPU)
            gateways[db] = (proc, url, key)
        if args.diagnose_flush:
            gateways["noflush"] = go.start_servelm(
                upstream, "postgresql-noflush", cpu=go.GATEWAY_CPU
            )
        if args.baseline:
            # The same gateway from another checkout's sources (e.g. before a change).
            os.environ["PYTHONPATH"] = str(args.baseline)
            try:
                gateways["baseline"] = go.start_servelm(upstream, "postgresql", cpu=go.GATEWAY_CPU)
            finally:
                del os.environ["PYTHONPATH"]
        rounds: list[dict[str, Any]] = []
        for i in range(args.rounds):
            order = ["direct", "sqlite", "postgresql"]
            order += (["noflush"] if args.diagnose_flush else []) + (
                ["baseline"] if args.baseline else []
            )
            if i % 2:
                order = order[::-1]  # A B C, C B A: drift cancels
            row: dict[str, Any] = {}
            for c in args.concurrency:
                for name in order:
                    gw, gw_url, gw_key = gateways[name]
                    row[f"{name}@{c}"] = one(gw_url, gw_key, args, c, gw.p.pid if gw else None)
                direct = row[f"direct@{c}"]["p50"]
                for name in order:
                    if name != "direct":
                        row[f"{name}@{c}"]["added_p50"] = row[f"{name}@{c}"]["p50"] - direct
                sq, pg = row[f"sqlite@{c}"], row[f"postgresql@{c}"]
                row[f"ratio@{c}"] = {
                    "cpu": pg["cpu_ms"] / sq["cpu_ms"],
                    "added_p50": pg["added_p50"] / sq["added_p50"],
                    "req_s": pg["req_s"] / sq["req_s"],
                }
                print(
                    f"round {i + 1} c={c:<3} cpu ms/req sqlite {sq['cpu_ms']:.3f} "
                    f"pg {pg['cpu_ms']:.3f} ({row[f'ratio@{c}']['cpu']:.2f}x)  added p50 "
                    f"sqlite {sq['added_p50']:.3f} pg {pg['added_p50']:.3f} ms "
                    f"({row[f'ratio@{c}']['added_p50']:.2f}x)  req/s {sq['req_s']:.0f} / "
                    f"{pg['req_s']:.0f}",
                    flush=True,
                )
                if args.diagnose_flush:
                    nf = row[f"noflush@{c}"]
                    print(
                        f"         PostgreSQL without waiting for the WAL flush: cpu ms/req "
                        f"{nf['cpu_ms']:.3f}  added p50 {nf['added_p50']:.3f} ms "
                        f"({nf['added_p50'] / sq['added_p50']:.2f}x SQLite)",
                        flush=True,
                    )
                if args.baseline:
                    base = row[f"baseline@{c}"]
                    print(
                        f"         baseline PostgreSQL: cpu ms/req {base['cpu_ms']:.3f}"
                        f"  added p50 {base['added_p50']:.3f} ms  req/s {base['req_s']:.0f}",
                        flush=True,
                    )
            rounds.append(row)
    finally:
        for gw, _, _ in gateways.values():
            if gw is not None:
                gw.stop()
        up_proc.stop()
    summary = {
        f"{metric}@{c}": spread([r[f"ratio@{c}"][metric] for r in rounds])
        for c in args.concurrency
        for metric in ("cpu", "added_p50", "req_s")
    }
    extra = (("noflush",) if args.diagnose_flush else ()) + (("baseline",) if args.baseline else ())
    for name in ("sqlite", "postgresql", *extra):
        for c in args.concurrency:
            for metric in ("cpu_ms", "added_p50", "req_s"):
                summary[f"{name}.{metric}@{c}"] = spread([r[f"{name}@{c}"][metric] for r in rounds])
    return {"rounds": rounds, "summary": summary}


def workers(args: argparse.Namespace) -> dict[str, Any]:
    up_proc, upstream = go.start_upstream()
    counts = (1, 2)
    gateways: dict[str, tuple[go.Proc, str, str]] = {}
    try:
        for db in args.databases:
            for n in counts:
                gateways[f"{db}/{n}"] = go.start_servelm(upstream, db, workers=n)
        rounds: list[dict[str, Any]] = []
        for i in range(args.rounds):
            row: dict[str, Any] = {}
            for db in args.databases:
                order = counts if i % 2 == 0 else counts[::-1]
                for n in order:
                    proc, url, key = gateways[f"{db}/{n}"]
                    row[f"{db}/{n}"] = one(url, key, args, args.workers_concurrency, proc.p.pid)
                ratio = row[f"{db}/2"]["req_s"] / row[f"{db}/1"]["req_s"]
                row[f"{db}/ratio"] = ratio
                print(
                    f"round {i + 1} {db:<10} 1 worker {row[f'{db}/1']['req_s']:7.0f} req/s"
                    f"  2 workers {row[f'{db}/2']['req_s']:7.0f} req/s  ({ratio:.2f}x)"
                    f"  cpu ms/req {row[f'{db}/1']['cpu_ms']:.3f} / {row[f'{db}/2']['cpu_ms']:.3f}",
                    flush=True,
                )
            rounds.append(row)
    finally:
        for proc, _, _ in gateways.values():
            proc.stop()
        up_proc.stop()
    summary = {
        f"{db}/{what}": spread(
            [r[f"{db}/{what}"] if what == "ratio" else r[f"{db}/{what}"]["req_s"] for r in rounds]
        )
        for db in args.databases
        for what in ("1", "2", "ratio")
    }
    return {"rounds": rounds, "summary": summary}


def litellm(args: argparse.Namespace) -> dict[str, Any]:
    os.sched_setaffinity(0, {go.CLIENT_CPU})
    if not (args.litellm / "bin" / "litellm").exists():
        raise SystemExit(f"no LiteLLM at {args.litellm} (see docs/benchmarks.md to install it)")
    up_proc, upstream = go.start_upstream()
    gateways: dict[str, tuple[go.Proc | None, str, str | None]] = {"direct": (None, upstream, None)}
    try:
        gateways["sqlite"] = go.start_servelm(upstream, "sqlite", cpu=go.GATEWAY_CPU)
        gateways["litellm"] = go.start_litellm(upstream, args.litellm)
        rounds: list[dict[str, Any]] = []
        for i in range(args.rounds):
            order = ["direct", "sqlite", "litellm"]
            if i % 2:
                order = order[::-1]
            row: dict[str, Any] = {}
            for name in order:
                gw, gw_url, gw_key = gateways[name]
                # LiteLLM serves 30-75 requests/s: fewer requests keep its runs seconds.
                n = args.litellm_requests if name == "litellm" else args.requests
                r = go.one_run(gw_url, gw_key, args, False, 1, gw.p.pid if gw else None, n)
                row[name] = {
                    "req_s": r["request_throughput"],
                    "p50": r["e2e_ms"]["p50"],
                    "p99": r["e2e_ms"]["p99"],
                    "failed": r["failed"],
                    **({"cpu_ms": r["gateway_cpu_ms"]} if gw else {}),
                }
            for name in ("sqlite", "litellm"):
                for q in ("p50", "p99"):
                    row[name][f"added_{q}"] = row[name][q] - row["direct"][q]
            sq, ll = row["sqlite"], row["litellm"]
            row["ratio"] = {q: ll[f"added_{q}"] / sq[f"added_{q}"] for q in ("p50", "p99")} | {
                "cpu": ll["cpu_ms"] / sq["cpu_ms"]
            }
            print(
                f"round {i + 1} added p50 sqlite {sq['added_p50']:.3f} litellm "
                f"{ll['added_p50']:.2f} ms (1/{row['ratio']['p50']:.1f})  added p99 sqlite "
                f"{sq['added_p99']:.3f} litellm {ll['added_p99']:.2f} ms "
                f"(1/{row['ratio']['p99']:.1f})  cpu ms/req {sq['cpu_ms']:.3f} / "
                f"{ll['cpu_ms']:.2f}",
                flush=True,
            )
            rounds.append(row)
        # Capacity: the closed loop's maximum, then the Poisson sweep, same gateway.
        _, url, key = gateways["sqlite"]
        closed = go.run_load(url, key, args, bench.Load(concurrency=16), args.requests, False)
        most = closed["request_throughput"]
        print(f"closed loop, 16 in flight: {most:.0f} req/s", flush=True)
        sweep = go.rate_sweep(url, key, args, args.requests)
        # The same rates on the upstream alone: how much of the tail is the machine
        # (client and upstream waking up), and how much servelm adds to it.
        print("the same rates on the upstream alone:", flush=True)
        direct_sweep = go.rate_sweep(upstream, None, args, args.requests)
        for ours, direct in zip(sweep, direct_sweep, strict=True):
            ours["direct_e2e_p99"] = direct["e2e_p99"]
            ours["added_p99"] = ours["e2e_p99"] - direct["e2e_p99"]
    finally:
        for gw, _, _ in gateways.values():
            if gw is not None:
                gw.stop()
        up_proc.stop()
    under = [p["rate"] for p in sweep if p["e2e_p99"] < 5 and p["failed"] == 0]
    summary: dict[str, Any] = {}
    if rounds:  # --rounds 0: the capacity sweep alone
        for what in ("p50", "p99", "cpu"):
            summary[what] = spread([r["ratio"][what] for r in rounds])
        for name in ("sqlite", "litellm"):
            for metric in ("added_p50", "added_p99", "cpu_ms"):
                summary[f"{name}.{metric}"] = spread([r[name][metric] for r in rounds])
    summary["closed_loop_req_s"] = most
    summary["poisson_p99_under_5ms"] = max(under, default=0.0)
    summary["poisson_share_of_closed"] = summary["poisson_p99_under_5ms"] / most
    print(
        f"Poisson, p99 < 5 ms: {summary['poisson_p99_under_5ms']:.0f} req/s = "
        f"{summary['poisson_share_of_closed']:.0%} of the closed loop's {most:.0f}",
        flush=True,
    )
    return {"rounds": rounds, "closed_loop": closed, "sweep": sweep, "summary": summary}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=("postgres", "workers", "litellm"))
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", default="1,16")
    parser.add_argument("--workers-concurrency", type=int, default=32)
    parser.add_argument("--databases", default="sqlite,postgresql")
    parser.add_argument("--stream", action="store_true")
    parser.add_argument(
        "--baseline",
        type=Path,
        help="postgres mode: also a PostgreSQL gateway run from these sources (a src/ dir)",
    )
    parser.add_argument(
        "--diagnose-flush",
        action="store_true",
        help="postgres mode: also PostgreSQL with synchronous_commit off (what the durable "
        "commits cost; a diagnostic, not a way servelm runs)",
    )
    parser.add_argument("--litellm", type=Path, default=Path("/tmp/litellm-venv"))
    parser.add_argument("--litellm-requests", type=int, default=300)
    parser.add_argument(
        "--rates",
        default="100,250,500,750,1000,1250",
        help="litellm mode: Poisson rates for servelm's sweep",
    )
    parser.add_argument("--input-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=16)
    args = parser.parse_args()
    args.concurrency = [int(c) for c in args.concurrency.split(",") if c]
    args.databases = [d for d in args.databases.split(",") if d]
    args.rates = [float(r) for r in args.rates.split(",") if r]
    modes = {"postgres": postgres, "workers": workers, "litellm": litellm}
    result = modes[args.mode](args)
    suffix = "_baseline" if args.baseline else "_sweep" if args.rounds == 0 else ""
    out = go.RESULTS / f"scale_{args.mode}{suffix}.json"
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    out.write_text(json.dumps({"machine": go.machine(), "settings": settings, **result}, indent=2))
    print(json.dumps(result["summary"], indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
