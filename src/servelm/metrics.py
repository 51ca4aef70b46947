"""Prometheus metrics (served at ``GET /metrics`` by ``servelm.api.metrics``).

One registry per app (not prometheus_client's global one), so several apps in one
process, as in the tests, never share counters. Engine gauges are read at scrape time
from the engines themselves instead of being updated on the hot path.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from servelm.engines.base import Engine
from servelm.fleet.metrics import replica_families


class Metrics:
    def __init__(self, engines: Callable[[], dict[str, Engine]]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
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
        self.registry.register(_EngineCollector(engines))

    def observe_request(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(route, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def observe_tokens(self, model: str, prompt: int, completion: int) -> None:
        self.tokens.labels(model, "prompt").inc(prompt)
        self.tokens.labels(model, "completion").inc(completion)


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
        # Fleet hook: each remote model's replicas (state, in flight, queue, calls).
        yield from replica_families(self._engines())


def route_family(path: str) -> str:
    if path == "/v1/chat/completions":
        return "openai_chat"
    if path.startswith("/v1/models"):
        return "models"
    if path.startswith("/admin/"):
        return "admin"
    if path.count("/") == 2 and path.startswith("/v1/"):
        return "segmind_chat"
    return "other"
