"""Each calibrated station reference keeps how many of its learning series it would flag.

A station's low is its slices' 1% quantile, but a series is flagged by a few slices below it,
and a series' low slices come together: about one normal series in six to eight of a station
gets 3 or more of them. Counting, at calibration, the kept learning series that the new low
flags tells the admin that rate before the verdicts do (the Scanners page, ``vaenode queue
senders``). NULL for references calibrated before this revision and while learning.

Revision ID: 0016_reference_series_flagged
Revises: 0015_station_score
Create Date: 2026-12-05
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0016_reference_series_flagged"
down_revision: str | Sequence[str] | None = "0015_station_score"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("station_references") as batch:
        batch.add_column(sa.Column("series_flagged", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("station_references") as batch:
        batch.drop_column("series_flagged")
