"""By hand (not in the suite): the issue's big numbers for queued work.

A gateway process runs an N-line batch (the official ``openai`` SDK uploads it); at
about half it is SIGKILLed and started again; the batch must complete with each
custom_id exactly once and one charge per line. Then M async requests are submitted
and polled to COMPLETED, and the balance must move by exactly their costs.

    PYTHONPATH=. .venv/bin/python bench/jobs_crash.py --lines 1000 --async 50
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from decimal import Decimal
from pathlib import Path

import httpx
import openai
from sqlalchemy import func, select

from servelm.billing import audit
from servelm.billing.money import MICRO
from servelm.config import Settings, default_data_dir
from servelm.store.db import Database
from servelm.store.tables import holds, job_lines, ledger
from tests import procs
from tests.conftest import provision

SLUG = "smollm2-135m-instruct"
CHAT = "/v1/chat/completions"


def jsonl(n: int) -> bytes:
    rows = []
    for i in range(n):
        body: dict[str, object] = {
            "model": SLUG,
            "messages": [{"role": "user", "content": f"Count to {i % 97}."}],
            "max_tokens": 3,
        }
        if i % 100 == 7:
            body["messages"] = [{"role": "wizard", "content": "x"}]
        line = {"custom_id": f"r{i}", "method": "POST", "url": CHAT, "body": body}
        rows.append(json.dumps(line))
    return ("\n".join(rows) + "\n").encode()


def ask(i: int) -> dict[str, object]:
    return {"messages": [{"role": "user", "content": f"Say hi to {i}."}], "max_tokens": 4}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lines", type=int, default=1000)
    ap.add_argument("--async", dest="asyncs", type=int, default=50)
    ap.add_argument("--concurrency", default="4")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    models_file = tmp / "servelm.toml"
    models_file.write_text(f'[models."{SLUG}"]\nbatch_discount = 0.5\n')
    env = procs.gateway_env(
        tmp / "data",
        default_data_dir() / "models",
        SERVELM_MODELS_FILE=str(models_file),
        SERVELM_JOBS_LEASE_SECONDS="5",
        SERVELM_HOLD_TTL_SECONDS="10",
        SERVELM_JOBS_CONCURRENCY=args.concurrency,
        SERVELM_THREADS="2",
    )
    (gw,) = procs.start(env, tmp / "logs")
    db = Database(Settings(data_dir=tmp / "data").db_url)
    key = provision(db, "bench", 1000)
    client = openai.OpenAI(base_url=f"{gw.base_url}/v1", api_key=key, max_retries=0)
    t0 = time.monotonic()
    f = client.files.create(file=("in.jsonl", jsonl(args.lines)), purpose="batch")
    batch = client.batches.create(
        input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    while (c := client.batches.retrieve(batch.id).request_counts) and (
        c.completed + c.failed < args.lines // 2
    ):
        time.sleep(0.2)
    print(f"killing at {c.completed + c.failed}/{args.lines} after {time.monotonic() - t0:.0f} s")
    gw.kill()
    (gw,) = procs.start(env, tmp / "logs")
    client = openai.OpenAI(base_url=f"{gw.base_url}/v1", api_key=key, max_retries=0)
    while (done := client.batches.retrieve(batch.id)).status != "completed":
        time.sleep(0.5)
    print(f"batch completed after {time.monotonic() - t0:.0f} s: {done.request_counts}")
    lines = []
    for fid in (done.output_file_id, done.error_file_id):
        if fid:
            # usage.cost is a JSON number: read it as the decimal it was written as,
            # not as the nearest binary float (0.000003 would count as 2 micro-credits).
            text = client.files.content(fid).text
            lines += [json.loads(x, parse_float=Decimal) for x in text.splitlines()]
    ids = [x["custom_id"] for x in lines]
    print("each custom_id exactly once:", sorted(ids) == sorted(f"r{i}" for i in range(args.lines)))
    ok = [x for x in lines if x["response"] and x["response"]["status_code"] == 200]
    cost = sum(int(Decimal(x["response"]["body"]["usage"]["cost"]) * MICRO) for x in ok)
    while True:
        with db.read() as conn:
            still = conn.execute(
                select(func.count()).where(
                    holds.c.request_id.like(f"{batch.id}:%"), holds.c.settled_at.is_(None)
                )
            ).scalar_one()
        if not still:
            break
        time.sleep(0.5)
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
        reruns = conn.execute(
            select(func.count()).where(job_lines.c.job_id == batch.id, job_lines.c.attempts > 1)
        ).scalar_one()
    print(
        f"successes {len(ok)}, errors {len(lines) - len(ok)}, charges {len(charges)}, "
        f"sum of charges == sum of output costs: {sum(charges) == cost}, lines rerun: {reruns}"
    )
    print("ledger check:", audit.ledger_check(db) or "clean")

    h = httpx.Client(base_url=gw.base_url, headers={"x-api-key": key}, timeout=60)
    before = int(h.get("/v1/credits").json()["micro_credits"])
    t1 = time.monotonic()
    subs = [h.post(f"/v2/{SLUG}", json=ask(i)).json() for i in range(args.asyncs)]
    total = 0
    for s in subs:
        while h.get(s["status_url"]).json()["status"] not in ("COMPLETED", "FAILED"):
            time.sleep(0.1)
        total += int(Decimal(h.get(s["response_url"]).json()["usage"]["cost"]) * MICRO)
    after = int(h.get("/v1/credits").json()["micro_credits"])
    print(
        f"{args.asyncs} async requests completed in {time.monotonic() - t1:.0f} s; balance moved "
        f"{before - after}, sum of costs {total}: {before - after == total}"
    )
    print("ledger check:", audit.ledger_check(db) or "clean")
    gw.stop()


if __name__ == "__main__":
    main()
