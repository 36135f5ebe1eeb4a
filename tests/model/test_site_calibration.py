"""``vaenode calibrate --site``: a bundle calibrated on a site's own normal series (NIfTI or
DICOM) instead of its own calibration subjects.

On ``brain-t1`` 0.1.0, the shipped bundle whose parts (series references, position profiles)
site calibration refits and whose site check sees motion; the default
``brain-t1-multiscanner`` sees no motion out of the box, so its site check warns (the last
test)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from node.model.bundle import default_bundle_path, load_bundle
from node.model.data import load_nifti, plane_slices
from tests.helpers.series import write_nifti_series
from tests.helpers.tiny_bundle import IXI, calibrate_cli

#: The bundle recalibrated here (see the module docstring).
SHIPPED = default_bundle_path().parent / "brain-t1"
#: These tests check what site calibration fits and refuses, not the estimator: 2 Monte-Carlo
#: samples per slice instead of the bundles' 8 (the five tests: 251 s -> 109 s, 2026-12-06).
FAST = ("--samples", "2")

pytestmark = pytest.mark.skipif(not IXI.is_dir(), reason=f"IXI data not found at {IXI}")


def _site_subjects(n: int = 6) -> list[Path]:
    """``n`` IXI volumes of the shipped bundle's TRAINING subjects (neither its calibration
    nor its evaluation subjects), standing in for a site's normal series."""
    held = load_bundle(SHIPPED).meta["training"]["subjects"]
    other = set(held["calibration"]) | set(held["evaluation"])
    return [p for p in sorted(IXI.glob("*.nii.gz")) if p.name.split("-")[0] not in other][:n]


def test_site_calibration_fits_everything_on_the_given_subjects(tmp_path: Path) -> None:
    shipped = load_bundle(SHIPPED)
    site = _site_subjects()
    ids = sorted(p.name.split("-")[0] for p in site)
    assert not set(ids) & set(shipped.meta["training"]["subjects"]["calibration"])
    # Without --site these volumes are not the bundle's calibration subjects: refused.
    proc = calibrate_cli(SHIPPED, tmp_path / "no", data=site)
    assert proc.returncode == 1 and "calibration subjects" in proc.stderr
    assert not (tmp_path / "no").exists()

    out = tmp_path / "site"
    proc = calibrate_cli(SHIPPED, out, "--site", *FAST, data=site)
    assert proc.returncode == 0, proc.stderr
    bundle = load_bundle(out)
    meta = bundle.meta
    assert meta["calibration"]["subjects"] == ids
    assert meta["training"]["recalibrations"][-1]["site"] is True
    assert meta["training"]["subjects"] == shipped.meta["training"]["subjects"]  # the split
    # The site check: a simulated motion block in these normal series is still flagged.
    check = meta["training"]["recalibrations"][-1]["site_check"]
    assert check["series"] == 6 and not check["blind"]
    assert check["block_flagged"] > 0.4 and check["elsewhere_flagged"] < 0.05
    assert "site check:" in proc.stdout and "warning" not in proc.stderr
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


def test_site_check_warns_when_the_recalibrated_bundle_is_blind(tmp_path: Path) -> None:
    # A "site" whose contrast the model never saw (gamma 0.6 on whole volumes): calibrated on
    # it, its normal series are normal, and so is a moderate motion block in them.
    import nibabel as nib

    site = tmp_path / "gamma"
    site.mkdir()
    for path in _site_subjects():
        img = nib.load(path)
        d = np.asarray(img.dataobj, dtype=np.float32)
        hi = float(np.percentile(d, 99.5))
        nib.save(nib.Nifti1Image((d / hi).clip(0) ** 0.6 * hi, img.affine), site / path.name)
    out = tmp_path / "bundle"
    proc = calibrate_cli(SHIPPED, out, "--site", *FAST, data=[site])
    assert proc.returncode == 0, proc.stderr  # written: the admin decides, warned
    check = load_bundle(out).meta["training"]["recalibrations"][-1]["site_check"]
    assert check["blind"] and check["block_flagged"] < 0.25
    assert "warning: the site-calibrated bundle barely flags motion" in proc.stderr


def test_site_calibration_reads_dicom_series(tmp_path: Path) -> None:
    site = tmp_path / "site-dicom"
    for i, path in enumerate(_site_subjects()):
        write_nifti_series(path, site / f"s{i}", patient_id=f"SITE-{i}",
                           series_description="T1 axial (site)")
    out = tmp_path / "bundle"
    proc = calibrate_cli(SHIPPED, out, "--site", *FAST, data=[site])
    assert proc.returncode == 0, proc.stderr
    meta = json.loads((out / "model.json").read_text())
    assert meta["calibration"]["subjects"] == [f"SITE-{i}" for i in range(6)]
    assert meta["calibration"]["series"] == 6  # each DICOM series in its own (axial) plane
    assert set(meta["scoring"]["position_profiles"]) == {"axial"}
    assert meta["training"]["recalibrations"][-1]["site_check"]["series"] == 6
    # Five subjects are too few (the leave-one-subject-out profiles get too noisy): refused
    # before any scoring, nothing written.
    proc = calibrate_cli(SHIPPED, tmp_path / "five", "--site",
                      data=[site / f"s{i}" for i in range(5)])
    assert proc.returncode == 1 and "at least 6 subjects" in proc.stderr
    assert not (tmp_path / "five").exists()


