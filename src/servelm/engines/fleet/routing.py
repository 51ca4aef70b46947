"""Which replica a request tries first, and where it fails over to.

A router orders the healthy replicas; the engine tries them in that order, so the
same ordering is both the routing decision and the failover path.

- ``round_robin``: each request starts one replica further along.
- ``least_load``: the lowest load, ties broken round-robin.
- ``prefix``: rendezvous (highest-random-weight) hashing of the prompt's leading
  block, the messages up to and including the first user turn (system prompt and
  opening question), so every turn of a conversation, and every conversation opening
  the same way, goes where that prefix is most likely still in the KV cache. The
  hash depends only on the prompt and the replica URLs: every gateway, on every host,
  picks the same replica without talking to the others. When a replica joins or
  leaves, only the prefixes it wins (or won) move; the rest stay put. A load bound
  keeps affinity from piling work on one replica (``within_bound``): a replica past
  it is passed over for the next one in the prompt's ranking. A conversation that the
  bound moved stays where it went (``PrefixAffinity`` remembers, per gateway, where
  each prefix was last sent): its KV cache is there now, and its first choice has
  since given its slot to another conversation. Without the memory a conversation
  displaced once bounced between its two choices, missing the cache on both.

Load is requests per unit of capacity: requests on the replica (``Replica.busy``:
ours in flight plus other gateways' as the engine last reported) over its slots
where every replica's slot count is known (reported or declared), else over its
weight. Counting requests alone made a 1-slot replica with two requests (one of them
queued) look no busier than a 4-slot one with two running (docs/benchmarks.md).

The bound, with slot counts known: a replica keeps affinity while its load is at
most ``GUARD_REL`` times the least-loaded one's plus ``GUARD_ABS_SLOTS`` (half its
slots), and, while any replica has a free slot, only if it has one too. A request
queued on a full replica waits there for a whole answer to finish, where a free slot
elsewhere starts it now at the cost of one prefill; and a replica with free slots
but several prefills running next to an idle one is slower than the idle one, since
its slots share its compute (a measured skew run put all four conversations on a
4-slot worker beside an idle one under the free-slot rule alone). Without slot
counts, where "full" cannot be told: at most ``GUARD_REL`` times the least load plus
``GUARD_ABS``. SGLang's cache-aware router and Ray Serve's PrefixCacheAffinityRouter
likewise keep prefix affinity only while load is balanced, and fall back to the
least loaded otherwise; here the fallback is the prompt's next replica in its own
ranking, so a conversation pushed off its first choice lands on the same second
choice every time, from every gateway.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from collections import OrderedDict
from typing import Any, Protocol

from servelm.catalog.specs import Routing
from servelm.engines.fleet.replicas import Replica

# Hashing the first this-many bytes of the leading block is plenty to tell prompts
# apart, and bounds the cost for a huge system prompt.
PREFIX_BYTES = 64 * 1024
# See the module's docstring. Measured on two 4-slot workers (docs/benchmarks.md): a
# looser bound (2x + 4) let four conversations that hashed to one replica all stay
# there while the other idled.
GUARD_REL = 1.5
GUARD_ABS = 2.0  # requests per unit of weight, where capacities are weights
GUARD_ABS_SLOTS = 0.5  # requests per slot, where capacities are slots
# Prefixes whose last replica a gateway remembers (32 bytes of key and a reference
# each, least recently sent forgotten first): far more conversations than any fleet
# keeps in its caches at once.
REMEMBERED_PREFIXES = 65_536


def capacities(replicas: list[Replica]) -> list[float]:
    """Each replica's capacity: its slots where all of them say, else its weight. A
    mix of the two would compare slots with shares."""
    slots = [r.slots for r in replicas]
    if all(slots):
        return [float(n) for n in slots if n]
    return [r.weight for r in replicas]


def loads(replicas: list[Replica]) -> dict[int, float]:
    """Requests per unit of capacity, by ``id`` of the replica."""
    return {id(r): r.busy / c for r, c in zip(replicas, capacities(replicas), strict=True)}


def within_bound(
    replicas: list[Replica],
    guard_rel: float = GUARD_REL,
    guard_abs: float = GUARD_ABS,
    guard_abs_slots: float = GUARD_ABS_SLOTS,
) -> dict[int, bool]:
    """Which replicas may keep a prompt's affinity (the module's docstring says why).
    The least-loaded replica always may (where any replica has a free slot, so does
    the least loaded per slot), so one always does."""
    load = loads(replicas)
    least = min(load.values())
    if not all(r.slots for r in replicas):
        return {id(r): load[id(r)] <= least * guard_rel + guard_abs for r in replicas}
    # Per slot, a load under 1 is a free slot.
    room = least < 1
    bound = least * guard_rel + guard_abs_slots
    return {id(r): load[id(r)] <= bound and (load[id(r)] < 1 or not room) for r in replicas}


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
        load = loads(replicas)
        # Sorting is stable: the rotation decides among equally loaded replicas, so
        # an idle fleet still spreads its requests.
        return sorted(self._rotate.order(replicas, body), key=lambda r: load[id(r)])


class PrefixAffinity:
    def __init__(
        self,
        guard_rel: float = GUARD_REL,
        guard_abs: float = GUARD_ABS,
        guard_abs_slots: float = GUARD_ABS_SLOTS,
    ) -> None:
        self.guard_rel = guard_rel
        self.guard_abs = guard_abs
        self.guard_abs_slots = guard_abs_slots
        # prefix key → URL of the replica it was last sent to.
        self._last: OrderedDict[bytes, str] = OrderedDict()

    def order(self, replicas: list[Replica], body: dict[str, Any]) -> list[Replica]:
        if len(replicas) < 2:
            return list(replicas)
        key = prefix_key(body)
        ranked = sorted(replicas, key=lambda r: hrw_score(key, r.url, r.weight), reverse=True)
        last = self._last.get(key)
        if last is not None:
            # Where the prefix went last comes first (a stable sort keeps the rest in
            # ranking order); gone from the fleet, the ranking alone decides.
            ranked.sort(key=lambda r: r.url != last)
        # The first replica in that order within the bound; the rest follow in ranking
        # order as the failover path.
        ok = within_bound(replicas, self.guard_rel, self.guard_abs, self.guard_abs_slots)
        first = next(i for i, r in enumerate(ranked) if ok[id(r)])
        self._remember(key, ranked[first].url)
        return [ranked[first], *ranked[:first], *ranked[first + 1 :]]

    def _remember(self, key: bytes, url: str) -> None:
        self._last[key] = url
        self._last.move_to_end(key)
        if len(self._last) > REMEMBERED_PREFIXES:
            self._last.popitem(last=False)


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
