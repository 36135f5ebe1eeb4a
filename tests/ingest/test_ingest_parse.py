"""The structural check of received instances, against pydicom on real files."""

from __future__ import annotations

import io
import zlib
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import DeflatedExplicitVRLittleEndian

from node.errors import InvalidUID, MissingAttribute, Undecodable
from node.ingest.parse import check_uid, parse_instance
from tests.helpers.ingest_data import DATA_SERIES, DICOM_DATA
from tests.helpers.synthetic import write_ct_series

# pydicom-data files cut short on purpose: pydicom reads them without complaint, we must not.
TRUNCATED = ("emri_small_jpeg_2k_lossless_too_short.dcm",)


def test_truncated_real_files_are_refused(pydicom_data: Path) -> None:
    for name in TRUNCATED:
        with pytest.raises(Undecodable):
            parse_instance((pydicom_data / name).read_bytes())


def _real_files(pydicom_data: Path) -> list[Path]:
    files = [p for p in sorted(pydicom_data.glob("*.dcm")) if p.name not in TRUNCATED]
    for name in DATA_SERIES:
        files += sorted((DICOM_DATA / name).glob("*.dcm"))[:3]
    return files


def test_reads_the_same_uids_as_pydicom(pydicom_data: Path) -> None:
    checked = named = 0
    for path in _real_files(pydicom_data):
        raw = path.read_bytes()
        if raw[128:132] != b"DICM":
            continue  # no file meta: not what a C-STORE delivers
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        if "StudyInstanceUID" not in ds:
            continue
        if ds.file_meta.get("MediaStorageSOPInstanceUID") != ds.SOPInstanceUID:
            continue  # a broken test file; on the wire the meta comes from the request
        parsed = parse_instance(raw)
        assert parsed.sop_instance_uid == ds.SOPInstanceUID, path.name
        assert parsed.series_instance_uid == ds.SeriesInstanceUID, path.name
        assert parsed.transfer_syntax_uid == ds.file_meta.TransferSyntaxUID, path.name
        assert parsed.modality == ds.get("Modality"), path.name
        for name, keyword in (("station_name", "StationName"), ("manufacturer", "Manufacturer"),
                              ("scanner_model", "ManufacturerModelName")):
            value = str(ds.get(keyword) or "").strip() or None
            assert getattr(parsed, name) == (value[:64] if value else None), (path.name, name)
            named += value is not None
        declared = ds.get("ImagesInAcquisition")
        single = int(ds.get("NumberOfFrames") or 1) == 1
        assert parsed.images_in_acquisition == (
            int(declared) if declared and int(declared) > 0 and single else None), path.name
        checked += 1
    assert checked > 40 and named > 40


@pytest.mark.parametrize(("value", "frames", "expected"), [
    ("120", None, 120), (" 7 ", None, 7), ("0", None, None), ("-3", None, None),
    ("abc", None, None), (None, None, None), ("40", "40", None), ("40", "1", 40),
    ("1000000", None, None),
])
def test_images_in_acquisition(tmp_path: Path, value: str | None, frames: str | None,
                               expected: int | None) -> None:
    """What the queue waits for before it takes a released series as complete: a positive
    count from a single-frame instance, nothing from anything else."""
    path = write_ct_series(tmp_path, 1)[0]
    ds = pydicom.dcmread(path)
    if value is not None:  # free text, as broken senders write it: LO lets pydicom encode it
        ds.add_new(0x00201002, "IS" if value.strip().lstrip("-").isdigit() else "LO", value)
    if frames is not None:
        ds.add_new(0x00280008, "IS", frames)
    ds.save_as(path, enforce_file_format=True)
    assert parse_instance(path.read_bytes()).images_in_acquisition == expected


@pytest.mark.parametrize("keep", [0.999, 0.5, 0.01])
def test_truncated_instances_are_refused(tmp_path: Path, keep: float) -> None:
    raw = write_ct_series(tmp_path, 1)[0].read_bytes()
    with pytest.raises(Undecodable):
        parse_instance(raw[: int(len(raw) * keep)])


def test_garbage_is_refused(tmp_path: Path) -> None:
    raw = write_ct_series(tmp_path, 1)[0].read_bytes()
    ds = pydicom.dcmread(io.BytesIO(raw))
    meta_end = raw.index(b"\x08\x00")  # first non-meta tag (0008,xxxx) after the meta
    with pytest.raises(Undecodable):
        parse_instance(raw[:meta_end] + bytes(range(256)) * 20)
    with pytest.raises(Undecodable):
        parse_instance(b"not dicom at all")
    with pytest.raises(Undecodable):  # trailing bytes after the dataset
        parse_instance(raw + b"\x01")
    assert parse_instance(raw).sop_instance_uid == ds.SOPInstanceUID


def test_deflated_dataset_is_inflated_to_check_it(tmp_path: Path) -> None:
    path = write_ct_series(tmp_path, 1)[0]
    ds = pydicom.dcmread(path)
    out = tmp_path / "deflated.dcm"
    ds.save_as(out, implicit_vr=False, little_endian=True, enforce_file_format=True)
    ds = pydicom.dcmread(out)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.save_as(out, enforce_file_format=True)
    raw = out.read_bytes()
    assert parse_instance(raw).sop_instance_uid == ds.SOPInstanceUID
    with pytest.raises(Undecodable):
        parse_instance(raw[:-40])
    assert zlib  # the module under test uses zlib's raw deflate


@pytest.mark.parametrize("uid", ["../../x", "1.2.3/4", "1..2", "", "1.2.a", "1." + "2" * 64])
def test_invalid_uids(uid: str) -> None:
    with pytest.raises(InvalidUID):
        check_uid(uid, "SOPInstanceUID")


def test_path_traversal_uid_in_dataset_is_refused(tmp_path: Path) -> None:
    path = write_ct_series(tmp_path, 1)[0]
    ds = pydicom.dcmread(path)
    ds.SOPInstanceUID = "../../x"
    ds.file_meta.MediaStorageSOPInstanceUID = "../../x"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    with pytest.raises(InvalidUID):
        parse_instance(buf.getvalue())


def test_missing_series_uid(tmp_path: Path) -> None:
    ds = pydicom.dcmread(write_ct_series(tmp_path, 1)[0])
    del ds.SeriesInstanceUID
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    with pytest.raises(MissingAttribute):
        parse_instance(buf.getvalue())


def test_encoded_file_meta_reads_back_with_pydicom() -> None:
    from node.ingest.meta import encode_file_meta

    dataset = b"\x08\x00\x18\x00UI\x0a\x001.2.3.4.5\x00"
    raw = encode_file_meta("1.2.840.10008.5.1.4.1.1.2", "1.2.3.4.5", "1.2.840.10008.1.2.1",
                           "SCU") + dataset
    ds = pydicom.dcmread(io.BytesIO(raw))
    assert ds.file_meta.MediaStorageSOPInstanceUID == "1.2.3.4.5"
    assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    assert ds.file_meta.SourceApplicationEntityTitle == "SCU"
    assert ds.file_meta.FileMetaInformationGroupLength == len(raw) - 132 - len(dataset) - 12
    from tests.helpers.ingest_data import dataset_bytes

    assert dataset_bytes(raw) == dataset
