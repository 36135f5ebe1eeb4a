"""DICOM series as training data: assembled stacks, subjects by Patient ID, tiny training runs.

The series are real DICOM files written from IXI volumes by :mod:`tests.helpers.series`; the
training runs are tiny (64 x 64 grid, one epoch, a few dozen slices) but go through the real
code: ``vaenode train`` as a process, and :func:`node.model.train.run_training`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from node.model.bundle import load_bundle
from node.model.data import foreground_mask, item_stacks, load_nifti
from node.model.train import TrainConfig, run_training
from node.worker.training_data import load_dicom_stacks, plane_of
from tests.commands.test_score import vaenode
from tests.helpers.series import IXI, axial_slices, write_nifti_series

NAMES = ("IXI012-HH-1211_T1.nii.gz", "IXI013-HH-1212_T1.nii.gz", "IXI014-HH-1236_T1.nii.gz",
         "IXI015-HH-1258_T1.nii.gz")


@pytest.fixture(scope="module")
def dicom_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three patients as DICOM: P12 (IXI012), P13 (IXI013) and P14 with two series (IXI014
    and IXI015, so that two series share one Patient ID)."""
    if not IXI.is_dir():
        pytest.skip(f"IXI data not found at {IXI}")
    root = tmp_path_factory.mktemp("dicom")
    for name, patient, folder in ((NAMES[0], "P12", "a"), (NAMES[1], "P13", "b"),
                                  (NAMES[2], "P14", "c1"), (NAMES[3], "P14", "c2")):
        write_nifti_series(IXI / name, root / folder, patient_id=patient)
    return root


def tiny_config(**changes: object) -> TrainConfig:
    """The tiny configuration of tests.helpers.tiny_bundle (seconds on one core)."""
    base = dict(epochs=1, latent_dim=8, image_size=64, spacing_mm=4.0, channels=(4, 8, 16, 16),
                seed=0, val_fraction=0.34, batch_size=16, max_train_slices=64,
                planes=("axial",), samples=4, name="tiny-dicom", version="0.0.1", device="cpu",
                max_series_shift=1000.0)
    base.update(changes)
    return TrainConfig(**base)  # type: ignore[arg-type]


def test_series_become_stacks_with_patient_subjects(dicom_root: Path) -> None:
    found = load_dicom_stacks([dicom_root])
    assert found.problems == [] and found.other_files == 0
    assert sorted(s.subject for s in found.stacks) == ["P12", "P13", "P14", "P14"]
    assert {s.plane for s in found.stacks} == {"axial"}
    # The stack of P12 holds the volume's axial slices (to within the rescale's rounding),
    # ordered like plane_slices, with the in-plane spacing.
    vol = load_nifti(IXI / NAMES[0])
    stack = next(s for s in found.stacks if s.subject == "P12")
    expected = axial_slices(vol.data)
    assert len(stack.images) == len(expected)
    assert np.abs(np.stack(stack.images) - expected).max() <= 1.0
    assert stack.spacings[0] == pytest.approx((vol.spacing[1], vol.spacing[0]))


def test_background_slices_dropped_as_for_nifti(dicom_root: Path) -> None:
    stack = next(s for s in load_dicom_stacks([dicom_root / "a"]).stacks)
    [(plane, dicom, _)] = item_stacks(stack, ("axial", "coronal"))
    [(_, nifti, _)] = item_stacks(load_nifti(IXI / NAMES[0]), ("axial",))
    assert plane == "axial"
    mask = foreground_mask(dicom)
    assert 0 < mask.sum() < len(mask)  # the ends of the head are background
    assert mask.tolist() == foreground_mask(nifti).tolist()
    assert item_stacks(stack, ("coronal",)) == []  # an axial stack is not resliced


def test_plane_from_orientation() -> None:
    assert plane_of((1, 0, 0, 0, 1, 0)) == "axial"
    assert plane_of((1, 0, 0, 0, 0, -1)) == "coronal"
    assert plane_of((0, 1, 0, 0, 0, -1)) == "sagittal"
    assert plane_of((1, 0, 0, 0, 0.7071, 0.7071)) == "oblique"
    assert plane_of(None) == "oblique"


def test_vaenode_train_on_dicom_series(dicom_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    proc = vaenode("train", "--data", dicom_root, "--out", out, "--epochs", "1",
                   "--latent", "8", "--image-size", "64", "--batch-size", "16",
                   "--max-train-slices", "48", "--samples", "2", "--val-fraction", "0.34",
                   "--device", "cpu", "--name", "tiny-dicom", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "0 NIfTI volume(s), 4 DICOM stack(s)" in proc.stdout
    bundle = load_bundle(out)
    subjects = bundle.meta["training"]["subjects"]
    everyone = subjects["train"] + subjects["calibration"] + subjects["evaluation"]
    assert sorted(everyone) == ["P12", "P13", "P14"]  # the two P14 series are one subject
    assert len(subjects["train"]) == 2
    assert bundle.meta["data_attribution"] == {}  # Patient IDs do not say IXI
    stack = load_dicom_stacks([dicom_root / "b"]).stacks[0]
    scores = bundle.score_slices(list(stack.images), list(stack.spacings))
    assert len(scores) == len(stack.images) and np.isfinite(scores.log_likelihood).all()


def test_mixed_nifti_and_dicom_run(dicom_root: Path, tmp_path: Path) -> None:
    nifti = [load_nifti(IXI / n) for n in NAMES[:2]]  # IXI012, IXI013
    dicom = load_dicom_stacks([dicom_root / "c1", dicom_root / "c2"]).stacks  # P14 twice
    out = run_training([*nifti, *dicom], tiny_config(val_fraction=0.5), tmp_path / "mixed")
    meta = json.loads((out / "model.json").read_text())
    subjects = meta["training"]["subjects"]
    assert sorted(subjects["train"] + subjects["calibration"] + subjects["evaluation"]) == [
        "IXI012", "IXI013", "P14"]
    assert set(subjects["train"]).isdisjoint(subjects["calibration"])
    bundle = load_bundle(out)
    cal = meta["calibration"]
    assert cal["subjects"] == subjects["calibration"] and cal["slices"] > 0
    assert np.isfinite(bundle.threshold)


def test_train_on_folder_without_series_fails_clearly(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "notes.txt").write_text("no images here")
    (data / "broken.dcm").write_bytes(b"\0" * 200)
    proc = vaenode("train", "--data", data, "--out", tmp_path / "b", cwd=tmp_path)
    assert proc.returncode == 1
    assert "no training data under" in proc.stderr
    assert "no NIfTI volume and no readable DICOM series" in proc.stderr
    assert "2 other file(s) ignored" in proc.stderr
    assert not (tmp_path / "b").exists()
    missing = vaenode("train", "--data", tmp_path / "nope", "--out", tmp_path / "b", cwd=tmp_path)
    assert missing.returncode == 1 and "not found" in missing.stderr
