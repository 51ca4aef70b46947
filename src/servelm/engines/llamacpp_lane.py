"""One llama.cpp process of a model as ``engines.llamacpp`` sees it (a lane): the
process (``engines.model_process``), the two connection pools on its loopback port,
its admission (that process's slots and KV cache) and its counters; and what a
model's processes cost in memory (``footprint``, which the model pool's budget
counts). A model has one lane, and a second for long prompts where its window is
larger than ``SERVELM_LONG_PROMPT_TOKENS`` (``engines.llamacpp``'s docstring says
why)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from servelm.catalog.specs import ModelSpec
from servelm.config import DEFAULT_LONG_PROMPT_TOKENS
from servelm.engines import gguf_files, http1
from servelm.engines.admission import Admission
from servelm.engines.model_process import ModelProcess

if TYPE_CHECKING:
    from servelm.config import Settings

log = logging.getLogger(__name__)

# Tokens per prefill step; see server_params.
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


def long_lane_from(spec: ModelSpec, long_prompt_tokens: int) -> int | None:
    """The prompt tokens from which a request of this model runs in its long-prompt
    lane; None when the model has none (turned off, or a window no larger)."""
    if long_prompt_tokens <= 0 or spec.context_window <= long_prompt_tokens:
        return None
    return long_prompt_tokens


def footprint(spec: ModelSpec, settings: Settings | None = None) -> int | None:
    """What loading the model costs (``gguf_files.footprint``: weights, projector, KV
    cache) plus its process, and, where it has a long-prompt lane, that lane's process
    and KV cache (counted from the load, so that starting it never breaks the budget);
    None while its weights are not installed. No settings: the defaults'."""
    threshold = settings.long_prompt_tokens if settings is not None else DEFAULT_LONG_PROMPT_TOKENS
    return lane_footprint(spec, settings, long_lane=long_lane_from(spec, threshold) is not None)


def lane_footprint(spec: ModelSpec, settings: Settings | None, *, long_lane: bool) -> int | None:
    model = gguf_files.footprint(spec, settings)
    if model is None:
        return None
    total = model + PROCESS_BYTES
    if long_lane and spec.path is not None:
        total += gguf_files.kv_cache_bytes(spec.path, spec.context_window) + PROCESS_BYTES
    return total


def server_params(
    spec: ModelSpec,
    *,
    slots: int,
    threads: int,
    verbose: bool,
    prompt_cache_mib: int | None,
) -> dict[str, Any]:
    """llama.cpp's server parameters (``xllamacpp.CommonParams`` fields by dotted
    name), which each of the model's processes sets before it loads."""
    p: dict[str, Any] = {
        "model.path": str(spec.path),
        "n_parallel": slots,
        # A unified KV cache lets any one slot use the whole context window while
        # all slots share one pool, instead of cutting the window into per-slot
        # slices.
        "kv_unified": True,
        "n_ctx": spec.context_window,
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
        "n_threads_http": slots + COUNT_IDLE + 8,
        "cpuparams.n_threads": threads,
        "cpuparams_batch.n_threads": threads,
        "warmup": False,
        # llama.cpp's fitting pass loads the model once more to measure device
        # memory and may shrink the context below what the catalog promises;
        # servelm decides memory itself (engines.pool's budget). It was ~45 % of
        # each load (1.15 s → 0.63 s median for the tiny test model here).
        "fit_params": False,
        "endpoint_metrics": True,
        "verbosity": 3 if verbose else -1,
    }
    if prompt_cache_mib is not None:
        # llama.cpp keeps finished prompts' KV in host memory (8 GiB by default)
        # to reuse their prefixes; 0 leaves only what the slots still hold.
        p["cache_ram_mib"] = prompt_cache_mib
    if spec.chat_template:
        p["chat_template"] = spec.chat_template
    if spec.mmproj:
        p["mmproj.path"] = str(spec.mmproj)
    return p


class Lane:
    """One llama.cpp process of the model, with its loopback pools and its admission
    (the slots and KV cache of that process)."""

    def __init__(self, slug: str, admission: Admission, *, verbose: bool) -> None:
        self.slug = slug
        self.admission = admission
        self._verbose = verbose
        self.process: ModelProcess | None = None
        self.address: str | None = None
        # Two pools on the model server's loopback port: quick calls (template,
        # tokenize) with a short read timeout, and generations, whose first byte may
        # wait out a long prefill on a busy CPU.
        self.http: http1.Pool | None = None
        self.gen: http1.Pool | None = None

    async def start(self, params: dict[str, Any], *, nice: int = 0) -> None:
        process = ModelProcess(self.slug, verbose=self._verbose)
        address = await process.start(params, nice=nice)
        self.process, self.address = process, address
        self.http = http1.Pool(address, read_timeout=30.0, max_idle=COUNT_IDLE)
        # Generations are not kept alive: a connect on loopback is nothing next to a
        # generation, and an idle connection would pin one of the server's threads.
        self.gen = http1.Pool(address, read_timeout=GENERATION_READ_TIMEOUT, max_idle=0)

    def alive(self) -> bool:
        return self.process is not None and self.process.alive()

    @property
    def pid(self) -> int | None:
        """The process, while it runs."""
        return self.process.pid if self.process is not None else None

    async def close(self) -> None:
        for pool in (self.http, self.gen):
            if pool is not None:
                await pool.aclose()
        self.http = self.gen = None
        self.address = None
        process, self.process = self.process, None
        if process is not None:
            await process.stop()

    async def metrics(self) -> dict[str, float]:
        """llama.cpp's own counters (``llamacpp:*`` Prometheus text), parsed; empty
        when the process is not running."""
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
            log.warning("%s: llama.cpp's metrics did not come: %s", self.slug, exc)
            return {}
        finally:
            await pool.aclose()
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith("llamacpp:"):
                name, _, value = line.partition(" ")
                out[name.removeprefix("llamacpp:")] = float(value)
        return out
