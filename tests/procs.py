"""Gateways as real OS processes (``servelm serve``), for tests where processes share a
database, get killed, or are restarted."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.conftest import free_port

SERVELM = str(Path(sys.executable).parent / "servelm")


@dataclass
class Gateway:
    proc: subprocess.Popen[bytes]
    port: int
    log: Path
    env: dict[str, str] = field(repr=False)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs, exactly like a crash or the OOM killer."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()


def tree_rss(pid: int) -> int:
    """Resident bytes of ``pid`` and every process below it."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
            for task in Path(f"/proc/{p}/task").iterdir():
                todo.extend(int(c) for c in (task / "children").read_text().split())
        except (FileNotFoundError, ProcessLookupError):
            continue  # a process that ended between the listing and the read
    return total


def gateway_env(data_dir: Path, models_dir: Path, **extra: str) -> dict[str, str]:
    env = {
        **os.environ,
        "SERVELM_DATA_DIR": str(data_dir),
        "SERVELM_MODELS_DIR": str(models_dir),
        "SERVELM_THREADS": "1",
        "SERVELM_LOG_LEVEL": "info",
    }
    env.pop("SERVELM_DATABASE_URL", None)
    env.update(extra)
    return env


def spawn(env: dict[str, str], log_dir: Path, *args: str) -> Gateway:
    """Start ``servelm serve`` on a free port; does not wait (see ``wait_ready``)."""
    port = free_port()
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / f"gateway-{port}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [SERVELM, "serve", "--port", str(port), *args],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    return Gateway(proc, port, log, env)


def wait_ready(gw: Gateway, timeout: float = 90) -> Gateway:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if gw.proc.poll() is not None:
            raise RuntimeError(f"gateway exited with {gw.proc.returncode}:\n{gw.log.read_text()}")
        try:
            if httpx.get(f"{gw.base_url}/health", timeout=2).status_code == 200:
                return gw
        except httpx.TransportError:
            pass  # not listening yet
        time.sleep(0.1)
    gw.stop()
    raise RuntimeError(f"gateway not ready in {timeout}s:\n{gw.log.read_text()}")


class PortTaken(RuntimeError):
    """The port ``free_port`` chose was taken by someone else before the gateway bound it."""


def wait_bound(gw: Gateway, timeout: float = 90) -> Gateway:
    """``wait_ready``, telling a lost port race (worth a retry) from a real failure."""
    try:
        return wait_ready(gw, timeout)
    except RuntimeError:
        if gw.proc.poll() is not None and "address already in use" in gw.log.read_text():
            raise PortTaken(gw.log.read_text()) from None
        raise


def start(env: dict[str, str], log_dir: Path, count: int = 1, *args: str) -> list[Gateway]:
    """Start ``count`` gateways together and wait for all of them; one that lost its
    port to another process is started again on another."""
    gws = [spawn(env, log_dir, *args) for _ in range(count)]
    ready: list[Gateway] = []
    try:
        for gw in gws:
            for _ in range(3):
                try:
                    ready.append(wait_bound(gw))
                    break
                except PortTaken:
                    gw = spawn(env, log_dir, *args)
            else:
                raise RuntimeError("three ports in a row were taken before a gateway bound them")
        return ready
    except BaseException:
        for gw in [*gws, *ready]:
            gw.stop()
        raise


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [SERVELM, *args], env=env, capture_output=True, text=True, timeout=60, check=False
    )
