"""Fixtures of the worker tests: the real DICOM series under ../shared/data and pydicom's files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

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
