"""Builders for report tests: verdicts on real series, and a series stored as ingest would."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from sqlalchemy.orm import Session, sessionmaker

from node.queue.models import Instance, Series, utcnow
from node.queue.states import SeriesState
from node.report.content import SeriesVerdict, SliceVerdict

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def make_verdict(
    sources: list[Dataset], flagged: set[int], min_abnormal_slices: int = 3
) -> SeriesVerdict:
    """A verdict on ``sources`` with the slices at ``flagged`` positions abnormal."""
    slices = [
        SliceVerdict(
            sop_instance_uid=d.SOPInstanceUID,
            sop_class_uid=d.SOPClassUID,
            frame=None,
            index=i,
            log_likelihood=-1500.0 - 10.0 * i if i in flagged else -900.0 + i,
            kl=12.5 + i,
            elbo=-1600.0 + i,
            abnormal=i in flagged,
            confidence=0.9 if i in flagged else 0.75,
        )
        for i, d in enumerate(sources)
    ]
    return SeriesVerdict.from_slices(
        study_instance_uid=sources[0].StudyInstanceUID,
        series_instance_uid=sources[0].SeriesInstanceUID,
        slices=slices,
        min_abnormal_slices=min_abnormal_slices,
        threshold=-1234.5,
        estimator="importance",
        model_name="brain-t1-vae",
        model_version="1.2.3",
        samples=16,
        rule="brain-t1-mr",
    )


def add_series(
    session_factory: sessionmaker[Session], storage: Path, source_files: list[Path]
) -> str:
    """Store the real series as ingest would (files + rows, status processing)."""
    first = pydicom.dcmread(source_files[0], stop_before_pixels=True)
    now = utcnow()
    with session_factory.begin() as session:
        series = Series(
            study_instance_uid=first.StudyInstanceUID,
            series_instance_uid=first.SeriesInstanceUID,
            modality=first.Modality,
            instance_count=len(source_files),
            first_received_at=now - timedelta(minutes=1),
            last_received_at=now,
            status=SeriesState.PROCESSING,
            attempts=1,
            updated_at=now,
        )
        session.add(series)
        for f in source_files:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
            rel = Path(ds.StudyInstanceUID) / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"
            (storage / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, storage / rel)
            session.add(
                Instance(
                    series=series,
                    sop_instance_uid=ds.SOPInstanceUID,
                    sop_class_uid=ds.SOPClassUID,
                    transfer_syntax_uid=ds.file_meta.TransferSyntaxUID,
                    path=str(rel),
                    size_bytes=f.stat().st_size,
                    instance_number=int(ds.InstanceNumber),
                    received_at=now,
                )
            )
    return str(first.SeriesInstanceUID)


# --- reading reports back ---------------------------------------------------------------------


@dataclass(frozen=True)
class GroupView:
    """One TID 1501 measurement group of an SR, as plain values."""

    tracking_id: str
    finding: str  # code value of the Finding
    references: tuple[tuple[str, str, tuple[int, ...]], ...]  # (SOP class, SOP instance, frames)
    measurements: dict[str, float]  # code meaning -> value
    units: dict[str, str]  # code meaning -> UCUM code
    evaluations: dict[str, str]  # code meaning of the concept -> code value of the answer
    algorithm: dict[str, list[str]]  # "Algorithm Name" / "Version" / "Parameters" -> texts
    texts: dict[str, str] = field(default_factory=dict)  # other TEXT items: meaning -> value


def _meaning(item: Dataset) -> str:
    return str(item.ConceptNameCodeSequence[0].CodeMeaning)


def _find(items: Sequence[Dataset], meaning: str) -> Dataset:
    for item in items:
        if "ConceptNameCodeSequence" in item and _meaning(item) == meaning:
            return item
    raise AssertionError(f"no content item {meaning!r}")


def image_library(sr: Dataset) -> dict[str, dict[str, float]] | None:
    """The Image Library of a TID 1500 report (None when it has none): per referenced SOP
    Instance UID, its numeric descriptors by concept name."""
    items = [i for i in sr.ContentSequence
             if "ConceptNameCodeSequence" in i and _meaning(i) == "Image Library"]
    if not items:
        return None
    entries: dict[str, dict[str, float]] = {}
    for group in items[0].ContentSequence:
        assert _meaning(group) == "Image Library Group"
        for entry in group.ContentSequence:
            if entry.ValueType != "IMAGE":
                continue
            uid = str(entry.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
            entries[uid] = {_meaning(d): float(d.MeasuredValueSequence[0].NumericValue)
                            for d in entry.ContentSequence if d.ValueType == "NUM"}
    return entries


def measurement_groups(sr: Dataset) -> list[GroupView]:
    """Every measurement group of a TID 1500 report, read from the raw content tree."""
    measurements = _find(sr.ContentSequence, "Imaging Measurements")
    groups = []
    for group in measurements.ContentSequence:
        assert _meaning(group) == "Measurement Group"
        tracking, finding = "", ""
        refs: list[tuple[str, str, tuple[int, ...]]] = []
        values: dict[str, float] = {}
        units: dict[str, str] = {}
        evaluations: dict[str, str] = {}
        algorithm: dict[str, list[str]] = {}
        texts: dict[str, str] = {}
        for item in group.ContentSequence:
            meaning = _meaning(item)
            if item.ValueType == "TEXT" and meaning == "Tracking Identifier":
                tracking = str(item.TextValue)
            elif item.ValueType == "TEXT" and meaning.startswith("Algorithm"):
                algorithm.setdefault(meaning, []).append(str(item.TextValue))
            elif item.ValueType == "TEXT":
                texts[meaning] = str(item.TextValue)
            elif item.ValueType == "CODE" and meaning == "Finding":
                finding = str(item.ConceptCodeSequence[0].CodeValue)
            elif item.ValueType == "CODE":
                evaluations[meaning] = str(item.ConceptCodeSequence[0].CodeValue)
            elif item.ValueType == "NUM":
                mv = item.MeasuredValueSequence[0]
                values[meaning] = float(mv.NumericValue)
                units[meaning] = str(mv.MeasurementUnitsCodeSequence[0].CodeValue)
            elif item.ValueType == "IMAGE":
                ref = item.ReferencedSOPSequence[0]
                frames = ref.get("ReferencedFrameNumber")
                if frames is None:
                    frame_tuple: tuple[int, ...] = ()
                elif isinstance(frames, int | str):
                    frame_tuple = (int(frames),)
                else:
                    frame_tuple = tuple(int(f) for f in frames)
                refs.append(
                    (str(ref.ReferencedSOPClassUID), str(ref.ReferencedSOPInstanceUID), frame_tuple)
                )
        groups.append(
            GroupView(tracking, finding, tuple(refs), values, units, evaluations, algorithm,
                      texts)
        )
    return groups


def kos_references(kos: Dataset) -> list[str]:
    """SOP Instance UIDs a Key Object Selection document lists, in content order."""
    out = []
    for item in kos.ContentSequence:
        if item.ValueType in ("IMAGE", "COMPOSITE"):
            out.append(str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID))
    return out


def dciodvfy(path: Path) -> tuple[list[str], list[str]]:
    """Run dicom3tools' ``dciodvfy`` on a file; return (errors, warnings) lines."""
    proc = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, check=False)
    lines = (proc.stdout + proc.stderr).splitlines()
    errors = [line for line in lines if line.startswith("Error")]
    warnings = [line for line in lines if line.startswith("Warning")]
    return errors, warnings
