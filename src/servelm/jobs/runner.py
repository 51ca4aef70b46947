"""The queue's runner: claims lines, runs them through the chat walk, ends jobs,
sends webhooks, and keeps leases, expiries and metrics up to date.

Interactive first: a process runs at most ``jobs_concurrency`` lines at once (by
default half its slots), and claims a new line only while every loaded engine has a
free slot and nobody waiting for one, so queued work fills the capacity live traffic
leaves, a claimed line never queues for a slot ahead of a live request, and a burst
of live requests waits behind a batch for at most the lines already running.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import socket
import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from servelm.access.keys import Authenticator
from servelm.billing import holds
from servelm.billing.clock import utcnow
from servelm.billing.service import Billing
from servelm.chat.calls import Call
from servelm.chat.serving import ChatService
from servelm.errors import ServelmError
from servelm.jobs import queue, store, views, walk
from servelm.jobs.store import Line
from servelm.jobs.webhooks import Sender
from servelm.store.db import Tx
from servelm.telemetry.metrics import Metrics

log = logging.getLogger(__name__)

INTERNAL = "The server had an internal error processing the request."


class Runner:
    def __init__(
        self,
        chat: ChatService,
        billing: Billing,
        sender: Sender,
        *,
        concurrency: int,
        lease: timedelta,
        poll: float,
        retention: timedelta,
        metrics: Metrics | None = None,
        draining: Callable[[], bool] = lambda: False,
    ) -> None:
        self.chat = chat
        self.billing = billing
        self.db = billing.db
        self.sender = sender
        self.concurrency = max(1, concurrency)
        self.lease = lease
        self.poll = poll
        self.retention = retention
        self.metrics = metrics
        self.draining = draining
        self._closing = False
        self.owner = f"{socket.gethostname()[:30]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._running: set[tuple[str, int]] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._wake = asyncio.Event()
        self._webhooks_due = asyncio.Event()

    @property
    def authenticator(self) -> Authenticator:
        # Queued work runs in gateways only: their callers are API keys, never a worker's.
        authenticator = self.chat.authenticator
        assert isinstance(authenticator, Authenticator)
        return authenticator

    def start(self) -> None:
        for _ in range(self.concurrency):
            self._tasks.append(asyncio.create_task(self._work()))
        self._tasks.append(asyncio.create_task(self._housekeeping()))
        self._tasks.append(asyncio.create_task(self._webhooks()))

    async def close(self) -> None:
        """Stop; lines cut short here are not ended but handed back to the queue (a
        batch line's hold released, an async request's kept for its next run)."""
        self._closing = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        try:
            await self.billing.run(queue.hand_back, self.db, self.owner)
        except Exception:
            log.exception("handing back running lines failed; their leases will expire")

    def wake(self) -> None:
        """New work was queued by this process: look now, not at the next poll."""
        self._wake.set()

    # -- running lines -------------------------------------------------------------------

    def _interactive_busy(self) -> bool:
        return not all(e.has_room() for e in self.chat.engines.values())

    async def _idle(self) -> None:
        self._wake.clear()
        # Woken by new work in this process, or the poll interval passed.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), self.poll)

    async def _work(self) -> None:
        while True:
            try:
                if self.draining() or self._interactive_busy():
                    await asyncio.sleep(self.poll)
                    continue
                lines = await self.billing.run(queue.claim, self.db, self.owner, self.lease, 1)
            except Exception:
                log.exception("claiming queued work failed")
                await asyncio.sleep(self.poll)
                continue
            if not lines:
                await self._idle()
                continue
            for line in lines:
                await self.run_line(line)

    async def run_line(self, line: Line) -> None:
        self._running.add((line.job_id, line.line_no))
        try:
            await self._run(line)
        finally:
            self._running.discard((line.job_id, line.line_no))
        try:
            if await self.billing.run(queue.finalize, self.db, line.job_id):
                self._webhooks_due.set()
        except Exception:
            log.exception("ending job %s failed; the housekeeping retries", line.job_id)

    async def _run(self, line: Line) -> None:
        slug = None
        if line.kind == "async":
            job = await self.billing.run(store.get_job, self.db, line.job_id)
            slug = job["model"]
        try:
            principal = await self.authenticator.authenticate_key_id(line.key_public)
            await walk.run(
                self.chat,
                principal,
                line.body.encode(),
                line.hold_id,
                slug=slug,
                batch=line.kind == "batch",
                held_max_tokens=line.held_max_tokens,
                record=functools.partial(self._record, line),
            )
        except ServelmError as exc:
            # Ended before generating: a batch line held nothing (or its hold was
            # refused); an async request's hold from submission is released here.
            await self._end_unrun(line, exc.status_for("openai"), exc.openai_body())
        except Exception:
            log.exception("queued line %s:%d failed", line.job_id, line.line_no)
            await self._end_unrun(line, 500, ServelmError(INTERNAL).openai_body())

    def _record(self, line: Line, tx: Tx, call: Call, body: dict[str, Any]) -> None:
        if self._closing and call.status != "ok":
            # Cut short by our own shutdown: not the line's ending.
            raise holds.Superseded(release=line.kind != "async")
        charged = call.settlement.charged if call.settlement is not None else 0
        if call.status == "ok":
            queue.record_line(tx, line, self.owner, 200, body, charged)
            return
        exc = call.error or ServelmError("The generation was stopped before it finished.")
        status = exc.status_for("openai")
        queue.record_line(tx, line, self.owner, status, exc.openai_body(), charged)

    async def _end_unrun(self, line: Line, status: int, body: dict[str, Any]) -> None:
        try:
            if line.kind == "async":
                await self.billing.settle(
                    line.hold_id,
                    charge=0,
                    prompt_tokens=0,
                    completion_tokens=0,
                    status="error",
                    latency_ms=0,
                    record=lambda tx, _s: queue.record_line(tx, line, self.owner, status, body, 0),
                )
            else:
                await self.billing.run(queue.fail_line, self.db, line, self.owner, status, body)
        except holds.Superseded:
            log.info("line %s:%d was taken over by another runner", line.job_id, line.line_no)

    # -- leases, stragglers, expiry, metrics -------------------------------------------

    async def _housekeeping(self) -> None:
        period = max(0.2, min(self.lease.total_seconds() / 3, 5.0))
        rounds = 0
        while True:
            await asyncio.sleep(period)
            try:
                await self.billing.run(
                    queue.renew, self.db, self.owner, sorted(self._running), self.lease
                )
                for job_id in await self.billing.run(queue.unfinished, self.db):
                    if await self.billing.run(queue.finalize, self.db, job_id):
                        self._webhooks_due.set()
                if rounds % 12 == 0:
                    await self._expire()
                depth, age = await self.billing.run(store.queue_stats, self.db)
                if self.metrics is not None:
                    self.metrics.jobs_queued.set(depth)
                    self.metrics.jobs_oldest.set(age)
            except Exception:
                # A database hiccup must not end the loop; the next round retries.
                log.exception("job housekeeping failed")
            rounds += 1

    async def _expire(self) -> None:
        for job_id in await self.billing.run(queue.expire_and_purge, self.db, self.retention):
            # An async request that never ran in its window: its hold is released
            # (unless it started meanwhile: then its runner settles it).
            await self.billing.settle(
                job_id,
                charge=0,
                prompt_tokens=0,
                completion_tokens=0,
                status="expired",
                latency_ms=0,
                record=functools.partial(_expire_record, job_id),
            )
            await self.billing.run(queue.finalize, self.db, job_id)

    # -- webhooks ------------------------------------------------------------------------

    async def _webhooks(self) -> None:
        while True:
            self._webhooks_due.clear()
            try:
                due = await self.billing.run(queue.due_webhooks, self.db, timedelta(minutes=5))
                await asyncio.gather(*(self._deliver(job) for job in due))
            except Exception:
                log.exception("webhook round failed")
            # Woken by an ending or a retry's time, else look again after the poll.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._webhooks_due.wait(), self.poll)

    async def _deliver(self, job: dict[str, Any]) -> None:
        error = await self.sender.deliver(job, views.event(job))
        if error is None:
            await self.billing.run(queue.webhook_sent, self.db, job["id"])
            return
        retry_at = self.sender.retry_at(job["webhook_attempts"])
        log.warning("webhook for %s failed (%s)", job["id"], error)
        await self.billing.run(queue.webhook_failed, self.db, job["id"], error, retry_at)
        if retry_at is not None:
            delay = (retry_at - utcnow()).total_seconds()
            asyncio.get_running_loop().call_later(max(0.0, delay), self._webhooks_due.set)


def _expire_record(job_id: str, tx: Tx, _settlement: holds.Settlement) -> None:
    queue.expire_async(tx, job_id)
