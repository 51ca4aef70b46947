"""Capacity-aware load: what the probes learn of each replica (slots, requests running
and waiting), and how least-load and the prefix bound weigh it."""

from __future__ import annotations

import asyncio

import pytest

from servelm.catalog.specs import ReplicaSpec
from servelm.engines.fleet import health
from servelm.engines.fleet.health import HealthChecker
from servelm.engines.fleet.replicas import Replica, ReplicaSet
from servelm.engines.fleet.routing import LeastLoad, PrefixAffinity, loads
from tests.fleet.test_routing import conversation, replicas


def owned_by(router: PrefixAffinity, fleet: list[Replica], target: Replica) -> dict[str, object]:
    """A conversation whose first choice, with the fleet idle, is ``target``."""
    return next(
        body
        for body in (conversation(i) for i in range(100))
        if router.order(fleet, body)[0] is target
    )


def test_load_is_requests_per_slot_when_every_replica_knows_its_slots() -> None:
    big, small = fleet = replicas(2, slots=[4, 1])
    big.in_flight, small.in_flight = 2, 1
    # Counting requests, the small one (1) looks less loaded than the big one (2);
    # per slot it is full (1.0) where the big one is half busy (0.5).
    assert loads(fleet) == {id(big): 0.5, id(small): 1.0}
    assert LeastLoad().order(fleet, {})[0] is big


def test_one_replica_without_a_slot_count_puts_everyone_back_on_weights() -> None:
    big, unknown = fleet = replicas(2, weights=[1.0, 2.0], slots=[4, None])
    big.in_flight, unknown.in_flight = 2, 2
    assert loads(fleet) == {id(big): 2.0, id(unknown): 1.0}


def test_declared_slots_win_over_reported_ones() -> None:
    (declared,) = replicas(1, slots=[8])
    declared.reported(slots=2, running=0, waiting=0)
    assert declared.slots == 8
    (learned,) = replicas(1)
    learned.reported(slots=2, running=0, waiting=0)
    assert learned.slots == 2


def test_the_engines_count_adds_only_other_gateways_work() -> None:
    (r,) = replicas(1)
    r.in_flight = 3
    r.reported(slots=4, running=3, waiting=0)  # all three are ours
    assert r.busy == 3
    r.reported(slots=4, running=4, waiting=2)  # three more from someone else
    assert r.busy == 6
    r.in_flight = 1  # ours finish: the live count drops at once
    assert r.busy == 4


def test_a_full_replica_loses_affinity_while_another_has_a_free_slot() -> None:
    # The bound against the prompt's ranking: each decision by a gateway that has not
    # sent this prefix before (one that has tries where it went first: test_routing).
    router = PrefixAffinity()
    big, small = fleet = replicas(2, slots=[4, 1])
    body = owned_by(router, fleet, small)
    small.in_flight = 1  # its one slot is taken
    big.in_flight = 2
    assert PrefixAffinity().order(fleet, body)[0] is big
    big.in_flight = 4  # now nobody has room: 1 / 1 is within 1.5 x 4 / 4
    assert PrefixAffinity().order(fleet, body)[0] is small


def test_affinity_holds_within_half_its_slots_of_the_least_loaded() -> None:
    # The bound against the prompt's ranking: each decision by a gateway that has not
    # sent this prefix before (one that has tries where it went first: test_routing).
    router = PrefixAffinity()
    first, other = fleet = replicas(2, slots=[8, 8])
    body = owned_by(router, fleet, first)
    first.in_flight = 4  # 0.5 per slot next to an idle replica; above 0 x 1.5 + 2 requests
    assert PrefixAffinity().order(fleet, body)[0] is first
    first.in_flight = 5
    assert PrefixAffinity().order(fleet, body)[0] is other
    other.in_flight = 2  # 0.25 per slot: the bound is 0.875, 7 requests
    first.in_flight = 7
    assert PrefixAffinity().order(fleet, body)[0] is first


def test_an_idle_small_replica_takes_work_from_a_big_one_with_free_slots() -> None:
    router = PrefixAffinity()
    big, small = fleet = replicas(2, slots=[4, 1])
    body = owned_by(router, fleet, big)
    big.in_flight = 2
    assert router.order(fleet, body)[0] is big
    big.in_flight = 3  # three prefills sharing one replica's compute, the other idle
    assert router.order(fleet, body)[0] is small


def test_when_every_slot_is_taken_the_bound_is_relative_per_slot() -> None:
    router = PrefixAffinity()
    first, other = fleet = replicas(2, slots=[4, 2])
    body = owned_by(router, fleet, first)
    other.in_flight = 2  # 1.0 per slot: the bound is 1.5 x 1.0 + 0.5
    first.in_flight = 8  # 2.0 per slot
    assert router.order(fleet, body)[0] is first
    first.in_flight = 9
    assert router.order(fleet, body)[0] is other


class FakeServer:
    """What ``health._get`` would fetch, by path; counts the asks."""

    def __init__(self, answers: dict[str, tuple[int, bytes]]) -> None:
        self.answers = answers
        self.asked: list[str] = []

    async def get(self, pool: object, path: str) -> tuple[int, bytes]:
        self.asked.append(path)
        return self.answers.get(path, (404, b"not found"))


def probed(monkeypatch: pytest.MonkeyPatch, answers: dict[str, tuple[int, bytes]],
           rounds: int = 1) -> tuple[Replica, FakeServer]:  # fmt: skip
    server = FakeServer(answers)
    monkeypatch.setattr(health, "_get", server.get)
    replica = Replica(ReplicaSpec(url="http://10.0.0.9:8000/v1"), model="m",
                      connect_timeout=1, read_timeout=1, max_idle=1)  # fmt: skip
    checker = HealthChecker(ReplicaSet([replica]), interval=1.0)

    async def go() -> None:
        for _ in range(rounds):
            assert await checker.probe(replica)

    asyncio.run(go())
    return replica, server


def test_a_servelm_worker_says_everything_in_its_health(monkeypatch: pytest.MonkeyPatch) -> None:
    body = b'{"status":"ok","model":"m","slots":4,"slots_busy":3,"queue_depth":2}'
    r, server = probed(monkeypatch, {"/health": (200, body)})
    assert (r.slots, r.reported_running, r.reported_queue, r.busy) == (4, 3, 2, 5)
    assert server.asked == ["/health"]


def test_llama_cpp_server_slots_from_props_and_counts_from_metrics(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    metrics = (b"# TYPE llamacpp:requests_processing gauge\nllamacpp:requests_processing 2\n"
               b"llamacpp:requests_deferred 1\n")  # fmt: skip
    r, server = probed(
        monkeypatch,
        {
            "/health": (200, b'{"status":"ok"}'),
            "/metrics": (200, metrics),
            "/props": (200, b'{"total_slots":6,"n_ctx":4096}'),
        },
        rounds=2,
    )
    assert (r.slots, r.reported_running, r.reported_queue) == (6, 2, 1)
    # Once the slots are known, /props is not asked again.
    assert server.asked == ["/health", "/metrics", "/props", "/health", "/metrics"]


def test_vllm_without_props_is_not_asked_again_and_has_no_slots(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    metrics = (b'vllm:num_requests_running{model_name="m"} 5.0\n'
               b'vllm:num_requests_waiting{model_name="m"} 3.0\n')  # fmt: skip
    r, server = probed(monkeypatch, {"/health": (200, b""), "/metrics": (200, metrics)}, rounds=2)
    assert (r.slots, r.reported_running, r.reported_queue, r.busy) == (None, 5, 3, 8)
    assert server.asked == ["/health", "/metrics", "/props", "/health", "/metrics"]
