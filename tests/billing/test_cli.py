"""The operator's money commands, run as a user would run them (Typer's runner)."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import update
from typer.testing import CliRunner

from servelm.access import keys
from servelm.cli import app
from servelm.store.db import Database
from servelm.store.tables import accounts

runner = CliRunner()


def run(data_dir: Path, *args: str, code: int = 0) -> str:
    result = runner.invoke(app, [*args, "--data-dir", str(data_dir)], env={"COLUMNS": "200"})
    assert result.exit_code == code, result.output
    return result.output


def test_account_lifecycle_from_the_command_line(tmp_path: Path) -> None:
    assert "account 1 'acme' created" in run(tmp_path, "accounts", "create", "acme")
    assert "already exists" in run(tmp_path, "accounts", "create", "acme", code=1)
    assert "balance now 2.500000 credits" in run(tmp_path, "credits", "grant", "acme", "2.5")
    assert "positive" in run(tmp_path, "credits", "grant", "acme", "0", code=1)

    out = run(
        tmp_path,
        *("keys", "create", "acme", "--name", "ci"),
        *("--model", "smollm2", "--model", "mixtral-8x7b-instruct"),
    )
    (plaintext,) = [line for line in out.splitlines() if line.startswith(keys.PREFIX)]
    key_id, _ = keys.parse(plaintext)
    listing = run(tmp_path, "keys", "list", "acme")
    assert key_id in listing and "active" in listing
    assert "smollm2-135m-instruct, mixtral-8x7b-instruct" in listing
    assert plaintext.split("_", 2)[2] not in listing  # the secret is never shown again

    assert "revoked" in run(tmp_path, "keys", "revoke", plaintext)
    assert "revoked" in run(tmp_path, "keys", "list")
    assert run(tmp_path, "credits", "balance", "acme").strip() == "2.500000"
    assert "acme" in run(tmp_path, "accounts", "list")
    assert "No account" in run(tmp_path, "credits", "balance", "nobody", code=1)


def test_ledger_check_exits_non_zero_when_money_does_not_add_up(tmp_path: Path) -> None:
    run(tmp_path, "accounts", "create", "acme")
    run(tmp_path, "credits", "grant", "acme", "1")
    assert "ledger ok" in run(tmp_path, "ledger", "check")
    db = Database(f"sqlite:///{tmp_path / 'servelm.db'}")
    with db.write() as conn:
        conn.execute(update(accounts).values(balance=5_000_000))
    db.dispose()
    out = run(tmp_path, "ledger", "check", code=1)
    assert "acme" in out and "5000000" in out
