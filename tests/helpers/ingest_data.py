"""Where the ingest tests find real DICOM: the shared series and pydicom-data's files."""

from __future__ import annotations

import os
from pathlib import Path

DICOM_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "dicom"
DATA_SERIES = ("siemens_trio_gre_field_mapping_2", "siemens_trio_gre_field_mapping_3",
               "tcia_prostate_t2_0002", "studyforrest_t1w")


def pydicom_data_dir() -> Path:
    """The pydicom-data package's folder of files (compressed and unusual encodings)."""
    import data_store

    return Path(os.path.dirname(data_store.__file__)) / "data"
