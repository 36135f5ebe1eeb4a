"""Acceptance checks of a model bundle on real DICOM series (run by hand, prints a table).

- ``studyforrest_t1w``: a normal brain T1 from another site and scanner; target: at least 95%
  of its slices called normal.
- ``tcia_prostate_t2_0002``: another body part; target: most slices called abnormal.
- the Siemens field-map series: scored without error.

Each folder is read by the worker's own assembly (``node.worker.assemble``: slices ordered
along the normal, Modality LUT applied, plane and direction for the position reference), so
the bench sees what the node would score.

    .venv/bin/python bench/acceptance.py [--model BUNDLE]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from node.model.bundle import load_bundle  # noqa: E402
from node.worker.assemble import Stack, assemble_series  # noqa: E402

DICOM = ROOT.parent / "shared" / "data" / "dicom"
SERIES = {
    "studyforrest_t1w": "normal (another site): >=95% normal",
    "tcia_prostate_t2_0002": "another body part: most abnormal",
    "siemens_trio_gre_field_mapping_2": "Siemens magnitude: scored without error",
    "siemens_trio_gre_field_mapping_3": "Siemens phase: scored without error",
}


def read_series(folder: Path) -> Stack:
    """The largest stack of one series, as the worker assembles it (order, rescale, plane)."""
    paths = [p for p in sorted(folder.iterdir()) if p.is_file() and not p.name.startswith(".")]
    return assemble_series(paths).stacks[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None)
    args = parser.parse_args()
    bundle = load_bundle(args.model)
    print(f"bundle {bundle.name} {bundle.version}, threshold {bundle.threshold:.1f}")
    print(f"{'series':36} {'slices':>6} {'abnormal':>9} {'shift':>9} {'plane':>8} "
          f"{'s/slice':>8}  target")
    for name, target in SERIES.items():
        folder = DICOM / name
        if not folder.is_dir():
            print(f"{name:36} missing")
            continue
        stack = read_series(folder)
        plane, descending = stack.placement
        t0 = time.perf_counter()
        s = bundle.score_slices(stack.images, stack.pixel_spacings, plane=plane,
                                descending=descending, slice_spacing_mm=stack.slice_spacing_mm)
        dt = (time.perf_counter() - t0) / max(1, len(stack))
        fg = s.foreground
        frac = s.abnormal[fg].mean() if fg.any() else float("nan")
        print(f"{name:36} {len(stack):6d} {100 * frac:8.1f}% {s.series_shift:9.0f} "
              f"{plane or '-':>8} {dt:8.3f}  {target}  (foreground {int(fg.sum())})")


if __name__ == "__main__":
    main()
