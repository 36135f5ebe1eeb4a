"""Scoring: per-slice scores and the series verdict columns.

Revision ID: 0002_scoring
Revises: 0001_ingest
Create Date: 2026-11-25
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002_scoring"
down_revision: str | Sequence[str] | None = "0001_ingest"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

VERDICT_COLUMNS = (
    ("abnormal", sa.Boolean()),
    ("abnormal_slices", sa.Integer()),
    ("scored_slices", sa.Integer()),
    ("min_abnormal_slices", sa.Integer()),
    ("model_name", sa.String(128)),
    ("model_version", sa.String(64)),
    ("threshold", sa.Float()),
    ("estimator", sa.String(32)),
    ("samples", sa.Integer()),
    ("routing_rule", sa.String(128)),
    ("scored_at", sa.DateTime()),
)


def upgrade() -> None:
    with op.batch_alter_table("series") as batch:
        for name, type_ in VERDICT_COLUMNS:
            batch.add_column(sa.Column(name, type_, nullable=True))

    op.create_table(
        "slice_scores",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column(
            "series_id",
            sa.Integer(),
            sa.ForeignKey("series.id", ondelete="CASCADE", name="fk_slice_scores_series"),
            nullable=False,
        ),
        sa.Column("sop_instance_uid", sa.String(64), nullable=False),
        sa.Column("sop_class_uid", sa.String(64), nullable=False),
        sa.Column("frame", sa.Integer(), nullable=True),
        sa.Column("stack", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("slice_index", sa.Integer(), nullable=False),
        sa.Column("log_likelihood", sa.Float(), nullable=False),
        sa.Column("kl", sa.Float(), nullable=False),
        sa.Column("elbo", sa.Float(), nullable=False),
        sa.Column("abnormal", sa.Boolean(), nullable=False),
        sa.Column("confidence", sa.Float(), nullable=False),
    )
    op.create_index(
        "ix_slice_scores_series_slice", "slice_scores", ["series_id", "slice_index"]
    )


def downgrade() -> None:
    op.drop_index("ix_slice_scores_series_slice", table_name="slice_scores")
    op.drop_table("slice_scores")
    with op.batch_alter_table("series") as batch:
        for name, _ in reversed(VERDICT_COLUMNS):
            batch.drop_column(name)
