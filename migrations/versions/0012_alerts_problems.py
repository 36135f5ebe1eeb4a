"""Alerts about the node itself: reports not reaching PACS, storage running out, a stuck queue.

Until now an alert row was a flagged series; the PACS admin learned of a PACS that stopped
taking reports, or a storage that was filling up, only from Prometheus, which many
departments do not run. Problem alerts go to ``[alerts].ops_urls`` through the same rows and
retries, so a row may now name no series. ``event`` says what a row is about
(``series_flagged`` for every row before this revision), and ``problem_key`` which
destination, folder or queue a problem alert is about: the node sends one message per
problem and key at most every ``[alerts].ops_repeat_h`` hours while it lasts.

Revision ID: 0012_alerts_problems
Revises: 0011_series_scanner
Create Date: 2026-11-26
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012_alerts_problems"
down_revision: str | Sequence[str] | None = "0011_series_scanner"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Batch mode: SQLite cannot drop NOT NULL in place, so the alerts table is copied. Nothing
    # refers to alerts, so no cascade runs when its old copy is dropped (unlike series: 0006).
    with op.batch_alter_table("alerts") as batch:
        batch.alter_column("series_id", existing_type=sa.Integer(), nullable=True)
        batch.add_column(sa.Column("event", sa.String(32), nullable=False,
                                   server_default="series_flagged"))
        batch.add_column(sa.Column("problem_key", sa.String(255), nullable=True))
    op.create_index("ix_alerts_problem", "alerts", ["event", "problem_key", "created_at"])


def downgrade() -> None:
    op.drop_index("ix_alerts_problem", table_name="alerts")
    op.execute("DELETE FROM alerts WHERE series_id IS NULL")
    with op.batch_alter_table("alerts") as batch:
        batch.drop_column("problem_key")
        batch.drop_column("event")
        batch.alter_column("series_id", existing_type=sa.Integer(), nullable=False)
