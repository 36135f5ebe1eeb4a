"""Station references in the queue database: the key of a station, its current reference,
the series it learns from, calibration and restart.

A reference belongs to a station (Station Name, or the calling AE title when the series name
no station; Manufacturer's Model Name; the normalized protocol) and to one bundle (name and
version). Creating one is safe with several workers on one database: a partial unique index
allows one current row per key, and the loser of a race reads the winner's row. Calibration
happens exactly once: the worker that stores a learning series takes the reference's row lock
(``SELECT ... FOR UPDATE``; SQLite has one writer anyway) before counting, so two workers
storing the last two learning series at once cannot both see one short of the number.

The arithmetic lives in :mod:`node.worker.learning`; this module only reads and writes rows.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import ColumnElement

from node.queue.models import AdminAction, Series, SliceScore, StationReference, utcnow
from node.queue.states import SeriesState

log = logging.getLogger(__name__)

LEARNING = "learning"
CALIBRATED = "calibrated"
#: Where a key's station comes from.
FROM_STATION_NAME = "station_name"
FROM_CALLING_AET = "calling_aet"

#: What a calibrated reference did with each of its learning series (``learned_from``):
#: used it, left it out as an outlier below the others, or excluded it (a confirmed flag, a
#: reported miss, or no foreground slice).
USED, OUTLIER, EXCLUDED = "used", "outlier", "excluded"
ROLES = (USED, OUTLIER, EXCLUDED)

#: The reviews the dashboard records (``admin_actions.action``).
_CONFIRM = "confirm"
_FALSE_ALARM = "false_alarm"
_MISSED = "missed"


def normalize_protocol(description: str | None) -> str:
    """A Series Description as a protocol: trimmed, case-folded, runs of spaces collapsed
    (``"T1  MPRAGE Sag "`` and ``"t1 mprage sag"`` are one protocol)."""
    return " ".join((description or "").split()).casefold()


@dataclass(frozen=True)
class StationKey:
    """What a reference belongs to: a station's protocol, as one bundle scores it."""

    station: str
    station_source: str
    scanner_model: str
    protocol: str
    model_name: str
    model_version: str

    @property
    def label(self) -> str:
        """The station and protocol as people read them."""
        model = f" ({self.scanner_model})" if self.scanner_model else ""
        via = " (calling AE)" if self.station_source == FROM_CALLING_AET else ""
        return f"{self.station}{via}{model}, protocol '{self.protocol}'"


def station_key(*, station_name: str | None, calling_aet: str | None,
                scanner_model: str | None, series_description: str | None,
                model_name: str, model_version: str) -> StationKey | None:
    """The key of a series' station, or None when it names no station and no calling AE."""
    station = " ".join((station_name or "").split())
    source = FROM_STATION_NAME
    if not station:
        station, source = (calling_aet or "").strip(), FROM_CALLING_AET
    if not station:
        return None
    return StationKey(station=station[:64], station_source=source,
                      scanner_model=" ".join((scanner_model or "").split())[:64],
                      protocol=normalize_protocol(series_description)[:256],
                      model_name=model_name[:128], model_version=model_version[:64])


def key_of(reference: StationReference) -> StationKey:
    """The key a reference row belongs to."""
    return StationKey(reference.station, reference.station_source, reference.scanner_model,
                      reference.protocol, reference.model_name, reference.model_version)


def _current(key: StationKey) -> tuple[ColumnElement[bool], ...]:
    return (StationReference.station == key.station,
            StationReference.station_source == key.station_source,
            StationReference.scanner_model == key.scanner_model,
            StationReference.protocol == key.protocol,
            StationReference.model_name == key.model_name,
            StationReference.model_version == key.model_version,
            StationReference.superseded_at.is_(None))


def of_station(station: str, protocol: str | None = None) -> tuple[ColumnElement[bool], ...]:
    """Where-clauses for the current references of a station (Station Name or calling AE
    title, case and runs of spaces ignored) and, when given, of one protocol (normalized)."""
    where: list[ColumnElement[bool]] = [
        StationReference.superseded_at.is_(None),
        func.upper(StationReference.station) == " ".join(station.split()).upper()]
    if protocol is not None:
        where.append(StationReference.protocol == normalize_protocol(protocol))
    return tuple(where)


def current_reference(session: Session, key: StationKey) -> StationReference | None:
    """The key's current (not superseded) reference, if it has one."""
    return session.scalars(select(StationReference).where(*_current(key))).first()


