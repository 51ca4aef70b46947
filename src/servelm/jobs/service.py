"""``Jobs``: the two doors to the queue, as the HTTP routers use them.

Segmind's async door (``/v2``): a request is submitted through the first half of
the chat walk (``walk.submit``: checked, counted and held while the client waits),
then queued as a job of one line. OpenAI's batch door (``/v1/files``,
``/v1/batches``): an uploaded JSONL is checked line by line for its envelope
(``custom_id``, ``method``, ``url``, ``body``); a line whose body is bad is not
refused here but ends in the error file with its ``custom_id``, as at OpenAI.

Money for batches: each line holds its own worst case when it starts, at the
model's batch prices (``batch_discount``), and settles with its output row. A batch
therefore never spends more than the balance (a line that cannot be held fails
with ``insufficient_quota`` in the error file), and a cancelled batch's unstarted
lines never held anything, so nothing needs giving back.
"""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

from servelm.access.keys import Principal
from servelm.billing.clock import utcnow
from servelm.billing.service import Billing
from servelm.chat.calls import ChatExchange
from servelm.chat.media import ImageLoader
from servelm.chat.serving import ChatService
from servelm.errors import InvalidRequest, NotFound, PayloadTooLarge
from servelm.jobs import queue, store, views, walk, webhooks
from servelm.jobs.runner import Runner

CHAT_URL = "/v1/chat/completions"
MAX_FILE_BYTES = 64 * 1024 * 1024
MAX_LINES = 50_000
MAX_CUSTOM_ID = 512
WINDOW = timedelta(hours=24)
# An async request's hold outlives its window by this much: the queue's expiry
# releases it first, the hold sweeper only if no gateway runs for that long.
HOLD_MARGIN = timedelta(hours=1)


