"""What ``vaenode calibrate --site`` does for a scanner whose normal images differ (run by hand,
prints a table).

A "site" is simulated by one change applied to whole IXI volumes, one that the shipped bundle's
series shift cannot absorb: noise of 3% of the 99.5th percentile added (an exploration on the
calibration subjects found that the shipped background part then flags nearly every slice;
node/models/README.md), or a contrast curve with gamma 0.6 (beyond the 0.75 of the calibration's
site variants). The shipped bundle is calibrated with ``--site`` on 6 such volumes (calibration
subjects 1-6 of the bundle, changed the same way; the site check of ``node.model.site_check`` is
printed), then both bundles score 5 other changed volumes (calibration subjects 7-11; never
evaluation subjects) as the worker scores an axial series, clean and with the site check's block
of moderate TorchIO motion (:func:`node.model.site_check.motion_check`: 40-55% of the axial
stack). Printed: the fraction of foreground slices flagged on the clean series, in the motion
block, and outside it.

    .venv/bin/python bench/site_calibration.py [--model node/models/brain-t1]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from node.model.bundle import Bundle, default_bundle_path, load_bundle  # noqa: E402
from node.model.data import Volume, load_nifti, plane_slices  # noqa: E402
from node.model.site_check import motion_check  # noqa: E402
from node.model.train import recalibrate  # noqa: E402

IXI = ROOT.parent / "shared" / "data" / "ixi_t1"


def site(kind: str, vol: Volume, seed: int) -> Volume:
    """``vol`` as the simulated site would acquire it."""
    d = vol.data.astype(np.float32)
    hi = float(np.percentile(d, 99.5)) or 1.0
    n = d / hi
    if kind == "noisier 3%":
        n = (n + np.random.default_rng(seed).normal(0.0, 0.03, n.shape)).clip(0)
    elif kind == "gamma 0.6":
        n = n.clip(0) ** 0.6
    elif kind != "unchanged":
        raise ValueError(kind)
    return Volume(vol.subject, (n * hi).astype(np.float32), vol.spacing, vol.source)


def clean_flagged(bundle: Bundle, vol: Volume) -> np.ndarray:
    """Flagged or not, per foreground slice of the volume's axial stack."""
    images, spacing = plane_slices(vol, "axial")
    s = bundle.score_slices(list(images), [spacing] * len(images), plane="axial",
                            slice_spacing_mm=float(vol.spacing[2]))
    return s.abnormal[s.foreground]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=default_bundle_path())
    args = parser.parse_args()
    shipped = load_bundle(args.model)
    ids = shipped.meta["training"]["subjects"]["calibration"][:11]
    vols = {v.subject: v for v in (load_nifti(p) for p in sorted(IXI.glob("*.nii.gz"))
                                   if p.name.split("-")[0] in ids)}
    cal, test = [vols[s] for s in ids[:6]], [vols[s] for s in ids[6:11]]
    rows = []
    for kind in ("unchanged", "noisier 3%", "gamma 0.6"):
        with tempfile.TemporaryDirectory() as tmp:
            print(f"{kind}: calibrating on {[v.subject for v in cal]} ...", flush=True)
            recalibrate(load_bundle(args.model), [site(kind, v, i) for i, v in enumerate(cal)],
                        Path(tmp) / "site", {}, command="bench/site_calibration.py", site=True)
            site_bundle = load_bundle(Path(tmp) / "site")
        check = site_bundle.meta["training"]["recalibrations"][-1]["site_check"]
        print(f"  site check: block {100 * check['block_flagged']:.1f}% flagged, others "
              f"{100 * check['elsewhere_flagged']:.1f}%{' (BLIND)' if check['blind'] else ''}; "
              f"threshold {site_bundle.threshold:.1f}", flush=True)
        test_site = [site(kind, vol, 100 + i) for i, vol in enumerate(test)]
        for name, bundle in (("shipped", shipped), ("site", site_bundle)):
            clean = np.concatenate([clean_flagged(bundle, v) for v in test_site])
            moved = motion_check(bundle, test_site)
            rows.append((kind, name, 100 * float(clean.mean()), 100 * moved["block_flagged"],
                         100 * moved["elsewhere_flagged"]))
            print(f"  scored with the {name} bundle", flush=True)
    print("\n| site | bundle | clean series flagged | motion block flagged | outside the block |")
    print("|---|---|---|---|---|")
    for kind, name, a, b, c in rows:
        print(f"| {kind} | {name} | {a:.1f}% | {b:.1f}% | {c:.1f}% |")


if __name__ == "__main__":
    main()
