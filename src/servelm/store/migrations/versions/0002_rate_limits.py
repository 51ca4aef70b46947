"""Rate limits: an account's plan, a key's own limits.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # null: the plan named "default" in the models file, if any.
    op.add_column("accounts", sa.Column("plan", sa.String(64), nullable=True))
    # null: no limit of the key's own (its account's plan still applies).
    op.add_column("api_keys", sa.Column("rpm", sa.Integer, nullable=True))
    op.add_column("api_keys", sa.Column("tpm", sa.Integer, nullable=True))
    op.add_column("api_keys", sa.Column("concurrency", sa.Integer, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("api_keys") as batch:
        batch.drop_column("concurrency")
        batch.drop_column("tpm")
        batch.drop_column("rpm")
    with op.batch_alter_table("accounts") as batch:
        batch.drop_column("plan")