def ensure_reference(session: Session, key: StationKey) -> StationReference:
    """The key's current reference, created in ``learning`` when it has none (commits).

    Two workers creating the same key at once: the unique index refuses the second insert,
    which then reads the first one's row.
    """
    found = current_reference(session, key)
    if found is None:
        found = StationReference(station=key.station, station_source=key.station_source,
                                 scanner_model=key.scanner_model, protocol=key.protocol,
                                 model_name=key.model_name, model_version=key.model_version,
                                 state=LEARNING, created_at=utcnow())
        session.add(found)
        try:
            session.commit()
        except IntegrityError:
            session.rollback()
            found = current_reference(session, key)
            if found is None:
                raise
        else:
            log.info("station reference created: learning",
                     extra={"station": key.label, "reference_id": found.id})
    session.commit()
    return found


def lock_reference(session: Session, reference_id: int) -> StationReference:
    """The reference's row, locked until the caller's transaction ends (PostgreSQL: ``FOR
    UPDATE``, read afresh; SQLite: the transaction already holds the write lock)."""
    return session.scalars(select(StationReference).where(StationReference.id == reference_id)
                           .with_for_update().execution_options(populate_existing=True)).one()


def learning_series_ids(session: Session, reference_id: int) -> list[int]:
    """Series judged ``learning`` by the reference and scored (done), oldest verdict first."""
    return list(session.scalars(
        select(Series.id).where(Series.reference_id == reference_id,
                                Series.reference_state == LEARNING,
                                Series.status == SeriesState.DONE,
                                Series.abnormal.is_not(None))
        .order_by(Series.scored_at, Series.id)))


def learned_counts(session: Session, reference_ids: Sequence[int]) -> dict[int, int]:
    """Scored learning series per reference."""
    if not reference_ids:
        return {}
    rows = session.execute(
        select(Series.reference_id, func.count()).where(
            Series.reference_id.in_(list(reference_ids)), Series.reference_state == LEARNING,
            Series.status == SeriesState.DONE, Series.abnormal.is_not(None))
        .group_by(Series.reference_id))
    return {int(rid): int(n) for rid, n in rows if rid is not None}


def latest_reviews_of(session: Session, series_ids: Sequence[int]) -> dict[int, str]:
    """Series id -> its latest review (``confirm``, ``false_alarm`` or ``missed``), for those
    reviewed."""
    if not series_ids:
        return {}
    rows = session.execute(
        select(AdminAction.series_id, AdminAction.action)
        .where(AdminAction.series_id.in_(list(series_ids)),
               AdminAction.action.in_((_CONFIRM, _FALSE_ALARM, _MISSED)))
        .order_by(AdminAction.id))
    return {int(sid): str(action) for sid, action in rows}


def reviewed_as(review: str | None, abnormal: bool | None) -> str | None:
    """What a series' latest review says it is: ``"normal"`` (a false alarm, or a normal
    verdict confirmed), ``"bad"`` (a flag confirmed, or a missed artifact reported), or None
    (not reviewed)."""
    if review == _FALSE_ALARM or (review == _CONFIRM and not abnormal):
        return "normal"
    if review in (_CONFIRM, _MISSED):
        return "bad"
    return None


@dataclass(frozen=True)
class LearnedSeries:
    """One learning series of a reference, as an admin audits it.

    Attributes:
        series_id / series_instance_uid / description: the series.
        scored_at: when its verdict was made.
        abnormal: its verdict then (out of the box, while the station learned).
        review: its latest review (``confirm``, ``false_alarm``, ``missed``) or None.
        role: what the calibration did with it (:data:`ROLES`); None while the reference
            learns, for a series scored after it calibrated, and for references calibrated
            before revision 0020.
        purged: its images were deleted by retention (it can no longer train a network).
    """

    series_id: int
    series_instance_uid: str
    description: str | None
    scored_at: datetime | None
    abnormal: bool | None
    review: str | None
    role: str | None
    purged: bool

    @property
    def review_since(self) -> bool:
        """Its review now disagrees with what the calibration did with it: a series used or
        left out as an outlier was reviewed bad since, or one left out was reviewed normal
        (a recalibration would treat it otherwise; one with no foreground slice stays out)."""
        said = reviewed_as(self.review, self.abnormal)
        return ((said == "bad" and self.role in (USED, OUTLIER))
                or (said == "normal" and self.role in (OUTLIER, EXCLUDED)))


