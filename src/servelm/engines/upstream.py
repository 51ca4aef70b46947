"""A remote engine that speaks OpenAI's ``/v1/chat/completions``: vLLM, SGLang,
llama.cpp's server, or another servelm.

Keys, credits and both dialects stay the gateway's own: the upstream only generates.
Settlement uses the upstream's own token counts (``usage``; streams are asked for it
with ``stream_options.include_usage``). A client that hangs up closes our connection
to the upstream, which is how every one of those servers learns to stop.

A client that streams gets a streamed upstream call; one that does not gets a plain
call, reshaped into the chunks a stream would end with. One JSON answer costs the
relay one wake-up where a stream costs one per token: at one request in flight that
was a third of the gateway's time per request (docs/benchmarks.md). An upstream that
answers a plain call without ``usage`` has its answers streamed from then on, where
tokens can at least be counted.

One keep-alive pool (``servelm.http1``) per upstream. Unreachable → 502, timeout →
504, both before anything is charged.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from servelm import http1
from servelm.catalog import ModelSpec
from servelm.engines import wire
from servelm.engines.base import Admission, Engine, map_engine_error
from servelm.errors import (
    InvalidRequest,
    ServelmError,
    UpstreamError,
    UpstreamTimeout,
)

log = logging.getLogger(__name__)

DEFAULT_CONCURRENCY = 256


class OpenAIUpstreamEngine(Engine):
    def __init__(
        self,
        spec: ModelSpec,
        *,
        queue_size: int,
        connect_timeout: float = 5.0,
    ) -> None:
        super().__init__(spec)
        assert spec.base_url, "an openai engine needs base_url"
        self.slots = spec.slots or DEFAULT_CONCURRENCY
        self._admission = Admission(self.slots, queue_size, self.stats)
        headers = {"authorization": f"Bearer {spec.api_key}"} if spec.api_key else {}
        # Cleared (once, for good) by an upstream that leaves usage out of plain answers.
        self._plain_calls = True
        self._pool = http1.Pool(
            spec.base_url,
            headers=headers,
            connect_timeout=connect_timeout,
            read_timeout=spec.timeout,
            max_idle=min(self.slots, 64),
        )

    async def start(self) -> None:
        # Nothing to load; an upstream that is down now may be up by the first request,
        # and each request reports its own 502.
        log.info("model %s relays to %s", self.spec.slug, self.spec.base_url)

    async def close(self) -> None:
        await self._pool.aclose()

    async def count_prompt_tokens(self, body: dict[str, Any]) -> int | None:
        return None  # only the upstream knows its tokenizer; its usage settles the bill

    async def stream(
        self, body: dict[str, Any], *, client_streams: bool = True
    ) -> AsyncIterator[dict[str, Any]]:
        plain = not client_streams and self._plain_calls
        payload = {**body, "model": self.spec.upstream_model or self.spec.slug}
        if plain:
            payload["stream"] = False
        else:
            payload["stream"] = True
            payload["stream_options"] = {"include_usage": True}
        async with self._admission:
            self.stats.requests_total += 1
            finished = False
            # issue 17: the whole call, not just each read, has a time limit.
            deadline = asyncio.get_running_loop().time() + self.spec.deadline
            try:
                resp = await self._pool.request(
                    "POST", "/chat/completions", json.dumps(payload).encode(), deadline=deadline
                )
                async with resp:
                    if resp.status_code != 200:
                        raise await self._status_error(resp)
                    chunks = self._reshape(await resp.read()) if plain else _sse_json(resp)
                    async for data in chunks:
                        # issue 17: nothing an upstream sends is trusted unchecked.
                        chunk = data if plain else wire.chunk(self.spec.slug, data)
                        if "error" in chunk:
                            raise _upstream_error_body(self.spec.slug, chunk["error"])
                        self.stats.chunks_total += 1
                        yield chunk
                finished = True
            except http1.Timeout as exc:
                raise UpstreamTimeout(
                    f"The engine for '{self.spec.slug}' did not answer in time."
                ) from exc
            except http1.HTTPError as exc:
                # The upstream's address is the operator's business, not the caller's.
                log.warning("model %s: upstream %s: %s", self.spec.slug, self.spec.base_url, exc)
                raise UpstreamError(
                    f"The engine for model '{self.spec.slug}' is unreachable; retry later."
                ) from exc
            finally:
                if not finished:
                    self.stats.cancelled_total += 1

    async def _reshape(self, raw: bytes) -> AsyncIterator[dict[str, Any]]:
        """A plain ``chat.completion`` as the two chunks a stream would end with: the
        whole message as one delta, then the finish reason with the usage."""
        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise UpstreamError(
                f"The engine for '{self.spec.slug}' sent a malformed answer: {raw[:200]!r}"
            ) from exc
        if isinstance(data, dict) and "error" in data:
            raise _upstream_error_body(self.spec.slug, data["error"])
        # issue 17: checked before anything is yielded (and so before anything is
        # settled); a malformed answer is a 502 and never switches to streamed calls.
        choice, message = wire.plain_answer(self.spec.slug, data)
        usage = wire.usage(self.spec.slug, data.get("usage"))
        if not usage and self._plain_calls:
            self._plain_calls = False
            log.warning(
                "the engine for %s answered without usage; streaming from it from now on",
                self.spec.slug,
            )
        delta: dict[str, Any] = {"role": "assistant", "content": message.get("content")}
        if message.get("tool_calls"):
            delta["tool_calls"] = [
                {"index": i, **call} for i, call in enumerate(message["tool_calls"])
            ]
        head: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": None}
        if choice.get("logprobs"):
            head["logprobs"] = choice["logprobs"]
        yield {"choices": [head]}
        tail: dict[str, Any] = {
            "index": 0,
            "delta": {},
            "finish_reason": choice.get("finish_reason") or "stop",
        }
        yield {"choices": [tail], "usage": usage} if usage else {"choices": [tail]}

    async def _status_error(self, resp: http1.Response) -> ServelmError:
        raw = await resp.read()
        try:
            detail = json.loads(raw).get("error", raw.decode(errors="replace"))
        except (ValueError, AttributeError):
            detail = raw.decode(errors="replace")[:500]
        if 400 <= resp.status_code < 500 and resp.status_code not in (401, 403, 404, 429):
            # The upstream judged the request itself bad (e.g. too long for its window).
            if isinstance(detail, dict):
                return map_engine_error({**detail, "code": resp.status_code})
            return InvalidRequest(_message(detail))
        return UpstreamError(
            f"The engine for '{self.spec.slug}' answered HTTP {resp.status_code}: "
            f"{_message(detail)}"
        )

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "upstream": self.spec.base_url, "loaded": True}


async def _sse_json(resp: http1.Response) -> AsyncIterator[dict[str, Any]]:
    done = False
    # Read to the end of the body even after [DONE]: a response closed part-read
    # cannot go back to the pool, and every request would pay for a new connection.
    async for data in http1.sse_data(resp.iter_bytes()):
        if done:
            continue  # the tail after [DONE]
        if data == b"[DONE]":
            done = True
            continue
        try:
            yield json.loads(data)
        except ValueError as exc:
            raise UpstreamError(f"The engine sent a malformed event: {data[:200]!r}") from exc


def _message(detail: Any) -> str:
    if isinstance(detail, dict):
        return str(detail.get("message") or detail)
    return str(detail)


def _upstream_error_body(slug: str, err: Any) -> ServelmError:
    code = err.get("code") if isinstance(err, dict) else None
    if isinstance(code, int) and 400 <= code < 500:
        return map_engine_error(err)
    return UpstreamError(f"The engine for '{slug}' failed: {_message(err)}")
