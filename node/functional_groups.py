"""Attributes of one frame of an enhanced multi-frame image, wherever the object keeps them.

Enhanced objects (enhanced MR and CT, what newer scanners send) move the attributes a
single-frame image has at the top level (orientation, position, pixel spacing, echo time...)
into functional groups (PS3.3 C.7.6.16): per frame, or once for all frames. The worker's
assembly and routing and the report's Image Library all read them, so the lookup lives here,
beside neither.
"""

from __future__ import annotations

from pydicom.dataset import Dataset


def functional_group_item(ds: Dataset, frame_index: int | None, sequence: str) -> Dataset | None:
    """The functional group item ``sequence`` for one frame: per-frame first, then shared."""
    containers: list[Dataset] = []
    if frame_index is not None and "PerFrameFunctionalGroupsSequence" in ds:
        per_frame = ds.PerFrameFunctionalGroupsSequence
        if frame_index < len(per_frame):
            containers.append(per_frame[frame_index])
    if "SharedFunctionalGroupsSequence" in ds and len(ds.SharedFunctionalGroupsSequence):
        containers.append(ds.SharedFunctionalGroupsSequence[0])
    for container in containers:
        seq = container.get(sequence)
        if seq is not None and len(seq):
            return seq[0]  # type: ignore[no-any-return]
    return None
