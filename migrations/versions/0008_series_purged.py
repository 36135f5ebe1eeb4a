"""Queue: when the retention job deleted a series' images.

The node keeps received images only as long as ``[storage].retention_days`` says; the series
row, its history, verdict and reports stay, with ``purged_at`` saying when its images went and
``purged_instances`` how many instance rows went with them (counts of received instances add
it back, so that they never go down).

Revision ID: 0008_series_purged
Revises: 0007_series_expected_instances
Create Date: 2026-11-26
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008_series_purged"
down_revision: str | Sequence[str] | None = "0007_series_expected_instances"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("series", sa.Column("purged_at", sa.DateTime(), nullable=True))
    op.add_column("series", sa.Column("purged_instances", sa.Integer(), nullable=True))


def downgrade() -> None:
    # Plain DROP COLUMN, not batch mode (see 0006).
    op.drop_column("series", "purged_instances")
    op.drop_column("series", "purged_at")
