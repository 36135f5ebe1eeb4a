"""A reviewer can report a series judged normal as a missed artifact (``missed``).

Reviews were a flag confirmed or a false alarm; a series the model called normal could only be
confirmed normal. A bad series judged normal while its station learned (out of the box the
default bundle sees no motion) was then used for the station's normal, and a few of them widen
it where their bad images lie. A ``missed`` review keeps such a series out of every reference
built after it (node.worker.learning: like a confirmed flag), and the Models page counts the
misses reviewers reported. The CHECK on ``admin_actions.action`` gains the value.

Revision ID: 0021_admin_action_missed
Revises: 0020_reference_learned_from
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0021_admin_action_missed"
down_revision: str | Sequence[str] | None = "0020_reference_learned_from"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_BEFORE = "action IN ('retry', 'resend', 'confirm', 'false_alarm')"
_AFTER = "action IN ('retry', 'resend', 'confirm', 'false_alarm', 'missed')"


def _check(condition: str) -> None:
    # admin_actions is a child table (series rows cascade into it, nothing into it), so the
    # batch copy SQLite needs to change a CHECK loses nothing.
    with op.batch_alter_table("admin_actions", recreate="auto") as batch:
        batch.drop_constraint("ck_admin_actions_action", type_="check")
        batch.create_check_constraint("ck_admin_actions_action", condition)


def upgrade() -> None:
    _check(_AFTER)


def downgrade() -> None:
    op.execute("DELETE FROM admin_actions WHERE action = 'missed'")
    _check(_BEFORE)
