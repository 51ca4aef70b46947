"""Replicas from DNS (``dns+http://NAME:PORT/v1``): real ``servelm worker`` processes
bound to 127.0.0.1, .2 and .3 on one port, one gateway process whose replica list
names them by one name. The name resolves through an ``/etc/hosts``-style file the
test rewrites (``SERVELM_HOSTS_FILE``), as a Kubernetes headless Service's records
change when pods come and go; the gateway is never restarted."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from servelm.engines.fleet.discovery import address_url, hosts_lookup
from servelm.store.db import Database
from tests import procs
from tests.conftest import free_port, provision
from tests.fleet import fleetprocs
from tests.fleet.fleetprocs import Proc, StreamResult, stream_chat

MODEL = "dns-smol"
NAME = "workers.servelm.test"
DISCOVERY_INTERVAL = 1.0
ADDRESSES = ("127.0.0.1", "127.0.0.2", "127.0.0.3")


@dataclass
class Rig:
    tmp: Path
    models_dir: Path
    port: int
    hosts: Path
    workers: dict[str, Proc]
    gw: procs.Gateway
    key: str

    def publish(self, *addresses: str) -> None:
        """The name's records, replaced at once (a reader never sees half a file)."""
        staged = self.hosts.with_suffix(".new")
        staged.write_text("".join(f"{a} {NAME}  # a worker\n" for a in addresses))
        os.replace(staged, self.hosts)

    def start_worker(self, address: str) -> Proc:
        w = fleetprocs.worker(self.tmp, self.models_dir, "--slots", "2", "--host", address)
        w.args[w.args.index("--port") + 1] = str(self.port)
        w.port, w.host, w.log = self.port, address, self.tmp / f"worker-{address}.log"
        self.workers[address] = w.start().wait_ready()
        return w

    def replicas(self) -> dict[str, dict[str, object]]:
        """The gateway's replicas of the model, by address."""
        state = fleetprocs.replicas_state(self.gw, MODEL)
        return {str(r["url"]).split("//")[1].split(":")[0]: r for r in state}

    def healthy(self) -> set[str]:
        return {a for a, r in self.replicas().items() if r["state"] == "healthy"}


@pytest.fixture
def rig(models_dir: Path, tmp_path: Path) -> Iterator[Rig]:
    port = free_port()
    hosts = tmp_path / "hosts"
    r = Rig(tmp_path, models_dir, port, hosts, {}, None, "")  # type: ignore[arg-type]
    try:
        for address in ADDRESSES[:2]:
            r.start_worker(address)
        r.publish(*ADDRESSES[:2])
        r.gw = fleetprocs.gateway(
            tmp_path,
            models_dir,
            f"""
[models.{MODEL}]
engine = "openai"
replicas = ["dns+http://{NAME}:{port}/v1"]
upstream_model = "{fleetprocs.SLUG}"
routing = "round_robin"
health_interval = 0.5
timeout = 60
context_window = 8192
max_output_tokens = 1024
""",
            SERVELM_DISCOVERY_INTERVAL=str(DISCOVERY_INTERVAL),
            SERVELM_HOSTS_FILE=str(hosts),
        )
        db = Database(f"sqlite:///{tmp_path / 'gateway-data' / 'servelm.db'}")
        r.key = provision(db, "dns", 100_000)
        db.dispose()
        yield r
        r.gw.stop()
    finally:
        for w in r.workers.values():
            w.stop()


async def chats(rig: Rig, count: int, max_tokens: int) -> list[StreamResult]:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Name a colour."}],
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": True,
    }
    async with httpx.AsyncClient(timeout=120) as client:
        url = f"{rig.gw.base_url}/v1/chat/completions"
        return await asyncio.gather(
            *(stream_chat(client, url, body, rig.key) for _ in range(count))
        )


def busy_slots(worker: Proc) -> int:
    return int(httpx.get(f"{worker.url}/health", timeout=10).json()["slots_busy"])


def test_a_third_worker_joins_and_a_removed_one_drains_without_a_restart(rig: Rig) -> None:
    pid = rig.gw.proc.pid
    assert rig.healthy() == set(ADDRESSES[:2])

    # A third worker under the same name: picked up at the next resolution.
    rig.start_worker(ADDRESSES[2])
    rig.publish(*ADDRESSES)
    took = fleetprocs.wait_until(
        lambda: rig.healthy() == set(ADDRESSES), 30 * DISCOVERY_INTERVAL, "the third worker"
    )
    print(f"third worker in rotation {took:.2f} s after its record appeared")
    # Round-robin over three: six answers, two from each, the newcomer's included.
    results = asyncio.run(chats(rig, 6, 4))
    assert all(r.done for r in results), results
    assert {a: r["requests"] for a, r in rig.replicas().items()} == dict.fromkeys(ADDRESSES, 2)

    # A worker's record vanishes while it streams: no new request goes to it, the one
    # on it finishes.
    async def drain() -> list[StreamResult]:
        streams = asyncio.gather(chats(rig, 3, 400))  # one on each worker
        leaving = rig.workers[ADDRESSES[1]]
        await asyncio.to_thread(
            fleetprocs.wait_until, lambda: busy_slots(leaving) == 1, 60, "a stream on .2"
        )
        rig.publish(ADDRESSES[0], ADDRESSES[2])
        await asyncio.to_thread(
            fleetprocs.wait_until,
            lambda: ADDRESSES[1] not in rig.replicas(),
            30 * DISCOVERY_INTERVAL,
            "the removed worker to leave",
        )
        # Out of the gateway's set with its stream still running on it.
        assert busy_slots(leaving) == 1
        (results,) = await streams
        return results

    results = asyncio.run(drain())
    assert [(r.done, len(r.content) > 0) for r in results] == [(True, True)] * 3, results
    before = {a: int(str(r["requests"])) for a, r in rig.replicas().items()}
    assert set(before) == {ADDRESSES[0], ADDRESSES[2]}
    after = asyncio.run(chats(rig, 4, 4))
    assert all(r.done for r in after), after
    now = {a: int(str(r["requests"])) for a, r in rig.replicas().items()}
    assert set(now) == {ADDRESSES[0], ADDRESSES[2]}
    assert sum(now.values()) == sum(before.values()) + 4  # all four on the remaining two
    assert rig.gw.proc.pid == pid and rig.gw.proc.poll() is None  # never restarted


def test_a_hosts_file_lists_every_address_of_a_name(tmp_path: Path) -> None:
    hosts = tmp_path / "hosts"
    hosts.write_text(
        "# comment\n127.0.0.1 localhost\n10.0.0.7 workers other\n"
        "10.0.0.8   WORKERS # trailing\nnot-an-address workers\nfe80::1 workers\n"
    )
    assert hosts_lookup(hosts, "workers") == ["10.0.0.7", "10.0.0.8", "fe80::1"]
    assert hosts_lookup(hosts, "nobody") == []
    assert address_url("dns+http://workers:8101/v1/", "10.0.0.7") == "http://10.0.0.7:8101/v1"
    assert address_url("dns+https://w/v1", "fe80::1") == "https://[fe80::1]/v1"
