"""Which replica a request tries first, and where it fails over to.

A router orders the healthy replicas; the engine tries them in that order, so the
same ordering is both the routing decision and the failover path.

- ``round_robin``: each request starts one replica further along.
- ``least_load``: fewest requests in flight (the gateway's own count) plus the
  engine's reported queue, per unit of weight; ties broken round-robin.
- ``prefix``: rendezvous (highest-random-weight) hashing of the prompt's leading
  block, the messages up to and including the first user turn (system prompt and
  opening question), so every turn of a conversation, and every conversation opening
  the same way, goes where that prefix is most likely still in the KV cache. The
  hash depends only on the prompt and the replica URLs: every gateway, on every host,
  picks the same replica without talking to the others. When a replica joins or
  leaves, only the prefixes it wins (or won) move; the rest stay put. A load bound
  keeps affinity from piling work on one replica: a replica carrying more than
  ``GUARD_REL`` times the least-loaded one's load plus ``GUARD_ABS`` is passed over
  for the next one in the prompt's ranking (rendezvous hashing with bounded loads;
  Ray Serve's and SGLang's routers likewise give up affinity under imbalance).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from typing import Any, Protocol

from servelm.fleet.replicas import Replica
from servelm.fleet.spec import Routing

# Hashing the first this-many bytes of the leading block is plenty to tell prompts
# apart, and bounds the cost for a huge system prompt.
PREFIX_BYTES = 64 * 1024
# A replica is passed over while its load exceeds min_load * GUARD_REL + GUARD_ABS.
# Measured on two 4-slot workers (docs/benchmarks.md): a looser bound (2x + 4) let
# four conversations that hashed to one replica all stay there while the other idled.
GUARD_REL = 1.5
GUARD_ABS = 2.0


class Router(Protocol):
    def order(self, replicas: list[Replica], body: dict[str, Any]) -> list[Replica]: ...


class RoundRobin:
    def __init__(self) -> None:
        self._next = itertools.count()

    def order(self, replicas: list[Replica], body: dict[str, Any]) -> list[Replica]:
        if not replicas:
            return []
        start = next(self._next) % len(replicas)
        return replicas[start:] + replicas[:start]


class LeastLoad:
    def __init__(self) -> None:
        self._rotate = RoundRobin()

    def order(self, replicas: list[Replica], body: dict[str, Any]) -> list[Replica]:
        # Sorting is stable: the rotation decides among equally loaded replicas, so
        # an idle fleet still spreads its requests.
        return sorted(self._rotate.order(replicas, body), key=lambda r: r.load)


class PrefixAffinity:
    def __init__(self, guard_rel: float = GUARD_REL, guard_abs: float = GUARD_ABS) -> None:
        self.guard_rel = guard_rel
        self.guard_abs = guard_abs

    def order(self, replicas: list[Replica], body: dict[str, Any]) -> list[Replica]:
        if len(replicas) < 2:
            return list(replicas)
        key = prefix_key(body)
        ranked = sorted(replicas, key=lambda r: hrw_score(key, r.url, r.weight), reverse=True)
        # Bounded load: the first replica in the prompt's own ranking whose load is
        # within the bound. The least-loaded one always is, so one is found, and a
        # conversation pushed off its first choice lands on the same second choice
        # every time (from every gateway), where its prefix is cached too.
        bound = min(r.load for r in replicas) * self.guard_rel + self.guard_abs
        first = next(i for i, r in enumerate(ranked) if r.load <= bound)
        return [ranked[first], *ranked[:first], *ranked[first + 1 :]]


def make_router(kind: Routing) -> Router:
    if kind == "round_robin":
        return RoundRobin()
    if kind == "least_load":
        return LeastLoad()
    return PrefixAffinity()


def prefix_key(body: dict[str, Any]) -> bytes:
    """A digest of the conversation's leading block: every message up to and including
    the first user turn, serialised canonically."""
    lead: list[Any] = []
    for message in body.get("messages") or ():
        lead.append([message.get("role"), message.get("content")])
        if message.get("role") == "user":
            break
    text = json.dumps(lead, separators=(",", ":"), ensure_ascii=False).encode()
    return hashlib.blake2b(text[:PREFIX_BYTES], digest_size=16).digest()


def hrw_score(key: bytes, node: str, weight: float = 1.0) -> float:
    """Weighted rendezvous score: the replica with the highest score wins the key.
    ``-weight / ln(u)`` with u uniform in (0, 1) gives each replica a share of keys
    proportional to its weight (Schindelhauer and Schomaker)."""
    digest = hashlib.blake2b(key + node.encode(), digest_size=8).digest()
    u = (int.from_bytes(digest, "big") + 1) / (2**64 + 1)
    return -weight / math.log(u)
