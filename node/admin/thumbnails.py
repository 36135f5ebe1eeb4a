"""Render a stored instance as a small PNG an admin can judge at a glance.

A reviewer deciding whether a flagged slice is really poor needs to see it with a window that
shows anatomy, not a black square: the DICOM's own VOI window when the scanner wrote one (that is
what the technologist saw), otherwise the 1st-99th percentile of the pixel values, which suits
MR (whose intensities have no fixed scale) and keeps a few hot pixels from washing out the rest.
No torch here: the admin layer reads DICOM with pydicom and draws with Pillow.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.pixels import apply_modality_lut

from node.errors import NodeError

DEFAULT_SIZE_PX = 192


class ThumbnailError(NodeError):
    """A stored instance cannot be rendered (no pixels, unreadable, frame out of range)."""


def _first(value: object) -> float | None:
    """The first value of a possibly multi-valued DICOM number (WindowCenter may be a list)."""
    if value is None:
        return None
    if isinstance(value, list | tuple | pydicom.multival.MultiValue):
        return float(value[0]) if len(value) else None
    return float(value)  # type: ignore[arg-type]


def window_bounds(ds: pydicom.Dataset, pixels: np.ndarray) -> tuple[float, float]:
    """The intensity range mapped to black..white for this image.

    Args:
        ds: the dataset (for WindowCenter/WindowWidth, PS3.3 C.11.2).
        pixels: the image after the modality LUT (rescale slope/intercept applied).

    Returns:
        (low, high) with high > low.
    """
    center = _first(ds.get("WindowCenter"))
    width = _first(ds.get("WindowWidth"))
    if center is not None and width is not None and width > 1:
        # PS3.3 C.11.2.1.2.1: linear window; the edges are center - 0.5 -/+ (width - 1) / 2.
        low = center - 0.5 - (width - 1) / 2
        high = center - 0.5 + (width - 1) / 2
        return low, high
    finite = pixels[np.isfinite(pixels)]
    if finite.size == 0:
        return 0.0, 1.0
    low, high = (float(v) for v in np.percentile(finite, [1.0, 99.0]))
    if high <= low:
        low, high = float(finite.min()), float(finite.max())
    if high <= low:
        high = low + 1.0
    return low, high


def to_grey8(ds: pydicom.Dataset, frame: int | None = None) -> np.ndarray:
    """The image (one frame of it) as 8-bit grey, windowed and with MONOCHROME1 inverted.

    Args:
        ds: a dataset with pixel data.
        frame: 1-based frame of a multi-frame instance; None for single-frame (or frame 1).

    Raises:
        ThumbnailError: no pixel data, or the frame does not exist.
    """
    if "PixelData" not in ds and "FloatPixelData" not in ds:
        raise ThumbnailError("the instance has no pixel data")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    index = 0 if frame is None else frame - 1
    if not 0 <= index < frames:
        raise ThumbnailError(f"frame {frame} does not exist (the instance has {frames})")
    arr = ds.pixel_array
    if frames > 1:
        arr = arr[index]
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    if arr.ndim == 3:
        # Colour (RGB or YBR already converted by pydicom): show it as luminance.
        grey = arr[..., :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114])
        return np.clip(grey, 0, 255).astype(np.uint8)
    values = np.asarray(apply_modality_lut(arr, ds), dtype=np.float64)
    low, high = window_bounds(ds, values)
    scaled = np.clip((values - low) / (high - low), 0.0, 1.0)
    if photometric == "MONOCHROME1":
        scaled = 1.0 - scaled
    return (scaled * 255.0 + 0.5).astype(np.uint8)


def render_thumbnail(path: Path, frame: int | None = None, size_px: int = DEFAULT_SIZE_PX) -> bytes:
    """Read a stored instance and return a PNG no larger than ``size_px`` on its long side.

    Args:
        path: the stored DICOM file.
        frame: 1-based frame for multi-frame instances.
        size_px: the long side of the thumbnail, in pixels.

    Returns:
        The PNG bytes.

    Raises:
        ThumbnailError: the file is missing, unreadable or has no renderable pixels.
    """
    try:
        ds = pydicom.dcmread(path)
    except (OSError, pydicom.errors.InvalidDicomError) as exc:
        raise ThumbnailError(f"cannot read {path.name}: {exc}") from exc
    try:
        grey = to_grey8(ds, frame)
    except (ValueError, NotImplementedError, RuntimeError, AttributeError) as exc:
        # pydicom raises these when it cannot decode the pixel data (missing plugin, bad data).
        raise ThumbnailError(f"cannot decode the pixels of {path.name}: {exc}") from exc
    image = Image.fromarray(grey, mode="L")
    image.thumbnail((size_px, size_px), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    image.save(out, format="PNG", optimize=False)
    return out.getvalue()
