"""What a remote engine receives for a named tool choice (issue 30): the choice as
sent, with every tool (vLLM and SGLang honour it; the embedded llama.cpp's own
translation is tested on the real engine in tests/seeds/test_tool_choice.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from servelm.catalog import Catalog
from servelm.testing.scripted_engine import ScriptedEngine, scripted_factory
from tests.conftest import LiveServer, make_settings, start_server
from tests.fast.conftest import SPEC

TOOLY = SPEC.model_copy(update={"slug": "tooly", "aliases": (), "tools": True})
FN = {"name": "get_time", "parameters": {"type": "object", "properties": {}}}
OTHER = {"name": "get_weather", "parameters": {"type": "object", "properties": {}}}
NAMED = {"type": "function", "function": {"name": "get_time"}}


@pytest.fixture(scope="module")
def tooly(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    tmp: Path = tmp_path_factory.mktemp("tooly")
    srv = start_server(
        make_settings(tmp, tmp / "models"), Catalog([TOOLY]), engine_factory=scripted_factory
    )
    yield srv
    srv.stop()


def sent(srv: LiveServer, body: dict[str, object]) -> dict[str, object]:
    r = httpx.post(
        f"{srv.v1}/chat/completions",
        json={"model": "tooly", "messages": [{"role": "user", "content": "hi"}], **body},
        headers=srv.headers(),
        timeout=30,
    )
    assert r.status_code == 200, r.text
    engine: ScriptedEngine = srv.app.state.chat.engines["tooly"]
    return engine.bodies[-1]


def test_a_named_choice_reaches_a_remote_engine_as_sent(tooly: LiveServer) -> None:
    tools = [{"type": "function", "function": f} for f in (OTHER, FN)]
    body = sent(tooly, {"tools": tools, "tool_choice": NAMED})
    assert body["tool_choice"] == NAMED
    assert [t["function"]["name"] for t in body["tools"]] == ["get_weather", "get_time"]  # type: ignore[attr-defined,index]


def test_the_legacy_function_call_rides_on_the_named_choice(tooly: LiveServer) -> None:
    body = sent(tooly, {"functions": [OTHER, FN], "function_call": {"name": "get_time"}})
    assert body["tool_choice"] == NAMED and body["parallel_tool_calls"] is False
