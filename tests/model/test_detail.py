"""The detail part: the finest-detail power of the decoder's standardized residual, added to the
main score (node.model.scoring, item 7), and bundles without it scoring as before."""

from __future__ import annotations

import json
import subprocess
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from node.model.bundle import default_bundle_path, load_bundle
from node.model.data import load_nifti
from node.model.likelihood import detail_log_power, estimate
from node.model.scoring import (
    DetailPart,
    ScoreConfig,
    absolute_score,
    detail_shifted,
    detail_z,
    series_shift,
    stack_scores,
)
from node.model.train import stack_components
from tests.helpers.tiny_bundle import IXI
from tests.model.test_background import _calibrate


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = int(3 * sigma) + 1
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = (k / k.sum()).view(1, 1, 1, -1)
    x = F.conv2d(x, k, padding=(0, radius))
    return F.conv2d(x, k.transpose(-1, -2), padding=(radius, 0))


def test_detail_of_a_white_residual_is_what_the_likelihood_expects() -> None:
    # Head = the whole grid (decoder mean 1 everywhere), unit-variance white residual: the
    # Gaussian's expectation E|R_f|^2 = n in every band, log 1 = 0.
    gen = torch.Generator().manual_seed(0)
    mean = torch.ones(4, 1, 128, 128)
    log_sigma = torch.full_like(mean, -2.0)
    noise = torch.randn(mean.shape, generator=gen)
    x = mean + noise * torch.exp(log_sigma)
    white = detail_log_power(x, mean, log_sigma, erosion=0)
    assert torch.allclose(white, torch.zeros(4), atol=0.05)
    # The same residual blurred by 1 px: its top band nearly empties, so far below 0 ...
    blurred = mean + _blur(noise, 1.0) * torch.exp(log_sigma)
    low = detail_log_power(blurred, mean, log_sigma, erosion=0)
    assert (low < -3.0).all()
    # ... though the Gaussian likelihood of the blurred slice is HIGHER (smaller residuals):
    # the failure the part is there for.
    assert float((_blur(noise, 1.0) ** 2).sum()) < float((noise**2).sum())
    # Twice the residual: log 4 higher (scale is seen, not divided out).
    double = detail_log_power(mean + 2 * noise * torch.exp(log_sigma), mean, log_sigma,
                              erosion=0)
    assert torch.allclose(double - white, torch.full((4,), float(np.log(4.0))), atol=1e-4)


def test_detail_takes_only_the_eroded_head() -> None:
    mean = torch.zeros(1, 1, 32, 32)
    mean[..., 8:24, 8:24] = 1.0  # a 16 x 16 head
    log_sigma = torch.zeros_like(mean)
    gen = torch.Generator().manual_seed(1)
    # Residual only on the head's 2-pixel rim: eroded by 2, the head sees none of it.
    rim = torch.zeros_like(mean)
    rim[..., 8:24, 8:24] = 1.0
    rim[..., 10:22, 10:22] = 0.0
    x = mean + rim * torch.randn(mean.shape, generator=gen)
    assert float(detail_log_power(x, mean, log_sigma, erosion=2)) < -50.0  # log(1e-30)
    assert float(detail_log_power(x, mean, log_sigma, erosion=0)) > -5.0
    # No head at all: 0.0, the likelihood's expectation (no evidence either way).
    empty = torch.zeros(2, 1, 32, 32)
    assert torch.equal(detail_log_power(empty + 0.5, empty, log_sigma.expand(2, 1, 32, 32)),
                       torch.zeros(2))


