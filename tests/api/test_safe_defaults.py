"""Safe deploy defaults: placeholder secrets stop a gateway and a worker before they
serve; the first start's key reaches a terminal only; ``/metrics`` can demand a token
and names replicas without their addresses. Real ``servelm`` processes (a pty for the
terminal), a real gateway and upstreams in threads."""

from __future__ import annotations

import os
import pty
import re
import select
import signal
import stat
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

from servelm.catalog.specs import Catalog, ModelSpec
from tests.conftest import free_port, make_settings, start_server
from tests.procs import SERVELM, gateway_env
from tests.servers import serve_in_thread
from tests.support import instant_upstream

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
KEY = re.compile(r"slm_[a-z0-9]{12}_[A-Za-z0-9_-]{43}")


def k8s_gateway_env(tmp: Path) -> tuple[list[str], dict[str, str]]:
    """The gateway's command and environment as `kubectl apply -f deploy/k8s/` gives
    them: plain values, values from the Secret, the models file Secret mounted."""
    secrets: dict[str, dict[str, str]] = {}
    for doc in yaml.safe_load_all((K8S / "secrets.yaml").read_text()):
        secrets[doc["metadata"]["name"]] = doc["stringData"]
    (deployment,) = [
        d for d in yaml.safe_load_all((K8S / "gateway.yaml").read_text())
        if d["kind"] == "Deployment"
    ]  # fmt: skip
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    env: dict[str, str] = {}
    for entry in container["env"]:
        if "value" in entry:
            env[entry["name"]] = entry["value"]
        else:
            ref = entry["valueFrom"]["secretKeyRef"]
            env[entry["name"]] = secrets[ref["name"]][ref["key"]]
    models = tmp / "servelm.toml"
    models.write_text(secrets["servelm-models"]["servelm.toml"])
    assert env["SERVELM_MODELS_FILE"] == "/etc/servelm/servelm.toml"
    env["SERVELM_MODELS_FILE"] = str(models)
    env["SERVELM_DATA_DIR"] = str(tmp / "data")
    return container["command"], env


def test_kubectl_apply_with_placeholder_secrets_ends_in_a_refusal(tmp_path: Path) -> None:
    command, env = k8s_gateway_env(tmp_path)
    assert command[:2] == ["servelm", "serve"]
    base = {k: v for k, v in os.environ.items() if not k.startswith("SERVELM_")}
    run = subprocess.run(
        [SERVELM, *command[1:]], env={**base, **env}, capture_output=True, text=True,
        timeout=60, check=False,
    )  # fmt: skip
    assert run.returncode == 2, run.stdout + run.stderr
    said = " ".join(run.stderr.split())
    assert "refusing to start" in said
    for name in ("SERVELM_ADMIN_TOKEN", "SERVELM_SESSION_SECRET", "SERVELM_METRICS_TOKEN",
                 "SERVELM_DATABASE_URL (its password)",
                 "api_key of model smollm2-135m-instruct"):  # fmt: skip
        assert name in said, said
    # Nothing was created: it stopped before its first start.
    assert not (tmp_path / "data").exists()

    # Every secret set but the worker key in the models file: that one is named alone.
    secrets = ("SERVELM_ADMIN_TOKEN", "SERVELM_SESSION_SECRET", "SERVELM_METRICS_TOKEN")
    fixed = {k: "s3-" + os.urandom(8).hex() for k in secrets}
    fixed["SERVELM_DATABASE_URL"] = env["SERVELM_DATABASE_URL"].replace("change-me", "pw")
    run = subprocess.run(
        [SERVELM, *command[1:]], env={**base, **env, **fixed}, capture_output=True,
        text=True, timeout=60, check=False,
    )  # fmt: skip
    assert run.returncode == 2
    said = " ".join(run.stderr.split())
    assert "api_key of model smollm2-135m-instruct" in said and "SERVELM_" not in said, said


