"""``vaenode score`` run as a real process: JSON field names, order, verdicts, errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest

from node.model.bundle import load_bundle
from node.worker.assemble import assemble_series
from tests.helpers.series import DICOM, IXI

REPO = Path(__file__).resolve().parents[2]
SIEMENS = DICOM / "siemens_trio_gre_field_mapping_2"
NIFTI = IXI / "IXI013-HH-1212_T1.nii.gz"
SLICE_FIELDS = ["series_instance_uid", "sop_instance_uid", "frame", "slice_index",
                "log_likelihood", "kl", "elbo", "abnormal", "confidence"]
SERIES_FIELDS = ["series_instance_uid", "slices", "abnormal_slices", "abnormal"]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.helpers.tiny_bundle import make_tiny_bundle

    if not IXI.is_dir() or not SIEMENS.is_dir():
        pytest.skip("shared data not found")
    return make_tiny_bundle(tmp_path_factory.mktemp("bundle") / "tiny")


def vaenode(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run the real command (``python -m node.cli``) with no config file in reach."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VAENODE_")}
    env["PYTHONPATH"] = str(REPO)
    return subprocess.run(
        [sys.executable, "-m", "node.cli", *map(str, args)],
        capture_output=True, text=True, timeout=300, cwd=cwd, env=env,
    )


def records(stdout: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


def test_json_for_a_dicom_series_and_a_nifti_volume(bundle: Path, tmp_path: Path) -> None:
    folder = tmp_path / "in"
    shutil.copytree(SIEMENS, folder / "siemens")
    (folder / "README.txt").write_text("not an image")
    proc = vaenode("score", folder, NIFTI, "--model", bundle, "--json", "--no-progress",
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "not DICOM, ignored" in proc.stderr and "README.txt" in proc.stderr
    out = records(proc.stdout)
    assert len(out) == 36 + 1 + 120 + 1

    siemens, series = out[:36], out[36]
    assert all(list(r) == SLICE_FIELDS for r in siemens)
    assert list(series) == SERIES_FIELDS
    uid = str(pydicom.dcmread(next(SIEMENS.glob("*.dcm"))).SeriesInstanceUID)
    assert {r["series_instance_uid"] for r in siemens} == {uid}
    assert series["series_instance_uid"] == uid
    assert [r["slice_index"] for r in siemens] == list(range(36))
    assert all(r["frame"] is None for r in siemens)
    # Slices come in order along the normal; these files' Instance Numbers agree with it.
    by_uid = {str(ds.SOPInstanceUID): int(ds.InstanceNumber) for ds in
              (pydicom.dcmread(p, stop_before_pixels=True) for p in SIEMENS.glob("*.dcm"))}
    assert [by_uid[r["sop_instance_uid"]] for r in siemens] == list(range(1, 37))
    assert series["slices"] == 36
    assert series["abnormal_slices"] == sum(r["abnormal"] for r in siemens)
    assert series["abnormal"] == (series["abnormal_slices"] >= 3)  # default rule's minimum
    for r in siemens:
        assert isinstance(r["abnormal"], bool) and 0.0 <= r["confidence"] <= 1.0
        assert all(isinstance(r[k], float) for k in ("log_likelihood", "kl", "elbo"))

    volume, vol_series = out[37:157], out[157]
    assert all(list(r) == SLICE_FIELDS for r in volume)
    assert {r["series_instance_uid"] for r in volume} == {str(NIFTI)}
    assert all(r["sop_instance_uid"] is None and r["frame"] is None for r in volume)
    assert [r["slice_index"] for r in volume] == list(range(120))
    assert vol_series == {"series_instance_uid": str(NIFTI), "slices": 120,
                          "abnormal_slices": sum(r["abnormal"] for r in volume),
                          "abnormal": sum(r["abnormal"] for r in volume) >= 3}


def test_scores_equal_the_model_on_the_assembled_stack(bundle: Path, tmp_path: Path) -> None:
    proc = vaenode("score", SIEMENS, "--model", bundle, "--json", "--samples", "2",
                   "--estimator", "plain", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    got = records(proc.stdout)[:-1]
    (stack,) = assemble_series(sorted(SIEMENS.glob("*.dcm"))).stacks
    expected = load_bundle(bundle).score_slices(stack.images, stack.pixel_spacings,
                                                estimator="plain", samples=2, device="cpu")
    assert np.allclose([r["log_likelihood"] for r in got], expected.log_likelihood, rtol=1e-6)
    assert np.allclose([r["elbo"] for r in got], expected.elbo, rtol=1e-6)
    assert [r["abnormal"] for r in got] == expected.abnormal.tolist()


def test_multiframe_instance_gives_one_record_per_frame(bundle: Path, tmp_path: Path) -> None:
    data_store = pytest.importorskip("data_store")
    path = Path(os.path.dirname(data_store.__file__)) / "data" / "emri_small.dcm"
    proc = vaenode("score", path, "--model", bundle, "--json", "--min-abnormal-slices", "1",
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = records(proc.stdout)
    assert [r["frame"] for r in out[:-1]] == list(range(1, 11))
    assert len({r["sop_instance_uid"] for r in out[:-1]}) == 1
    assert out[-1]["slices"] == 10
    assert out[-1]["abnormal"] == (out[-1]["abnormal_slices"] >= 1)


def test_table_and_verdict_without_json(bundle: Path, tmp_path: Path) -> None:
    proc = vaenode("score", SIEMENS, "--model", bundle, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "gre_field_mapping, 36 slices in 1 stack(s)" in proc.stdout
    assert "log p(x)" in proc.stdout and "tiny-test 0.0.1" in proc.stdout
    assert proc.stdout.count("\n") >= 36 + 4
    assert "verdict: " in proc.stdout and "of 36 slices below the threshold" in proc.stdout


def test_broken_series_reported_and_the_others_scored(bundle: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    for src in sorted(SIEMENS.glob("*.dcm"))[:3]:
        ds = pydicom.dcmread(src)
        ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.1"
        ds.PixelData = ds.PixelData[:100]
        ds.save_as(bad / src.name)
    proc = vaenode("score", bad, SIEMENS, "--model", bundle, "--json", cwd=tmp_path)
    assert proc.returncode == 1
    assert "1.2.826.0.1.3680043.8.498.1" in proc.stderr and "cannot be decoded" in proc.stderr
    assert "1 of 2 series could not be scored" in proc.stderr
    assert records(proc.stdout)[-1]["slices"] == 36  # the good series is still scored


def test_bad_arguments(bundle: Path, tmp_path: Path) -> None:
    proc = vaenode("score", SIEMENS, "--model", bundle, "--estimator", "guess", cwd=tmp_path)
    assert proc.returncode == 2 and "guess" in proc.stderr
    proc = vaenode("score", tmp_path / "missing", "--model", bundle, cwd=tmp_path)
    assert proc.returncode == 1 and "no such file or folder" in proc.stderr
    proc = vaenode("score", SIEMENS, "--model", tmp_path / "no-bundle", cwd=tmp_path)
    assert proc.returncode == 1 and "no-bundle" in proc.stderr
