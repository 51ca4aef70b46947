"""Signed webhooks: a job's ending, POSTed to its ``webhook_url``.

The scheme is Standard Webhooks' (the one Svix, and in spirit Stripe, use): headers
``webhook-id`` (the delivery's id, the same on every retry), ``webhook-timestamp``
(Unix seconds) and ``webhook-signature``: ``v1,`` then the base64 HMAC-SHA256 of
``{webhook-id}.{webhook-timestamp}.{body}`` under the account's secret, which a key
reads at ``GET /v2/webhook-secret`` (``whsec_`` + base64). A receiver recomputes it,
compares in constant time and rejects old timestamps (replays).

Each account's secret is derived from the server's secret (the console's
``SERVELM_SESSION_SECRET``, or the file in the data dir), so every gateway sharing it
signs alike without a table of secrets.

A delivery that fails (no answer, or not 2xx) is tried again after
``webhook_retry_seconds``, doubling each time, up to ``webhook_max_attempts``. The URL
passes the same address checks as image URLs (``media.ImageLoader.checked_request``):
refused at submission when it points at a private address, and checked again at each
delivery, since DNS may change in between. Redirects are not followed.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import time
from datetime import timedelta
from typing import Any

import httpx

from servelm.billing.clock import utcnow
from servelm.chat.media import ImageLoader
from servelm.errors import InvalidRequest

log = logging.getLogger(__name__)

MAX_URL = 2048


def account_secret(server_secret: bytes, account_id: int) -> bytes:
    label = f"webhook-signing:{account_id}".encode()
    return hmac.new(server_secret, label, hashlib.sha256).digest()


def secret_text(secret: bytes) -> str:
    """The secret as a receiver configures it (Standard Webhooks' ``whsec_`` form)."""
    return "whsec_" + base64.b64encode(secret).decode()


def sign(secret: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    signed = f"{msg_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret, signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def verify(secret_or_text: bytes | str, headers: dict[str, str], body: bytes) -> bool:
    """A receiver's check (used by the tests and shown in the README)."""
    secret = secret_or_text
    if isinstance(secret, str):
        secret = base64.b64decode(secret.removeprefix("whsec_"))
    expected = sign(secret, headers["webhook-id"], int(headers["webhook-timestamp"]), body)
    offered = headers.get("webhook-signature", "").split()
    return any(hmac.compare_digest(expected, s) for s in offered)


async def check_url(loader: ImageLoader, url: str | None) -> str | None:
    """A submitted ``webhook_url``, refused (400) unless it is http(s) to a public
    address (or one the operator allowed)."""
    if url is None:
        return None
    if not isinstance(url, str) or not url or len(url) > MAX_URL:
        raise InvalidRequest(
            f"webhook_url must be a URL of at most {MAX_URL} characters.", param="webhook_url"
        )
    try:
        await loader.checked_request(url, method="POST", what="webhook")
    except InvalidRequest as exc:
        raise InvalidRequest(exc.message, param="webhook_url") from None
    return url


class Sender:
    """Delivers one job's webhook; the queue's runner calls it for each due job."""

    def __init__(
        self, loader: ImageLoader, server_secret: bytes, retry: float, max_attempts: int
    ) -> None:
        self.loader = loader
        self.server_secret = server_secret
        self.retry = retry
        self.max_attempts = max_attempts

    async def deliver(self, job: dict[str, Any], payload: dict[str, Any]) -> str | None:
        """None when the receiver took it, else why not."""
        body = json.dumps(payload, separators=(",", ":")).encode()
        msg_id = f"msg_{job['id']}"
        ts = int(time.time())
        secret = account_secret(self.server_secret, job["account_id"])
        headers = {
            "content-type": "application/json",
            "webhook-id": msg_id,
            "webhook-timestamp": str(ts),
            "webhook-signature": sign(secret, msg_id, ts, body),
        }
        try:
            _, request = await self.loader.checked_request(
                job["webhook_url"], method="POST", what="webhook", content=body, headers=headers
            )
            response = await self.loader.client().send(request)
        except InvalidRequest as exc:
            return exc.message
        except httpx.HTTPError as exc:
            return f"{type(exc).__name__}: {exc}"
        if 200 <= response.status_code < 300:
            return None
        return f"HTTP {response.status_code}"

    def retry_at(self, attempts_before: int) -> Any:
        """When to try again after the failure of attempt ``attempts_before + 1``;
        None when that was the last."""
        if attempts_before + 1 >= self.max_attempts:
            return None
        return utcnow() + timedelta(seconds=self.retry * 2**attempts_before)
