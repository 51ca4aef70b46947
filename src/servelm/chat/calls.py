"""What the walk passes around: the exchange the HTTP layer hands in, the replies it
gets back, and one call's state from preparation to settlement. The money rules that
read that state are in ``charging.py``."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Literal

from servelm.billing.holds import Record, Settlement
from servelm.catalog.specs import ModelSpec
from servelm.chat.protocol import ChatRequest
from servelm.engines.registry import is_local
from servelm.errors import InvalidRequest, ServelmError

if TYPE_CHECKING:
    from servelm.access.limits import Reservation
    from servelm.engines.base import Engine
    from servelm.engines.pool import Lease

log = logging.getLogger(__name__)


@dataclass
class Relayed:
    """What the client was sent, and what the engine said of it as it went: the facts
    ``settle_usage`` checks the engine's counts against."""

    chunks: int = 0  # chunks with content or tool calls: one token each, as engines stream
    content_chunks: int = 0
    whole_bytes: int = 0  # text of whole answers (``WHOLE_ANSWER``), not one token a chunk
    # Bytes of everything sent (content, tool calls as JSON): no token decodes to
    # less than one byte, so with the ending token this bounds the completion.
    bytes: int = 0
    text: list[str] = field(default_factory=list)  # the content, in order
    tool_calls: bool = False
    # The engine's latest counts (any chunk's ``usage``) and how many chunks had been
    # relayed when they came: a stream cut after them pays those plus what followed.
    prompt: int | None = None
    completion: int | None = None
    chunks_at_report: int = 0
    settled: bool = False  # ``settle_usage`` ran


@dataclass(frozen=True)
class ChatExchange:
    """What the HTTP layer knows of a chat request before the walk starts."""

    request_id: str
    # Reads (and size-checks) the body; called after the key is checked, so an
    # unauthenticated client never gets a body read.
    read_body: Callable[[], Awaitable[bytes]]
    slug: str | None = None  # from the path, on the Segmind route
    api_key: str | None = None  # x-api-key
    authorization: str | None = None
    idempotency_key: str | None = None
    # A web console session (the playground's): its API key id and session id, the
    # signature, expiry and CSRF token checked by the HTTP layer, whether it is still
    # live by the walk; used only when the request carries no key.
    session: tuple[str, str] | None = None
    # "responses": the body is a Responses API request, answered in its shapes.
    api: Literal["chat", "responses"] = "chat"


@dataclass(frozen=True)
class JsonReply:
    status: int
    body: dict[str, Any]
    headers: dict[str, str]


@dataclass
class StreamReply:
    """Headers to send now, then ``first`` and ``rest`` as SSE. The first chunk was
    already produced, so errors the engine reports up front were still a proper status.
    Whoever takes it must ``aclose()`` it, sent or not: that settles the request."""

    headers: dict[str, str]
    first: dict[str, Any]
    rest: AsyncGenerator[dict[str, Any]]
    # The generator ``rest`` reshapes (the Responses API's events), closed with it:
    # closing a generator that never started runs none of its code.
    inner: AsyncGenerator[dict[str, Any]] | None = None

    async def aclose(self) -> None:
        try:
            await self.rest.aclose()
        finally:
            if self.inner is not None:
                await self.inner.aclose()


@dataclass
class Call:
    """One chat request's state from preparation to settlement."""

    request_id: str
    spec: ModelSpec
    engine: Engine
    request: ChatRequest
    body: dict[str, Any]
    prompt_tokens: int
    max_tokens: int
    # False when prompt_tokens is only an upper bound: a remote engine's, or one whose
    # count was skipped (``prompt_count`` bound or auto); the engine's usage settles it.
    prompt_exact: bool = True
    # The bound stands in for a count the engine can still make (``prompt_count =
    # "auto"``): counted before the hold where the bound would decide something.
    count_deferred: bool = False
    # Balance right after the hold (what a stream's headers can say), and the
    # settlement once done.
    held_balance: int | None = None
    settlement: Settlement | None = None
    # The request's place in its rate-limit windows, settled with the credits.
    limit: Reservation | None = None
    # (account, model) while the request holds one of its account's share of the
    # model's slots (engines.base.SlotShares).
    share: tuple[int, str] | None = None
    share_size: int = 0
    # The model's hold (``engines.pool``): released after settlement, so a model is
    # never unloaded under a generation.
    lease: Lease | None = None
    status: str = "ok"
    completion_id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))
    started: float = field(default_factory=time.perf_counter)
    # What actually happened, filled in while generating.
    completion_tokens: int = 0
    last_token: float | None = None  # when the last token arrived (perf_counter)
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    relayed: Relayed = field(default_factory=Relayed)
    error: ServelmError | None = None  # what ended the generation, if it failed
    # Queued work (servelm.jobs): a hold that outlives this process (an async
    # request's), and rows that commit in the settlement's own transaction.
    hold_ttl: timedelta | None = None
    record: Record | None = None


def no_images_message(spec: ModelSpec, seeing: list[str]) -> str:
    """The 400 for images sent to a text-only entry: what the API user can do about
    it (send text, or use a model here that sees). How the operator would make this
    one see is not theirs to act on: that goes to the log (``no_images_hint``)."""
    others = (
        f"models on this server that take images: {', '.join(seeing)}"
        if seeing
        else "no model on this server takes images"
    )
    return f"Model '{spec.slug}' takes no images, only text; send text only ({others})."


def no_images_hint(spec: ModelSpec) -> str:
    """For the operator's log: what would let this entry see images."""
    if not is_local(spec):
        return "if its upstream model sees images, set `vision = true` on its entry"
    return (
        "a llama.cpp model sees through a multimodal projector made for its weights: "
        f'add `mmproj = "/path/to/mmproj.gguf"` to [models."{spec.slug}"] in the models '
        "file (Mixtral has no published projector; serve a vision model for images)"
    )


def check_capabilities(
    request: ChatRequest, spec: ModelSpec, seeing: Callable[[], list[str]], told: set[str]
) -> None:
    """Images, tools and structured output only to a model that takes them. The user
    learns which models here see images; the operator, in the log (once per model),
    what would make this one see."""
    if request.has_images() and not spec.vision:
        if spec.slug not in told:
            told.add(spec.slug)
            log.warning(
                "model %s was sent images and takes none; %s", spec.slug, no_images_hint(spec)
            )
        raise InvalidRequest(no_images_message(spec, seeing()), param="messages")
    if request.tools and not spec.tools:
        raise InvalidRequest(f"Model '{spec.slug}' does not support tools.", param="tools")
    fmt = request.response_format
    if fmt is not None and fmt.type != "text" and not spec.structured_output:
        raise InvalidRequest(
            f"Model '{spec.slug}' does not support structured output ({fmt.type}).",
            param="response_format",
        )
