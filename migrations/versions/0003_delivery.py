"""Delivery: the reports the node wrote and the outbox of C-STOREs to destinations.

Revision ID: 0003_delivery
Revises: 0002_scoring
Create Date: 2026-11-25
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003_delivery"
down_revision: str | Sequence[str] | None = "0002_scoring"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

DELIVERY_STATES = ("pending", "sent", "failed")


def upgrade() -> None:
    op.create_table(
        "reports",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column(
            "series_id",
            sa.Integer(),
            sa.ForeignKey("series.id", ondelete="CASCADE", name="fk_reports_series"),
            nullable=False,
        ),
        sa.Column("kind", sa.String(8), nullable=False),
        sa.Column("sop_instance_uid", sa.String(64), nullable=False),
        sa.Column("sop_class_uid", sa.String(64), nullable=False),
        sa.Column("series_instance_uid", sa.String(64), nullable=False),
        sa.Column("instance_number", sa.Integer(), nullable=False),
        sa.Column("path", sa.String(512), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("superseded", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.UniqueConstraint("sop_instance_uid", name="uq_reports_sop_instance_uid"),
    )
    op.create_index("ix_reports_series_id", "reports", ["series_id"])

    op.create_table(
        "outbox",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column(
            "report_id",
            sa.Integer(),
            sa.ForeignKey("reports.id", ondelete="CASCADE", name="fk_outbox_reports"),
            nullable=False,
        ),
        sa.Column("destination", sa.String(64), nullable=False),
        sa.Column("ae_title", sa.String(16), nullable=False),
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("port", sa.Integer(), nullable=False),
        sa.Column(
            "state",
            sa.Enum(*DELIVERY_STATES, name="delivery_state", native_enum=False,
                    create_constraint=True, length=16),
            nullable=False,
            server_default="pending",
        ),
        sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("next_attempt_at", sa.DateTime(), nullable=False),
        sa.Column("lease_until", sa.DateTime(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("sent_at", sa.DateTime(), nullable=True),
    )
    op.create_index("ix_outbox_report_id", "outbox", ["report_id"])
    op.create_index("ix_outbox_state_next_attempt", "outbox", ["state", "next_attempt_at"])


def downgrade() -> None:
    op.drop_table("outbox")
    op.drop_table("reports")
