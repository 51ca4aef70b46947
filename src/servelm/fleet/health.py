"""Active health probes: every replica, every ``interval`` seconds.

A probe is ``GET /health`` at the replica's origin (servelm workers, vLLM, SGLang
and llama.cpp's server all have one), falling back to ``GET {base}/models`` for
servers without it. A servelm worker's /health also reports its queue depth; vLLM's
and llama.cpp's ``/metrics`` report theirs (``vllm:num_requests_waiting``,
``llamacpp:requests_deferred``), read once per probe where the server has them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re

from servelm import http1
from servelm.fleet.replicas import Replica, ReplicaSet

log = logging.getLogger(__name__)

_QUEUE_METRIC = re.compile(
    rb"^(?:vllm:num_requests_waiting|llamacpp:requests_deferred|sglang:num_queue_reqs)"
    rb"(?:\{[^}]*\})?\s+([0-9.eE+-]+)",
    re.MULTILINE,
)


class HealthChecker:
    def __init__(self, replicas: ReplicaSet, *, interval: float) -> None:
        self.replicas = replicas
        self.interval = interval
        # A probe that takes longer than this has failed.
        self.timeout = min(interval, 2.0)
        self._task: asyncio.Task[None] | None = None
        # Replicas whose /metrics had no queue gauge we know: not asked again.
        self._no_metrics: set[str] = set()

    async def probe_all(self) -> None:
        await asyncio.gather(*(self.probe(r) for r in self.replicas.all))

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
            replica.reported_queue = 0
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
        queue = _queue_from_health(body)
        if queue is None and replica.url not in self._no_metrics:
            queue = await self._queue_from_metrics(replica)
        replica.reported_queue = queue or 0
        return True

    async def _queue_from_metrics(self, replica: Replica) -> int | None:
        status, body = await _get(replica.probe_pool, "/metrics")
        values = _QUEUE_METRIC.findall(body) if status == 200 else []
        if not values:
            self._no_metrics.add(replica.url)
            return None
        return int(sum(float(v) for v in values))

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.probe_all()
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


def _queue_from_health(body: bytes) -> int | None:
    try:
        data = json.loads(body)
    except ValueError:
        return None
    if isinstance(data, dict) and isinstance(data.get("queue_depth"), int):
        return int(data["queue_depth"])
    return None
