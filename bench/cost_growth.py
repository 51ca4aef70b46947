"""Cost growth (issue 15, goal 5): what servelm adds per request as the request grows.

    .venv/bin/python bench/cost_growth.py                 # every dimension, ~4 minutes
    .venv/bin/python bench/cost_growth.py --dimensions chunks --rounds 2
    .venv/bin/python bench/cost_growth.py --plot-only     # redraw the PNG from the JSON
    .venv/bin/python bench/cost_growth.py --sse-only      # the relay's SSE parser alone

Four dimensions, one request in flight, against the instant upstream (so whatever
the gateway adds is its own cost):

- ``body``: one user message of 1 KB to 1 MB of text;
- ``messages``: 1 to 1,000 messages of about 60 bytes;
- ``images``: 0 to 8 images, each a 128x128 PNG (~49 KB) sent as a data: URL, which
  servelm decodes, checks with Pillow and re-encodes before the (vision) upstream
  sees it;
- ``chunks``: a stream of 16 to 4,096 content chunks;
- ``event``: a stream whose one content chunk is 16 KB to 4 MB (the upstream echoes
  the prompt), so a single event arrives in many reads.

Each round measures every point on the upstream directly and through servelm (SQLite,
keys and credits on), back to back; the added latency is servelm's e2e p50 minus the
direct p50 of the same round, and the gateway's CPU per request is read from /proc
(bench/gateway_overhead.py's way). The gateway is pinned to CPU 0, the upstream and
this client to CPU 1. Per dimension the medians over rounds get a least-squares line
(cost = a + b·x) and the slope of the last step over the line's slope: about 1 for
linear growth, well above 1 for a superlinear step. Results:
bench/results/cost_growth.json and the plot beside it (.png).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from servelm.engines import http1

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gateway_overhead as go

OUT = go.RESULTS / "cost_growth.json"

DIMENSIONS: dict[str, tuple[int, ...]] = {
    "body": (1024, 4096, 16384, 65536, 262144, 1048576),
    "messages": (1, 10, 100, 300, 1000),
    "images": (0, 1, 2, 4, 8),
    "chunks": (16, 64, 256, 1024, 4096),
    "event": (16384, 65536, 262144, 1048576, 4194304),
}
UNITS = {
    "body": "body bytes",
    "messages": "messages",
    "images": "images",
    "chunks": "chunks",
    "event": "bytes in one stream event",
}
# Vision on: the instant upstream is told it may see images.
MODEL_OPTIONS = "vision = true\n"
# A remote engine's window only bounds the prompt's bytes (128 per token): room for
# the 4 MB event's prompt.
CONTEXT_WINDOW = 65536
# Short words: a body of N bytes is about N/4 tokens, as in English text.
WORDS = ("the", "of", "and", "to", "in", "is", "it", "you", "that", "he", "was", "for", "on")


def text(size: int, rng: random.Random) -> str:
    out: list[str] = []
    n = 0
    while n < size:
        word = rng.choice(WORDS)
        out.append(word)
        n += len(word) + 1
    return " ".join(out)[:size]


def png(side: int, rng: random.Random) -> str:
    """A noisy PNG (noise does not compress: its size is what it looks like)."""
    from PIL import Image

    im = Image.frombytes("RGB", (side, side), rng.randbytes(side * side * 3))
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def body_for(dimension: str, x: int) -> tuple[bytes, bool]:
    """The request body of one point, serialized once, and whether it streams."""
    rng = random.Random(x)
    messages: list[dict[str, Any]]
    max_tokens, stream = 16, False
    if dimension == "body":
        messages = [{"role": "user", "content": text(x, rng)}]
    elif dimension == "messages":
        roles = ("user", "assistant")
        messages = [{"role": roles[(x - 1 - i) % 2], "content": text(60, rng)} for i in range(x)]
    elif dimension == "images":
        image = png(128, rng)
        parts: list[dict[str, Any]] = [{"type": "text", "text": "What is in these images?"}]
        parts += [{"type": "image_url", "image_url": {"url": image}} for _ in range(x)]
        messages = [{"role": "user", "content": parts}]
    elif dimension == "chunks":
        messages = [{"role": "user", "content": text(300, rng)}]
        max_tokens, stream = x, True
    elif dimension == "event":
        # The instant upstream echoes it back as one content chunk: a stream event
        # of x bytes, which the relay receives in many reads.
        messages = [{"role": "user", "content": "echo:" + text(x - 5, rng)}]
        max_tokens, stream = 1, True
    else:
        raise SystemExit(f"unknown dimension {dimension}")
    body = {"model": "instant", "messages": messages, "max_tokens": max_tokens, "stream": stream}
    return json.dumps(body).encode(), stream


async def timed(
    url: str, key: str | None, raw: bytes, seconds: float, least: int, most: int
) -> list[float]:
    """Sequential requests for about ``seconds`` (at least ``least``, at most ``most``)
    after 3 unmeasured ones; each one's send → last byte, in ms."""
    origin, path = url.rsplit("/v1", 1)[0], "/v1/chat/completions"
    headers = {"authorization": f"Bearer {key}"} if key else {}
    pool = http1.Pool(origin, read_timeout=120.0, max_idle=1)
    times: list[float] = []
    try:
        end = None
        while len(times) < most:
            start = time.perf_counter()
            resp = await pool.request("POST", path, raw, headers=headers)
            async with resp:
                async for _ in resp.iter_bytes():
                    pass
                if resp.status_code != 200:
                    raise SystemExit(f"{url}: HTTP {resp.status_code}")
            times.append((time.perf_counter() - start) * 1000)
            if len(times) == 3 and end is None:
                times.clear()  # the warm-up
                end = time.perf_counter() + seconds
            elif end is not None and time.perf_counter() > end and len(times) >= least:
                break
    finally:
        await pool.aclose()
    return times