class Jobs:
    def __init__(
        self,
        chat: ChatService,
        billing: Billing,
        runner: Runner,
        webhook_loader: ImageLoader,
        server_secret: bytes,
        retention: timedelta,
    ) -> None:
        self.chat = chat
        self.billing = billing
        self.db = billing.db
        self.runner = runner
        self.webhook_loader = webhook_loader
        self.server_secret = server_secret
        self.retention = retention

    # -- Segmind async -------------------------------------------------------------------

    async def submit(self, ex: ChatExchange, base_url: str) -> dict[str, Any]:
        """``POST /v2/{slug}``: held now (406 when it cannot be), run later."""
        hook: list[str | None] = [None]
        read = ex.read_body

        async def read_body() -> bytes:
            # ``webhook_url`` rides in the body, beside the chat fields; the chat
            # walk never sees it.
            raw = await read()
            try:
                data = json.loads(raw)
            except ValueError:
                return raw  # the walk's parser says what is wrong with it
            if isinstance(data, dict) and "webhook_url" in data:
                hook[0] = await webhooks.check_url(self.webhook_loader, data.pop("webhook_url"))
                return json.dumps(data).encode()
            return raw

        job_id = store.new_id("req")
        exchange = ChatExchange(
            request_id=job_id,
            read_body=read_body,
            slug=ex.slug,
            api_key=ex.api_key,
            authorization=ex.authorization,
        )
        principal, call, raw = await walk.submit(self.chat, exchange, WINDOW + HOLD_MARGIN)
        try:
            await self.billing.run(
                store.create_job,
                self.db,
                job_id=job_id,
                kind="async",
                account_id=principal.account_id,
                key_id=principal.key_pk,
                key_public=principal.key_id,
                model=call.spec.slug,
                lines=[(None, raw.decode())],
                expires_at=utcnow() + WINDOW,
                webhook_url=hook[0],
                extra={"base_url": base_url},
                held_max_tokens=call.max_tokens,
            )
        except BaseException:
            await self.billing.settle(
                job_id, charge=0, prompt_tokens=0, completion_tokens=0, status="error", latency_ms=0
            )
            raise
        self.runner.wake()
        # As submitted: a runner may have taken it already, which the status URL says.
        return views.async_links({"id": job_id, "status": "queued"}, base_url)

    async def request_status(self, principal: Principal, job_id: str) -> dict[str, Any]:
        return views.async_status(await self._async_job(principal, job_id))

    async def request_result(
        self, principal: Principal, job_id: str
    ) -> tuple[int, dict[str, Any] | None, dict[str, Any]]:
        """(status code, the answer or its error, the status) of an async request."""
        job = await self._async_job(principal, job_id)
        if job["status"] not in ("completed", "failed", "expired", "cancelled"):
            return 202, None, views.async_status(job)
        line = await self.billing.run(store.first_line, self.db, job_id)
        # A cancelled request's answer is gone for good (its line's 499 is the log's).
        code = 410 if job["status"] == "cancelled" else int(line["status_code"] or 500)
        return code, json.loads(line["result"]), views.async_status(job)

    async def cancel_request(self, principal: Principal, job_id: str) -> dict[str, Any]:
        """The owner's cancel of an async request that has not started (409 after)."""
        try:
            job = await self.billing.run(
                queue.cancel_async_request, self.db, job_id, principal.account_id
            )
        except NotFound:
            raise NotFound(f"No request {job_id}.") from None
        return views.async_status(job)

    async def _async_job(self, principal: Principal, job_id: str) -> dict[str, Any]:
        try:
            job = await self.billing.run(store.get_job, self.db, job_id, principal.account_id)
        except NotFound:
            raise NotFound(f"No request {job_id}.") from None
        if job["kind"] != "async":
            raise NotFound(f"No request {job_id}.")
        return job

    # -- OpenAI files --------------------------------------------------------------------

    async def upload(
        self, principal: Principal, filename: str, purpose: str, content: bytes
    ) -> dict[str, Any]:
        if purpose != "batch":
            raise InvalidRequest(
                f"purpose must be 'batch' (the only file servelm keeps), not '{purpose}'.",
                param="purpose",
            )
        if len(content) > MAX_FILE_BYTES:
            raise PayloadTooLarge(f"The file is larger than {MAX_FILE_BYTES} bytes.")
        try:
            text = content.decode()
        except UnicodeDecodeError:
            raise InvalidRequest("The file must be UTF-8 JSONL.", param="file") from None
        row = await self.billing.run(
            store.add_file,
            self.db,
            account_id=principal.account_id,
            filename=filename[:MAX_CUSTOM_ID] or "upload.jsonl",
            content=text,
            retention=self.retention,
        )
        return views.file_object(row)

    async def file(self, principal: Principal, file_id: str) -> dict[str, Any]:
        return views.file_object(
            await self.billing.run(store.get_file, self.db, principal.account_id, file_id)
        )

    async def file_content(self, principal: Principal, file_id: str) -> bytes:
        row = await self.billing.run(store.get_file, self.db, principal.account_id, file_id)
        if row["content"] is not None:
            return str(row["content"]).encode()
        errors = row["purpose"] == "batch_error"
        lines = await self.billing.run(store.result_lines, self.db, row["job_id"], errors=errors)
        out = "".join(
            json.dumps(views.result_line(r), ensure_ascii=False, separators=(",", ":")) + "\n"
            for r in lines
        )
        return out.encode()

    # -- OpenAI batches ------------------------------------------------------------------

    async def create_batch(self, principal: Principal, data: Any) -> dict[str, Any]:
        if not isinstance(data, dict):
            raise InvalidRequest("The request body must be a JSON object.")
        endpoint = data.get("endpoint")
        if endpoint != CHAT_URL:
            raise InvalidRequest(
                f"endpoint must be '{CHAT_URL}' (the only one batches run).", param="endpoint"
            )
        if data.get("completion_window") != "24h":
            raise InvalidRequest("completion_window must be '24h'.", param="completion_window")
        metadata = data.get("metadata")
        if metadata is not None and not (
            isinstance(metadata, dict)
            and len(metadata) <= 16
            and all(isinstance(v, str) and len(v) <= 512 for v in metadata.values())
        ):
            raise InvalidRequest(
                "metadata must be an object of at most 16 string values.", param="metadata"
            )
        file_id = data.get("input_file_id")
        if not isinstance(file_id, str):
            raise InvalidRequest("input_file_id is required.", param="input_file_id")
        hook = await webhooks.check_url(self.webhook_loader, data.get("webhook_url"))
        row = await self.billing.run(store.get_file, self.db, principal.account_id, file_id)
        if row["purpose"] != "batch" or row["content"] is None:
            raise InvalidRequest(
                f"File {file_id} is not a batch input file.", param="input_file_id"
            )
        lines = parse_lines(str(row["content"]))
        job_id = store.new_id("batch")
        await self.billing.run(
            store.create_job,
            self.db,
            job_id=job_id,
            kind="batch",
            account_id=principal.account_id,
            key_id=principal.key_pk,
            key_public=principal.key_id,
            model=None,
            lines=lines,
            expires_at=utcnow() + WINDOW,
            webhook_url=hook,
            input_file_id=file_id,
            extra={"endpoint": endpoint, "completion_window": "24h", "metadata": metadata},
        )
        self.runner.wake()
        return await self.batch(principal, job_id)

    async def batch(self, principal: Principal, batch_id: str) -> dict[str, Any]:
        job = await self.billing.run(store.get_job, self.db, batch_id, principal.account_id)
        if job["kind"] != "batch":
            raise NotFound(f"No batch {batch_id}.")
        return views.batch_object(job)

    async def batches(self, principal: Principal, after: str | None, limit: int) -> dict[str, Any]:
        rows = await self.billing.run(
            store.list_jobs,
            self.db,
            account_id=principal.account_id,
            kind="batch",
            after=after,
            limit=limit + 1,
        )
        data = [views.batch_object(r) for r in rows[:limit]]
        return {
            "object": "list",
            "data": data,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
            "has_more": len(rows) > limit,
        }

    async def cancel(self, principal: Principal, batch_id: str) -> dict[str, Any]:
        job = await self.billing.run(queue.cancel_batch, self.db, batch_id, principal.account_id)
        return views.batch_object(job)

    def webhook_secret(self, principal: Principal) -> str:
        return webhooks.secret_text(
            webhooks.account_secret(self.server_secret, principal.account_id)
        )