def test_site_calibration_from_the_queue_takes_what_people_reviewed_as_normal(
        tmp_path: Path) -> None:
    """``--site --from-queue --station``: the series of one scanner, stored by the node's own
    ingest, that a person called normal on the dashboard (a flag marked a false alarm, or a
    normal verdict confirmed); never a confirmed flag, an unreviewed series, another station's
    or a series whose images were deleted."""
    import pydicom
    from sqlalchemy import insert, select, update

    from node.admin.reviews import CONFIRM, FALSE_ALARM, reviewed_normal
    from node.config import DatabaseSettings, StorageSettings
    from node.ingest.store import Store
    from node.queue.models import AdminAction, Series, utcnow
    from node.queue.states import SeriesState
    from tests.helpers.db import migrated_database

    # subject index: (station, verdict abnormal, latest review or None, images purged)
    plan = [("MR ROOM 3", True, FALSE_ALARM, False), ("MR ROOM 3", False, CONFIRM, False),
            ("MR ROOM 3", True, FALSE_ALARM, False), ("MR ROOM 3", False, CONFIRM, False),
            ("MR ROOM 3", True, FALSE_ALARM, False), ("mr room 3", False, CONFIRM, False),
            ("MR ROOM 3", True, CONFIRM, False),      # a confirmed flag: poor, never taken
            ("MR ROOM 3", False, None, False),        # not reviewed: the model's word only
            ("MR ROOM 1", False, CONFIRM, False),     # another scanner
            ("MR ROOM 3", True, FALSE_ALARM, True)]   # its images are gone
    subjects = _site_subjects(len(plan))
    database = DatabaseSettings(url=f"sqlite:///{tmp_path / 'queue.db'}")
    storage = tmp_path / "storage"
    config = tmp_path / "node.toml"
    config.write_text(f'[database]\nurl = "{database.url}"\n[storage]\ndir = "{storage}"\n',
                      encoding="utf-8")
    with migrated_database(database) as factory:
        store = Store(StorageSettings(dir=storage, min_free_mb=0), factory)
        uids = []
        for i, (path, (station, abnormal, review, purged)) in enumerate(
                zip(subjects, plan, strict=True)):
            written = write_nifti_series(path, tmp_path / "sent" / f"s{i}",
                                         patient_id=f"SITE-{i}")
            for file in written.paths:
                ds = pydicom.dcmread(file)
                ds.StationName = station
                ds.save_as(file, enforce_file_format=True)
                store.accept(file.read_bytes(), calling_aet="GATEWAY",
                             peer_address="127.0.0.1:1")
            uid = written.series_instance_uid
            uids.append(uid)
            with factory.begin() as s:
                series_id = s.scalars(select(Series.id).where(
                    Series.series_instance_uid == uid)).one()
                s.execute(update(Series).where(Series.id == series_id).values(
                    status=SeriesState.DONE, abnormal=abnormal,
                    purged_at=utcnow() if purged else None))
                if review is not None:
                    s.execute(insert(AdminAction).values(
                        series_id=series_id, actor="dr-qa", action=review,
                        model="brain-t1 0.1.0", note=None))
        with factory() as s:
            chosen = [r.series_instance_uid
                      for r in reviewed_normal(s, stations=["MR ROOM 3"])]
            every = {r.series_instance_uid for r in reviewed_normal(s)}
            by_aet = reviewed_normal(s, calling_aets=["NOT-THIS-ONE"])
    assert chosen == uids[:6]
    assert every == {*uids[:6], uids[8]} and by_aet == []

    out = tmp_path / "room3"
    proc = calibrate_cli(SHIPPED, out, "--site", "--from-queue", "--station",
                         "mr room 3", "--days", "30", "--config", str(config), *FAST, data=())
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("from the queue: series") == 6
    meta = json.loads((out / "model.json").read_text())
    assert meta["calibration"]["subjects"] == [f"SITE-{i}" for i in range(6)]
    assert meta["training"]["recalibrations"][-1]["site_check"]["series"] == 6

    # Refusals: not without --site; nothing reviewed for that station; --station alone.
    lone = calibrate_cli(SHIPPED, tmp_path / "x", "--from-queue", "--config",
                      str(config), data=())
    assert lone.returncode == 2 and "--site" in lone.stderr
    none = calibrate_cli(SHIPPED, tmp_path / "y", "--site", "--from-queue",
                      "--station", "CT ROOM 9", "--config", str(config), data=())
    assert none.returncode == 1 and "no stored series reviewed as normal" in none.stderr
    assert "CT ROOM 9" in none.stderr and not (tmp_path / "y").exists()
    stray = calibrate_cli(SHIPPED, tmp_path / "z", "--station", "MR ROOM 3",
                       data=subjects[:6])
    assert stray.returncode == 2 and "--from-queue" in stray.stderr
    moved = tmp_path / "moved"
    storage.rename(moved)  # e.g. a relative [storage].dir read from another working directory
    gone = calibrate_cli(SHIPPED, tmp_path / "w", "--site", "--from-queue",
                      "--config", str(config), data=())
    assert gone.returncode == 1 and "are not at" in gone.stderr


def test_site_check_warns_on_the_default_bundle(tmp_path: Path) -> None:
    """The default bundle flags no motion out of the box, so recalibrating it on a site's
    series leaves it blind to the site check's motion block, and the command says so."""
    out = tmp_path / "default-site"
    proc = calibrate_cli(default_bundle_path(), out, "--site", *FAST, data=_site_subjects())
    assert proc.returncode == 0, proc.stderr
    check = load_bundle(out).meta["training"]["recalibrations"][-1]["site_check"]
    assert check["blind"] and check["block_flagged"] < 0.25
    assert "warning" in proc.stderr