def measure(args: argparse.Namespace) -> dict[str, Any]:
    os.sched_setaffinity(0, {go.CLIENT_CPU})
    up_proc, upstream = go.start_upstream()
    if args.baseline:
        # The gateway from other sources (before a change); the upstream stays ours.
        os.environ["PYTHONPATH"] = str(args.baseline)
    try:
        proc, url, key = go.start_servelm(
            upstream,
            "sqlite",
            cpu=go.GATEWAY_CPU,
            model_options=MODEL_OPTIONS,
            context_window=CONTEXT_WINDOW,
        )
    finally:
        os.environ.pop("PYTHONPATH", None)
    pid = proc.p.pid
    points: dict[str, list[dict[str, Any]]] = {d: [] for d in args.dimensions}
    try:
        for dimension in args.dimensions:
            for x in DIMENSIONS[dimension]:
                raw, _ = body_for(dimension, x)
                rounds = []
                for i in range(args.rounds):
                    order = ("direct", "servelm") if i % 2 == 0 else ("servelm", "direct")
                    row: dict[str, float] = {}
                    for who in order:
                        if who == "direct":
                            t = asyncio.run(timed(upstream, None, raw, args.seconds, 15, 400))
                            row["direct_p50"] = statistics.median(t)
                            continue
                        before = go.cpu_seconds(pid)
                        t = asyncio.run(timed(url, key, raw, args.seconds, 15, 400))
                        # The 3 warm-up requests ran inside the CPU window too.
                        row["cpu_ms"] = (go.cpu_seconds(pid) - before) * 1000 / (len(t) + 3)
                        row["p50"] = statistics.median(t)
                        row["requests"] = len(t)
                    row["added_p50"] = row["p50"] - row["direct_p50"]
                    rounds.append(row)
                point = {
                    "x": x,
                    "body_bytes": len(raw),
                    "rounds": rounds,
                    **{
                        k: statistics.median(r[k] for r in rounds)
                        for k in ("cpu_ms", "added_p50", "p50", "direct_p50")
                    },
                }
                points[dimension].append(point)
                print(
                    f"{dimension:<8} {x:>8}  body {len(raw):>8} B  gw cpu {point['cpu_ms']:7.3f}"
                    f" ms/req  added p50 {point['added_p50']:7.3f} ms"
                    f"  (direct p50 {point['direct_p50']:.3f})",
                    flush=True,
                )
    finally:
        proc.stop()
        up_proc.stop()
    return points


