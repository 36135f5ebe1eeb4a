"""The patient, study and series attributes a report takes from its source images, tolerant of
what anonymizers and broken senders leave out.

highdicom makes an SR's or KOS's patient and study header (PS3.3 C.7.1.1, C.7.2.1) from the
first source dataset, reading each Type 2 attribute as a Python attribute and converting the
dates, the time and the sex: a series without Patient Birth Date (common in anonymized and
research data) failed after scoring with "'Dataset' object has no attribute
'PatientBirthDate'", and one with a date no parser takes failed the same way. An empty Type 2
attribute is valid DICOM, and the report is what the user came for: :func:`header_source` hands
highdicom a view of the first source in which each of those attributes is present, empty where
the source lacks it or holds a value that cannot be converted.

Modality is a series attribute, but a broken sender may leave it out of some images:
:func:`series_modality` takes it from any image that states it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from highdicom.enum import PatientSexValues
from pydicom.dataset import Dataset
from pydicom.valuerep import DA, TM

#: Type 2 attributes that highdicom copies into a report's header from its first source.
HEADER_TYPE2_KEYWORDS = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex",
                         "AccessionNumber", "StudyID", "StudyDate", "StudyTime",
                         "ReferringPhysicianName")
#: How highdicom converts some of them (ValueError for a value it cannot parse).
_CONVERTED: dict[str, Any] = {"PatientBirthDate": DA, "StudyDate": DA, "StudyTime": TM,
                              "PatientSex": lambda v: PatientSexValues(v) if v else v}


def view_of(ds: Dataset) -> Dataset:
    """A new dataset holding ``ds``'s elements: attributes set on it leave ``ds`` unchanged
    (``Dataset(ds)`` and ``copy.copy`` would share, and change, ``ds``'s own)."""
    view = Dataset()
    for elem in ds.elements():
        view[elem.tag] = elem
    return view


def _header_value(ds: Dataset, keyword: str) -> Any:
    """``ds``'s value of ``keyword`` as highdicom can take it, else None (empty)."""
    try:
        value = ds.get(keyword)
        convert = _CONVERTED.get(keyword)
        if value is not None and convert is not None:
            convert(value)
    except (ValueError, TypeError, KeyError, NotImplementedError):
        return None
    return value


def header_source(evidence: Sequence[Dataset]) -> list[Dataset]:
    """``evidence`` with its first dataset (the one highdicom makes the report's patient and
    study header from) replaced by a view in which each of :data:`HEADER_TYPE2_KEYWORDS` is
    present: as in the source, or empty where the source lacks it or holds a value that
    cannot be converted."""
    first = evidence[0]
    view = view_of(first)
    for keyword in HEADER_TYPE2_KEYWORDS:
        setattr(view, keyword, _header_value(first, keyword))
    return [view, *evidence[1:]]


def series_modality(evidence: Sequence[Dataset]) -> str:
    """The series' Modality, from the first image that states it ('' when none does)."""
    return next((m for ds in evidence if (m := str(ds.get("Modality") or "").strip())), "")
