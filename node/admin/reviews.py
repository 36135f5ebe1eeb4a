"""Admin actions on a series, their audit trail, and the per-model review counts.

Every action is one ``admin_actions`` row (who, when, what, which model's verdict, a note)
written in the same transaction as the change it causes, so the trail and the queue never
disagree. The state changes themselves belong to their owners: re-scoring is the queue's
:func:`node.queue.repo.requeue`, re-delivery the outbox's own function.

The live false-alarm rate of a model is estimated from the reviews: a false alarm is a flagged
series an admin marked so; the denominator is every series the model scored minus those
confirmed abnormal (unreviewed series count as true negatives or unreviewed true positives,
which is what a reviewer who looks at every flagged series and not at the rest can know).
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import insert, select
from sqlalchemy.orm import Session

from node.admin import deliveries, verdicts
from node.admin.auth import Identity
from node.config import Settings
from node.errors import AdminActionError
from node.queue import repo
from node.queue.models import AdminAction, Series
from node.queue.states import FINAL_STATES, SeriesState

log = logging.getLogger(__name__)

RETRY = "retry"
RESEND = "resend"
CONFIRM = "confirm"
FALSE_ALARM = "false_alarm"
#: A series judged normal that a reviewer saw an artifact in (revision 0021): counted on the
#: Models page, and never used for a station's normal (node.worker.station).
MISSED = "missed"
ACTIONS = (RETRY, RESEND, CONFIRM, FALSE_ALARM, MISSED)
REVIEWS = (CONFIRM, FALSE_ALARM, MISSED)
LABELS = {RETRY: "re-score", RESEND: "re-deliver", CONFIRM: "confirm", FALSE_ALARM: "false alarm",
          MISSED: "missed artifact"}


@dataclass(frozen=True)
class ActionRow:
    """One recorded action, as the series page lists it."""

    at: datetime
    actor: str
    action: str
    label: str
    model: str | None
    note: str | None


@dataclass(frozen=True)
class ModelStats:
    """Review counts of one model and its live false-alarm rate.

    Attributes:
        model: the model label (bundle name and version).
        scored: series this model scored (current verdicts).
        flagged: of those, series flagged abnormal.
        confirmed: flagged series an admin confirmed.
        false_alarms: flagged series an admin marked as a false alarm.
        false_alarm_rate: false_alarms / (scored - confirmed - missed); None before anything
            is scored.
        series_shapes: (scored slices, slices that flag the series) of each scored series
            that a count of flagged slices judged.
        station_shares: for each scored series that a calibrated station judged by its
            series edge, that station's expected false-alarm share (of its kept learning
            series, those a reference built from the others flags).
        missed: series judged normal that an admin reported as a missed artifact (a floor on
            the misses: nobody reviews every normal series).
    """

    model: str
    scored: int
    flagged: int
    confirmed: int
    false_alarms: int
    false_alarm_rate: float | None
    series_shapes: tuple[tuple[int, int], ...] = ()
    station_shares: tuple[float, ...] = ()
    missed: int = 0

    def expected_false_alarm_rate(self, slice_fpr: float) -> float | None:
        """The series false-alarm rate the model's slice target implies.

        The bundle is calibrated so that a fraction ``slice_fpr`` of normal slices falls below
        the threshold; a normal series of n slices is flagged when at least k of them do. With
        slices taken as independent that is P(Binomial(n, slice_fpr) >= k). A series that a
        calibrated station judged by its series edge counts with that station's own expected
        share instead (its learning series flagged by a reference built from the others).
        Averaged over the series this model scored: the target the live rate is compared
        with. (Neighbouring slices are correlated, so the true rate spreads wider; it is a
        yardstick, not a bound.)
        """
        count = len(self.series_shapes) + len(self.station_shares)
        if not count:
            return None
        return (sum(binomial_tail(n, slice_fpr, k) for n, k in self.series_shapes)
                + sum(self.station_shares)) / count


def binomial_tail(n: int, p: float, k: int) -> float:
    """P(X >= k) for X ~ Binomial(n, p)."""
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    below = sum(math.comb(n, j) * p**j * (1.0 - p) ** (n - j) for j in range(k))
    return min(1.0, max(0.0, 1.0 - below))


def actor_name(identity: Identity | None, reviewer: str, client_host: str | None) -> str:
    """Who did it: the authenticated name, else the name typed in the form, else the peer.

    A name typed in the form is only used when the credential carries none (the Bearer
    token, or the open loopback dashboard), so a logged-in reviewer cannot sign as another.
    """
    if identity is not None and identity.name:
        return identity.name[:128]
    typed = reviewer.strip()
    if typed:
        return typed[:128]
    return f"anonymous@{client_host or 'unknown'}"


def allowed_actions(
    session: Session, series: Series, verdict: verdicts.Verdict | None
) -> tuple[str, ...]:
    """The actions that apply to the series now (the page offers only these)."""
    allowed: list[str] = []
    if SeriesState(series.status) in FINAL_STATES and repo.has_images(session, series.id):
        allowed.append(RETRY)
    if any(d.destination for d in deliveries.for_series(session, series.series_instance_uid)):
        allowed.append(RESEND)
    if SeriesState(series.status) is SeriesState.DONE and verdict is not None:
        allowed.append(CONFIRM)
        allowed.append(FALSE_ALARM if verdict.abnormal else MISSED)
    return tuple(allowed)


def perform(
    session: Session, settings: Settings, series: Series, action: str, actor: str,
    note: str | None
) -> None:
    """Carry out ``action`` on ``series`` and record it, in one transaction.

    Raises:
        AdminActionError: unknown action, or one that does not apply (e.g. a false alarm on a
            series that was not flagged, or a re-score while it is still being received).
    """
    if action not in ACTIONS:
        raise AdminActionError(f"unknown action {action!r}")
    verdict = verdicts.series_verdict(session, series.id)
    if action not in allowed_actions(session, series, verdict):
        raise AdminActionError(
            f"{LABELS[action]} does not apply to series {series.series_instance_uid}: "
            + _why_not(action, series, verdict)
        )
    # The reads above opened the session's transaction; the change and its audit row join it
    # and commit together, or neither does.
    try:
        if action == RETRY:
            repo.requeue(session, series.id, reason=f"re-score requested by {actor}",
                         actor=f"admin:{actor}")
        elif action == RESEND:
            deliveries.resend(session, series.series_instance_uid)
        session.execute(
            insert(AdminAction).values(
                series_id=series.id,
                actor=actor,
                action=action,
                model=verdict.model if verdict is not None else None,
                note=note,
            )
        )
        session.commit()
    except BaseException:
        session.rollback()
        raise
    log.info(
        "admin action %s",
        action,
        extra={"series_uid": series.series_instance_uid, "actor": actor},
    )


def _why_not(action: str, series: Series, verdict: verdicts.Verdict | None) -> str:
    status = SeriesState(series.status)
    if action == RETRY:
        if status in FINAL_STATES:
            return "its images were deleted by the retention policy"
        return f"it is {status.value}; only done, skipped or failed series are re-scored"
    if action == RESEND:
        return "it has no report with a destination to deliver to"
    if status is not SeriesState.DONE or verdict is None:
        return f"it has no verdict to review (it is {status.value})"
    if action == MISSED:
        return "it was flagged; only a series judged normal can be a missed artifact"
    return "its verdict is normal; only a flagged series can be a false alarm"


def actions_for(session: Session, series_id: int) -> list[ActionRow]:
    """The recorded actions of one series, newest first."""
    stmt = (
        select(AdminAction)
        .where(AdminAction.series_id == series_id)
        .order_by(AdminAction.id.desc())
    )
    return [
        ActionRow(at=a.at, actor=a.actor, action=a.action, label=LABELS.get(a.action, a.action),
                  model=a.model, note=a.note)
        for a in session.scalars(stmt)
    ]


def latest_reviews(session: Session) -> dict[int, tuple[str, str | None]]:
    """Series id -> (the latest review action, the model it judged); a later review replaces
    an earlier one (an admin may change their mind)."""
    stmt = (
        select(AdminAction.series_id, AdminAction.action, AdminAction.model)
        .where(AdminAction.action.in_(REVIEWS))
        .order_by(AdminAction.id)
    )
    return {sid: (action, model) for sid, action, model in session.execute(stmt)}


def reviewed_normal(session: Session, *, stations: Sequence[str] = (),
                    calling_aets: Sequence[str] = (), since: datetime | None = None,
                    ) -> list[Series]:
    """Scored series a person called normal, whose images are still stored, oldest first:
    the latest review marked the flagged verdict a false alarm, or confirmed a normal one.
    What ``vaenode calibrate --site --from-queue`` calibrates a scanner's bundle on: a site
    calibration makes whatever it is given normal, so it takes no series on the model's word
    alone. ``stations`` (Station Name, case-insensitive) and ``calling_aets``: any of, when
    given; ``since``: first received then or later."""
    reviews = latest_reviews(session)
    stmt = select(Series).where(Series.id.in_(list(reviews)),
                                Series.status == SeriesState.DONE,
                                Series.abnormal.is_not(None), Series.purged_at.is_(None))
    if calling_aets:
        stmt = stmt.where(Series.calling_aet.in_(list(calling_aets)))
    if since is not None:
        stmt = stmt.where(Series.first_received_at >= since)
    wanted = {s.upper() for s in stations}
    out = []
    for series in session.scalars(stmt.order_by(Series.first_received_at, Series.id)):
        action = reviews[series.id][0]
        normal = action == (FALSE_ALARM if series.abnormal else CONFIRM)
        if normal and (not wanted or (series.station_name or "").upper() in wanted):
            out.append(series)
    return out


def model_review_stats(session: Session) -> list[ModelStats]:
    """Per model: scored, flagged, confirmed, false alarms and the live false-alarm rate."""
    scored: dict[str, int] = defaultdict(int)
    flagged: dict[str, int] = defaultdict(int)
    current: dict[int, tuple[str, bool]] = {}
    shapes: dict[str, list[tuple[int, int]]] = defaultdict(list)
    shares: dict[str, list[float]] = defaultdict(list)
    for row in verdicts.all_verdicts(session):
        scored[row.model] += 1
        flagged[row.model] += int(row.abnormal)
        current[row.series_id] = (row.model, row.abnormal)
        if row.station_share is not None:
            shares[row.model].append(row.station_share)
        else:
            shapes[row.model].append((row.scored_slices, row.min_abnormal_slices))
    confirmed: dict[str, int] = defaultdict(int)
    false_alarms: dict[str, int] = defaultdict(int)
    missed: dict[str, int] = defaultdict(int)
    for series_id, (action, reviewed_model) in latest_reviews(session).items():
        if reviewed_model is None:
            continue
        if action == FALSE_ALARM:
            false_alarms[reviewed_model] += 1
        elif action == MISSED and current.get(series_id) == (reviewed_model, False):
            missed[reviewed_model] += 1
        elif action == CONFIRM and current.get(series_id) == (reviewed_model, True):
            # Only a confirmed flag is a true positive; confirming a normal verdict says the
            # series is a true negative, which the denominator already assumes.
            confirmed[reviewed_model] += 1
    out = []
    for model in sorted(set(scored) | set(confirmed) | set(false_alarms) | set(missed)):
        negatives = scored[model] - confirmed[model] - missed[model]
        rate = false_alarms[model] / negatives if negatives > 0 else None
        out.append(ModelStats(model=model, scored=scored[model], flagged=flagged[model],
                              confirmed=confirmed[model], false_alarms=false_alarms[model],
                              false_alarm_rate=rate, series_shapes=tuple(shapes[model]),
                              station_shares=tuple(shares[model]), missed=missed[model]))
    return out


def delivery_failures(session: Session) -> int:
    """Failed delivery attempts so far (for ``/metrics``)."""
    return deliveries.failed_attempts(session)
