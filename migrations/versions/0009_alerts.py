"""Alerts: a message per flagged series and alert URL, with its retry state.

The report reaches the PACS, where a radiologist sees it later; the technologist, who can
still repeat the scan while the patient is on the table, needs to hear of it at once. Each
flagged series gets one row per ``[alerts].urls`` entry, sent by HTTP POST with retries.

Revision ID: 0009_alerts
Revises: 0008_series_purged
Create Date: 2026-11-26
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009_alerts"
down_revision: str | Sequence[str] | None = "0008_series_purged"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "alerts",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column(
            "series_id",
            sa.Integer(),
            sa.ForeignKey("series.id", ondelete="CASCADE", name="fk_alerts_series"),
            nullable=False,
        ),
        sa.Column("url", sa.String(1024), nullable=False),
        sa.Column("payload", sa.Text(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(), nullable=False),
        sa.Column("lease_until", sa.DateTime(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("sent_at", sa.DateTime(), nullable=True),
    )
    op.create_index("ix_alerts_series_id", "alerts", ["series_id"])
    op.create_index("ix_alerts_due", "alerts", ["state", "next_attempt_at"])


def downgrade() -> None:
    op.drop_index("ix_alerts_due", table_name="alerts")
    op.drop_index("ix_alerts_series_id", table_name="alerts")
    op.drop_table("alerts")
