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
from servelm.engines import gguf_files, http1, wire
from servelm.engines.admission import Admission, PromptSize
from servelm.engines.base import Engine, map_engine_error
from servelm.engines.gguf_files import projector_image_tokens
from servelm.engines.model_process import LoadFailed, ModelProcess
from servelm.errors import EngineError, ModelUnavailable, ServelmError, StreamCut

if TYPE_CHECKING:
    from servelm.config import Settings

log = logging.getLogger(__name__)

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


# Tokens per prefill step; see _params.
PREFILL_BATCH = 512
# Idle keep-alive connections for the prompt count's calls (template, tokenize).
COUNT_IDLE = 4
# Longest silence from the engine mid-generation: a 100k-token prefill on a busy CPU.
# The request's own deadline (issue 13) usually ends it sooner.
GENERATION_READ_TIMEOUT = 3600.0
# What a model's process holds besides the model (``llamacpp_process``): its VmRSS
# just before the load, with CPython 3.11 and xllamacpp 2026.10 imported, was
# 24.0 MiB in five starts on the x86-64 build machine (9 MiB of it private; the rest
# is the interpreter's and xllamacpp's file pages, which every model's process maps
# and RSS counts in each). Part of every model's footprint, so the budget counts it.
PROCESS_BYTES = 24 << 20
# Seconds a failed call waits to see the model's process exit, so that a client whose
# request met a dead process hears to retry (503) rather than of an engine error.
EXIT_SEEN = 1.0


