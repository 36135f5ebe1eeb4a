"""Score assembled series with a model bundle, and the worker's handling of one queued series.

This is the one place where the DICOM side (:mod:`node.worker.assemble`) meets the model side
(:mod:`node.model`): stacks of arrays go in, slice verdicts come out. The model is applied per
stack, because its score is relative to the stack (the bundle's series shift), and in batches
of ``[worker].batch_size`` slices.

A queued series goes through :func:`process_series`: read headers, route, assemble, score,
judge against its station's reference (:mod:`node.worker.station`: the bundle's own verdict
while the station learns), then in ONE transaction: mark it done (only if this worker still
holds it), store the slice scores and the verdict, calibrate the station's reference when this
was its last learning series, build and queue the reports. So a series is either done with its
reports queued, or not done at all; a crash anywhere before the commit leaves it
``processing`` with a lease that recovery takes back. An exception while scoring marks that
series ``failed`` with the reason, and the worker goes on with the next one.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import delete, insert, select, update
from sqlalchemy.orm import Session, sessionmaker

from node.config import Settings
from node.errors import AssemblyError, ModelError, NodeError, NoImages, QueueConflict
from node.queue import repo
from node.queue.models import Instance, Series, SliceScore, utcnow
from node.queue.references import LEARNING, station_key
from node.report.content import SeriesVerdict, SliceVerdict
from node.worker.assemble import AssembledSeries, assemble_series, read_headers, series_attributes
from node.worker.routing import route
from node.worker.station import BundleScale, Judgement, judge, settle_reference

if TYPE_CHECKING:
    from node.model.bundle import Bundle

log = logging.getLogger(__name__)

#: Columns of a series row the worker fills from the headers when the row has none: the first
#: instance received set them, and it may have lacked one that others of the series name.
_FILLED_COLUMNS = ("modality", "body_part", "series_description", "station_name",
                   "manufacturer", "scanner_model")


# --- scoring (shared with ``vaenode score``) -------------------------------------------------


@dataclass(frozen=True)
class ScoringOptions:
    """How to run the model; None means the bundle's own default."""

    estimator: str | None = None
    samples: int | None = None
    threshold: float | None = None
    batch_size: int = 32
    device: str = "auto"
    progress: bool = False


@dataclass(frozen=True)
class ScoredSeries:
    """The slice verdicts of one series and the settings that produced them."""

    slices: tuple[SliceVerdict, ...]
    threshold: float
    estimator: str
    samples: int
    score_note: str | None

    @property
    def abnormal_slices(self) -> int:
        """How many slices are below the threshold."""
        return sum(1 for s in self.slices if s.abnormal)


def score_note(bundle: Bundle, estimator: str) -> str:
    """How the reported log p(x) was formed from the estimate, for the report and the CLI."""
    cfg = bundle.scoring
    parts = [f"log p(x), {estimator} estimator"]
    if cfg.complexity:
        parts.append("+ PNG code length (complexity correction)")
    if cfg.tail_weight:
        parts.append(f"- {cfg.tail_weight:g} x worst-1% pixel residuals")
    if cfg.series_relative and cfg.max_series_shift:
        parts.append(f"- series shift (cap {cfg.max_series_shift:g} nats)")
    return " ".join(parts)


def score_series(
    series: AssembledSeries, bundle: Bundle, options: ScoringOptions
) -> ScoredSeries:
    """Score every stack of an assembled series with one bundle.

    Args:
        series: the stacks (each slice knows its SOP instance, frame and index).
        bundle: the loaded model.
        options: estimator, samples, threshold override, batch size, device.

    Returns:
        One :class:`SliceVerdict` per slice, in series order, and the settings used.

    Raises:
        ModelError: an unknown estimator or device.
    """
    verdicts: list[SliceVerdict] = []
    threshold = bundle.threshold if options.threshold is None else float(options.threshold)
    estimator = options.estimator or bundle.scoring.estimator
    samples = options.samples or bundle.scoring.samples
    for stack in series.stacks:
        plane, descending = stack.placement
        scores = bundle.score_slices(
            stack.images,
            stack.pixel_spacings,
            estimator=options.estimator,
            samples=options.samples,
            threshold=options.threshold,
            batch_size=options.batch_size,
            device=options.device,
            progress=options.progress,
            plane=plane,
            descending=descending,
            slice_spacing_mm=stack.slice_spacing_mm,
        )
        threshold, estimator, samples = scores.threshold, scores.estimator, scores.samples
        for k, sl in enumerate(stack.slices):
            verdicts.append(
                SliceVerdict(
                    sop_instance_uid=sl.sop_instance_uid,
                    sop_class_uid=sl.sop_class_uid,
                    frame=sl.frame,
                    index=sl.index,
                    log_likelihood=float(scores.log_likelihood[k]),
                    kl=float(scores.kl[k]),
                    elbo=float(scores.elbo[k]),
                    abnormal=bool(scores.abnormal[k]),
                    confidence=min(1.0, max(0.0, float(scores.confidence[k]))),
                    foreground=bool(scores.foreground[k]),
                    station_score=(None if scores.station_score is None
                                   else float(scores.station_score[k])),
                )
            )
    return ScoredSeries(tuple(verdicts), threshold, estimator, samples,
                        score_note(bundle, estimator))


