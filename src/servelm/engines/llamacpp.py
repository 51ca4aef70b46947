"""llama.cpp through xllamacpp's server, one process per loaded model.

Each loaded model runs llama.cpp's real server (slots, continuous batching) in a
process of its own (``engines.llamacpp_process``), listening on an ephemeral loopback
port. Loading there stalls nobody here (xllamacpp holds the GIL for a whole load),
and an unload ends the process, so its memory really goes. We talk to it over that
port, with our own HTTP client, for everything:

- generation streams, whatever the client asked for: only a streaming call can be
  cancelled, and closing its connection is what cancels it, even mid-prefill (the
  binding's ``handle_chat_completions`` could be stopped only from its chunk
  callback, so a client that left during a long prefill kept the slot to the end);
- the chat template and the tokenizer give the exact prompt count before admission;
- admission (slots, a bounded queue, and the KV cache the slots share:
  ``engines/admission.py``) happens here, in asyncio, so llama.cpp never holds more
  requests than it has slots, nor more than its KV cache can hold together.

Long prompts run in a second process of the same model (the long-prompt lane,
``SERVELM_LONG_PROMPT_TOKENS``), started at the first one and run at a lower CPU
priority. llama.cpp has no priority of its own: it mixes a short request's decode
steps into the batches of other requests' prefill, and on a CPU one 512-token chunk
of a 7,500-token prompt takes seconds, so a "hello" beside four long prompts took
300 times its quiet latency (issue 25.1). In two processes the kernel's scheduler
does what llama.cpp cannot: the short request's threads run first, and the long
prefill gets the CPU they leave. The weights are mapped from the same file, so the
second process adds its KV cache and its interpreter, not another copy of the model.

A process that dies while serving (the OOM killer, an abort in llama.cpp) fails its
requests with a 503 to retry; the model pool (``engines.pool``) sees the engine is
no longer ``alive`` and loads the model again at its next request.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import re
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from servelm.catalog.specs import ModelSpec
from servelm.engines import http1, wire
from servelm.engines.admission import Admission, PromptSize
from servelm.engines.base import Engine, map_engine_error
from servelm.engines.gguf_files import projector_image_tokens
from servelm.engines.llamacpp_lane import (
    PROCESS_BYTES,
    Lane,
    footprint,
    lane_footprint,
    long_lane_from,
    server_params,
)
from servelm.engines.model_process import LoadFailed
from servelm.errors import EngineError, ModelUnavailable, ServelmError, StreamCut

if TYPE_CHECKING:
    from servelm.config import Settings

log = logging.getLogger(__name__)

# The registry asks the engine type's module for its footprint (``engines.registry``).
__all__ = ["PROCESS_BYTES", "LlamaCppEngine", "build", "footprint"]

# How llama.cpp's template marks where an image's embeddings go.
_MEDIA_MARKER = re.compile(r"<__media_?[A-Za-z0-9]*__>")
# Per-image allowance for projectors with dynamic resolution: above what the largest
# vision encoders spend on one (downscaled) image.
IMAGE_TOKENS_BOUND = 4096


def _has_images(body: dict[str, Any]) -> bool:
    return any(
        isinstance(m.get("content"), list)
        and any(p.get("type") == "image_url" for p in m["content"])
        for m in body["messages"]
    )


# Seconds a failed call waits to see the model's process exit, so that a client whose
# request met a dead process hears to retry (503) rather than of an engine error.
EXIT_SEEN = 1.0
# How much lower the long-prompt lane's CPU priority is (a nice value): at 10 the
# kernel gives a busy nice-0 thread about 90 % of a core the two contend for.
LONG_LANE_NICE = 10


class LlamaCppEngine(Engine):
    def __init__(
        self,
        spec: ModelSpec,
        *,
        threads: int,
        slots: int,
        queue_size: int,
        verbose: bool = False,
        prompt_cache_mib: int | None = None,
        count_prompts: bool = True,
        long_prompt_tokens: int = 0,
    ) -> None:
        super().__init__(spec)
        self.slots = spec.slots or slots
        self._threads = threads
        self._verbose = verbose
        self._prompt_cache_mib = prompt_cache_mib
        # False: no count before admission (two calls into llama.cpp's HTTP routes);
        # the hold takes the walk's upper bound and the engine's usage settles it.
        self._count_prompts = count_prompts
        # The slots share one unified KV cache of the context window's size (server_params):
        # what the requests running together may fill.
        self._admission: Admission = Admission(
            self.slots, queue_size, self.stats, kv_cells=spec.context_window
        )
        self._main = Lane(spec.slug, self._admission, verbose=verbose)
        # The long-prompt lane (module docstring): prompts of ``_long_from`` tokens
        # and more, in a second process started at the first of them.
        self._long_from = long_lane_from(spec, long_prompt_tokens)
        self._long = Lane(
            f"{spec.slug} (long prompts)",
            Admission(self.slots, queue_size, self.stats, kv_cells=spec.context_window),
            verbose=verbose,
        )
        self._long_starting = asyncio.Lock()
        # Exact tokens per image (fixed-grid projector), or None (unknown / no vision).
        self.image_tokens: int | None = None

    # -- lifecycle -------------------------------------------------------------------

    def _server_params(self) -> dict[str, Any]:
        return server_params(
            self.spec,
            slots=self.slots,
            threads=self._threads,
            verbose=self._verbose,
            prompt_cache_mib=self._prompt_cache_mib,
        )

    async def start(self) -> None:
        if self.spec.path is None or not self.spec.path.is_file():
            raise ModelUnavailable(
                f"Model '{self.spec.slug}' has no weights at {self.spec.path}.", retry_after=60
            )
        if self.spec.mmproj is not None:
            if not self.spec.mmproj.is_file():
                raise ModelUnavailable(
                    f"Model '{self.spec.slug}' has no multimodal projector at {self.spec.mmproj}.",
                    retry_after=60,
                )
            self.image_tokens = await asyncio.to_thread(projector_image_tokens, self.spec.mmproj)
        try:
            await self._main.start(self._server_params())
        except LoadFailed as exc:
            raise ModelUnavailable(
                f"Model '{self.spec.slug}' failed to load from {self.spec.path}: {exc}",
                retry_after=60,
            ) from exc
        try:
            self.vocab_size = await self._vocab_size()
            cells = await self._kv_cells()
        except BaseException:
            await self.close()  # a start cancelled here: nobody else would end the process
            raise
        if cells is not None and cells < self.spec.context_window:
            # The engine's word over ours: a cache smaller than the window asked for
            # holds less together (llama.cpp rounds n_ctx up, never down, today).
            log.warning(
                "%s: llama.cpp's KV cache holds %d tokens, less than the context window "
                "of %d; admission counts %d",
                self.spec.slug,
                cells,
                self.spec.context_window,
                cells,
            )
            self._admission.kv_cells = self._long.admission.kv_cells = cells
        log.info(
            "loaded %s from %s (%d slots, context %d)",
            self.spec.slug,
            self.spec.path,
            self.slots,
            self.spec.context_window,
        )

    def alive(self) -> bool:
        """The model's (first) process runs; a long-prompt lane whose process died is
        started again by its next long prompt."""
        return self._main.alive()

    @property
    def address(self) -> str | None:
        """The model's (first) server's base URL, while loaded."""
        return self._main.address

    @property
    def pid(self) -> int | None:
        """The model's (first) process, while it runs."""
        return self._main.pid

    @property
    def long_lane_pid(self) -> int | None:
        """The long-prompt lane's process, while it runs."""
        return self._long.pid

    async def close(self) -> None:
        await self._main.close()
        async with self._long_starting:
            await self._long.close()

    async def _long_lane(self) -> Lane:
        """The long-prompt lane, started (again, if its process died) on first use;
        the model's first process where it cannot start."""
        async with self._long_starting:
            if self._long.alive():
                return self._long
            await self._long.close()  # a process that died: its pools go with it
            if not self._main.alive():
                return self._main  # unloaded meanwhile: the call says so
            try:
                await self._long.start(self._server_params(), nice=LONG_LANE_NICE)
            except LoadFailed as exc:
                log.warning(
                    "%s: the long-prompt lane did not start, long prompts run beside "
                    "short ones: %s",
                    self.spec.slug,
                    exc,
                )
                return self._main
            log.info("%s: long-prompt lane started", self.spec.slug)
            return self._long

    async def _broken(self, lane: Lane, what: str, exc: Exception) -> ServelmError:
        """The error for a call that failed at the transport: a 503 to retry when the
        lane's process has ended (the pool loads the model again at its next request,
        or the next long prompt starts its lane again), an engine error otherwise."""
        process = lane.process
        if process is not None and await process.ended(within=EXIT_SEEN):
            return ModelUnavailable(
                f"Model '{self.spec.slug}' stopped ({process.exit_reason()}); retry, it "
                "loads again.",
                retry_after=1,
            )
        return EngineError(f"the model's engine {what}: {exc}")

    # -- prompt accounting -----------------------------------------------------------

    async def render_prompt(self, body: dict[str, Any]) -> str:
        """The exact prompt text the model will see, from the model's chat template."""
        named = _named_choice(body)
        payload: dict[str, Any] = {
            k: named[k] for k in ("messages", "tools", "tool_choice") if k in named
        }
        status, data = await self._call("/apply-template", payload)
        if status != 200:
            raise map_engine_error(data.get("error", data) if isinstance(data, dict) else data)
        return str(data["prompt"])

    async def tokenize(self, text: str, *, add_special: bool = True) -> list[int]:
        """Token ids as generation would see them: control tokens written in the text
        (``<|eot_id|>``, ``[INST]``) count as one token each."""
        status, data = await self._call(
            "/tokenize", {"content": text, "add_special": add_special, "parse_special": True}
        )
        if status != 200 or not isinstance(data, dict):
            raise EngineError(f"tokenizer failed: HTTP {status}")
        return [int(t) for t in data["tokens"]]

    async def _vocab_size(self) -> int | None:
        """From the model server's model list: the walk refuses a ``logit_bias``
        outside the vocabulary (llama.cpp would silently drop it)."""
        assert self._main.http is not None
        try:
            resp = await self._main.http.request("GET", "/v1/models")
            async with resp:
                listed = json.loads(await resp.read())
            return int(listed["data"][0]["meta"]["n_vocab"])
        except (http1.HTTPError, ValueError, KeyError, IndexError, TypeError):
            log.warning("%s: the engine did not say its vocabulary size", self.spec.slug)
            return None

    async def _kv_cells(self) -> int | None:
        """The tokens the KV cache holds, as the model's server reports it (a slot's
        ``n_ctx``: with the unified cache, every slot's is the whole cache)."""
        assert self._main.http is not None
        try:
            resp = await self._main.http.request("GET", "/props")
            async with resp:
                props = json.loads(await resp.read())
            return int(props["default_generation_settings"]["n_ctx"])
        except (http1.HTTPError, ValueError, KeyError, TypeError):
            log.warning("%s: the engine did not say its KV cache size", self.spec.slug)
            return None

    async def _call(self, path: str, payload: dict[str, Any]) -> tuple[int, Any]:
        """One call to the model server's own HTTP routes."""
        http = self._main.http
        if http is None:
            raise ModelUnavailable(f"Model '{self.spec.slug}' is not loaded.")
        try:
            return await http.post_json(path, payload)
        except http1.HTTPError as exc:
            raise await self._broken(self._main, f"did not answer {path}", exc) from exc

    async def count_prompt_tokens(self, body: dict[str, Any]) -> int | None:
        """Exact for text. Each image's marker in the rendered prompt is replaced by the
        tokens the projector spends on one image: exact for fixed-grid projectors
        (LLaVA's), otherwise an upper bound, and then ``prompt_count_exact`` is False
        and the engine's own usage settles the count. None when counting is off
        (``prompt_count = "bound"``): the caller bounds the prompt from its bytes."""
        if not self._count_prompts:
            return None
        return await self.count_prompt(body)

    async def count_prompt(self, body: dict[str, Any]) -> int:
        """``count_prompt_tokens`` whatever ``prompt_count`` says."""
        prompt = await self.render_prompt(body)
        text, images = _MEDIA_MARKER.subn("", prompt)
        per_image = self.image_tokens if self.image_tokens is not None else IMAGE_TOKENS_BOUND
        return len(await self.tokenize(text)) + images * per_image

    async def count_prompt_after(self, body: dict[str, Any]) -> int | None:
        return await self.count_prompt(body) if self.prompt_count_exact(body) else None

    async def count_text_tokens(self, text: str) -> int:
        return len(await self.tokenize(text, add_special=False)) if text else 0

    def prompt_count_exact(self, body: dict[str, Any]) -> bool:
        return self.image_tokens is not None or not _has_images(body)

    def counts_late(self, body: dict[str, Any]) -> bool:
        return self._count_prompts

    # -- generation ------------------------------------------------------------------

    async def stream(
        self,
        body: dict[str, Any],
        *,
        client_streams: bool = True,
        prompt: PromptSize | None = None,
    ) -> AsyncIterator[dict[str, Any]]:
        # Streams inside, whatever the client wants: only a streaming call can be
        # cancelled. Through the model server's HTTP route, not the binding's
        # ``handle_chat_completions``: the route notices a closed connection while the
        # prompt is still being prefilled and cancels it between batches, where the
        # binding's call can only be stopped from its chunk callback, after the first
        # token (issue 17, point 5). The loopback hop costs about a millisecond.
        if self._main.gen is None:
            raise ModelUnavailable(f"Model '{self.spec.slug}' is not loaded.")
        payload = json.dumps(
            {**_named_choice(body), "stream": True, "stream_options": {"include_usage": True}},
            ensure_ascii=False,
        ).encode()
        lane, kv = await self._place(body, prompt)
        async with lane.admission.enter(kv):
            self.stats.requests_total += 1
            finished = False
            try:
                gen = lane.gen
                if gen is None:  # its process ended while this request waited
                    raise ModelUnavailable(
                        f"Model '{self.spec.slug}' stopped; retry, it loads again.",
                        retry_after=1,
                    )
                try:
                    resp = await gen.request("POST", "/v1/chat/completions", payload)
                except http1.HTTPError as exc:
                    raise await self._broken(lane, "did not answer", exc) from exc
                # Leaving this block early (the client left, a send timed out) closes
                # the connection, which is what tells llama.cpp to stop.
                async with resp:
                    if resp.status_code != 200:
                        raise map_engine_error(_error_detail(await resp.read(), resp.status_code))
                    # llama.cpp always ends with [DONE]: a body that stops short is
                    # an engine that broke off, never a complete answer.
                    async for item in wire.sse_json(resp, require_done=True):
                        if "error" in item:
                            raise map_engine_error(item["error"])
                        self.stats.chunks_total += 1
                        yield item
                finished = True
            except (http1.HTTPError, StreamCut) as exc:
                # Only the transport: the engine's own verdicts (a 400, a tool call the
                # model garbled: 502) raised above pass through as they are.
                raise await self._broken(lane, "broke off", exc) from exc
            finally:
                if not finished:
                    self.stats.cancelled_total += 1

    async def _place(self, body: dict[str, Any], prompt: PromptSize | None) -> tuple[Lane, int]:
        """Where the request runs (a long prompt in the long-prompt lane) and the KV
        cells it reserves there: prompt plus output limit. A prompt only bounded (by
        its bytes: several times its tokens) is counted first where the bound alone
        would send it to the long-prompt lane, or take more than its share of the free
        cache, so that neither this request nor the ones after it wait for space a
        count would have found."""
        if prompt is None or (not prompt.exact and self._is_long(prompt)):
            prompt = await self._counted(body)
        lane = await self._long_lane() if self._is_long(prompt) else self._main
        output = body.get("max_tokens")
        if not isinstance(output, int) or output < 1:
            output = max(1, self.spec.context_window - prompt.tokens)
        need = lane.admission.kv_need(prompt, output)
        share = lane.admission.kv_share()
        if not prompt.exact and share is not None and need > share:
            prompt = await self._counted(body)
            need = lane.admission.kv_need(prompt, output)
        return lane, need

    def _is_long(self, prompt: PromptSize) -> bool:
        return self._long_from is not None and prompt.tokens >= self._long_from

    async def _counted(self, body: dict[str, Any]) -> PromptSize:
        return PromptSize(await self.count_prompt(body), self.prompt_count_exact(body))

    async def metrics(self) -> dict[str, float]:
        """llama.cpp's own counters, summed over the model's processes; empty when
        none is running."""
        out = await self._main.metrics()
        for name, value in (await self._long.metrics()).items():
            out[name] = out.get(name, 0.0) + value
        return out

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "slots": self.slots,
            "kv_cells": self._admission.kv_cells,
            "kv_used": self._admission.kv_used,
            "loaded": self.alive(),
            "long_prompt_lane": None
            if self._long_from is None
            else {
                "from_prompt_tokens": self._long_from,
                "running": self._long.alive(),
                "kv_used": self._long.admission.kv_used,
            },
            # No weight paths: /health shows this to anyone (issue 17); the operator
            # has them in `servelm models list`.
            "memory_bytes": self._memory_bytes,
        }

    @functools.cached_property
    def _memory_bytes(self) -> int | None:
        """Weights (mapped) plus the f16 KV cache for the whole context, and the
        long-prompt lane's: what loading this model costs (``footprint``). llama.cpp
        reports no memory figures of its own."""
        if self.spec.path is None or not self.spec.path.is_file():
            return None
        return lane_footprint(self.spec, None, long_lane=self._long_from is not None)


