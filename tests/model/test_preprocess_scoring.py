"""Preprocessing to the model grid and the parts of the slice score."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from node.model.preprocess import PreprocessConfig, preprocess_stack
from node.model.scoring import ScoreConfig, absolute_score, series_shift, stack_foreground

CFG = PreprocessConfig(image_size=128, spacing_mm=2.0, fov_mm=240.0)


def _disk(n: int, radius_frac: float) -> np.ndarray:
    yy, xx = np.mgrid[:n, :n] - (n - 1) / 2
    return ((yy**2 + xx**2) < (radius_frac * n) ** 2).astype(np.float32) * 1000


def test_resampling_is_physical() -> None:
    """A 100 mm disk is 50 pixels across on the 2 mm grid whatever the input pixel size."""
    fine = _disk(400, 0.25)  # 400 px at 0.5 mm: disk diameter 200 px = 100 mm
    coarse = _disk(100, 0.25)  # 100 px at 2 mm: diameter 50 px = 100 mm
    x = preprocess_stack([fine, coarse], [(0.5, 0.5), (2.0, 2.0)], CFG)
    widths = (x[:, 0] > 0.5).sum(dim=(1, 2)).float()
    assert x.shape == (2, 1, 128, 128)
    assert torch.allclose(widths[0], widths[1], rtol=0.05)


def test_unknown_spacing_assumes_default_fov() -> None:
    x = preprocess_stack([np.ones((60, 30), np.float32)], None, CFG)
    rows = (x[0, 0].sum(dim=1) > 0).sum()
    assert rows == 120  # the longer side spans default_fov_mm (240 mm) = 120 px


def test_intensity_is_scaled_by_the_stack_and_clipped() -> None:
    a = np.full((64, 64), 100.0, np.float32)
    b = np.full((64, 64), 1000.0, np.float32)
    x = preprocess_stack([a, b], [(2.0, 2.0)] * 2, CFG)
    assert float(x[1].max()) == pytest.approx(1.0)
    assert float(x[0].max()) == pytest.approx(0.1, rel=1e-3)
    spiky = preprocess_stack([a, b * 100], [(2.0, 2.0)] * 2, CFG, scale=1000.0)
    assert float(spiky.max()) == CFG.clip_max


def test_field_of_view_outside_240mm_is_blanked() -> None:
    x = preprocess_stack([np.ones((128, 128), np.float32)], [(2.0, 2.0)], CFG)
    assert float(x[0, 0, :4].sum()) == 0 and float(x[0, 0, 4:124, 4:124].min()) == 1.0


def test_only_leading_and_trailing_background_is_excluded() -> None:
    slices = [np.zeros((32, 32))] * 2 + [np.ones((32, 32))] * 3 + [np.zeros((32, 32))]
    slices.insert(4, np.zeros((32, 32)))  # a dark slice mid-series is still judged
    fg = stack_foreground(slices, scale=1.0)
    assert fg.tolist() == [False, False, True, True, True, True, False]


def test_series_shift_is_capped_and_needs_enough_slices() -> None:
    cfg = ScoreConfig(series_relative=True, max_series_shift=100.0, reference_median=0.0,
                      min_series_slices=8)
    fg = np.ones(10, dtype=bool)
    assert series_shift(np.full(10, -50.0), fg, cfg) == -50.0
    assert series_shift(np.full(10, -5000.0), fg, cfg) == -100.0  # another body part stays low
    assert series_shift(np.full(10, -50.0), np.arange(10) < 3, cfg) == 0.0
    off = ScoreConfig(series_relative=False, max_series_shift=100.0)
    assert series_shift(np.full(10, -50.0), fg, off) == 0.0


def test_absolute_score_parts() -> None:
    comp = {"log_likelihood": np.array([-100.0]), "png_nats": np.array([40.0]),
            "tail": np.array([2.0])}
    plain = ScoreConfig(complexity=False, tail_weight=0.0)
    assert absolute_score(comp, plain, 1000, 2.0)[0] == -100.0
    tail = ScoreConfig(complexity=False, tail_weight=1.5)
    assert absolute_score(comp, tail, 1000, 2.0)[0] == pytest.approx(-100.0 - 1.5 * 10 * 2.0)
    corr = ScoreConfig(complexity=True, tail_weight=0.0)
    expected = -100.0 + 1000 * np.log(2.0 / 255) + 40.0
    assert absolute_score(comp, corr, 1000, 2.0)[0] == pytest.approx(expected)
