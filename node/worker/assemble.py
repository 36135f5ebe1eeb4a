"""From the stored instances of one series to ordered stacks of 2D images (DICOM side, no torch).

A series as a scanner sends it is a bag of instances in no promised order, sometimes mixed:
a localizer with three orientations, a multi-frame instance holding a whole volume, a
presentation state or a report among the images. The model wants stacks: slices of the same
orientation, size and frame of reference, in order along the slice normal, in modality units.

- Grouping: by (Image Orientation (Patient), Rows, Columns, Frame of Reference UID), with a
  tolerance on the orientation (scanners write it with float noise).
- Ordering: by the projection of Image Position (Patient) on the slice normal (the cross product
  of the row and column directions, PS3.3 C.7.6.2.1.1); Instance Number (then frame number)
  when a stack lacks positions; file order as the last resort.
- Values: the Modality LUT (Rescale Slope/Intercept or a LUT, PS3.3 C.11.1) is applied, per
  frame for enhanced multi-frame objects (Pixel Value Transformation functional group).
- Multi-frame instances: each frame is a slice, with its geometry from the per-frame or shared
  functional groups (PS3.3 C.7.6.16).
- Objects without pixel data (SR, KOS, presentation states...) and images the model cannot
  judge (segmentations, dose grids, colour images) are set aside, with the reason.
- Compressed transfer syntaxes are decoded by pydicom's pixel backends (pylibjpeg and plugins).

A series that cannot be made sense of raises :class:`~node.errors.AssemblyError` with a reason
a person can read in the queue; one without any image raises
:class:`~node.errors.NoImages` (the worker skips it).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut
from pydicom.uid import RTDoseStorage, SegmentationStorage

from node.errors import AssemblyError, NoImages
from node.functional_groups import functional_group_item
from node.worker.acquisition import Acquisition, series_acquisition

log = logging.getLogger(__name__)

#: Largest difference between direction cosines still counted as the same orientation.
ORIENTATION_TOLERANCE = 1e-3
#: LPS axis of the slice normal -> plane name (x: sagittal, y: coronal, z: axial).
_PLANE_BY_AXIS = ("sagittal", "coronal", "axial")
#: A normal whose largest direction cosine is below this is called oblique.
_OBLIQUE_BELOW = 0.9
#: Per plane, the LPS direction in which the model layer's stacks run (right, anterior,
#: superior: the voxel order of a RAS volume, ``node.model.data.plane_slices``).
_ANATOMICAL_DIRECTION = {"sagittal": (-1.0, 0.0, 0.0), "coronal": (0.0, -1.0, 0.0),
                         "axial": (0.0, 0.0, 1.0)}
PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
#: Objects that carry pixel data but are not images of the patient to judge.
NOT_JUDGED_SOP_CLASSES: dict[str, str] = {
    str(SegmentationStorage): "segmentation",
    str(RTDoseStorage): "RT dose grid",
}
NOT_JUDGED_MODALITIES = {"SEG": "segmentation", "RTDOSE": "RT dose grid"}


@dataclass(frozen=True)
class SeriesAttributes:
    """What routing needs to know about a series, from its image headers.

    Attributes:
        study_instance_uid: Study Instance UID.
        series_instance_uid: Series Instance UID.
        modality: Modality (0008,0060).
        station_name: Station Name (0008,1010): which scanner made it.
        manufacturer: Manufacturer (0008,0070).
        scanner_model: Manufacturer's Model Name (0008,1090).
        body_part: Body Part Examined (0018,0015), upper case.
        series_description: Series Description (0008,103E).
        image_type: Image Type (0008,0008) values, upper case (the most common among images).
        complex_component: Complex Image Component (0008,9208) of enhanced MR, when present.
        acquisition: echo and repetition time, acquisition contrast (MR; empty otherwise;
            :func:`node.worker.acquisition.series_acquisition`).
    """

    study_instance_uid: str
    series_instance_uid: str
    modality: str | None
    body_part: str | None
    series_description: str | None
    image_type: tuple[str, ...]
    complex_component: str | None = None
    acquisition: Acquisition = field(default_factory=Acquisition)
    station_name: str | None = None
    manufacturer: str | None = None
    scanner_model: str | None = None


@dataclass(frozen=True)
class Slice:
    """One 2D image of a stack: one single-frame instance, or one frame of a multi-frame one.

    Attributes:
        sop_instance_uid: SOP Instance UID of the instance it comes from.
        sop_class_uid: its SOP Class UID.
        frame: 1-based frame number inside a multi-frame instance; None for a single frame.
        index: position in the series: stacks one after the other, each in slice order.
        stack: which stack of the series, from 0.
        pixels: float32 ``[rows, cols]`` in modality units (Modality LUT applied).
        pixel_spacing: (row, column) spacing in mm, when known.
        position: Image Position (Patient) projected on the stack normal (mm), when known.
        instance_number: Instance Number, when present.
        path: the file it was read from.
    """

    sop_instance_uid: str
    sop_class_uid: str
    frame: int | None
    index: int
    stack: int
    pixels: np.ndarray
    pixel_spacing: tuple[float, float] | None
    position: float | None
    instance_number: int | None
    path: Path


@dataclass(frozen=True)
class Stack:
    """Slices sharing orientation, size and frame of reference, ordered along the normal.

    Attributes:
        slices: the slices in order.
        orientation: the six direction cosines, when known.
        rows: image rows.
        columns: image columns.
        frame_of_reference_uid: Frame of Reference UID, when present.
        ordered_by: ``position``, ``instance number`` or ``file order``: how the order was found.
    """

    slices: tuple[Slice, ...]
    orientation: tuple[float, ...] | None
    rows: int
    columns: int
    frame_of_reference_uid: str | None
    ordered_by: str

    @property
    def images(self) -> list[np.ndarray]:
        """The pixel arrays, in slice order (what the model layer takes)."""
        return [s.pixels for s in self.slices]

    @property
    def pixel_spacings(self) -> list[tuple[float, float] | None]:
        """The (row, column) spacings, in slice order."""
        return [s.pixel_spacing for s in self.slices]

    @property
    def placement(self) -> tuple[str | None, bool]:
        """(plane, descending) for the model's position reference: the plane, and whether the
        stack runs against that plane's anatomical direction (left to right, posterior to
        anterior, inferior to superior). (None, False) when the stack was not ordered by
        position or is oblique."""
        if self.ordered_by != "position" or self.orientation is None:
            return None, False
        plane = plane_of(self.orientation)
        if plane not in _ANATOMICAL_DIRECTION:
            return None, False
        return plane, float(np.dot(_normal(self.orientation), _ANATOMICAL_DIRECTION[plane])) < 0

    @property
    def slice_spacing_mm(self) -> float | None:
        """The median distance between neighbouring slices along the normal (mm), for the
        position reference's coverage check; None without positions or with one slice."""
        positions = [s.position for s in self.slices]
        if self.ordered_by != "position" or len(positions) < 2 or None in positions:
            return None
        gap = float(np.median(np.diff(np.asarray(positions, dtype=np.float64))))
        return gap if gap > 0 else None

    def __len__(self) -> int:
        return len(self.slices)


