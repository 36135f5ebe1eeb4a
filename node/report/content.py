"""What a report says, as plain values: no DICOM, no torch, no I/O.

The worker fills these from the model's scores; ``report/build.py`` turns them into DICOM
objects. Keeping the content free of DICOM lets the worker, the CLI and the tests build and
compare verdicts without a dataset in sight, and keeps the report layer free of the model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class SliceVerdict:
    """The verdict on one scored image (one instance, or one frame of a multi-frame instance).

    Attributes:
        sop_instance_uid: SOP Instance UID of the scored instance.
        sop_class_uid: its SOP Class UID (needed to reference it from SR and KOS).
        frame: 1-based frame number inside a multi-frame instance; None for single-frame.
        index: position of the slice along the stack normal (0-based), for people and plots.
        log_likelihood: the score compared with the threshold (nats): the bundle's score (its
            log marginal likelihood log p(x), corrected as the bundle says), mapped through
            the station's reference when one judged the series.
        kl: KL divergence of the attribute distributions to N(0, I) (match likelihood).
        elbo: the evidence lower bound (negative loss) of the slice.
        abnormal: True when log_likelihood is below the threshold (foreground slices only).
        confidence: confidence in the verdict, in [0, 1].
        foreground: False for a leading or trailing background slice of its stack (never
            abnormal; its score means nothing).
        bundle_score: the bundle's own score before a station reference mapped it; None when
            none did (``log_likelihood`` is then the bundle's own score).
        station_score: the bundle's station score (the one a station's reference learns and
            maps), never mapped; None when the bundle declares none.
    """

    sop_instance_uid: str
    sop_class_uid: str
    frame: int | None
    index: int
    log_likelihood: float
    kl: float
    elbo: float
    abnormal: bool
    confidence: float
    foreground: bool = True
    bundle_score: float | None = None
    station_score: float | None = None

    def __post_init__(self) -> None:
        if not self.sop_instance_uid or not self.sop_class_uid:
            raise ValueError("a slice verdict needs its SOP Instance UID and SOP Class UID")
        if self.frame is not None and self.frame < 1:
            raise ValueError(f"frame numbers start at 1 (DICOM), got {self.frame}")
        if not 0.0 <= self.confidence <= 1.0 or math.isnan(self.confidence):
            raise ValueError(f"confidence must lie in [0, 1], got {self.confidence}")
        if self.abnormal and not self.foreground:
            raise ValueError("a background slice is never abnormal")


@dataclass(frozen=True)
class SeriesVerdict:
    """The verdict on one scored series: its slices and how they add up.

    Attributes:
        study_instance_uid: Study of the source series (the report goes into the same study).
        series_instance_uid: the source series.
        slices: one verdict per scored image, in stack order.
        abnormal: True when at least ``min_abnormal_slices`` slices are abnormal; where a
            station judges the series by one number (``series_edge`` given), when
            ``series_score`` lies below ``series_edge``.
        abnormal_slices: number of abnormal slices.
        min_abnormal_slices: slices that make the series abnormal (from the routing rule, or
            a station's learned count); not the criterion where ``series_edge`` is given.
        threshold: the threshold on log p(x) that was applied.
        estimator: the marginal-likelihood estimator ("importance", "plain", "mcmc").
        model_name: name of the model bundle (algorithm name in the report).
        model_version: version of the model bundle (algorithm version in the report).
        samples: Monte-Carlo samples per slice, when known.
        rule: name of the routing rule that chose the model, when known.
        score_note: how log_likelihood was derived when it is not the raw estimate (for example
            a complexity correction); written into the report so that readers know.
        reference: which reference judged the series ("Reference: out of the box (station
            learning, 7 of 20 series)", "Reference: calibrated for station ..."), for the
            report; None when not known (``vaenode score``).
        series_score: the series' 10th-percentile slice score, on the same scale as the slice
            scores, where a calibrated station judges the series by it; else None.
        series_edge: the station's series edge on that scale (the series is abnormal below
            it); None where the slice count judges.
        image_edge: where a calibrated station judged the series normal by its series edge
            and has an image edge: the score on that scale below which an image was flagged,
            in place of ``threshold``; else None.
    """

    study_instance_uid: str
    series_instance_uid: str
    slices: tuple[SliceVerdict, ...]
    abnormal: bool
    abnormal_slices: int
    min_abnormal_slices: int
    threshold: float
    estimator: str
    model_name: str
    model_version: str
    samples: int | None = None
    rule: str | None = None
    score_note: str | None = None
    reference: str | None = None
    series_score: float | None = None
    series_edge: float | None = None
    image_edge: float | None = None

    def __post_init__(self) -> None:
        counted = sum(1 for s in self.slices if s.abnormal)
        if counted != self.abnormal_slices:
            raise ValueError(
                f"abnormal_slices={self.abnormal_slices} but {counted} slice verdicts are abnormal"
            )
        if self.min_abnormal_slices < 1:
            raise ValueError("min_abnormal_slices must be at least 1")
        if self.series_edge is not None:
            if self.series_score is None:
                raise ValueError("a series edge needs the series' score")
            if self.abnormal != (self.series_score < self.series_edge):
                raise ValueError(
                    f"series verdict abnormal={self.abnormal} contradicts its score "
                    f"{self.series_score:.6g} against the series edge {self.series_edge:.6g}"
                )
            if self.image_edge is not None:
                self._check_image_edge(self.image_edge)
        elif self.image_edge is not None:
            raise ValueError("an image edge needs the series edge that judged the series")
        elif self.abnormal != (counted >= self.min_abnormal_slices):
            raise ValueError(
                f"series verdict abnormal={self.abnormal} contradicts {counted} abnormal slices "
                f"with min_abnormal_slices={self.min_abnormal_slices}"
            )

    def _check_image_edge(self, edge: float) -> None:
        if self.abnormal or edge > self.threshold:
            raise ValueError(f"an image edge ({edge:.6g}) judges only a series judged normal, "
                             f"at or below the threshold {self.threshold:.6g}")
        late = [s for s in self.slices if s.abnormal and s.log_likelihood >= edge]
        if late:
            raise ValueError(f"image {late[0].index + 1} is flagged at "
                             f"{late[0].log_likelihood:.6g}, not below the image edge "
                             f"{edge:.6g} that judged it")

    @property
    def flagged(self) -> tuple[SliceVerdict, ...]:
        """The abnormal slices, in stack order (what the Key Object Selection lists)."""
        return tuple(s for s in self.slices if s.abnormal)

    @classmethod
    def from_slices(
        cls,
        *,
        study_instance_uid: str,
        series_instance_uid: str,
        slices: tuple[SliceVerdict, ...] | list[SliceVerdict],
        min_abnormal_slices: int,
        threshold: float,
        estimator: str,
        model_name: str,
        model_version: str,
        samples: int | None = None,
        rule: str | None = None,
        score_note: str | None = None,
        reference: str | None = None,
        series_score: float | None = None,
        series_edge: float | None = None,
        image_edge: float | None = None,
    ) -> SeriesVerdict:
        """Aggregate slice verdicts into a series verdict (the counts are derived, not passed).

        The series is abnormal when at least ``min_abnormal_slices`` slices are abnormal, or,
        with ``series_edge``, when ``series_score`` lies below it (``image_edge``: what its
        images were judged against, where it is normal).
        """
        slices = tuple(slices)
        count = sum(1 for s in slices if s.abnormal)
        abnormal = (count >= min_abnormal_slices if series_edge is None
                    else series_score is not None and series_score < series_edge)
        return cls(
            study_instance_uid=study_instance_uid,
            series_instance_uid=series_instance_uid,
            slices=slices,
            abnormal=abnormal,
            abnormal_slices=count,
            min_abnormal_slices=min_abnormal_slices,
            threshold=threshold,
            estimator=estimator,
            model_name=model_name,
            model_version=model_version,
            samples=samples,
            rule=rule,
            score_note=score_note,
            reference=reference,
            series_score=series_score,
            series_edge=series_edge,
            image_edge=image_edge,
        )
