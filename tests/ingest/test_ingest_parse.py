"""The structural check of received instances, against pydicom on real files."""

from __future__ import annotations

import io
import re
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


def _instance(elements: bytes, sop_class: str = "1.2.840.10008.5.1.4.1.1.4",
              sop_instance: str = "1.2.3.4", request_class: str | None = None) -> bytes:
    """A minimal Explicit VR LE instance: SOP class and instance, ``elements``, study and
    series UIDs; its file meta names ``request_class`` (as the C-STORE request did)."""
    from node.ingest.meta import encode_file_meta

    def ui(tag: bytes, value: str) -> bytes:
        raw = value.encode() + b"\0" * (len(value) % 2)
        return tag + b"UI" + len(raw).to_bytes(2, "little") + raw

    data = (ui(b"\x08\x00\x16\x00", sop_class) + ui(b"\x08\x00\x18\x00", sop_instance)
            + elements + ui(b"\x20\x00\x0d\x00", "1.2.3") + ui(b"\x20\x00\x0e\x00", "1.2.3.1"))
    return encode_file_meta(request_class or sop_class, sop_instance, "1.2.840.10008.1.2.1",
                            "SCU") + data


@pytest.mark.parametrize("vr", [b"ZZ", b"WS", b"zz", b"\0\0"])
def test_a_vr_outside_ps3_5_is_refused(vr: bytes) -> None:
    with pytest.raises(Undecodable, match="invalid VR"):
        parse_instance(_instance(b"\x10\x00\x10\x00" + vr + b"\x02\x00ab"))
    assert parse_instance(_instance(b"\x10\x00\x10\x00PN\x02\x00ab")).study_instance_uid


def _nested(depth: int) -> bytes:
    """(0010,1002) with ``depth`` nested undefined-length sequences."""
    opening = b"\x10\x00\x02\x10SQ\0\0\xff\xff\xff\xff" + b"\xfe\xff\x00\xe0\xff\xff\xff\xff"
    closing = b"\xfe\xff\x0d\xe0\0\0\0\0" + b"\xfe\xff\xdd\xe0\0\0\0\0"
    return opening * depth + closing * depth


def test_sequences_nest_at_most_64_deep() -> None:
    from node.ingest.parse import MAX_SEQUENCE_DEPTH

    assert parse_instance(_instance(_nested(MAX_SEQUENCE_DEPTH))).sop_instance_uid == "1.2.3.4"
    with pytest.raises(Undecodable, match="nested deeper than 64"):
        parse_instance(_instance(_nested(MAX_SEQUENCE_DEPTH + 1)))
    with pytest.raises(Undecodable, match="nested deeper"):  # no RecursionError
        parse_instance(_instance(_nested(100_000)))


@pytest.mark.parametrize("uid", ["1.2.3\r", " 1.2.3", "1.2\n3", "1.2\x003"])
def test_only_padding_is_taken_off_a_uid(uid: str) -> None:
    with pytest.raises(InvalidUID):
        parse_instance(_instance(b"", sop_instance=uid))
    assert parse_instance(_instance(b"", sop_instance="1.2.3 ")).sop_instance_uid == "1.2.3"


@pytest.mark.parametrize(("request_class", "error"), [
    ("1.2.840.10008.5.1.4.1.1.2", "is not the data set's"),  # CT over MR
    ("1.2.840.10008.1.1", "is not the data set's"),
    ("../x", "not a valid UID"),
])
def test_the_requests_sop_class_must_be_the_data_sets(request_class: str, error: str) -> None:
    from node.errors import SopClassMismatch
    from node.ingest.sop_class import check_sop_class

    parsed = parse_instance(_instance(b"", request_class=request_class))
    with pytest.raises((SopClassMismatch, InvalidUID), match=re.escape(error)) as refused:
        check_sop_class(parsed)
    assert refused.value.status == (0xC212 if request_class == "../x" else 0xA900)
    check_sop_class(parse_instance(_instance(b"")))  # MR over MR


@pytest.mark.parametrize(("uid", "storage"), [
    ("1.2.840.10008.5.1.4.1.1.4", True),  # MR Image Storage
    ("1.2.840.10008.5.1.4.1.1.5", True),  # NM Image Storage (retired)
    ("1.2.840.10008.5.1.4.1.1.999", True),  # public, unknown to the dictionaries
    ("1.3.12.2.1107.5.9.1", True),  # private
    ("1.2.840.10008.1.1", False),  # Verification
    ("1.2.840.10008.5.1.4.1.2.1.1", False),  # Patient Root Q/R FIND
    ("1.2.840.10008.1.2", False),  # a transfer syntax
    ("1.2.840.10008.3.1.1.1", False),  # the application context name
])
def test_which_classes_are_storage_classes(uid: str, storage: bool) -> None:
    from node.ingest.sop_class import is_storage_class

    assert is_storage_class(uid) is storage
    parsed = parse_instance(_instance(b"", sop_class=uid))
    if not storage:
        from node.errors import SopClassMismatch
        from node.ingest.sop_class import check_sop_class

        with pytest.raises(SopClassMismatch, match="not a storage SOP class"):
            check_sop_class(parsed)
