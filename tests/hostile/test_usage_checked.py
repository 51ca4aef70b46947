"""Issue 25, point 5: an upstream's usage that contradicts the text it sent is billed
at what was delivered (within ±10 %), logged and counted in a metric. One test per
mode the probe found.

The upstream is ``tests.support.lying_upstream`` in its own process: its ``CLAIMS``
modes stream ``LONG`` one word a chunk (so ``len(LONG)`` tokens were delivered) with
usage that says otherwise. The gateway is a real server on SQLite.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from servelm.api.services import services
from servelm.billing.money import MICRO
from servelm.chat.conversation import estimate_prompt_tokens
from tests.conftest import LiveServer, make_settings, provision, start_server
from tests.hostile.conftest import LIAR, assert_money_sound, liar_models_file, warm_up
from tests.support.lying_upstream import LONG

# A second entry for the same upstream, never called before its one test: the
# gateway's first answer per process and model.
FRESH = "liar-fresh"
# A third, warmed up alone: its plain calls are not stopped by the other tests' lies.
PLAIN = "liar-plain"
# A fourth, warm, of unknown kind (``upstream_kind = "openai"``): never a plain call.
UNKNOWN = "liar-unknown"
DELIVERED = len(LONG)
MAX_TOKENS = 50


@pytest.fixture(scope="module")
def gateway(
    liar_port: int, models_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    tmp = tmp_path_factory.mktemp("checked")
    path = liar_models_file(tmp, liar_port)
    path.write_text(
        path.read_text()
        + "".join(
            f'[models.{slug}]\nengine = "openai"\nbase_url = "http://127.0.0.1:{liar_port}/v1"\n'
            "context_window = 4096\nmax_output_tokens = 512\ninput_price = 1000\n"
            f'output_price = 2000\nupstream_kind = "{kind}"\n'
            for slug, kind in ((FRESH, "openai"), (PLAIN, "vllm"), (UNKNOWN, "openai"))
        )
    )
    live = start_server(make_settings(tmp, models_dir, models_file=path))
    warm_up(live)
    warm_up(live, PLAIN)
    warm_up(live, UNKNOWN)
    yield live
    live.stop()


def new_key(live: LiveServer) -> str:
    return provision(live.db, f"checked-{uuid.uuid4().hex[:8]}", 1)


def spent(live: LiveServer, key: str) -> Decimal:
    r = httpx.get(f"{live.v1}/credits", headers={"x-api-key": key}, timeout=30)
    assert r.status_code == 200, r.text
    return 1 - Decimal(r.json()["credits"])


def cost(live: LiveServer, prompt: int, completion: int) -> Decimal:
    spec = services(live.app).catalog.resolve(LIAR)
    return Decimal(spec.cost_micro(prompt, completion)) / MICRO


def body(mode: str, **extra: Any) -> dict[str, Any]:
    return {
        "model": LIAR,
        "messages": [{"role": "user", "content": f"lie:{mode}"}],
        "max_tokens": MAX_TOKENS,
        **extra,
    }


def bound(mode: str) -> int:
    return estimate_prompt_tokens({"messages": body(mode)["messages"]})


def streamed(live: LiveServer, key: str, mode: str) -> tuple[str, dict[str, Any]]:
    """The text a streaming client received, and the usage of its last chunk."""
    text, usage = "", None
    payload = body(mode, stream=True, stream_options={"include_usage": True})
    with httpx.stream(
        "POST", f"{live.v1}/chat/completions", json=payload, headers={"x-api-key": key}, timeout=60
    ) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            data = json.loads(line[6:])
            for choice in data.get("choices") or ():
                text += choice["delta"].get("content") or ""
            usage = data.get("usage") or usage
    assert usage is not None
    return text, usage


def seen(live: LiveServer) -> list[bool]:
    """The ``stream`` flag of every call the lying upstream got."""
    base = services(live.app).catalog.resolve(LIAR).base_url
    assert base is not None
    return list(httpx.get(base.removesuffix("/v1") + "/seen", timeout=10).json())


def corrected(live: LiveServer, count: str, direction: str) -> float:
    page = httpx.get(f"{live.base_url}/metrics", timeout=10).text
    pattern = (
        rf'^servelm_usage_corrected_total\{{count="{count}",direction="{direction}",'
        rf'model="{LIAR}"\}} (\S+)$'
    )
    found = re.search(pattern, page, re.M)
    return float(found.group(1)) if found else 0.0


def assert_near_delivered(live: LiveServer, key: str, prompt: int) -> None:
    """Charged within ±10 % of the prompt and the tokens delivered."""
    truth = cost(live, prompt, DELIVERED)
    assert abs(spent(live, key) - truth) <= truth / 10, (spent(live, key), truth)


def test_a_claim_of_100000_tokens_for_a_short_answer_pays_what_was_sent(
    gateway: LiveServer,
) -> None:
    key = new_key(gateway)
    before = corrected(gateway, "completion", "high")
    text, usage = streamed(gateway, key, "claims-huge")
    assert text == "".join(LONG)
    assert usage["completion_tokens"] == DELIVERED
    assert usage["prompt_tokens"] == 11  # within the prompt's bounds: the engine's count
    assert spent(gateway, key) == cost(gateway, 11, DELIVERED)
    assert_near_delivered(gateway, key, 11)
    assert corrected(gateway, "completion", "high") == before + 1
    assert_money_sound(gateway)


def test_usage_of_zero_for_a_whole_answer_pays_what_was_sent(gateway: LiveServer) -> None:
    key = new_key(gateway)
    before = corrected(gateway, "completion", "low")
    text, usage = streamed(gateway, key, "claims-zero")
    assert len(text) > 200
    assert usage["completion_tokens"] == DELIVERED
    # A prompt of 0 tokens is not a count: the prompt pays its bound, never 0.
    assert usage["prompt_tokens"] == bound("claims-zero")
    assert_near_delivered(gateway, key, bound("claims-zero"))
    assert corrected(gateway, "completion", "low") == before + 1
    assert corrected(gateway, "prompt", "low") >= 1
    assert_money_sound(gateway)


def test_usage_in_an_early_chunk_then_more_content_pays_every_chunk(
    gateway: LiveServer,
) -> None:
    """The upstream's count as of its first word, then 40 more words and no usage."""
    key = new_key(gateway)
    text, usage = streamed(gateway, key, "usage-early")
    assert text == "".join(LONG)
    assert usage["completion_tokens"] == DELIVERED
    assert usage["prompt_tokens"] == 11
    assert_near_delivered(gateway, key, 11)
    assert_money_sound(gateway)


