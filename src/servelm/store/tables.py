"""The schema, as SQLAlchemy Core tables (Core, not ORM: every statement on the
request path is one hand-written conditional UPDATE or INSERT).

Money is integer micro-credits (1 credit = 1,000,000) in BIGINT columns; there is
no float anywhere near it.
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
)

metadata = MetaData()

accounts = Table(
    "accounts",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(200), nullable=False, unique=True),
    # Spendable now. Changes only through conditional UPDATEs (never read-then-write).
    Column("balance", BigInteger, nullable=False, default=0),
    # Reserved by requests in flight; returns to balance (minus the charge) at settle.
    Column("held", BigInteger, nullable=False, default=0),
    Column("created_at", DateTime(timezone=True), nullable=False),
    # Rate-limit plan (servelm.access.limits); null: the plan named "default", if any.
    Column("plan", String(64), nullable=True),
    # The last line of defence: whatever the code does, no balance goes negative.
    CheckConstraint("balance >= 0", name="ck_accounts_balance_nonneg"),
    CheckConstraint("held >= 0", name="ck_accounts_held_nonneg"),
)

api_keys = Table(
    "api_keys",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    # The public half of a key, embedded in it; how a key is found without its secret.
    Column("key_id", String(32), nullable=False, unique=True),
    # SHA-256 of the secret half, hex. The secret itself is never stored.
    Column("digest", String(64), nullable=False),
    Column("account_id", Integer, ForeignKey("accounts.id"), nullable=False, index=True),
    Column("name", String(200), nullable=False, default=""),
    # null: every model; else a list of slugs.
    Column("allowed_models", JSON, nullable=True),
    Column("expires_at", DateTime(timezone=True), nullable=True),
    Column("revoked_at", DateTime(timezone=True), nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    # The key's own rate limits, on top of its account's plan; null: none.
    Column("rpm", Integer, nullable=True),
    Column("tpm", Integer, nullable=True),
    Column("concurrency", Integer, nullable=True),
)

holds = Table(
    "holds",
    metadata,
    Column("request_id", String(64), primary_key=True),
    Column("account_id", Integer, ForeignKey("accounts.id"), nullable=False),
    Column("key_id", Integer, ForeignKey("api_keys.id"), nullable=True),
    Column("model", String(200), nullable=False),
    Column("amount", BigInteger, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    # A live gateway keeps pushing this forward; a crashed one's holds expire and
    # the sweeper releases them.
    Column("expires_at", DateTime(timezone=True), nullable=False),
    Column("settled_at", DateTime(timezone=True), nullable=True),
    Column("charged", BigInteger, nullable=True),
    Index("ix_holds_open", "settled_at", "expires_at"),
)

ledger = Table(
    "ledger",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("account_id", Integer, ForeignKey("accounts.id"), nullable=False, index=True),
    # grant (+), adjustment (±), refund (+), charge (recorded positive, subtracts).
    Column("kind", String(16), nullable=False),
    Column("amount", BigInteger, nullable=False),
    Column("request_id", String(64), nullable=True),
    Column("note", Text, nullable=False, default=""),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

usage = Table(
    "usage",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("request_id", String(64), nullable=False, unique=True),
    Column("account_id", Integer, ForeignKey("accounts.id"), nullable=False),
    Column("key_id", Integer, ForeignKey("api_keys.id"), nullable=True),
    Column("model", String(200), nullable=False),
    Column("prompt_tokens", Integer, nullable=False, default=0),
    Column("completion_tokens", Integer, nullable=False, default=0),
    Column("cost", BigInteger, nullable=False, default=0),
    # ok, error, cancelled, expired
    Column("status", String(16), nullable=False),
    Column("latency_ms", Integer, nullable=False, default=0),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Index("ix_usage_account_time", "account_id", "created_at"),
)

idempotency = Table(
    "idempotency",
    metadata,
    Column("account_id", Integer, ForeignKey("accounts.id"), primary_key=True),
    Column("key", String(255), primary_key=True),
    Column("body_hash", String(64), nullable=False),
    # pending while the first request runs, done once its answer is stored.
    Column("state", String(16), nullable=False),
    Column("status_code", Integer, nullable=True),
    Column("response", Text, nullable=True),
    Column("cost", BigInteger, nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

# The web console's sessions (servelm.access.sessions): a cookie names one by a random
# id, stored here only as its SHA-256; a session ends at sign-out, when the operator
# signs everyone out, or at its expiry.
console_sessions = Table(
    "console_sessions",
    metadata,
    Column("digest", String(64), primary_key=True),
    # "key" (a user signed in with an API key) or "admin" (the operator).
    Column("kind", String(8), nullable=False),
    Column("key_id", String(32), nullable=True, index=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=False),
    Column("ended_at", DateTime(timezone=True), nullable=True),
)

# -- work without a connection (servelm.jobs) ---------------------------------------------

jobs = Table(
    "jobs",
    metadata,
    # req_… (Segmind async) or batch_… (OpenAI batch).
    Column("id", String(64), primary_key=True),
    Column("kind", String(8), nullable=False),  # async, batch
    Column("account_id", Integer, ForeignKey("accounts.id"), nullable=False),
    Column("key_id", Integer, ForeignKey("api_keys.id"), nullable=False),
    # The key's public id: the runner authenticates as the key (revocation applies).
    Column("key_public", String(32), nullable=False),
    # queued, in_progress, completed, failed, cancelling, cancelled, expired
    Column("status", String(16), nullable=False),
    Column("model", String(200), nullable=True),
    Column("input_file_id", String(64), nullable=True),
    Column("output_file_id", String(64), nullable=True),
    Column("error_file_id", String(64), nullable=True),
    Column("total", Integer, nullable=False, default=0),
    Column("completed", Integer, nullable=False, default=0),
    Column("failed", Integer, nullable=False, default=0),
    Column("cost", BigInteger, nullable=False, default=0),
    Column("extra", JSON, nullable=True),  # the batch's metadata, endpoint, window
    Column("webhook_url", Text, nullable=True),
    Column("webhook_attempts", Integer, nullable=False, default=0),
    # When the next delivery is due (null: none due); pushed forward while one is sent.
    Column("webhook_next_at", DateTime(timezone=True), nullable=True),
    Column("webhook_done_at", DateTime(timezone=True), nullable=True),
    Column("webhook_error", Text, nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("started_at", DateTime(timezone=True), nullable=True),
    Column("finished_at", DateTime(timezone=True), nullable=True),
    # Past this, unstarted lines expire (the completion window); a finished job's
    # results are deleted this long after it finished (retention).
    Column("expires_at", DateTime(timezone=True), nullable=False),
    Index("ix_jobs_account", "account_id", "created_at"),
    Index("ix_jobs_webhook", "webhook_next_at"),
)

job_lines = Table(
    "job_lines",
    metadata,
    Column("job_id", String(64), ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True),
    Column("line_no", Integer, primary_key=True, autoincrement=False),
    Column("custom_id", String(512), nullable=True),
    Column("body", Text, nullable=False),  # the request, as sent
    # pending, running, done, failed, cancelled, expired
    Column("status", String(16), nullable=False),
    # Which process runs it and until when; a lease past its time is taken again.
    Column("lease_owner", String(64), nullable=True),
    Column("lease_until", DateTime(timezone=True), nullable=True),
    Column("attempts", Integer, nullable=False, default=0),
    # An async request's hold was made at submission; its output limit is kept here.
    Column("held_max_tokens", Integer, nullable=True),
    Column("status_code", Integer, nullable=True),
    Column("result", Text, nullable=True),  # the response body (JSON), or the error body
    Column("cost", BigInteger, nullable=False, default=0),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("finished_at", DateTime(timezone=True), nullable=True),
    Index("ix_job_lines_claim", "status", "lease_until"),
)

job_files = Table(
    "job_files",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("account_id", Integer, ForeignKey("accounts.id"), nullable=False),
    # batch (an upload), batch_output, batch_error (read from the job's lines)
    Column("purpose", String(32), nullable=False),
    Column("filename", String(512), nullable=False),
    Column("bytes", BigInteger, nullable=False, default=0),
    Column("content", Text, nullable=True),
    Column("job_id", String(64), nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=True),
    Index("ix_job_files_account", "account_id", "created_at"),
)
