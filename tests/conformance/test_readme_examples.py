"""Every example in the README runs, as a new user would run it after `make serve`
(issue 16's acceptance): shell blocks with bash, Python blocks with this interpreter,
the models-file block through `servelm models list`, all against a real `servelm
serve` process with the default model. Blocks that cannot run here are listed in
SKIPPED with the reason; a new block runs unless listed there."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.procs import Gateway, cli, gateway_env, start

README = Path(__file__).parents[2] / "README.md"
BLOCK = re.compile(r"^```(\w*)\n(.*?)^```", re.DOTALL | re.MULTILINE)

# First line of a block → why it does not run here.
SKIPPED = {
    "make serve   # sets up .venv, fetches the default model, serves on http://127.0.0.1:8000": (
        "a server in the foreground on port 8000 and the whole suite; this test starts "
        "its own server, as `make serve` does, on a free port"
    ),
    "src/servelm/": "the source layout, not a command",
    "servelm worker --model smollm2-135m-instruct --port 8101   # one per machine or core set": (
        "two servers in the foreground; tests/fleet runs the same topology as processes"
    ),
    "printf '127.0.0.1 workers\\n127.0.0.2 workers\\n' > workers.hosts": (
        "two workers left running in the background on a fixed port; "
        "tests/fleet/test_discovery.py runs this topology on free ports"
    ),
}

# The README's placeholders, and what stands for them here.
KEY_ID_EXAMPLE = "slm_abcdefghijkl"


def blocks() -> list[tuple[str, str]]:
    return [(lang or "text", body) for lang, body in BLOCK.findall(README.read_text())]


def block_id(block: tuple[str, str]) -> str:
    return f"{block[0]}:{block[1].splitlines()[0][:40]}"


@pytest.fixture(scope="module")
def gateway(
    models_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Gateway, dict[str, str]]]:
    tmp = tmp_path_factory.mktemp("readme")
    env = gateway_env(tmp / "data", models_dir, SERVELM_ADMIN_TOKEN="readme-admin-token")
    (gw,) = start(env, tmp / "logs")
    # Its output is no terminal: the first start's key is in a file the log names.
    key_file = tmp / "data" / "first-api-key"
    assert str(key_file) in gw.log.read_text()
    key = re.fullmatch(r"slm_[a-z0-9]{12}_[A-Za-z0-9_-]{43}\n", key_file.read_text())
    assert key is not None, "the first start writes the key"
    spare = cli(env, "keys", "create", "default", "--name", "spare")
    assert spare.returncode == 0, spare.stderr
    spare_id = re.search(r"key ([a-z0-9]{12}) ", spare.stdout)
    assert spare_id is not None, spare.stdout
    run_env = {
        **env,
        "KEY": key.group(0).strip(),
        "ADMIN_TOKEN": env["SERVELM_ADMIN_TOKEN"],
        # What `source .venv/bin/activate` does for `servelm`.
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "KEY_ID": f"slm_{spare_id.group(1)}",
        "COLUMNS": "200",
    }
    yield gw, run_env
    gw.stop()


def localize(text: str, gw: Gateway, env: dict[str, str]) -> str:
    text = text.replace("localhost:8000", f"127.0.0.1:{gw.port}")
    text = text.replace("127.0.0.1:8000", f"127.0.0.1:{gw.port}")
    return text.replace(KEY_ID_EXAMPLE, env["KEY_ID"])


def test_every_block_is_run_or_skipped_with_a_reason() -> None:
    langs = {lang for lang, _ in blocks()}
    assert langs <= {"sh", "python", "toml", "text"}, f"no runner for {langs}"
    firsts = {body.splitlines()[0] for _, body in blocks()}
    assert set(SKIPPED) <= firsts, "a SKIPPED entry names a block the README no longer has"


@pytest.mark.parametrize("block", blocks(), ids=block_id)
def test_readme_example_runs(
    block: tuple[str, str], gateway: tuple[Gateway, dict[str, str]], tmp_path: Path
) -> None:
    lang, body = block
    first = body.splitlines()[0]
    if first in SKIPPED:
        pytest.skip(SKIPPED[first])
    gw, env = gateway
    code = localize(body, gw, env)
    if lang == "sh":
        if shutil.which("curl") is None and "curl " in code:
            pytest.skip("curl is not installed")
        # An HTTP error must fail the example, as it would fail the user.
        script = 'curl() { command curl --fail-with-body -sS "$@"; }\nset -euo pipefail\n' + code
        result = subprocess.run(
            ["bash", "-c", script], env=env, capture_output=True, text=True, timeout=300
        )
    elif lang == "python":
        script = "import os\nKEY = os.environ['KEY']\n" + code
        result = subprocess.run(
            [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
        )
    elif lang == "toml":
        models_file = tmp_path / "servelm.toml"
        models_file.write_text(code)
        result = cli(env, "models", "list", "--models-file", str(models_file))
    else:
        pytest.fail(f"README block in {lang!r} has no runner and is not in SKIPPED: {first}")
    assert result.returncode == 0, f"{first}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
