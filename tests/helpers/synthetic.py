"""Small synthetic DICOM series written with pydicom alone (no model code, no torch).

For ingest tests and the ingest benchmark: what matters is realistic headers and sizes, not
the pixels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    generate_uid,
)


def write_ct_series(
    folder: Path,
    count: int,
    *,
    rows: int = 32,
    columns: int = 32,
    study_uid: str | None = None,
    series_uid: str | None = None,
    seed: int = 0,
) -> list[Path]:
    """Write ``count`` single-frame CT instances of one series into ``folder``; return paths."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    paths = []
    for index in range(count):
        sop_uid = generate_uid()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop_uid
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = study_uid + ".1" if len(study_uid) < 62 else study_uid
        ds.PatientName = "Synthetic^Ingest"
        ds.PatientID = "SYN0001"
        ds.Modality = "CT"
        ds.SeriesDescription = "synthetic ingest series"
        ds.BodyPartExamined = "HEAD"
        ds.StationName = "CT ROOM 1"
        ds.Manufacturer = "Synthetic Medical"
        ds.ManufacturerModelName = "Gen 1"
        ds.SeriesNumber = 1
        ds.InstanceNumber = index + 1
        ds.ImagePositionPatient = [0.0, 0.0, float(index)]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing = [0.5, 0.5]
        ds.SliceThickness = 1.0
        ds.Rows, ds.Columns = rows, columns
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
        ds.PixelRepresentation = 0
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.PixelData = rng.integers(0, 4096, (rows, columns), dtype=np.uint16).tobytes()
        path = folder / f"{index + 1:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
