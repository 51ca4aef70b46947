"""Each replica's live state: healthy or ejected, requests in flight, reported queue.

State changes two ways. Passively, a request that cannot connect, times out or gets
a 5xx ejects the replica at once (the request itself fails over). Actively, the
health checker (``servelm.fleet.health``) probes every replica on an interval: a
failed probe ejects, and a passing probe readmits an ejected replica once it has sat
out its cool-down, so a replica that answers probes but fails requests does not
bounce straight back.
"""

from __future__ import annotations

import logging
import time
from typing import Any
from urllib.parse import urlsplit

from servelm import http1
from servelm.fleet.spec import ReplicaSpec

log = logging.getLogger(__name__)


class Replica:
    def __init__(
        self,
        spec: ReplicaSpec,
        *,
        model: str,
        connect_timeout: float,
        read_timeout: float,
        max_idle: int,
    ) -> None:
        self.url = spec.url.rstrip("/")
        self.weight = spec.weight
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
        self.healthy = True  # until a probe or a request says otherwise
        self.ejected_at: float | None = None
        self.last_error = ""
        self.in_flight = 0
        # Requests waiting in the engine's own queue, as its /health or /metrics said
        # at the last probe; 0 where it tells nothing.
        self.reported_queue = 0
        self.requests_total = 0
        self.failures_total = 0
        self.ejections_total = 0

    @property
    def load(self) -> float:
        """What routing compares: work here per unit of weight."""
        return (self.in_flight + self.reported_queue) / self.weight

    def eject(self, reason: str) -> None:
        self.failures_total += 1
        self.last_error = reason
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
            "url": self.url,
            "state": "healthy" if self.healthy else "ejected",
            "weight": self.weight,
            "in_flight": self.in_flight,
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

    def healthy(self) -> list[Replica]:
        return [r for r in self.all if r.healthy]

    def describe(self) -> list[dict[str, Any]]:
        return [r.describe() for r in self.all]

    async def aclose(self) -> None:
        for r in self.all:
            await r.aclose()
