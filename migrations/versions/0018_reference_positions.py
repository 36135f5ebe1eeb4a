"""Each calibrated station reference keeps its normal score per slice position.

A station's low used to be the 1% quantile of its learning series' scores, pooled over all
slice positions. Normal scores depend on where a slice lies in the head, so a motion block in
the middle of a series could sit above the station's low only because the ends of the head
set it. The reference now refers each score to its position (per bin of relative position:
the median and the median minus the 5th percentile of its learning series' scores there) and
learns its centre, low and count on those values (node/worker/learning.py). NULL while
learning and for references calibrated before this revision: they go on judging the
unreferred scores with their own centre and low.

Revision ID: 0018_reference_positions
Revises: 0017_reference_min_flagged
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0018_reference_positions"
down_revision: str | Sequence[str] | None = "0017_reference_min_flagged"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("station_references") as batch:
        batch.add_column(sa.Column("position_levels", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("position_spreads", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("station_references") as batch:
        batch.drop_column("position_spreads")
        batch.drop_column("position_levels")
