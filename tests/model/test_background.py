"""The background part: the decoder's log-likelihood outside the head, or its residual term
alone, a fourth part of the minimum (node.model.scoring, item 6), and bundles without it scoring
as before."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from node.errors import ModelError
from node.model.bundle import load_bundle, save_bundle
from node.model.data import load_nifti, plane_slices
from node.model.likelihood import background_statistics, estimate
from node.model.scoring import (
    BackgroundPart,
    ScoreConfig,
    absolute_score,
    background_final,
    match_scales,
    series_shift,
    stack_scores,
)
from node.model.train import fit_site_cap
from tests.helpers.tiny_bundle import IXI, SUBJECTS, calibrate_cli, calibration_axial_scores

REPO = Path(__file__).resolve().parents[2]
LOG_2PI = math.log(2 * math.pi)


def test_background_statistic_on_a_known_mask() -> None:
    # Decoder mean: a 6 x 6 head (value 1) in a 16 x 16 grid; dilated by 1 px it covers
    # rows/cols 4..11 (8 x 8 = 64 pixels), leaving 256 - 64 = 192 background pixels.
    mean = torch.zeros(1, 1, 16, 16)
    mean[..., 5:11, 5:11] = 1.0
    log_sigma = torch.full_like(mean, math.log(0.5))
    x = mean.clone()
    x[..., 0, :] = 1.0  # a bright row in the background: r = 2 there
    x[..., 7, 7] = 50.0  # inside the head: must not count
    got = float(background_statistics(x, mean, log_sigma, level=0.1, dilation=1).background)
    per_pixel = -math.log(0.5) - 0.5 * LOG_2PI
    expected = per_pixel + (-0.5 * 4.0 * 16) / 192  # 16 pixels of the top row have r = 2
    assert got == pytest.approx(expected, rel=1e-6)

    # The mask comes from the decoder mean, not the image: a ghost does not move it.
    ghost = x.clone()
    ghost[..., 2, 2:14] = 1.0
    at_ghost = background_statistics(ghost, mean, log_sigma, level=0.1, dilation=1)
    lower = float(at_ghost.background)
    assert lower == pytest.approx(expected + (-0.5 * 4.0 * 12) / 192, rel=1e-6)
    # The residual term alone: the same pixels without -log sigma - 0.5 log 2 pi.
    residual = float(at_ghost.background_residual)
    assert residual == pytest.approx(-0.5 * 4.0 * (16 + 12) / 192, rel=1e-6)
    # Each pixel's 0.5 r^2 is capped at 12.5: one bright pixel (r = 40) counts 12.5, not 800.
    bright = ghost.clone()
    bright[..., 15, 15] = 20.0
    capped = float(background_statistics(bright, mean, log_sigma, level=0.1, dilation=1
                                         ).background_residual)
    assert capped == pytest.approx(-(0.5 * 4.0 * (16 + 12) + 12.5) / 192, rel=1e-6)

    # Without dilation the background is 256 - 36 pixels; with no background at all: 0.0.
    undilated = float(background_statistics(mean, mean, log_sigma, level=0.1, dilation=0
                                            ).background)
    assert undilated == pytest.approx(per_pixel, rel=1e-6)
    full = torch.ones(2, 1, 8, 8)
    assert background_statistics(full, full, log_sigma[..., :8, :8].expand(2, 1, 8, 8)
                                 ).background.tolist() == [0.0, 0.0]


class _Linear:
    """A fixed decoder: mean = a square head whose brightness is z[0]; sigma 0.2."""

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu = x[:, :, 4:8, 4:8].mean(dim=(1, 2, 3)).unsqueeze(1).repeat(1, 2)
        return mu, torch.full_like(mu, -2.0)

    def decode(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = torch.zeros(z.shape[0], 1, 12, 12)
        mean[:, :, 4:8, 4:8] = z[:, :1, None, None]
        return mean, torch.full_like(mean, math.log(0.2))


def test_estimate_gives_the_background_at_the_posterior_mean() -> None:
    x = torch.zeros(3, 1, 12, 12)
    x[:, :, 4:8, 4:8] = 1.0
    x[1, :, 0, :] = 0.4  # a ghost row in slice 1's background
    est = estimate(_Linear(), x, "importance", 4, generator=torch.Generator().manual_seed(0))
    mean, log_sigma = _Linear().decode(_Linear().encode(x)[0])
    expected = background_statistics(x, mean, log_sigma)
    assert torch.allclose(est.background, expected.background)
    assert est.background[1] < est.background[0] == est.background[2]
    assert torch.allclose(est.background_residual, expected.background_residual)
    assert est.background_residual[1] < est.background_residual[0] == 0.0
    # The statistic draws nothing: the Monte-Carlo outputs do not depend on its settings.
    other = estimate(_Linear(), x, "importance", 4, generator=torch.Generator().manual_seed(0),
                     background_level=0.5, background_dilation=0)
    for key in ("log_likelihood", "kl", "elbo", "tail", "rec_error", "plain"):
        assert torch.equal(getattr(est, key), getattr(other, key))


def _components(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"log_likelihood": rng.normal(-1000, 50, n), "png_nats": rng.normal(800, 40, n),
            "tail": rng.normal(3, 0.5, n), "background": rng.normal(2.0, 0.05, n)}


def test_background_part_joins_the_minimum() -> None:
    comp = _components(40)
    fg = np.ones(40, dtype=bool)
    main_cfg = ScoreConfig(complexity=True, complexity_weight=0.5, tail_weight=4.0,
                           max_series_shift=30.0, reference_median=5.0)
    main = absolute_score(comp, main_cfg, 100, 2.0)
    shift = series_shift(main, fg, main_cfg)
    bg_shift = float(np.clip(np.quantile(comp["background"], 0.75) - 2.01, -0.02, 0.02))
    bg_final = comp["background"] - bg_shift
    gain, offset = match_scales(main - shift, bg_final)
    part = BackgroundPart(shift_quantile=0.75, max_series_shift=0.02, reference_median=2.01,
                          gain=gain, offset=offset)
    cfg = replace(main_cfg, background=part)
    assert np.allclose(background_final(comp, fg, cfg), bg_final)

    final, absolute, got_shift = stack_scores(comp, fg, cfg, 100, 2.0)
    assert np.allclose(absolute, main) and got_shift == shift
    assert np.allclose(final, np.minimum(main - shift, offset + gain * bg_final))
    assert 0 < np.sum(np.isclose(final, main - shift)) < 40
    # Without the part, the background component is ignored.
    assert np.array_equal(stack_scores(comp, fg, main_cfg, 100, 2.0)[0], main - shift)
    # Records scored before the part existed are refused with a clear message.
    with pytest.raises(ValueError, match="background"):
        stack_scores({k: v for k, v in comp.items() if k != "background"}, fg, cfg, 100, 2.0)


def test_a_residual_part_reads_the_residual_component() -> None:
    comp = _components(40)
    comp["background_residual"] = np.random.default_rng(1).normal(-0.6, 0.1, 40)
    fg = np.ones(40, dtype=bool)
    part = BackgroundPart(statistic="residual", gain=2e3, offset=-500.0)
    cfg = ScoreConfig(background=part)
    assert part.component == "background_residual"
    assert np.array_equal(background_final(comp, fg, cfg), comp["background_residual"])
    main = absolute_score(comp, cfg, 100, 2.0)
    final = stack_scores(comp, fg, cfg, 100, 2.0)[0]
    assert np.allclose(final, np.minimum(main, -500.0 + 2e3 * comp["background_residual"]))
    # Records scored before the residual component existed are refused, naming it.
    with pytest.raises(ValueError, match="background_residual"):
        stack_scores({k: v for k, v in comp.items() if k != "background_residual"}, fg, cfg,
                     100, 2.0)
    # model.json names the statistic (the log-likelihood, the default, stays unnamed).
    data = json.loads(json.dumps(cfg.to_dict()))
    assert data["background"]["statistic"] == "residual"
    assert ScoreConfig.from_dict(data) == cfg
    assert "statistic" not in ScoreConfig(background=BackgroundPart()).to_dict()["background"]
    with pytest.raises(ValueError, match="unknown background statistic"):
        BackgroundPart(statistic="sigma")


def test_background_part_survives_model_json() -> None:
    cfg = ScoreConfig(background=BackgroundPart(shift_quantile=0.75, max_series_shift=0.3,
                                                reference_median=3.4, gain=9e4, offset=-3e5))
    data = json.loads(json.dumps(cfg.to_dict()))
    assert data["background"]["dilation"] == 1 and data["background"]["head_level"] == 0.1
    assert ScoreConfig.from_dict(data) == cfg
    # A part of its own (an alternative's stand-alone settings) carries no background.
    from node.model.scoring import AlternativeScore

    alt = cfg.part(AlternativeScore(complexity_weight=1.0, tail_weight=0.0,
                                    max_series_shift=5.0))
    assert alt.background is None


def test_model_json_without_the_part_round_trips_unchanged(tiny_bundle_path: Path,
                                                           tmp_path: Path) -> None:
    scoring = json.loads((tiny_bundle_path / "model.json").read_text())["scoring"]
    assert "background" not in scoring
    cfg = ScoreConfig.from_dict(scoring)
    assert cfg.background is None
    assert json.loads(json.dumps(cfg.to_dict())) == scoring
    # The shipped bundle has the part; its entry round-trips too.
    shipped = json.loads((REPO / "node" / "models" / "brain-t1" / "model.json").read_text())
    cfg = ScoreConfig.from_dict(shipped["scoring"])
    assert cfg.background is not None and cfg.background.gain > 0
    assert json.loads(json.dumps(cfg.to_dict())) == shipped["scoring"]

    # Loading and saving an old bundle writes the same scoring entry, and it scores the same
    # with or without the background component present.
    bundle = load_bundle(tiny_bundle_path)
    out = save_bundle(tmp_path / "copy", bundle.model, bundle.meta)
    assert (json.loads((out / "model.json").read_text())["scoring"]
            == json.loads((tiny_bundle_path / "model.json").read_text())["scoring"])
    images, spacing = plane_slices(load_nifti(IXI / SUBJECTS[0]), "axial")
    x, fg = bundle.preprocess_stack(list(images), [spacing] * len(images))
    comp = bundle.components(x, device="cpu")
    assert "background" in comp
    without = {k: v for k, v in comp.items() if k != "background"}
    args = (fg, bundle.scoring, bundle.modelled_values, bundle.preprocess.clip_max)
    for a, b in zip(stack_scores(comp, *args), stack_scores(without, *args), strict=True):
        assert np.array_equal(a, b)
    # The cheap pass gives the same values as the full scoring pass.
    cheap = bundle.background_values(x, background_level=0.1, background_dilation=1,
                                     device="cpu")
    assert np.allclose(cheap, comp["background"])
    residual = bundle.background_values(x, component="background_residual",
                                        background_level=0.1, background_dilation=1,
                                        device="cpu")
    assert np.allclose(residual, comp["background_residual"])
    assert not np.allclose(residual, cheap)
    with pytest.raises(ModelError, match="unknown background component 'tail'"):
        bundle.background_values(x, component="tail", device="cpu")


def test_the_site_cap_is_fitted_on_the_parts_own_component(tiny_bundle_path: Path) -> None:
    bundle = load_bundle(tiny_bundle_path)
    volumes = [load_nifti(IXI / SUBJECTS[0])]
    fits = {c: fit_site_cap(bundle, volumes, 0.75, component=c)
            for c in ("background", "background_residual")}
    for fitted in fits.values():
        assert fitted["cap"] == pytest.approx(1.25 * max(fitted["needs"].values()))
        assert fitted["cap"] > 0
    # The residual leaves out the decoder's -log sigma, so its distances differ.
    assert fits["background"]["needs"] != fits["background_residual"]["needs"]


def test_calibrate_adds_the_background_part_and_holds_the_rate(tiny_bundle_path: Path,
                                                               tmp_path: Path) -> None:
    out = tmp_path / "bg"
    proc = calibrate_cli(tiny_bundle_path, out, "--background-part", "0.75")
    assert proc.returncode == 0, proc.stderr
    bundle = load_bundle(out)
    part = bundle.scoring.background
    assert part is not None and part.shift_quantile == 0.75
    assert part.max_series_shift > 0 and part.gain > 0 and part.reference_median != 0.0
    recal = bundle.meta["training"]["recalibrations"][-1]
    assert recal["changes"]["background"]["max_series_shift"] == part.max_series_shift
    fitted = recal["background_cap"]
    assert fitted["fitted"] == pytest.approx(1.25 * max(fitted["site_variant_needs"].values()))
    assert set(fitted["site_variant_needs"]) == {"original", "gamma0.75", "gamma1.33",
                                                 "smoother", "noisier"}
    assert "--background-part 0.75" in recal["command"]

    # The threshold holds its rate on the calibration slices, whose scores are the minimum.
    finals, mains, backgrounds = [], [], []
    for scores in calibration_axial_scores(bundle):
        fg = scores.foreground
        finals.append(scores.log_likelihood[fg])
        mains.append((scores.extra["absolute"] - scores.series_shift)[fg])
        bg = background_final(scores.extra, fg, bundle.scoring)
        backgrounds.append((part.offset + part.gain * bg)[fg])
    final, main, background = (np.concatenate(v) for v in (finals, mains, backgrounds))
    assert final.size >= 50
    assert np.allclose(final, np.minimum(main, background))
    assert np.mean(final < bundle.threshold) <= bundle.target_fpr + 1.0 / final.size
    # Mapped onto the main score's scale: 1st percentile and median matched.
    assert np.quantile(background, [0.01, 0.5]) == pytest.approx(np.quantile(main, [0.01, 0.5]))

    # A given cap is kept; recalibrating keeps the part; 'none' removes it.
    capped = tmp_path / "capped"
    assert calibrate_cli(out, capped, "--background-part", "0.5", "--background-cap",
                         "0.25", "--background-statistic", "residual").returncode == 0
    got = load_bundle(capped).scoring.background
    assert got is not None and (got.shift_quantile, got.max_series_shift) == (0.5, 0.25)
    assert got.statistic == "residual" and got.gain > 0 and got.gain != part.gain
    again = tmp_path / "again"
    assert calibrate_cli(capped, again).returncode == 0
    kept = load_bundle(again).scoring.background
    assert kept.max_series_shift == 0.25 and kept.statistic == "residual"
    plain = tmp_path / "plain"
    assert calibrate_cli(again, plain, "--background-part", "none").returncode == 0
    assert load_bundle(plain).scoring.background is None
    assert "background" not in json.loads((plain / "model.json").read_text())["scoring"]


def test_a_background_rate_sets_the_share_the_part_alone_flags(tiny_bundle_path: Path,
                                                             tmp_path: Path) -> None:
    out = tmp_path / "rate"
    proc = calibrate_cli(tiny_bundle_path, out, "--background-part", "0.75",
                         "--background-cap", "0.25", "--keep-threshold",
                         "--background-rate", "0.05")
    assert proc.returncode == 0, proc.stderr
    source, bundle = load_bundle(tiny_bundle_path), load_bundle(out)
    assert bundle.threshold == source.threshold
    part = bundle.scoring.background
    assert part is not None and part.gain > 0
    assert bundle.meta["training"]["recalibrations"][-1]["background_rate"] == 0.05
    assert bundle.meta["calibration"]["background_rate"] == 0.05
    mains, backgrounds = [], []
    for scores in calibration_axial_scores(bundle):
        fg = scores.foreground
        mains.append((scores.extra["absolute"] - scores.series_shift)[fg])
        backgrounds.append((part.offset + part.gain
                            * background_final(scores.extra, fg, bundle.scoring))[fg])
    main, background = np.concatenate(mains), np.concatenate(backgrounds)
    assert background.size >= 50
    # Its 5% quantile on the kept threshold, its median on the main score's: alone it flags
    # 5% of the calibration slices.
    assert np.quantile(background, 0.05) == pytest.approx(bundle.threshold)
    assert np.median(background) == pytest.approx(np.median(main))
    assert abs(np.mean(background < bundle.threshold) - 0.05) <= 1.0 / background.size
    # Without a background part there is nothing to map: an error, nothing written.
    proc = calibrate_cli(tiny_bundle_path, tmp_path / "none", "--keep-threshold",
                         "--background-rate", "0.05")
    assert proc.returncode == 1 and "background part" in proc.stderr
    assert not (tmp_path / "none").exists()


@pytest.mark.parametrize("args", [("--background-part", "0.75", "--background-rate", "0.05"),
                                  ("--background-part", "0.75", "--keep-threshold",
                                   "--background-rate", "2"),
                                  ("--background-part", "1.5"),
                                  ("--background-part", "high"),
                                  ("--background-cap", "0.2"),
                                  ("--background-statistic", "residual"),
                                  ("--background-part", "0.75", "--background-statistic",
                                   "sigma")])
def test_calibrate_rejects_a_bad_background_option(tiny_bundle_path: Path, tmp_path: Path,
                                                   args: tuple[str, ...]) -> None:
    proc = calibrate_cli(tiny_bundle_path, tmp_path / "x", *args)
    assert proc.returncode == 2
    assert "--background-" in proc.stderr
    assert not (tmp_path / "x").exists()
