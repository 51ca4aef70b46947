"""Each replica's live state: healthy or ejected, requests in flight, its capacity
and the work it reported.

State changes two ways. Passively, from real traffic, telling the replica from the
request (as Envoy's outlier detection does): what says the replica is sick (a refused
or reset connection, a timeout, a 502, 503 or 504) ejects it at once; a 500 may be the
request's own doing, so it only counts towards a run (a malformed answer, not even
that: the server answered)
(``RUN`` failures in a row, none older than ``RUN_WINDOW`` seconds, eject); an answer,
a 4xx included, ends the run. A single failure never ejects a model's last healthy
replica: that would turn one bad answer, perhaps provoked by one user, into a 503 for
everyone (only a run does). Actively, the health checker (``servelm.engines.fleet.health``)
probes every replica on an interval: a failed probe ejects, and a passing probe
readmits an ejected replica once it has sat out its cool-down, so a replica that
answers probes but fails requests does not bounce straight back. A replica that is
serving traffic is judged by that traffic and is not probed each interval
(``HealthChecker.due``), so probe load does not grow as gateways × replicas.

Replicas of a ``dns+`` URL come and go while the gateway runs
(``servelm.engines.fleet.discovery``): one joins the set out of rotation until its first
probe passes, and one that leaves stops taking requests at once while its requests in
flight finish (``ReplicaSet.remove``).
"""

from __future__ import annotations

import logging
import time
from typing import Any
from urllib.parse import urlsplit

from servelm.catalog.specs import ReplicaSpec
from servelm.engines import http1

log = logging.getLogger(__name__)

# Failures in a row that eject a replica whatever they were (Envoy's consecutive_5xx).
RUN = 5
# A failure longer ago than this no longer extends a run.
RUN_WINDOW = 30.0


class Replica:
    def __init__(
        self,
        spec: ReplicaSpec,
        *,
        model: str,
        connect_timeout: float,
        read_timeout: float,
        max_idle: int,
        name: str = "0",
        healthy: bool = True,
    ) -> None:
        self.url = spec.url.rstrip("/")
        # A stable name for metrics and logs that says nothing of the address: its
        # index in the models file, and for a discovered one, which address it was.
        self.name = name
        self.weight = spec.weight
        self.declared_slots = spec.slots
        self.model = model
        headers = {"authorization": f"Bearer {spec.api_key}"} if spec.api_key else {}
        self.pool = http1.Pool(
            self.url,
            headers=headers,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            max_idle=max_idle,
        )
        parts = urlsplit(self.url)
        # /health and /metrics live at the server's root, not under /v1.
        self.origin = f"{parts.scheme}://{parts.netloc}"
        self.probe_pool = http1.Pool(
            self.origin, headers=headers, connect_timeout=connect_timeout, max_idle=1
        )
        # Until a probe or a request says otherwise; a discovered replica starts out of
        # rotation, and its first passing probe brings it in.
        self.healthy = healthy
        self.ejected_at: float | None = None
        self.last_error = ""
        self.in_flight = 0
        # What the engine said at the last probe (servelm worker /health, llama.cpp's
        # /props, /metrics): its slots, requests running and waiting; None / 0 where
        # it tells nothing.
        self.reported_slots: int | None = None
        self.reported_running = 0
        self.reported_queue = 0
        # Of those, work other gateways sent: the engine's count less ours at that
        # moment. Adding the engine's whole count to our own live one would count our
        # requests twice, and keep counting finished ones until the next probe.
        self.foreign = 0
        self.requests_total = 0
        self.failures_total = 0
        self.ejections_total = 0
        # The current run of failures from traffic, and when its last one came.
        self.run = 0
        self._run_last = 0.0
        # When it last answered a request, and when a probe last read its load
        # (monotonic; 0: never): what decides whether a probe is due.
        self.last_answered = 0.0
        self.last_reading = 0.0

    @property
    def slots(self) -> int | None:
        """Requests it runs at once: as declared in the models file, else as reported."""
        return self.declared_slots or self.reported_slots

    @property
    def busy(self) -> int:
        """Requests on it now: ours, live, plus other gateways' as of the last probe."""
        return self.in_flight + self.foreign

    def reported(self, *, slots: int | None, running: int, waiting: int) -> None:
        """A probe's reading. Called right after the answer arrived, so ``in_flight``
        is as close as it gets to our share of what the engine counted."""
        self.last_reading = time.monotonic()
        if slots is not None:
            self.reported_slots = slots
        self.reported_running, self.reported_queue = running, waiting
        self.foreign = max(0, running + waiting - self.in_flight)

    def failed(self, reason: str, *, sick: bool, alone: bool) -> None:
        """A request's failure here. ``sick``: one that says the replica is (refused,
        reset, timed out, 502/503/504); else it may be the request's. ``alone``: no
        other replica of the model is healthy."""
        now = time.monotonic()
        if now - self._run_last > RUN_WINDOW:
            self.run = 0
        self.run += 1
        self._run_last = now
        if (sick and not alone) or self.run >= RUN:
            self.eject(reason)
        else:
            self.failures_total += 1
            self.last_error = reason
            log.info("replica %s of %s failed (%d in a row): %s", self.url, self.model,
                     self.run, reason)  # fmt: skip

    def answered(self) -> None:
        """It answered a request (a 4xx too): the run of failures is over."""
        self.run = 0
        self.last_answered = time.monotonic()

    def eject(self, reason: str) -> None:
        self.failures_total += 1
        self.last_error = reason
        self.run = 0
        # A failure while already out restarts the cool-down.
        self.ejected_at = time.monotonic()
        if self.healthy:
            self.healthy = False
            self.ejections_total += 1
            log.warning("replica %s of %s ejected: %s", self.url, self.model, reason)

    def readmit(self, cooldown: float) -> bool:
        """Back into rotation after a passing probe, once the cool-down is over."""
        if self.healthy:
            return True
        if self.ejected_at is not None and time.monotonic() - self.ejected_at < cooldown:
            return False
        self.healthy = True
        self.ejected_at = None
        log.info("replica %s of %s back in rotation", self.url, self.model)
        return True

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "url": self.url,
            "state": "healthy" if self.healthy else "ejected",
            "weight": self.weight,
            "slots": self.slots,
            "in_flight": self.in_flight,
            "running": self.reported_running,
            "queue": self.reported_queue,
            "requests": self.requests_total,
            "failures": self.failures_total,
            "ejections": self.ejections_total,
            "last_error": self.last_error,
        }

    async def aclose(self) -> None:
        await self.pool.aclose()
        await self.probe_pool.aclose()


class ReplicaSet:
    def __init__(self, replicas: list[Replica]) -> None:
        self.all = replicas

    def add(self, replica: Replica) -> None:
        self.all.append(replica)

    async def remove(self, replica: Replica) -> None:
        """Out of the set now, so no new request goes to it. Closing its pools closes
        their idle connections only: a request in flight keeps its connection to the
        end of its answer, and the closed pool drops it then."""
        self.all.remove(replica)
        log.info("replica %s of %s left; %d requests on it finish", replica.url,
                 replica.model, replica.in_flight)  # fmt: skip
        await replica.aclose()

    def healthy(self) -> list[Replica]:
        return [r for r in self.all if r.healthy]

    def failed(self, replica: Replica, reason: str, *, sick: bool) -> None:
        alone = not any(r.healthy for r in self.all if r is not replica)
        replica.failed(reason, sick=sick, alone=alone)

    def describe(self) -> list[dict[str, Any]]:
        return [r.describe() for r in self.all]

    async def aclose(self) -> None:
        for r in self.all:
            await r.aclose()
