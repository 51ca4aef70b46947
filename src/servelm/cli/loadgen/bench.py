"""``servelm bench``: a load generator for any OpenAI-compatible chat endpoint.

Two ways to load a server, as vLLM's ``bench serve`` and SGLang's ``bench_serving``:
closed loop (N clients, each sending its next request when the last one ends) and
open loop (requests arrive as a Poisson process at a given rate, however slow the
server). Metrics follow vLLM's definitions:

- TTFT: request sent → first content token received.
- TPOT: (latency − TTFT) / (output tokens − 1), per request.
- ITL: the gaps between successive content chunks, pooled over all requests.
- E2E latency: request sent → last byte.

Prompts are random words of a fixed count; ``ignore_eos`` and ``min_tokens`` ask
every engine that knows them to emit exactly ``output_len`` tokens, so contenders do
the same work.
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import urlsplit

from servelm.engines import http1

# Short common words: close to one token each in every BPE vocabulary we serve.
_WORD_LIST = (
    "the of and to in is it you that he was for on are as with his they at be this from "
    "have or by one had not but what all were when we there can an your which their said "
    "if do will each about how up out them then she many some so these would other into "
    "has more her two like him see time could no make than first"
)
_WORDS = tuple(_WORD_LIST.split())


@dataclass
class Result:
    ok: bool
    latency: float = 0.0
    ttft: float = 0.0
    itl: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    output_tokens: int = 0
    error: str = ""


def random_prompt(words: int, rng: random.Random) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(words))


def request_body(model: str, prompt: str, output_len: int, stream: bool) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": output_len,
        "ignore_eos": True,
        "min_tokens": output_len,
        "temperature": 0,
        "stream": stream,
    }
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


async def send(
    pool: http1.Pool, path: str, body: dict[str, Any], headers: dict[str, str]
) -> Result:
    start = time.perf_counter()
    try:
        resp = await pool.request("POST", path, json.dumps(body).encode(), headers=headers)
        async with resp:
            if resp.status_code != 200:
                text = (await resp.read()).decode(errors="replace")
                return Result(
                    False,
                    time.perf_counter() - start,
                    error=f"HTTP {resp.status_code}: {text[:200]}",
                )
            if body["stream"]:
                return await _read_stream(resp, start)
            reply = json.loads(await resp.read())
    except (http1.HTTPError, ValueError) as exc:
        return Result(False, time.perf_counter() - start, error=f"{type(exc).__name__}: {exc}")
    latency = time.perf_counter() - start
    usage = reply.get("usage") or {}
    return Result(
        True,
        latency,
        ttft=latency,
        prompt_tokens=int(usage.get("prompt_tokens", 0)),
        output_tokens=int(usage.get("completion_tokens", 0)),
    )


async def _read_stream(resp: http1.Response, start: float) -> Result:
    result = Result(True)
    last = 0.0
    chunks = 0
    async for payload in http1.sse_data(resp.iter_bytes()):
        if payload == b"[DONE]":
            continue
        data = json.loads(payload)
        if "error" in data:
            return Result(False, time.perf_counter() - start, error=str(data["error"])[:200])
        now = time.perf_counter()
        if any((c.get("delta") or {}).get("content") for c in data.get("choices") or ()):
            if chunks == 0:
                result.ttft = now - start
            else:
                result.itl.append(now - last)
            chunks += 1
            last = now
        usage = data.get("usage")
        if usage:
            result.prompt_tokens = int(usage.get("prompt_tokens", 0))
            result.output_tokens = int(usage.get("completion_tokens", 0))
    result.latency = time.perf_counter() - start
    result.output_tokens = result.output_tokens or chunks
    return result


@dataclass(frozen=True)
class Load:
    """``concurrency`` clients in a closed loop, or Poisson arrivals at ``rate``/s."""

    concurrency: int | None = None
    rate: float | None = None

    @property
    def label(self) -> str:
        return f"concurrency {self.concurrency}" if self.concurrency else f"rate {self.rate}/s"


async def run(
    url: str,
    *,
    model: str,
    load: Load,
    requests: int,
    input_len: int = 128,
    output_len: int = 64,
    stream: bool = True,
    api_key: str | None = None,
    seed: int = 0,
    warmup: int = 0,
    on_done: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Send ``requests`` requests under ``load``; return the summary (JSON-able)."""
    rng = random.Random(seed)
    bodies = [
        request_body(model, random_prompt(input_len, rng), output_len, stream)
        for _ in range(requests + warmup)
    ]
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    width = load.concurrency or max(64, int((load.rate or 1) * 4))
    origin, path = _split(url)
    pool = http1.Pool(origin, read_timeout=600.0, max_idle=width)
    try:
        for body in bodies[:warmup]:
            await send(pool, path, body, headers)
        todo = bodies[warmup:]
        results: list[Result] = []

        async def one(body: dict[str, Any]) -> None:
            results.append(await send(pool, path, body, headers))
            if on_done is not None:
                on_done()

        began = time.perf_counter()
        if load.concurrency:
            queue = list(reversed(todo))

            async def worker() -> None:
                while queue:
                    await one(queue.pop())

            await asyncio.gather(*(worker() for _ in range(load.concurrency)))
        else:
            assert load.rate, "a Load needs concurrency or rate"
            tasks = []
            due = began
            for body in todo:
                tasks.append(asyncio.create_task(one(body)))
                # Arrival times are fixed in advance and slept towards, not slept
                # between: the overhead of each sleep would otherwise add up and offer
                # well under the asked rate (838/s measured when 1,500/s were asked).
                due += rng.expovariate(load.rate)
                delay = due - time.perf_counter()
                await asyncio.sleep(delay if delay > 0 else 0)
            await asyncio.gather(*tasks)
        duration = time.perf_counter() - began
    finally:
        await pool.aclose()
    return summarize(results, duration, load=load, stream=stream, url=url, model=model)


def _split(url: str) -> tuple[str, str]:
    """``http://h:p/v1/chat/completions`` → (``http://h:p``, ``/v1/chat/completions``)."""
    parts = urlsplit(url)
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    return f"{parts.scheme}://{parts.netloc}", path or "/"


def _stats(values: list[float]) -> dict[str, float]:
    if not values:
        return {"mean": 0.0, "p50": 0.0, "p90": 0.0, "p99": 0.0}
    ordered = sorted(values)

    def pct(p: float) -> float:
        # Nearest-rank on the sorted sample, as the serving benchmarks report it.
        return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered)) - 1))]

    return {
        "mean": statistics.fmean(ordered) * 1000,
        "p50": pct(50) * 1000,
        "p90": pct(90) * 1000,
        "p99": pct(99) * 1000,
    }


def summarize(results: list[Result], duration: float, **context: Any) -> dict[str, Any]:
    """Milliseconds for latencies; per-second rates over the whole run."""
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens for r in ok)
    tpot = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    load = context.pop("load", None)
    return {
        **context,
        "load": asdict(load) if load else None,
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
        "duration_s": duration,
        "request_throughput": len(ok) / duration if duration else 0.0,
        "output_throughput": out_tokens / duration if duration else 0.0,
        "total_token_throughput": (in_tokens + out_tokens) / duration if duration else 0.0,
        "ttft_ms": _stats([r.ttft for r in ok]),
        "tpot_ms": _stats(tpot),
        "itl_ms": _stats([g for r in ok for g in r.itl]),
        "e2e_ms": _stats([r.latency for r in ok]),
    }
