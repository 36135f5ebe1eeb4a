"""Fixtures of the report tests: real source headers, verdicts, a migrated database, Orthanc."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from sqlalchemy.orm import Session, sessionmaker

from node.config import DatabaseSettings, Settings
from tests.helpers.db import migrated_database
from tests.helpers.orthanc import Orthanc

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "dicom"
SERIES_DIR = DATA / "siemens_trio_gre_field_mapping_2"


@pytest.fixture(scope="session")
def source_files() -> list[Path]:
    """A real scanner series (Siemens Trio, 36 MR slices of 64x64)."""
    files = sorted(SERIES_DIR.glob("*.dcm"))
    if not files:
        pytest.skip(f"no DICOM series under {SERIES_DIR}")
    return files


@pytest.fixture(scope="session")
def sources(source_files: list[Path]) -> list[Dataset]:
    """Headers of the real series, ordered by Instance Number."""
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in source_files]
    return sorted(headers, key=lambda d: int(d.InstanceNumber))


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    """A real Orthanc on free ports, stopped by PID at the end."""
    server = Orthanc(workdir=tmp_path / "orthanc", ae_title="PACS")
    server.start()
    try:
        yield server
    finally:
        server.stop(graceful=False)


@pytest.fixture
def settings_for(tmp_path: Path):  # type: ignore[no-untyped-def]
    """Build Settings with a temp storage folder and database, and the given delivery."""

    def build(destinations: list[dict[str, object]] | None = None, **delivery: object) -> Settings:
        return Settings.model_validate(
            {
                "dicom": {
                    "ae_title": "VAENODE",
                    "acse_timeout_s": 5,
                    "dimse_timeout_s": 10,
                    "network_timeout_s": 10,
                },
                "storage": {"dir": str(tmp_path / "storage")},
                "database": {"url": f"sqlite:///{tmp_path / 'queue.db'}"},
                "delivery": {"destinations": destinations or [], **delivery},
            }
        )

    return build


@pytest.fixture
def session_factory(tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    """A temp SQLite queue database with every migration applied."""
    with migrated_database(DatabaseSettings(url=f"sqlite:///{tmp_path / 'queue.db'}")) as f:
        yield f
