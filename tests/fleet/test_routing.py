"""Routing decisions: deterministic across gateways, stable when replicas join or
leave, weighted, and guarded by load."""

from __future__ import annotations

from collections import Counter
from typing import Any

from servelm.catalog.specs import ReplicaSpec
from servelm.engines.fleet.replicas import Replica
from servelm.engines.fleet.routing import (
    GUARD_ABS,
    LeastLoad,
    PrefixAffinity,
    RoundRobin,
    make_router,
)


def replicas(
    n: int, weights: list[float] | None = None, slots: list[int | None] | None = None
) -> list[Replica]:
    return [
        Replica(
            ReplicaSpec(
                url=f"http://10.0.0.{i + 1}:8000/v1",
                weight=(weights or [1.0] * n)[i],
                slots=(slots or [None] * n)[i],
            ),
            model="m",
            connect_timeout=1,
            read_timeout=1,
            max_idle=1,
        )
        for i in range(n)
    ]


def conversation(i: int, turns: int = 1) -> dict[str, Any]:
    messages: list[dict[str, str]] = [
        {"role": "system", "content": "You are a helpful assistant. " * 50},
        {"role": "user", "content": f"question {i}"},
    ]
    for t in range(1, turns):
        messages += [
            {"role": "assistant", "content": f"answer {t}"},
            {"role": "user", "content": f"follow-up {t}"},
        ]
    return {"messages": messages}


def owner(router: PrefixAffinity, fleet: list[Replica], body: dict[str, Any]) -> str:
    return router.order(fleet, body)[0].url


def test_two_gateways_agree_without_talking() -> None:
    a, b = PrefixAffinity(), PrefixAffinity()
    fleet_a, fleet_b = replicas(3), list(reversed(replicas(3)))  # listed in another order
    for i in range(200):
        assert owner(a, fleet_a, conversation(i)) == owner(b, fleet_b, conversation(i))


def test_every_turn_of_a_conversation_goes_to_the_same_replica() -> None:
    router, fleet = PrefixAffinity(), replicas(4)
    for i in range(50):
        first = owner(router, fleet, conversation(i))
        assert all(owner(router, fleet, conversation(i, t)) == first for t in range(2, 8))


def test_conversations_spread_over_the_replicas() -> None:
    router, fleet = PrefixAffinity(), replicas(4)
    share = Counter(owner(router, fleet, conversation(i)) for i in range(4000))
    assert len(share) == 4
    assert all(900 <= n <= 1100 for n in share.values()), share


def test_weights_set_the_share() -> None:
    router, fleet = PrefixAffinity(), replicas(2, [1.0, 3.0])
    share = Counter(owner(router, fleet, conversation(i)) for i in range(4000))
    assert 2800 <= share[fleet[1].url] <= 3200, share


def test_a_replica_leaving_moves_only_its_own_conversations() -> None:
    router, fleet = PrefixAffinity(), replicas(4)
    before = {i: owner(router, fleet, conversation(i)) for i in range(2000)}
    gone = fleet[2]
    after = {i: owner(router, [r for r in fleet if r is not gone], conversation(i)) for i in before}
    moved = [i for i in before if before[i] != after[i]]
    assert moved and all(before[i] == gone.url for i in moved)
    assert len(moved) == sum(1 for url in before.values() if url == gone.url)


def test_a_replica_joining_takes_a_fair_share_from_everyone_and_nothing_else_moves() -> None:
    router, fleet = PrefixAffinity(), replicas(4)
    before = {i: owner(router, fleet, conversation(i)) for i in range(2000)}
    grown = replicas(5)
    # The ranking (a gateway that has sent none of them yet):
    fresh = PrefixAffinity()
    after = {i: owner(fresh, grown, conversation(i)) for i in before}
    moved = [i for i in before if before[i] != after[i]]
    assert all(after[i] == grown[4].url for i in moved)
    assert 300 <= len(moved) <= 500  # about a fifth
    # A gateway that sent them keeps each where its cache is; the newcomer takes new
    # conversations (and any the load bound moves).
    assert all(owner(router, grown, conversation(i)) == before[i] for i in before)


