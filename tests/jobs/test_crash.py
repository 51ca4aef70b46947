"""SIGKILL of the gateway in the middle of a batch, then a restart: the batch
finishes, every line once in the output, one charge per line, the ledger clean."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

import openai
import pytest
from sqlalchemy import func, select

from servelm.billing import audit
from servelm.billing.money import MICRO
from servelm.config import Settings
from servelm.store.db import Database
from servelm.store.tables import accounts, holds, job_lines, ledger
from tests import procs
from tests.conftest import provision
from tests.jobs.conftest import SLUG, counts
from tests.jobs.test_batches import BAD, jsonl

LINES = 40
HOLD_TTL = 3.0


@pytest.fixture
def env(tmp_path: Path, models_dir: Path) -> Iterator[dict[str, str]]:
    models_file = tmp_path / "servelm.toml"
    models_file.write_text(
        f'[models."{SLUG}"]\nbatch_discount = 0.5\ninput_price = 10\noutput_price = 20\n'
    )
    yield procs.gateway_env(
        tmp_path / "data",
        models_dir,
        SERVELM_MODELS_FILE=str(models_file),
        SERVELM_JOBS_LEASE_SECONDS="2",
        SERVELM_JOBS_POLL_SECONDS="0.05",
        SERVELM_HOLD_TTL_SECONDS=str(HOLD_TTL),
        SERVELM_SLOTS="4",
    )


@pytest.mark.timeout(600)  # two gateway starts and 40 generations
def test_sigkill_mid_batch_then_restart(env: dict[str, str], tmp_path: Path) -> None:
    (gw,) = procs.start(env, tmp_path / "logs")
    db = Database(Settings(data_dir=Path(env["SERVELM_DATA_DIR"])).db_url)
    try:
        key = provision(db, "crash", 100)
        client = openai.OpenAI(base_url=f"{gw.base_url}/v1", api_key=key, max_retries=0)
        f = client.files.create(file=("in.jsonl", jsonl(LINES, "k")), purpose="batch")
        batch = client.batches.create(
            input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        deadline = time.monotonic() + 600
        while counts(client.batches.retrieve(batch.id)).completed < LINES // 3:
            assert time.monotonic() < deadline, "the batch made no progress"
            time.sleep(0.05)
        gw.kill()

        (gw,) = procs.start(env, tmp_path / "logs")
        client = openai.OpenAI(base_url=f"{gw.base_url}/v1", api_key=key, max_retries=0)
        while (done := client.batches.retrieve(batch.id)).status != "completed":
            assert time.monotonic() < deadline, f"the batch did not finish: {done}"
            time.sleep(0.1)
        assert counts(done).total == LINES
        lines = []
        for file_id in (done.output_file_id, done.error_file_id):
            if file_id:
                lines += [json.loads(x) for x in client.files.content(file_id).text.splitlines()]
        ids = [x["custom_id"] for x in lines]
        assert sorted(ids) == sorted(f"k-{i}" for i in range(LINES))  # each exactly once
        bad = [i for i in range(LINES) if i in BAD]
        paid = [x for x in lines if x["response"] and x["response"]["status_code"] == 200]
        assert len(paid) == LINES - len(bad)
        total = sum(int(Decimal(str(x["response"]["body"]["usage"]["cost"])) * MICRO) for x in paid)

        # The killed attempts' holds expire and are released by the restarted gateway.
        while True:
            with db.read() as conn:
                still = conn.execute(
                    select(func.count()).where(
                        holds.c.request_id.like(f"{batch.id}:%"), holds.c.settled_at.is_(None)
                    )
                ).scalar_one()
            if not still:
                break
            assert time.monotonic() < deadline, "a killed attempt's hold was never released"
            time.sleep(0.1)
        with db.read() as conn:
            charges = (
                conn.execute(
                    select(ledger.c.amount).where(
                        ledger.c.kind == "charge", ledger.c.request_id.like(f"{batch.id}:%")
                    )
                )
                .scalars()
                .all()
            )
            balance = conn.execute(
                select(accounts.c.balance).where(accounts.c.name == "crash")
            ).scalar_one()
            reruns = conn.execute(
                select(func.max(job_lines.c.attempts)).where(job_lines.c.job_id == batch.id)
            ).scalar_one()
        # Lines were running when the process died (the runner is never idle mid-batch),
        # and ran again after the restart.
        assert reruns >= 2
        assert len(charges) == len(paid)  # one charge per line that ran, none twice
        assert sum(charges) == total
        assert balance == 100 * MICRO - total
        assert audit.ledger_check(db, timedelta(seconds=HOLD_TTL * 3)) == []
    finally:
        gw.stop()
        db.dispose()
