"""The default model shipped in node/models/: small, attributed, reproducible, sane."""

from __future__ import annotations

import numpy as np
import pytest

from node.model.bundle import default_bundle_path, load_bundle
from node.model.data import load_nifti, plane_slices, slice_spacing
from tests.helpers.tiny_bundle import IXI


def test_shipped_bundle_loads_and_is_small() -> None:
    """The default, ``brain-t1-multiscanner``: trained with scanner variation on the
    head-centred grid, scored by log p(x) with the worst 1% of pixels counted twice and the
    tissue beyond the calibration slices' 90th percentile credited back (up to their largest
    count) against 0.2.1's threshold, and a station score (complexity correction and a heavier
    tail) for stations that have learned."""
    path = default_bundle_path()
    assert path.name == "brain-t1-multiscanner"
    assert sum(p.stat().st_size for p in path.iterdir()) <= 20 * 1024 * 1024
    b = load_bundle()
    assert (b.name, b.meta["version"]) == ("brain-t1-multiscanner", "0.3.0")
    assert b.meta["data_attribution"]["license"] == "CC BY-SA 3.0"
    assert b.meta["training"]["command"].startswith("vaenode train")
    assert b.target_fpr == 0.01
    config = b.meta["training"]["config"]
    assert config["augment"] and config["variation"]["fov_edge_p"] > 0
    assert b.preprocess.center_head
    assert (b.scoring.tail_weight, b.scoring.complexity, b.scoring.position_bins) == (1.0, False, 0)
    # The tissue credit (scoring item 7), with 0.2.1's threshold kept: 3.69 nats per pixel
    # beyond the calibration slices' 90th percentile, up to their largest count.
    assert b.scoring.tissue_slope == pytest.approx(3.69, abs=0.01)
    assert 0 < b.scoring.tissue_reference < b.scoring.tissue_ceiling <= 128 * 128
    assert b.threshold == pytest.approx(21790.0, abs=0.1)
    assert b.meta["training"]["recalibrations"][-1]["kept_threshold"] == b.threshold
    assert b.station_scoring is not None
    assert (b.station_scoring.complexity, b.station_scoring.complexity_weight,
            b.station_scoring.tail_weight) == (True, 1.0, 8.0)


def test_shipped_bundle_keeps_a_clean_evaluation_series_normal() -> None:
    """An evaluation subject (never trained on, never calibrated on), axial series: at most 5%
    of its slices flagged (the calibrated rate is 1%)."""
    b = load_bundle()
    subject = b.meta["training"]["subjects"]["evaluation"][0]
    files = sorted(IXI.glob(f"{subject}-*.nii.gz"))
    if not files:
        pytest.skip("IXI data not available")
    volume = load_nifti(files[0])
    stack, spacing = plane_slices(volume, "axial")
    s = b.score_slices(list(stack), [spacing] * len(stack), plane="axial",
                       slice_spacing_mm=slice_spacing(volume, "axial"))
    assert s.abnormal[s.foreground].mean() <= 0.05
    assert not s.abnormal[~s.foreground].any()


def test_shipped_bundle_keeps_a_large_heads_sagittal_series_normal() -> None:
    """IXI443, an evaluation subject whose head fills the grid: 0.2.1 flagged 34 of its 82
    sagittal slices (the middle ones, the most tissue); with the tissue credit none."""
    b = load_bundle()
    files = sorted(IXI.glob("IXI443-*.nii.gz"))
    if not files:
        pytest.skip("IXI data not available")
    assert "IXI443" in b.meta["training"]["subjects"]["evaluation"]
    volume = load_nifti(files[0])
    stack, spacing = plane_slices(volume, "sagittal")
    s = b.score_slices(list(stack), [spacing] * len(stack), plane="sagittal",
                       slice_spacing_mm=slice_spacing(volume, "sagittal"))
    assert int(s.foreground.sum()) == 82
    assert not s.abnormal.any()


def test_shipped_bundle_flags_pure_noise() -> None:
    rng = np.random.default_rng(0)
    noise = [rng.random((120, 120)).astype(np.float32) * 1000 for _ in range(12)]
    s = load_bundle().score_slices(noise, [(2.0, 2.0)] * 12)
    assert s.abnormal.mean() >= 0.9


def test_opt_in_ixi_bundle_loads_and_is_small() -> None:
    """``brain-t1`` 0.1.0, the default until 2026-12-05, kept beside it: trained on IXI's
    scanner alone, its score position-referenced in the three planes; attributed the same."""
    path = default_bundle_path().parent / "brain-t1"
    assert sum(p.stat().st_size for p in path.iterdir()) <= 20 * 1024 * 1024
    b = load_bundle(path)
    assert (b.name, b.meta["version"]) == ("brain-t1", "0.1.0")
    assert b.meta["data_attribution"]["license"] == "CC BY-SA 3.0"
    assert not b.preprocess.center_head and b.station_scoring is None
    assert set(b.scoring.position_profiles) == {"axial", "coronal", "sagittal"}
