"""The worker's results as the dashboard shows them: series verdicts and per-slice scores.

Read-only views over the scoring schema (revision 0002_scoring: ``slice_scores`` and the
verdict columns of ``series``), plus the choice of which slices to show as thumbnails.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from node.queue.models import Series, SliceScore, StationReference


@dataclass(frozen=True)
class Verdict:
    """A series verdict.

    Attributes:
        model: the model label ("name version") that scored the series.
        threshold: the threshold on log p(x) that was applied.
        abnormal: the series verdict.
        abnormal_slices: slices below the threshold.
        scored_slices: slices scored.
        min_abnormal_slices: slices that make a series abnormal (routing rule).
        estimator: the marginal-likelihood estimator, when recorded.
        series_score: where a calibrated station judged the series by one number, its
            10th-percentile slice score; else None.
        series_edge: the station's series edge it was judged against; else None.
        image_edge: where that station judged the series normal, the image edge its slices
            were judged against in place of ``threshold``; else None.
    """

    model: str
    threshold: float
    abnormal: bool
    abnormal_slices: int
    scored_slices: int
    min_abnormal_slices: int
    estimator: str | None
    series_score: float | None = None
    series_edge: float | None = None
    image_edge: float | None = None


@dataclass(frozen=True)
class SliceScoreView:
    """One scored slice."""

    sop_instance_uid: str
    frame: int | None
    index: int
    log_likelihood: float
    kl: float | None
    elbo: float | None
    abnormal: bool
    confidence: float | None


def pick_thumbnails(
    scores: Sequence[SliceScoreView], max_flagged: int, max_normal: int
) -> tuple[list[SliceScoreView], list[SliceScoreView]]:
    """Which slices the series page shows: the worst flagged ones and a few normal ones.

    The flagged slices are the lowest log p(x) first (the clearest cases); the normal ones are
    spread evenly over the stack, so the reviewer compares against anatomy from the same
    series at several levels rather than only the neighbours.

    Returns:
        (flagged, normal), each in slice order.
    """
    flagged = sorted((s for s in scores if s.abnormal), key=lambda s: s.log_likelihood)
    flagged = sorted(flagged[:max_flagged], key=lambda s: s.index)
    normal_all = sorted((s for s in scores if not s.abnormal), key=lambda s: s.index)
    if len(normal_all) <= max_normal:
        normal = normal_all
    else:
        # Evenly spaced, avoiding the first and last slices (often background or wrap-around).
        step = len(normal_all) / (max_normal + 1)
        normal = [normal_all[int(step * (k + 1))] for k in range(max_normal)]
    return flagged, normal


def _label(series: Series) -> str:
    # The same "name version" label the models page gives a bundle (models_page.label_of).
    name = series.model_name or "unknown model"
    return f"{name} {series.model_version}" if series.model_version else name


def _verdict(series: Series) -> Verdict | None:
    if series.abnormal is None or series.threshold is None:
        return None
    return Verdict(
        model=_label(series),
        threshold=float(series.threshold),
        abnormal=bool(series.abnormal),
        abnormal_slices=int(series.abnormal_slices or 0),
        scored_slices=int(series.scored_slices or 0),
        min_abnormal_slices=int(series.min_abnormal_slices or 1),
        estimator=series.estimator,
        series_score=series.series_score,
        series_edge=series.series_edge,
        image_edge=series.image_edge,
    )


def series_verdict(session: Session, series_id: int) -> Verdict | None:
    """The current verdict of a series; None when it has never been scored.

    A series re-scored after a failure keeps its last good verdict (the worker leaves the
    columns in place), so a failed or re-queued series may still show one.
    """
    series = session.get(Series, series_id)
    return _verdict(series) if series is not None else None


def slice_scores(session: Session, series_id: int) -> list[SliceScoreView]:
    """The per-slice scores of the current verdict, in series order (stack, then slice)."""
    stmt = (
        select(SliceScore)
        .where(SliceScore.series_id == series_id)
        .order_by(SliceScore.slice_index, SliceScore.id)
    )
    return [
        SliceScoreView(
            sop_instance_uid=s.sop_instance_uid,
            frame=s.frame,
            index=s.slice_index,
            log_likelihood=float(s.log_likelihood),
            kl=s.kl,
            elbo=s.elbo,
            abnormal=bool(s.abnormal),
            confidence=s.confidence,
        )
        for s in session.scalars(stmt)
    ]


def verdicts_for(session: Session, series_uids: Sequence[str]) -> dict[str, Verdict]:
    """Verdicts of the listed series (those scored), by Series Instance UID."""
    if not series_uids:
        return {}
    out: dict[str, Verdict] = {}
    for series in session.scalars(
        select(Series).where(Series.series_instance_uid.in_(list(series_uids)))
    ):
        verdict = _verdict(series)
        if verdict is not None:
            out[series.series_instance_uid] = verdict
    return out


@dataclass(frozen=True)
class VerdictRow:
    """What the review counts need of one scored series."""

    series_id: int
    model: str
    abnormal: bool
    scored_slices: int
    min_abnormal_slices: int
    #: Where a calibrated station judged the series by its series edge: the share of that
    #: station's kept learning series a reference built from the others flags (its expected
    #: false-alarm share); None where the slice count judged.
    station_share: float | None = None


def all_verdicts(session: Session) -> list[VerdictRow]:
    """Every series that has a verdict, with its model label and slice counts (and, where a
    station's series edge judged it, that station's expected false-alarm share)."""
    stmt = select(
        Series.id, Series.model_name, Series.model_version, Series.abnormal,
        Series.scored_slices, Series.min_abnormal_slices, Series.series_edge,
        StationReference.series_flagged, StationReference.series_used,
    ).outerjoin(StationReference, StationReference.id == Series.reference_id).where(
        Series.abnormal.is_not(None))
    out = []
    for (series_id, name, version, abnormal, scored, minimum, edge, flagged,
         used) in session.execute(stmt):
        label = f"{name or 'unknown model'} {version}" if version else (name or "unknown model")
        share = (flagged / used if edge is not None and flagged is not None and used else None)
        out.append(VerdictRow(int(series_id), label, bool(abnormal), int(scored or 0),
                              int(minimum or 1), share))
    return out
