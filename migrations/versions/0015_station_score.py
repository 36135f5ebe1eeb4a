"""Each slice score keeps the bundle's station score: the score a station's reference learns.

A bundle may score a slice two ways from the same model outputs (``station_scoring`` in its
``model.json``): out of the box with a score that leaves out what differs between scanners,
and, for a station's own reference, with one that keeps the parts that see motion and
ghosting. The learning series' station scores build the reference, and a calibrated station
judges its series by them, so each slice row stores it. NULL where the bundle declares no
station score (the station then learns ``bundle_score``) and for rows scored before this
revision.

Revision ID: 0015_station_score
Revises: 0014_nodes
Create Date: 2026-12-05
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0015_station_score"
down_revision: str | Sequence[str] | None = "0014_nodes"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("slice_scores") as batch:
        batch.add_column(sa.Column("station_score", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("slice_scores") as batch:
        batch.drop_column("station_score")