class BundleCache:
    """Model bundles loaded once per process and kept: loading costs seconds, scoring less.

    Thread-safe, so that the scheduler's thread and a warm-up may share it.
    """

    def __init__(self) -> None:
        self._bundles: dict[str, Bundle] = {}
        self._lock = threading.Lock()

    def get(self, path: Path | None) -> Bundle:
        """The bundle at ``path`` (None: the default model shipped with the node).

        Raises:
            ModelError: the bundle is missing or broken (the message says what is wrong).
        """
        from node.model.bundle import default_bundle_path, load_bundle

        key = str(Path(path).resolve()) if path is not None else str(default_bundle_path())
        with self._lock:
            bundle = self._bundles.get(key)
            if bundle is None:
                bundle = load_bundle(Path(path) if path is not None else None)
                self._bundles[key] = bundle
                log.info("model loaded", extra={"bundle": key, "model": bundle.name,
                                                "version": bundle.version})
            return bundle

    def __len__(self) -> int:
        return len(self._bundles)


# --- the worker's handling of one series -----------------------------------------------------


class Outcome(str, Enum):  # noqa: UP042 - compared with plain strings in logs and tests
    """What became of a claimed series."""

    DONE = "done"
    SKIPPED = "skipped"
    FAILED = "failed"
    LOST = "lost"  # the series was taken away meanwhile (new instance, lease expired)


def _instance_paths(session: Session, settings: Settings, series_id: int) -> list[Path]:
    rows = session.execute(
        select(Instance.path).where(Instance.series_id == series_id).order_by(Instance.id)
    ).scalars()
    return [settings.storage.dir / p for p in rows]


def _store_verdict(
    session: Session, series: Series, verdict: SeriesVerdict, slices: Sequence[SliceVerdict],
    stacks: dict[tuple[str, int | None], int], judgement: Judgement,
) -> None:
    """Replace the series' slice scores and verdict columns (inside the caller's transaction)."""
    session.execute(delete(SliceScore).where(SliceScore.series_id == series.id))
    if slices:
        session.execute(
            insert(SliceScore),
            [
                {
                    "series_id": series.id,
                    "sop_instance_uid": s.sop_instance_uid,
                    "sop_class_uid": s.sop_class_uid,
                    "frame": s.frame,
                    "stack": stacks.get((s.sop_instance_uid, s.frame), 0),
                    "slice_index": s.index,
                    "log_likelihood": s.log_likelihood,
                    "kl": s.kl,
                    "elbo": s.elbo,
                    "abnormal": s.abnormal,
                    "confidence": s.confidence,
                    "foreground": s.foreground,
                    "bundle_score": (s.log_likelihood if s.bundle_score is None
                                     else s.bundle_score),
                    "station_score": s.station_score,
                }
                for s in slices
            ],
        )
    session.execute(
        update(Series)
        .where(Series.id == series.id)
        .values(
            abnormal=verdict.abnormal,
            abnormal_slices=verdict.abnormal_slices,
            scored_slices=len(slices),
            min_abnormal_slices=verdict.min_abnormal_slices,
            series_score=verdict.series_score,
            series_edge=verdict.series_edge,
            image_edge=verdict.image_edge,
            model_name=verdict.model_name,
            model_version=verdict.model_version,
            threshold=verdict.threshold,
            estimator=verdict.estimator,
            samples=verdict.samples,
            routing_rule=verdict.rule,
            scored_at=utcnow(),
            reference_id=judgement.reference_id,
            reference_state=judgement.state,
        )
        .execution_options(synchronize_session=False)
    )


