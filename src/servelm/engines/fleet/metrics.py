"""Replica gauges for the gateway's ``/metrics``, read at scrape time."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from servelm.engines.base import Engine


def replica_families(
    engines: dict[str, Engine],
) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
    labels = ["model", "replica"]
    healthy = GaugeMetricFamily(
        "servelm_replica_healthy", "1 while the replica is in rotation.", labels=labels
    )
    in_flight = GaugeMetricFamily(
        "servelm_replica_in_flight", "Requests this gateway has on the replica.", labels=labels
    )
    queue = GaugeMetricFamily(
        "servelm_replica_queue", "The replica's own queue at the last probe.", labels=labels
    )
    slots = GaugeMetricFamily(
        "servelm_replica_slots", "Requests the replica runs at once (0: unknown).", labels=labels
    )
    requests = CounterMetricFamily(
        "servelm_replica_requests", "Upstream calls sent to the replica.", labels=labels
    )
    ejections = CounterMetricFamily(
        "servelm_replica_ejections", "Times the replica left the rotation.", labels=labels
    )
    for slug, engine in engines.items():
        replica_set = getattr(engine, "replicas", None)
        if replica_set is None:
            continue
        for r in replica_set.all:
            key = [slug, r.name]  # a stable name, not an address
            healthy.add_metric(key, 1 if r.healthy else 0)
            in_flight.add_metric(key, r.in_flight)
            queue.add_metric(key, r.reported_queue)
            slots.add_metric(key, r.slots or 0)
            requests.add_metric(key, r.requests_total)
            ejections.add_metric(key, r.ejections_total)
    yield from (healthy, in_flight, queue, slots, requests, ejections)
