"""Thumbnails from real scanner DICOM and the log p(x) plot are real, sensible images."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from node.admin.plots import plot_slice_scores
from node.admin.thumbnails import ThumbnailError, render_thumbnail, to_grey8, window_bounds

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "dicom"


def _middle(folder: str) -> Path:
    files = sorted((DATA / folder).glob("*.dcm"))
    if not files:
        pytest.skip(f"{folder} is not available under {DATA}")
    return files[len(files) // 2]


@pytest.mark.parametrize("folder", ["tcia_prostate_t2_0002", "studyforrest_t1w"])
def test_thumbnail_of_a_real_slice_shows_anatomy(folder: str) -> None:
    png = render_thumbnail(_middle(folder), size_px=128)
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG" and image.mode == "L"
    assert max(image.size) == 128
    pixels = np.asarray(image)
    # A sensible window: neither a black nor a white square; a real spread of grey levels.
    assert pixels.std() > 20
    assert (pixels < 20).mean() < 0.95 and (pixels > 235).mean() < 0.5


def test_window_uses_the_dicom_voi_window_when_present() -> None:
    ds = pydicom.Dataset()
    ds.WindowCenter = 40
    ds.WindowWidth = 401
    low, high = window_bounds(ds, np.zeros((2, 2)))
    assert (low, high) == (-160.5, 239.5)


def test_window_falls_back_to_percentiles_and_ignores_hot_pixels() -> None:
    rng = np.random.default_rng(0)
    values = rng.uniform(0, 1000, size=(64, 64))
    values[0, 0] = 1e9
    low, high = window_bounds(pydicom.Dataset(), values)
    assert 0 <= low < 50 and 950 < high <= 1000


def test_monochrome1_is_inverted() -> None:
    ds = pydicom.Dataset()
    ds.Rows, ds.Columns = 2, 2
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = 0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.PixelData = np.array([[0, 0], [1000, 1000]], dtype=np.uint16).tobytes()
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    grey = to_grey8(ds)
    assert grey[0, 0] == 255 and grey[1, 0] == 0


def test_unreadable_file_raises_thumbnail_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(b"not dicom at all")
    with pytest.raises(ThumbnailError):
        render_thumbnail(bad)
    with pytest.raises(ThumbnailError):
        render_thumbnail(tmp_path / "missing.dcm")


def test_plot_is_a_png_with_flagged_points_in_red() -> None:
    n = 40
    values = [-1000.0] * n
    flags = [False] * n
    for i in range(20, 25):
        values[i], flags[i] = -1300.0, True
    png = plot_slice_scores(list(range(n)), values, flags, -1100.0, title="test")
    image = Image.open(io.BytesIO(png)).convert("RGB")
    assert image.size == (800, 320)
    rgb = np.asarray(image).astype(int)
    red = (rgb[..., 0] > 180) & (rgb[..., 1] < 90) & (rgb[..., 2] < 90)
    assert red.sum() > 50  # flagged points and the threshold line


def test_plot_rejects_mismatched_lengths() -> None:
    with pytest.raises(ValueError):
        plot_slice_scores([0, 1], [1.0], [False, False], 0.0)
