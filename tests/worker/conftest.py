"""Fixtures of the worker tests: real series, pydicom's files, a migrated queue, a tiny model."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import BasicTextSRStorage, ExplicitVRLittleEndian, generate_uid
from sqlalchemy.orm import Session, sessionmaker

from node.config import Settings
from node.queue import repo
from node.queue.models import utcnow
from tests.helpers.db import migrated_database
from tests.helpers.series import DICOM

SIEMENS_MAGNITUDE = DICOM / "siemens_trio_gre_field_mapping_2"
SIEMENS_PHASE = DICOM / "siemens_trio_gre_field_mapping_3"
STUDYFORREST = DICOM / "studyforrest_t1w"
PROSTATE = DICOM / "tcia_prostate_t2_0002"


def series_files(folder: Path) -> list[Path]:
    """The .dcm files of one real series folder; skips the test when the data are absent."""
    files = sorted(folder.glob("*.dcm"))
    if not files:
        pytest.skip(f"no DICOM series under {folder}")
    return files


def sr_in_series(folder: Path, template: Path) -> Path:
    """A Basic Text SR (no pixel data) in the same series as ``template``."""
    src = pydicom.dcmread(template, stop_before_pixels=True)
    ds = Dataset()
    ds.SOPClassUID = BasicTextSRStorage
    ds.SOPInstanceUID = generate_uid()
    for kw in ("StudyInstanceUID", "SeriesInstanceUID", "PatientID", "PatientName"):
        setattr(ds, kw, getattr(src, kw))
    ds.Modality = "SR"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    path = folder / "report.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture(scope="session")
def pydicom_data() -> Path:
    """Folder of the pydicom-data test files (compressed, multi-frame, odd encodings)."""
    data_store = pytest.importorskip("data_store")
    return Path(os.path.dirname(data_store.__file__)) / "data"


@pytest.fixture(scope="session")
def pydicom_test_files() -> Path:
    """Folder of the test files that ship inside pydicom itself."""
    import pydicom.data

    return Path(os.path.dirname(pydicom.data.__file__)) / "test_files"


@pytest.fixture(scope="session")
def tiny_bundle_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny real bundle trained by the project's code (a few seconds)."""
    from tests.helpers.tiny_bundle import IXI, make_tiny_bundle

    if not IXI.is_dir():
        pytest.skip(f"IXI data not found at {IXI}")
    return make_tiny_bundle(tmp_path_factory.mktemp("bundle") / "tiny")


@pytest.fixture
def worker_settings(tmp_path: Path, tiny_bundle_path: Path) -> Settings:
    """Settings with a temp storage folder and database and the tiny bundle as the model."""
    return Settings.model_validate(
        {
            "storage": {"dir": str(tmp_path / "storage")},
            "database": {"url": f"sqlite:///{tmp_path / 'queue.db'}"},
            "model": {"bundle": str(tiny_bundle_path), "device": "cpu"},
            "worker": {"batch_size": 16},
        }
    )


@pytest.fixture
def session_factory(worker_settings: Settings) -> Iterator[sessionmaker[Session]]:
    """The temp SQLite queue database with every migration applied."""
    with migrated_database(worker_settings.database) as f:
        yield f


def store_files(
    session_factory: sessionmaker[Session], settings: Settings, files: list[Path]
) -> int:
    """Store files as ingest does (copy under the storage folder, one row each); the series id.

    The series is left ``receiving``; :func:`queue_series` makes it ``queued``.
    """
    series_id = -1
    for file in files:
        ds = pydicom.dcmread(file, stop_before_pixels=True)
        rel = Path(ds.StudyInstanceUID) / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"
        (settings.storage.dir / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(file, settings.storage.dir / rel)
        number = ds.get("InstanceNumber")
        record = repo.InstanceRecord(
            study_instance_uid=str(ds.StudyInstanceUID),
            series_instance_uid=str(ds.SeriesInstanceUID),
            sop_instance_uid=str(ds.SOPInstanceUID),
            sop_class_uid=str(ds.SOPClassUID),
            transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
            path=str(rel),
            size_bytes=file.stat().st_size,
            instance_number=int(number) if number not in (None, "") else None,
            modality=ds.get("Modality"),
            series_description=ds.get("SeriesDescription"),
            body_part=ds.get("BodyPartExamined"),
            calling_aet="TESTSCU",
            peer_address="127.0.0.1",
            received_at=utcnow(),
        )
        with session_factory() as session:
            series_id = repo.record_instance(session, record).series_id
    return series_id


def queue_series(session_factory: sessionmaker[Session], series_id: int) -> None:
    """``receiving`` -> ``queued`` now (as the idle-series job does after the idle time)."""
    with session_factory() as session:
        repo.mark_queued(session, series_id, idle_before=utcnow())


def store_and_queue(
    session_factory: sessionmaker[Session], settings: Settings, files: list[Path]
) -> int:
    """:func:`store_files` then :func:`queue_series`; the series id."""
    series_id = store_files(session_factory, settings, files)
    queue_series(session_factory, series_id)
    return series_id
