"""After a site calibration: does the recalibrated bundle still see motion in the site's series?

Calibrating on a site's own normal series makes them normal by construction, whatever they
look like; for a scanner whose images are far from the training data (a contrast the model
never saw) the recalibrated threshold can then sit so low that nothing is flagged any more
(``bench/site_calibration.py``: a gamma-0.6 "site" went from 29% of its normal slices flagged
to none, and a moderate motion block from 30% to none). The only data a site calibration has
are its normal series, so the check simulates the artifact the node exists for on them: a
block of moderate TorchIO motion over the middle of each series (the same corruption
``vaenode evaluate`` uses), scored as the worker scores a series.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from node.model.artifacts import corrupt_volume, splice_block
from node.model.bundle import Bundle
from node.model.data import TrainingItem, Volume, plane_slices

#: The block: this span of each stack's slices (the middle of the brain in an axial stack).
BLOCK = (0.40, 0.55)
#: Below this fraction of the block flagged the recalibrated bundle is called nearly blind.
MIN_BLOCK_FLAGGED = 0.25


def _stack(item: TrainingItem) -> tuple[np.ndarray, tuple[float, float, float], list, dict]:
    """The item as a volume ``[row, col, slice]``, its voxel size, the (row, col) spacing of
    each slice, and how to score it (plane, direction, slice spacing)."""
    if isinstance(item, Volume):
        images, (row, col) = plane_slices(item, "axial")
        gap = float(item.spacing[2])
        spacings: list = [(row, col)] * len(images)
        where: dict[str, Any] = {"plane": "axial", "descending": False}
    else:
        images = np.stack(item.images)
        row, col = next((s for s in item.spacings if s is not None), (1.0, 1.0))
        gap = item.slice_spacing_mm or 1.0
        spacings = list(item.spacings)
        where = {"plane": item.plane, "descending": item.descending}
    where["slice_spacing_mm"] = gap
    volume = np.transpose(np.asarray(images, np.float32), (1, 2, 0))
    return volume, (row, col, gap), spacings, where


def motion_check(bundle: Bundle, items: Sequence[TrainingItem], seed: int = 0) -> dict[str, Any]:
    """Each item's stack (NIfTI: axial; DICOM: its own plane) with a block of moderate motion
    over ``BLOCK`` of its slices, scored with ``bundle``.

    Returns:
        ``block_flagged`` and ``elsewhere_flagged`` (fractions of the foreground slices inside
        and outside the blocks that are flagged), ``series`` and ``blind`` (the block flagged
        less than ``MIN_BLOCK_FLAGGED``).
    """
    inside_all, outside_all = [], []
    for i, item in enumerate(items):
        volume, spacing, spacings, where = _stack(item)
        n = volume.shape[2]
        start, stop = int(BLOCK[0] * n), max(int(BLOCK[1] * n), int(BLOCK[0] * n) + 1)
        moved = corrupt_volume(volume, spacing, "motion", "moderate", seed=seed + i)
        images = np.transpose(splice_block(volume, moved, start, stop), (2, 0, 1))
        s = bundle.score_slices(list(images), spacings, **where)
        block = np.zeros(n, dtype=bool)
        block[start:stop] = True
        inside_all.append(s.abnormal[s.foreground & block])
        outside_all.append(s.abnormal[s.foreground & ~block])
    inside, outside = np.concatenate(inside_all), np.concatenate(outside_all)
    flagged = float(inside.mean()) if inside.size else 0.0
    return {"series": len(items), "block": list(BLOCK), "block_flagged": flagged,
            "elsewhere_flagged": float(outside.mean()) if outside.size else 0.0,
            "blind": flagged < MIN_BLOCK_FLAGGED}
