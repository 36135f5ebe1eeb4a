"""Each calibrated station reference records which learning series it was built from.

A reference recorded only how many of its learning series it used and left out. An admin who
sees a calibrated station flag too little (a few bad series among its first twenty widen its
normal) could not tell which series those were without reading the arithmetic's logs. A
reference now keeps, at calibration, the series ids it used, those it left out as outliers
below the others, and those it excluded (confirmed flags, series with no foreground slice):
``learned_from``, a JSON object ``{"used": [...], "outlier": [...], "excluded": [...]}``. NULL
while learning and for references calibrated before this revision.

Revision ID: 0020_reference_learned_from
Revises: 0019_reference_image_edge
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0020_reference_learned_from"
down_revision: str | Sequence[str] | None = "0019_reference_image_edge"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("station_references") as batch:
        batch.add_column(sa.Column("learned_from", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("station_references") as batch:
        batch.drop_column("learned_from")
