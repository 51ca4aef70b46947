"""Scrape-time families (read from the engines when scraped) in prometheus_client's
multiprocess mode, where a scrape reads only the files of ``PROMETHEUS_MULTIPROC_DIR``.

Each process copies what its collector reports into file-backed metrics: a counter
grows by what its source grew since the last copy (so it only grows, and the sum
over processes is the fleet's total), a gauge is set, and summed over live processes
(``livesum``: requests in flight, queues) or the highest of them (``livemax``: what a
replica reported, whether it is in rotation anywhere).
"""

from __future__ import annotations

from typing import Literal

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.registry import Collector

# Gauges that say the same thing in every process, not a share of a total.
_MAX_GAUGES = frozenset(
    {"servelm_replica_healthy", "servelm_replica_queue", "servelm_replica_slots"}
)


class Mirror:
    def __init__(self, source: Collector) -> None:
        self._source = source
        # Never exposed: the scrape reads the files these write.
        self._registry = CollectorRegistry()
        self._counters: dict[str, Counter] = {}
        self._gauges: dict[str, Gauge] = {}
        self._last: dict[tuple[str, tuple[str, ...]], float] = {}

    def sync(self) -> None:
        for family in self._source.collect():
            for sample in family.samples:
                names = tuple(sorted(sample.labels))
                values = tuple(sample.labels[n] for n in names)
                if family.type == "counter":
                    if not sample.name.endswith("_total"):
                        continue  # the _created sample
                    counter = self._counter(family.name, family.documentation, names)
                    key = (family.name, values)
                    grown = sample.value - self._last.get(key, 0.0)
                    if grown > 0:
                        counter.labels(*values).inc(grown)
                    self._last[key] = max(sample.value, self._last.get(key, 0.0))
                else:
                    gauge = self._gauge(family.name, family.documentation, names)
                    gauge.labels(*values).set(sample.value)

    def _counter(self, name: str, doc: str, labels: tuple[str, ...]) -> Counter:
        found = self._counters.get(name)
        if found is None:
            found = self._counters[name] = Counter(name, doc, labels, registry=self._registry)
        return found

    def _gauge(self, name: str, doc: str, labels: tuple[str, ...]) -> Gauge:
        found = self._gauges.get(name)
        if found is None:
            mode: Literal["livemax", "livesum"] = "livemax" if name in _MAX_GAUGES else "livesum"
            found = self._gauges[name] = Gauge(
                name, doc, labels, registry=self._registry, multiprocess_mode=mode
            )
        return found