def parse_lines(content: str) -> list[tuple[str | None, str]]:
    """``(custom_id, body)`` per line; 400 naming the first line whose envelope is
    wrong. The bodies are checked when each line runs (bad ones: the error file)."""
    lines: list[tuple[str | None, str]] = []
    seen: set[str] = set()
    for n, text in enumerate(content.splitlines(), start=1):
        if not text.strip():
            continue
        try:
            item = json.loads(text)
        except ValueError:
            raise InvalidRequest(f"Line {n} of the input file is not JSON.") from None
        if not isinstance(item, dict):
            raise InvalidRequest(f"Line {n} of the input file is not a JSON object.")
        custom_id = item.get("custom_id")
        if not isinstance(custom_id, str) or not 0 < len(custom_id) <= MAX_CUSTOM_ID:
            raise InvalidRequest(f"Line {n}: custom_id must be a string (1-512 characters).")
        if custom_id in seen:
            raise InvalidRequest(f"Line {n}: custom_id '{custom_id}' is used twice.")
        seen.add(custom_id)
        if item.get("method", "POST") != "POST" or item.get("url") != CHAT_URL:
            raise InvalidRequest(f"Line {n}: method must be POST and url '{CHAT_URL}'.")
        if not isinstance(item.get("body"), dict):
            raise InvalidRequest(f"Line {n}: body must be a JSON object.")
        lines.append((custom_id, json.dumps(item["body"], ensure_ascii=False)))
        if len(lines) > MAX_LINES:
            raise InvalidRequest(f"The input file has more than {MAX_LINES} lines.")
    if not lines:
        raise InvalidRequest("The input file has no requests.", param="input_file_id")
    return lines