def _finish(
    session_factory: sessionmaker[Session],
    series: Series,
    worker_id: str,
    outcome: Outcome,
    reason: str,
) -> Outcome:
    """Mark the series skipped or failed, unless it was taken away meanwhile."""
    mark = repo.mark_skipped if outcome is Outcome.SKIPPED else repo.mark_failed
    try:
        with session_factory() as session:
            mark(session, series.id, reason[:2000], worker_id=worker_id)
    except QueueConflict as exc:
        log.info("series moved on before it was marked %s: %s", outcome.value, exc,
                 extra={"series_uid": series.series_instance_uid})
        return Outcome.LOST
    return outcome


def _part_after_purge(session: Session, series: Series) -> str | None:
    """Why a series whose images the retention job deleted is not scored again on what came
    later, or None when it may be: it was never scored, or every image its verdict judged is
    stored again (a whole re-send).

    A straggler a fortnight late, scored alone, would replace the verdict on the whole series
    with one on a handful of images, and could withdraw a delivered "Quality Issue" flag. Its
    images are kept; the earlier verdict and reports stand.
    """
    if series.purged_at is None:
        return None
    judged = set(session.scalars(select(SliceScore.sop_instance_uid)
                                 .where(SliceScore.series_id == series.id)))
    stored = set(session.scalars(select(Instance.sop_instance_uid)
                                 .where(Instance.series_id == series.id)))
    if judged <= stored:
        return None
    return (f"{len(stored)} instance(s) received after the retention job deleted this series' "
            f"images ({series.purged_at:%Y-%m-%d %H:%M} UTC), {len(judged - stored)} of the "
            f"{len(judged)} its verdict judged still missing: a part is not judged as the "
            "whole series; the earlier verdict and reports stand (a re-send of the whole "
            "series is scored)")