def plane_of(orientation: Sequence[float] | None) -> str:
    """``axial``, ``coronal`` or ``sagittal`` from Image Orientation (Patient); ``oblique``
    when the slice normal is far from every axis or the orientation is unknown."""
    if orientation is None or len(orientation) != 6:
        return "oblique"
    normal = np.cross(np.asarray(orientation[:3], float), np.asarray(orientation[3:], float))
    norm = float(np.linalg.norm(normal))
    if norm == 0.0:
        return "oblique"
    normal = np.abs(normal) / norm
    axis = int(np.argmax(normal))
    return _PLANE_BY_AXIS[axis] if normal[axis] >= _OBLIQUE_BELOW else "oblique"


@dataclass(frozen=True)
class SetAside:
    """An object of the series that is not scored, and why."""

    sop_instance_uid: str
    sop_class_uid: str
    reason: str
    path: Path


@dataclass(frozen=True)
class AssembledSeries:
    """A series as stacks of images, plus what was set aside and the headers for the report.

    Attributes:
        attributes: routing attributes.
        stacks: the stacks, the largest first.
        set_aside: objects not scored, with the reason.
        sources: headers (no pixel data) of the instances that contributed slices.
    """

    attributes: SeriesAttributes
    stacks: tuple[Stack, ...]
    set_aside: tuple[SetAside, ...]
    sources: tuple[Dataset, ...]

    @property
    def slices(self) -> list[Slice]:
        """Every slice of every stack, in series order (``slice.index`` order)."""
        return [s for stack in self.stacks for s in stack.slices]


