"""The models file: overlays, and errors that name the entry and the field."""

from __future__ import annotations

import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pytest

from servelm.catalog.models_file import ConfigError, load_catalog


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "servelm.toml"
    path.write_text(text)
    return path


def test_builtins_cover_the_seed_slugs_with_their_real_windows(tmp_path: Path) -> None:
    catalog = load_catalog(tmp_path)
    windows = {s.slug: s.context_window for s in catalog}
    assert windows["llama-v3p1-8b-instruct"] == 131072
    assert windows["mixtral-8x7b-instruct"] == 32768
    assert windows["mixtral-8x22b-instruct"] == 65536
    assert "smollm2-135m-instruct" in windows
    llama = catalog.resolve("llama-v3p1-8b-instruct")
    assert llama.path == tmp_path / "Meta-Llama-3.1-8B-Instruct-Q4_K_M.gguf"


def test_one_line_serves_a_seed_model_from_a_local_file(tmp_path: Path) -> None:
    weights = tmp_path / "w" / "llama.gguf"
    f = write(
        tmp_path,
        '[models.llama-v3p1-8b-instruct]\npath = "w/llama.gguf"\noutput_price = 0.3\n',
    )
    spec = load_catalog(tmp_path / "models", f).resolve("llama-v3p1-8b-instruct")
    assert spec.path == weights  # relative to the models file
    assert spec.output_price == Decimal("0.3")  # exact, not 0.29999...
    assert spec.context_window == 131072  # the built-in's other fields stay
    assert spec.tools is True


def test_remote_entry(tmp_path: Path) -> None:
    f = write(
        tmp_path,
        '[models.big]\nengine = "openai"\nbase_url = "http://127.0.0.1:9/v1"\n'
        'aliases = ["big-alias"]\ncontext_window = 4096\nmax_output_tokens = 1024\n',
    )
    spec = load_catalog(tmp_path, f).resolve("big-alias")
    assert spec.slug == "big" and spec.engine == "openai"


def test_enabled_false_leaves_a_builtin_out(tmp_path: Path) -> None:
    f = write(tmp_path, "[models.smollm2-135m-instruct]\nenabled = false\n")
    catalog = load_catalog(tmp_path, f)
    assert "smollm2-135m-instruct" not in {s.slug for s in catalog}
    assert catalog.get("smollm2") is None  # its aliases go with it
    assert catalog.get("llama-v3p1-8b-instruct") is not None


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("[models.x]\nengine = 'openai'\n", "models.x.base_url"),
        ("[models.x]\npath = 'a.gguf'\ncontext_window = -1\n", "models.x.context_window"),
        ("[models.x]\npath = 'a.gguf'\ninput_price = 'cheap'\n", "models.x.input_price"),
        ("[models.x]\npath = 'a.gguf'\ncolour = 'red'\n", "models.x.colour"),
        ("[models.x]\nengine = 'vllm'\n", "models.x.engine"),
        ("[models.x]\nslug = 'y'\npath = 'a.gguf'\n", "models.x.slug"),
        ("[models.x]\n", "models.x.path"),
        ("[models.x]\npath='a.gguf'\naliases=['smollm2']\n", "models.x.aliases"),
        ("[models.x]\npath='a.gguf'\nmax_output_tokens=99999\n", "models.x.max_output_tokens"),
        ("[models]\nx = 3\n", "models.x"),
        ("[model.x]\n", "unknown top-level key 'model'"),
        ("[models.x\n", "not valid TOML"),
    ],
)
def test_bad_entries_name_entry_and_field(tmp_path: Path, text: str, fragment: str) -> None:
    f = write(tmp_path, text)
    with pytest.raises(ConfigError) as exc:
        load_catalog(tmp_path, f)
    assert fragment in str(exc.value)
    assert str(f) in str(exc.value)
    assert "\n" not in str(exc.value)


def test_serve_with_a_bad_entry_exits_with_one_line(tmp_path: Path) -> None:
    f = write(tmp_path, "[models.broken]\nengine = 'openai'\n")
    proc = subprocess.run(
        [sys.executable, "-m", "servelm.cli", "serve", "--port", "1", "--models-file", str(f)],
        capture_output=True,
        text=True,
        timeout=120,
        env={"SERVELM_DATA_DIR": str(tmp_path), "PATH": "/usr/bin:/bin", "COLUMNS": "200"},
        check=False,
    )
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert "models.broken.base_url" in lines[0]
    assert "Traceback" not in proc.stderr