def test_the_load_guard_sends_work_elsewhere_when_the_owner_is_swamped() -> None:
    router, fleet = PrefixAffinity(), replicas(2)
    body = conversation(7)
    favourite = router.order(fleet, body)[0]
    other = next(r for r in fleet if r is not favourite)
    favourite.in_flight = int(GUARD_ABS)  # busy, but within the guard: affinity holds
    assert router.order(fleet, body)[0] is favourite
    favourite.in_flight = int(GUARD_ABS) + 1
    assert router.order(fleet, body)[0] is other
    other.in_flight = 3  # 3 is within 3 * 1.5 + 2, but its cache is on `other` now
    assert router.order(fleet, body)[0] is other
    # A gateway that never sent it anywhere goes by the ranking: back to the owner.
    assert PrefixAffinity().order(fleet, body)[0] is favourite


def test_a_displaced_conversation_stays_where_it_went_until_that_replica_is_full() -> None:
    router, fleet = PrefixAffinity(), replicas(3, slots=[2, 2, 2])
    body = conversation(11)
    first, second, third = router.order(fleet, body)
    first.in_flight = 2  # full, with free slots elsewhere: the bound moves it
    assert router.order(fleet, body)[0] is second
    first.in_flight = 0  # its first choice is free again, but its KV is on `second`
    for t in range(2, 6):
        assert router.order(fleet, conversation(11, t))[0] is second
    second.in_flight = 2  # now that one is full: the ranking's next within the bound
    assert router.order(fleet, body)[0] is first
    # A remembered replica that has left the fleet: the ranking alone decides.
    assert router.order([first, third], body)[0] is first


def test_the_memory_of_where_prefixes_went_is_bounded(monkeypatch: Any) -> None:
    from servelm.engines.fleet import routing

    monkeypatch.setattr(routing, "REMEMBERED_PREFIXES", 10)
    router, fleet = PrefixAffinity(), replicas(3)
    for i in range(50):
        router.order(fleet, conversation(i))
    assert len(router._last) == 10
    # The most recently sent are the ones kept.
    assert routing.prefix_key(conversation(49)) in router._last
    assert routing.prefix_key(conversation(0)) not in router._last


def test_a_conversation_pushed_off_its_first_choice_always_lands_on_the_same_second() -> None:
    router, fleet = PrefixAffinity(), replicas(4)
    body = conversation(3)
    first, second = router.order(fleet, body)[:2]
    first.in_flight = 10  # far above everyone else
    for _ in range(5):
        assert router.order(fleet, body)[0] is second
    # ... and another gateway, knowing only the same loads, agrees.
    other = replicas(4)
    next(r for r in other if r.url == first.url).in_flight = 10
    assert PrefixAffinity().order(other, body)[0].url == second.url


def test_least_load_counts_in_flight_and_other_gateways_work_per_weight() -> None:
    fleet = replicas(3, [1.0, 1.0, 4.0])
    fleet[0].in_flight, fleet[2].in_flight = 1, 6
    fleet[1].reported(slots=None, running=1, waiting=1)  # another gateway's two requests
    assert [r.url for r in LeastLoad().order(fleet, {})] == [
        fleet[0].url,
        fleet[2].url,  # 6 / 4 = 1.5
        fleet[1].url,
    ]


def test_round_robin_and_ties_rotate() -> None:
    fleet = replicas(3)
    rr = RoundRobin()
    assert [rr.order(fleet, {})[0].url for _ in range(4)] == [
        fleet[0].url, fleet[1].url, fleet[2].url, fleet[0].url
    ]  # fmt: skip
    least = make_router("least_load")
    assert len({least.order(fleet, {})[0].url for _ in range(3)}) == 3
