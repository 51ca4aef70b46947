"""Issue 29, points 8 to 14: the operator's commands and admin API say what they do,
refuse what they cannot do, and find the server and database the user runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import typer
from rich.markup import render
from typer.testing import CliRunner

from servelm.billing import accounts
from servelm.cli import app as cli_app
from servelm.store.db import Database
from tests.conftest import ADMIN_TOKEN, LiveServer, free_port
from tests.fast.conftest import new_key

runner = CliRunner()
ADMIN = {"authorization": f"Bearer {ADMIN_TOKEN}"}


def admin(srv: LiveServer) -> httpx.Client:
    return httpx.Client(base_url=f"{srv.base_url}/admin", headers=ADMIN, timeout=30)


# -- 8: unknown plans are refused ----------------------------------------------------------


def test_admin_refuses_a_plan_the_models_file_lacks(fast: LiveServer) -> None:
    with admin(fast) as a:
        name = f"planned-{free_port()}"
        r = a.post("/accounts", json={"name": name, "plan": "nosuchplan"})
        assert r.status_code == 400
        err = r.json()["error"]
        assert err["param"] == "plan" and "No plan 'nosuchplan'" in err["message"]
        assert "free, pro" in err["message"]
        assert a.get(f"/accounts/{name}").status_code == 404  # nothing half-made
        made = a.post("/accounts", json={"name": name, "plan": "pro"})
        assert made.status_code == 201 and made.json()["plan"] == "pro"
        account_id = made.json()["id"]
        bad = a.put(f"/accounts/{account_id}/plan", json={"plan": "nosuchplan"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "plan"
        # -- 14: GET says the plan POST and PUT gave it
        assert a.get(f"/accounts/{name}").json()["plan"] == "pro"
        assert a.put(f"/accounts/{account_id}/plan", json={"plan": "free"}).status_code == 200
        assert a.get(f"/accounts/{account_id}").json()["plan"] == "free"


# -- 14: the grant's error names the field the caller sent ---------------------------------


@pytest.mark.parametrize("credits", ["-5", -5, 0])
def test_a_negative_grant_names_the_credits_field(fast: LiveServer, credits: object) -> None:
    with admin(fast) as a:
        name = f"grant-{free_port()}"
        assert a.post("/accounts", json={"name": name}).status_code == 201
        r = a.post(f"/accounts/{name}/credits", json={"credits": credits})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "credits"
    assert "positive" in r.json()["error"]["message"]


# -- 9: help text survives rich markup; every command and option has some -----------------


def _commands(group: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """Every leaf command (Typer carries its own copy of click, so by duck type)."""
    found: list[tuple[str, Any]] = []
    for name, cmd in group.commands.items():
        path = f"{prefix} {name}".strip()
        if hasattr(cmd, "commands"):
            found += _commands(cmd, path)
        else:
            found.append((path, cmd))
    return found


COMMANDS = _commands(typer.main.get_command(cli_app))


@pytest.mark.parametrize(("path", "cmd"), COMMANDS, ids=[p for p, _ in COMMANDS])
def test_help_text_is_shown_whole_and_never_missing(path: str, cmd: Any) -> None:
    assert (cmd.help or "").strip(), f"'servelm {path}' has no description"
    texts = [cmd.help or ""]
    for param in cmd.params:
        help_text = getattr(param, "help", None)
        if param.param_type_name == "option" and param.name != "help":
            assert help_text, f"'servelm {path}' --{param.name} has no help"
        if help_text:
            texts.append(help_text)
    for text in texts:
        # Typer renders help as rich markup: a tag-like [word...] would vanish. What
        # the user reads must be the text with only its escapes removed.
        assert render(text).plain == text.replace("\\[", "["), text


def test_help_shows_the_bracketed_words_it_has() -> None:
    plan = runner.invoke(cli_app, ["accounts", "plan", "--help"], env={"COLUMNS": "300"})
    assert "[plans.NAME]" in plan.output
    worker = runner.invoke(cli_app, ["worker", "--help"], env={"COLUMNS": "300"})
    assert "Interface to listen on (default: 127.0.0.1)" in worker.output
    assert "Key gateways must send (env: SERVELM_WORKER_KEY)" in worker.output


# -- 10, 12: `keys list | cat` keeps whole ids; --database-url names the database ----------


def cli(env: dict[str, str], *args: str, code: int = 0) -> str:
    # Typer's runner gives the command a pipe for stdout, as `| cat` does.
    result = runner.invoke(cli_app, list(args), env=env)
    assert result.exit_code == code, result.output
    return result.output


def test_keys_list_piped_keeps_whole_key_ids_and_database_url_is_honoured(
    tmp_path: Path,
) -> None:
    db_file = tmp_path / "elsewhere" / "billing.db"
    db_file.parent.mkdir()
    url = f"sqlite:///{db_file}"
    env = {"SERVELM_DATA_DIR": str(tmp_path / "data"), "COLUMNS": "80"}
    cli(env, "accounts", "create", "acme", "--database-url", url)
    made = cli(env, "keys", "create", "acme", "--name", "a-rather-long-key-label",
               "--model", "smollm2-135m-instruct", "--database-url", url)  # fmt: skip
    plaintext = next(line for line in made.splitlines() if line.startswith("slm_"))
    key_id = plaintext.split("_")[1]
    # The account and key went to the URL given, not to the data directory's file.
    assert not (tmp_path / "data" / "servelm.db").exists()
    db = Database(url)
    assert [a.name for a in accounts.list_accounts(db)] == ["acme"]
    db.dispose()

    header, row = cli(env, "keys", "list", "acme", "--database-url", url).splitlines()
    assert header.split("\t")[0] == "key id"
    cells = row.split("\t")
    assert cells[0] == f"slm_{key_id}_***" and cells[2] == "a-rather-long-key-label"
    # What was listed can be pasted into `keys revoke` as it is.
    assert f"key {key_id} revoked" in cli(env, "keys", "revoke", cells[0], "--database-url", url)
    cli(env, "credits", "grant", "acme", "2", "--database-url", url)
    assert cli(env, "credits", "balance", "acme", "--database-url", url).strip() == "2.000000"
    assert "ledger ok" in cli(env, "ledger", "check", "--database-url", url)
    assert "acme\t2.000000" in cli(env, "accounts", "list", "--database-url", url)


# -- 13: ggufgen --help prints help and writes nothing -------------------------------------


def test_ggufgen_help_prints_usage_and_writes_nothing(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tests.support.ggufgen", "--help"],
        cwd=tmp_path,
        # The instruments live in the repository's tests/, not in the installed package.
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "OUT_DIR" in result.stdout and "usage:" in result.stdout
    assert list(tmp_path.iterdir()) == []


# -- 17: the balance on routing errors, for a caller with a valid key ----------------------


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("POST", "/v1/models", 405),
        ("GET", "/v1/chat/completions", 405),
        ("GET", "/v1/scripted", 405),
        ("POST", "/v1/embeddings", 404),
        ("GET", "/v1/fine_tuning/jobs", 404),
    ],
)
def test_routing_errors_tell_a_valid_key_its_balance(
    fast: LiveServer, method: str, path: str, status: int
) -> None:
    key, _ = new_key(fast.db, 1_250_000)
    for headers in ({"x-api-key": key}, {"authorization": f"Bearer {key}"}):
        r = httpx.request(method, f"{fast.base_url}{path}", headers=headers, json={})
        assert r.status_code == status, r.text
        assert r.headers["x-remaining-credits"] == "1.250000"
    # A bad key or none: the same error, no balance (and not turned into a 401).
    for headers in ({}, {"x-api-key": "slm_nosuchkey_abc"}):
        r = httpx.request(method, f"{fast.base_url}{path}", headers=headers, json={})
        assert r.status_code == status and "x-remaining-credits" not in r.headers