def footprint(spec: ModelSpec, settings: Settings | None = None) -> int | None:
    """What loading the model costs (``gguf_files.footprint``: weights, projector, KV
    cache) plus its process; None while its weights are not installed."""
    model = gguf_files.footprint(spec, settings)
    return None if model is None else model + PROCESS_BYTES


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
    ) -> None:
        super().__init__(spec)
        self.slots = spec.slots or slots
        self._threads = threads
        self._verbose = verbose
        self._prompt_cache_mib = prompt_cache_mib
        # False: no count before admission (two calls into llama.cpp's HTTP routes);
        # the hold takes the walk's upper bound and the engine's usage settles it.
        self._count_prompts = count_prompts
        # The slots share one unified KV cache of the context window's size (_params):
        # what the requests running together may fill.
        self._admission: Admission = Admission(
            self.slots, queue_size, self.stats, kv_cells=spec.context_window
        )
        self._process: ModelProcess | None = None  # while loaded (``llamacpp_process``)
        self.address: str | None = None  # its server's base URL
        # Two pools on the model server's loopback port: quick calls (template,
        # tokenize) with a short read timeout, and generations, whose first byte may
        # wait out a long prefill on a busy CPU.
        self._http: http1.Pool | None = None
        self._gen: http1.Pool | None = None
        # Exact tokens per image (fixed-grid projector), or None (unknown / no vision).
        self.image_tokens: int | None = None

    # -- lifecycle -------------------------------------------------------------------

    def _params(self) -> dict[str, Any]:
        """llama.cpp's server parameters (``xllamacpp.CommonParams`` fields by dotted
        name), which the model's process sets before it loads."""
        p: dict[str, Any] = {
            "model.path": str(self.spec.path),
            "n_parallel": self.slots,
            # A unified KV cache lets any one slot use the whole context window while
            # all slots share one pool, instead of cutting the window into per-slot
            # slices.
            "kv_unified": True,
            "n_ctx": self.spec.context_window,
            # llama.cpp looks at cancellations only between batches: a prompt
            # prefilled as one 2,048-token batch runs to the end for a client that has
            # left. Batches of one micro-batch (512, its default) cost nothing on CPU
            # and let a hang-up stop a long prefill within one batch.
            "n_batch": PREFILL_BATCH,
            # llama.cpp's HTTP server gives each connection a thread for as long as it
            # is open, idle keep-alive included: every running generation holds one,
            # the counting pool's idle connections hold theirs, and the rest serve
            # counts in flight. (With too few, counts queued behind idle connections
            # until their 5 s keep-alive ran out: 0.3-0.8x the raw server's tokens/s
            # at 32 streams.)
            "n_threads_http": self.slots + COUNT_IDLE + 8,
            "cpuparams.n_threads": self._threads,
            "cpuparams_batch.n_threads": self._threads,
            "warmup": False,
            # llama.cpp's fitting pass loads the model once more to measure device
            # memory and may shrink the context below what the catalog promises;
            # servelm decides memory itself (engines.pool's budget). It was ~45 % of
            # each load (1.15 s → 0.63 s median for the tiny test model here).
            "fit_params": False,
            "endpoint_metrics": True,
            "verbosity": 3 if self._verbose else -1,
        }
        if self._prompt_cache_mib is not None:
            # llama.cpp keeps finished prompts' KV in host memory (8 GiB by default)
            # to reuse their prefixes; 0 leaves only what the slots still hold.
            p["cache_ram_mib"] = self._prompt_cache_mib
        if self.spec.chat_template:
            p["chat_template"] = self.spec.chat_template
        if self.spec.mmproj:
            p["mmproj.path"] = str(self.spec.mmproj)
        return p

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
        process = ModelProcess(self.spec.slug, verbose=self._verbose)
        try:
            address = await process.start(self._params())
        except LoadFailed as exc:
            raise ModelUnavailable(
                f"Model '{self.spec.slug}' failed to load from {self.spec.path}: {exc}",
                retry_after=60,
            ) from exc
        self._process, self.address = process, address
        self._http = http1.Pool(address, read_timeout=30.0, max_idle=COUNT_IDLE)
        # Generations are not kept alive: a connect on loopback is nothing next to a
        # generation, and an idle connection would pin one of the server's threads.
        self._gen = http1.Pool(address, read_timeout=GENERATION_READ_TIMEOUT, max_idle=0)
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
            self._admission.kv_cells = cells
        log.info(
            "loaded %s from %s (%d slots, context %d)",
            self.spec.slug,
            self.spec.path,
            self.slots,
            self.spec.context_window,
        )

    def alive(self) -> bool:
        return self._process is not None and self._process.alive()

    @property
    def pid(self) -> int | None:
        """The model's process, while it runs."""
        return self._process.pid if self._process is not None else None

    async def close(self) -> None:
        for pool in (self._http, self._gen):
            if pool is not None:
                await pool.aclose()
        self._http = self._gen = None
        process, self._process = self._process, None
        if process is not None:
            await process.stop()

    async def _broken(self, what: str, exc: Exception) -> ServelmError:
        """The error for a call that failed at the transport: a 503 to retry when the
        model's process has ended (the pool loads the model again at its next
        request), an engine error otherwise."""
        process = self._process
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
        assert self._http is not None
        try:
            resp = await self._http.request("GET", "/v1/models")
            async with resp:
                listed = json.loads(await resp.read())
            return int(listed["data"][0]["meta"]["n_vocab"])
        except (http1.HTTPError, ValueError, KeyError, IndexError, TypeError):
            log.warning("%s: the engine did not say its vocabulary size", self.spec.slug)
            return None

    async def _kv_cells(self) -> int | None:
        """The tokens the KV cache holds, as the model's server reports it (a slot's
        ``n_ctx``: with the unified cache, every slot's is the whole cache)."""
        assert self._http is not None
        try:
            resp = await self._http.request("GET", "/props")
            async with resp:
                props = json.loads(await resp.read())
            return int(props["default_generation_settings"]["n_ctx"])
        except (http1.HTTPError, ValueError, KeyError, TypeError):
            log.warning("%s: the engine did not say its KV cache size", self.spec.slug)
            return None

    async def _call(self, path: str, payload: dict[str, Any]) -> tuple[int, Any]:
        """One call to the model server's own HTTP routes."""
        if self._http is None:
            raise ModelUnavailable(f"Model '{self.spec.slug}' is not loaded.")
        try:
            return await self._http.post_json(path, payload)
        except http1.HTTPError as exc:
            raise await self._broken(f"did not answer {path}", exc) from exc

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
        if self._gen is None:
            raise ModelUnavailable(f"Model '{self.spec.slug}' is not loaded.")
        payload = json.dumps(
            {**_named_choice(body), "stream": True, "stream_options": {"include_usage": True}},
            ensure_ascii=False,
        ).encode()
        kv = await self._kv_need(body, prompt)
        async with self._admission.enter(kv):
            self.stats.requests_total += 1
            finished = False
            try:
                try:
                    resp = await self._gen.request("POST", "/v1/chat/completions", payload)
                except http1.HTTPError as exc:
                    raise await self._broken("did not answer", exc) from exc
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
                raise await self._broken("broke off", exc) from exc
            finally:
                if not finished:
                    self.stats.cancelled_total += 1

    async def _kv_need(self, body: dict[str, Any], prompt: PromptSize | None) -> int:
        """The KV cells this request reserves: prompt plus output limit. A prompt only
        bounded (by its bytes: several times its tokens) is counted first where the
        bound would take more than its share of the free cache, so that neither this
        request nor the ones after it wait for space a count would have found."""
        if prompt is None:
            prompt = PromptSize(await self.count_prompt(body), self.prompt_count_exact(body))
        output = body.get("max_tokens")
        if not isinstance(output, int) or output < 1:
            output = max(1, self.spec.context_window - prompt.tokens)
        need = self._admission.kv_need(prompt, output)
        share = self._admission.kv_share()
        if not prompt.exact and share is not None and need > share:
            prompt = PromptSize(await self.count_prompt(body), self.prompt_count_exact(body))
            need = self._admission.kv_need(prompt, output)
        return need

    async def metrics(self) -> dict[str, float]:
        """llama.cpp's own counters (``llamacpp:*`` Prometheus text), parsed; empty
        when the model's process is not running."""
        if self.address is None or not self.alive():
            return {}
        # A connection of its own: callable from any event loop (tests call it from
        # theirs), and rare enough that keep-alive buys nothing.
        pool = http1.Pool(self.address, read_timeout=30.0, max_idle=0)
        try:
            resp = await pool.request("GET", "/metrics")
            async with resp:
                text = (await resp.read()).decode()
        except http1.HTTPError as exc:
            log.warning("%s: llama.cpp's metrics did not come: %s", self.spec.slug, exc)
            return {}
        finally:
            await pool.aclose()
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith("llamacpp:"):
                name, _, value = line.partition(" ")
                out[name.removeprefix("llamacpp:")] = float(value)
        return out

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "slots": self.slots,
            "kv_cells": self._admission.kv_cells,
            "kv_used": self._admission.kv_used,
            "loaded": self.alive(),
            # No weight paths: /health shows this to anyone (issue 17); the operator
            # has them in `servelm models list`.
            "memory_bytes": self._memory_bytes,
        }

    @functools.cached_property
    def _memory_bytes(self) -> int | None:
        """Weights (mapped) plus the f16 KV cache for the whole context: what loading
        this model costs. llama.cpp reports no memory figures of its own."""
        if self.spec.path is None or not self.spec.path.is_file():
            return None
        return footprint(self.spec)


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
