"""What a remote engine receives for a named tool choice (issue 30): the choice as
sent, with every tool (vLLM and SGLang honour it; the embedded llama.cpp's own
translation is tested on the real engine in tests/seeds/test_tool_choice.py); and
how a Responses stream its engine breaks off ends."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from servelm.api.services import services
from servelm.catalog.specs import Catalog
from servelm.errors import UpstreamError
from tests.conftest import LiveServer, make_settings, start_server
from tests.fast.conftest import SPEC
from tests.support.scripted_engine import Script, ScriptedEngine, scripted_factory

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
    engine = services(srv.app).engines["tooly"]
    assert isinstance(engine, ScriptedEngine)
    return engine.bodies[-1]


def test_a_named_choice_reaches_a_remote_engine_as_sent(tooly: LiveServer) -> None:
    tools = [{"type": "function", "function": f} for f in (OTHER, FN)]
    body = sent(tooly, {"tools": tools, "tool_choice": NAMED})
    assert body["tool_choice"] == NAMED
    assert [t["function"]["name"] for t in body["tools"]] == ["get_weather", "get_time"]  # type: ignore[attr-defined]


def test_the_legacy_function_call_rides_on_the_named_choice(tooly: LiveServer) -> None:
    body = sent(tooly, {"functions": [OTHER, FN], "function_call": {"name": "get_time"}})
    assert body["tool_choice"] == NAMED and body["parallel_tool_calls"] is False


def test_a_responses_stream_cut_by_its_engine_ends_with_an_error_event(
    tooly: LiveServer,
) -> None:
    """After the headers, a failure is the Responses ``error`` event, numbered after
    the events before it, and nothing after it (no response.completed)."""
    engine = services(tooly.app).engines["tooly"]
    assert isinstance(engine, ScriptedEngine)
    engine.push(Script(error=UpstreamError("the upstream went away"), fail_after=2))
    with httpx.stream(
        "POST",
        f"{tooly.v1}/responses",
        json={"model": "tooly", "input": "hi", "stream": True},
        headers=tooly.headers(),
        timeout=30,
    ) as r:
        assert r.status_code == 200
        lines = [line for line in r.iter_lines() if line]
    names = [line.removeprefix("event: ") for line in lines if line.startswith("event: ")]
    data = [json.loads(line.removeprefix("data: ")) for line in lines if line.startswith("data: ")]
    assert names[0] == "response.created" and names[-1] == "error"
    assert "response.output_text.delta" in names and "response.completed" not in names
    assert [d["sequence_number"] for d in data] == list(range(len(data)))
    assert data[-1] == {
        "type": "error",
        "code": "upstream_error",
        "message": "the upstream went away",
        "param": None,
        "sequence_number": len(data) - 1,
    }
