"""Issue 29.11: the commands that ask a server find the one the user started, on
whatever port, and say how to point them at it when none answers."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import procs

pytestmark = pytest.mark.slow  # a real `servelm serve` process


def test_models_list_finds_the_server_serve_started(tmp_path: Path, models_dir: Path) -> None:
    env = procs.gateway_env(tmp_path, models_dir, COLUMNS="200")
    env.pop("SERVELM_PORT", None)
    (gw,) = procs.start(env, tmp_path / "logs")  # `servelm serve --port <free port>`
    try:
        assert gw.port != 8000
        listed = procs.cli(env, "models", "list")  # no --url, no SERVELM_PORT
        assert listed.returncode == 0, listed.stderr
        assert f"load state from the server at http://127.0.0.1:{gw.port}" in listed.stdout
        assert "loaded" in listed.stdout
    finally:
        gw.stop()
    assert not (tmp_path / "server.json").exists()  # removed at exit
    alone = procs.cli(env, "models", "list")
    assert "no server answered at http://127.0.0.1:8000" in alone.stdout
    assert "--url" in alone.stdout and "servelm serve" in alone.stdout
