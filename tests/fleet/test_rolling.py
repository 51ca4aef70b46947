"""Issue 26's acceptance 1: a rolling restart of a worker and then of a gateway, run
as processes with the drain the deploy files give them, while 8 clients stream
without pause: every stream ends with ``[DONE]`` or had not started. The clients go
through a small load balancer that, like a Kubernetes Service, sends only to
gateways whose ``/readyz`` is 200."""

from __future__ import annotations

import asyncio
import re
import signal
from pathlib import Path
from typing import Any

import httpx
import yaml

from servelm.store.db import Database
from tests import procs
from tests.conftest import ADMIN_TOKEN, provision
from tests.fleet import fleetprocs
from tests.fleet.fleetprocs import Proc, StreamResult, stream_chat

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
MODEL = "rolling-smol"
WORKER_KEY = "worker-key-for-rolling"
CLIENTS = 8


def deploy_env(name: str) -> dict[str, str]:
    """The plain environment values ``deploy/k8s/NAME`` gives its container."""
    for doc in yaml.safe_load_all((DEPLOY / "k8s" / name).read_text()):
        if doc["kind"] in ("Deployment", "StatefulSet"):
            (container,) = doc["spec"]["template"]["spec"]["containers"]
            return {e["name"]: e["value"] for e in container["env"] if "value" in e}
    raise AssertionError(name)


class Balancer:
    """Round robin over the gateways answering ``/readyz`` 200 (as endpoints do)."""

    def __init__(self, gateways: list[procs.Gateway]) -> None:
        self.gateways = gateways
        self.turn = 0

    async def pick(self, client: httpx.AsyncClient) -> procs.Gateway | None:
        for _ in range(len(self.gateways)):
            self.turn += 1
            gw = self.gateways[self.turn % len(self.gateways)]
            try:
                if (await client.get(f"{gw.base_url}/readyz")).status_code == 200:
                    return gw
            except httpx.TransportError:
                continue
        return None


def started(result: StreamResult) -> bool:
    return result.status == 200 or bool(result.content)


async def clients(
    balancer: Balancer, key: str, stop: asyncio.Event, results: list[StreamResult | str]
) -> None:
    async def one(i: int) -> None:
        async with httpx.AsyncClient(timeout=120) as client:
            for n in range(10_000):
                if stop.is_set():
                    return
                gw = await balancer.pick(client)
                if gw is None:
                    await asyncio.sleep(0.05)  # no gateway ready: the next pick
                    continue
                body: dict[str, Any] = {
                    "model": MODEL,
                    "stream": True,
                    "max_tokens": 12,
                    "messages": [{"role": "user", "content": f"Client {i}, turn {n}: a colour?"}],
                }
                url = f"{gw.base_url}/v1/chat/completions"
                try:
                    results.append(await stream_chat(client, url, body, key))
                except httpx.TransportError as exc:
                    # The connection went before an answer began (a gateway that
                    # closed its socket): not started; after, the stream was cut.
                    results.append(f"transport: {type(exc).__name__}")

    await asyncio.gather(*(one(i) for i in range(CLIENTS)))


def running(gw: procs.Gateway) -> float:
    """The gateway's streams in flight on the model's replicas."""
    text = httpx.get(f"{gw.base_url}/metrics", timeout=10).text
    found = re.search(rf'^servelm_engine_running{{model="{MODEL}"}} (\S+)$', text, re.MULTILINE)
    assert found is not None, text
    return float(found.group(1))


def busy(worker: Proc) -> int:
    load = httpx.get(f"{worker.url}/health", timeout=10).json()
    return int(load["slots_busy"])


def test_rolling_restart_of_a_worker_and_a_gateway_cuts_no_stream(
    models_dir: Path, tmp_path: Path
) -> None:
    worker_env, gateway_env = deploy_env("workers.yaml"), deploy_env("gateway.yaml")
    assert "SERVELM_DRAIN_SECONDS" in worker_env and "SERVELM_DRAIN_SECONDS" in gateway_env
    workers = [
        fleetprocs.worker(tmp_path, models_dir, "--slots", "4", "--api-key", WORKER_KEY,
                          **worker_env).start()
        for _ in range(2)
    ]  # fmt: skip
    gateways: list[procs.Gateway] = []
    try:
        for w in workers:
            w.wait_ready()
        models = tmp_path / "gateway.toml"
        replicas = ", ".join(f'"{w.url}/v1"' for w in workers)
        models.write_text(
            f'[models.{MODEL}]\nengine = "openai"\nreplicas = [{replicas}]\n'
            f'api_key = "{WORKER_KEY}"\nupstream_model = "{fleetprocs.SLUG}"\n'
            "health_interval = 0.5\ncontext_window = 8192\n"
            f"\n[models.{fleetprocs.SLUG}]\nenabled = false\n"
        )
        env = procs.gateway_env(
            tmp_path / "gateway-data",
            models_dir,
            SERVELM_MODELS_FILE=str(models),
            SERVELM_ADMIN_TOKEN=ADMIN_TOKEN,
            **{k: v for k, v in gateway_env.items() if k != "SERVELM_MODELS_FILE"},
        )
        gateways = procs.start(env, tmp_path / "logs", 2)
        db = Database(f"sqlite:///{tmp_path / 'gateway-data' / 'servelm.db'}")
        key = provision(db, "rolling", 1_000_000)
        db.dispose()
        balancer = Balancer(list(gateways))
        results: list[StreamResult | str] = []

        async def scenario() -> str:
            stop = asyncio.Event()
            load = asyncio.create_task(clients(balancer, key, stop, results))

            async def until(check: Any) -> None:
                while not await asyncio.to_thread(check):
                    await asyncio.sleep(0.05)

            # A worker: SIGTERM while it runs streams, its exit, back on its port.
            await until(lambda: busy(workers[0]) > 0)
            assert workers[0].proc is not None
            workers[0].proc.send_signal(signal.SIGTERM)
            # uvicorn re-raises the signal once it has shut down: -SIGTERM is its
            # ordinary end.
            exit_code = await asyncio.to_thread(workers[0].proc.wait, 60)
            assert exit_code in (0, -signal.SIGTERM), exit_code
            await asyncio.to_thread(lambda: workers[0].start().wait_ready())
            # A gateway: SIGTERM while streams run through it, a fresh one in its place.
            old = gateways[0]
            await until(lambda: running(old) > 0)
            old.proc.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(old.proc.wait, 60) == 0
            (new,) = await asyncio.to_thread(procs.start, env, tmp_path / "logs", 1)
            gateways.append(new)
            balancer.gateways[0] = new
            # Streams through the new gateway and the restarted worker, then stop.
            count = len(results)
            await until(lambda: len(results) >= count + CLIENTS)
            stop.set()
            await load
            return old.log.read_text()

        old_log = asyncio.run(scenario())
    finally:
        for gw in gateways:
            gw.stop()
        for w in workers:
            w.stop()

    cut = [r for r in results if isinstance(r, StreamResult) and started(r) and not r.done]
    assert cut == []
    not_started = [r for r in results if not isinstance(r, StreamResult) or not started(r)]
    done = [r for r in results if isinstance(r, StreamResult) and r.done]
    assert len(done) + len(not_started) == len(results)
    assert len(done) >= 2 * CLIENTS, (len(done), not_started)
    # The gateway was stopped with streams running, which it drained.
    assert re.search(r"draining, [1-9]\d* requests running", old_log), old_log
