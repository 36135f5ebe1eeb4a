"""Queue: the image count a series' instances declare (Images in Acquisition).

A sender that stores a series in several associations with pauses between them releases each
one; without a count the queue took the first release as the end of the series and scored its
first part. With ``expected_instances`` (the largest Images in Acquisition its single-frame
instances declared, noted at each release) a released series short of that count waits for
the rest, or for the idle time.

Revision ID: 0007_series_expected_instances
Revises: 0006_series_release
Create Date: 2026-11-26
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007_series_expected_instances"
down_revision: str | Sequence[str] | None = "0006_series_release"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("series", sa.Column("expected_instances", sa.Integer(), nullable=True))


def downgrade() -> None:
    # Plain ALTER TABLE ... DROP COLUMN, not batch mode (see 0006: batch mode would copy and
    # drop the series table, and with foreign keys on delete every row that refers to it).
    op.drop_column("series", "expected_instances")