class _Decoder(torch.nn.Module):
    """A fixed linear model of 8 x 8 images, for estimate()."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(2)
        self.w = torch.randn(4, 64, generator=gen) * 0.3

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu = x.flatten(1) @ self.w.T / 64
        return mu, torch.full_like(mu, -1.0)

    def decode(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = (z @ self.w).view(-1, 1, 8, 8) + 0.5
        return mean, torch.full_like(mean, -1.5)


def test_estimate_reports_the_detail_at_the_posterior_mean() -> None:
    model = _Decoder()
    x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    est = estimate(model, x, samples=4, generator=torch.Generator().manual_seed(4),
                   detail_erosion=1, detail_band=0.25)
    mean, log_sigma = model.decode(model.encode(x)[0])
    assert torch.allclose(est.detail, detail_log_power(x, mean, log_sigma, 0.1, 1, 0.25))


def _config(**detail: float) -> ScoreConfig:
    part = DetailPart(**{"shift_quantile": 0.5, "max_series_shift": 1.0, "weight": 100.0,
                         "level": 0.0, "spread": 0.5, **detail})
    return ScoreConfig(complexity=False, series_relative=True, min_series_slices=8,
                       max_series_shift=0.0, detail=part)


def test_the_series_shift_only_lifts() -> None:
    cfg = _config()
    fg = np.ones(30, dtype=bool)
    # A series below the normal reference is lifted, at most by the cap ...
    assert np.allclose(detail_shifted({"detail": np.full(30, -0.4)}, fg, cfg), 0.0)
    assert np.allclose(detail_shifted({"detail": np.full(30, -3.0)}, fg, cfg), -2.0)
    # ... one above it stays where it is ...
    assert np.allclose(detail_shifted({"detail": np.full(30, 0.7)}, fg, cfg), 0.7)
    # ... so a block that raises the detail (spikes, noise) leaves the rest at its level,
    # and a blurred block stands out against its own series.
    raised = np.r_[np.zeros(18), np.full(12, 2.0)]
    assert np.allclose(detail_shifted({"detail": raised}, fg, cfg), raised)
    blurred = np.r_[np.full(20, -0.2), np.full(10, -1.5)]
    out = detail_shifted({"detail": blurred}, fg, cfg)
    assert np.allclose(out[:20], 0.0) and np.allclose(out[20:], -1.3)
    # Too few slices for a series level: no shift.
    few = np.ones(30, dtype=bool)
    few[7:] = False
    assert np.allclose(detail_shifted({"detail": np.full(30, -0.4)}, few, cfg), -0.4)
    with pytest.raises(ValueError, match="detail"):
        detail_shifted({"log_likelihood": np.zeros(30)}, fg, cfg)


def test_z_against_the_position_profile_or_all_normal_slices() -> None:
    cfg = replace(_config(profiles={"axial": ((0.0, -1.0), (1.0, 2.0))}, max_series_shift=0.0),
                  position_bins=2, position_min_extent_mm={"axial": 40.0})
    values = np.r_[np.full(10, 0.5), np.full(10, -2.0)]
    fg = np.ones(20, dtype=bool)
    comp = {"detail": values}
    z = detail_z(comp, fg, cfg, "axial", slice_spacing_mm=3.0)  # 60 mm: referenced
    assert np.allclose(z[:10], 0.5) and np.allclose(z[10:], -0.5)
    # Descending stacks are read in the plane's direction.
    zd = detail_z(comp, fg, cfg, "axial", descending=True, slice_spacing_mm=3.0)
    assert np.allclose(zd[:10], (0.5 + 1.0) / 2.0) and np.allclose(zd[10:], -2.0)
    # Unknown plane, too short a span, or no spacing: against all normal slices.
    for plane, gap in (("coronal", 3.0), ("axial", 1.0), ("axial", None)):
        assert np.allclose(detail_z(comp, fg, cfg, plane, slice_spacing_mm=gap), values / 0.5)


def test_stack_scores_add_the_weighted_z_to_the_main_score() -> None:
    rng = np.random.default_rng(5)
    comp = {"log_likelihood": rng.normal(-1000, 50, 24), "tail": np.zeros(24),
            "png_nats": np.zeros(24), "detail": rng.normal(0, 0.3, 24)}
    fg = np.ones(24, dtype=bool)
    cfg = _config()
    without = replace(cfg, detail=None)
    with_part, absolute, shift = stack_scores(comp, fg, cfg, 64, 2.0)
    plain, absolute0, shift0 = stack_scores(comp, fg, without, 64, 2.0)
    assert np.array_equal(absolute, absolute0) and shift == shift0
    assert shift == series_shift(absolute, fg, cfg)
    z = detail_z(comp, fg, cfg, None)
    assert np.allclose(with_part - plain, 100.0 * z)


def test_config_round_trip_and_absence() -> None:
    cfg = _config(profiles={"axial": ((0.0, 1.0), (1.0, 1.0))})
    data = json.loads(json.dumps(cfg.to_dict()))
    assert ScoreConfig.from_dict(data) == cfg
    assert "detail" not in ScoreConfig().to_dict()
    assert ScoreConfig.from_dict(ScoreConfig().to_dict()).detail is None
    assert cfg.part(cfg.alternatives[0] if cfg.alternatives else _alt()).detail is None


def _alt():  # an alternative weighting, for ScoreConfig.part
    from node.model.scoring import AlternativeScore

    return AlternativeScore(complexity_weight=1.0, tail_weight=0.0, max_series_shift=10.0)


def _calibrate_shipped(out: Path, *extra: str, model: Path | None = None,
                       ) -> subprocess.CompletedProcess[str]:
    """``vaenode calibrate`` of the shipped bundle (or ``model``, one made from it) on three of
    its calibration subjects (the tiny test bundle's decoder never draws a head, so it has no
    detail to calibrate)."""
    ids = load_bundle().meta["training"]["subjects"]["calibration"][:3]
    return _calibrate(model or default_bundle_path(), out, *extra,
                      data=[next(IXI.glob(f"{s}-*.nii.gz")) for s in ids])


def test_calibrate_adds_the_detail_part_and_holds_the_rate(tmp_path: Path) -> None:
    if not IXI.is_dir():
        pytest.skip(f"IXI data not found at {IXI}")
    out = tmp_path / "detail"
    proc = _calibrate_shipped(out, "--detail-part", "0.5", "--detail-weight", "0.5")
    assert proc.returncode == 0, proc.stderr
    bundle = load_bundle(out)
    part = bundle.scoring.detail
    assert part is not None and (part.shift_quantile, part.weight_spreads) == (0.5, 0.5)
    assert part.max_series_shift > 0 and part.weight > 0 and part.spread > 0
    assert set(part.profiles) == {"axial", "coronal", "sagittal"}
    recal = bundle.meta["training"]["recalibrations"][-1]
    fitted = recal["detail_cap"]
    assert fitted["fitted"] == pytest.approx(1.25 * max(fitted["site_variant_needs"].values()))
    assert part.max_series_shift == fitted["fitted"]
    # The normal site variants: the smoother scanner needs the largest lift.
    needs = fitted["site_variant_needs"]
    assert max(needs, key=needs.get) == "smoother"

    # The calibrated values are what item 7 says, on the same stacks calibration scores.
    vols = [load_nifti(next(IXI.glob(f"{s}-*.nii.gz")))
            for s in bundle.meta["training"]["subjects"]["calibration"][:3]]
    stacks = stack_components(bundle, vols, ("axial", "coronal", "sagittal"))
    mains, detail = [], []
    for st in stacks:
        fg = st["foreground"]
        absolute = absolute_score(st["components"], bundle.scoring, bundle.modelled_values,
                                  bundle.preprocess.clip_max)
        mains.append((absolute - series_shift(absolute, fg, bundle.scoring))[fg])
        detail.append(detail_shifted(st["components"], fg, bundle.scoring)[fg])
    med, q05 = np.quantile(np.concatenate(mains), [0.5, 0.05])
    assert part.weight == pytest.approx(0.5 * (med - q05), rel=1e-6)
    assert part.reference_median == pytest.approx(float(np.median(
        [np.quantile(st["components"]["detail"][st["foreground"]], 0.5) for st in stacks])))
    med, q05 = np.quantile(np.concatenate(detail), [0.5, 0.05])
    assert (part.level, part.spread) == pytest.approx((med, med - q05))

    # Recalibrating (other changes, or none) keeps the part, its settings and its cap.
    again = tmp_path / "again"
    assert _calibrate_shipped(again, model=out).returncode == 0
    kept = load_bundle(again).scoring.detail
    assert kept is not None
    assert (kept.max_series_shift, kept.weight_spreads) == (part.max_series_shift, 0.5)
    assert kept.weight == pytest.approx(part.weight)


def test_calibrate_refuses_a_detail_part_that_cannot_vary(tiny_bundle_path: Path,
                                                          tmp_path: Path) -> None:
    proc = _calibrate(tiny_bundle_path, tmp_path / "x", "--detail-part", "0.5")
    assert proc.returncode == 1
    assert "does not vary" in proc.stderr
    assert not (tmp_path / "x").exists()
    # Removing it needs no detail: the tiny bundle calibrates without one.
    proc = _calibrate(tiny_bundle_path, tmp_path / "y", "--detail-part", "none")
    assert proc.returncode == 0, proc.stderr
    assert "detail" not in json.loads((tmp_path / "y" / "model.json").read_text())["scoring"]


@pytest.mark.parametrize("args", [("--detail-part", "0"),
                                  ("--detail-part", "sharp"),
                                  ("--detail-cap", "0.5"),
                                  ("--detail-weight", "1"),
                                  ("--detail-part", "none", "--detail-weight", "1")])
def test_calibrate_rejects_a_bad_detail_option(tiny_bundle_path: Path, tmp_path: Path,
                                               args: tuple[str, ...]) -> None:
    proc = _calibrate(tiny_bundle_path, tmp_path / "x", *args)
    assert proc.returncode == 2
    assert "--detail-" in proc.stderr
    assert not (tmp_path / "x").exists()