# --- reading ---------------------------------------------------------------------------------


def read_dataset(path: Path, *, headers_only: bool = False) -> Dataset:
    """Read one stored instance.

    Raises:
        AssemblyError: the file is missing or is not DICOM.
    """
    try:
        return dcmread(path, stop_before_pixels=headers_only)
    except FileNotFoundError as exc:
        raise AssemblyError(f"stored instance missing: {path}") from exc
    except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
        raise AssemblyError(f"{Path(path).name} is not readable DICOM: {exc}") from exc


def read_headers(paths: Iterable[Path]) -> list[Dataset]:
    """The headers (no pixel data) of the given files, for routing before decoding pixels."""
    return [read_dataset(Path(p), headers_only=True) for p in paths]


def _has_pixels(ds: Dataset) -> bool:
    return any(kw in ds for kw in PIXEL_KEYWORDS)


def _why_not_judged(ds: Dataset, *, headers_only: bool = False) -> str | None:
    """Why an object is not an image to score, or None when it is one.

    With ``headers_only`` (read with ``stop_before_pixels``, so Pixel Data is never there)
    Rows and Columns stand in for it: every image IOD has them, SR, KOS and states do not.
    """
    sop_class = str(ds.get("SOPClassUID", ""))
    has_pixels = ("Rows" in ds and "Columns" in ds) if headers_only else _has_pixels(ds)
    if not has_pixels:
        name = getattr(ds.get("SOPClassUID"), "name", sop_class) or "unknown SOP class"
        return f"no pixel data ({name})"
    if sop_class in NOT_JUDGED_SOP_CLASSES:
        return NOT_JUDGED_SOP_CLASSES[sop_class]
    modality = str(ds.get("Modality", "")).upper()
    if modality in NOT_JUDGED_MODALITIES:
        return NOT_JUDGED_MODALITIES[modality]
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    photometric = str(ds.get("PhotometricInterpretation", "")).upper()
    if samples != 1 or photometric == "PALETTE COLOR":
        return f"colour image ({samples} samples per pixel, {photometric or 'no photometric'})"
    return None


def _upper_values(value: object) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value.strip().upper(),) if value.strip() else ()
    return tuple(str(v).strip().upper() for v in value if str(v).strip())  # type: ignore[attr-defined]


def _text(value: object) -> str | None:
    text = str(value).strip() if value is not None else ""
    return text or None


def series_attributes(headers: Sequence[Dataset]) -> SeriesAttributes:
    """Routing attributes of a series from its instances' headers.

    Image instances decide (a report in the series does not change the modality); among them
    the most common Image Type is taken.

    Raises:
        AssemblyError: no headers, or they belong to more than one series.
    """
    if not headers:
        raise AssemblyError("the series has no instances")
    uids = {str(ds.get("SeriesInstanceUID", "")) for ds in headers}
    if len(uids) != 1:
        raise AssemblyError(f"instances of {len(uids)} different series were given together")
    images = [ds for ds in headers if _why_not_judged(ds, headers_only=True) is None]
    images = images or list(headers)
    types = Counter(_upper_values(ds.get("ImageType")) for ds in images)
    image_type = types.most_common(1)[0][0] if types else ()

    def first(keyword: str) -> str | None:
        # The first image that has it: one instance without Modality (a broken sender, a
        # hand-made object) must not make the whole series look like something else.
        return next((v for ds in images if (v := _text(ds.get(keyword))) is not None), None)

    body_part = first("BodyPartExamined")
    return SeriesAttributes(
        study_instance_uid=first("StudyInstanceUID") or "",
        series_instance_uid=uids.pop(),
        modality=first("Modality"),
        body_part=body_part.upper() if body_part else None,
        series_description=first("SeriesDescription"),
        image_type=image_type,
        complex_component=first("ComplexImageComponent"),
        acquisition=series_acquisition(images),
        station_name=first("StationName"),
        manufacturer=first("Manufacturer"),
        scanner_model=first("ManufacturerModelName"),
    )


