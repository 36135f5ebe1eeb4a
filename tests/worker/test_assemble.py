"""Assembly of real series: grouping, ordering along the normal, rescale, multi-frame, codecs."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import RLELossless

from node.errors import AssemblyError, NoImages
from node.worker.assemble import (
    Stack,
    assemble_series,
    find_series,
    read_headers,
    series_attributes,
)
from tests.helpers.series import axial_slices, write_series
from tests.worker.conftest import (
    PROSTATE,
    SIEMENS_MAGNITUDE,
    SIEMENS_PHASE,
    STUDYFORREST,
    series_files,
    sr_in_series,
)


def shuffled(files: list[Path], seed: int = 1) -> list[Path]:
    out = list(files)
    random.Random(seed).shuffle(out)
    return out


def normal_positions(files: list[Path]) -> dict[str, float]:
    """Independent reference: each file's position on the slice normal, by SOP Instance UID."""
    out = {}
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        iop = np.array(ds.ImageOrientationPatient, float)
        n = np.cross(iop[:3], iop[3:])
        out[str(ds.SOPInstanceUID)] = float(n @ np.array(ds.ImagePositionPatient, float))
    return out


def test_siemens_magnitude_36_slices_in_order(tmp_path: Path) -> None:
    files = series_files(SIEMENS_MAGNITUDE)
    series = assemble_series(shuffled(files))
    assert len(series.stacks) == 1
    stack = series.stacks[0]
    assert len(stack) == 36 and stack.ordered_by == "position"
    assert (stack.rows, stack.columns) == (64, 64)
    ref = normal_positions(files)
    positions = [ref[s.sop_instance_uid] for s in stack.slices]
    assert positions == sorted(positions)
    assert np.allclose(np.diff(positions), 3.6, atol=0.01)  # 3 mm slices, 20% gap
    assert [s.index for s in stack.slices] == list(range(36))
    assert all(s.frame is None and s.pixel_spacing == (3.0, 3.0) for s in stack.slices)
    # No rescale in these files: values are the stored ones, as float32.
    first = pydicom.dcmread(stack.slices[0].path)
    assert stack.slices[0].pixels.dtype == np.float32
    assert np.array_equal(stack.slices[0].pixels, first.pixel_array.astype(np.float32))
    assert series.attributes.image_type == ("ORIGINAL", "PRIMARY", "M", "ND")
    assert len(series.sources) == 36 and "PixelData" not in series.sources[0]


def test_siemens_phase_rescale_applied() -> None:
    files = series_files(SIEMENS_PHASE)
    series = assemble_series(files)
    sl = series.stacks[0].slices[10]
    ds = pydicom.dcmread(sl.path)
    assert (float(ds.RescaleSlope), float(ds.RescaleIntercept)) == (2.0, -4096.0)
    assert np.array_equal(sl.pixels, ds.pixel_array * 2.0 - 4096.0)
    assert series.attributes.image_type[2] == "P"


def test_studyforrest_384_slices_in_order() -> None:
    files = series_files(STUDYFORREST)
    series = assemble_series(shuffled(files))
    (stack,) = series.stacks
    assert len(stack) == 384 and (stack.rows, stack.columns) == (384, 274)
    ref = normal_positions(files)
    positions = [ref[s.sop_instance_uid] for s in stack.slices]
    assert positions == sorted(positions) and len(set(positions)) == 384
    assert [s.instance_number for s in stack.slices] == list(range(1, 385))
    assert series.attributes.image_type == ("DERIVED", "SECONDARY")


def test_prostate_26_slices_512_with_slope() -> None:
    files = series_files(PROSTATE)
    series = assemble_series(shuffled(files))
    (stack,) = series.stacks
    assert len(stack) == 26 and (stack.rows, stack.columns) == (512, 512)
    assert [s.instance_number for s in stack.slices] == list(range(1, 27))
    sl = stack.slices[13]
    ds = pydicom.dcmread(sl.path)
    expected = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    assert np.allclose(sl.pixels, expected, rtol=1e-6)
    assert series.attributes.body_part == "PROSTATE"


