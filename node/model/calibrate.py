"""Threshold and confidence from the scores of held-out normal slices.

The threshold is the ``target_fpr`` quantile of the scores of normal calibration slices
(subjects never seen in training): at that threshold about ``target_fpr`` of normal slices are
called abnormal. The bundle keeps 201 quantiles of those scores, which define F, the empirical
distribution function of normal scores (linear between stored quantiles, 0 below the lowest,
1 above the highest).

Confidence of a verdict, with alpha = F(threshold in use) (the target rate for the stored
threshold):
- abnormal (score < threshold): ``1 - F(s) / alpha``: 0 at the threshold, 1 when the slice is
  below every normal calibration slice;
- normal: ``(F(s) - alpha) / (0.5 - alpha)`` clipped to [0, 1]: 0 at the threshold, 1 from the
  median normal slice upwards.
"""

from __future__ import annotations

import numpy as np

QUANTILE_LEVELS = np.linspace(0.0, 1.0, 201)


def threshold_at_fpr(normal_scores: np.ndarray, target_fpr: float) -> float:
    """The score below which a fraction ``target_fpr`` of normal slices falls."""
    scores = np.asarray(normal_scores, dtype=np.float64)
    if scores.size == 0:
        raise ValueError("no normal scores to calibrate on")
    if not 0.0 < target_fpr < 1.0:
        raise ValueError("target_fpr must be in (0, 1)")
    return float(np.quantile(scores, target_fpr))


def fit_tissue_credit(normal_scores: np.ndarray, tissue: np.ndarray,
                      quantile: float) -> tuple[float, float, float]:
    """(slope, reference, ceiling) of the tissue credit (item 7 of :mod:`node.model.scoring`):
    how many nats a normal slice's score falls per tissue pixel (least squares over the
    normal slices), the ``quantile`` of their tissue pixel counts beyond which it is
    credited, and their largest count, beyond which nothing more is.

    Raises:
        ValueError: no slices, a quantile outside (0, 1), or scores that do not fall with
            tissue (nothing to credit).
    """
    scores = np.asarray(normal_scores, dtype=np.float64)
    counts = np.asarray(tissue, dtype=np.float64)
    if not 0.0 < quantile < 1.0:
        raise ValueError(f"the tissue credit's quantile must lie in (0, 1), got {quantile}")
    if scores.size < 2 or scores.size != counts.size or np.ptp(counts) == 0:
        raise ValueError("the tissue credit needs normal slices with differing tissue counts")
    slope = -float(np.polyfit(counts, scores, 1)[0])
    if not slope > 0.0:
        raise ValueError(f"normal scores do not fall with tissue (slope {-slope:.4g} nats per "
                         "pixel): nothing to credit")
    return slope, float(np.quantile(counts, quantile)), float(counts.max())


def reference_quantiles(normal_scores: np.ndarray) -> list[float]:
    """The stored summary of the normal score distribution (201 quantiles)."""
    return [float(v) for v in np.quantile(np.asarray(normal_scores, float), QUANTILE_LEVELS)]


def ecdf(scores: np.ndarray, quantiles: list[float] | np.ndarray) -> np.ndarray:
    """F(s): the fraction of normal calibration slices scoring at most ``s``."""
    q = np.asarray(quantiles, dtype=np.float64)
    s = np.asarray(scores, dtype=np.float64)
    # np.interp needs increasing x; ties among quantiles are harmless after a tiny ramp.
    q = q + np.arange(len(q)) * 1e-9
    return np.interp(s, q, QUANTILE_LEVELS, left=0.0, right=1.0)


def confidence(
    scores: np.ndarray, threshold: float, quantiles: list[float] | np.ndarray
) -> np.ndarray:
    """Confidence in [0, 1] of each verdict (formula in the module docstring)."""
    f = ecdf(scores, quantiles)
    alpha = float(np.clip(ecdf(np.array([threshold]), quantiles)[0], 1e-6, 0.499))
    abnormal = np.asarray(scores) < threshold
    conf_abn = 1.0 - f / alpha
    conf_norm = (f - alpha) / (0.5 - alpha)
    return np.clip(np.where(abnormal, conf_abn, conf_norm), 0.0, 1.0)
