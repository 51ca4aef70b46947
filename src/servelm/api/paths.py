"""Which path is which: the one place that decides what a ``/v1/...`` path means.

``POST /v1/{model}`` is Segmind's chat route, but ``/v1/<one segment>`` is also where
OpenAI and servelm keep their own paths. Routing, error envelopes, ``/v1/models``
and the metrics labels all ask here, so they can never disagree.
"""

from __future__ import annotations

from typing import Literal

Dialect = Literal["segmind", "openai"]

OPENAI_CHAT = "/v1/chat/completions"
OPENAI_RESPONSES = "/v1/responses"

# servelm's own paths under /v1/ (OpenAI-style or account routes): never a model slug.
ACCOUNT_PATHS = frozenset({"credits", "usage", "get-user-credits"})
# OpenAI's Batch API (servelm.jobs).
BATCH_PATHS = frozenset({"files", "batches"})
OWN_SEGMENTS = frozenset({"models", "chat", "responses", *ACCOUNT_PATHS, *BATCH_PATHS})

# OpenAI's API paths that servelm does not serve: a 404 in OpenAI's envelope saying
# so, instead of a Segmind call to a model named "embeddings" (issue: the SDKs then
# raise confusing errors). The first segment after /v1/ is enough to tell.
UNSUPPORTED_OPENAI = frozenset(
    {
        "assistants",
        "audio",
        "completions",
        "containers",
        "conversations",
        "embeddings",
        "evals",
        "fine_tuning",
        "images",
        "moderations",
        "organization",
        "realtime",
        "threads",
        "uploads",
        "vector_stores",
        "videos",
    }
)


def _segments(path: str) -> list[str]:
    return [s for s in path.split("/") if s]


def segmind_slug(path: str) -> str | None:
    """The model slug when ``path`` is a Segmind chat route (``/v1/<slug>``), else None."""
    parts = _segments(path)
    if len(parts) == 2 and parts[0] == "v1" and not is_reserved(parts[1]):
        return parts[1]
    return None


def is_reserved(segment: str) -> bool:
    """Whether ``/v1/<segment>`` belongs to OpenAI or servelm rather than a model."""
    return segment in OWN_SEGMENTS or segment in UNSUPPORTED_OPENAI


def unsupported_openai(path: str) -> bool:
    """An OpenAI endpoint that servelm does not implement."""
    parts = _segments(path)
    return len(parts) >= 2 and parts[0] == "v1" and parts[1] in UNSUPPORTED_OPENAI


def dialect_for_path(path: str) -> Dialect:
    """The error envelope a path answers in: Segmind's under ``/v1/<slug>`` (however
    many segments follow, a slug with a slash included), OpenAI's everywhere else."""
    parts = _segments(path)
    if len(parts) >= 2 and parts[0] == "v1" and not is_reserved(parts[1]):
        return "segmind"
    if parts and parts[0] == "v2":  # Segmind's async API
        return "segmind"
    return "openai"


def route_family(path: str) -> str:
    """A low-cardinality label for metrics and logs."""
    parts = _segments(path)
    if path.rstrip("/") == OPENAI_CHAT:
        return "openai_chat"
    if path.rstrip("/") == OPENAI_RESPONSES:
        return "openai_responses"
    if len(parts) >= 2 and parts[0] == "v1":
        if parts[1] == "models":
            return "models"
        if parts[1] in ACCOUNT_PATHS:
            return "account"
        if parts[1] in BATCH_PATHS:
            return "batches"
        if not is_reserved(parts[1]):
            return "segmind_chat"
    if parts and parts[0] == "v2":
        return "async"
    if parts and parts[0] == "admin":
        return "admin"
    return "other"
