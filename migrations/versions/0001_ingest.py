"""Ingest: series (with queue state), status history, instances, associations.

Revision ID: 0001_ingest
Revises:
Create Date: 2026-11-25
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001_ingest"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

STATES = ("receiving", "queued", "processing", "done", "skipped", "failed")


def upgrade() -> None:
    op.create_table(
        "series",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("study_instance_uid", sa.String(64), nullable=False),
        sa.Column("series_instance_uid", sa.String(64), nullable=False),
        sa.Column("modality", sa.String(16), nullable=True),
        sa.Column("series_description", sa.String(256), nullable=True),
        sa.Column("body_part", sa.String(64), nullable=True),
        sa.Column("calling_aet", sa.String(16), nullable=True),
        sa.Column("peer_address", sa.String(128), nullable=True),
        sa.Column("instance_count", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("first_received_at", sa.DateTime(), nullable=False),
        sa.Column("last_received_at", sa.DateTime(), nullable=False),
        sa.Column(
            "status",
            sa.Enum(*STATES, name="series_state", native_enum=False, create_constraint=True,
                    length=16),
            nullable=False,
            server_default="receiving",
        ),
        sa.Column("status_reason", sa.Text(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("lease_until", sa.DateTime(), nullable=True),
        sa.Column("worker_id", sa.String(128), nullable=True),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.UniqueConstraint("series_instance_uid", name="uq_series_series_instance_uid"),
    )
    op.create_index("ix_series_status_last_received", "series", ["status", "last_received_at"])
    op.create_index("ix_series_study", "series", ["study_instance_uid"])

    op.create_table(
        "series_events",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column(
            "series_id",
            sa.Integer(),
            sa.ForeignKey("series.id", ondelete="CASCADE", name="fk_series_events_series"),
            nullable=False,
        ),
        sa.Column("at", sa.DateTime(), nullable=False),
        sa.Column("from_status", sa.String(16), nullable=True),
        sa.Column("to_status", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("actor", sa.String(128), nullable=False),
    )
    op.create_index("ix_series_events_series_id", "series_events", ["series_id"])

    op.create_table(
        "instances",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column(
            "series_id",
            sa.Integer(),
            sa.ForeignKey("series.id", ondelete="CASCADE", name="fk_instances_series"),
            nullable=False,
        ),
        sa.Column("sop_instance_uid", sa.String(64), nullable=False),
        sa.Column("sop_class_uid", sa.String(64), nullable=False),
        sa.Column("transfer_syntax_uid", sa.String(64), nullable=False),
        sa.Column("path", sa.String(512), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("instance_number", sa.Integer(), nullable=True),
        sa.Column("received_at", sa.DateTime(), nullable=False),
        sa.UniqueConstraint("sop_instance_uid", name="uq_instances_sop_instance_uid"),
    )
    op.create_index("ix_instances_series_id", "instances", ["series_id"])

    op.create_table(
        "associations",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("calling_aet", sa.String(16), nullable=True),
        sa.Column("called_aet", sa.String(16), nullable=True),
        sa.Column("peer_address", sa.String(128), nullable=True),
        sa.Column("started_at", sa.DateTime(), nullable=False),
        sa.Column("ended_at", sa.DateTime(), nullable=True),
        sa.Column("instance_count", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("failed_count", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("result", sa.String(128), nullable=False, server_default="open"),
    )
    op.create_index("ix_associations_started_at", "associations", ["started_at"])


def downgrade() -> None:
    op.drop_table("associations")
    op.drop_table("instances")
    op.drop_table("series_events")
    op.drop_table("series")
