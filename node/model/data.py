"""Training data: NIfTI volumes read in RAS, sliced in three planes, split by subject.

The model learns one kind of image from 2D slices. Volumes are sliced along all three axes so
that one model serves axial, coronal and sagittal acquisitions; background-only slices (the air
above the head, the ends of the field of view) carry no image quality information and are
dropped. The train/validation split is by subject: slices of one head are strongly correlated,
so a split by slice would let validation slices leak into training.

This module never reads DICOM (the model layer sees arrays only); DICOM series folders are
assembled by the worker layer (:mod:`node.worker.training_data`) and handed in as
:class:`SeriesStack` objects: the ordered 2D images of one stack with their pixel spacing.
A stack is used in its acquisition plane only; it is not resliced into the other two planes,
because DICOM series often have thick or gapped slices, and resliced images would look like
nothing a scanner sends. Background-slice removal and the split by subject apply to stacks
exactly as to the planes of a NIfTI volume.
"""

from __future__ import annotations

import logging
import random
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from node.errors import ModelError

log = logging.getLogger(__name__)

PLANES = ("axial", "coronal", "sagittal")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
# A slice is foreground when at least this fraction of its pixels exceeds FOREGROUND_LEVEL
# times the volume's robust maximum: the ends of a head volume (a few pixels of scalp) fail it.
FOREGROUND_FRACTION = 0.05
FOREGROUND_LEVEL = 0.1


@dataclass(frozen=True)
class Volume:
    """A 3D image in RAS voxel order with its voxel size in mm.

    Attributes:
        subject: identifier used to split by subject (e.g. ``IXI012``).
        data: float32 array indexed ``[x (R), y (A), z (S)]``.
        spacing: voxel size in mm along x, y, z.
        source: where it came from (file or folder), for messages.
    """

    subject: str
    data: np.ndarray
    spacing: tuple[float, float, float]
    source: str


@dataclass(frozen=True)
class SeriesStack:
    """One ordered stack of 2D images from a DICOM series, as the worker layer assembled it.

    Attributes:
        subject: identifier used to split by subject (the worker uses the Patient ID, so that
            the series of one patient stay on one side of the split; the Series Instance UID
            when there is no Patient ID).
        images: 2D float arrays (modality units), all of one size, in slice order.
        spacings: (row, col) pixel spacing in mm per image, None where unknown.
        plane: ``axial``, ``coronal``, ``sagittal`` (from the slice normal) or ``oblique``.
        source: the series (folder and UID), for messages.
        descending: the images run against the plane's anatomical direction (left to right,
            posterior to anterior, inferior to superior, as :func:`plane_slices` orders).
        slice_spacing_mm: distance between the images along their normal, when known.
    """

    subject: str
    images: tuple[np.ndarray, ...]
    spacings: tuple[tuple[float, float] | None, ...]
    plane: str
    source: str
    descending: bool = False
    slice_spacing_mm: float | None = None


#: What training takes: NIfTI volumes and DICOM stacks, mixed freely.
TrainingItem = Volume | SeriesStack


@dataclass(frozen=True)
class Slice2D:
    """One 2D slice as a viewer shows it, with its pixel spacing and where it came from."""

    image: np.ndarray
    spacing: tuple[float, float]
    subject: str
    plane: str
    index: int


def is_nifti(path: Path) -> bool:
    """True for ``.nii`` and ``.nii.gz`` files."""
    return path.name.endswith(NIFTI_SUFFIXES)


