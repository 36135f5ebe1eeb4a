"""Ingest: when an association that stored a series' instances was released, and how many.

A sender that releases its association normally has finished sending what it meant to send;
the queue can take the series as complete a short settle time later instead of waiting for the
idle time (``[queue].complete_on_release``).

Revision ID: 0006_series_release
Revises: 0005_superseded_delivery
Create Date: 2026-11-26
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006_series_release"
down_revision: str | Sequence[str] | None = "0005_superseded_delivery"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("series", sa.Column("released_at", sa.DateTime(), nullable=True))
    op.add_column("series", sa.Column("released_instances", sa.Integer(), nullable=True))


def downgrade() -> None:
    # Plain ALTER TABLE ... DROP COLUMN (SQLite 3.35 and later), not batch mode: batch mode
    # would copy and drop the series table, and with foreign keys on, dropping it deletes
    # every row that refers to it (instances, reports, deliveries).
    op.drop_column("series", "released_instances")
    op.drop_column("series", "released_at")
