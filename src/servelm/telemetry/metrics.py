"""Prometheus metrics (served at ``GET /metrics`` by ``servelm.api.metrics``).

One registry per app (not prometheus_client's global one), so several apps in one
process, as in the tests, never share counters. Engine gauges are read at scrape time
from the engines themselves instead of being updated on the hot path.

Under ``serve --workers N`` (``PROMETHEUS_MULTIPROC_DIR`` set, by the supervisor or the
operator) every process writes its counters to files there and any of them answers a
scrape with the sum over all (prometheus_client's multiprocess mode), so counters only
grow whichever worker answers. The scrape-time families (engines, replicas) are
mirrored into that directory by ``telemetry.mirror`` (``Metrics.start``).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, multiprocess
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

from servelm.engines.base import Engine
from servelm.engines.fleet.metrics import replica_families
from servelm.telemetry.mirror import Mirror

log = logging.getLogger(__name__)


class Metrics:
    def __init__(self, engines: Callable[[], dict[str, Engine]]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        # Read once: prometheus_client chose its value store at import by the same name.
        self.multiproc_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None
        self.requests = Counter(
            "servelm_requests",
            "HTTP requests by route family and status.",
            ["route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "servelm_request_duration_seconds",
            "Time from request start to the end of the response.",
            ["route"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=self.registry,
        )
        self.tokens = Counter(
            "servelm_tokens",
            "Tokens processed, by model and kind (prompt or completion).",
            ["model", "kind"],
            registry=self.registry,
        )
        # Per generation (issue 13): time to first token, between tokens, end to end,
        # and the credits charged. Queue depth is servelm_engine_waiting, read from the
        # engines at scrape time.
        self.ttft = Histogram(
            "servelm_time_to_first_token_seconds",
            "From the request's start to its first generated token.",
            ["model"],
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=self.registry,
        )
        self.itl = Histogram(
            "servelm_inter_token_seconds",
            "Between consecutive generated tokens (chunks) of one generation.",
            ["model"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=self.registry,
        )
        self.e2e = Histogram(
            "servelm_generation_duration_seconds",
            "From the request's start to its settlement, however it ended.",
            ["model", "status"],
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
            registry=self.registry,
        )
        self.charged = Counter(
            "servelm_credits_charged_micro",
            "Micro-credits charged at settlement, by model.",
            ["model"],
            registry=self.registry,
        )
        # An engine's token counts that contradicted what it sent (issue 25, point 5):
        # each was billed as ``charging.settle_usage`` says instead, and logged.
        self.usage_corrected = Counter(
            "servelm_usage_corrected",
            "Engine token counts outside what was relayed, by model, count (prompt or "
            "completion) and direction (high or low); billed at what was delivered.",
            ["model", "count", "direction"],
            registry=self.registry,
        )
        # The job queue (servelm.jobs), as its runner last read it (every few seconds).
        # Every process reads the same queue (the database): across processes, the
        # latest reading of a live one.
        self.jobs_queued = Gauge(
            "servelm_jobs_queued_lines",
            "Async requests and batch lines waiting to run.",
            registry=self.registry,
            multiprocess_mode="livemostrecent",
        )
        self.jobs_oldest = Gauge(
            "servelm_jobs_oldest_queued_seconds",
            "Age of the oldest line waiting to run (0 when none).",
            registry=self.registry,
            multiprocess_mode="livemostrecent",
        )
        self._scraped = _EngineCollector(engines)
        self._mirror: Mirror | None = None
        self._mirroring: asyncio.Task[None] | None = None
        if self.multiproc_dir is None:
            self.registry.register(self._scraped)
        else:
            self._mirror = Mirror(self._scraped)

        # Serverless local models (engines.pool): what loading and unloading cost.
        self.model_loads = Counter(
            "servelm_model_loads",
            "Local model loads, by model and outcome (ok or failed).",
            ["model", "outcome"],
            registry=self.registry,
        )
        self.model_unloads = Counter(
            "servelm_model_unloads",
            "Local model unloads, by model and reason (idle, evicted, shutdown, died).",
            ["model", "reason"],
            registry=self.registry,
        )
        self.model_load_seconds = Histogram(
            "servelm_model_load_duration_seconds",
            "Time to load a local model, by model.",
            ["model"],
            buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
            registry=self.registry,
        )

    def exposition(self) -> bytes:
        """The text ``GET /metrics`` answers: this process's registry, or with several
        processes, the sum over all of them."""
        if self._mirror is None:
            return generate_latest(self.registry)
        self._mirror.sync()  # this process's part fresh; the others' as of their last sync
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, self.multiproc_dir)  # type: ignore[no-untyped-call]
        return generate_latest(registry)

    def start(self, interval: float = 1.0) -> None:
        """With several processes: mirror the scrape-time families every ``interval``
        seconds, so a scrape answered by another process sees them recent."""
        if self._mirror is not None and self._mirroring is None:
            self._mirroring = asyncio.get_running_loop().create_task(self._mirror_loop(interval))

    async def _mirror_loop(self, interval: float) -> None:
        assert self._mirror is not None
        while True:
            self._mirror.sync()
            await asyncio.sleep(interval)

    async def close(self) -> None:
        """At the process's end: its live gauges leave the sum (its counters stay)."""
        if self._mirroring is not None:
            self._mirroring.cancel()
            await asyncio.gather(self._mirroring, return_exceptions=True)
            self._mirroring = None
        if self.multiproc_dir is not None:
            multiprocess.mark_process_dead(os.getpid(), self.multiproc_dir)  # type: ignore[no-untyped-call]

    def observe_request(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(route, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def observe_token(self, model: str, since: float, first: bool) -> None:
        (self.ttft if first else self.itl).labels(model).observe(since)

    def observe_generation(self, model: str, status: str, seconds: float, charged: int) -> None:
        self.e2e.labels(model, status).observe(seconds)
        if charged:
            self.charged.labels(model).inc(charged)

    def observe_usage_corrected(self, model: str, count: str, direction: str) -> None:
        self.usage_corrected.labels(model, count, direction).inc()

    def observe_tokens(self, model: str, prompt: int, completion: int) -> None:
        """Never raises: it runs while a request settles, and a count no counter can
        take (negative, not a number) must not stop that; it is left out instead."""
        for kind, count in (("prompt", prompt), ("completion", completion)):
            if isinstance(count, int) and not isinstance(count, bool) and 0 <= count < 2**53:
                self.tokens.labels(model, kind).inc(count)
            else:
                log.warning("token count %r for %s (%s) not counted", count, model, kind)


class _EngineCollector(Collector):
    def __init__(self, engines: Callable[[], dict[str, Engine]]) -> None:
        self._engines = engines

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        running = GaugeMetricFamily(
            "servelm_engine_running", "Generations running.", labels=["model"]
        )
        waiting = GaugeMetricFamily(
            "servelm_engine_waiting", "Requests waiting for a slot.", labels=["model"]
        )
        cancelled = CounterMetricFamily(
            "servelm_engine_cancelled", "Generations cancelled early.", labels=["model"]
        )
        for slug, engine in self._engines().items():
            running.add_metric([slug], engine.stats.running)
            waiting.add_metric([slug], engine.stats.waiting)
            cancelled.add_metric([slug], engine.stats.cancelled_total)
        yield from (running, waiting, cancelled)
        # Each remote model's replicas (state, in flight, queue, calls).
        yield from replica_families(self._engines())
