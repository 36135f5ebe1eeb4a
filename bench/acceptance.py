"""Acceptance checks of a model bundle on real DICOM series (run by hand, prints a table).

- ``studyforrest_t1w``: a normal brain T1 from another site and scanner; target: at least 95%
  of its slices called normal.
- ``tcia_prostate_t2_0002``: another body part; target: most slices called abnormal.
- the Siemens field-map series: scored without error.

The DICOM reading here is deliberately minimal (one series per folder, slices ordered along
the normal, rescale applied) and lives outside ``node/model/``, which never imports pydicom.

    .venv/bin/python bench/acceptance.py [--model BUNDLE]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pydicom

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from node.model.bundle import load_bundle  # noqa: E402

DICOM = ROOT.parent / "shared" / "data" / "dicom"
SERIES = {
    "studyforrest_t1w": "normal (another site): >=95% normal",
    "tcia_prostate_t2_0002": "another body part: most abnormal",
    "siemens_trio_gre_field_mapping_2": "Siemens magnitude: scored without error",
    "siemens_trio_gre_field_mapping_3": "Siemens phase: scored without error",
}


def read_series(folder: Path) -> tuple[list[np.ndarray], list[tuple[float, float]]]:
    """Slices of one single-frame series in spatial order, rescale applied."""
    datasets = [pydicom.dcmread(p) for p in sorted(folder.iterdir()) if p.is_file()
                and not p.name.startswith(".")]
    datasets = [d for d in datasets if "PixelData" in d]

    def position(ds: pydicom.Dataset) -> float:
        if "ImagePositionPatient" in ds and "ImageOrientationPatient" in ds:
            o = np.array(ds.ImageOrientationPatient, float)
            return float(np.dot(np.cross(o[:3], o[3:]), np.array(ds.ImagePositionPatient, float)))
        return float(ds.get("InstanceNumber", 0))

    datasets.sort(key=position)
    images, spacing = [], []
    for ds in datasets:
        arr = ds.pixel_array.astype(np.float32)
        slope = float(ds.get("RescaleSlope", 1) or 1)
        arr = arr * slope + float(ds.get("RescaleIntercept", 0) or 0)
        images.append(arr)
        ps = ds.get("PixelSpacing")
        spacing.append((float(ps[0]), float(ps[1])) if ps else None)
    return images, spacing


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None)
    args = parser.parse_args()
    bundle = load_bundle(args.model)
    print(f"bundle {bundle.name} {bundle.version}, threshold {bundle.threshold:.1f}")
    print(f"{'series':36} {'slices':>6} {'abnormal':>9} {'shift':>9} {'s/slice':>8}  target")
    for name, target in SERIES.items():
        folder = DICOM / name
        if not folder.is_dir():
            print(f"{name:36} missing")
            continue
        images, spacing = read_series(folder)
        t0 = time.perf_counter()
        s = bundle.score_slices(images, spacing)
        dt = (time.perf_counter() - t0) / max(1, len(images))
        fg = s.foreground
        frac = s.abnormal[fg].mean() if fg.any() else float("nan")
        print(f"{name:36} {len(images):6d} {100 * frac:8.1f}% {s.series_shift:9.0f} {dt:8.3f}  "
              f"{target}  (foreground {int(fg.sum())})")


if __name__ == "__main__":
    main()
