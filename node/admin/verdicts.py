"""The worker's results as the dashboard shows them: series verdicts and per-slice scores.

Read-only views over the scoring tables (``slice_scores`` and the verdict columns of
``series``), plus the choice of which slices to show as thumbnails.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy.orm import Session


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
    """

    model: str
    threshold: float
    abnormal: bool
    abnormal_slices: int
    scored_slices: int
    min_abnormal_slices: int
    estimator: str | None


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


def series_verdict(session: Session, series_id: int) -> Verdict | None:
    """The current verdict of a series; None when it has not been scored."""
    raise NotImplementedError("waiting for the scoring schema (0002_scoring)")


def slice_scores(session: Session, series_id: int) -> list[SliceScoreView]:
    """The per-slice scores of the current verdict, in slice order."""
    raise NotImplementedError("waiting for the scoring schema (0002_scoring)")


def verdicts_for(session: Session, series_uids: Sequence[str]) -> dict[str, Verdict]:
    """Verdicts of the listed series (those scored), by Series Instance UID."""
    raise NotImplementedError("waiting for the scoring schema (0002_scoring)")


def all_verdicts(session: Session) -> list[tuple[int, str, bool]]:
    """(series id, model label, abnormal) of every scored series."""
    raise NotImplementedError("waiting for the scoring schema (0002_scoring)")
