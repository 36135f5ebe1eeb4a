"""``vaenode calibrate --site``: a bundle calibrated on a site's own normal series (NIfTI or
DICOM) instead of its own calibration subjects."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from node.model.bundle import default_bundle_path, load_bundle
from node.model.data import load_nifti, plane_slices
from tests.helpers.series import write_nifti_series
from tests.helpers.tiny_bundle import IXI, SUBJECTS
from tests.model.test_background import _calibrate

pytestmark = pytest.mark.skipif(not IXI.is_dir(), reason=f"IXI data not found at {IXI}")


def test_site_calibration_fits_everything_on_the_given_subjects(tmp_path: Path) -> None:
    shipped = load_bundle()
    site = [IXI / name for name in SUBJECTS]
    ids = sorted(name.split("-")[0] for name in SUBJECTS)
    assert not set(ids) & set(shipped.meta["training"]["subjects"]["calibration"])
    # Without --site these volumes are not the bundle's calibration subjects: refused.
    proc = _calibrate(default_bundle_path(), tmp_path / "no", data=site)
    assert proc.returncode == 1 and "calibration subjects" in proc.stderr
    assert not (tmp_path / "no").exists()

    out = tmp_path / "site"
    proc = _calibrate(default_bundle_path(), out, "--site", data=site)
    assert proc.returncode == 0, proc.stderr
    bundle = load_bundle(out)
    meta = bundle.meta
    assert meta["calibration"]["subjects"] == ids
    assert meta["training"]["recalibrations"][-1]["site"] is True
    assert meta["training"]["subjects"] == shipped.meta["training"]["subjects"]  # the split
    # The weights and the score's settings stay; what calibration sets is the site's.
    old, new = shipped.scoring, bundle.scoring
    assert (new.complexity_weight, new.tail_weight, new.max_series_shift) == (
        old.complexity_weight, old.tail_weight, old.max_series_shift)
    assert new.reference_median != old.reference_median
    assert bundle.threshold != shipped.threshold
    assert set(new.position_profiles) == {"axial", "coronal", "sagittal"}
    # On its own normal series the site bundle flags about its target rate.
    flagged = []
    for path in site:
        vol = load_nifti(path)
        images, spacing = plane_slices(vol, "axial")
        s = bundle.score_slices(list(images), [spacing] * len(images), plane="axial",
                                slice_spacing_mm=float(vol.spacing[2]))
        flagged.append(s.abnormal[s.foreground])
    assert np.mean(np.concatenate(flagged)) <= 0.03


def test_site_calibration_reads_dicom_series(tmp_path: Path) -> None:
    site = tmp_path / "site-dicom"
    for i, name in enumerate(SUBJECTS):
        write_nifti_series(IXI / name, site / f"s{i}", patient_id=f"SITE-{i}",
                           series_description="T1 axial (site)")
    out = tmp_path / "bundle"
    proc = _calibrate(default_bundle_path(), out, "--site", data=[site])
    assert proc.returncode == 0, proc.stderr
    meta = json.loads((out / "model.json").read_text())
    assert meta["calibration"]["subjects"] == ["SITE-0", "SITE-1", "SITE-2"]
    assert meta["calibration"]["series"] == 3  # each DICOM series in its own (axial) plane
    assert set(meta["scoring"]["position_profiles"]) == {"axial"}
    # Two subjects are too few for the position reference: refused, nothing written.
    proc = _calibrate(default_bundle_path(), tmp_path / "two", "--site",
                      data=[site / "s0", site / "s1"])
    assert proc.returncode == 1 and "at least 3" in proc.stderr
    assert not (tmp_path / "two").exists()
