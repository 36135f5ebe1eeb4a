"""The detail step part: a slice's finest detail against its own series' robust straight line
(node.model.scoring, item 8), joining the minimum; bundles without it scoring as before."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from node.model.bundle import load_bundle
from node.model.data import load_nifti
from node.model.scoring import (
    DetailPart,
    DetailStepPart,
    ScoreConfig,
    detail_step_residuals,
    detail_step_z,
    robust_level,
    series_trend_residuals,
    stack_scores,
)
from node.model.train import stack_components
from tests.helpers.tiny_bundle import IXI
from tests.model.test_background import _calibrate
from tests.model.test_detail import _calibrate_shipped

N = 60


def _line(slope: float, level: float, noise: float = 0.0, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return level + slope * np.linspace(0.0, 1.0, N) + rng.normal(0.0, noise, N)


@pytest.mark.parametrize("start", [0, 20, 42])  # the block at either end or in the middle
def test_a_block_stands_out_against_its_series_line(start: int) -> None:
    # Another scanner's detail: its own level and slope along the series (flat or falling).
    for slope, level in ((0.0, -3.2), (-1.5, -1.8), (0.8, 0.4)):
        values = _line(slope, level)
        fg = np.ones(N, dtype=bool)
        assert np.allclose(series_trend_residuals(values, fg), 0.0, atol=1e-9)
        # A block of 30% of the slices with less detail: the line is not pulled towards it,
        # the block's residuals are the step and the rest stays on the line.
        step = values.copy()
        block = slice(start, start + 18)
        step[block] -= 0.4
        res = series_trend_residuals(step, fg)
        inside = np.zeros(N, dtype=bool)
        inside[block] = True
        assert np.allclose(res[inside], -0.4, atol=0.02)
        assert np.allclose(res[~inside], 0.0, atol=0.02)
        # Ordinary least squares would be pulled: its residuals outside the block move.
        p = np.linspace(0.0, 1.0, N)
        ols = step - np.polyval(np.polyfit(p, step, 1), p)
        assert np.max(np.abs(ols[~inside])) > 0.05


def test_the_asymmetric_fit_is_not_lifted_by_a_raised_block() -> None:
    # A block that RAISES the value (spikes, noise, a bias field in the detail): the
    # symmetric fit only partly drops it and the line rises under the rest of the series,
    # which then looks less detailed than its trend; the asymmetric fit drops it.
    rng = np.random.default_rng(7)
    values = -2.0 - np.linspace(0.0, 1.0, 100) + rng.normal(0.0, 0.15, 100)
    values[35:65] += 0.5
    fg = np.ones(100, dtype=bool)
    rest = np.r_[0:35, 65:100]
    symmetric = series_trend_residuals(values, fg)
    asymmetric = series_trend_residuals(values, fg, tukey_c_high=2.5)
    assert np.median(symmetric[rest]) < -0.08
    assert abs(np.median(asymmetric[rest])) < 0.05
    assert np.median(asymmetric[35:65]) > 0.45
    # A block that LOWERS it still stands out, and the rest is not pushed below the line
    # (the asymmetric fit gives way downwards a little: a block below widens its scale).
    values[35:65] -= 1.0
    lowered = series_trend_residuals(values, fg, tukey_c_high=2.5)
    assert np.median(lowered[35:65]) < -0.25 and np.median(lowered[rest]) >= 0.0


def test_the_guard_keeps_slices_the_other_parts_flag_out_of_the_fit() -> None:
    # A raised block (a bias field) that the other parts flag: fitted to the slices they
    # find ordinary, even the symmetric line stays under the rest of the series.
    rng = np.random.default_rng(8)
    values = -2.0 - np.linspace(0.0, 1.0, 100) + rng.normal(0.0, 0.15, 100)
    values[35:65] += 0.5
    others = np.zeros(100)
    others[35:65] = -10.0  # what the other parts give the block
    comp, fg = {"detail": values}, np.ones(100, dtype=bool)
    rest = np.r_[0:35, 65:100]
    cfg = _config(tukey_c_high=None, guard_cut=-5.0)
    guarded = detail_step_residuals(comp, fg, cfg, others)
    assert guarded is not None and abs(np.median(guarded[rest])) < 0.03
    assert np.median(guarded[35:65]) > 0.45  # still scored (and above the line: z = 0)
    unguarded = detail_step_residuals(comp, fg, cfg)  # no minimum of the others given
    assert unguarded is not None and np.median(unguarded[rest]) < -0.08
    # The same through stack_scores, which hands the part the minimum of the others.
    full = {"log_likelihood": np.where(np.arange(100) // 35 == 1, -2000.0, -1000.0),
            "tail": np.zeros(100), "png_nats": np.zeros(100), "detail": values}
    final, _, _ = stack_scores(full, fg, replace(cfg, detail_step=replace(
        cfg.detail_step, guard_cut=-1500.0)), 64, 2.0)
    plain, _, _ = stack_scores(full, fg, replace(cfg, detail_step=None), 64, 2.0)
    at_cut = replace(cfg, detail_step=replace(cfg.detail_step, guard_cut=-1500.0))
    z = detail_step_z(full, fg, at_cut, None, others=plain)
    assert np.array_equal(final, np.minimum(plain, -50.0 + 1000.0 * z))
    assert not np.array_equal(z, detail_step_z(full, fg, at_cut, None))  # the guard acted


def test_residuals_with_noise_background_slices_and_short_series() -> None:
    values = _line(-1.0, -2.0, noise=0.05, seed=1)
    fg = np.ones(N, dtype=bool)
    fg[:5] = fg[-4:] = False  # leading and trailing background slices
    res = series_trend_residuals(values, fg)
    assert np.all(res[~fg] == 0.0)
    assert 0.02 < np.std(res[fg]) < 0.08 and abs(np.median(res[fg])) < 0.02
    # Siegel's line alone (tukey_c 0) is as robust, a little noisier.
    assert np.std(series_trend_residuals(values, fg, tukey_c=0.0)[fg]) < 0.1
    two = np.zeros(N, dtype=bool)
    two[10:12] = True
    assert np.all(series_trend_residuals(values, two) == 0.0)


def _config(**step: object) -> ScoreConfig:
    part = DetailStepPart(**{"level": 0.1, "spread": 0.5, "gain": 1000.0, "offset": -50.0,
                             "positioned": False, **step})
    return ScoreConfig(complexity=False, series_relative=False, min_series_slices=8,
                       detail_step=part)


def test_z_counts_only_less_detail_than_the_line() -> None:
    cfg = _config(tukey_c_high=None)  # a symmetric fit: exact on these noise-free values
    fg = np.ones(N, dtype=bool)
    values = _line(-1.0, -2.0)
    values[30:45] -= 1.0
    values[5:10] += 2.0  # a block with MORE detail (spikes, noise): left to the other parts
    z = detail_step_z({"detail": values}, fg, cfg, None)
    assert np.allclose(z[30:45], (-1.0 - 0.1) / 0.5, atol=1e-6)
    assert np.all(z <= 0.0) and np.allclose(z[5:10], 0.0)
    # A series too short for a line, and background slices, are not judged by the part.
    short = np.zeros(N, dtype=bool)
    short[:7] = True
    assert np.all(detail_step_z({"detail": values}, short, cfg, None) == 0.0)
    assert detail_step_residuals({"detail": values}, short, cfg) is None
    with pytest.raises(ValueError, match="detail"):
        detail_step_z({"log_likelihood": values}, fg, cfg, None)
    with pytest.raises(ValueError, match="no detail step part"):
        detail_step_residuals({"detail": values}, fg, replace(cfg, detail_step=None))


def test_z_uses_the_spread_at_the_slice_position_when_the_stack_is_referenced() -> None:
    cfg = replace(_config(profiles={"axial": ((0.0, 0.0), (0.25, 1.0))}, positioned=True),
                  position_bins=2, position_min_extent_mm={"axial": 100.0})
    values = np.zeros(20)
    values[[3, 16]] = -1.0  # one low slice in each half
    comp, fg = {"detail": values}, np.ones(20, dtype=bool)
    res = series_trend_residuals(values, fg, tukey_c_high=2.5)
    z = detail_step_z(comp, fg, cfg, "axial", slice_spacing_mm=6.0)  # 120 mm: referenced
    assert z[3] == pytest.approx((res[3] - 0.1) / 0.25) and z[16] == pytest.approx(res[16] - 0.1)
    # Descending: the halves swap.
    zd = detail_step_z(comp, fg, cfg, "axial", descending=True, slice_spacing_mm=6.0)
    assert zd[3] == pytest.approx(res[3] - 0.1) and zd[16] == pytest.approx((res[16] - 0.1) / 0.25)
    # Too short a span, no spacing, or another plane: the overall spread.
    for plane, gap in (("axial", 2.0), ("axial", None), ("coronal", 6.0)):
        zz = detail_step_z(comp, fg, cfg, plane, slice_spacing_mm=gap)
        assert zz[3] == pytest.approx((res[3] - 0.1) / 0.5)
    # Not positioned: one spread everywhere, though the stack is referenced.
    flat = replace(cfg, detail_step=replace(cfg.detail_step, positioned=False))
    zf = detail_step_z(comp, fg, flat, "axial", slice_spacing_mm=6.0)
    assert zf[3] == pytest.approx((res[3] - 0.1) / 0.5)


def test_stack_scores_take_the_minimum_with_the_mapped_part() -> None:
    rng = np.random.default_rng(5)
    comp = {"log_likelihood": rng.normal(-1000, 50, N), "tail": np.zeros(N),
            "png_nats": np.zeros(N), "detail": _line(-1.0, -2.0, 0.05, seed=6)}
    comp["detail"][20:35] -= 1.0
    fg = np.ones(N, dtype=bool)
    cfg = _config()
    with_part, absolute, shift = stack_scores(comp, fg, cfg, 64, 2.0)
    plain, absolute0, shift0 = stack_scores(comp, fg, replace(cfg, detail_step=None), 64, 2.0)
    assert np.array_equal(absolute, absolute0) and shift == shift0
    mapped = -50.0 + 1000.0 * detail_step_z(comp, fg, cfg, None)
    assert np.array_equal(with_part, np.minimum(plain, mapped))
    assert np.all(with_part[20:35] < plain[20:35])  # the block is what the part lowers


def test_config_round_trip_absence_and_shared_component_settings() -> None:
    default = DetailStepPart()
    assert (default.tukey_c_high, default.positioned, default.guard_quantile) == (None, True,
                                                                                  0.02)
    assert default.guard_cut is None  # set by calibration
    cfg = _config(profiles={"axial": ((0.0, 1.0), (1.0, 1.0))})
    assert ScoreConfig.from_dict(json.loads(json.dumps(
        replace(cfg, detail_step=DetailStepPart(tukey_c_high=None)).to_dict()))
    ).detail_step == DetailStepPart(tukey_c_high=None)
    assert ScoreConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert cfg.uses_detail and not ScoreConfig().uses_detail
    assert "detail_step" not in ScoreConfig().to_dict()
    assert ScoreConfig.from_dict(ScoreConfig().to_dict()).detail_step is None
    from node.model.scoring import AlternativeScore

    alt = AlternativeScore(complexity_weight=1.0, tail_weight=0.0, max_series_shift=10.0)
    assert cfg.part(alt).detail_step is None
    # Both detail parts read one component: they must agree on how it is computed.
    assert replace(cfg, detail=DetailPart()).uses_detail
    with pytest.raises(ValueError, match="same band and erosion"):
        replace(cfg, detail=DetailPart(band=0.25))


def test_calibrate_adds_the_detail_step_part(tmp_path: Path) -> None:
    if not IXI.is_dir():
        pytest.skip(f"IXI data not found at {IXI}")
    out = tmp_path / "step"
    proc = _calibrate_shipped(out, "--detail-step", "default")
    assert proc.returncode == 0, proc.stderr
    bundle = load_bundle(out)
    part = bundle.scoring.detail_step
    assert part is not None and part.spread > 0 and part.gain > 0
    assert (part.tukey_c_high, part.positioned, part.guard_quantile) == (None, True, 0.02)
    assert set(part.profiles) == {"axial", "coronal", "sagittal"}
    assert all(min(spreads) > 0 for _med, spreads in part.profiles.values())
    assert bundle.scoring.detail is None  # the part needs no item 7

    # The level and spread are those of the calibration stacks' residuals from their lines.
    vols = [load_nifti(next(IXI.glob(f"{s}-*.nii.gz")))
            for s in bundle.meta["training"]["subjects"]["calibration"][:3]]
    stacks = stack_components(bundle, vols, ("axial", "coronal", "sagittal"))
    assert all("detail" in st["components"] for st in stacks)
    # The guard's cut: the 2nd percentile of the other parts' minimum on these slices.
    without = replace(bundle.scoring, detail_step=None, position_bins=0)
    others = [stack_scores(st["components"], st["foreground"], without,
                           bundle.modelled_values, bundle.preprocess.clip_max)[0]
              for st in stacks]
    assert part.guard_cut == pytest.approx(float(np.quantile(np.concatenate(
        [o[st["foreground"]] for o, st in zip(others, stacks, strict=True)]), 0.02)))
    res = [detail_step_residuals(st["components"], st["foreground"], bundle.scoring, o)
           for st, o in zip(stacks, others, strict=True)]
    normal = np.concatenate([r[st["foreground"]] for r, st in zip(res, stacks, strict=True)
                             if r is not None])
    assert (part.level, part.spread) == pytest.approx(robust_level(normal))
    values = np.concatenate([detail_step_z(st["components"], st["foreground"], bundle.scoring,
                                           st["plane"], st["descending"],
                                           st["slice_spacing_mm"], o)[st["foreground"]]
                             for st, o in zip(stacks, others, strict=True)])
    assert np.all(values <= 0.0) and np.mean(values < 0.0) > 0.3

    # Recalibrating keeps it; other settings (the first candidate of node/models/README.md:
    # no guard) and 'none' replace it.
    again = tmp_path / "again"
    assert _calibrate_shipped(again, model=out).returncode == 0
    kept = load_bundle(again).scoring.detail_step
    assert kept is not None and kept.spread == pytest.approx(part.spread)
    first = tmp_path / "first"
    proc = _calibrate_shipped(first, "--detail-step",
                              "tukey_c_high=2.5,positioned=false,guard_quantile=0", model=out)
    assert proc.returncode == 0, proc.stderr
    asym = load_bundle(first).scoring.detail_step
    assert asym is not None and (asym.tukey_c_high, asym.positioned) == (2.5, False)
    assert (asym.guard_quantile, asym.guard_cut, asym.profiles) == (None, None, {})
    gone = tmp_path / "gone"
    assert _calibrate_shipped(gone, "--detail-step", "none", model=out).returncode == 0
    assert "detail_step" not in json.loads((gone / "model.json").read_text())["scoring"]


def test_calibrate_refuses_a_detail_step_part_that_cannot_vary(tiny_bundle_path: Path,
                                                               tmp_path: Path) -> None:
    proc = _calibrate(tiny_bundle_path, tmp_path / "x", "--detail-step", "default")
    assert proc.returncode == 1
    assert "does not vary" in proc.stderr
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("value", ["on", "tukey_c=-1", "positioned=maybe", "tukey_c_high=x",
                                   "band=0.25", "guard_quantile=1"])
def test_calibrate_rejects_bad_detail_step_settings(tiny_bundle_path: Path, tmp_path: Path,
                                                    value: str) -> None:
    proc = _calibrate(tiny_bundle_path, tmp_path / "x", "--detail-step", value)
    assert proc.returncode == 2
    assert "--detail-step" in proc.stderr
    assert not (tmp_path / "x").exists()
