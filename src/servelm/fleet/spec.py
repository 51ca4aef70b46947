"""Replicas and routing as the models file states them.

An ``engine = "openai"`` entry names its replicas either as bare URLs or as tables
with their own key and weight::

    replicas = ["http://10.0.0.5:8000/v1", {url = "http://10.0.0.6:8000/v1", slots = 64}]
    routing = "prefix"        # or "least_load", "round_robin"
    health_interval = 5.0     # seconds between active probes

``base_url`` (with ``api_key``) stays the one-replica form.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from servelm.catalog.specs import ModelSpec

Routing = Literal["prefix", "least_load", "round_robin"]


class ReplicaSpec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    url: str
    api_key: str | None = None
    # Share of the traffic relative to the others (a GPU node next to a CPU one).
    weight: float = Field(default=1.0, gt=0)
    # Requests it runs at once, where it does not say so itself (vLLM: its
    # --max-num-seqs). servelm workers and llama.cpp servers report theirs.
    slots: int | None = Field(default=None, gt=0)


def coerce_replicas(value: object) -> object:
    """Bare URL strings are replicas without their own key or weight."""
    if isinstance(value, list | tuple):
        return tuple({"url": v} if isinstance(v, str) else v for v in value)
    return value


def replica_specs(spec: ModelSpec) -> list[ReplicaSpec]:
    """The replicas of a remote model: its ``replicas``, or its ``base_url`` alone. A
    replica without its own key uses the entry's ``api_key``."""
    if spec.replicas:
        return [
            r if r.api_key or not spec.api_key else r.model_copy(update={"api_key": spec.api_key})
            for r in spec.replicas
        ]
    assert spec.base_url, "a remote model needs base_url or replicas"
    return [ReplicaSpec(url=spec.base_url, api_key=spec.api_key)]
