"""A remote engine that speaks OpenAI's ``/v1/chat/completions``: vLLM, SGLang,
llama.cpp's server, or another servelm.

Keys, credits and both dialects stay the gateway's own: the upstream only generates.
Settlement uses the upstream's own token counts (``usage``; streams are asked for it
with ``stream_options.include_usage``, and for the prompt's count with the first token
the way its kind allows: ``upstream_kind``), checked against what was relayed
(``charging.settle_usage``). A client that hangs up closes our connection
to the upstream, which is how every one of those servers learns to stop.

A client that streams gets a streamed upstream call; one that does not gets a plain
call, reshaped into the chunks a stream would end with. One JSON answer costs the
relay one wake-up where a stream costs one per token: at one request in flight that
was a third of the gateway's time per request (docs/benchmarks.md). Plain calls start
once a stream has shown that the upstream reports usage; an upstream that answers a
plain call without it has its answers streamed from then on, where tokens can be
counted one a chunk.

Several replicas of one engine (``servelm.engines.fleet``): the router orders the healthy
ones, a request fails over along that order until one sends its first chunk, and a
replica that fails in a way that says it is sick is ejected until a health probe
readmits it (``fleet.replicas`` tells the replica from the request). One keep-alive pool
(``servelm.engines.http1``) per replica. Unreachable → 502, timeout → 504, every replica down
→ 503 with Retry-After, all before anything is charged.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from servelm.catalog.specs import ModelSpec, ReplicaSpec, replica_specs
from servelm.engines import http1, wire
from servelm.engines.admission import Admission, PromptSize
from servelm.engines.base import Engine, map_engine_error
from servelm.engines.fleet.discovery import Discovery, Resolver
from servelm.engines.fleet.health import HealthChecker
from servelm.engines.fleet.replicas import Replica, ReplicaSet
from servelm.engines.fleet.routing import make_router
from servelm.engines.pool import COLD_START_HEADER, cold_start_behind
from servelm.errors import (
    InvalidRequest,
    ModelUnavailable,
    ServelmError,
    UpstreamError,
    UpstreamTimeout,
)
from servelm.telemetry import logs
from servelm.telemetry.tracing import hop_headers

if TYPE_CHECKING:
    from servelm.config import Settings

log = logging.getLogger(__name__)

DEFAULT_CONCURRENCY = 256
# Replicas one request may try before its failure is the client's.
MAX_TRIES = 3


class OpenAIUpstreamEngine(Engine):
    def __init__(
        self,
        spec: ModelSpec,
        *,
        queue_size: int,
        connect_timeout: float = 5.0,
        discovery_interval: float = 10.0,
        hosts_file: Path | None = None,
    ) -> None:
        super().__init__(spec)
        self.slots = spec.slots or DEFAULT_CONCURRENCY
        self._admission: Admission = Admission(self.slots, queue_size, self.stats)
        # Plain calls for plain clients once a stream has shown that the upstream
        # reports usage (None: not yet); False, for good, once a plain answer came
        # without it. The first answer is streamed, where its tokens can be counted.
        # Only for the engines we know report usage in plain answers (vLLM, llama.cpp,
        # a servelm worker): a plain answer's tokens cannot be counted, only estimated
        # from its bytes (+22 % for 41 tokens, issue 25.5), so an upstream of unknown
        # habits (``upstream_kind = "openai"``) is always streamed, where each token
        # delivered is counted, and the walk assembles the plain answer.
        self._plain_calls: bool | None = None if spec.upstream_kind in _PLAIN_KINDS else False

        def make(r: ReplicaSpec, name: str, *, healthy: bool = False) -> Replica:
            return Replica(
                r,
                model=spec.slug,
                connect_timeout=connect_timeout,
                read_timeout=spec.timeout,
                max_idle=min(self.slots, 64),
                name=name,
                healthy=healthy,
            )

        specs = list(enumerate(replica_specs(spec)))
        self.replicas = ReplicaSet(
            [make(r, str(i), healthy=True) for i, r in specs if not r.discovered]
        )
        self._router = make_router(spec.routing)
        self._health = HealthChecker(self.replicas, interval=spec.health_interval)
        self._discovery = Discovery(
            self.replicas,
            [(i, r) for i, r in specs if r.discovered],
            make,
            self._health,
            interval=discovery_interval,
            resolver=Resolver(hosts_file),
        )

    async def start(self) -> None:
        # One probe round first, so a replica already down takes no traffic; none being
        # up is not fatal either: each request answers 503 until one is. Discovered
        # replicas are probed as they join.
        await self._discovery.refresh()
        await asyncio.gather(*(self._health.probe(r) for r in self.replicas.all if r.healthy))
        self._health.start()
        self._discovery.start()
        log.info(
            "model %s relays to %s (%s routing)",
            self.spec.slug,
            ", ".join(r.url for r in self.replicas.all) or "no replica yet",
            self.spec.routing,
        )

    async def close(self) -> None:
        await self._discovery.close()
        await self._health.close()
        await self.replicas.aclose()

    async def count_prompt_tokens(self, body: dict[str, Any]) -> int | None:
        return None  # only the upstream knows its tokenizer; its usage settles the bill

    async def stream(
        self,
        body: dict[str, Any],
        *,
        client_streams: bool = True,
        prompt: PromptSize | None = None,
    ) -> AsyncIterator[dict[str, Any]]:
        plain = not client_streams and self._plain_calls is True
        payload = {**body, "model": self.spec.upstream_model or self.spec.slug}
        if plain:
            payload["stream"] = False
        else:
            payload["stream"] = True
            payload.update(_ASK_COUNTS[self.spec.upstream_kind])
        encoded = json.dumps(payload).encode()
        # No KV budget: a remote server manages its own memory (and refuses with a 4xx
        # what does not fit).
        async with self._admission.enter():
            self.stats.requests_total += 1
            finished = False
            try:
                # aclosing: a client hanging up must close the upstream call now, not
                # whenever the collector gets to the abandoned generator.
                counted = False
                async with contextlib.aclosing(self._failover(body, encoded, plain)) as chunks:
                    async for chunk in chunks:
                        counted = counted or "usage" in chunk
                        yield chunk
                finished = True
                if counted and self._plain_calls is None:
                    self._plain_calls = True
            finally:
                if not finished:
                    self.stats.cancelled_total += 1

    async def _failover(
        self, body: dict[str, Any], encoded: bytes, plain: bool
    ) -> AsyncGenerator[dict[str, Any]]:
        """Try the replicas in the router's order until one delivers a first chunk.

        A failure before anything was yielded moves on to the next replica: nothing
        reached the client, so nothing is lost and the credit hold stays as it is.
        What says a replica is sick (refused, reset, timed out, 502/503/504) is held
        against it at once (``ReplicaSet.failed`` ejects it unless it is the model's
        last healthy one). A 500 or a malformed answer may be the request's own doing:
        it is tried on one more replica, and if that one fails it too, the request is
        to blame: its failure is the client's and counts against neither replica.
        A malformed answer never counts (the server answered); a 500 that another
        replica then serves counts towards its replica's run.
        After the first chunk the failure is the client's to see (an SSE error event;
        it pays for what it received).
        """
        order = self._router.order(self.replicas.healthy(), body)[:MAX_TRIES]
        if not order:
            raise ModelUnavailable(
                f"Every replica of '{self.spec.slug}' is down; retry shortly.",
                retry_after=max(1, math.ceil(self.spec.health_interval)),
            )
        failure: ServelmError | None = None
        # Replicas that gave this request a 500: theirs to answer for only if another
        # replica then serves it.
        suspects: list[tuple[Replica, str]] = []
        soft = False  # a replica failed it in a way the request may have caused
        for replica in order:
            sent = False
            replica.in_flight += 1
            replica.requests_total += 1
            # The access line names the replica that served (the last one tried), by
            # its index as in /metrics: never its address.
            logs.annotate(replica=self.replicas.all.index(replica))
            try:
                async with contextlib.aclosing(self._relay(replica, encoded, plain)) as chunks:
                    async for chunk in chunks:
                        if not sent:
                            sent = True
                            self._answered(replica, suspects)
                        yield chunk
                if not sent:
                    self._answered(replica, suspects)
                return
            except _Retryable as exc:
                if sent or exc.sick:
                    if exc.counts:
                        self.replicas.failed(replica, exc.error.message, sick=exc.sick)
                    if sent:
                        raise exc.error from exc.__cause__
                elif soft:
                    # A second replica fails this request the same way: the request.
                    log.info("%s: %s failed on two replicas; not the replicas' fault",
                             self.spec.slug, exc.error.message)  # fmt: skip
                    raise exc.error from exc.__cause__
                else:
                    soft = True
                    if exc.counts:
                        suspects.append((replica, exc.error.message))
                failure = exc.error
                log.info("%s failed over from %s: %s", self.spec.slug, replica.url, failure)
            except ServelmError:
                # The request's own fault (a 4xx): the replica answered.
                self._answered(replica, [])
                raise
            finally:
                replica.in_flight -= 1
        for suspect, reason in suspects:
            # No other replica could tell: it counts towards the suspect's run.
            self.replicas.failed(suspect, reason, sick=False)
        assert failure is not None
        raise failure

    @staticmethod
    def _answered(replica: Replica, suspects: list[tuple[Replica, str]]) -> None:
        replica.answered()
        for suspect, reason in suspects:
            # Another replica served the same request: the failure was the suspect's.
            suspect.failed(reason, sick=False, alone=False)
        suspects.clear()

    async def _relay(
        self, replica: Replica, encoded: bytes, plain: bool
    ) -> AsyncGenerator[dict[str, Any]]:
        """One upstream call. Failures another replica could fix raise ``_Retryable``;
        the request's own faults (a 4xx) raise as they are."""
        # The whole call, not just each read, has a time limit: a trickle never trips
        # the per-read timeout.
        deadline = asyncio.get_running_loop().time() + self.spec.deadline
        try:
            resp = await replica.pool.request(
                "POST", "/chat/completions", encoded, deadline=deadline, headers=hop_headers()
            )
            async with resp:
                cold = resp.headers.get(COLD_START_HEADER)
                if cold is not None and self.spec.upstream_kind == "servelm":
                    # Another servelm loaded the model for this request: the client
                    # hears of it as if this process had (``pool.cold_start_behind``).
                    _cold_start_behind(cold)
                if resp.status_code != 200:
                    error = await self._status_error(resp)
                    if resp.status_code >= 500:
                        raise _Retryable(error, sick=resp.status_code in _SICK)
                    raise error
                chunks = self._reshape(await resp.read()) if plain else wire.sse_json(resp)
                async for data in chunks:
                    # Nothing an upstream sends is trusted unchecked (engines/wire.py).
                    chunk = data if plain else wire.chunk(self.spec.slug, data)
                    if "error" in chunk:
                        raise _upstream_error_body(self.spec.slug, chunk["error"])
                    self.stats.chunks_total += 1
                    yield chunk
        except http1.Timeout as exc:
            raise _Retryable(
                UpstreamTimeout(f"The engine for '{self.spec.slug}' did not answer in time."),
                sick=True,
            ) from exc
        except http1.HTTPError as exc:
            # The upstream's address is the operator's business, not the caller's.
            log.warning("model %s: replica %s: %s", self.spec.slug, replica.url, exc)
            raise _Retryable(
                UpstreamError(
                    f"The engine for model '{self.spec.slug}' is unreachable; retry later."
                ),
                sick=True,
            ) from exc
        except UpstreamError as exc:
            # A malformed answer or an error event: worth another replica's try, but
            # the server is up (it answered), and the request may be what broke it:
            # it counts towards no run.
            raise _Retryable(exc, sick=False, counts=False) from exc

    async def _reshape(self, raw: bytes) -> AsyncIterator[dict[str, Any]]:
        """A plain ``chat.completion`` as the two chunks a stream would end with: the
        whole message as one delta, then the finish reason with the usage."""
        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise wire.upstream_failure(
                f"The engine for '{self.spec.slug}' sent a malformed answer (not JSON).", raw
            ) from exc
        if isinstance(data, dict) and "error" in data:
            raise _upstream_error_body(self.spec.slug, data["error"])
        # Checked before anything is yielded (and so before anything is settled); a
        # malformed answer is a 502 and never switches this engine to streamed calls.
        choice, message = wire.plain_answer(self.spec.slug, data)
        usage = wire.usage(self.spec.slug, data.get("usage"))
        if not usage and self._plain_calls is not False:
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
        yield {"choices": [head], wire.WHOLE_ANSWER: True}
        reason = choice.get("finish_reason") or "stop"
        tail: dict[str, Any] = {"index": 0, "delta": {}, "finish_reason": reason}
        yield {"choices": [tail], "usage": usage} if usage else {"choices": [tail]}

    def usage_contradicted(self) -> None:
        if self._plain_calls is not False:
            self._plain_calls = False
            log.warning(
                "the engine for %s sent usage that contradicts its answer; "
                "streaming from it from now on",
                self.spec.slug,
            )

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
        return wire.upstream_failure(
            f"The engine for '{self.spec.slug}' answered HTTP {resp.status_code}.", detail
        )

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "upstream": self.replicas.all[0].url if self.replicas.all else None,
            "loaded": True,
            "routing": self.spec.routing,
            "replicas": self.replicas.describe(),
        }


