"""Header facts of a series for the series page, read from one stored instance.

The queue row holds what routing needs; a reviewer also wants to know which scanner, protocol
and geometry produced the images. Those come from the stored file's header (pixels are not
read). Patient identity stays out unless ``admin.show_patient_name`` says otherwise, and even
then only the name: an admin reviewing image quality needs no birth date or patient ID.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError

# (label shown, DICOM keyword): what helps judge image quality and find the scan, nothing more.
FACTS = (
    ("Study date", "StudyDate"),
    ("Study description", "StudyDescription"),
    ("Series number", "SeriesNumber"),
    ("Protocol", "ProtocolName"),
    ("Image type", "ImageType"),
    ("Manufacturer", "Manufacturer"),
    ("Model", "ManufacturerModelName"),
    ("Station", "StationName"),
    ("Magnetic field (T)", "MagneticFieldStrength"),
    ("Rows x columns", None),
    ("Pixel spacing (mm)", "PixelSpacing"),
    ("Slice thickness (mm)", "SliceThickness"),
    ("Transfer syntax", None),
)


@dataclass(frozen=True)
class HeaderFacts:
    """What the series page shows from the DICOM header.

    Attributes:
        facts: (label, value) pairs, only those present in the header.
        patient_name: the patient's name when configured to show it, else None.
        error: why the header could not be read, if it could not.
    """

    facts: tuple[tuple[str, str], ...]
    patient_name: str | None
    error: str | None = None


def _text(value: object) -> str:
    if isinstance(value, pydicom.multival.MultiValue | list | tuple):
        return "\\".join(str(v) for v in value)
    return str(value)


def read_header_facts(path: Path | None, show_patient_name: bool) -> HeaderFacts:
    """Read the header of one stored instance of the series.

    Args:
        path: the stored file (any instance of the series); None when the series has none.
        show_patient_name: ``admin.show_patient_name``.

    Returns:
        The facts; ``error`` says why they are missing instead of raising, because the rest
        of the series page (status, scores, actions) is still worth showing.
    """
    if path is None:
        return HeaderFacts(facts=(), patient_name=None, error="no stored instance")
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except (OSError, InvalidDicomError) as exc:
        return HeaderFacts(facts=(), patient_name=None, error=f"cannot read {path.name}: {exc}")
    facts: list[tuple[str, str]] = []
    for label, keyword in FACTS:
        if keyword is None:
            if label.startswith("Rows") and "Rows" in ds and "Columns" in ds:
                facts.append((label, f"{ds.Rows} x {ds.Columns}"))
            elif label.startswith("Transfer") and getattr(ds, "file_meta", None) is not None:
                tsuid = ds.file_meta.get("TransferSyntaxUID")
                if tsuid is not None:
                    facts.append((label, f"{tsuid.name} ({tsuid})"))
            continue
        value = ds.get(keyword)
        if value is not None and _text(value).strip():
            facts.append((label, _text(value)))
    name = str(ds.get("PatientName", "")) if show_patient_name else None
    return HeaderFacts(facts=tuple(facts), patient_name=name)
