"""Replicas from DNS: ``dns+http://NAME:PORT/v1`` in a model's ``replicas`` is one
replica per address NAME resolves to, re-resolved every ``interval`` seconds while
the gateway runs. A Kubernetes headless Service or a Docker Compose service name
resolves to one address per pod or container, so ``kubectl scale`` or ``docker
compose up --scale`` adds or removes workers with no gateway restart.

An address that appears joins out of rotation and takes traffic once a probe passes
(right away, in the same round). An address that vanishes leaves the set at once (no
new request goes to it) while its requests in flight finish (``ReplicaSet.remove``).
A failed resolution (the name unknown, the resolver down) keeps the replicas last
resolved: a DNS blip must not empty a working fleet.

Names resolve through the event loop's ``getaddrinfo`` (a thread, so the loop never
waits on DNS), i.e. the system's resolver. ``SERVELM_HOSTS_FILE`` names a file in
``/etc/hosts`` form read first at every resolution (names it lists resolve from it
alone): how tests, and a host without a DNS server for its workers, point a name at
addresses they control.

Prefix routing stays put across changes: rendezvous hashing over replica URLs moves
only the conversations the joining or leaving replica wins (``fleet.routing``).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import random
import socket
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from servelm.catalog.specs import DNS_SCHEME, ReplicaSpec
from servelm.engines.fleet.health import HealthChecker
from servelm.engines.fleet.replicas import Replica, ReplicaSet

log = logging.getLogger(__name__)

# Each wait between resolutions is the interval times a factor from this range: never
# longer than the interval (a new worker takes traffic within one), and gateways
# started together do not ask the resolver in step.
JITTER = (0.8, 1.0)

# Builds a replica of ``spec`` at a resolved URL, named ``name``, out of rotation.
MakeReplica = Callable[[ReplicaSpec, str], Replica]


class Resolver:
    def __init__(self, hosts_file: Path | None = None) -> None:
        self.hosts_file = hosts_file

    async def resolve(self, host: str, port: int) -> list[str]:
        """Every address ``host`` has, sorted; raises OSError when it cannot tell."""
        if self.hosts_file is not None:
            listed = await asyncio.to_thread(hosts_lookup, self.hosts_file, host)
            if listed:
                return listed
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        return sorted({str(info[4][0]) for info in infos})


def hosts_lookup(path: Path, host: str) -> list[str]:
    """The addresses an ``/etc/hosts``-style file gives ``host`` (every line naming
    it counts, unlike the C library's first match: each is a replica)."""
    found: set[str] = set()
    for line in path.read_text().splitlines():
        fields = line.split("#", 1)[0].split()
        if len(fields) >= 2 and host.lower() in (f.lower() for f in fields[1:]):
            with contextlib.suppress(ValueError):  # not an address: not a mapping
                found.add(str(ipaddress.ip_address(fields[0])))
    return sorted(found)


def address_url(url: str, address: str) -> str:
    """``url`` (its ``dns+`` dropped) with its host replaced by ``address``."""
    parts = urlsplit(url.removeprefix(DNS_SCHEME))
    host = f"[{address}]" if ":" in address else address
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, "")).rstrip("/")


class Discovery:
    """Keeps the replicas of a model's ``dns+`` URLs in step with what they resolve to."""

    def __init__(
        self,
        replicas: ReplicaSet,
        sources: list[tuple[int, ReplicaSpec]],
        make: MakeReplica,
        health: HealthChecker,
        *,
        interval: float,
        resolver: Resolver,
    ) -> None:
        self.replicas = replicas
        self.sources = sources  # (index in the models file, its dns+ spec)
        self.make = make
        self.health = health
        self.interval = interval
        self.resolver = resolver
        self._origin: dict[str, int] = {}  # replica URL -> index of the source it came from
        self._counter: dict[int, int] = {}  # per source: addresses seen so far, for names
        self._task: asyncio.Task[None] | None = None

    async def refresh(self) -> None:
        await asyncio.gather(*(self._refresh(i, spec) for i, spec in self.sources))

    async def _refresh(self, index: int, spec: ReplicaSpec) -> None:
        parts = urlsplit(spec.url.removeprefix(DNS_SCHEME))
        assert parts.hostname is not None  # ReplicaSpec checked it
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            addresses = await self.resolver.resolve(parts.hostname, port)
        except OSError as exc:
            log.warning("replicas of %s: %s did not resolve (%s); keeping the %d known",
                        spec.url, parts.hostname, exc, self._count(index))  # fmt: skip
            return
        wanted = {address_url(spec.url, a) for a in addresses}
        mine = [r for r in self.replicas.all if self._origin.get(r.url) == index]
        for replica in mine:
            if replica.url not in wanted:
                await self.replicas.remove(replica)
                del self._origin[replica.url]
        have = {r.url for r in mine}
        joining: list[Replica] = []
        for url in sorted(wanted - have):
            if url in self._origin:
                continue  # another dns+ entry of this model already gave this address
            n = self._counter.get(index, 0)
            self._counter[index] = n + 1
            replica = self.make(spec.model_copy(update={"url": url}), f"{index}.{n}")
            self._origin[url] = index
            self.replicas.add(replica)
            joining.append(replica)
            log.info("replica %s of %s joined from %s", url, replica.model, spec.url)
        # Into rotation only once a probe passes; one that fails stays out and is
        # probed every round like any ejected replica.
        await asyncio.gather(*(self.health.probe(r) for r in joining))

    def _count(self, index: int) -> int:
        return sum(1 for i in self._origin.values() if i == index)

    def start(self) -> None:
        if self.sources:
            self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval * random.uniform(*JITTER))
            try:
                await self.refresh()
            except Exception:  # one bad round must not end discovery for good
                log.exception("replica discovery round failed")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
