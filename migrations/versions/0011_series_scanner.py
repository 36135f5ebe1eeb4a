"""Queue: which scanner made a series (Station Name, Manufacturer, Manufacturer's Model Name).

Series were told apart by the calling AE title alone. A department that routes several
scanners through one gateway AE (a DICOM router, a PACS forwarding) saw them as one sender on
the Scanners page, and a technologist's alert named the gateway rather than the room. The
series' first instance now sets these three. Rows stored before this revision start NULL; the
worker fills them from the headers when it next scores the series (this migration reads no
files: the images may have been purged).

Revision ID: 0011_series_scanner
Revises: 0010_event_duration
Create Date: 2026-11-26
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011_series_scanner"
down_revision: str | Sequence[str] | None = "0010_event_duration"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_COLUMNS = ("station_name", "manufacturer", "scanner_model")


def upgrade() -> None:
    for name in _COLUMNS:
        op.add_column("series", sa.Column(name, sa.String(64), nullable=True))


def downgrade() -> None:
    # Plain ALTER TABLE ... DROP COLUMN, not batch mode (see 0006).
    for name in reversed(_COLUMNS):
        op.drop_column("series", name)