#: What a calibration did with a learning series, in words (see :func:`role_words`).
ROLE_WORDS = {USED: "used", OUTLIER: "left out (outlier below the others)",
              EXCLUDED: "left out (a confirmed flag or a reported miss, or no foreground "
                        "slice)"}
#: A learning series' latest review, in words, as a clause after its verdict.
REVIEW_WORDS = {_CONFIRM: ", verdict confirmed", _FALSE_ALARM: ", false alarm",
                _MISSED: ", missed artifact"}


def role_words(series: LearnedSeries, learned_from: dict[str, list[int]] | None,
               state: str) -> str:
    """What its reference (``learned_from``, ``state``) did with a learning series, in
    words: the Scanners page and ``vaenode queue senders --series`` say the same."""
    if series.role is not None:
        return ROLE_WORDS.get(series.role, series.role)
    if learned_from is not None:
        return "scored after calibration, not used"
    if state == LEARNING:
        return "learning"
    return "(calibrated before the node recorded roles)"


def learned_series(session: Session, reference_id: int,
                   learned_from: dict[str, list[int]] | None) -> list[LearnedSeries]:
    """A reference's learning series (those it calibrated from, and any scored ``learning``
    since), oldest verdict first, each with its role in the calibration (``learned_from``,
    the reference's column)."""
    roles = {int(i): role for role, ids in (learned_from or {}).items() for i in ids}
    ids = set(learning_series_ids(session, reference_id)) | set(roles)
    if not ids:
        return []
    rows = session.execute(
        select(Series.id, Series.series_instance_uid, Series.series_description,
               Series.scored_at, Series.abnormal, Series.purged_at)
        .where(Series.id.in_(sorted(ids))).order_by(Series.scored_at, Series.id)).all()
    reviews = latest_reviews_of(session, sorted(ids))
    return [LearnedSeries(int(sid), uid, description, scored_at, abnormal,
                          reviews.get(int(sid)), roles.get(int(sid)), purged is not None)
            for sid, uid, description, scored_at, abnormal, purged in rows]


@dataclass(frozen=True)
class LearningRows:
    """What the reference arithmetic needs of one learning series, read from the database.

    Attributes:
        series_id: the series.
        scores: its foreground slices' station scores where the bundle gives them, else its
            own scores (before any station reference), in slice order.
        abnormal: its verdict (out of the box).
        review: its latest review (``confirm``, ``false_alarm``) or None.
        stacks: the stack of the series each score's slice is in.
    """

    series_id: int
    scores: tuple[float, ...]
    abnormal: bool
    review: str | None
    stacks: tuple[int, ...] = ()


def learning_rows(session: Session, series_ids: Sequence[int]) -> list[LearningRows]:
    """The foreground scores a reference learns (station score, else the bundle's own) with
    their stacks, the verdict and the review of each series, in the given order."""
    if not series_ids:
        return []
    scores: dict[int, list[float]] = {i: [] for i in series_ids}
    stacks: dict[int, list[int]] = {i: [] for i in series_ids}
    own = func.coalesce(SliceScore.station_score, SliceScore.bundle_score,
                        SliceScore.log_likelihood)
    for sid, value, stack in session.execute(
            select(SliceScore.series_id, own, SliceScore.stack)
            .where(SliceScore.series_id.in_(list(series_ids)),
                   SliceScore.foreground.is_not(False))
            .order_by(SliceScore.series_id, SliceScore.slice_index)):
        scores[int(sid)].append(float(value))
        stacks[int(sid)].append(int(stack or 0))
    verdicts = {int(i): bool(abnormal) for i, abnormal in
                session.execute(select(Series.id, Series.abnormal)
                                .where(Series.id.in_(list(series_ids))))}
    reviews = latest_reviews_of(session, series_ids)
    rows = []
    for i in series_ids:
        rows.append(LearningRows(i, tuple(scores[i]), verdicts.get(i, False), reviews.get(i),
                                 tuple(stacks[i])))
    return rows


