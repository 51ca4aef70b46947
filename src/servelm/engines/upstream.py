"""A remote engine that speaks OpenAI's ``/v1/chat/completions``: vLLM, SGLang,
llama.cpp's server, or another servelm.

Keys, credits and both dialects stay the gateway's own: the upstream only generates.
We always stream from it with usage on, so settlement uses the upstream's own token
counts and a client that hangs up cancels the upstream request (closing the
connection is how every one of those servers learns to stop).

One keep-alive pool (``servelm.http1``) per upstream. Unreachable → 502, timeout →
504, both before anything is charged.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from servelm import http1
from servelm.catalog import ModelSpec
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

    async def stream(self, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        payload = {
            **body,
            "model": self.spec.upstream_model or self.spec.slug,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        async with self._admission:
            self.stats.requests_total += 1
            finished = False
            try:
                resp = await self._pool.request(
                    "POST", "/chat/completions", json.dumps(payload).encode()
                )
                async with resp:
                    if resp.status_code != 200:
                        raise await self._status_error(resp)
                    async for chunk in _sse_json(resp):
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
                raise UpstreamError(
                    f"The engine for '{self.spec.slug}' is unreachable: {exc}."
                ) from exc
            finally:
                if not finished:
                    self.stats.cancelled_total += 1

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