def test_the_first_plain_answer_without_usage_pays_what_was_sent(gateway: LiveServer) -> None:
    """The first answer per process and model, to a plain client, from an upstream
    that never reports usage: it was once a plain call, billed as one token."""
    key = new_key(gateway)
    r = httpx.post(
        f"{gateway.v1}/chat/completions",
        json={**body("no-usage"), "model": FRESH},
        headers={"x-api-key": key},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == "".join(LONG)
    assert r.json()["usage"]["completion_tokens"] == DELIVERED
    prompt = bound("no-usage")  # no count of the prompt at all: its bound
    assert r.json()["usage"]["prompt_tokens"] == prompt
    assert Decimal(r.headers["x-cost"]) == cost(gateway, prompt, DELIVERED)
    assert_near_delivered(gateway, key, prompt)
    assert_money_sound(gateway)


def test_a_warm_plain_answer_without_usage_from_an_unknown_kind_pays_what_was_sent(
    gateway: LiveServer,
) -> None:
    """The case left by the first pass: a warm engine made plain calls for plain
    clients, and a plain answer without usage could only be estimated from its bytes
    (+22 % for 41 tokens). An upstream of unknown kind is now always streamed, each
    token delivered counted, and the plain answer assembled: exact."""
    key = new_key(gateway)
    r = httpx.post(
        f"{gateway.v1}/chat/completions",
        json={**body("no-usage"), "model": UNKNOWN},
        headers={"x-api-key": key},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    assert seen(gateway)[-1] is True  # a streamed call, though the client is plain
    assert r.json()["choices"][0]["message"]["content"] == "".join(LONG)
    assert r.json()["usage"]["completion_tokens"] == DELIVERED
    prompt = bound("no-usage")
    assert Decimal(r.headers["x-cost"]) == cost(gateway, prompt, DELIVERED)
    assert_money_sound(gateway)


def test_a_plain_answer_claiming_100000_tokens_is_bounded_by_its_bytes(
    gateway: LiveServer,
) -> None:
    """A plain call (a warm engine of a known kind) has no chunks to count: a count above the
    bytes it sent is replaced by their estimate, under ``max_tokens``, and the engine
    is streamed from then on, where the next answer pays what it delivered."""
    key = new_key(gateway)
    r = httpx.post(
        f"{gateway.v1}/chat/completions",
        json={**body("claims-huge"), "model": PLAIN},
        headers={"x-api-key": key},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    assert seen(gateway)[-1] is False  # a plain call
    billed = r.json()["usage"]["completion_tokens"]
    assert billed == min(MAX_TOKENS, -(-len("".join(LONG).encode()) // 4))
    again = httpx.post(
        f"{gateway.v1}/chat/completions",
        json={**body("claims-huge"), "model": PLAIN},
        headers={"x-api-key": key},
        timeout=60,
    )
    assert again.status_code == 200, again.text
    assert seen(gateway)[-1] is True
    assert again.json()["usage"]["completion_tokens"] == DELIVERED
    assert_money_sound(gateway)