# --- geometry --------------------------------------------------------------------------------


def _floats(value: object, count: int) -> tuple[float, ...] | None:
    if value is None:
        return None
    try:
        out = tuple(float(v) for v in value)  # type: ignore[attr-defined]
    except (TypeError, ValueError):
        return None
    if len(out) != count or not all(np.isfinite(out)):
        return None
    return out


@dataclass(frozen=True)
class _FrameInfo:
    orientation: tuple[float, ...] | None
    position: tuple[float, ...] | None
    spacing: tuple[float, float] | None
    rescale: Dataset | None  # a dataset holding RescaleSlope/Intercept for this frame


def _frame_info(ds: Dataset, frame_index: int | None) -> _FrameInfo:
    """Orientation, position, spacing and rescale of one frame (or of a single-frame image)."""
    item = functional_group_item(ds, frame_index, "PlaneOrientationSequence")
    orientation = _floats((item or ds).get("ImageOrientationPatient"), 6)
    item = functional_group_item(ds, frame_index, "PlanePositionSequence")
    if item is not None:
        position = _floats(item.get("ImagePositionPatient"), 3)
    elif frame_index is None or frame_index == 0 or "NumberOfFrames" not in ds:
        # A top-level position belongs to the first frame only (legacy multi-frame objects).
        position = _floats(ds.get("ImagePositionPatient"), 3)
    else:
        position = None
    item = functional_group_item(ds, frame_index, "PixelMeasuresSequence")
    spacing_values = _floats((item or ds).get("PixelSpacing"), 2)
    if spacing_values is None:
        spacing_values = _floats(ds.get("ImagerPixelSpacing"), 2)
    spacing = (spacing_values[0], spacing_values[1]) if spacing_values else None
    if spacing is not None and min(spacing) <= 0:
        spacing = None
    rescale = None
    item = functional_group_item(ds, frame_index, "PixelValueTransformationSequence")
    if item is not None and "RescaleSlope" in item and "RescaleIntercept" in item:
        rescale = Dataset()
        rescale.RescaleSlope = item.RescaleSlope
        rescale.RescaleIntercept = item.RescaleIntercept
    if orientation is not None:
        row, col = np.array(orientation[:3]), np.array(orientation[3:])
        if abs(np.linalg.norm(row) - 1) > 0.01 or abs(np.linalg.norm(col) - 1) > 0.01:
            orientation = None  # not direction cosines: no geometry rather than a wrong one
    return _FrameInfo(orientation, position, spacing, rescale)


def _normal(orientation: Sequence[float]) -> np.ndarray:
    row, col = np.asarray(orientation[:3]), np.asarray(orientation[3:])
    n = np.cross(row, col)
    return np.asarray(n / (np.linalg.norm(n) or 1.0))


# --- decoding --------------------------------------------------------------------------------


def _decode(ds: Dataset, path: Path) -> np.ndarray:
    """All frames of an instance as ``[frames, rows, cols]`` stored values."""
    try:
        arr = ds.pixel_array
    except Exception as exc:  # pydicom's decoders raise many types for bad data
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(syntax, "name", syntax)
        raise AssemblyError(
            f"pixel data of {path.name} (SOP {ds.get('SOPInstanceUID')}) cannot be decoded "
            f"({name}): {exc}"
        ) from exc
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames == 1 and arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3 or arr.shape[0] != frames:
        raise AssemblyError(
            f"{path.name}: pixel data shape {arr.shape} does not match {frames} frame(s) of "
            f"{ds.get('Rows')}x{ds.get('Columns')}"
        )
    return arr