def find_nifti(paths: Iterable[Path]) -> list[Path]:
    """All NIfTI files named or found (recursively) under the given paths, sorted."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found.extend(p for p in path.rglob("*") if p.is_file() and is_nifti(p))
        elif path.is_file() and is_nifti(path):
            found.append(path)
        elif not path.exists():
            raise ModelError(f"training data not found: {path}")
    return sorted(set(found))


def subject_of(path: Path) -> str:
    """Subject identifier from a file name: ``IXI012-HH-1211_T1.nii.gz`` gives ``IXI012``."""
    name = path.name
    for suffix in NIFTI_SUFFIXES:
        name = name.removesuffix(suffix)
    match = re.match(r"^(IXI\d+)", name)
    return match.group(1) if match else name


def load_nifti(path: Path) -> Volume:
    """Read a NIfTI volume and reorient it to RAS (``nibabel.as_closest_canonical``).

    Raises:
        ModelError: the file is not a readable 3D (or single-volume 4D) image.
    """
    import nibabel as nib

    try:
        img = nib.as_closest_canonical(nib.load(str(path)))
        data = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as exc:  # nibabel raises many types for broken files
        raise ModelError(f"cannot read NIfTI {path}: {exc}") from exc
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise ModelError(f"{path}: expected a 3D volume, got shape {data.shape}")
    zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
    return Volume(subject_of(path), data, (zooms[0], zooms[1], zooms[2]), str(path))


def plane_slices(volume: Volume, plane: str) -> tuple[np.ndarray, tuple[float, float]]:
    """The volume as a stack of 2D slices in one plane, oriented as a radiologist views them.

    Axial: rows anterior to posterior, columns patient right to left (the usual DICOM LPS
    display); coronal: rows superior to inferior, columns right to left; sagittal: rows superior
    to inferior, columns anterior to posterior.

    Returns:
        (stack ``[n, rows, cols]`` in the voxel order of the RAS volume: left to right,
        posterior to anterior, inferior to superior; (row, col) spacing in mm).
    """
    d = volume.data
    sx, sy, sz = volume.spacing
    if plane == "axial":  # slice along z; image[row=A->P, col=R->L]
        stack = np.transpose(d[::-1, ::-1, :], (2, 1, 0))
        spacing = (sy, sx)
    elif plane == "coronal":  # slice along y; image[row=S->I, col=R->L]
        stack = np.transpose(d[::-1, :, ::-1], (1, 2, 0))
        spacing = (sz, sx)
    elif plane == "sagittal":  # slice along x; image[row=S->I, col=A->P]
        stack = np.transpose(d[:, ::-1, ::-1], (0, 2, 1))
        spacing = (sz, sy)
    else:
        raise ValueError(f"unknown plane {plane!r}; expected one of {PLANES}")
    return np.ascontiguousarray(stack), spacing


def slice_spacing(volume: Volume, plane: str) -> float:
    """Distance in mm between the slices :func:`plane_slices` cuts in ``plane``."""
    sx, sy, sz = volume.spacing
    return float({"axial": sz, "coronal": sy, "sagittal": sx}[plane])


def item_slice_spacing(item: TrainingItem, plane: str) -> float | None:
    """Distance in mm between the slices of ``item``'s stack in ``plane`` (a DICOM stack's own,
    None when its positions do not tell)."""
    return item.slice_spacing_mm if isinstance(item, SeriesStack) else slice_spacing(item, plane)


def item_stacks(
    item: TrainingItem, planes: Sequence[str] = PLANES
) -> list[tuple[str, np.ndarray, list[tuple[float, float] | None]]]:
    """The 2D stacks a training item contributes: (plane, ``[n, rows, cols]``, spacings).

    A volume gives one stack per requested plane. A DICOM stack gives itself when its plane is
    requested, or when it is oblique/unknown (no plane to filter it by); otherwise nothing.
    """
    if isinstance(item, Volume):
        out: list[tuple[str, np.ndarray, list[tuple[float, float] | None]]] = []
        for plane in planes:
            stack, spacing = plane_slices(item, plane)
            out.append((plane, stack, [spacing] * len(stack)))
        return out
    if item.plane in PLANES and item.plane not in planes:
        return []
    if not item.images:
        return []
    stack = np.stack([np.nan_to_num(np.asarray(im, dtype=np.float32)) for im in item.images])
    return [(item.plane, stack, list(item.spacings))]


def foreground_mask(stack: np.ndarray) -> np.ndarray:
    """Which slices of a stack show enough tissue to be worth modelling (bool per slice)."""
    hi = float(np.percentile(stack, 99.5)) if stack.size else 0.0
    if hi <= 0:
        return np.zeros(len(stack), dtype=bool)
    frac = (stack > FOREGROUND_LEVEL * hi).reshape(len(stack), -1).mean(axis=1)
    return frac >= FOREGROUND_FRACTION


def iter_slices(volume: Volume, planes: Sequence[str] = PLANES) -> Iterator[Slice2D]:
    """Foreground slices of a volume in the given planes."""
    for plane in planes:
        stack, spacing = plane_slices(volume, plane)
        keep = foreground_mask(stack)
        for i in np.flatnonzero(keep):
            yield Slice2D(stack[i], spacing, volume.subject, plane, int(i))


def split_subjects(
    subjects: Sequence[str], val_fraction: float, seed: int
) -> tuple[list[str], list[str]]:
    """Split subject identifiers into (train, validation), reproducibly from ``seed``.

    At least one subject goes to each side when there are two or more subjects.
    """
    unique = sorted(set(subjects))
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError("val_fraction must be in [0, 1)")
    rng = random.Random(seed)
    shuffled = unique[:]
    rng.shuffle(shuffled)
    n_val = round(len(unique) * val_fraction)
    if val_fraction > 0 and len(unique) >= 2:
        n_val = min(max(n_val, 1), len(unique) - 1)
    val = sorted(shuffled[:n_val])
    train = sorted(shuffled[n_val:])
    return train, val