def build(spec: ModelSpec, settings: Settings) -> LlamaCppEngine:
    """The registry's builder (``engines.registry``)."""
    if spec.path is None or not spec.path.is_file():
        how = (
            f"run `servelm models pull {spec.slug}`"
            if spec.hf_repo
            else "set its path in the models file"
        )
        raise ModelUnavailable(f"its weights are not installed at {spec.path}; {how}.")
    return LlamaCppEngine(
        spec,
        threads=settings.threads,
        slots=settings.slots,
        queue_size=settings.queue_size,
        verbose=settings.log_level == "debug",
        prompt_cache_mib=settings.prompt_cache_mib,
        count_prompts=settings.prompt_count != "bound",
        long_prompt_tokens=settings.long_prompt_tokens,
    )


def _named_choice(body: dict[str, Any]) -> dict[str, Any]:
    """A named ``tool_choice`` as llama.cpp can honour it: llama.cpp reads the field
    only as a string (an object falls back to "auto", silently), so the body goes with
    ``"required"`` and ``tools`` cut to the named function. The prompt is counted from
    the same body, so the client pays for the tools the model saw."""
    choice = body.get("tool_choice")
    if not isinstance(choice, dict):
        return body
    name = (choice.get("function") or {}).get("name")
    tools = [t for t in body.get("tools") or () if t["function"]["name"] == name]
    return {**body, "tools": tools, "tool_choice": "required"}


def _error_detail(raw: bytes, status: int) -> dict[str, Any]:
    """llama.cpp's error object from a refused call, with the HTTP status as its code."""
    try:
        detail = json.loads(raw).get("error")
    except (ValueError, AttributeError):
        detail = None
    if not isinstance(detail, dict):
        detail = {"message": raw[:500].decode(errors="replace")}
    return {**detail, "code": status}
