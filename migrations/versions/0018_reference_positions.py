"""Each calibrated station reference keeps its normal score per slice position and a series edge.

A station's low used to be the 1% quantile of its learning series' scores, pooled over all
slice positions. Normal scores depend on where a slice lies in the head, so a motion block in
the middle of a series could sit above the station's low only because the ends of the head
set it. The reference now refers each score to its position (per bin of relative position:
the median and the median minus the 5th percentile of its learning series' scores there) and
learns its centre and low on those values (node/worker/learning.py). NULL while learning and
for references calibrated before this revision: they go on judging the unreferred scores
with their own centre, low and count.

A count of slices below the low also flagged about one normal series in ten, since a series'
low slices come together. A reference now judges a series by its 10th-percentile referred
score against a series edge (``series_edge``: below it, one of its learning series would have
been an outlier), and each series scored keeps the score and the edge that judged it
(``series.series_score``, ``series.series_edge``, on the slice scores' scale; NULL where the
slice count judged).

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
        batch.add_column(sa.Column("series_edge", sa.Float(), nullable=True))
    # Plain ALTER TABLE on series, as 0013 did: a batch copy of the table would drop and
    # recreate it, and its slice scores would go with it (ON DELETE CASCADE).
    op.add_column("series", sa.Column("series_score", sa.Float(), nullable=True))
    op.add_column("series", sa.Column("series_edge", sa.Float(), nullable=True))


def downgrade() -> None:
    op.drop_column("series", "series_edge")
    op.drop_column("series", "series_score")
    with op.batch_alter_table("station_references") as batch:
        batch.drop_column("series_edge")
        batch.drop_column("position_spreads")
        batch.drop_column("position_levels")
