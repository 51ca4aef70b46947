"""Fleet parts as real processes: ``servelm worker``s, fake upstreams, a gateway
fronting them, and the client-side helpers the fleet tests share."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from tests import procs
from tests.conftest import ADMIN_TOKEN, free_port

SLUG = "smollm2-135m-instruct"


@dataclass
class Proc:
    """A server process on a loopback port, restartable on the same port."""

    args: list[str]
    port: int
    log: Path
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None
    host: str = "127.0.0.1"

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> Proc:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                self.args, env=self.env, stdout=out, stderr=subprocess.STDOUT
            )
        return self

    def wait_ready(self, timeout: float = 90) -> Proc:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.args[:3]} exited:\n{self.log.read_text()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass  # not listening yet
            time.sleep(0.05)
        raise RuntimeError(f"{self.args[:3]} not ready in {timeout}s:\n{self.log.read_text()}")

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs, as in a crash."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()


def worker(tmp: Path, models_dir: Path, *extra: str, **env_extra: str) -> Proc:
    """``servelm worker`` for the default model on a free port (not started)."""
    port = free_port()
    env = procs.gateway_env(tmp / "worker-data", models_dir, **env_extra)
    env.pop("SERVELM_MODELS_FILE", None)
    args = [procs.SERVELM, "worker", "--model", SLUG, "--port", str(port), "--threads", "1"]
    return Proc([*args, *extra], port, tmp / f"worker-{port}.log", env)


def fault_upstream(tmp: Path) -> Proc:
    port = free_port()
    args = [sys.executable, "-m", "tests.support.fault_upstream", "--port", str(port)]
    return Proc(args, port, tmp / f"fault-{port}.log", procs.gateway_env(tmp, tmp))


def gateway(tmp: Path, models_dir: Path, models_toml: str, **env: str) -> procs.Gateway:
    models_file = tmp / "gateway.toml"
    models_file.write_text(models_toml + f"\n[models.{SLUG}]\nenabled = false\n")
    gw_env = procs.gateway_env(
        tmp / "gateway-data",
        models_dir,
        SERVELM_MODELS_FILE=str(models_file),
        SERVELM_ADMIN_TOKEN=ADMIN_TOKEN,
        **env,
    )
    (gw,) = procs.start(gw_env, tmp / "logs")
    return gw


def replicas_state(gw: procs.Gateway, model: str) -> list[dict[str, Any]]:
    r = httpx.get(
        f"{gw.base_url}/admin/models",
        headers={"authorization": f"Bearer {ADMIN_TOKEN}"},
        timeout=10,
    )
    assert r.status_code == 200, r.text
    (entry,) = [m for m in r.json()["data"] if m["id"] == model]
    return list(entry["engine_state"]["replicas"])


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll until true; returns the seconds it took."""
    began = time.monotonic()
    while time.monotonic() - began < timeout:
        if predicate():
            return time.monotonic() - began
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@dataclass
class StreamResult:
    status: int
    request_id: str
    content: list[str]
    done: bool
    error: Any = None


async def stream_chat(
    client: httpx.AsyncClient, url: str, body: dict[str, Any], key: str
) -> StreamResult:
    """One streaming chat: the content chunks received, and how it ended."""
    content: list[str] = []
    async with client.stream("POST", url, json=body, headers={"x-api-key": key}) as r:
        rid = r.headers.get("x-request-id", "")
        if r.status_code != 200:
            return StreamResult(r.status_code, rid, [], False, json.loads(await r.aread()))
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line.removeprefix("data: ")
            if data == "[DONE]":
                return StreamResult(200, rid, content, True)
            event = json.loads(data)
            if "error" in event:
                return StreamResult(200, rid, content, False, event["error"])
            for choice in event.get("choices") or ():
                if (choice.get("delta") or {}).get("content"):
                    content.append(choice["delta"]["content"])
    return StreamResult(200, rid, content, False, "stream ended without [DONE] or an error")