def test_written_series_roundtrip_order_and_values(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    volume = rng.uniform(0, 3000, size=(20, 24, 9)).astype(np.float32)
    written = write_series(volume, (1.0, 1.2, 3.0), tmp_path / "s", rescale_slope=0.5,
                           rescale_intercept=-100.0)
    series = assemble_series(shuffled(written.paths, seed=3))
    (stack,) = series.stacks
    assert [s.sop_instance_uid for s in stack.slices] == written.sop_instance_uids
    expected = axial_slices(volume)
    for k, sl in enumerate(stack.slices):
        assert sl.pixels.shape == (24, 20)
        assert np.abs(sl.pixels - expected[k]).max() <= 0.25 + 1e-3  # half the slope
        assert sl.pixel_spacing == (1.2, 1.0)


def test_position_beats_instance_number(tmp_path: Path) -> None:
    """Instance Numbers written in reverse must not change the order along the normal."""
    volume = np.arange(8 * 8 * 6, dtype=np.float32).reshape(8, 8, 6)
    written = write_series(volume, (1.0, 1.0, 2.0), tmp_path / "s")
    for path in written.paths:
        ds = pydicom.dcmread(path)
        ds.InstanceNumber = 100 - int(ds.InstanceNumber)
        ds.save_as(path)
    (stack,) = assemble_series(written.paths).stacks
    assert stack.ordered_by == "position"
    assert [s.sop_instance_uid for s in stack.slices] == written.sop_instance_uids


def test_instance_number_fallback_without_positions(tmp_path: Path) -> None:
    volume = np.arange(8 * 8 * 5, dtype=np.float32).reshape(8, 8, 5)
    written = write_series(volume, (1.0, 1.0, 2.0), tmp_path / "s")
    for path in written.paths:
        ds = pydicom.dcmread(path)
        del ds.ImagePositionPatient
        ds.save_as(path)
    (stack,) = assemble_series(shuffled(written.paths)).stacks
    assert stack.ordered_by == "instance number"
    assert [s.sop_instance_uid for s in stack.slices] == written.sop_instance_uids


def test_placement_gives_plane_and_direction_for_the_position_reference(
    tmp_path: Path,
) -> None:
    """The model's stacks run left to right, posterior to anterior, inferior to superior
    (``plane_slices`` of a RAS volume); the worker's run along the slice normal."""

    def placement(orientation: tuple[float, ...] | None, ordered_by: str = "position"):
        return Stack((), orientation, 8, 8, None, ordered_by).placement

    assert placement((1, 0, 0, 0, 1, 0)) == ("axial", False)  # normal +z: superior
    assert placement((1, 0, 0, 0, -1, 0)) == ("axial", True)  # normal -z
    assert placement((1, 0, 0, 0, 0, -1)) == ("coronal", True)  # normal +y: posterior
    assert placement((-1, 0, 0, 0, 0, -1)) == ("coronal", False)
    assert placement((0, 1, 0, 0, 0, -1)) == ("sagittal", False)  # normal -x: to the right
    assert placement((0, -1, 0, 0, 0, -1)) == ("sagittal", True)
    assert placement((1, 0, 0, 0, 0.7071, 0.7071)) == (None, False)  # oblique
    assert placement(None) == (None, False)
    assert placement((1, 0, 0, 0, 1, 0), "instance number") == (None, False)
    # A written axial series: inferior to superior, as the model's axial stacks.
    volume = np.arange(8 * 8 * 6, dtype=np.float32).reshape(8, 8, 6)
    written = write_series(volume, (1.0, 1.0, 2.0), tmp_path / "s")
    (stack,) = assemble_series(shuffled(written.paths)).stacks
    assert stack.placement == ("axial", False)
    assert stack.slice_spacing_mm == pytest.approx(2.0)
    assert Stack((), (1, 0, 0, 0, 1, 0), 8, 8, None, "instance number").slice_spacing_mm is None


def test_stacks_split_by_orientation_and_size(tmp_path: Path) -> None:
    """A three-plane localizer style series: one stack per orientation and size."""
    volume = np.ones((8, 8, 6), dtype=np.float32)
    written = write_series(volume, (1.0, 1.0, 2.0), tmp_path / "s")
    for path in written.paths[:2]:  # two sagittal slices
        ds = pydicom.dcmread(path)
        ds.ImageOrientationPatient = [0.0, 1.0, 0.0, 0.0, 0.0, -1.0]
        ds.save_as(path)
    ds = pydicom.dcmread(written.paths[5])  # one slice of another size
    ds.Rows, ds.Columns = 4, 16
    ds.save_as(written.paths[5])
    series = assemble_series(written.paths)
    assert [len(s) for s in series.stacks] == [3, 2, 1]
    assert [s.index for s in series.slices] == list(range(6))
    assert [s.stack for s in series.slices] == [0, 0, 0, 1, 1, 2]


def test_enhanced_mr_multiframe_each_frame_a_slice(pydicom_data: Path) -> None:
    reference = assemble_series([pydicom_data / "emri_small.dcm"])
    (stack,) = reference.stacks
    assert len(stack) == 10
    assert [s.frame for s in stack.slices] == list(range(1, 11))
    assert len({s.sop_instance_uid for s in stack.slices}) == 1
    raw = pydicom.dcmread(pydicom_data / "emri_small.dcm").pixel_array
    for k, sl in enumerate(stack.slices):
        assert np.array_equal(sl.pixels, raw[k].astype(np.float32))
    # The same frames through every lossless codec and byte order decode to the same values.
    for name in ("emri_small_RLE.dcm", "emri_small_jpeg_2k_lossless.dcm",
                 "emri_small_jpeg_ls_lossless.dcm", "emri_small_big_endian.dcm"):
        other = assemble_series([pydicom_data / name]).stacks[0]
        assert len(other) == 10, name
        for a, b in zip(stack.slices, other.slices, strict=True):
            assert np.array_equal(a.pixels, b.pixels), name


def test_enhanced_ct_functional_groups(pydicom_data: Path) -> None:
    """Per-frame positions order the frames; the shared rescale (intercept -1024) applies."""
    path = pydicom_data / "eCT_Supplemental.dcm"
    (stack,) = assemble_series([path]).stacks
    ds = pydicom.dcmread(path)
    # Frame 2 lies at z=-149 and frame 1 at z=-159; the normal of (-1,0,0)x(0,1,0) is -z.
    assert [s.frame for s in stack.slices] == [2, 1]
    assert [s.position for s in stack.slices] == [149.0, 159.0]
    assert np.array_equal(stack.slices[1].pixels, ds.pixel_array[0] - 1024.0)
    assert stack.slices[0].pixel_spacing == pytest.approx((0.388672, 0.388672))


@pytest.mark.parametrize(
    "name", ["MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm",
             "MR_small_bigendian.dcm", "MR_small_implicit.dcm"]
)
def test_compressed_single_frame_equals_uncompressed(pydicom_test_files: Path, name: str) -> None:
    (ref,) = assemble_series([pydicom_test_files / "MR_small.dcm"]).slices
    (got,) = assemble_series([pydicom_test_files / name]).slices
    assert np.array_equal(got.pixels, ref.pixels)


def test_jpeg2000_mr_decodes(pydicom_data: Path) -> None:
    (lossless,) = assemble_series([pydicom_data / "MR2_J2KR.dcm"]).slices
    (plain,) = assemble_series([pydicom_data / "MR2_UNCR.dcm"]).slices
    assert lossless.pixels.shape == (1024, 1024)
    assert np.array_equal(lossless.pixels, plain.pixels)


def test_non_image_objects_set_aside(tmp_path: Path) -> None:
    files = series_files(SIEMENS_MAGNITUDE)
    sr = sr_in_series(tmp_path, files[0])
    series = assemble_series([sr, *files])
    assert len(series.slices) == 36
    (aside,) = series.set_aside
    assert aside.path == sr and "no pixel data" in aside.reason
    assert series.attributes.modality == "MR"  # the report does not decide the modality


def test_duplicate_instance_scored_once(tmp_path: Path) -> None:
    files = series_files(SIEMENS_MAGNITUDE)
    copy = tmp_path / "copy.dcm"
    shutil.copy(files[4], copy)
    series = assemble_series([*files, copy])
    assert len(series.slices) == 36
    (aside,) = series.set_aside
    assert aside.path == copy and "duplicate of 00005.dcm" in aside.reason


def test_attributes_from_headers_ignore_a_report_listed_first(tmp_path: Path) -> None:
    """Headers read without pixel data still tell the images from the SR (for routing)."""
    files = series_files(SIEMENS_MAGNITUDE)[:3]
    sr = sr_in_series(tmp_path, files[0])
    attrs = series_attributes(read_headers([sr, *files]))
    assert attrs.modality == "MR" and attrs.image_type[:3] == ("ORIGINAL", "PRIMARY", "M")


def test_series_without_images_raises_no_images(tmp_path: Path) -> None:
    sr = sr_in_series(tmp_path, series_files(SIEMENS_MAGNITUDE)[0])
    with pytest.raises(NoImages, match=r"no image to score.*no pixel data"):
        assemble_series([sr])


def test_segmentation_and_colour_are_not_judged(pydicom_data: Path) -> None:
    with pytest.raises(NoImages, match="segmentation"):
        assemble_series([pydicom_data / "liver.dcm"])
    with pytest.raises(NoImages, match="colour"):
        assemble_series([pydicom_data / "SC_rgb.dcm"])


def test_garbage_file_is_an_assembly_error(tmp_path: Path) -> None:
    files = series_files(SIEMENS_MAGNITUDE)[:3]
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(AssemblyError, match=r"junk\.dcm is not readable DICOM"):
        assemble_series([*files, junk])


def test_missing_file_is_an_assembly_error(tmp_path: Path) -> None:
    with pytest.raises(AssemblyError, match="missing"):
        assemble_series([tmp_path / "gone.dcm"])


def test_truncated_pixel_data_is_an_assembly_error(tmp_path: Path) -> None:
    files = series_files(SIEMENS_MAGNITUDE)
    bad = tmp_path / "cut.dcm"
    shutil.copy(files[0], bad)
    ds = pydicom.dcmread(bad)
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 3]
    ds.save_as(bad)
    with pytest.raises(AssemblyError, match=r"cut.dcm .*cannot be decoded"):
        assemble_series([bad, *files[1:]])