def sse_parse() -> dict[str, float]:
    """In-process: CPU ms for the relay's SSE parser (``http1.sse_data``) to take one
    event of 1 to 16 MB arriving in 64 KB reads. Run it with another checkout's src/
    on PYTHONPATH for a before/after."""
    out: dict[str, float] = {}

    async def pieces(data: bytes) -> Any:
        for i in range(0, len(data), 65536):
            yield data[i : i + 65536]

    async def parse(data: bytes) -> int:
        return sum([len(d) async for d in http1.sse_data(pieces(data))])

    for mb in (1, 4, 16):
        event = b"data: " + b"x" * (mb << 20) + b"\n\n"
        start = time.process_time()
        assert asyncio.run(parse(event)) == mb << 20
        out[f"{mb} MB"] = (time.process_time() - start) * 1000
        print(f"sse_data, one {mb} MB event in 64 KB reads: {out[f'{mb} MB']:.1f} ms CPU")
    return out


def fit(xs: list[float], ys: list[float]) -> dict[str, float]:
    """Least-squares line, and the last step's slope over the line's slope."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    intercept = my - slope * mx
    ss_tot = sum((y - my) ** 2 for y in ys) or 1e-12
    ss_res = sum((y - intercept - slope * x) ** 2 for x, y in zip(xs, ys, strict=True))
    last = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
    return {
        "intercept": intercept,
        "slope": slope,
        "r2": 1 - ss_res / ss_tot,
        "last_step_over_fit": last / slope if slope > 0 else float("nan"),
    }


def summarize(points: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for dimension, pts in points.items():
        xs = [float(p["x"]) for p in pts]
        out[dimension] = {
            metric: fit(xs, [p[metric] for p in pts]) for metric in ("cpu_ms", "added_p50")
        }
        for metric, f in out[dimension].items():
            print(
                f"{dimension:<8} {metric:<9} a = {f['intercept']:.3f} ms  "
                f"b = {f['slope'] * 1000:.4f} ms per 1,000 {UNITS[dimension]}  "
                f"R² {f['r2']:.3f}  last step / fit {f['last_step_over_fit']:.2f}"
            )
    return out


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points, fits = results["points"], results["fits"]
    fig, axes = plt.subplots(1, len(points), figsize=(4.2 * len(points), 3.8))
    for ax, (dimension, pts) in zip(
        axes if len(points) > 1 else [axes], points.items(), strict=True
    ):
        xs = [p["x"] for p in pts]
        for metric, label, colour in (
            ("cpu_ms", "gateway CPU ms/request", "tab:blue"),
            ("added_p50", "added latency p50 ms", "tab:orange"),
        ):
            ax.plot(xs, [p[metric] for p in pts], "o", color=colour, label=label)
            f = fits[dimension][metric]
            grid = [xs[0] + (xs[-1] - xs[0]) * i / 200 for i in range(201)]
            line = [f["intercept"] + f["slope"] * x for x in grid]
            ax.plot(grid, line, "-", color=colour, alpha=0.5, linewidth=1)
        ax.set_xlabel(UNITS[dimension])
        ax.set_title(f"{dimension}: a + b·x fit")
        ax.grid(alpha=0.3)
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=7)
    fig.suptitle("servelm: cost per request as the request grows (1 in flight, instant upstream)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dimensions", default=",".join(DIMENSIONS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=1.0, help="of traffic per point")
    parser.add_argument(
        "--points", action="append", default=[], help="e.g. chunks=16,32,64: other sizes"
    )
    parser.add_argument("--baseline", type=Path, help="run the gateway from this src/ dir")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--plot-only", action="store_true")
    parser.add_argument("--sse-only", action="store_true", help="only the in-process SSE parse")
    args = parser.parse_args()
    args.dimensions = [d for d in args.dimensions.split(",") if d]
    for spec in args.points:
        name, _, sizes = spec.partition("=")
        DIMENSIONS[name] = tuple(int(x) for x in sizes.split(","))
    if args.sse_only:
        sse_parse()
        return
    if args.plot_only:
        plot(json.loads(args.out.read_text()), args.out.with_suffix(".png"))
        return
    points = measure(args)
    results = {
        "machine": go.machine(),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "points": points,
        "fits": summarize(points),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")
    plot(results, args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
