"""From estimator outputs to the slice score the node thresholds (documented in model.json).

The score is the marginal likelihood of METHOD.md with two corrections and one normalization,
each one switchable in the bundle and each measured by ``vaenode evaluate``:

1. Complexity correction (Serra et al., ICLR 2020): a likelihood model gives simple images
   (blurred, flat) a high density whatever their quality; a generic lossless codec measures that
   simplicity. With L(x) the PNG code length of the slice quantized to 8 bits (nats) and
   Delta the quantization step, log p(x) + D log Delta is the VAE's log-probability of the
   quantized slice, and ``corrected = log p(x) + D log Delta + L(x)`` is the log-likelihood
   ratio of the VAE against the codec: how much better than a generic compressor the model of
   normal images explains this slice. ``complexity_weight`` scales L(x) (1.0: Serra et al.'s
   ratio); a VAE whose pixel variances are wide loses less likelihood to added noise than the
   codec loses compression, and a full-weight correction then rewards noise.
2. Tail weighting: the 1% worst-explained pixels (largest 0.5 ((x - mean)/sigma)^2 under
   z ~ q) count ``1 + tail_weight`` times instead of once, because a ghost or a spike stripe
   spoils few pixels and a sum over 16384 of them dilutes it.
3. Series-relative shift: the slices of one series share scanner, coil and protocol; the
   ``shift_quantile`` quantile of the scores of the series' foreground slices (a high quantile
   moves less than the median when a block of slices scores low), minus the same for typical
   normal calibration series, is subtracted from every slice, the shift being capped at
   ``max_series_shift`` nats. A normal
   scan from another scanner (a uniformly different noise texture) moves all its slices
   together and is brought back; a scan of another body part, far beyond the cap, stays far
   below the threshold; an artifact in part of a series stands out against the rest.
4. Alternatives: other weightings of the same corrected log-likelihood (another complexity
   weight, tail weight and series shift; :class:`AlternativeScore`), each mapped onto the main
   score's scale by the affine map that matches its 1st percentile and median on the normal
   calibration slices to the main score's; the final score is the minimum of the main score
   and the mapped alternatives: a slice is abnormal when any of them finds it unusually
   unlikely.

5. Position reference: how likely a normal slice is depends on where it lies in the head (the
   slices near the skull base and the vertex score lower than mid-brain ones), so one global
   threshold is set by the end slices and lets a corrupted mid-brain slice pass far above the
   level of its normal neighbours. With ``position_bins`` > 0, the final score of a foreground
   slice is compared with the normal calibration slices at the same relative position (among
   the stack's foreground slices, in the plane's anatomical direction: inferior to superior,
   posterior to anterior, left to right) of the same plane:
   ``position_median + position_spread * (s - median_b) / spread_b``, where ``b`` is the
   position bin, a spread is the median minus the 5th percentile, and ``position_median`` and
   ``position_spread`` are those of all normal slices. The result stays on the
   nats scale of the global score (a normal slice at its bin's median gets the global median),
   so the threshold and confidence work unchanged. The threshold is then calibrated on
   leave-one-subject-out normalized scores (each calibration subject normalized with the
   profiles of the others), so that the noise of the profiles counts in the false-positive
   rate instead of being fitted away. Relative position means the same only for stacks that
   cover the head as the calibration stacks do: a stack whose foreground slices span less
   than ``position_min_extent_mm`` of its plane (0.8 times the calibration stacks' median
   span; number of foreground slices times the slice spacing) keeps the global score, as do
   stacks whose plane, direction or slice spacing is unknown and stacks with fewer than
   ``min_series_slices`` foreground slices. That global score is put on the referenced
   score's scale by the affine map matching its target-rate quantile and median on the normal
   calibration slices to the referenced scores' (``fallback_gain``, ``fallback_offset``), so
   that one threshold serves both and an unreferenced stack is flagged at about the target
   rate too.

6. Background part (optional, :class:`BackgroundPart`): the decoder's log-likelihood
   restricted to the background. With z = the posterior mean (the decode the reconstruction
   error already needs), the per-pixel terms of log p(x|z),
   ``-0.5 r^2 - log sigma - 0.5 log 2 pi`` with ``r = (x - mean) / sigma``, are averaged over
   the pixels outside the head, the head being where the decoder mean exceeds
   ``head_level`` (0.1), dilated by ``dilation`` pixels (1): the mask comes from the
   reconstruction, so a ghost or a motion smear in the image's air does not move it, it
   lowers the likelihood there, where a normal slice has only noise. Summed over the whole
   slice these pixels are drowned by the head's; averaged on their own they catch ghosting
   and motion that spill outside the head. The part gets its own capped series shift (like
   item 3, at its own quantile; cap 1.25 times the largest shift normal site variants of the
   calibration subjects need) and the same affine map onto the main score's scale as an
   alternative (item 4), or, calibrated under a kept threshold with a background rate, the
   map that puts that quantile of its calibration values on the threshold and its median on
   the main score's, and joins the minimum. Bundles without it score as before.
   Its ``statistic`` may instead be the residual term alone, the mean of ``-0.5 r^2`` over
   the same pixels, each pixel's capped at 12.5 (r = 5): on real normal sagittal 3D series
   the ``-log sigma`` term alone flags the middle slices, where the head fills most of the
   grid, and the residual sees a ghost or smear without it (node/models/README.md).

7. Tissue credit (optional; ``tissue_slope`` > 0): a slice's likelihood falls by about
   ``tissue_slope`` nats for each pixel of tissue it holds (the decoder explains a tissue
   pixel less sharply than an air pixel), so the middle sagittal slices of the largest heads
   score lowest of all normal slices. Each tissue pixel (``tissue_pixels``: model-grid pixels
   above the foreground level) beyond ``tissue_reference``, up to ``tissue_ceiling``, is
   credited back, ``score += tissue_slope * (min(pixels, ceiling) - reference)`` where the
   pixels exceed the reference: a slice with no more tissue than the reference (the
   calibration slices' 90th percentile in the shipped bundle) scores exactly as without it,
   and one with more than any normal calibration slice had (the ceiling; pure noise fills the
   grid with "tissue") gets no more than the slice with the most did. Calibration fits the
   slope by least squares on the normal calibration slices and may keep the threshold the
   bundle had (``vaenode calibrate --keep-threshold``): then only slices with more tissue
   than the reference change, and only upwards.

Leading and trailing background slices (outside the head) are scored but never called
abnormal: the model was not trained on air, and a viewer would not send them to a radiologist
either.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from node.model.data import FOREGROUND_FRACTION, FOREGROUND_LEVEL
from node.model.likelihood import BACKGROUND_DILATION, BACKGROUND_LEVEL
from node.model.positions import fit_levels, position_bin, relative_positions

#: The background part's statistics and the estimator components that hold them.
BACKGROUND_STATISTICS = {"log_likelihood": "background", "residual": "background_residual"}


@dataclass(frozen=True)
class ScoreConfig:
    """How the slice score is formed from the estimator outputs (stored in model.json).

    Attributes:
        estimator: default marginal-likelihood estimator.
        samples: default Monte-Carlo samples per slice.
        complexity: apply the PNG complexity correction.
        complexity_weight: weight of the code length L(x) in the correction.
        tail_weight: extra weight of the worst 1% pixels' squared standardized residuals.
        series_relative: apply the capped series shift.
        min_series_slices: fewest foreground slices for a series shift (fewer: no shift).
        max_series_shift: cap of the series shift in nats.
        shift_quantile: which quantile of the series' foreground scores sets the shift (0.5:
            the median; a higher one moves less when a block of slices scores low).
        reference_median: median over normal calibration series of each series'
            ``shift_quantile`` quantile (nats); the name stayed from the median-only version.
        alternatives: other scores whose mapped minimum with this one is the final score
            (:class:`AlternativeScore`, item 4 of the module docstring).
        position_bins: bins of relative slice position of the position reference (item 5;
            0: off).
        position_profiles: per plane, the (medians, spreads) of normal final scores per bin
            (set by calibration).
        position_median: median of the normal final scores, all positions and planes.
        position_spread: their median minus their 5th percentile.
        position_min_extent_mm: per plane, the least span of a stack's foreground slices (mm)
            for the position reference (set by calibration; a plane missing here: no check).
        fallback_gain: slope of the map of an unreferenced score onto the referenced scale.
        fallback_offset: its intercept.
        background: the background part (item 6), or None (absent from ``model.json``: the
            bundles before it score exactly as they did).
        tissue_slope: nats credited per tissue pixel beyond ``tissue_reference`` (item 7; 0:
            off, and absent from ``model.json``).
        tissue_reference: tissue pixels of a slice below which nothing is credited.
        tissue_ceiling: tissue pixels beyond which nothing more is credited.
    """

    estimator: str = "importance"
    samples: int = 8
    complexity: bool = True
    complexity_weight: float = 1.0
    tail_weight: float = 0.0
    series_relative: bool = True
    min_series_slices: int = 8
    max_series_shift: float = 0.0
    shift_quantile: float = 0.5
    reference_median: float = 0.0
    alternatives: tuple[AlternativeScore, ...] = ()
    position_bins: int = 0
    position_profiles: Profiles = field(default_factory=dict)
    position_median: float = 0.0
    position_spread: float = 0.0
    position_min_extent_mm: dict[str, float] = field(default_factory=dict)
    fallback_gain: float = 1.0
    fallback_offset: float = 0.0
    background: BackgroundPart | None = None
    tissue_slope: float = 0.0
    tissue_reference: float = 0.0
    tissue_ceiling: float = 0.0

    def __post_init__(self) -> None:
        if self.tissue_slope and not self.tissue_reference <= self.tissue_ceiling:
            raise ValueError(f"the tissue credit's ceiling ({self.tissue_ceiling}) lies below "
                             f"its reference ({self.tissue_reference})")

    def to_dict(self) -> dict[str, Any]:
        """Plain values for ``model.json`` (no ``background`` key when there is no such part,
        no ``statistic`` in it when it is the log-likelihood, and no tissue keys without a
        tissue credit, so that bundles written before these existed write the same
        ``model.json`` as before)."""
        out = asdict(self)
        if not out["tissue_slope"]:
            del out["tissue_slope"], out["tissue_reference"], out["tissue_ceiling"]
        if out["background"] is None:
            del out["background"]
        elif out["background"]["statistic"] == "log_likelihood":
            del out["background"]["statistic"]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ScoreConfig:
        """Inverse of :meth:`to_dict` (the settings of removed parts are dealt with before, by
        :mod:`node.model.removed`)."""
        alts = tuple(a if isinstance(a, AlternativeScore) else AlternativeScore(**a)
                     for a in data.get("alternatives", ()))
        profiles = _profiles(data.get("position_profiles", {}))
        extents = {plane: float(v)
                   for plane, v in data.get("position_min_extent_mm", {}).items()}
        bg = data.get("background")
        if bg is not None and not isinstance(bg, BackgroundPart):
            bg = BackgroundPart(**bg)
        return cls(**{**data, "alternatives": alts, "position_profiles": profiles,
                      "position_min_extent_mm": extents, "background": bg})

    def part(self, alt: AlternativeScore) -> ScoreConfig:
        """The settings of one alternative as a stand-alone score (no alternatives of its own)."""
        return ScoreConfig.from_dict({
            **self.to_dict(), "alternatives": (), "position_bins": 0, "background": None,
            "complexity": alt.complexity_weight > 0,
            "complexity_weight": alt.complexity_weight or 1.0, "tail_weight": alt.tail_weight,
            "max_series_shift": alt.max_series_shift, "shift_quantile": alt.shift_quantile,
            "reference_median": alt.reference_median,
        })

    def background_shift_config(self) -> ScoreConfig:
        """The series-shift settings of the background part (item 6) as a stand-alone score's
        (only the shift fields matter: :func:`series_shift` reads them)."""
        bg = self.background
        if bg is None:
            raise ValueError("this score has no background part")
        return ScoreConfig(series_relative=self.series_relative,
                           min_series_slices=self.min_series_slices,
                           max_series_shift=bg.max_series_shift,
                           shift_quantile=bg.shift_quantile,
                           reference_median=bg.reference_median)


@dataclass(frozen=True)
class BackgroundPart:
    """The background part (item 6 of the module docstring): the mean per-pixel decoder
    log-likelihood outside the decoder-mean head mask, or its residual term alone, with its
    own series shift and map.

    Attributes:
        statistic: ``log_likelihood`` (all terms: the ``background`` component) or
            ``residual`` (``-0.5 r^2`` alone, capped per pixel: the ``background_residual``
            component).
        shift_quantile: quantile of its foreground values that sets its series shift.
        max_series_shift: cap of its series shift (nats per pixel).
        head_level: decoder-mean level above which a pixel is head (preprocessed units).
        dilation: pixels by which the head mask is dilated.
        reference_median: its typical normal series quantile (set by calibration).
        gain: slope of the map onto the main score's scale (set by calibration).
        offset: intercept of that map (set by calibration).
    """

    shift_quantile: float = 0.75
    max_series_shift: float = 0.0
    statistic: str = "log_likelihood"
    head_level: float = BACKGROUND_LEVEL
    dilation: int = BACKGROUND_DILATION
    reference_median: float = 0.0
    gain: float = 1.0
    offset: float = 0.0

    def __post_init__(self) -> None:
        if self.statistic not in BACKGROUND_STATISTICS:
            raise ValueError(f"unknown background statistic {self.statistic!r}; expected one "
                             f"of {tuple(BACKGROUND_STATISTICS)}")

    @property
    def component(self) -> str:
        """The estimator component this part reads."""
        return BACKGROUND_STATISTICS[self.statistic]


Profiles = dict[str, tuple[tuple[float, ...], tuple[float, ...]]]


def _profiles(data: dict[str, Any]) -> Profiles:
    """Per-plane (medians, spreads) per position bin from their ``model.json`` lists."""
    return {plane: (tuple(map(float, med)), tuple(map(float, spread)))
            for plane, (med, spread) in data.items()}


@dataclass(frozen=True)
class AlternativeScore:
    """Another weighting of the corrected log-likelihood (item 4 of the module docstring).

    Attributes:
        complexity_weight: weight of L(x); 0 turns the complexity correction off.
        tail_weight: extra weight of the worst 1% pixels.
        max_series_shift: cap of its series shift in nats.
        shift_quantile: quantile of its foreground scores that sets its series shift.
        reference_median: its typical normal series quantile (set by calibration).
        gain: slope of the map onto the main score's scale (set by calibration).
        offset: intercept of that map (set by calibration).
    """

    complexity_weight: float
    tail_weight: float
    max_series_shift: float
    shift_quantile: float = 0.5
    reference_median: float = 0.0
    gain: float = 1.0
    offset: float = 0.0


def png_nats(x: torch.Tensor, clip_max: float) -> np.ndarray:
    """PNG code length in nats of each slice of ``x`` ``[n, 1, H, W]`` quantized to 8 bits."""
    q = torch.round(x[:, 0].clamp(0, clip_max) / clip_max * 255).to(torch.uint8).cpu().numpy()
    out = np.empty(len(q))
    for i, im in enumerate(q):
        buf = io.BytesIO()
        Image.fromarray(im).save(buf, format="PNG", compress_level=6)
        out[i] = len(buf.getvalue()) * 8 * math.log(2)
    return out


def tissue_pixels(x: torch.Tensor) -> np.ndarray:
    """Model-grid pixels of each slice of ``x`` ``[n, 1, H, W]`` above the foreground level
    (item 7 of the module docstring)."""
    return (x[:, 0] > FOREGROUND_LEVEL).sum(dim=(1, 2)).double().cpu().numpy()


def tissue_credit(components: dict[str, np.ndarray], cfg: ScoreConfig) -> np.ndarray:
    """Item 7: ``tissue_slope`` nats per tissue pixel beyond ``tissue_reference``, up to
    ``tissue_ceiling`` (zeros when the score has no tissue credit).

    Raises:
        ValueError: ``components`` lack ``tissue_pixels`` (scored before the credit existed).
    """
    n = len(components["log_likelihood"])
    if not cfg.tissue_slope:
        return np.zeros(n)
    if "tissue_pixels" not in components:
        raise ValueError("the components lack 'tissue_pixels' (scored before the tissue "
                         "credit existed): score the slices again")
    counts = np.asarray(components["tissue_pixels"], dtype=np.float64)
    excess = np.clip(counts, cfg.tissue_reference, cfg.tissue_ceiling) - cfg.tissue_reference
    return cfg.tissue_slope * excess


def absolute_score(
    components: dict[str, np.ndarray], cfg: ScoreConfig, pixels: int, clip_max: float
) -> np.ndarray:
    """The per-slice score before the series shift, from the estimator components.

    Args:
        components: arrays ``log_likelihood``, ``tail``, (with complexity) ``png_nats`` and
            (with a tissue credit) ``tissue_pixels``.
        cfg: the score settings.
        pixels: pixels per slice on the model grid (D).
        clip_max: intensity range of the grid, for the quantization step Delta.
    """
    score = components["log_likelihood"].astype(np.float64).copy()
    if cfg.complexity:
        delta = clip_max / 255.0
        w = cfg.complexity_weight
        score += w * (pixels * math.log(delta) + components["png_nats"])
    if cfg.tail_weight:
        worst = max(1, pixels // 100)
        score -= cfg.tail_weight * worst * components["tail"]
    return score + tissue_credit(components, cfg)


def stack_foreground(images: Sequence[np.ndarray], scale: float) -> np.ndarray:
    """Slices that show tissue: the same rule as training's background-slice removal.

    Only leading and trailing runs of background slices are excluded: a dark slice in the
    middle of a series (a failed coil element) must still be judged.
    """
    frac = np.array(
        [float((np.asarray(im) > FOREGROUND_LEVEL * scale).mean()) for im in images]
    )
    fg = frac >= FOREGROUND_FRACTION
    if not fg.any():
        return fg
    first, last = int(np.argmax(fg)), len(fg) - 1 - int(np.argmax(fg[::-1]))
    out = np.zeros(len(fg), dtype=bool)
    out[first : last + 1] = True
    return out


def series_shift(score: np.ndarray, foreground: np.ndarray, cfg: ScoreConfig) -> float:
    """The capped shift subtracted from every slice of one series (0.0 when not applied)."""
    if not cfg.series_relative or int(foreground.sum()) < cfg.min_series_slices:
        return 0.0
    shift = float(np.quantile(score[foreground], cfg.shift_quantile)) - cfg.reference_median
    return float(np.clip(shift, -cfg.max_series_shift, cfg.max_series_shift))


def stack_scores(
    comp: dict[str, np.ndarray], foreground: np.ndarray, cfg: ScoreConfig, pixels: int,
    clip_max: float, plane: str | None = None, descending: bool = False,
    slice_spacing_mm: float | None = None,
) -> tuple[np.ndarray, np.ndarray, float]:
    """(final, absolute, shift) of one stack: the thresholded score, the main score before its
    series shift, and that shift. ``plane``, ``descending`` and ``slice_spacing_mm`` place the
    slices for the position reference (None: unknown, no position reference)."""
    absolute = absolute_score(comp, cfg, pixels, clip_max)
    shift = series_shift(absolute, foreground, cfg)
    final = absolute - shift
    for alt in cfg.alternatives:
        part = alternative_final(comp, foreground, cfg.part(alt), pixels, clip_max)
        final = np.minimum(final, alt.offset + alt.gain * part)
    if cfg.background is not None:
        part = background_final(comp, foreground, cfg)
        final = np.minimum(final, cfg.background.offset + cfg.background.gain * part)
    final = position_normalized(final, foreground, cfg, plane, descending, slice_spacing_mm)
    return final, absolute, shift


def reference_bins(foreground: np.ndarray, cfg: ScoreConfig, plane: str | None,
                   descending: bool = False,
                   slice_spacing_mm: float | None = None) -> np.ndarray | None:
    """The position bin of each foreground slice when the stack is compared with normal
    slices at its positions (item 5: a known plane with a profile, enough foreground slices
    spanning enough of the plane), else None."""
    if cfg.position_bins <= 0 or (plane or "") not in cfg.position_profiles:
        return None
    n_fg = int(foreground.sum())
    least = cfg.position_min_extent_mm.get(plane or "")
    if (n_fg < cfg.min_series_slices
            or (least is not None
                and (slice_spacing_mm is None or n_fg * slice_spacing_mm < least))):
        return None
    return position_bin(relative_positions(foreground, descending)[foreground],
                        cfg.position_bins)


def position_normalized(score: np.ndarray, foreground: np.ndarray, cfg: ScoreConfig,
                        plane: str | None, descending: bool = False,
                        slice_spacing_mm: float | None = None) -> np.ndarray:
    """``score`` with each foreground slice compared with normal slices at its position
    (item 5 of the module docstring); where that does not apply, ``score`` mapped onto the
    same scale (unchanged when the bundle has no position reference)."""
    if cfg.position_bins <= 0:
        return score
    k = reference_bins(foreground, cfg, plane, descending, slice_spacing_mm)
    if k is None:
        return cfg.fallback_offset + cfg.fallback_gain * np.asarray(score, dtype=np.float64)
    medians, spreads = (np.asarray(v, dtype=np.float64)
                        for v in cfg.position_profiles[plane or ""])
    out = np.asarray(score, dtype=np.float64).copy()
    out[foreground] = (cfg.position_median
                       + cfg.position_spread * (out[foreground] - medians[k]) / spreads[k])
    return out


def fit_position_profiles(
    stacks: Sequence[tuple[str, np.ndarray, np.ndarray]], bins: int, min_slices: int = 1
) -> Profiles:
    """Per plane, the level and spread of normal final scores per position bin.

    Args:
        stacks: (plane, final scores, foreground) of normal stacks, each in its plane's
            anatomical direction.
        bins: position bins; a bin without slices takes the plane's overall level.
        min_slices: fewest foreground slices of a stack that counts (as in scoring).
    """
    out: Profiles = {}
    for plane in sorted({p for p, _, fg in stacks if int(fg.sum()) >= min_slices}):
        scores, positions = [], []
        for p, final, fg in stacks:
            if p == plane and int(fg.sum()) >= min_slices:
                scores.append(final[fg])
                positions.append(relative_positions(fg)[fg])
        out[plane] = fit_levels(np.concatenate(scores), np.concatenate(positions), bins)
    return out


def alternative_final(
    comp: dict[str, np.ndarray], foreground: np.ndarray, part: ScoreConfig, pixels: int,
    clip_max: float,
) -> np.ndarray:
    """One stand-alone score (main or alternative) after its own series shift, unmapped."""
    a = absolute_score(comp, part, pixels, clip_max)
    return a - series_shift(a, foreground, part)


def background_final(comp: dict[str, np.ndarray], foreground: np.ndarray,
                     cfg: ScoreConfig) -> np.ndarray:
    """The background part (item 6) after its own series shift, unmapped.

    Raises:
        ValueError: ``comp`` lacks the part's component (records scored before it existed).
    """
    if cfg.background is None:
        raise ValueError("this score has no background part")
    key = cfg.background.component
    if key not in comp:
        raise ValueError(f"the components lack {key!r} (scored before the background part "
                         "existed): score the slices again")
    a = np.asarray(comp[key], dtype=np.float64)
    return a - series_shift(a, foreground, cfg.background_shift_config())


def match_scales(main: np.ndarray, other: np.ndarray, low: float = 0.01) -> tuple[float, float]:
    """(gain, offset) mapping ``other``'s ``low`` quantile (default: 1st percentile) and median
    on normal slices onto ``main``'s."""
    m01, m50 = np.quantile(main, [low, 0.5])
    return map_quantiles(other, low, float(m01), float(m50))


def map_quantiles(other: np.ndarray, low: float, at_low: float,
                  at_median: float) -> tuple[float, float]:
    """(gain, offset) mapping ``other``'s ``low`` quantile on normal slices onto ``at_low``
    and its median onto ``at_median``."""
    o01, o50 = np.quantile(other, [low, 0.5])
    gain = float((at_median - at_low) / max(o50 - o01, 1e-9))
    return gain, float(at_low - gain * o01)
