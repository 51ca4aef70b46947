"""Issue 27.5: an engine type is one module and one registry line. The fast lane's
scripted engine becomes ``engine = "scripted"`` in a models file through that line
alone, and the app serves it with the default factory (the registry's)."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from servelm.api.services import services
from servelm.catalog.models_file import ConfigError, load_catalog
from servelm.engines import registry
from servelm.engines.pool import ModelPool
from tests.conftest import make_settings, start_server
from tests.support.scripted_engine import ScriptedEngine

MODELS = """
[models.smollm2-135m-instruct]
enabled = false

[models.toy]
engine = "scripted"
"""


def test_the_scripted_engine_is_one_registry_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(registry.ENGINE_TYPES, "scripted", "tests.support.scripted_engine")
    models_file = tmp_path / "servelm.toml"
    models_file.write_text(MODELS)
    catalog = load_catalog(tmp_path / "models", models_file)
    assert catalog.resolve("toy").engine == "scripted"
    srv = start_server(make_settings(tmp_path, tmp_path / "models"), catalog)
    try:
        models: ModelPool = services(srv.app).models
        assert isinstance(models.engines["toy"], ScriptedEngine)
        # Not a local engine (no footprint): started with the server, never unloaded.
        assert models.state("toy") == "loaded"
        r = httpx.post(
            f"{srv.v1}/chat/completions",
            json={"model": "toy", "messages": [{"role": "user", "content": "hi"}]},
            headers=srv.headers(),
            timeout=30,
        )
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"]
    finally:
        srv.stop()


def test_an_unknown_engine_type_is_a_config_error_naming_the_known_ones(tmp_path: Path) -> None:
    models_file = tmp_path / "servelm.toml"
    models_file.write_text(MODELS)
    with pytest.raises(ConfigError, match=r"models\.toy\.engine.*known: llama\.cpp, openai"):
        load_catalog(tmp_path / "models", models_file)
