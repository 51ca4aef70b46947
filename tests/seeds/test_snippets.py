"""The code examples on the Segmind pages, run against servelm with only the host (and
the key) changed: axios under Node with ``x-api-key``, requests with a Bearer key.

Each response's ``x-remaining-credits`` must fall by exactly its ``x-cost``, and the
cost must be the usage at the model's prices.
"""

from __future__ import annotations

import json
import runpy
import shutil
import subprocess
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from servelm.api.services import services
from servelm.billing.money import MICRO
from tests.conftest import LiveServer, provision

pytestmark = pytest.mark.slow  # real engine processes or models: seconds each

HERE = Path(__file__).parent
SNIPPETS = HERE / "snippets"
JS = HERE.parent / "js"
SEGMIND = "https://api.segmind.com"


def localize(source: str, live: LiveServer, key: str) -> str:
    assert SEGMIND in source
    return (
        source.replace(SEGMIND, live.base_url)
        .replace("YOUR API-KEY", key)
        .replace("YOUR_API_KEY", key)
    )


def check_charge(live: LiveServer, slug: str, status: int, headers: Any, body: Any) -> Decimal:
    """Asserts cost = usage × prices; returns the remaining credits."""
    assert status == 200, body
    assert body["model"] == slug and body["choices"][0]["message"]["content"]
    spec = services(live.app).catalog.resolve(slug)
    usage = body["usage"]
    cost = Decimal(headers["x-cost"])
    assert cost * MICRO == spec.cost_micro(usage["prompt_tokens"], usage["completion_tokens"])
    assert cost > 0
    return Decimal(headers["x-remaining-credits"])


def run_node(script: Path) -> dict[str, Any]:
    proc = subprocess.run(
        ["node", "-r", str(JS / "record-responses.js"), str(script)],
        capture_output=True,
        text=True,
        timeout=120,
        env={"NODE_PATH": str(JS / "node_modules"), "PATH": "/usr/bin:/bin"},
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "chat.completion" in proc.stdout  # what the snippet itself printed
    (line,) = [ln for ln in proc.stderr.splitlines() if ln.startswith("{")]
    answer: dict[str, Any] = json.loads(line)
    return answer


@pytest.mark.skipif(shutil.which("node") is None, reason="Node.js is not installed")
def test_axios_snippets_run_unchanged_and_are_billed_exactly(
    seed_live: LiveServer, tmp_path: Path
) -> None:
    if not (JS / "node_modules" / "axios").is_dir():
        pytest.fail("axios is not installed: run `make test` (it runs npm ci in tests/js)")
    key = provision(seed_live.db, "axios-user", 1)
    remaining = Decimal(1)
    for name, slug in [
        ("axios_mixtral_8x7b.js", "mixtral-8x7b-instruct"),
        ("axios_llama_3_1_8b.js", "llama-v3p1-8b-instruct"),
    ]:
        script = tmp_path / name
        script.write_text(localize((SNIPPETS / name).read_text(), seed_live, key))
        seen = run_node(script)
        after = check_charge(seed_live, slug, seen["status"], seen["headers"], seen["data"])
        assert after == remaining - Decimal(seen["headers"]["x-cost"])
        remaining = after


def test_requests_snippet_with_a_bearer_key_is_billed_exactly(
    seed_live: LiveServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = provision(seed_live.db, "requests-user", 1)
    script = tmp_path / "snippet.py"
    script.write_text(
        localize((SNIPPETS / "requests_mixtral_8x22b.py").read_text(), seed_live, key)
    )
    remaining = Decimal(1)
    for _ in range(2):
        response = runpy.run_path(str(script))["response"]
        assert "chat.completion" in capsys.readouterr().out
        after = check_charge(
            seed_live, "mixtral-8x22b-instruct", response.status_code, response.headers,
            response.json(),
        )  # fmt: skip
        assert after == remaining - Decimal(response.headers["x-cost"])
        remaining = after
