"""DICOM series folders as training data: assembled stacks handed to the model layer as arrays.

``vaenode train --data`` takes DICOM series folders as well as NIfTI volumes. The model layer
never reads DICOM, so this module (the worker layer joins the two) finds the series under the
given paths, assembles each with :func:`node.worker.assemble.assemble_series` (the very code
that prepares series for scoring: same ordering, same Modality LUT) and turns every stack into a
:class:`node.model.data.SeriesStack`.

Subject for the train/validation split: the Patient ID, so that several series (or stacks) of
one patient stay on the same side of the split; the Series Instance UID when the Patient ID is
empty. A Patient ID equal to a NIfTI subject name (``IXI012``) joins that subject.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from node.errors import AssemblyError, NoImages
from node.model.data import SeriesStack, is_nifti
from node.worker.assemble import assemble_series, find_series, plane_of

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class DicomTrainingData:
    """What was found: the stacks, and what could not be used (with reasons, for messages)."""

    stacks: list[SeriesStack]
    problems: list[str]
    other_files: int


def load_dicom_stacks(paths: Iterable[Path]) -> DicomTrainingData:
    """Every image stack of every DICOM series under ``paths`` (files or folders, recursive).

    NIfTI files are skipped silently (the caller reads them); other non-DICOM files are
    counted. A series that cannot be assembled is reported in ``problems`` and skipped, so one
    broken series does not stop a training run; the caller decides what to do when nothing is
    left.
    """
    series, unused = find_series([Path(p) for p in paths])
    other = sum(1 for p in unused if not is_nifti(p))
    stacks: list[SeriesStack] = []
    problems: list[str] = []
    for found in series:
        folder = found.paths[0].parent
        try:
            assembled = assemble_series(found.paths)
        except (AssemblyError, NoImages) as exc:
            problems.append(f"series in {folder}: {exc}")
            log.warning("training data: series skipped: %s", exc,
                        extra={"series_uid": found.series_instance_uid})
            continue
        patient = _patient_id(assembled.sources)
        subject = patient or found.series_instance_uid
        for stack in assembled.stacks:
            stacks.append(
                SeriesStack(
                    subject=subject,
                    images=tuple(np.asarray(im, dtype=np.float32) for im in stack.images),
                    spacings=tuple(stack.pixel_spacings),
                    plane=plane_of(stack.orientation),
                    source=f"{folder} (series {found.series_instance_uid})",
                    descending=stack.placement[1],
                    slice_spacing_mm=stack.slice_spacing_mm,
                )
            )
    return DicomTrainingData(stacks, problems, other)


def _patient_id(headers: Sequence[object]) -> str | None:
    for ds in headers:
        value = str(getattr(ds, "PatientID", "") or "").strip()
        if value:
            return value
    return None
