"""``servelm bench --conversations N --turns T``: multi-turn load, for routing.

Each conversation opens with a system prompt of ``system_tokens`` words (one of
``system_prompts`` distinct ones, shared by the conversations that draw it) and a
question, then asks ``turns - 1`` follow-ups, each sent with the whole history so
far, the model's own answers included: the traffic where a replica that still holds
the conversation's prefix in its KV cache answers the next turn fast. ``concurrency``
conversations run at once; a conversation's next turn leaves ``think_time`` seconds
(drawn per turn from an exponential distribution of that mean, seeded) after its
last answer is in, as a person reads and types. Without think time the loop is
closed: a turn leaves the instant its replica frees a slot, so that replica is the
least loaded one and least-load routing finds the conversation's cache by that
accident of timing. Reported: TTFT of first turns and of later turns apart (later turns are where
prefix caching shows), the share of later turns' prompt tokens the engine served from
its prompt cache (``usage.prompt_tokens_details.cached_tokens`` over
``prompt_tokens``, summed: the figure a cache-aware router is judged by, where TTFT on
a shared CPU mostly measures contention), end-to-end latency, request throughput, and, where the
endpoint is a servelm gateway, each replica's share of the calls (from the gateway's
``/metrics``).
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from servelm.cli.loadgen.bench import _split, _stats, random_prompt
from servelm.engines import http1


@dataclass
class Turn:
    conversation: int
    turn: int
    ok: bool
    ttft: float = 0.0
    latency: float = 0.0
    output_tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    error: str = ""


async def _turn(
    pool: http1.Pool,
    path: str,
    body: dict[str, Any],
    headers: dict[str, str],
) -> tuple[Turn, str]:
    start = time.perf_counter()
    result = Turn(0, 0, True)
    text: list[str] = []
    try:
        resp = await pool.request("POST", path, json.dumps(body).encode(), headers=headers)
        async with resp:
            if resp.status_code != 200:
                raw = (await resp.read()).decode(errors="replace")
                return Turn(0, 0, False, error=f"HTTP {resp.status_code}: {raw[:200]}"), ""
            async for payload in http1.sse_data(resp.iter_bytes()):
                if payload == b"[DONE]":
                    continue
                data = json.loads(payload)
                if "error" in data:
                    return Turn(0, 0, False, error=str(data["error"])[:200]), ""
                for choice in data.get("choices") or ():
                    content = (choice.get("delta") or {}).get("content")
                    if content:
                        if not text:
                            result.ttft = time.perf_counter() - start
                        text.append(content)
                usage = data.get("usage")
                if usage:
                    result.output_tokens = int(usage.get("completion_tokens", 0))
                    result.prompt_tokens = int(usage.get("prompt_tokens", 0))
                    details = usage.get("prompt_tokens_details") or {}
                    result.cached_tokens = int(details.get("cached_tokens", 0))
    except (http1.HTTPError, ValueError) as exc:
        return Turn(0, 0, False, error=f"{type(exc).__name__}: {exc}"), ""
    result.latency = time.perf_counter() - start
    return result, "".join(text)


async def replica_calls(origin: str, model: str) -> dict[str, float]:
    """A servelm gateway's calls per replica of ``model``; {} from anything else."""
    pool = http1.Pool(origin, read_timeout=10.0, max_idle=1)
    try:
        resp = await pool.request("GET", "/metrics")
        async with resp:
            text = (await resp.read()).decode(errors="replace")
    except http1.HTTPError:
        return {}
    finally:
        await pool.aclose()
    pattern = re.compile(
        r'^servelm_replica_requests_total\{model="([^"]*)",replica="([^"]*)"\} ([0-9.e+]+)$',
        re.MULTILINE,
    )
    return {url: float(n) for slug, url, n in pattern.findall(text) if slug == model}


def think_pauses(
    rng: random.Random, conversations: int, turns: int, mean: float
) -> list[list[float]]:
    """Each conversation's pause after each turn, drawn up front from the run's seed so
    that a run's pauses do not depend on its timings (the last turn's is never slept)."""
    return [
        [rng.expovariate(1 / mean) if mean > 0 else 0.0 for _ in range(turns)]
        for _ in range(conversations)
    ]


async def run(
    url: str,
    *,
    model: str,
    conversations: int,
    turns: int,
    system_tokens: int,
    system_prompts: int = 1,
    input_len: int = 32,
    output_len: int = 32,
    concurrency: int = 8,
    api_key: str | None = None,
    seed: int = 0,
    think_time: float = 0.0,
    on_done: Callable[[], None] | None = None,
) -> dict[str, Any]:
    rng = random.Random(seed)
    systems = [random_prompt(system_tokens, rng) for _ in range(max(1, system_prompts))]
    openers = [
        [
            {"role": "system", "content": systems[c % len(systems)]},
            {"role": "user", "content": random_prompt(input_len, rng)},
        ]
        for c in range(conversations)
    ]
    follow_ups = [[random_prompt(input_len, rng) for _ in range(turns)] for _ in openers]
    pauses = think_pauses(rng, conversations, turns, think_time)
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    origin, path = _split(url)
    pool = http1.Pool(origin, read_timeout=600.0, max_idle=concurrency)
    gate = asyncio.Semaphore(concurrency)
    results: list[Turn] = []

    async def conversation(c: int) -> None:
        messages = list(openers[c])
        async with gate:
            for t in range(turns):
                body = {
                    "model": model,
                    "messages": messages,
                    "max_tokens": output_len,
                    "ignore_eos": True,
                    "min_tokens": output_len,
                    "temperature": 0,
                    "stream": True,
                    "stream_options": {"include_usage": True},
                }
                result, answer = await _turn(pool, path, body, headers)
                result.conversation, result.turn = c, t
                results.append(result)
                if on_done is not None:
                    on_done()
                if not result.ok:
                    return  # a broken conversation ends; its later turns are not sent
                messages = [
                    *messages,
                    {"role": "assistant", "content": answer},
                    {"role": "user", "content": follow_ups[c][t]},
                ]
                if t + 1 < turns and pauses[c][t]:
                    await asyncio.sleep(pauses[c][t])

    before = await replica_calls(origin, model)
    began = time.perf_counter()
    try:
        await asyncio.gather(*(conversation(c) for c in range(conversations)))
    finally:
        await pool.aclose()
    duration = time.perf_counter() - began
    after = await replica_calls(origin, model)
    share = {k: after[k] - before.get(k, 0.0) for k in after}
    ok = [r for r in results if r.ok]
    later = [r for r in ok if r.turn > 0]
    later_prompt = sum(r.prompt_tokens for r in later)
    return {
        "url": url,
        "model": model,
        "conversations": conversations,
        "turns": turns,
        "system_tokens": system_tokens,
        "system_prompts": system_prompts,
        "concurrency": concurrency,
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
        "duration_s": duration,
        "request_throughput": len(ok) / duration if duration else 0.0,
        "output_throughput": sum(r.output_tokens for r in ok) / duration if duration else 0.0,
        "ttft_first_turn_ms": _stats([r.ttft for r in ok if r.turn == 0]),
        "ttft_later_turns_ms": _stats([r.ttft for r in later]),
        "prompt_tokens_later_turns": later_prompt,
        "cached_tokens_later_turns": sum(r.cached_tokens for r in later),
        "cached_share_later_turns": (
            sum(r.cached_tokens for r in later) / later_prompt if later_prompt else 0.0
        ),
        "seed": seed,
        "think_time_s": think_time,
        "e2e_ms": _stats([r.latency for r in ok]),
        "replica_share": share,
    }
