"""instructor against a real server with the tiny Llama 3.1 (issue 30, acceptance 1):
plain, streamed partial objects, structured output (JSON_SCHEMA mode) and TOOLS
mode, which sends a named tool choice and must get that call back (biased as the
seed test does).

instructor 1.17 cannot share the suite's venv (it needs jiter<0.15 and rich<15; the
suite's openai 3.51 needs jiter>=0.16), so it runs in its own venv from the pinned
instructor-requirements.txt, built once under build/clients/ (keyed by that file's
hash; about a minute the first time) and reused after. The test runs
instructor_run.py there and checks what it printed."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import LiveServer, provision
from tests.seeds.test_seed_models import LLAMA
from tests.seeds.test_tool_choice import call_bias

pytestmark = pytest.mark.slow

HERE = Path(__file__).parent
REQUIREMENTS = HERE / "instructor-requirements.txt"
BUILD = HERE.parents[1] / "build" / "clients"


def instructor_python() -> Path:
    """The Python of instructor's venv, built if this requirements file has none yet."""
    digest = hashlib.sha256(REQUIREMENTS.read_bytes()).hexdigest()[:12]
    venv = BUILD / f"instructor-{digest}"
    python = venv / "bin" / "python"
    BUILD.mkdir(parents=True, exist_ok=True)
    # Two test processes (or worktree runs) never build the same venv at once.
    with (BUILD / "instructor.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (venv / ".installed").exists():
            return python
        shutil.rmtree(venv, ignore_errors=True)
        # No pip of its own: the suite's pip installs into it. Every package is pinned
        # in the file, so no resolver (--no-deps), and nothing compiled ahead of the
        # one run (--no-compile): 20 s -> 5 s here.
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
        pip = subprocess.run(
            [
                *(sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet"),
                *("--no-deps", "--no-compile", "-r", str(REQUIREMENTS)),
            ],
            capture_output=True,
            text=True,
        )
        assert pip.returncode == 0, pip.stdout + pip.stderr
        (venv / ".installed").touch()
    return python


@pytest.fixture(scope="module")
def instructor_py() -> Iterator[Path]:
    yield instructor_python()


def test_instructor_plain_stream_structured_and_named_tool(
    seed_live: LiveServer, instructor_py: Path
) -> None:
    key = provision(seed_live.db, "instructor", 5)
    # Models load on first use (the pool); the bias reads the loaded engine's vocabulary.
    warm = httpx.post(
        f"{seed_live.v1}/chat/completions",
        headers={"authorization": f"Bearer {key}"},
        json={"model": LLAMA, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1},
        timeout=120,
    )
    assert warm.status_code == 200, warm.text
    env = {
        **os.environ,
        "SERVELM_V1": seed_live.v1,
        "SERVELM_KEY": key,
        "SERVELM_MODEL": LLAMA,
        "SERVELM_BIAS": json.dumps(call_bias(seed_live)),
    }
    proc = subprocess.run(
        [str(instructor_py), str(HERE / "instructor_run.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(proc.stdout)
    assert seen["instructor"] == "1.17.0"
    plain = seen["plain"]
    assert plain["content"]
    assert 1 <= plain["usage"]["completion_tokens"] <= 5
    # usage.cost rides along as a JSON number (issue 30.2), read by instructor's openai.
    assert isinstance(plain["usage"]["cost"], float) and plain["usage"]["cost"] > 0
    assert seen["structured"] in ({"answer": "yes"}, {"answer": "no"})
    assert seen["stream"], "no partial object was streamed"
    assert seen["stream"][-1] in ({"answer": "yes"}, {"answer": "no"})
    tool = seen["tool"]
    assert tool["calls"] == [{"name": "get_time", "arguments": tool["calls"][0]["arguments"]}]
    assert json.loads(tool["calls"][0]["arguments"]) == {}
    assert tool["object"] == {}
