"""The states a series goes through, from first instance to verdict.

``receiving`` while instances arrive; ``queued`` once none has arrived for the idle time;
``processing`` while a worker holds a lease on it; then ``done`` (scored), ``skipped`` (no model
applies) or ``failed`` (with a reason a person can read). A new instance for a series in any
state but ``processing`` sends it back to ``receiving``, so that it is scored again.
"""

from __future__ import annotations

from enum import Enum


class SeriesState(str, Enum):  # noqa: UP042 - the contract other modules rely on
    """Status of a series in the queue; the value is what the database stores.

    Members have upper-case names; lower-case aliases (``SeriesState.queued``) name the same
    members, because both spellings are natural and a typo should not cost a crash.
    """

    RECEIVING = "receiving"
    QUEUED = "queued"
    PROCESSING = "processing"
    DONE = "done"
    SKIPPED = "skipped"
    FAILED = "failed"

    receiving = "receiving"
    queued = "queued"
    processing = "processing"
    done = "done"
    skipped = "skipped"
    failed = "failed"

    def __str__(self) -> str:
        return self.value


#: States a worker has finished with; a new instance reopens them.
FINAL_STATES = frozenset({SeriesState.DONE, SeriesState.SKIPPED, SeriesState.FAILED})


class DeliveryState(str, Enum):  # noqa: UP042 - stored by value like SeriesState
    """Where one report stands with one destination (a row of the outbox).

    ``pending`` until a C-STORE succeeds (``sent``) or the attempts run out (``failed``, with the
    last error kept); ``vaenode queue resend`` puts rows back to ``pending``. A row still
    ``pending`` when a newer report of its series is stored becomes ``superseded`` and is never
    sent: PACS gets the current report, not an outdated one after it (or a "Quality Issue" list
    of images the new scoring calls normal).
    """

    PENDING = "pending"
    SENT = "sent"
    FAILED = "failed"
    SUPERSEDED = "superseded"

    def __str__(self) -> str:
        return self.value
