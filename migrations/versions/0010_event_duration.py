"""Queue: how long each scoring run took, on the ``done`` event that ends it.

``/metrics`` exports a histogram of scoring durations. It used to pair every ``processing``
event with the next ``done`` event of the same series in Python on each scrape, work that
grows with the node's whole history. The worker now writes the run's seconds on the ``done``
event, and the histogram is one aggregate query. Existing histories are filled in here by the
same pairing.

Revision ID: 0010_event_duration
Revises: 0009_alerts
Create Date: 2026-11-26
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import sqlalchemy as sa
from alembic import op

revision: str = "0010_event_duration"
down_revision: str | Sequence[str] | None = "0009_alerts"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_BATCH = 5000


def _as_datetime(value: datetime | str) -> datetime:
    # SQLite hands the stored text back through plain SQL; PostgreSQL a datetime.
    return datetime.fromisoformat(value) if isinstance(value, str) else value


def upgrade() -> None:
    op.add_column("series_events", sa.Column("duration_s", sa.Float(), nullable=True))
    bind = op.get_bind()
    rows = bind.execute(sa.text(
        "SELECT id, series_id, to_status, at FROM series_events "
        "WHERE to_status IN ('processing', 'done') ORDER BY series_id, id"
    ))
    started: dict[int, datetime] = {}
    pending: list[dict[str, object]] = []
    update = sa.text("UPDATE series_events SET duration_s = :d WHERE id = :id")
    for event_id, series_id, to_status, at in rows.fetchall():
        if to_status == "processing":
            started[series_id] = _as_datetime(at)
        elif series_id in started:
            seconds = (_as_datetime(at) - started.pop(series_id)).total_seconds()
            pending.append({"d": max(0.0, seconds), "id": event_id})
            if len(pending) >= _BATCH:
                bind.execute(update, pending)
                pending = []
    if pending:
        bind.execute(update, pending)


def downgrade() -> None:
    # Plain DROP COLUMN, not batch mode (see 0006).
    op.drop_column("series_events", "duration_s")
