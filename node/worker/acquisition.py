"""How an MR image was acquired, as far as its header says: echo and repetition time, contrast.

Routing needs it: a model of normal brain T1 images judges a T2, FLAIR or diffusion series as
wholly abnormal, and a department that sends every MR series to the node would get a "Quality
Issue" flag on each of them. Modality and Body Part Examined do not tell a T1 from a T2, but
the timing does: T1-weighted images have a short echo time (gradient echo 2-6 ms, spin echo
10-20 ms), T2, FLAIR and diffusion a long one (60 ms and more).

Classic MR images carry Echo Time (0018,0081) and Repetition Time (0018,0080) at the top level
(PS3.3 C.8.3.1). Enhanced MR objects keep them in functional groups (PS3.3 C.8.13.5): Effective
Echo Time (0018,9082) in the MR Echo Sequence, Repetition Time in the MR Timing and Related
Parameters Sequence, and state the weighting itself in Acquisition Contrast (0008,9209).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from pydicom.dataset import Dataset

from node.functional_groups import functional_group_item


@dataclass(frozen=True)
class Acquisition:
    """The acquisition parameters routing may test; None where the header does not say.

    Attributes:
        echo_time_ms: Echo Time, or the longest Effective Echo Time of the frames (enhanced MR).
        repetition_time_ms: Repetition Time (top level or MR Timing functional group).
        contrast: Acquisition Contrast of enhanced MR (``T1``, ``T2``, ``PROTON_DENSITY``,
            ``DIFFUSION``, ``FLUID_ATTENUATED``...), upper case.
        angio: Angio Flag (0018,0025): True for ``Y``, False for ``N``; an enhanced MR
            object's Image Type value 3 ``ANGIO`` counts as ``Y``. Not every vendor sets the
            flag for every angiography sequence, so a rule keeps matching descriptions too.
    """

    echo_time_ms: float | None = None
    repetition_time_ms: float | None = None
    contrast: str | None = None
    angio: bool | None = None


def _number(value: object) -> float | None:
    """A time in ms from a DS/FD value; the largest of a multi-valued one; None if unusable."""
    if value is None or value == "":
        return None
    if not isinstance(value, str | int | float):
        try:
            numbers = [n for v in value if (n := _number(v)) is not None]  # type: ignore[attr-defined]
        except TypeError:
            return None
        return max(numbers) if numbers else None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) and number >= 0 else None


def _longest_effective_echo(ds: Dataset) -> float | None:
    """Enhanced MR: the longest Effective Echo Time of the frames (a multi-echo object holds
    several), from the per-frame groups, else the shared one."""
    frames = len(ds.get("PerFrameFunctionalGroupsSequence") or [])
    items = [functional_group_item(ds, i, "MREchoSequence") for i in range(max(frames, 1))]
    echoes = [e for item in items if item is not None
              if (e := _number(item.get("EffectiveEchoTime"))) is not None]
    return max(echoes) if echoes else None


def acquisition_of(ds: Dataset) -> Acquisition:
    """The acquisition parameters of one image (the longest echo of a multi-frame object)."""
    echo = _number(ds.get("EchoTime"))
    if echo is None:
        echo = _longest_effective_echo(ds)
    repetition = _number(ds.get("RepetitionTime"))
    if repetition is None:
        item = functional_group_item(ds, 0, "MRTimingAndRelatedParametersSequence")
        repetition = _number(item.get("RepetitionTime")) if item is not None else None
    contrast = str(ds.get("AcquisitionContrast", "") or "").strip().upper() or None
    flag = str(ds.get("AngioFlag", "") or "").strip().upper()
    raw = ds.get("ImageType") or []
    image_type = [str(v).strip().upper() for v in ([raw] if isinstance(raw, str) else raw)]
    angio = True if flag == "Y" or image_type[2:3] == ["ANGIO"] else (
        False if flag == "N" else None)
    return Acquisition(echo_time_ms=echo, repetition_time_ms=repetition, contrast=contrast,
                       angio=angio)


def series_acquisition(images: Sequence[Dataset]) -> Acquisition:
    """The acquisition of a series: its longest echo and repetition time, its commonest
    contrast, and whether any of its images says it is angiography.

    A series may mix echoes (a dual-echo field map, a proton-density/T2 pair). The longest
    echo time is the one that says whether any of its images is T2-weighted, which is what a
    rule for a T1 model must know.
    """
    each = [acquisition_of(ds) for ds in images]
    echoes = [a.echo_time_ms for a in each if a.echo_time_ms is not None]
    repetitions = [a.repetition_time_ms for a in each if a.repetition_time_ms is not None]
    contrasts = Counter(a.contrast for a in each if a.contrast is not None)
    flags = {a.angio for a in each if a.angio is not None}
    return Acquisition(
        echo_time_ms=max(echoes) if echoes else None,
        repetition_time_ms=max(repetitions) if repetitions else None,
        contrast=contrasts.most_common(1)[0][0] if contrasts else None,
        angio=True if True in flags else (False if flags else None),
    )
