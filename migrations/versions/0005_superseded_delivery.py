"""Delivery: a pending delivery of a report that a newer one superseded is not sent.

Revision ID: 0005_superseded_delivery
Revises: 0004_admin
Create Date: 2026-11-26
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005_superseded_delivery"
down_revision: str | Sequence[str] | None = "0004_admin"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OLD_STATES = ("pending", "sent", "failed")
NEW_STATES = (*OLD_STATES, "superseded")


def _state(states: tuple[str, ...]) -> sa.Enum:
    return sa.Enum(*states, name="delivery_state", native_enum=False, create_constraint=True,
                   length=16)


def upgrade() -> None:
    # SQLite cannot alter a CHECK constraint: batch mode copies the table with the new one.
    with op.batch_alter_table("outbox") as batch:
        batch.alter_column("state", existing_type=_state(OLD_STATES), type_=_state(NEW_STATES),
                           existing_nullable=False, existing_server_default="pending")
    # Pending deliveries of reports that are already superseded: the same rule from now on.
    op.execute(
        "UPDATE outbox SET state = 'superseded', lease_until = NULL "
        "WHERE state = 'pending' AND report_id IN (SELECT id FROM reports WHERE superseded)"
    )


def downgrade() -> None:
    op.execute("UPDATE outbox SET state = 'failed', last_error = 'superseded' "
               "WHERE state = 'superseded'")
    with op.batch_alter_table("outbox") as batch:
        batch.alter_column("state", existing_type=_state(NEW_STATES), type_=_state(OLD_STATES),
                           existing_nullable=False, existing_server_default="pending")
