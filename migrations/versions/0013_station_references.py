"""Each station learns its own normal: station references, and what judged each series.

The shipped bundle's threshold was set on one scanner's normal slices; another scanner's
normal sits elsewhere on the score, and nearly every series it sends was flagged. A station
(Station Name, Manufacturer's Model Name, protocol) now keeps a reference per bundle:
``learning`` over its first ``[learning].series`` scored series, then ``calibrated`` with the
centre and low of its own normal scores (``node/worker/learning.py``). A restart by an admin
supersedes the row (kept, with who and when) and starts a new one; a partial unique index keeps
one current row per station and bundle, whichever worker gets there first.

Each series records the reference that judged it and its state then; each slice score records
whether the slice is foreground (leading and trailing background slices are never flagged and
their scores mean nothing) and the bundle's own score before a station reference mapped it.
Rows from before this revision keep NULL there (their ``log_likelihood`` is the bundle's own
score; this migration rewrites no slice row).

Revision ID: 0013_station_references
Revises: 0012_alerts_problems
Create Date: 2026-11-27
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0013_station_references"
down_revision: str | Sequence[str] | None = "0012_alerts_problems"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_KEY = ("station", "station_source", "scanner_model", "protocol", "model_name",
        "model_version")


def upgrade() -> None:
    op.create_table(
        "station_references",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("station", sa.String(64), nullable=False),
        sa.Column("station_source", sa.String(16), nullable=False),
        sa.Column("scanner_model", sa.String(64), nullable=False),
        sa.Column("protocol", sa.String(256), nullable=False),
        sa.Column("model_name", sa.String(128), nullable=False),
        sa.Column("model_version", sa.String(64), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("calibrated_at", sa.DateTime(), nullable=True),
        sa.Column("centre", sa.Float(), nullable=True),
        sa.Column("low", sa.Float(), nullable=True),
        sa.Column("bundle_median", sa.Float(), nullable=True),
        sa.Column("bundle_threshold", sa.Float(), nullable=True),
        sa.Column("target_fpr", sa.Float(), nullable=True),
        sa.Column("series_used", sa.Integer(), nullable=True),
        sa.Column("series_trimmed", sa.Integer(), nullable=True),
        sa.Column("series_excluded", sa.Integer(), nullable=True),
        sa.Column("slices", sa.Integer(), nullable=True),
        sa.Column("note", sa.Text(), nullable=True),
        sa.Column("superseded_at", sa.DateTime(), nullable=True),
        sa.Column("superseded_by", sa.String(128), nullable=True),
        sa.Column("superseded_note", sa.Text(), nullable=True),
        sa.CheckConstraint("state IN ('learning', 'calibrated')",
                           name="ck_station_references_state"),
    )
    op.create_index("uq_station_references_current", "station_references", list(_KEY),
                    unique=True, sqlite_where=sa.text("superseded_at IS NULL"),
                    postgresql_where=sa.text("superseded_at IS NULL"))
    op.add_column("series", sa.Column("reference_id", sa.Integer(), nullable=True))
    op.add_column("series", sa.Column("reference_state", sa.String(16), nullable=True))
    op.create_index("ix_series_reference_id", "series", ["reference_id"])
    op.add_column("slice_scores", sa.Column("foreground", sa.Boolean(), nullable=True))
    op.add_column("slice_scores", sa.Column("bundle_score", sa.Float(), nullable=True))


def downgrade() -> None:
    # Plain ALTER TABLE ... DROP COLUMN, not batch mode (see 0006).
    op.drop_column("slice_scores", "bundle_score")
    op.drop_column("slice_scores", "foreground")
    op.drop_index("ix_series_reference_id", table_name="series")
    op.drop_column("series", "reference_state")
    op.drop_column("series", "reference_id")
    op.drop_index("uq_station_references_current", table_name="station_references")
    op.drop_table("station_references")
