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


def dataset_bytes(raw: bytes) -> bytes:
    """The dataset bytes of a DICOM file: everything after the preamble, prefix and file meta
    (group 0002, Explicit VR Little Endian). What a C-STORE carries on the wire."""
    import struct

    assert raw[128:132] == b"DICM", "not a DICOM file with file meta"
    pos = 132
    while raw[pos : pos + 2] == b"\x02\x00":
        vr = raw[pos + 4 : pos + 6]
        if vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN", b"UC", b"UR"):
            pos += 12 + struct.unpack_from("<I", raw, pos + 8)[0]
        else:
            pos += 8 + struct.unpack_from("<H", raw, pos + 6)[0]
    return raw[pos:]
