"""Threshold at a target false-positive rate and the confidence formula."""

from __future__ import annotations

import numpy as np
import pytest

from node.model.calibrate import confidence, ecdf, reference_quantiles, threshold_at_fpr


def test_threshold_hits_target_rate_on_fresh_normals() -> None:
    rng = np.random.default_rng(0)
    cal, fresh = rng.normal(size=20000), rng.normal(size=20000)
    thr = threshold_at_fpr(cal, 0.01)
    assert abs((fresh < thr).mean() - 0.01) < 0.003


def test_threshold_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        threshold_at_fpr(np.array([]), 0.01)
    with pytest.raises(ValueError):
        threshold_at_fpr(np.arange(10.0), 1.5)


def test_confidence_formula() -> None:
    rng = np.random.default_rng(1)
    q = reference_quantiles(rng.normal(size=50000))
    thr = threshold_at_fpr(rng.normal(size=50000), 0.01)
    s = np.array([-10.0, thr - 1e-9, thr + 1e-9, 0.0, 3.0])
    c = confidence(s, thr, q)
    assert c[0] == pytest.approx(1.0)  # far below every normal slice: sure it is abnormal
    assert c[1] < 0.05 and c[2] < 0.05  # at the threshold: no confidence either way
    assert c[3] == pytest.approx(1.0, abs=0.02)  # the median normal slice: sure it is normal
    assert c[4] == 1.0
    assert ((c >= 0) & (c <= 1)).all()
    assert ecdf(np.array([0.0]), q)[0] == pytest.approx(0.5, abs=0.01)
