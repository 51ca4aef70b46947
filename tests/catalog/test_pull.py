"""`servelm models pull` is real huggingface_hub code; here it cannot reach the hub, and
must say so clearly rather than with a traceback."""

from __future__ import annotations

import http.server
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest


def _pull(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "servelm.cli", "models", "pull", "mixtral-8x7b-instruct"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "SERVELM_DATA_DIR": str(tmp_path), "COLUMNS": "300", **env},
        check=False,
    )


@pytest.fixture
def hub_404() -> Iterator[str]:
    """A loopback HTTP server standing where the hub would be, knowing no files."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_pull_reports_an_unknown_file_clearly(tmp_path: Path, hub_404: str) -> None:
    proc = _pull(tmp_path, HF_ENDPOINT=hub_404)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert "refused TheBloke/Mixtral-8x7B-Instruct-v0.1-GGUF" in proc.stderr
    assert "HTTP 501" in proc.stderr or "HTTP 404" in proc.stderr
    assert not list((tmp_path / "models").glob("*.gguf"))


def test_pull_reports_an_unreachable_hub_clearly(tmp_path: Path) -> None:
    proc = _pull(tmp_path, HF_HUB_OFFLINE="1")
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert "could not reach the Hugging Face Hub" in proc.stderr


def test_pull_of_a_remote_model_says_there_is_nothing_to_pull(tmp_path: Path) -> None:
    f = tmp_path / "servelm.toml"
    f.write_text('[models.r]\nengine = "openai"\nbase_url = "http://127.0.0.1:9/v1"\n')
    proc = subprocess.run(
        [sys.executable, "-m", "servelm.cli", "models", "pull", "r", "--models-file", str(f)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "SERVELM_DATA_DIR": str(tmp_path), "COLUMNS": "300"},
        check=False,
    )
    assert proc.returncode == 1
    assert "remote engine" in proc.stderr
