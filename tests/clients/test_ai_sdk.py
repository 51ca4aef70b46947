"""The Vercel AI SDK (``ai`` with ``@ai-sdk/openai`` and ``@ai-sdk/openai-compatible``,
pinned in tests/js/package.json) against a real server (issue 30, acceptance 1 and
4): the default ``openai(model)`` speaks the Responses API, the compatible provider
chat completions; plain, stream, structured output and a named tool choice on the
tiny Llama 3.1, with usage and cost."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from decimal import Decimal
from pathlib import Path

import pytest

from tests.conftest import LiveServer, provision
from tests.seeds.test_seed_models import LLAMA
from tests.seeds.test_tool_choice import call_bias

pytestmark = pytest.mark.slow

JS = Path(__file__).parents[1] / "js"


@pytest.mark.skipif(shutil.which("node") is None, reason="Node.js is not installed")
def test_the_ai_sdk_default_and_compatible_providers(seed_live: LiveServer) -> None:
    if not (JS / "node_modules" / "ai").is_dir():
        pytest.fail("the AI SDK is not installed: run `make test` (it runs npm ci in tests/js)")
    key = provision(seed_live.db, "ai-sdk", 5)
    env = {
        **os.environ,
        "SERVELM_V1": seed_live.v1,
        "SERVELM_KEY": key,
        "SERVELM_MODEL": LLAMA,
        "SERVELM_BIAS": json.dumps(call_bias(seed_live)),
    }
    proc = subprocess.run(
        ["node", str(JS / "ai-sdk.mjs")], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(proc.stdout)
    for name in ("responses_plain", "responses_stream", "chat_plain", "chat_stream"):
        result = seen[name]
        usage = result["usage"]
        assert 1 <= usage["outputTokens"] <= 6, (name, usage)
        assert usage["inputTokens"] > 0
        # Every answer's usage carries its cost as a JSON number.
        assert isinstance(result["cost"], float) and result["cost"] > 0, (name, result)
    plain = seen["responses_plain"]
    assert Decimal(str(plain["cost"])) == Decimal(plain["xcost"])
    assert seen["chat_object"] in ({"answer": "yes"}, {"answer": "no"})
    assert seen["chat_tool"] == [{"name": "get_time", "input": {}}]
