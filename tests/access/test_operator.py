"""The operator's side of limits: the CLI and the admin API set plans and key limits,
and a change made through the admin API applies at the next request."""

from __future__ import annotations

from pathlib import Path

import httpx

from servelm.access.limits.records import get_key_limits, get_plan
from servelm.store.db import Database
from tests import procs
from tests.conftest import ADMIN_TOKEN, LiveServer, provision

ADMIN = {"authorization": f"Bearer {ADMIN_TOKEN}"}


PLANS = "[plans.pro]\nrpm = 600\n\n[plans.free]\nrpm = 10\n"


def test_cli_plans_and_key_limits(tmp_path: Path, models_dir: Path) -> None:
    models_file = tmp_path / "servelm.toml"
    models_file.write_text(PLANS)
    env = procs.gateway_env(tmp_path, models_dir, SERVELM_MODELS_FILE=str(models_file))
    made = procs.cli(env, "accounts", "create", "acme", "--plan", "pro")
    assert made.returncode == 0, made.stderr
    assert "plan pro" in made.stdout
    key = procs.cli(env, "keys", "create", "acme", "--rpm", "5", "--tpm", "20000",
                    "--concurrency", "2")  # fmt: skip
    assert key.returncode == 0, key.stderr
    plaintext = next(line for line in key.stdout.splitlines() if line.startswith("slm_"))
    key_id = plaintext.split("_")[1]

    db = Database(f"sqlite:///{tmp_path / 'servelm.db'}")
    assert get_plan(db, 1) == "pro"
    assert get_key_limits(db, key_id).as_dict() == {"rpm": 5, "tpm": 20000, "concurrency": 2}

    shown = procs.cli(env, "keys", "limits", plaintext)
    assert shown.stdout.strip() == f"key {key_id}: rpm=5 tpm=20000 concurrency=2"
    changed = procs.cli(env, "keys", "limits", key_id, "--rpm", "50")
    assert changed.stdout.strip() == f"key {key_id}: rpm=50 tpm=20000 concurrency=2"
    cleared = procs.cli(env, "keys", "limits", key_id, "--clear", "--tpm", "100")
    assert cleared.stdout.strip() == f"key {key_id}: rpm=- tpm=100 concurrency=-"
    replanned = procs.cli(env, "accounts", "plan", "acme", "free")
    assert replanned.returncode == 0 and get_plan(db, 1) == "free"
    # Issue 29.8: a plan the models file lacks would run the account unlimited.
    unknown = procs.cli(env, "accounts", "plan", "acme", "nosuchplan")
    assert unknown.returncode == 1, unknown.stdout
    assert "No plan 'nosuchplan'" in unknown.stderr and "free, pro" in unknown.stderr
    assert get_plan(db, 1) == "free"
    refused = procs.cli(env, "accounts", "create", "typo", "--plan", "prro")
    assert refused.returncode == 1 and "No plan 'prro'" in refused.stderr
    assert "typo" not in procs.cli(env, "accounts", "list").stdout  # no half-made account
    bad = procs.cli(env, "keys", "limits", "nosuchkey", "--rpm", "1")
    assert bad.returncode == 1 and "No API key" in bad.stderr
    db.dispose()


def test_admin_api_sets_limits_that_apply_at_once(live: LiveServer) -> None:
    admin = httpx.Client(base_url=f"{live.base_url}/admin", headers=ADMIN, timeout=60)
    # This server's models file defines no plans (issue 29.8: none is taken on faith).
    unplanned = admin.post("/accounts", json={"name": "admin-limits-x", "plan": "free"})
    assert unplanned.status_code == 400 and unplanned.json()["error"]["param"] == "plan"
    assert "No plan 'free'" in unplanned.json()["error"]["message"]
    assert admin.get("/accounts/admin-limits-x").status_code == 404
    account = admin.post("/accounts", json={"name": "admin-limits"})
    assert account.status_code == 201 and account.json()["plan"] is None
    granted = admin.post(f"/accounts/{account.json()['id']}/credits", json={"credits": "5"})
    assert granted.status_code == 200
    key = admin.post(f"/accounts/{account.json()['id']}/keys", json={"rpm": 1, "tpm": 5000})
    assert key.status_code == 201, key.text
    assert key.json()["limits"] == {"rpm": 1, "tpm": 5000, "concurrency": None}
    key_id, plaintext = key.json()["key_id"], key.json()["key"]
    assert admin.get(f"/keys/{key_id}/limits").json()["rpm"] == 1

    body = {"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 1}  # fmt: skip
    user = httpx.Client(base_url=live.v1, headers={"x-api-key": plaintext}, timeout=60)
    assert user.post("/chat/completions", json=body).status_code == 200
    assert user.post("/chat/completions", json=body).status_code == 429
    # Raised through the admin API: the cached policy is dropped, the next one passes.
    raised = admin.put(f"/keys/{key_id}/limits", json={"rpm": 10})
    assert raised.json() == {"key_id": key_id, "rpm": 10, "tpm": 5000, "concurrency": None}
    assert user.post("/chat/completions", json=body).status_code == 200
    assert admin.put(f"/keys/{key_id}/limits", json={"rpm": -1}).status_code == 400
    plan = admin.put(f"/accounts/{account.json()['id']}/plan", json={"plan": "pro"})
    assert plan.status_code == 400 and plan.json()["error"]["param"] == "plan"
    plan = admin.put(f"/accounts/{account.json()['id']}/plan", json={"plan": None})
    assert plan.status_code == 200 and plan.json()["plan"] is None


def test_keys_without_limits_get_no_rate_limit_headers(live: LiveServer) -> None:
    key = provision(live.db, "unlimited", credits=10)
    r = httpx.post(
        f"{live.v1}/chat/completions",
        json={"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "hi"}],
              "max_tokens": 1},
        headers={"x-api-key": key},
        timeout=60,
    )  # fmt: skip
    assert r.status_code == 200
    assert not any(h.startswith("x-ratelimit") for h in r.headers)