def _to_modality_units(frame: np.ndarray, ds: Dataset, info: _FrameInfo) -> np.ndarray:
    source = info.rescale if info.rescale is not None else ds
    out = apply_modality_lut(frame, source)
    return np.ascontiguousarray(out, dtype=np.float32)


# --- assembly --------------------------------------------------------------------------------


@dataclass
class _Candidate:
    ds: Dataset
    path: Path
    frame: int | None
    info: _FrameInfo
    pixels: np.ndarray
    rows: int
    columns: int


def _same_orientation(a: tuple[float, ...] | None, b: tuple[float, ...] | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return float(np.max(np.abs(np.subtract(a, b)))) <= ORIENTATION_TOLERANCE


def _group(candidates: list[_Candidate]) -> list[list[_Candidate]]:
    groups: list[list[_Candidate]] = []
    for cand in candidates:
        for group in groups:
            head = group[0]
            if (
                head.rows == cand.rows
                and head.columns == cand.columns
                and head.ds.get("FrameOfReferenceUID") == cand.ds.get("FrameOfReferenceUID")
                and _same_orientation(head.info.orientation, cand.info.orientation)
            ):
                group.append(cand)
                break
        else:
            groups.append([cand])
    return groups


def _instance_number(ds: Dataset) -> int | None:
    try:
        value = ds.get("InstanceNumber")
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _order(group: list[_Candidate]) -> tuple[list[_Candidate], list[float | None], str]:
    """Sort one stack; returns the slices, their positions on the normal, and the method."""
    orientation = group[0].info.orientation
    if orientation is not None and all(c.info.position is not None for c in group):
        normal = _normal(orientation)
        pos = [float(np.dot(normal, c.info.position)) for c in group]  # type: ignore[arg-type]
        keyed = sorted(
            zip(pos, group, strict=True),
            key=lambda pc: (pc[0], _instance_number(pc[1].ds) or 0, pc[1].frame or 0),
        )
        return [c for _, c in keyed], [p for p, _ in keyed], "position"
    numbers = [_instance_number(c.ds) for c in group]
    if all(n is not None for n in numbers):
        ordered = sorted(group, key=lambda c: (_instance_number(c.ds) or 0, c.frame or 0))
        return ordered, [None] * len(group), "instance number"
    ordered = sorted(group, key=lambda c: (str(c.path), c.frame or 0))
    return ordered, [None] * len(group), "file order"


def _candidates(ds: Dataset, path: Path) -> list[_Candidate]:
    rows, columns = ds.get("Rows"), ds.get("Columns")
    if not rows or not columns:
        raise AssemblyError(f"{path.name}: an image without Rows/Columns")
    frames = _decode(ds, path)
    multi = frames.shape[0] > 1
    out = []
    for k in range(frames.shape[0]):
        info = _frame_info(ds, k if multi or "PerFrameFunctionalGroupsSequence" in ds else None)
        out.append(
            _Candidate(
                ds=ds,
                path=path,
                frame=k + 1 if multi else None,
                info=info,
                pixels=_to_modality_units(frames[k], ds, info),
                rows=int(rows),
                columns=int(columns),
            )
        )
    return out


def _header_copy(ds: Dataset) -> Dataset:
    """The dataset without its pixel data (what the report needs), sharing the elements."""
    header = Dataset()
    for elem in ds:
        if elem.keyword not in PIXEL_KEYWORDS:
            header.add(elem)
    if hasattr(ds, "file_meta"):
        header.file_meta = ds.file_meta
    return header


def assemble_series(paths: Sequence[Path]) -> AssembledSeries:
    """Read the instances of one series and build its ordered stacks.

    Args:
        paths: the instance files of one series, in any order.

    Returns:
        The stacks (largest first, ties by first Instance Number), what was set aside and why,
        and the instance headers for the report.

    Raises:
        NoImages: the series holds no image to score (only SR, KOS, presentation states...).
        AssemblyError: a file is unreadable or undecodable, files of several series are mixed,
            or an image lacks its size.
    """
    datasets = [(read_dataset(Path(p)), Path(p)) for p in paths]
    attributes = series_attributes([ds for ds, _ in datasets])
    set_aside: list[SetAside] = []
    candidates: list[_Candidate] = []
    sources: list[Dataset] = []
    seen: dict[str, Path] = {}
    for ds, path in datasets:
        reason = _why_not_judged(ds)
        sop_uid = str(ds.get("SOPInstanceUID", ""))
        if reason is None and sop_uid in seen:
            # The same instance twice (a folder given twice, a copy): scoring it twice would
            # count its verdict twice.
            reason = f"duplicate of {seen[sop_uid].name} (same SOP Instance UID)"
        seen.setdefault(sop_uid, path)
        if reason is not None:
            set_aside.append(
                SetAside(str(ds.get("SOPInstanceUID", "")), str(ds.get("SOPClassUID", "")),
                         reason, path)
            )
            continue
        candidates.extend(_candidates(ds, path))
        sources.append(_header_copy(ds))
    if not candidates:
        reasons = Counter(s.reason for s in set_aside)
        detail = ", ".join(f"{n} x {r}" for r, n in reasons.most_common())
        raise NoImages(f"no image to score in the series ({detail or 'no instances'})")

    groups = _group(candidates)
    groups.sort(
        key=lambda g: (-len(g), min((_instance_number(c.ds) or 0) for c in g), str(g[0].path))
    )
    stacks: list[Stack] = []
    index = 0
    for stack_no, group in enumerate(groups):
        ordered, positions, method = _order(group)
        slices = []
        for cand, pos in zip(ordered, positions, strict=True):
            slices.append(
                Slice(
                    sop_instance_uid=str(cand.ds.SOPInstanceUID),
                    sop_class_uid=str(cand.ds.SOPClassUID),
                    frame=cand.frame,
                    index=index,
                    stack=stack_no,
                    pixels=cand.pixels,
                    pixel_spacing=cand.info.spacing,
                    position=pos,
                    instance_number=_instance_number(cand.ds),
                    path=cand.path,
                )
            )
            index += 1
        head = group[0]
        stacks.append(
            Stack(
                slices=tuple(slices),
                orientation=head.info.orientation,
                rows=head.rows,
                columns=head.columns,
                frame_of_reference_uid=_text(head.ds.get("FrameOfReferenceUID")),
                ordered_by=method,
            )
        )
    log.info(
        "series assembled: %d slice(s) in %d stack(s), %d object(s) set aside",
        index,
        len(stacks),
        len(set_aside),
        extra={"series_uid": attributes.series_instance_uid},
    )
    return AssembledSeries(attributes, tuple(stacks), tuple(set_aside), tuple(sources))


# --- finding series in files and folders (for ``vaenode score``) -----------------------------


@dataclass(frozen=True)
class SeriesFiles:
    """The DICOM files of one series found under the paths given on the command line."""

    series_instance_uid: str
    paths: tuple[Path, ...]


def find_series(paths: Iterable[Path]) -> tuple[list[SeriesFiles], list[Path]]:
    """Group the DICOM files named or found (recursively) under ``paths`` by series.

    Files that are not DICOM (or lack a Series Instance UID, like a DICOMDIR) are returned
    apart so that the caller can say so; nothing is raised for them.

    Returns:
        (series in order of first appearance, files that were not used).
    """
    files: list[Path] = []
    for path in paths:
        path = Path(path)
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if p.is_file()))
        elif path.is_file():
            files.append(path)
        else:
            raise AssemblyError(f"no such file or folder: {path}")
    by_series: dict[str, list[Path]] = {}
    unused: list[Path] = []
    for file in files:
        try:
            ds = dcmread(file, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"])
        except (InvalidDicomError, OSError, ValueError, EOFError):
            unused.append(file)
            continue
        uid = str(ds.get("SeriesInstanceUID", "") or "")
        if not uid:
            unused.append(file)
            continue
        by_series.setdefault(uid, []).append(file)
    return [SeriesFiles(uid, tuple(p)) for uid, p in by_series.items()], unused
