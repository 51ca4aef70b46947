"""A slug served by a remote engine: a separate llama.cpp server process on loopback."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from servelm.api.services import services
from servelm.billing.money import MICRO
from servelm.engines.fleet.replicas import RUN
from tests.conftest import LiveServer, free_port, make_settings, provision, start_server

pytestmark = pytest.mark.slow  # real engine processes or models: seconds each

REMOTE = "remote-smol"


LLAMA_SERVER = "tests.support.llama_server"


def _spawn_engine(model: Path, port: int) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.support.llama_server",
            str(model),
            "--port",
            str(port),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("READY"), line
    return proc


@pytest.fixture(scope="module")
def engine_proc(models_dir: Path) -> Iterator[tuple[subprocess.Popen[str], int]]:
    port = free_port()
    proc = _spawn_engine(models_dir / "SmolLM2-135M-Instruct.Q4_1.gguf", port)
    yield proc, port
    proc.kill()
    proc.wait()


@pytest.fixture(scope="module")
def silent_port() -> Iterator[int]:
    """A TCP server that accepts connections and never answers: the timeout case."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    conns: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        sock.settimeout(0.2)
        while not stop.is_set():
            try:
                conns.append(sock.accept()[0])
            except TimeoutError:
                continue

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    yield sock.getsockname()[1]
    stop.set()
    t.join()
    for c in conns:
        c.close()
    sock.close()


@pytest.fixture(scope="module")
def gateway(
    engine_proc: tuple[subprocess.Popen[str], int],
    silent_port: int,
    models_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[LiveServer]:
    tmp = tmp_path_factory.mktemp("upstream")
    _, port = engine_proc
    models_file = tmp / "servelm.toml"
    models_file.write_text(
        f"""
[models.{REMOTE}]
engine = "openai"
base_url = "http://127.0.0.1:{port}/v1"
upstream_model = "smollm2"
context_window = 8192
max_output_tokens = 1024
input_price = 1000
output_price = 3000

[models.remote-silent]
engine = "openai"
base_url = "http://127.0.0.1:{silent_port}/v1"
timeout = 0.5
"""
    )
    srv = start_server(make_settings(tmp, models_dir, models_file=models_file))
    yield srv
    srv.stop()


MSGS: list[ChatCompletionMessageParam] = [{"role": "user", "content": "tell me a joke on cats"}]


def test_remote_slug_serves_openai_route(gateway: LiveServer) -> None:
    client = openai.OpenAI(base_url=gateway.v1, api_key=gateway.api_key, max_retries=0)
    resp = client.chat.completions.create(model=REMOTE, messages=MSGS, max_tokens=8)
    assert resp.model == REMOTE
    assert resp.usage is not None
    assert resp.usage.completion_tokens == 8 or resp.choices[0].finish_reason == "stop"
    # Same tokenizer and template as the local default model: the upstream's own
    # usage must count the prompt the way the local engine does.
    local = client.chat.completions.create(
        model="smollm2-135m-instruct", messages=MSGS, max_tokens=1
    )
    assert local.usage is not None
    assert resp.usage.prompt_tokens == local.usage.prompt_tokens


def test_remote_slug_streams_on_the_segmind_route(gateway: LiveServer) -> None:
    body = {
        "messages": MSGS,
        "max_tokens": 6,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    events = []
    with httpx.stream(
        "POST", f"{gateway.base_url}/v1/{REMOTE}", json=body, timeout=60, headers=gateway.headers()
    ) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["model"] == REMOTE for c in chunks)
    assert chunks[-1]["usage"]["completion_tokens"] >= 1
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text


def test_remote_charges_follow_the_upstreams_usage(gateway: LiveServer) -> None:
    """Non-streaming and streaming: the charge is the upstream's reported tokens at the
    entry's prices, and the balance falls by exactly that."""
    spec = services(gateway.app).catalog.resolve(REMOTE)
    key = provision(gateway.db, "remote-payer", 1)
    r = httpx.post(
        f"{gateway.v1}/{REMOTE}",
        json={"messages": MSGS, "max_tokens": 5},
        headers={"x-api-key": key},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    u = r.json()["usage"]
    assert Decimal(r.headers["x-cost"]) * MICRO == spec.cost_micro(
        u["prompt_tokens"], u["completion_tokens"]
    )
    after_first = Decimal(r.headers["x-remaining-credits"])
    assert after_first == 1 - Decimal(r.headers["x-cost"])
    body = {"model": REMOTE, "messages": MSGS, "max_tokens": 5, "stream": True}
    with httpx.stream(
        "POST",
        f"{gateway.v1}/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {key}"},
        timeout=60,
    ) as s:
        events = [line.removeprefix("data: ") for line in s.iter_lines() if line]
    su = json.loads(events[-2])["usage"]
    assert Decimal(str(su["cost"])) * MICRO == spec.cost_micro(
        su["prompt_tokens"], su["completion_tokens"]
    )
    assert Decimal(str(su["remaining_credits"])) == after_first - Decimal(str(su["cost"]))


def test_upstream_rejection_is_a_400_with_its_numbers(gateway: LiveServer) -> None:
    r = httpx.post(
        f"{gateway.base_url}/v1/chat/completions",
        json={"model": REMOTE, "messages": [{"role": "user", "content": "cat " * 9000}]},
        timeout=60,
        headers=gateway.headers(),
    )
    assert r.status_code == 400, r.text
    assert "8192" in r.json()["error"]["message"]


def test_silent_upstream_is_503_with_retry_after(gateway: LiveServer) -> None:
    # Its health probe timed out at start-up, so it is out of rotation: with no
    # replica left the answer is 503 at once (tests/fleet/test_faults.py has the 504
    # of an upstream that answers probes but hangs on a chat).
    r = httpx.post(
        f"{gateway.base_url}/v1/remote-silent",
        json={"messages": MSGS},
        timeout=30,
        headers=gateway.headers(),
    )
    assert r.status_code == 503
    assert "down" in r.json()["error"]
    assert int(r.headers["retry-after"]) >= 1
    before = Decimal(r.headers["x-remaining-credits"])
    again = httpx.post(
        f"{gateway.base_url}/v1/remote-silent",
        json={"messages": MSGS},
        timeout=30,
        headers=gateway.headers(),
    )
    assert Decimal(again.headers["x-remaining-credits"]) == before  # nothing charged


def test_stopped_upstream_is_502_not_500(
    gateway: LiveServer, engine_proc: tuple[subprocess.Popen[str], int]
) -> None:
    # Runs last in this module (pytest keeps file order): it kills the shared engine.
    proc, _ = engine_proc
    proc.kill()
    proc.wait()
    r = httpx.post(
        f"{gateway.base_url}/v1/{REMOTE}",
        json={"messages": MSGS},
        timeout=30,
        headers=gateway.headers(),
    )
    assert r.status_code == 502
    assert "unreachable" in r.json()["error"]
    balance = httpx.get(f"{gateway.v1}/credits", headers=gateway.headers()).json()["credits"]
    assert r.headers["x-remaining-credits"] == balance  # the hold came back whole
    # One failure never ejects a model's only replica; a run of them does (or the next
    # failed probe): from then on 503 until a probe readmits it.
    client = openai.OpenAI(base_url=gateway.v1, api_key=gateway.api_key, max_retries=0)
    statuses = []
    for _ in range(RUN):
        with pytest.raises(openai.APIStatusError) as exc:
            client.chat.completions.create(model=REMOTE, messages=MSGS, stream=True)
        statuses.append(exc.value.status_code)
    assert statuses[-1] == 503 and set(statuses[:-1]) <= {502, 503}, statuses