# Upstreams trusted with plain calls for plain clients (see ``_plain_calls``).
_PLAIN_KINDS = ("vllm", "llama.cpp", "servelm")

# Answers that say the replica is sick (a gateway or proxy in front of it, overload,
# a drain), not that the request is bad.
_SICK = (502, 503, 504)


# What a stream asks of each kind of upstream (``ModelSpec.upstream_kind``) so that it
# reports the prompt's tokens with the first token, not only at the end: a stream cut
# in between then pays the engine's own count, not the bound from the prompt's bytes.
_ASK_COUNTS: dict[str, dict[str, Any]] = {
    "openai": {"stream_options": {"include_usage": True}},
    "servelm": {"stream_options": {"include_usage": True}},  # usage on its first chunk
    "vllm": {"stream_options": {"include_usage": True, "continuous_usage_stats": True}},
    "llama.cpp": {"stream_options": {"include_usage": True}, "timings_per_token": True},
}


class _Retryable(Exception):
    """A failure of one replica that another might not have; ``sick`` when it says the
    replica is (not the request)."""

    def __init__(self, error: ServelmError, *, sick: bool, counts: bool = True) -> None:
        super().__init__(error.message)
        self.error = error
        self.sick = sick
        self.counts = counts  # held against the replica (a malformed answer is not)


def _cold_start_behind(value: str) -> None:
    try:
        ms = int(value)
    except ValueError:
        return  # not a number: an upstream's header is never trusted unchecked
    if 0 <= ms < 86_400_000:
        cold_start_behind(ms)


def _message(detail: Any) -> str:
    if isinstance(detail, dict):
        return str(detail.get("message") or detail)
    return str(detail)


def _upstream_error_body(slug: str, err: Any) -> ServelmError:
    code = err.get("code") if isinstance(err, dict) else None
    if isinstance(code, int) and 400 <= code < 500:
        return map_engine_error(err)
    return wire.upstream_failure(f"The engine for '{slug}' failed.", err)


def build(spec: ModelSpec, settings: Settings) -> OpenAIUpstreamEngine:
    """The registry's builder (``engines.registry``)."""
    return OpenAIUpstreamEngine(
        spec,
        queue_size=settings.queue_size,
        discovery_interval=settings.discovery_interval,
        hosts_file=settings.hosts_file,
    )
