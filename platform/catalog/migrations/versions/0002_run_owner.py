"""Runs record their owner process (``host:pid:start-time``), so a run whose process died is found.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-07

A killed process (kill -9, OOM, a lost node) cannot mark its run finished; the next start on the
same host sees that the owner is gone and marks the run ``crashed`` (``platform/recovery.py``).
Rows written before this revision have no owner and are left as they are.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column("owner", sa.String(255), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("owner")
