"""Each calibrated station reference keeps how many low slices make its series abnormal.

A station's low is its slices' 1% quantile, and a series' low slices come together (a few
heads' skull base): with the routing rule's 3 slices, one normal series in four to six of a
simulated site was flagged once its station had learned. The reference now learns from its
normal series how many slices below the low they reach (node/worker/learning.py) and judges
with that count where it exceeds the rule's. NULL while learning and for references
calibrated before this revision (they judge with the rule's count, as before).

Revision ID: 0017_reference_min_flagged
Revises: 0016_reference_series_flagged
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0017_reference_min_flagged"
down_revision: str | Sequence[str] | None = "0016_reference_series_flagged"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("station_references") as batch:
        batch.add_column(sa.Column("min_flagged", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("station_references") as batch:
        batch.drop_column("min_flagged")