def mark_calibrated(session: Session, reference_id: int, *, centre: float, low: float,
                    bundle_median: float, bundle_threshold: float, target_fpr: float,
                    used: int, trimmed: int, excluded: int, slices: int,
                    series_flagged: int, series_edge: float | None,
                    position_levels: Sequence[float], position_spreads: Sequence[float],
                    image_edge: float | None,
                    learned_from: dict[str, Sequence[int]] | None = None) -> None:
    """``learning`` -> ``calibrated`` (inside the caller's transaction, under the row lock).

    ``learned_from``: the learning series' ids by role (:data:`ROLES`), kept for the admin.
    """
    session.execute(
        update(StationReference)
        .where(StationReference.id == reference_id, StationReference.state == LEARNING)
        .values(state=CALIBRATED, calibrated_at=utcnow(), centre=centre, low=low,
                bundle_median=bundle_median, bundle_threshold=bundle_threshold,
                target_fpr=target_fpr, series_used=used, series_trimmed=trimmed,
                series_excluded=excluded, slices=slices, series_flagged=series_flagged,
                series_edge=series_edge, position_levels=[float(v) for v in position_levels],
                position_spreads=[float(v) for v in position_spreads], image_edge=image_edge,
                learned_from=(None if learned_from is None else
                              {role: [int(i) for i in learned_from.get(role, ())]
                               for role in ROLES}),
                note=None)
        .execution_options(synchronize_session=False))


def note_refusal(session: Session, reference_id: int, reason: str) -> None:
    """Record why the reference could not calibrate yet (it stays ``learning``)."""
    session.execute(update(StationReference).where(StationReference.id == reference_id)
                    .values(note=reason[:2000]).execution_options(synchronize_session=False))


def restart_learning(session: Session, *, actor: str, note: str | None = None,
                     station: str | None = None, protocol: str | None = None,
                     reference_ids: Sequence[int] = ()) -> list[StationReference]:
    """Supersede current references and start each station afresh in ``learning`` (commits).

    Chooses the current references of ``station`` (Station Name or calling AE title,
    case-insensitive; with ``protocol``, that protocol only, normalized), or those of
    ``reference_ids``. Each superseded row keeps its values and records who and when; a new
    ``learning`` row with the same key takes its place, so the next ``[learning].series``
    series of that station learn anew.

    Returns:
        The new rows (empty when nothing matched).
    """
    if reference_ids:
        stmt = select(StationReference).where(StationReference.superseded_at.is_(None),
                                              StationReference.id.in_(list(reference_ids)))
    elif station is not None:
        stmt = select(StationReference).where(*of_station(station, protocol))
    else:
        raise ValueError("name a station or reference ids")
    created = []
    try:
        old_rows = session.scalars(stmt.order_by(StationReference.id).with_for_update()).all()
        for old in old_rows:
            created.append(supersede(session, old, actor=actor, note=note))
        session.commit()
    except BaseException:
        session.rollback()
        raise
    for new in created:
        log.info("station learning restarted", extra={"station": key_of(new).label,
                                                      "reference_id": new.id, "actor": actor})
    return created


def supersede(session: Session, old: StationReference, *, actor: str,
              note: str | None) -> StationReference:
    """Mark ``old`` superseded (who, when, why) and add a ``learning`` row with its key, in
    the caller's transaction; the new row."""
    now = utcnow()
    old.superseded_at = now
    old.superseded_by = actor[:128]
    old.superseded_note = note
    session.flush()
    new = StationReference(station=old.station, station_source=old.station_source,
                           scanner_model=old.scanner_model, protocol=old.protocol,
                           model_name=old.model_name, model_version=old.model_version,
                           state=LEARNING, created_at=now)
    session.add(new)
    session.flush()
    return new


def move_learning_series(session: Session, from_id: int, to_id: int) -> int:
    """Re-attach a reference's learning series to another (in the caller's transaction): a
    recalibration learns from the series its predecessor learned from. Their verdicts were
    out of the box either way. The number moved."""
    moved = session.execute(
        update(Series).where(Series.reference_id == from_id, Series.reference_state == LEARNING)
        .values(reference_id=to_id).execution_options(synchronize_session=False))
    return int(getattr(moved, "rowcount", 0) or 0)


@dataclass(frozen=True)
class ReferenceView:
    """One reference as the Scanners page and ``vaenode queue senders`` show it."""

    id: int
    key: StationKey
    state: str
    learned: int
    created_at: datetime
    calibrated_at: datetime | None
    centre: float | None
    low: float | None
    series_used: int | None
    series_trimmed: int | None
    series_flagged: int | None
    min_flagged: int | None
    series_edge: float | None
    image_edge: float | None
    note: str | None
    superseded_at: datetime | None
    superseded_by: str | None
    superseded_note: str | None
    #: Its learning series' ids by role (:data:`ROLES`); None while learning, and for
    #: references calibrated before revision 0020.
    learned_from: dict[str, list[int]] | None = None