def test_mixed_series_is_an_assembly_error() -> None:
    a = series_files(SIEMENS_MAGNITUDE)[:2]
    b = series_files(SIEMENS_PHASE)[:2]
    with pytest.raises(AssemblyError, match="2 different series"):
        assemble_series([*a, *b])


def test_image_without_size_is_an_assembly_error(tmp_path: Path) -> None:
    bad = tmp_path / "nosize.dcm"
    ds = pydicom.dcmread(series_files(SIEMENS_MAGNITUDE)[0])
    del ds.Rows
    ds.save_as(bad)
    with pytest.raises(AssemblyError):
        assemble_series([bad])


def test_series_attributes_from_headers() -> None:
    attrs = series_attributes(read_headers(series_files(PROSTATE)))
    assert attrs.modality == "MR" and attrs.body_part == "PROSTATE"
    assert attrs.series_description == "T2 TSE ax hi"
    assert attrs.image_type == ("ORIGINAL", "SECONDARY", "M_SE", "M", "SE")


def test_find_series_groups_folders_and_ignores_other_files(tmp_path: Path) -> None:
    volume = np.ones((6, 6, 3), dtype=np.float32)
    a = write_series(volume, (1.0, 1.0, 1.0), tmp_path / "a")
    b = write_series(volume, (1.0, 1.0, 1.0), tmp_path / "b", transfer_syntax=RLELossless)
    (tmp_path / "README.txt").write_text("not DICOM")
    found, unused = find_series([tmp_path])
    assert {s.series_instance_uid for s in found} == {a.series_instance_uid, b.series_instance_uid}
    assert all(len(s.paths) == 3 for s in found)
    assert unused == [tmp_path / "README.txt"]
    with pytest.raises(AssemblyError, match="no such file"):
        find_series([tmp_path / "nope"])


def test_series_attributes_come_from_the_images_that_have_them() -> None:
    """A first instance without Modality (or Body Part) must not make the series another."""
    headers = read_headers(series_files(PROSTATE))
    for ds in headers[:2]:
        del ds.Modality
        del ds.BodyPartExamined
    attrs = series_attributes(headers)
    assert attrs.modality == "MR" and attrs.body_part == "PROSTATE"
    for ds in headers:
        ds.pop("Modality", None)
    assert series_attributes(headers).modality is None