def process_series(
    session_factory: sessionmaker[Session],
    settings: Settings,
    series: Series,
    worker_id: str,
    bundles: BundleCache,
) -> Outcome:
    """Route, assemble, score and report one series this worker has claimed.

    Never raises for a problem of the series itself: it ends ``done``, ``skipped`` or
    ``failed`` with a reason (or is left alone when it was reopened meanwhile).
    """
    uid = series.series_instance_uid
    extra: dict[str, Any] = {"series_uid": uid, "worker_id": worker_id}
    try:
        with session_factory() as session:
            paths = _instance_paths(session, settings, series.id)
            partial = _part_after_purge(session, series)
        if not paths:
            return _finish(session_factory, series, worker_id, Outcome.SKIPPED,
                           "no stored instances")
        if partial is not None:
            return _finish(session_factory, series, worker_id, Outcome.SKIPPED, partial)
        attrs = series_attributes(read_headers(paths))
        missing = {column: value for column in _FILLED_COLUMNS
                   if getattr(series, column) is None and (value := getattr(attrs, column))}
        if missing:  # a row from before revision 0011, or a first instance that named none
            with session_factory() as session:
                repo.fill_series_columns(session, series.id, missing)
        decision = route(attrs, list(settings.routing.rules), settings.model)
        if decision.rule is None:
            return _finish(session_factory, series, worker_id, Outcome.SKIPPED,
                           decision.reason or "no routing rule matches")
        t0 = time.monotonic()
        assembled = assemble_series(paths)
        t1 = time.monotonic()
        bundle = bundles.get(decision.bundle)
        options = ScoringOptions(
            estimator=settings.model.estimator,
            samples=settings.model.samples,
            threshold=settings.model.threshold,
            batch_size=settings.worker.batch_size,
            device=settings.model.device,
        )
        scored = score_series(assembled, bundle, options)
        scale = BundleScale.of(bundle)
        key = station_key(
            station_name=attrs.station_name or series.station_name,
            calling_aet=series.calling_aet,
            scanner_model=attrs.scanner_model or series.scanner_model,
            series_description=attrs.series_description or series.series_description,
            model_name=bundle.name, model_version=bundle.version)
        judgement = judge(session_factory, settings.learning, key, series.id, scored.slices,
                          [s.stack for s in assembled.slices], scored.threshold, scale)
        t2 = time.monotonic()
        verdict = SeriesVerdict.from_slices(
            study_instance_uid=attrs.study_instance_uid or series.study_instance_uid,
            series_instance_uid=uid,
            slices=judgement.slices,
            min_abnormal_slices=judgement.min_abnormal_slices(
                decision.rule.min_abnormal_slices),
            threshold=scored.threshold,
            estimator=scored.estimator,
            model_name=bundle.name,
            model_version=bundle.version,
            samples=scored.samples,
            rule=decision.rule.name,
            score_note=scored.score_note,
            reference=judgement.note,
            series_score=judgement.series_score,
            series_edge=judgement.series_edge,
            image_edge=judgement.image_edge,
        )
        stacks = {(s.sop_instance_uid, s.frame): s.stack for s in assembled.slices}
        from node.alerts.outbox import enqueue as enqueue_alerts
        from node.report.service import prepare_reports, report_series

        # Still ours? (A new instance or an expired lease takes the series away; building a
        # report then is wasted.) Renewing also covers the report build with a fresh lease.
        with session_factory() as session:
            repo.renew_lease(session, series.id, worker_id, settings.worker.lease_s)
        # Build the SR/KOS (seconds for a long series) before taking the write lock.
        prepared = prepare_reports(session_factory, settings, verdict, list(assembled.sources))
        t3 = time.monotonic()
        with session_factory() as session, session.begin():
            # Done first: when the series was reopened or taken over meanwhile this raises
            # QueueConflict before anything is stored, and the transaction rolls back.
            current = repo.mark_done(
                session, series.id,
                f"{verdict.abnormal_slices} of {len(verdict.slices)} slices flagged"
                + (" (series abnormal)" if verdict.abnormal else ""),
                worker_id=worker_id,
            )
            _store_verdict(session, current, verdict, verdict.slices, stacks, judgement)
            if judgement.state == LEARNING and judgement.reference_id is not None:
                settle_reference(session, settings.learning, judgement.reference_id, scale)
            report_series(session, settings, verdict, list(assembled.sources), prepared)
            alerts = enqueue_alerts(session, settings.alerts, current, verdict)
        log.info(
            "series scored: %d/%d slices flagged, series %s",
            verdict.abnormal_slices, len(verdict.slices),
            "abnormal" if verdict.abnormal else "normal",
            extra={**extra, "model": f"{bundle.name} {bundle.version}", "alerts": alerts,
                   "reference": judgement.state or "off",
                   "assemble_s": round(t1 - t0, 2), "score_s": round(t2 - t1, 2),
                   "report_build_s": round(t3 - t2, 2),
                   "store_s": round(time.monotonic() - t3, 2)},
        )
        return Outcome.DONE
    except QueueConflict as exc:
        log.info("series taken away while scoring, result dropped: %s", exc, extra=extra)
        return Outcome.LOST
    except NoImages as exc:
        return _finish(session_factory, series, worker_id, Outcome.SKIPPED, str(exc))
    except AssemblyError as exc:
        log.warning("series cannot be assembled: %s", exc, extra=extra)
        return _finish(session_factory, series, worker_id, Outcome.FAILED, str(exc))
    except ModelError as exc:
        log.error("model problem: %s", exc, extra=extra)
        return _finish(session_factory, series, worker_id, Outcome.FAILED, f"model: {exc}")
    except NodeError as exc:
        log.error("series failed: %s", exc, extra=extra)
        return _finish(session_factory, series, worker_id, Outcome.FAILED, str(exc))
    except Exception as exc:  # any bug or resource problem stays with this one series
        log.exception("unexpected error while scoring", extra=extra)
        return _finish(session_factory, series, worker_id, Outcome.FAILED,
                       f"unexpected error: {type(exc).__name__}: {exc}")


def process_next(
    session_factory: sessionmaker[Session],
    settings: Settings,
    worker_id: str,
    bundles: BundleCache,
) -> Outcome | None:
    """Claim the oldest queued series and process it; None when nothing is queued."""
    with session_factory() as session:
        series = repo.claim_next_queued(session, worker_id, settings.worker.lease_s)
    if series is None:
        return None
    return process_series(session_factory, settings, series, worker_id, bundles)
