"""Each calibrated station reference keeps an image edge for the series it judges normal.

A calibrated station flagged every image below its low, and those images fell in about a
third of its normal series, a few each: each such series went to PACS with a "Quality Issue"
KOS although its verdict was normal. A reference now also learns an image edge
(``image_edge``, on the referred scores, at or below ``low``): in a series it judges normal an
image is flagged only below it, in a series it judges abnormal below the low as before
(node/worker/learning.py). Each series scored keeps the image edge it was judged with
(``series.image_edge``, on the slice scores' scale; NULL where every image was judged against
the threshold). NULL while learning and for references calibrated before this revision: they
flag every image below their low.

Revision ID: 0019_reference_image_edge
Revises: 0018_reference_positions
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0019_reference_image_edge"
down_revision: str | Sequence[str] | None = "0018_reference_positions"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("station_references") as batch:
        batch.add_column(sa.Column("image_edge", sa.Float(), nullable=True))
    # Plain ALTER TABLE on series, as 0013 and 0018 did: a batch copy of the table would drop
    # and recreate it, and its slice scores would go with it (ON DELETE CASCADE).
    op.add_column("series", sa.Column("image_edge", sa.Float(), nullable=True))


def downgrade() -> None:
    op.drop_column("series", "image_edge")
    with op.batch_alter_table("station_references") as batch:
        batch.drop_column("image_edge")
