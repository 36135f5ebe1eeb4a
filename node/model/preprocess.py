"""Preprocessing that belongs to a model: physical resampling and robust intensity scaling.

Every slice, whatever its size, plane or scanner, is resampled to the model grid at a fixed
pixel size in mm (so a 0.67 mm scan and a 2 mm scan show the head at the same size and
resolution), centred and cropped or zero-padded to ``image_size`` square, and divided by a
robust maximum of its whole stack. Scaling by the stack rather than by each slice keeps the
relative brightness of the end slices of a series, and an artifact confined to a few slices
barely moves the stack's percentile. The settings are stored in the bundle's ``model.json``
so that scoring uses exactly what training used.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class PreprocessConfig:
    """How slices are brought to the model grid.

    Attributes:
        image_size: side of the square model grid in pixels.
        spacing_mm: pixel size of the model grid in mm.
        default_fov_mm: assumed field of view of the longer image side when a slice comes
            without pixel spacing (240 mm is a typical adult head field of view).
        norm_percentile: percentile of the stack's pixels mapped to intensity 1.0.
        clip_max: normalized intensities are clipped to [0, clip_max].
        fov_mm: side of the centred square field of view kept; pixels outside it are set to 0.
            The training slices never extend beyond it, so the model has no opinion about
            what lies there, and a larger field of view of another scanner must not be held
            against its slices.
        center_head: crop the model grid around the head (the centroid of the stack's pixels
            above ``HEAD_LEVEL``) instead of around the image centre: scanners place the
            field of view differently, and a head lying on its side often sits far from the
            centre of the image (False: bundles made before the option).
    """

    image_size: int = 128
    spacing_mm: float = 2.0
    default_fov_mm: float = 240.0
    norm_percentile: float = 99.5
    clip_max: float = 2.0
    fov_mm: float = 240.0
    center_head: bool = False

    def to_dict(self) -> dict[str, Any]:
        """Plain values for ``model.json`` (``center_head`` only when set, so that a bundle
        without it keeps the ``model.json`` older versions of the node read)."""
        out = asdict(self)
        if not out["center_head"]:
            del out["center_head"]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PreprocessConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error (a newer bundle format; the
        settings of removed parts are dealt with before, by :mod:`node.model.removed`)."""
        return cls(**data)


