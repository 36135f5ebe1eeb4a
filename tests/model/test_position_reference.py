"""Position reference: each slice is compared with normal calibration slices at the same
relative position of the same plane, and the threshold is set on leave-one-subject-out
referenced scores (node.model.scoring, item 5)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from node.model.bundle import load_bundle
from node.model.data import load_nifti, plane_slices, slice_spacing
from node.model.positions import relative_positions, robust_level
from node.model.scoring import (
    ScoreConfig,
    fit_position_profiles,
    position_normalized,
)
from node.model.train import calibrate_bundle
from tests.helpers.tiny_bundle import IXI, SUBJECTS, calibrate_cli

#: Normal scores that fall from the middle of the head towards the ends, as real ones do.
N_SLICES = 41


def _normal_stack(rng: np.random.Generator) -> np.ndarray:
    t = np.linspace(-1.0, 1.0, N_SLICES)
    return -100.0 - 400.0 * t**2 + rng.normal(0, 10, N_SLICES)


def test_relative_positions_follow_the_foreground_and_direction() -> None:
    fg = np.array([False, True, True, True, True, True, False])
    pos = relative_positions(fg)
    assert np.isnan(pos[0]) and np.isnan(pos[-1])
    assert np.allclose(pos[fg], [0.0, 0.25, 0.5, 0.75, 1.0])
    assert np.allclose(relative_positions(fg, descending=True)[fg], [1.0, 0.75, 0.5, 0.25, 0.0])


def test_profiles_hold_each_bins_level_and_spread() -> None:
    rng = np.random.default_rng(0)
    fg = np.ones(N_SLICES, dtype=bool)
    stacks = [("axial", _normal_stack(rng), fg) for _ in range(20)]
    (med, spread), = fit_position_profiles(stacks, 4).values()
    # The ends (bins 0 and 3) lie far below the middle (bins 1 and 2).
    assert med[0] < med[1] - 150 and med[3] < med[2] - 150
    assert all(s > 0 for s in spread)
    bin0 = np.concatenate([s[:10] for _, s, _ in stacks])  # positions 0 to 0.225
    assert med[0] == pytest.approx(np.median(bin0))


def test_a_low_mid_slice_stands_out_only_with_the_position_reference() -> None:
    rng = np.random.default_rng(1)
    fg = np.ones(N_SLICES, dtype=bool)
    normal = [_normal_stack(rng) for _ in range(30)]
    level, spread = robust_level(np.concatenate(normal))
    cfg = ScoreConfig(position_bins=8, position_median=level, position_spread=spread,
                      position_profiles=fit_position_profiles(
                          [("axial", s, fg) for s in normal], 8))
    threshold = float(np.quantile(np.concatenate(normal), 0.01))
    ref_threshold = float(np.quantile(np.concatenate(
        [position_normalized(s, fg, cfg, "axial") for s in normal]), 0.01))
    bad = _normal_stack(rng)
    bad[18:23] -= 250.0  # mid-head block: still above the end slices' level
    assert not np.any(bad[18:23] < threshold)
    ref = position_normalized(bad, fg, cfg, "axial")
    assert np.all(ref[18:23] < ref_threshold)
    assert np.mean(np.delete(ref, range(18, 23)) < ref_threshold) < 0.1
    # A stack given the other way round is placed the same once the direction is known.
    flipped = position_normalized(bad[::-1], fg, cfg, "axial", descending=True)
    assert np.allclose(flipped[::-1], ref)


def test_no_reference_without_a_known_plane_or_enough_slices() -> None:
    fg = np.ones(N_SLICES, dtype=bool)
    cfg = ScoreConfig(position_bins=4, position_median=0.0, position_spread=1.0,
                      position_profiles={"axial": ((1.0,) * 4, (2.0,) * 4)},
                      min_series_slices=8)
    score = np.linspace(-5, 5, N_SLICES)
    assert np.array_equal(position_normalized(score, fg, cfg, None), score)
    assert np.array_equal(position_normalized(score, fg, cfg, "coronal"), score)
    assert np.array_equal(position_normalized(score, fg, replace(cfg, position_bins=0), "axial"),
                          score)
    few = np.zeros(N_SLICES, dtype=bool)
    few[:5] = True
    assert np.array_equal(position_normalized(score, few, cfg, "axial"), score)
    # Background slices keep their score; foreground ones are referenced.
    fg[[0, -1]] = False
    out = position_normalized(score, fg, cfg, "axial")
    assert out[0] == score[0] and out[-1] == score[-1]
    assert np.allclose(out[fg], (score[fg] - 1.0) / 2.0)


def test_a_stack_spanning_less_than_a_head_keeps_the_global_score() -> None:
    fg = np.ones(N_SLICES, dtype=bool)
    cfg = ScoreConfig(position_bins=4, position_median=0.0, position_spread=1.0,
                      position_profiles={"axial": ((1.0,) * 4, (2.0,) * 4)},
                      position_min_extent_mm={"axial": 160.0})
    score = np.linspace(-5, 5, N_SLICES)
    referenced = (score - 1.0) / 2.0
    assert np.allclose(position_normalized(score, fg, cfg, "axial", False, 4.0), referenced)
    assert np.allclose(position_normalized(score, fg, cfg, "axial", False, 3.9), score)
    assert np.allclose(position_normalized(score, fg, cfg, "axial"), score)  # spacing unknown
    # A plane without a recorded span is not checked.
    no_check = replace(cfg, position_min_extent_mm={})
    assert np.allclose(position_normalized(score, fg, no_check, "axial"), referenced)


def test_profiles_survive_model_json() -> None:
    cfg = ScoreConfig(position_bins=2, position_median=-5.0, position_spread=3.0,
                      position_profiles={"axial": ((1.0, 2.0), (0.5, 0.25))},
                      position_min_extent_mm={"axial": 168.0})
    assert ScoreConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_calibration_thresholds_leave_one_subject_out_scores(tiny_bundle_path: Path) -> None:
    bundle = load_bundle(tiny_bundle_path)
    bundle.scoring = replace(bundle.scoring, position_bins=4)
    vols = [load_nifti(IXI / n) for n in SUBJECTS]
    entry = calibrate_bundle(bundle, vols, ("axial",), 0.05)
    cfg = bundle.scoring
    assert set(cfg.position_profiles) == {"axial"}
    assert len(cfg.position_profiles["axial"][0]) == 4
    assert cfg.position_spread > 0
    assert "leaving each subject out" in entry["method"]
    spans = []
    for vol in vols:
        images, spacing = plane_slices(vol, "axial")
        _, fg = bundle.preprocess_stack(list(images), [spacing] * len(images))
        spans.append(int(fg.sum()) * slice_spacing(vol, "axial"))
    assert cfg.position_min_extent_mm == {"axial": pytest.approx(0.8 * np.median(spans))}

    # The scores of the calibration stacks with the final profiles (in-sample) are flagged at
    # most at the target rate: the held-out threshold is the more cautious one.
    flagged, total = 0, 0
    for vol in vols:
        images, spacing = plane_slices(vol, "axial")
        gap = slice_spacing(vol, "axial")
        scores = bundle.score_slices(list(images), [spacing] * len(images), device="cpu",
                                     plane="axial", slice_spacing_mm=gap)
        fg = scores.foreground
        flagged += int(scores.abnormal[fg].sum())
        total += int(fg.sum())
        unplaced = bundle.score_slices(list(images), [spacing] * len(images), device="cpu")
        assert not np.allclose(unplaced.log_likelihood[fg], scores.log_likelihood[fg])
        # Too short a span for a whole head: the global score.
        short = bundle.score_slices(list(images), [spacing] * len(images), device="cpu",
                                    plane="axial", slice_spacing_mm=gap / 2)
        assert np.allclose(short.log_likelihood, unplaced.log_likelihood)
    assert total >= 50
    assert flagged / total <= 0.05 + 1.0 / total


def test_calibrate_refuses_too_few_subjects(tiny_bundle_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "p"
    proc = calibrate_cli(tiny_bundle_path, out, "--position-bins", "10")
    assert proc.returncode == 1
    assert "needs at least 3 calibration subjects" in proc.stderr
    assert not out.exists()


def test_unreferenced_stacks_are_mapped_onto_the_referenced_scale(
    tiny_bundle_path: Path,
) -> None:
    """A stack the reference cannot place (no plane, too short) gets the global score mapped so
    that one threshold flags it at about the target rate too."""
    bundle = load_bundle(tiny_bundle_path)
    bundle.scoring = replace(bundle.scoring, position_bins=4)
    vols = [load_nifti(IXI / n) for n in SUBJECTS]
    calibrate_bundle(bundle, vols, ("axial",), 0.05)
    cfg = bundle.scoring
    assert (cfg.fallback_gain, cfg.fallback_offset) != (1.0, 0.0) and cfg.fallback_gain > 0
    score = np.linspace(-5, 5, N_SLICES)
    fg = np.ones(N_SLICES, dtype=bool)
    assert np.allclose(position_normalized(score, fg, cfg, None),
                       cfg.fallback_offset + cfg.fallback_gain * score)
    flagged, total = 0, 0
    for vol in vols:
        images, spacing = plane_slices(vol, "axial")
        s = bundle.score_slices(list(images), [spacing] * len(images), device="cpu")
        flagged += int(s.abnormal[s.foreground].sum())
        total += int(s.foreground.sum())
    assert flagged / total <= 0.05 + 2.0 / total
