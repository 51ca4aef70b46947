"""Issue 16 in the fast lane: parameters that were silently ignored, internals in API
errors, the admin API and key grants, the models file, and the CLI and README
agreeing with the settings (the engine-level points are in tests/conformance)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from servelm.api.services import services
from servelm.catalog.models_file import ConfigError, load_catalog
from servelm.catalog.specs import Catalog, ModelSpec
from servelm.chat.request_fields import HONOURED, IGNORED, REFUSED
from servelm.cli import app as cli_app
from servelm.cli.docs_tables import render
from servelm.config import Settings, settings_table
from servelm.engines.registry import build_engine
from tests.conftest import ADMIN_TOKEN, LiveServer, free_port, make_settings, start_server
from tests.fast.conftest import SLUG, SPEC, new_key
from tests.support.scripted_engine import ScriptedEngine, scripted_factory

README = Path(__file__).parents[2] / "README.md"
MSGS: list[Any] = [{"role": "user", "content": "hi"}]
TOOL: Any = {"type": "function", "function": {"name": "get_weather", "parameters": {}}}
runner = CliRunner()


def post(srv: LiveServer, body: dict[str, Any], route: str = "openai") -> httpx.Response:
    url = f"{srv.v1}/chat/completions" if route == "openai" else f"{srv.v1}/{SLUG}"
    payload = {"model": SLUG, **body} if route == "openai" else body
    return httpx.post(url, json=payload, headers=srv.headers(), timeout=30)


# -- 3: parameters are honoured, translated, listed as ignored, or refused -----------------


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"tool_choice": "auto"}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"parallel_tool_calls": False}, "parallel_tool_calls"),
        (
            {"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
        ),
        ({"functions": [TOOL["function"]], "tools": [TOOL]}, "functions"),
        ({"audio": {"voice": "alloy", "format": "mp3"}}, "audio"),
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"prediction": {"type": "content", "content": "x"}}, "prediction"),
        ({"reasoning_effort": "high"}, "reasoning_effort"),
    ],
)
def test_parameters_that_would_change_the_answer_are_refused_not_dropped(
    fast: LiveServer, extra: dict[str, Any], param: str
) -> None:
    r = post(fast, {"messages": MSGS, **extra})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_legacy_functions_become_tools_and_reach_the_400_for_a_model_without_tools(
    fast: LiveServer,
) -> None:
    r = post(fast, {"messages": MSGS, "functions": [TOOL["function"]]})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "tools"


def test_legacy_function_call_becomes_tool_choice(fast: LiveServer) -> None:
    r = post(
        fast,
        {"messages": MSGS, "functions": [TOOL["function"]], "function_call": {"name": "nope"}},
    )
    assert r.status_code == 400
    assert "nope" in r.json()["error"]["message"]


def test_bookkeeping_fields_are_accepted(fast: LiveServer, engine: ScriptedEngine) -> None:
    extra = {
        "user": "u-1",
        "metadata": {"k": "v"},
        "store": False,
        "service_tier": "auto",
        "prompt_cache_key": "p",
        "modalities": ["text"],
        "tool_choice": "none",
    }
    assert post(fast, {"messages": MSGS, **extra}).status_code == 200
    assert not set(extra) & set(engine.bodies[-1]) - {"tool_choice"}


def test_every_field_of_the_request_model_is_in_the_conformance_table() -> None:
    from servelm.chat.protocol import ChatRequest

    listed = set(HONOURED) | set(IGNORED) | set(REFUSED)
    extensions = {"ignore_eos", "min_tokens"}  # llama.cpp/vLLM's, for benchmarks
    assert set(ChatRequest.model_fields) - extensions <= listed
    assert not set(HONOURED) & set(IGNORED) and not set(IGNORED) & set(REFUSED)


def test_the_readme_tables_are_what_the_code_generates() -> None:
    text = README.read_text()
    assert render(text) == text, "run `make readme`"
    assert settings_table() in text


# -- 7: internals stay with the operator --------------------------------------------------


@pytest.fixture
def broken(tmp_path: Path) -> Iterator[LiveServer]:
    missing = ModelSpec(slug="missing", path=tmp_path / "secret-dir" / "weights.gguf")
    remote = ModelSpec(
        slug="remote",
        engine="openai",
        base_url=f"http://127.0.0.1:{free_port()}/secret-upstream/v1",
        timeout=5,
        tools=True,
        structured_output=False,
    )

    def factory(spec: ModelSpec, settings: Settings) -> Any:
        return (
            scripted_factory(spec, settings) if spec.slug == SLUG else build_engine(spec, settings)
        )

    srv = start_server(
        make_settings(tmp_path, tmp_path / "models", admin_token=ADMIN_TOKEN),
        Catalog([SPEC, missing, remote]),
        engine_factory=factory,
    )
    yield srv
    srv.stop()


def test_errors_name_no_paths_or_addresses_and_the_admin_sees_them(broken: LiveServer) -> None:
    r = httpx.post(f"{broken.v1}/missing", json={"messages": MSGS}, headers=broken.headers())
    assert r.status_code == 404 and "retry-after" not in r.headers
    assert r.json()["error"] == "Model 'missing' is not installed on this server; ask its operator."
    r = httpx.post(
        f"{broken.v1}/chat/completions",
        json={"model": "remote", "messages": MSGS},
        headers=broken.headers(),
        timeout=30,
    )
    # Its only replica failed the start-up probe: every replica down is a 503 (issue 12).
    assert r.status_code == 503
    message = r.json()["error"]["message"]
    assert "127.0.0.1" not in message and "secret" not in message and "down" in message
    admin = httpx.get(
        f"{broken.base_url}/admin/models", headers={"authorization": f"Bearer {ADMIN_TOKEN}"}
    ).json()["data"]
    by_id = {m["id"]: m for m in admin}
    assert "secret-dir" in by_id["missing"]["reason"]
    assert by_id["missing"]["state"] == "unavailable"
    assert by_id[SLUG]["state"] == "loaded"
    assert "secret-upstream" in by_id["remote"]["upstream"]


def chat_requests(srv: LiveServer, status: int) -> float:
    """OpenAI-route requests the server answered with ``status``, from its metrics."""
    text = httpx.get(f"{srv.base_url}/metrics").text
    line = f'servelm_requests_total{{route="openai_chat",status="{status}"}} '
    return sum(float(x.removeprefix(line)) for x in text.splitlines() if x.startswith(line))


def test_a_model_not_installed_fails_at_once_through_the_openai_sdk(broken: LiveServer) -> None:
    """Issue 30: a 503 with Retry-After: 60 made the SDK retry twice (about two
    minutes) for an error that was permanent. With its default retries, one request
    reaches the server and the error says what it is."""
    import openai

    client = openai.OpenAI(base_url=broken.v1, api_key=broken.api_key)
    assert client.max_retries == 2  # the default, which retries 503s
    before = chat_requests(broken, 404)
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="missing", messages=MSGS)
    assert chat_requests(broken, 404) == before + 1
    assert chat_requests(broken, 503) == 0
    error = caught.value
    assert error.code == "model_not_installed" and error.param == "model"
    assert "retry-after" not in error.response.headers
    assert "not installed" in error.message


def test_models_say_what_each_model_takes(broken: LiveServer) -> None:
    """Issue 30: clients whose structured output goes through tools can tell in
    advance; what the card denies is a 400 naming the field."""
    import openai

    client = openai.OpenAI(base_url=broken.v1, api_key=broken.api_key, max_retries=0)
    cards = {m.id: m.model_extra or {} for m in client.models.list()}
    assert cards[SLUG]["capabilities"] == {
        "tools": False,
        "structured_output": True,
        "vision": False,
        "context_window": SPEC.context_window,
        "max_output_tokens": SPEC.max_output_tokens,
    }
    remote = cards["remote"]["capabilities"]
    assert remote["tools"] is True and remote["structured_output"] is False
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model="remote", messages=MSGS, response_format={"type": "json_object"}
        )
    assert caught.value.param == "response_format"
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=SLUG, messages=MSGS, tools=[TOOL])
    assert caught.value.param == "tools"


# -- 8: images on a text model (issue 29.16: what to configure is the operator's, in the log)


def test_images_on_a_text_model_say_what_would_make_it_see(
    fast: LiveServer, caplog: pytest.LogCaptureFixture
) -> None:
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    body = {"messages": [{"role": "user", "content": [{"type": "text", "text": "x"}, image]}]}
    services(fast.app).chat.told_no_images.discard(SLUG)  # the log line comes once per model
    with caplog.at_level("WARNING", logger="servelm.chat.serving"):
        r = post(fast, body, route="segmind")
    assert r.status_code == 400
    assert "takes no images" in r.json()["error"] and "vision = true" not in r.json()["error"]
    assert any("vision = true" in rec.getMessage() for rec in caplog.records)


# -- 9 and 15: the models file -------------------------------------------------------------


def test_an_unquoted_dotted_model_name_gets_told_to_quote_it(tmp_path: Path) -> None:
    f = tmp_path / "servelm.toml"
    f.write_text('[models.qwen2.5-7b]\npath = "/x.gguf"\n')
    with pytest.raises(ConfigError, match=re.escape('quote the model name: [models."qwen2.5-7b"]')):
        load_catalog(tmp_path, f)


def test_a_smaller_window_alone_brings_the_output_limits_with_it(tmp_path: Path) -> None:
    f = tmp_path / "servelm.toml"
    f.write_text('[models."llama-v3p1-8b-instruct"]\ncontext_window = 4096\n')
    spec = load_catalog(tmp_path, f).resolve("llama-v3p1-8b-instruct")
    assert (spec.context_window, spec.max_output_tokens, spec.default_max_tokens) == (
        4096,
        4096,
        1024,
    )
    f.write_text(
        '[models."llama-v3p1-8b-instruct"]\ncontext_window = 4096\nmax_output_tokens = 8192\n'
    )
    with pytest.raises(ConfigError, match="max_output_tokens: above context_window"):
        load_catalog(tmp_path, f)


# -- 13 and 14: the admin API and key grants -----------------------------------------------


def admin(srv: LiveServer) -> httpx.Client:
    return httpx.Client(
        base_url=f"{srv.base_url}/admin", headers={"authorization": f"Bearer {ADMIN_TOKEN}"}
    )


def test_admin_takes_numbers_names_and_printed_key_ids(fast: LiveServer) -> None:
    with admin(fast) as a:
        name = f"acme-{free_port()}"
        assert a.post("/accounts", json={"name": name}).status_code == 201
        r = a.post(f"/accounts/{name}/credits", json={"credits": 2.5})
        assert r.status_code == 200 and r.json()["credits"] == "2.500000"
        r = a.post(f"/accounts/{name}/credits", json={"credits": "0.1"})
        assert r.json()["credits"] == "2.600000"
        assert a.get(f"/accounts/{name}").json()["credits"] == "2.600000"
        key = a.post(f"/accounts/{name}/keys", json={"allowed_models": ["s"]}).json()
        assert key["allowed_models"] == [SLUG]  # the alias, stored as its slug
        printed = f"slm_{key['key_id']}_***"
        assert a.post(f"/keys/{printed}/revoke").json()["revoked"] is True


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"allowed_models": ["nosuch-model"]}, "allowed_models"),
        ({"expires_at": "2020-01-01T00:00:00Z"}, "expires_at"),
    ],
)
def test_admin_refuses_unknown_models_and_past_expiry(
    fast: LiveServer, body: dict[str, Any], param: str
) -> None:
    _, account_id = new_key(fast.db, 0)
    with admin(fast) as a:
        r = a.post(f"/accounts/{account_id}/keys", json=body)
    assert r.status_code == 400
    assert r.json()["error"]["param"] == param


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--model", "nosuch-model"], "No model 'nosuch-model'"),
        (["--expires", "2020-01-01"], "in the past"),
    ],
)
def test_cli_refuses_unknown_models_and_past_expiry(
    tmp_path: Path, args: list[str], says: str
) -> None:
    env = {"SERVELM_DATA_DIR": str(tmp_path), "COLUMNS": "200"}
    assert runner.invoke(cli_app, ["accounts", "create", "acme"], env=env).exit_code == 0
    result = runner.invoke(cli_app, ["keys", "create", "acme", *args], env=env)
    assert result.exit_code == 1
    assert says in result.output
    ok = runner.invoke(
        cli_app,
        ["keys", "create", "acme", "--model", "smollm2", "--expires", "2099-01-01"],
        env=env,
    )
    assert ok.exit_code == 0, ok.output
    listed = runner.invoke(cli_app, ["keys", "list", "acme"], env=env).output
    assert "smollm2-135m-instruct" in listed


# -- 11, 12: the CLI reads the server's settings --------------------------------------------


def test_models_list_asks_the_server_its_settings_name(fast: LiveServer, tmp_path: Path) -> None:
    port = fast.base_url.rsplit(":", 1)[1]
    env = {
        "SERVELM_DATA_DIR": str(tmp_path),
        "SERVELM_PORT": port,
        "SERVELM_ADMIN_TOKEN": ADMIN_TOKEN,
        "COLUMNS": "250",
    }
    result = runner.invoke(cli_app, ["models", "list"], env=env)
    assert result.exit_code == 0, result.output
    assert f"load state from the server at http://127.0.0.1:{port}" in result.output


def test_every_setting_is_a_serve_flag_and_an_env_var() -> None:
    text = runner.invoke(cli_app, ["serve", "--help"], env={"COLUMNS": "300"}).output
    for name in Settings.model_fields:
        assert f"--{name.replace('_', '-')}" in text
        assert f"SERVELM_{name.upper()}" in text


def test_the_readme_documents_health_metrics_and_docs() -> None:
    text = README.read_text()
    for path in ("GET /health", "GET /metrics", "GET /docs"):
        assert path in text
    assert ".venv/bin/servelm" in text and "source .venv/bin/activate" in text


# -- 5: usage details and the fingerprint, streamed too --------------------------------------


def test_stream_chunks_carry_the_fingerprint_and_usage_its_details(fast: LiveServer) -> None:
    body = {
        "model": SLUG,
        "messages": MSGS,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    chunks = []
    with httpx.stream(
        "POST", f"{fast.v1}/chat/completions", json=body, headers=fast.headers()
    ) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                chunks.append(json.loads(line[6:]))
    assert {c["system_fingerprint"] for c in chunks} == {chunks[0]["system_fingerprint"]}
    usage = chunks[-1]["usage"]
    assert usage["prompt_tokens_details"] == {"cached_tokens": 0}
    assert usage["completion_tokens_details"]["reasoning_tokens"] == 0