def stack_scale(images: Sequence[np.ndarray], percentile: float) -> float:
    """Robust maximum of a stack: the given percentile of its pixels (subsampled for speed).

    Returns 1.0 for an all-zero stack so that division is always defined.
    """
    flat = np.concatenate([np.asarray(im, dtype=np.float32).ravel() for im in images])
    step = max(1, flat.size // 2_000_000)
    value = float(np.percentile(flat[::step], percentile)) if flat.size else 0.0
    return value if value > 0 else 1.0


def _target_shape(
    shape: tuple[int, int], spacing: tuple[float, float] | None, cfg: PreprocessConfig
) -> tuple[int, int]:
    rows, cols = shape
    if spacing is None or min(spacing) <= 0:
        mm = cfg.default_fov_mm / max(rows, cols)
        spacing = (mm, mm)
    out_r = max(1, round(rows * spacing[0] / cfg.spacing_mm))
    out_c = max(1, round(cols * spacing[1] / cfg.spacing_mm))
    return out_r, out_c


#: Normalized intensity above which a pixel counts as head for :attr:`center_head`.
HEAD_LEVEL = 0.1


def head_centre(batch: torch.Tensor) -> tuple[float, float] | None:
    """(row, col) centroid of the pixels above ``HEAD_LEVEL`` over all slices of ``batch``
    (``[n, 1, rows, cols]``), None when there are none."""
    mask = (batch > HEAD_LEVEL).sum(dim=(0, 1), dtype=torch.float64)
    total = float(mask.sum())
    if total == 0:
        return None
    rows = torch.arange(mask.shape[0], dtype=torch.float64)
    cols = torch.arange(mask.shape[1], dtype=torch.float64)
    return float((mask.sum(1) * rows).sum()) / total, float((mask.sum(0) * cols).sum()) / total


def _fit(grid: torch.Tensor, size: int, centre: tuple[float, float] | None = None
         ) -> torch.Tensor:
    """Crop or zero-pad the last two dims of ``grid`` to ``size`` x ``size`` around ``centre``
    (row, col; default: the middle of the grid)."""
    rows, cols = grid.shape[-2:]
    out = grid.new_zeros((*grid.shape[:-2], size, size))
    if centre is None:
        r0, c0 = (rows - size) // 2, (cols - size) // 2  # crop offsets (negative: pad)
    else:
        r0, c0 = round(centre[0] + 0.5 - size / 2), round(centre[1] + 0.5 - size / 2)
    # Output pixel (i, j) shows grid pixel (r0 + i, c0 + j) where that exists.
    dst_r = slice(max(-r0, 0), min(size, rows - r0))
    dst_c = slice(max(-c0, 0), min(size, cols - c0))
    if dst_r.start >= dst_r.stop or dst_c.start >= dst_c.stop:
        return out
    src_r = slice(r0 + dst_r.start, r0 + dst_r.stop)
    src_c = slice(c0 + dst_c.start, c0 + dst_c.stop)
    out[..., dst_r, dst_c] = grid[..., src_r, src_c]
    return out


def preprocess_stack(
    images: Sequence[np.ndarray],
    spacings: Sequence[tuple[float, float] | None] | None,
    cfg: PreprocessConfig,
    scale: float | None = None,
) -> torch.Tensor:
    """Bring one stack of 2D slices to the model grid.

    Args:
        images: 2D arrays in modality units, any size.
        spacings: (row, col) pixel spacing in mm per slice, or None where unknown.
        cfg: the bundle's preprocessing settings.
        scale: intensity divisor; default: :func:`stack_scale` of ``images``.

    Returns:
        float32 tensor ``[n, 1, image_size, image_size]`` with values in [0, clip_max].
    """
    if len(images) == 0:
        return torch.zeros((0, 1, cfg.image_size, cfg.image_size))
    if spacings is None:
        spacings = [None] * len(images)
    if len(spacings) != len(images):
        raise ValueError(f"{len(images)} images but {len(spacings)} pixel spacings")
    if scale is None:
        scale = stack_scale(images, cfg.norm_percentile)
    out = torch.zeros((len(images), 1, cfg.image_size, cfg.image_size))
    # Slices of one shape and spacing are resampled in one call (a series usually is one group).
    groups: dict[tuple[Any, ...], list[int]] = {}
    for i, (im, sp) in enumerate(zip(images, spacings, strict=True)):
        if np.ndim(im) != 2:
            raise ValueError(f"slice {i} is not 2D (shape {np.shape(im)})")
        key = (np.shape(im), None if sp is None else (float(sp[0]), float(sp[1])))
        groups.setdefault(key, []).append(i)
    for (shape, sp), idx in groups.items():
        batch = torch.from_numpy(np.stack([np.asarray(images[i], np.float32) for i in idx]))
        batch = (batch / scale).clamp_(0.0, cfg.clip_max).unsqueeze(1)
        target = _target_shape(shape, sp, cfg)
        if target != tuple(shape):
            batch = F.interpolate(
                batch, size=target, mode="bilinear", align_corners=False, antialias=True
            )
        centre = head_centre(batch) if cfg.center_head else None
        out[idx] = _fit(batch, cfg.image_size, centre).clamp_(0.0, cfg.clip_max)
    keep = min(cfg.image_size, round(cfg.fov_mm / cfg.spacing_mm))
    if keep < cfg.image_size:
        margin = (cfg.image_size - keep) // 2
        mask = torch.zeros(cfg.image_size, cfg.image_size)
        mask[margin : margin + keep, margin : margin + keep] = 1.0
        out *= mask
    return out
