"""Scanner variation in training (node/model/augment.py), simulated sites (node/model/sites.py),
the site sweep of ``vaenode evaluate --sites`` and head centring in preprocessing."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from node.model.artifacts import corrupt_volume
from node.model.augment import (
    AugmentConfig,
    fov_edges,
    gaussian_blur,
    scanner_variation,
    tone_curve,
    truncate_kspace,
)
from node.model.bundle import load_bundle
from node.model.data import Volume, load_nifti, plane_slices
from node.model.preprocess import PreprocessConfig, preprocess_stack
from node.model.site_sweep import UNCHANGED, SweepConfig, sweep, with_artifact, write_sweep
from node.model.sites import (
    CONTRAST_FLOOR,
    CONTRAST_FULL,
    SITES,
    STRENGTHS,
    contrast_curve,
    render,
    site_by_name,
)
from tests.helpers.tiny_bundle import IXI


def _phantom(n: int = 6, size: int = 64) -> torch.Tensor:
    """A bright disc with a darker core on black: a head-like slice, n copies."""
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    r = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2).sqrt()
    img = (r < size / 3).float() * 0.8 + (r < size / 6).float() * 0.4
    return img.expand(n, 1, size, size).clone()


def _high_frequency_power(x: torch.Tensor) -> float:
    lap = 4 * x[..., 1:-1, 1:-1] - x[..., :-2, 1:-1] - x[..., 2:, 1:-1] - x[..., 1:-1, :-2] \
        - x[..., 1:-1, 2:]
    return float(lap.pow(2).mean())


def test_blur_and_truncation_take_away_fine_detail() -> None:
    x = _phantom()
    sharp = _high_frequency_power(x)
    assert _high_frequency_power(gaussian_blur(x, torch.full((6,), 1.0))) < 0.5 * sharp
    assert _high_frequency_power(truncate_kspace(x, torch.full((6,), 0.5))) < sharp
    # sigma 0 and the whole of k-space change nothing
    assert torch.allclose(gaussian_blur(x, torch.zeros(6)), x, atol=1e-5)
    assert torch.allclose(truncate_kspace(x, torch.ones(6)), x, atol=1e-5)


def test_tone_curve_is_monotone_and_keeps_the_ends() -> None:
    gen = torch.Generator().manual_seed(3)
    ramp = torch.linspace(0, 1, 101).view(1, 1, 1, 101).expand(20, 1, 1, 101).clone()
    out = tone_curve(ramp, 0.08, gen)
    assert (out[..., 1:] - out[..., :-1] >= -1e-6).all()
    assert torch.allclose(out[..., 0], torch.zeros(1)) and torch.allclose(out[..., -1],
                                                                           torch.ones(1))
    assert not torch.allclose(out, ramp)  # the curves do move tissue contrasts


def test_fov_edges_zero_one_side_beyond_a_line() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.ones(8, 1, 64, 64)
    cut = fov_edges(x, AugmentConfig(fov_edge_px=(10.0, 10.0)), gen)
    assert (cut.flatten(1).mean(1) < 1).all()  # every slice lost a band
    centre = cut[..., 22:42, 22:42]
    assert (centre == 1).all()  # within 10 px of the centre nothing is cut


def test_scanner_variation_is_reproducible_bounded_and_varied() -> None:
    x = _phantom(16)
    nb = (x.roll(1, dims=-1), x.roll(-1, dims=-1))
    a = scanner_variation(x, AugmentConfig(), torch.Generator().manual_seed(7), 2.0, nb)
    b = scanner_variation(x, AugmentConfig(), torch.Generator().manual_seed(7), 2.0, nb)
    assert torch.equal(a, b)
    assert a.shape == x.shape and a.min() >= 0 and a.max() <= 2.0
    assert torch.equal(x, _phantom(16))  # the input is not changed
    per_slice = a.flatten(1)
    assert per_slice.std(0).mean() > 0.01  # slices differ from each other


def test_noise_is_drawn_only_up_to_its_level() -> None:
    x = torch.zeros(32, 1, 64, 64)  # air only: whatever appears is the drawn noise
    cfg = AugmentConfig(noise_p=1.0, noise_max=0.012, zero_air_p=0.0, bias_p=0.0,
                        fov_edge_p=0.0, gain=(1.0, 1.0), gamma=(1.0, 1.0), curve_p=0.0)
    out = scanner_variation(x, cfg, torch.Generator().manual_seed(1), 2.0)
    # Rician noise of sigma s in air has mean s*sqrt(pi/2); s varies smoothly up to ~1.5x.
    assert 0.0 < float(out.mean()) < 0.012 * 1.26 * 1.6


@pytest.fixture(scope="module")
def ixi_volume() -> Volume:
    return load_nifti(IXI / "IXI015-HH-1258_T1.nii.gz")


@pytest.mark.parametrize("site", [s.name for s in SITES])
def test_every_site_renders_a_plausible_volume(ixi_volume: Volume, site: str) -> None:
    for strength in STRENGTHS:
        out = render(ixi_volume, site, strength, seed=0)
        assert out.data.ndim == 3 and np.isfinite(out.data).all() and out.data.min() >= 0
        assert not np.array_equal(out.data, ixi_volume.data) or site == "head_turned"
    thick = render(ixi_volume, "thick_slices", "strong")
    assert thick.spacing[2] == pytest.approx(3 * ixi_volume.spacing[2])
    zeroed = render(ixi_volume, "zeroed_air", "strong").data
    assert (zeroed == 0).mean() > (ixi_volume.data == 0).mean()
    with pytest.raises(ValueError, match="unknown site"):
        render(ixi_volume, "nonsense", "mild")


def test_head_centring_puts_an_off_centre_head_in_the_middle() -> None:
    img = np.zeros((100, 100), np.float32)
    img[5:35, 60:90] = 1.0  # a "head" in the upper right corner
    cfg = PreprocessConfig(image_size=64, spacing_mm=2.0, center_head=True)
    x = preprocess_stack([img, img], [(2.0, 2.0)] * 2, cfg)[0, 0]
    rows, cols = np.nonzero(x.numpy() > 0.5)
    assert abs(rows.mean() - 31.5) < 1.5 and abs(cols.mean() - 31.5) < 1.5
    plain = preprocess_stack([img], [(2.0, 2.0)], PreprocessConfig(image_size=64,
                                                                   spacing_mm=2.0))[0, 0]
    rows, _ = np.nonzero(plain.numpy() > 0.5)
    assert rows.mean() < 20  # without centring the head stays where the scanner put it
    assert "center_head" not in PreprocessConfig().to_dict()  # old bundles' model.json


def test_site_sweep_reports_each_site(tiny_bundle_path: Path, tmp_path: Path,
                                      ixi_volume: Volume) -> None:
    bundle = load_bundle(tiny_bundle_path)
    cfg = SweepConfig(artifacts=("spike",), sites=("noisier", "thick_slices",
                                                   "flatter_contrast"))
    result = sweep(bundle, [ixi_volume], cfg)
    names = [(r["site"], r["strength"]) for r in result["rows"]]
    assert names == [(UNCHANGED, ""), ("noisier", "mild"), ("noisier", "strong"),
                     ("thick_slices", "mild"), ("thick_slices", "strong"),
                     ("flatter_contrast", "mild"), ("flatter_contrast", "strong")]
    for row in result["rows"]:
        assert row["clean_slices"] > 0 and 0.0 <= row["flagged"] <= 1.0
        spike = row["artifacts"]["spike"]
        assert 0.0 <= spike["auroc_matched"] <= 1.0 and 0.0 <= spike["flagged_block"] <= 1.0
    text = write_sweep(result, tmp_path)
    assert "| noisier | strong |" in text
    assert json.loads((tmp_path / "sites.json").read_text())["rows"][0]["site"] == UNCHANGED


def test_the_contrast_curve_leaves_the_noise_floor_alone() -> None:
    x = np.linspace(0.0, 1.2, 12001)
    for gamma in (0.65, 0.8, 1.25, 1.5):
        y = contrast_curve(x, gamma)
        air, tissue = x <= CONTRAST_FLOOR, x >= CONTRAST_FULL
        assert np.array_equal(y[air], x[air])  # the receiver's noise keeps its amplitude
        assert np.allclose(y[tissue], x[tissue] ** gamma)  # the tissue gets the whole curve
        assert (np.diff(y) > 0).all()  # no two intensities swap


def test_a_contrast_site_keeps_the_airs_noise(ixi_volume: Volume) -> None:
    def corner_rms(data: np.ndarray) -> float:
        corner = np.concatenate([data[:10, :10].ravel(), data[-10:, -10:].ravel()])
        return float(np.sqrt(np.mean(corner ** 2)) / np.percentile(data, 99.5))

    before = corner_rms(ixi_volume.data)
    for site in ("flatter_contrast", "steeper_contrast"):
        after = corner_rms(render(ixi_volume, site, "strong").data)
        assert after == pytest.approx(before, rel=0.1)


def test_artifacts_act_on_a_contrast_site_after_it_and_before_the_others(
    ixi_volume: Volume,
) -> None:
    def volume(data: np.ndarray) -> Volume:
        return Volume(ixi_volume.subject, data, ixi_volume.spacing, ixi_volume.source)

    spiked = corrupt_volume(ixi_volume.data, ixi_volume.spacing, "spike", "moderate", 3)
    for site, signal in (("flatter_contrast", True), ("noisier", False)):
        assert site_by_name(site).signal is signal

        def make(v: Volume, site: str = site) -> Volume:
            return render(v, site, "strong", seed=0)

        clean = make(ixi_volume)
        got = with_artifact(ixi_volume, clean, signal, make, "spike", "moderate", 3)
        after = corrupt_volume(clean.data, clean.spacing, "spike", "moderate", 3)
        before = make(volume(spiked)).data
        # The contrast is the tissue's signal: the spike hits the site's rendering. The
        # receiver's noise is added to what the spike left (the two orders differ).
        assert np.array_equal(got.data, after if signal else before)
        assert not np.allclose(after, before)
        # The sweep passes the corrupted volume it already has: the same result.
        again = with_artifact(ixi_volume, clean, signal, make, "spike", "moderate", 3,
                              corrupted=spiked)
        assert np.array_equal(again.data, got.data)


def test_plane_of_rendered_site_is_still_sliced(ixi_volume: Volume) -> None:
    thick = render(ixi_volume, "thick_slices", "mild")
    stack, spacing = plane_slices(thick, "axial")
    assert len(stack) == ixi_volume.data.shape[2] // 2 and spacing == ixi_volume.spacing[1::-1]


def test_variation_settings_change_only_what_they_name() -> None:
    cfg = AugmentConfig().with_settings(["scale=0.8,1.3", "blur_p=0.5", "slab_neighbours=3"])
    assert (cfg.scale, cfg.blur_p, cfg.slab_neighbours) == ((0.8, 1.3), 0.5, 3)
    assert cfg.rotate_deg == AugmentConfig().rotate_deg
    assert AugmentConfig.from_dict(cfg.to_dict()) == cfg
    for bad, said in [("scale=0.8", "scale takes two numbers"),
                      ("scale", "not a variation setting: 'scale'"),
                      ("zoom=1.2", "not a variation setting: 'zoom=1.2'"),
                      ("blur_p=often", "blur_p takes float, not 'often'")]:
        with pytest.raises(ValueError, match=re.escape(said)):
            AugmentConfig().with_settings([bad])