def test_a_worker_refuses_the_placeholder_key(tmp_path: Path) -> None:
    example = (ROOT / "deploy" / "env.example").read_text()
    found = re.search(r"^SERVELM_WORKER_KEY=(.+)$", example, re.MULTILINE)
    assert found is not None
    base = {k: v for k, v in os.environ.items() if not k.startswith("SERVELM_")}
    run = subprocess.run(
        [SERVELM, "worker", "--model", "smollm2-135m-instruct", "--host", "0.0.0.0"],
        env={**base, "SERVELM_WORKER_KEY": found.group(1), "SERVELM_DATA_DIR": str(tmp_path)},
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert run.returncode == 2
    assert "SERVELM_WORKER_KEY" in " ".join(run.stderr.split())


# -- the first start's key ----------------------------------------------------------------


def _read_until(fd: int, pattern: re.Pattern[str], timeout: float = 90) -> str:
    """Reads a pty until ``pattern`` shows (the gateway prints before it serves)."""
    seen = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # the other end closed: the process is gone
                break
            if not chunk:
                break
            seen += chunk
            if pattern.search(seen.decode(errors="replace")):
                return seen.decode(errors="replace")
    raise AssertionError(f"{pattern.pattern!r} not seen in:\n{seen.decode(errors='replace')}")


def _stop(proc: subprocess.Popen[Any]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=30)


def test_the_first_key_goes_to_a_terminal(tmp_path: Path, models_dir: Path) -> None:
    env = gateway_env(tmp_path / "data", models_dir)
    main, child = pty.openpty()
    proc = subprocess.Popen(
        [SERVELM, "serve", "--port", str(free_port())], env=env, stdout=child, stderr=child
    )
    os.close(child)
    try:
        shown = _read_until(main, KEY)
    finally:
        _stop(proc)
        os.close(main)
    assert "your API key" in shown
    assert not (tmp_path / "data" / "first-api-key").exists()


def test_without_a_terminal_the_first_key_goes_to_a_private_file(
    tmp_path: Path, models_dir: Path
) -> None:
    env = gateway_env(tmp_path / "data", models_dir, SERVELM_LOG_FORMAT="json")
    log = tmp_path / "gateway.log"
    key_file = tmp_path / "data" / "first-api-key"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [SERVELM, "serve", "--port", str(free_port())], env=env, stdout=out, stderr=out
        )
    try:
        deadline = time.monotonic() + 90
        while str(key_file) not in log.read_text() and proc.poll() is None:
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
    finally:
        _stop(proc)
    text = log.read_text()
    assert KEY.search(text) is None, "the key is in the log"
    (line,) = [line for line in text.splitlines() if str(key_file) in line]
    assert "readable by this user only" in line
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert KEY.fullmatch(key_file.read_text().strip())


# -- /metrics -----------------------------------------------------------------------------


def test_metrics_behind_a_token_and_without_replica_addresses(tmp_path: Path) -> None:
    upstreams = [serve_in_thread(instant_upstream.make_app()) for _ in range(2)]
    spec = ModelSpec(slug="far", engine="openai",
                     replicas=[f"{u.base_url}/v1" for u in upstreams])  # type: ignore[arg-type]  # fmt: skip
    token = "metrics-" + os.urandom(8).hex()
    srv = start_server(make_settings(tmp_path, tmp_path / "models", metrics_token=token),
                       Catalog([spec]))  # fmt: skip
    try:
        url = f"{srv.base_url}/metrics"
        assert httpx.get(url, timeout=10).status_code == 401
        wrong = httpx.get(url, headers={"authorization": "Bearer nope"}, timeout=10)
        assert wrong.status_code == 401
        assert "metrics token" in wrong.json()["error"]["message"]
        ok = httpx.get(url, headers={"authorization": f"Bearer {token}"}, timeout=10)
        assert ok.status_code == 200
        assert 'servelm_replica_healthy{model="far",replica="0"} 1.0' in ok.text
        assert 'servelm_replica_healthy{model="far",replica="1"} 1.0' in ok.text
        for u in upstreams:
            assert str(u.port) not in ok.text
        assert "127.0.0.1" not in ok.text
    finally:
        srv.stop()
        for u in upstreams:
            u.stop()
