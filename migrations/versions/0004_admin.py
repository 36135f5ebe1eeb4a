"""Admin: the dashboard's audit trail of actions (retry, resend, confirm, false alarm).

Revision ID: 0004_admin
Revises: 0003_delivery
Create Date: 2026-11-25
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004_admin"
down_revision: str | Sequence[str] | None = "0003_delivery"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Confirmation and false-alarm counts per model are derived from these rows (the latest
    # review of each series, grouped by the model column), so no counter table is kept.
    op.create_table(
        "admin_actions",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column(
            "series_id",
            sa.Integer(),
            sa.ForeignKey("series.id", ondelete="CASCADE", name="fk_admin_actions_series_id"),
            nullable=False,
        ),
        sa.Column("actor", sa.String(128), nullable=False),
        sa.Column("at", sa.DateTime(), nullable=False),
        sa.Column("action", sa.String(16), nullable=False),
        sa.Column("model", sa.String(128), nullable=True),
        sa.Column("note", sa.Text(), nullable=True),
        sa.CheckConstraint(
            "action IN ('retry', 'resend', 'confirm', 'false_alarm')",
            name="ck_admin_actions_action",
        ),
    )
    op.create_index("ix_admin_actions_series_id", "admin_actions", ["series_id"])
    op.create_index("ix_admin_actions_at", "admin_actions", ["at"])


def downgrade() -> None:
    op.drop_index("ix_admin_actions_at", table_name="admin_actions")
    op.drop_index("ix_admin_actions_series_id", table_name="admin_actions")
    op.drop_table("admin_actions")