def reference_views(session: Session, *, superseded: bool = False) -> list[ReferenceView]:
    """Current references (or, with ``superseded``, the superseded ones, newest first), by
    station then protocol."""
    stmt = select(StationReference)
    if superseded:
        stmt = stmt.where(StationReference.superseded_at.is_not(None)).order_by(
            StationReference.superseded_at.desc(), StationReference.id.desc())
    else:
        stmt = stmt.where(StationReference.superseded_at.is_(None)).order_by(
            StationReference.station, StationReference.protocol, StationReference.scanner_model,
            StationReference.model_name, StationReference.model_version)
    rows = session.scalars(stmt).all()
    counts = learned_counts(session, [r.id for r in rows])
    return [ReferenceView(id=r.id, key=key_of(r), state=r.state, learned=counts.get(r.id, 0),
                          created_at=r.created_at, calibrated_at=r.calibrated_at,
                          centre=r.centre, low=r.low, series_used=r.series_used,
                          series_trimmed=r.series_trimmed, series_flagged=r.series_flagged,
                          min_flagged=r.min_flagged, series_edge=r.series_edge,
                          image_edge=r.image_edge, note=r.note,
                          superseded_at=r.superseded_at, superseded_by=r.superseded_by,
                          superseded_note=r.superseded_note, learned_from=r.learned_from)
            for r in rows]


def reference_note(state: str | None, reference: StationReference | None, *,
                   learned: int = 0, needed: int = 0) -> str:
    """What judged a series, as the SR, the dashboard and ``vaenode queue show`` say it.

    Args:
        state: the reference's state when it judged the series (None: learning off).
        reference: its row (None: learning off).
        learned: during learning, which learning series of the station this one is.
        needed: ``[learning].series``.
    """
    if state == CALIBRATED and reference is not None:
        when = f"{reference.calibrated_at:%Y-%m-%d}" if reference.calibrated_at else "?"
        used = reference.series_used or 0
        total = used + (reference.series_trimmed or 0) + (reference.series_excluded or 0)
        where = ("; each slice against the station's normal at its position"
                 if reference.position_levels is not None else "")
        if reference.series_edge is not None:
            rule = ("; the series abnormal when its 10th-percentile score lies below the "
                    "station's series edge, below which one of its learning series would have "
                    "been an outlier")
            if reference.image_edge is not None:
                rule += ("; in a series judged normal an image flagged only below the "
                         "station's image edge, below which one of its learning series' "
                         "lowest images would have been an outlier")
        elif reference.min_flagged:
            rule = (f"; all but one of them had at most {reference.min_flagged - 1} slices "
                    "below its low")
        else:
            rule = ""
        return (f"Reference: calibrated for station {key_of(reference).label}, from {used} "
                f"of {total} learning series on {when}{where}{rule}")
    if state == LEARNING and reference is not None:
        return (f"Reference: out of the box (station learning, {min(learned, needed)} of "
                f"{needed} series)")
    return "Reference: out of the box (station learning is off)"


def learning_role(session: Session, series: Series) -> tuple[str, bool] | None:
    """What its station's calibration did with a learning series (:data:`ROLES`), and whether
    that reference is still current; None for a series that is no learning series or whose
    reference has not calibrated (or did before revision 0020)."""
    if series.reference_state != LEARNING or series.reference_id is None:
        return None
    reference = session.get(StationReference, series.reference_id)
    if reference is None or not reference.learned_from:
        return None
    for role, ids in reference.learned_from.items():
        if series.id in ids:
            return role, reference.superseded_at is None
    return None


def judged_note(session: Session, series: Series, needed: int) -> str | None:
    """The "Reference: ..." line of a scored series' current verdict, as its report said it
    (None before its first verdict; learning off for verdicts older than the references)."""
    if series.abnormal is None:
        return None
    reference = (session.get(StationReference, series.reference_id)
                 if series.reference_id is not None else None)
    learned = 0
    if series.reference_state == LEARNING and reference is not None:
        ids = learning_series_ids(session, reference.id)
        learned = ids.index(series.id) + 1 if series.id in ids else len(ids)
    return reference_note(series.reference_state, reference, learned=learned, needed=needed)
