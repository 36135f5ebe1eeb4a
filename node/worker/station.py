"""Judge a scored series against its station's reference, and learn the reference.

The worker scores a series with the bundle as before, then asks here which reference judges
it (:func:`judge`): while its station is ``learning`` the bundle's own verdict stands (out of
the box, and said so in the report); once ``calibrated`` each slice score is referred to the
station's normal at its position and mapped onto the bundle's scale through the station's
centre and low (:mod:`node.worker.learning`) and judged against the same threshold, and the
series is abnormal when its 10th-percentile mapped score lies below the station's series edge
mapped the same way (:func:`series_judgement`; a reference from before revision 0018 counts
slices instead, as it learned). In a series judged normal an image is flagged only below the
station's image edge, mapped the same way (:func:`image_judgement`; none before revision
0019). The score
learned and mapped is the bundle's station score where it declares one (``station_scoring``:
a weighting that sees motion but would flag other scanners' normal series out of the box),
else its own. Inside the transaction that stores the verdict the worker calls
:func:`settle_reference`: when that series makes the ``[learning].series``-th of its station,
the reference is built from them, once, under the reference's row lock. An admin who has
reviewed them since can have it rebuilt from the same series (:func:`recalibrate`).

:func:`normal_series_folders` lists a station's stored learning series that the reference
kept (the same trimming and reviews), for training a network on that station's images.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from node.config import LearningSettings
from node.model.calibrate import confidence
from node.queue import references as refs
from node.queue.models import Instance, Series, StationReference
from node.report.content import SliceVerdict
from node.worker.learning import (
    LearningSeries,
    PositionReference,
    ReferenceRefused,
    Review,
    build_reference,
    map_scores,
    select_series,
    series_statistic,
    stack_positions,
)

if TYPE_CHECKING:
    from node.model.bundle import Bundle

log = logging.getLogger(__name__)

#: The level of the bundle's 201 stored quantiles that is its median normal score.
MEDIAN_QUANTILE = 100


@dataclass(frozen=True)
class BundleScale:
    """What the mapping needs of a bundle: its threshold T, its median normal score M, its
    target false-positive rate and its normal-score quantiles (for the confidence)."""

    name: str
    version: str
    threshold: float
    median: float
    target_fpr: float
    quantiles: tuple[float, ...]

    @classmethod
    def of(cls, bundle: Bundle) -> BundleScale:
        """The scale of a loaded bundle."""
        return cls(bundle.name, bundle.version, float(bundle.threshold),
                   float(bundle.quantiles[MEDIAN_QUANTILE]), float(bundle.target_fpr),
                   tuple(float(q) for q in bundle.quantiles))


@dataclass(frozen=True)
class Judgement:
    """A series' slice verdicts as its reference judged them, and which reference that was.

    Attributes:
        slices: the verdicts (the bundle's own while learning; mapped once calibrated).
        reference_id: the reference's row, or None (learning off, or no station to learn).
        state: ``learning`` or ``calibrated``; None when no reference judged.
        note: the "Reference: ..." line of the report and the dashboard.
        min_flagged: once calibrated by a reference from before revision 0018, the slices
            that make a series of this station abnormal as it learned them (the routing
            rule's count is the floor); None otherwise.
        series_score: once calibrated, the series' 10th-percentile mapped slice score, which
            judges it against ``series_edge``; None otherwise.
        series_edge: the station's series edge on the bundle's scale; None while learning,
            for references from before revision 0018, and from a single kept series.
        image_edge: where the station judged the series normal and has an image edge, that
            edge on the bundle's scale: the series' images were judged against it in place
            of the threshold; None otherwise.
    """

    slices: tuple[SliceVerdict, ...]
    reference_id: int | None
    state: str | None
    note: str
    min_flagged: int | None = None
    series_score: float | None = None
    series_edge: float | None = None
    image_edge: float | None = None

    def min_abnormal_slices(self, rule_count: int) -> int:
        """The flagged slices that make this series abnormal: the routing rule's count, or the
        station's learned one where that is more."""
        return max(rule_count, self.min_flagged or 0)


def apply_reference(slices: Sequence[SliceVerdict], stacks: Sequence[int],
                    reference: StationReference, threshold: float,
                    quantiles: Sequence[float]) -> tuple[SliceVerdict, ...]:
    """The slice verdicts with each score mapped through a calibrated reference and judged
    against ``threshold`` (the one in use; :func:`judge_against`); ``bundle_score`` keeps the
    bundle's own score.

    The score mapped is the one the reference learned: the slice's station score where the
    bundle gives one, else its own score; referred to the slice's position in its stack
    (``stacks``: each slice's stack, in series order) where the reference keeps positions
    (references calibrated before revision 0018 do not)."""
    if (reference.centre is None or reference.low is None or reference.bundle_median is None
            or reference.bundle_threshold is None):
        raise ValueError(f"station reference {reference.id} is not calibrated")
    learned = np.array([s.log_likelihood if s.station_score is None else s.station_score
                        for s in slices], dtype=np.float64)
    foreground = np.array([s.foreground for s in slices], dtype=bool)
    if reference.position_levels is not None and reference.position_spreads is not None:
        position = PositionReference(tuple(reference.position_levels),
                                     tuple(reference.position_spreads))
        learned = position.refer(learned, stack_positions(np.asarray(stacks), foreground))
    mapped = map_scores(learned, reference.centre, reference.low, reference.bundle_median,
                        reference.bundle_threshold)
    return judge_against(
        [dataclasses.replace(s, log_likelihood=float(mapped[k]),
                             bundle_score=float(s.log_likelihood))
         for k, s in enumerate(slices)], threshold, quantiles)


def judge_against(slices: Sequence[SliceVerdict], threshold: float,
                  quantiles: Sequence[float]) -> tuple[SliceVerdict, ...]:
    """The slices, their scores on the bundle's scale, judged against ``threshold``: abnormal
    below it on foreground slices, the confidence of each verdict taken against it."""
    scores = np.array([s.log_likelihood for s in slices], dtype=np.float64)
    foreground = np.array([s.foreground for s in slices], dtype=bool)
    abnormal = (scores < threshold) & foreground
    sure = confidence(scores, threshold, np.asarray(quantiles, dtype=np.float64))
    return tuple(
        dataclasses.replace(s, abnormal=bool(abnormal[k]),
                            confidence=min(1.0, max(0.0, float(sure[k]))))
        for k, s in enumerate(slices))


def image_judgement(slices: Sequence[SliceVerdict], reference: StationReference,
                    series_score: float | None, series_edge: float | None,
                    quantiles: Sequence[float]) -> tuple[tuple[SliceVerdict, ...], float | None]:
    """(the slices, the image edge on the bundle's scale) for slices mapped through a
    calibrated reference: where the series is judged normal by its edge and the reference has
    an image edge, its images judged against that edge mapped (:func:`judge_against`; an
    image of a normal series is flagged only below it); else the slices as they are and
    None."""
    edge = _on_bundle_scale(reference, reference.image_edge)
    if edge is None or series_score is None or series_edge is None or series_score < series_edge:
        return tuple(slices), None
    return judge_against(slices, edge, quantiles), edge


def _on_bundle_scale(reference: StationReference, referred: float | None) -> float | None:
    """A referred score (an edge) mapped as the slices are; None where it or the mapping is
    missing."""
    if (referred is None or reference.centre is None or reference.low is None
            or reference.bundle_median is None or reference.bundle_threshold is None):
        return None
    return float(map_scores(np.array([referred]), reference.centre, reference.low,
                            reference.bundle_median, reference.bundle_threshold)[0])


def series_judgement(slices: Sequence[SliceVerdict],
                     reference: StationReference) -> tuple[float | None, float | None]:
    """(the series' score, the station's series edge), both on the bundle's scale, for slices
    mapped through a calibrated reference: the 10th percentile of the foreground slices'
    mapped scores (:func:`series_statistic`; the mapping is linear, so it is the referred
    statistic mapped) and the reference's edge mapped; (None, None) where the reference has no
    edge or the series no foreground slice (the slice count judges)."""
    fg = np.array([s.log_likelihood for s in slices if s.foreground], dtype=np.float64)
    edge = _on_bundle_scale(reference, reference.series_edge)
    if edge is None or fg.size == 0:
        return None, None
    return series_statistic(fg), edge


def judge(session_factory: sessionmaker[Session], learning: LearningSettings,
          key: refs.StationKey | None, series_id: int, slices: Sequence[SliceVerdict],
          stacks: Sequence[int], threshold: float, scale: BundleScale) -> Judgement:
    """Which reference judges the series, and the slice verdicts it gives (``stacks``: the
    stack of each slice, in series order).

    Creates the station's reference (``learning``) on its first series. Its verdicts are the
    bundle's own until the reference is calibrated.
    """
    slices = tuple(slices)
    if not learning.enabled:
        return Judgement(slices, None, None, refs.reference_note(None, None))
    if key is None:
        return Judgement(slices, None, None,
                         "Reference: out of the box (the series names no station or calling "
                         "AE to learn from)")
    with session_factory() as session:
        reference = refs.ensure_reference(session, key)
        if reference.state == refs.CALIBRATED:
            mapped = apply_reference(slices, stacks, reference, threshold, scale.quantiles)
            series_score, series_edge = series_judgement(mapped, reference)
            judged, image_edge = image_judgement(mapped, reference, series_score, series_edge,
                                                 scale.quantiles)
            return Judgement(judged, reference.id, refs.CALIBRATED,
                             refs.reference_note(refs.CALIBRATED, reference),
                             reference.min_flagged, series_score, series_edge, image_edge)
        earlier = [i for i in refs.learning_series_ids(session, reference.id) if i != series_id]
        note = refs.reference_note(refs.LEARNING, reference, learned=len(earlier) + 1,
                                   needed=learning.series)
        return Judgement(slices, reference.id, refs.LEARNING, note)


def _review(row: refs.LearningRows) -> Review:
    said = refs.reviewed_as(row.review, row.abnormal)
    return {"normal": Review.NORMAL, "bad": Review.FLAGGED}.get(said or "", Review.NONE)


def _learning_series(session: Session, reference_id: int) -> list[LearningSeries]:
    rows = refs.learning_rows(session, refs.learning_series_ids(session, reference_id))
    return [LearningSeries(r.series_id, np.asarray(r.scores, dtype=np.float64), _review(r),
                           np.asarray(r.stacks, dtype=np.int64))
            for r in rows]


def settle_reference(session: Session, learning: LearningSettings, reference_id: int,
                     scale: BundleScale) -> bool:
    """Calibrate the reference when its learning series are enough, exactly once.

    Runs inside the transaction that stored a learning series' verdict: the reference's row
    is locked first, so that of two workers storing the last series at once the second sees
    the first one's series (and its calibration). A refusal (no spread to map) is recorded as
    the reference's note; it stays ``learning`` and tries again on its next series.

    Returns:
        True when this call calibrated it.
    """
    reference = refs.lock_reference(session, reference_id)
    if reference.state != refs.LEARNING or reference.superseded_at is not None:
        return False
    series = _learning_series(session, reference_id)
    if len(series) < learning.series:
        return False
    label = refs.key_of(reference).label
    try:
        built = build_reference(series, scale.target_fpr)
    except ReferenceRefused as exc:
        refs.note_refusal(session, reference_id, f"not calibrated from {len(series)} series: "
                                                 f"{exc}")
        log.warning("station reference not calibrated: %s", exc,
                    extra={"station": label, "reference_id": reference_id})
        return False
    refs.mark_calibrated(session, reference_id, centre=built.centre, low=built.low,
                         bundle_median=scale.median, bundle_threshold=scale.threshold,
                         target_fpr=scale.target_fpr, used=len(built.selection.kept),
                         trimmed=len(built.selection.trimmed),
                         excluded=len(built.selection.excluded), slices=built.slices,
                         series_flagged=built.series_flagged, series_edge=built.series_edge,
                         position_levels=built.position.levels,
                         position_spreads=built.position.spreads, image_edge=built.image_edge,
                         learned_from={refs.USED: built.selection.kept,
                                       refs.OUTLIER: built.selection.trimmed,
                                       refs.EXCLUDED: built.selection.excluded})
    log.info("station reference calibrated from %d series (%d trimmed): centre %.6g, low %.6g, "
             "series edge %s, image edge %s; left out in turn, %d of those series are flagged",
             len(built.selection.kept), len(built.selection.trimmed), built.centre, built.low,
             "none" if built.series_edge is None else f"{built.series_edge:.6g}",
             "none" if built.image_edge is None else f"{built.image_edge:.6g}",
             built.series_flagged, extra={"station": label, "reference_id": reference_id})
    return True


def recalibrate(session: Session, learning: LearningSettings, reference_id: int, *,
                actor: str, note: str | None = None) -> tuple[StationReference, bool]:
    """Rebuild a calibrated station's reference from the series it learned from, with the
    reviews as they stand now (commits).

    A bad learning series judged normal out of the box (the default bundle sees no motion) is
    used, and a few of them widen the station's normal where their bad images lie. Once a
    reviewer has reported them (``missed``) or confirmed their flags, this takes them out
    without waiting for ``[learning].series`` new series, as a restart would. The old row is
    superseded (kept, with who and when) and its learning series move to the new row, which
    calibrates at once on the old row's bundle scale (no model needed).

    Returns:
        The new row as it now stands and whether it calibrated (a refusal is its note; it
        stays ``learning`` and calibrates on its next series, as any learning reference
        does).

    Raises:
        ValueError: the reference is not current, or not calibrated.
    """
    try:
        old = refs.lock_reference(session, reference_id)
        if old.superseded_at is not None:
            raise ValueError(f"station reference {reference_id} is not current (restarted or "
                             "recalibrated already?)")
        if (old.state != refs.CALIBRATED or old.bundle_threshold is None
                or old.bundle_median is None or old.target_fpr is None):
            raise ValueError(f"station reference {reference_id} is still learning: it "
                             "calibrates from its learning series, with their reviews, when "
                             f"its {learning.series}th is scored")
        scale = BundleScale(old.model_name, old.model_version, old.bundle_threshold,
                            old.bundle_median, old.target_fpr, ())
        new = refs.supersede(session, old, actor=actor,
                             note=note or "recalibrated from its learning series")
        moved = refs.move_learning_series(session, old.id, new.id)
        calibrated = settle_reference(session, learning, new.id, scale)
        session.commit()
        session.refresh(new)  # settle_reference wrote it with a bulk UPDATE
    except BaseException:
        session.rollback()
        raise
    log.info("station reference recalibrated from %d learning series", moved,
             extra={"station": refs.key_of(new).label, "reference_id": new.id,
                    "superseded_id": reference_id, "actor": actor, "calibrated": calibrated})
    return new, calibrated


def normal_series_folders(session: Session, storage_dir: Path, station: str,
                          protocol: str | None = None) -> list[Path]:
    """The stored series of a station usable as its normal training data, as folders.

    The learning series of the station's current references (of every bundle; with
    ``protocol``, of that protocol only) that the reference's trimming keeps, judged with the
    reviews as they stand now (reviewed normal: always; confirmed flags: never), whose images
    the retention job has not deleted. Each folder holds one series' instances as received
    (``<storage>/<StudyUID>/<SeriesUID>/``), oldest verdict first.
    """
    stmt = select(StationReference.id).where(*refs.of_station(station, protocol))
    kept: list[int] = []
    for reference_id in session.scalars(stmt.order_by(StationReference.id)):
        kept += select_series(_learning_series(session, reference_id)).kept
    if not kept:
        return []
    stored = set(session.scalars(select(Series.id).where(Series.id.in_(kept),
                                                         Series.purged_at.is_(None))))
    folders: dict[int, Path] = {}
    for series_id, path in session.execute(
            select(Instance.series_id, Instance.path).where(Instance.series_id.in_(stored))
            .order_by(Instance.id)):
        folders.setdefault(int(series_id), storage_dir / Path(path).parent)
    return [folders[i] for i in kept if i in folders]
