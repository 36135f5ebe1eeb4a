"""Thin slices averaged to the model's slab (``preprocessing.slab_mm``) before scoring."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from node.model.bundle import load_bundle
from node.model.data import load_nifti
from node.model.preprocess import PreprocessConfig, slab_average
from node.model.train import recalibrate
from tests.helpers.tiny_bundle import IXI, SUBJECTS


def _ramp(n: int, shape: tuple[int, int] = (4, 5)) -> list[np.ndarray]:
    """Slice i is filled with the value i."""
    return [np.full(shape, float(i), np.float32) for i in range(n)]


def test_slices_as_thick_as_the_slab_or_thicker_are_left_alone() -> None:
    images = _ramp(6)
    for spacing in (2.0, 3.6, 1.4, None):
        out = slab_average(images, spacing, 2.0)
        assert all(np.array_equal(a, b) for a, b in zip(out, images, strict=True))
    assert all(np.array_equal(a, b) for a, b in
               zip(slab_average(images, 0.5, None), images, strict=True))


def test_three_thin_slices_make_one_slab_each_centred_and_cut_short_at_the_ends() -> None:
    out = slab_average(_ramp(6), 2.0 / 3.0, 2.0)  # k = 3
    assert [float(a[0, 0]) for a in out] == [0.5, 1.0, 2.0, 3.0, 4.0, 4.5]
    assert out[2].shape == (4, 5) and out[2].dtype == np.float32


def test_an_even_window_reaches_one_slice_further_towards_the_end() -> None:
    out = slab_average(_ramp(4), 1.0, 2.0)  # k = 2: slice i and i + 1
    assert [float(a[0, 0]) for a in out] == [0.5, 1.5, 2.5, 3.0]


def test_slices_of_different_sizes_are_not_averaged() -> None:
    images = [np.ones((4, 4), np.float32), np.zeros((4, 5), np.float32)]
    out = slab_average(images, 0.5, 2.0)
    assert np.array_equal(out[0], images[0]) and np.array_equal(out[1], images[1])


def test_averaging_to_the_slab_takes_the_thin_slices_noise_down() -> None:
    rng = np.random.default_rng(0)
    images = [rng.normal(100.0, 10.0, (64, 64)).astype(np.float32) for _ in range(40)]
    out = slab_average(images, 0.5, 2.0)  # k = 4: noise / 2 away from the ends
    assert float(np.std(np.stack(out[2:-2]))) == pytest.approx(5.0, rel=0.05)


def test_model_json_names_the_slab_only_when_set() -> None:
    plain = PreprocessConfig()
    assert "slab_mm" not in plain.to_dict()  # older nodes read the same model.json as before
    slab = replace(plain, slab_mm=2.0)
    assert PreprocessConfig.from_dict(json.loads(json.dumps(slab.to_dict()))) == slab
    assert PreprocessConfig.from_dict(plain.to_dict()) == plain


def test_a_bundle_with_a_slab_scores_thin_slices_as_their_averages(
        tiny_bundle_path: Path) -> None:
    bundle = load_bundle(tiny_bundle_path)
    vol = load_nifti(IXI / SUBJECTS[0])
    # 2 mm slices interleaved with their neighbours' means: a stack of 1 mm slices.
    thick = [vol.data[:, :, k].T for k in range(20, 60)]
    thin = [thick[i // 2] if i % 2 == 0 else (thick[i // 2] + thick[i // 2 + 1]) / 2
            for i in range(2 * len(thick) - 1)]
    spacing = [(2.0, 2.0)] * len(thin)
    plain = bundle.score_slices(thin, spacing, slice_spacing_mm=1.0)
    bundle.preprocess = replace(bundle.preprocess, slab_mm=2.0)
    slab = bundle.score_slices(thin, spacing, slice_spacing_mm=1.0)
    averaged = slab_average(thin, 1.0, 2.0)
    bundle.preprocess = replace(bundle.preprocess, slab_mm=None)
    by_hand = bundle.score_slices(averaged, spacing, slice_spacing_mm=1.0)
    assert np.allclose(slab.raw_log_likelihood, by_hand.raw_log_likelihood)
    assert not np.allclose(slab.raw_log_likelihood, plain.raw_log_likelihood)
    # Unknown spacing: nothing to average by.
    bundle.preprocess = replace(bundle.preprocess, slab_mm=2.0)
    unknown = bundle.score_slices(thin, spacing)
    assert np.allclose(unknown.raw_log_likelihood, plain.raw_log_likelihood)


def test_recalibrating_with_a_slab_leaves_a_2mm_calibration_as_it_was(
        tiny_bundle_path: Path, tmp_path: Path) -> None:
    vols = [load_nifti(IXI / name) for name in SUBJECTS]
    base = load_bundle(recalibrate(load_bundle(tiny_bundle_path), vols, tmp_path / "base", {}))
    slab = load_bundle(recalibrate(load_bundle(tiny_bundle_path), vols, tmp_path / "slab", {},
                                   slab_mm=2.0))
    assert slab.preprocess.slab_mm == 2.0 and "slab_mm" not in base.meta["preprocessing"]
    assert slab.meta["training"]["recalibrations"][-1]["slab_mm"] == 2.0
    # IXI's slices are 2 mm apart: nothing is averaged, so nothing calibrated moves.
    assert slab.threshold == base.threshold and slab.quantiles == base.quantiles
    again = load_bundle(recalibrate(slab, vols, tmp_path / "again", {}))
    assert again.preprocess.slab_mm == 2.0  # kept unless named
    removed = load_bundle(recalibrate(again, vols, tmp_path / "removed", {}, slab_mm=0))
    assert removed.preprocess.slab_mm is None
    with pytest.raises(ValueError, match="slab"):
        recalibrate(removed, vols, tmp_path / "bad", {}, slab_mm=-1)
