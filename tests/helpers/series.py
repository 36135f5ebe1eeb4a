"""Write volumes as real DICOM series, for tests that need a scanner's output.

A volume (NIfTI, or a numpy array in RAS voxel order) becomes a folder of single-frame MR or CT
Image Storage instances: one axial slice per instance, with proper geometry (Image Orientation
and Position (Patient) in LPS, Pixel Spacing, Slice Thickness), fresh UIDs, a rescale, and the
modules a PACS expects. Optionally a contiguous block of slices carries moderate TorchIO motion
(the definition of :mod:`node.model.artifacts`, so that "moderate motion" means one thing in the
model's evaluation and in the end-to-end tests).

Used by the worker tests, the ingest tests and the end-to-end tests::

    from tests.helpers.series import write_nifti_series
    written = write_nifti_series(IXI / "IXI012-HH-1211_T1.nii.gz", tmp_path / "clean")
    corrupted = write_nifti_series(..., tmp_path / "motion", corrupt_block=(40, 55))

Slices follow :func:`node.model.data.plane_slices` (axial: rows anterior to posterior, columns
patient right to left), so the images the worker assembles from these files are the very arrays
the model was trained on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
IXI = DATA / "ixi_t1"
DICOM = DATA / "dicom"

#: Default image type of a scanner's reconstructed magnitude images (PS3.3 C.8.3.1.1.1).
ORIGINAL_PRIMARY = ("ORIGINAL", "PRIMARY", "M", "ND")


@dataclass(frozen=True)
class WrittenSeries:
    """What :func:`write_series` wrote.

    Attributes:
        folder: the folder holding the files.
        paths: one file per slice, in slice order (inferior to superior).
        study_instance_uid: Study Instance UID of every file.
        series_instance_uid: Series Instance UID of every file.
        frame_of_reference_uid: Frame of Reference UID of every file.
        sop_instance_uids: SOP Instance UID per slice, in slice order.
        corrupted: indices (in slice order) of the slices that carry the artifact.
    """

    folder: Path
    paths: list[Path]
    study_instance_uid: str
    series_instance_uid: str
    frame_of_reference_uid: str
    sop_instance_uids: list[str]
    corrupted: frozenset[int] = field(default_factory=frozenset)

    def __len__(self) -> int:
        return len(self.paths)


def load_volume(path: Path) -> tuple[np.ndarray, tuple[float, float, float]]:
    """A NIfTI volume in RAS voxel order (``nibabel.as_closest_canonical``) and its voxel size."""
    from node.model.data import load_nifti

    vol = load_nifti(Path(path))
    return vol.data, vol.spacing


def artifact_block(
    volume: np.ndarray,
    spacing: tuple[float, float, float],
    block: tuple[int, int],
    *,
    artifact: str = "motion",
    severity: str = "moderate",
    seed: int = 0,
) -> np.ndarray:
    """The volume with axial slices ``block[0]:block[1]`` replaced by corrupted ones.

    The whole volume is corrupted by TorchIO (:data:`node.model.artifacts.ARTIFACTS`: motion
    and ghosting in k-space, 3D) and only the block is spliced in: the patient moved, or the
    RF spike happened, during that part of a 2D multi-slice acquisition.
    """
    from node.model.artifacts import corrupt_volume, splice_block

    corrupted = corrupt_volume(volume, spacing, artifact, severity, seed)
    return splice_block(volume, corrupted, block[0], block[1], axis=2)


def motion_block(volume: np.ndarray, spacing: tuple[float, float, float],
                 block: tuple[int, int], *, severity: str = "moderate", seed: int = 0,
                 ) -> np.ndarray:
    """:func:`artifact_block` with motion."""
    return artifact_block(volume, spacing, block, artifact="motion", severity=severity,
                          seed=seed)


def axial_slices(volume: np.ndarray) -> np.ndarray:
    """``[z, rows, cols]`` axial images of a RAS volume, as :func:`plane_slices` orients them."""
    return np.ascontiguousarray(np.transpose(np.asarray(volume)[::-1, ::-1, :], (2, 1, 0)))


def _base_dataset(
    *,
    modality: str,
    sop_class: UID,
    study_uid: str,
    series_uid: str,
    for_uid: str,
    patient_id: str,
    patient_name: str,
    series_description: str,
    series_number: int,
    body_part: str | None,
    image_type: Sequence[str],
    now: datetime,
    station_name: str | None = None,
) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    # Patient, General Study, General Series (PS3.3 C.7.1.1, C.7.2.1, C.7.3.1)
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.StudyInstanceUID = study_uid
    ds.StudyDate = now.strftime("%Y%m%d")
    ds.StudyTime = now.strftime("%H%M%S")
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.AccessionNumber = ""
    ds.Modality = modality
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = series_number
    ds.SeriesDescription = series_description
    ds.SeriesDate = ds.StudyDate
    ds.SeriesTime = ds.StudyTime
    ds.PatientPosition = "HFS"
    if body_part:
        ds.BodyPartExamined = body_part
    # Frame of Reference, General Equipment (C.7.4.1, C.7.5.1)
    ds.FrameOfReferenceUID = for_uid
    ds.PositionReferenceIndicator = ""
    ds.Manufacturer = "vaenode tests"
    ds.ManufacturerModelName = "tests.helpers.series"
    if station_name:
        ds.StationName = station_name
    # General Image, Image Pixel (C.7.6.1, C.7.6.3)
    ds.ImageType = list(image_type)
    ds.AcquisitionNumber = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    if modality == "MR":  # MR Image (C.8.3.1): a spin-echo-like T1
        ds.ScanningSequence = "SE"
        ds.SequenceVariant = "NONE"
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "2D"
        ds.RepetitionTime = 500.0
        ds.EchoTime = 15.0
        ds.EchoTrainLength = 1
        ds.MagneticFieldStrength = 3.0
        ds.ImagedNucleus = "1H"
    else:  # CT Image (C.8.2.1)
        ds.KVP = 120.0
    return ds


def write_series(
    volume: np.ndarray,
    spacing: tuple[float, float, float],
    out_dir: Path,
    *,
    modality: str = "MR",
    study_instance_uid: str | None = None,
    series_instance_uid: str | None = None,
    patient_id: str = "VAENODE-TEST-1",
    patient_name: str = "Test^Volunteer",
    series_description: str = "T1 axial (test)",
    series_number: int = 1,
    body_part: str | None = "BRAIN",
    image_type: Sequence[str] = ORIGINAL_PRIMARY,
    rescale_slope: float = 1.0,
    rescale_intercept: float | None = None,
    transfer_syntax: UID = ExplicitVRLittleEndian,
    corrupted: Sequence[int] = (),
    station_name: str | None = None,
    images_in_acquisition: int | None = None,
) -> WrittenSeries:
    """Write a RAS volume as an axial single-frame DICOM series, one file per slice.

    Stored values are ``round((value - intercept) / slope)`` in unsigned 16 bits; readers get
    the values back (to within half a slope) through the Modality LUT.

    Args:
        volume: ``[x (R), y (A), z (S)]`` in modality units (for example from :func:`load_volume`).
        spacing: voxel size in mm along x, y, z.
        out_dir: folder to write ``slice_NNNN.dcm`` files to (created).
        modality: ``MR`` (MR Image Storage) or ``CT`` (CT Image Storage).
        study_instance_uid, series_instance_uid: reuse UIDs (e.g. two series in one study);
            fresh ones when None.
        patient_id, patient_name, series_description, series_number, body_part, image_type:
            header values; ``image_type`` decides how the worker routes the series.
        rescale_slope, rescale_intercept: the rescale written; the intercept defaults to 0 for
            MR and -1024 for CT.
        transfer_syntax: any syntax pydicom can encode (Explicit VR Little Endian, RLE...).
        corrupted: slice indices to record as corrupted in the result (the caller corrupted
            them, see :func:`write_nifti_series`).
        station_name: Station Name (0008,1010) to write; none when None.
        images_in_acquisition: Images in Acquisition (0020,1002) in every file, as scanners
            declare the count of a series (the node's completion rule waits for it); absent
            when None.

    Returns:
        The files and UIDs, in slice order.
    """
    if modality not in ("MR", "CT"):
        raise ValueError(f"modality must be MR or CT, got {modality!r}")
    if rescale_slope <= 0:
        raise ValueError("rescale_slope must be positive")
    intercept = rescale_intercept
    if intercept is None:
        intercept = -1024.0 if modality == "CT" else 0.0
    sop_class = MRImageStorage if modality == "MR" else CTImageStorage
    study_uid = study_instance_uid or generate_uid()
    series_uid = series_instance_uid or generate_uid()
    for_uid = generate_uid()
    now = datetime.now(UTC)

    images = axial_slices(volume)
    n, rows, cols = images.shape
    sx, sy, sz = (float(s) for s in spacing)
    stored = np.rint((images.astype(np.float64) - intercept) / rescale_slope)
    stored = np.clip(stored, 0, 65535).astype(np.uint16)
    lo, hi = np.percentile(images, [1, 99]) if images.size else (0.0, 1.0)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    base = _base_dataset(
        modality=modality,
        sop_class=sop_class,
        study_uid=study_uid,
        series_uid=series_uid,
        for_uid=for_uid,
        patient_id=patient_id,
        patient_name=patient_name,
        series_description=series_description,
        series_number=series_number,
        body_part=body_part,
        image_type=image_type,
        now=now,
        station_name=station_name,
    )
    if images_in_acquisition is not None:
        base.ImagesInAcquisition = images_in_acquisition
    paths: list[Path] = []
    sops: list[str] = []
    for k in range(n):
        ds = base.copy()
        sop_uid = generate_uid()
        ds.SOPInstanceUID = sop_uid
        ds.InstanceNumber = k + 1
        ds.ContentDate = ds.StudyDate
        ds.ContentTime = ds.StudyTime
        # Image Plane (C.7.6.2), LPS: rows run along +x (to the patient's left), columns along
        # +y (posterior); the normal (+z) points superior, so slice k sits at z = k * sz.
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        z = (k - (n - 1) / 2.0) * sz
        ds.ImagePositionPatient = [-(cols - 1) * sx / 2.0, -(rows - 1) * sy / 2.0, round(z, 4)]
        ds.SliceLocation = round(z, 4)
        ds.PixelSpacing = [sy, sx]  # (row spacing, column spacing)
        ds.SliceThickness = sz
        ds.Rows = rows
        ds.Columns = cols
        ds.RescaleIntercept = intercept
        ds.RescaleSlope = rescale_slope
        ds.RescaleType = "HU" if modality == "CT" else "US"
        ds.WindowCenter = round(float(lo + hi) / 2.0, 2)
        ds.WindowWidth = max(round(float(hi - lo), 2), 1.0)
        ds.PixelData = stored[k].tobytes()

        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds.file_meta = meta
        if transfer_syntax != ExplicitVRLittleEndian:
            ds.compress(transfer_syntax)
        path = out_dir / f"slice_{k + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
        sops.append(sop_uid)
    return WrittenSeries(
        folder=out_dir,
        paths=paths,
        study_instance_uid=study_uid,
        series_instance_uid=series_uid,
        frame_of_reference_uid=for_uid,
        sop_instance_uids=sops,
        corrupted=frozenset(int(i) for i in corrupted),
    )


def write_nifti_series(
    nifti: Path,
    out_dir: Path,
    *,
    corrupt_block: tuple[int, int] | None = None,
    artifact: str = "motion",
    severity: str = "moderate",
    seed: int = 0,
    **kwargs: object,
) -> WrittenSeries:
    """Write a NIfTI volume as an axial DICOM series, optionally with a corrupted block.

    Args:
        nifti: a NIfTI file (for example an IXI T1 volume).
        out_dir: folder for the files.
        corrupt_block: (start, stop) axial slice indices (inferior to superior) that carry
            the TorchIO ``artifact`` (default motion) of ``severity``; None for a clean series.
        severity: ``mild`` or ``moderate`` (:data:`node.model.artifacts.PARAMETERS`).
        seed: seed of the artifact's random parameters.
        **kwargs: passed to :func:`write_series` (UIDs, modality, image type...).
    """
    volume, spacing = load_volume(nifti)
    corrupted: Sequence[int] = ()
    if corrupt_block is not None:
        start, stop = corrupt_block
        if not 0 <= start < stop <= volume.shape[2]:
            raise ValueError(f"block {corrupt_block} outside 0..{volume.shape[2]}")
        volume = artifact_block(volume, spacing, corrupt_block, artifact=artifact,
                                severity=severity, seed=seed)
        corrupted = range(start, stop)
    return write_series(volume, spacing, out_dir, corrupted=corrupted, **kwargs)  # type: ignore[arg-type]
