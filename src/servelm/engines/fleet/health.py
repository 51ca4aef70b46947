"""Active health probes, every ``interval`` seconds (jittered), of the replicas that
traffic does not judge.

A replica that is serving traffic (a request on it, or one answered within the last
interval) is judged by that traffic (``fleet.replicas``: outlier detection), so it is
not probed; only ejected, joining and idle replicas are, plus a busy one's load
reading every ``BUSY_READING_EVERY`` intervals (other gateways' work on it, which
routing weighs). With every replica busy, a gateway sends almost no probes: probe
load no longer grows as gateways × replicas × processes. The jitter keeps many
gateway processes started together from probing in step.

A probe is ``GET /health`` at the replica's origin (servelm workers, vLLM, SGLang
and llama.cpp's server all have one), falling back to ``GET {base}/models`` for
servers without it. Each probe also reads what routing weighs (``routing``): the
replica's slots and its requests running and waiting. A servelm worker's /health
says all three. Elsewhere the slots come from llama.cpp's ``/props``
(``total_slots``, asked until known) and the counts from ``/metrics`` (vLLM's
``vllm:num_requests_running``/``_waiting``, llama.cpp's
``llamacpp:requests_processing``/``_deferred``, SGLang's ``sglang:num_running_reqs``
/``num_queue_reqs``); a server without the endpoint is not asked again. vLLM and
SGLang report no slot count: declare ``slots`` in the models file.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import re
import time
from dataclasses import dataclass

from servelm.engines import http1
from servelm.engines.fleet.replicas import Replica, ReplicaSet

log = logging.getLogger(__name__)

_METRIC = re.compile(
    rb"^(vllm:num_requests_running|vllm:num_requests_waiting|llamacpp:requests_processing"
    rb"|llamacpp:requests_deferred|sglang:num_running_reqs|sglang:num_queue_reqs)"
    rb"(?:\{[^}]*\})?\s+([0-9.eE+-]+)",
    re.MULTILINE,
)
# A busy replica's load reading (other gateways' requests on it) is refreshed this
# often, in intervals; its health is judged by its traffic meanwhile.
BUSY_READING_EVERY = 6
# Each wait between rounds is the interval times a factor drawn from this range.
JITTER = (0.8, 1.2)

_RUNNING = {b"vllm:num_requests_running", b"llamacpp:requests_processing",
            b"sglang:num_running_reqs"}  # fmt: skip


@dataclass
class Reading:
    slots: int | None = None
    running: int = 0
    waiting: int = 0


class HealthChecker:
    def __init__(self, replicas: ReplicaSet, *, interval: float) -> None:
        self.replicas = replicas
        self.interval = interval
        # A probe that takes longer than this has failed.
        self.timeout = min(interval, 2.0)
        self._task: asyncio.Task[None] | None = None
        # Replicas whose /metrics had no gauge we know, or with no /props: not asked
        # again.
        self._no_metrics: set[str] = set()
        self._no_props: set[str] = set()

    async def probe_all(self) -> None:
        """Every replica, whatever its traffic: the first round, before any."""
        await asyncio.gather(*(self.probe(r) for r in self.replicas.all))

    def due(self, replica: Replica, now: float) -> bool:
        """Whether a round probes it: out of rotation, idle, or a stale load reading.
        A healthy replica with traffic is judged by that traffic."""
        if not replica.healthy:
            return True
        busy = replica.in_flight > 0 or now - replica.last_answered < self.interval
        return not busy or now - replica.last_reading >= self.interval * BUSY_READING_EVERY

    async def probe_round(self) -> list[Replica]:
        """One round: the replicas that are due, probed; returns them."""
        now = time.monotonic()
        due = [r for r in self.replicas.all if self.due(r, now)]
        await asyncio.gather(*(self.probe(r) for r in due))
        return due

    async def probe(self, replica: Replica) -> bool:
        try:
            async with asyncio.timeout(self.timeout):
                ok = await self._check(replica)
        except (TimeoutError, http1.HTTPError) as exc:
            ok = False
            reason = f"health probe failed: {type(exc).__name__} {exc}".strip()
        else:
            reason = "health probe failed: not ready"
        if not ok:
            replica.reported(slots=None, running=0, waiting=0)
            replica.eject(reason)
            return False
        return replica.readmit(cooldown=self.interval)

    async def _check(self, replica: Replica) -> bool:
        status, body = await _get(replica.probe_pool, "/health")
        if status == 404:
            # No /health: any answer short of a server error from the models list
            # shows a live OpenAI-compatible server.
            status, body = await _get(replica.pool, "/models")
            return status < 500
        if status != 200:
            return False
        reading = _from_health(body)
        if reading is None:
            reading = Reading()
            if replica.url not in self._no_metrics:
                reading = await self._from_metrics(replica)
            if replica.slots is None and replica.url not in self._no_props:
                reading.slots = await self._slots_from_props(replica)
        replica.reported(slots=reading.slots, running=reading.running, waiting=reading.waiting)
        return True

    async def _from_metrics(self, replica: Replica) -> Reading:
        status, body = await _get(replica.probe_pool, "/metrics")
        values = _METRIC.findall(body) if status == 200 else []
        if not values:
            self._no_metrics.add(replica.url)
        reading = Reading()
        for name, value in values:
            if name in _RUNNING:
                reading.running += int(float(value))
            else:
                reading.waiting += int(float(value))
        return reading

    async def _slots_from_props(self, replica: Replica) -> int | None:
        status, body = await _get(replica.probe_pool, "/props")
        slots = (_count(_json(body), "total_slots") or None) if status == 200 else None
        if slots is None:
            self._no_props.add(replica.url)
        return slots

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval * random.uniform(*JITTER))
            try:
                await self.probe_round()
            except Exception:  # one bad round must not end the probing for good
                log.exception("health probe round failed")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


async def _get(pool: http1.Pool, path: str) -> tuple[int, bytes]:
    resp = await pool.request("GET", path)
    async with resp:
        return resp.status_code, await resp.read()


def _from_health(body: bytes) -> Reading | None:
    """A servelm worker's /health: ``slots``, ``slots_busy`` and ``queue_depth``."""
    data = _json(body)
    waiting = _count(data, "queue_depth")
    if waiting is None:
        return None
    running = _count(data, "slots_busy") or 0
    return Reading(slots=_count(data, "slots") or None, running=running, waiting=waiting)


def _json(body: bytes) -> dict[str, object]:
    try:
        data = json.loads(body)
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _count(data: dict[str, object], name: str) -> int | None:
    value = data.get(name)
    # bool is an int to Python, never a count here.
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None
