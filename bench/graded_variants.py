"""Normal series whose detail changes smoothly along the stack: is any of it flagged?

A scanner's sharpness need not be the same at both ends of a series (another coil, another
reconstruction, a through-plane resolution that the resampling treats differently), and a
part that compares a slice's detail with its own series must take such a smooth trend as
normal while it flags a block of blurred or moved slices. Each calibration volume of the
bundle (the first ``--subjects`` of ``training.subjects.calibration``, the subjects
``bench/select_score.py`` uses; never evaluation subjects) is blended with a smoothed copy of
itself (3D Gaussian, ``--sigma`` voxels; 0.5 is the "smoother" site variant of
``node.model.artifacts.site_variants``) with a weight that rises linearly from 0 to 1 along
the axial axis, upwards and downwards, and the axial stacks are scored as the worker scores a
series (plane and slice spacing given, so the position reference applies). Prints the
fraction of foreground slices flagged at the bundle's threshold, per variant and overall.

    .venv/bin/python bench/graded_variants.py --model node/models/brain-t1
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from node.model.bundle import load_bundle  # noqa: E402
from node.model.data import Volume, load_nifti, plane_slices  # noqa: E402

IXI = ROOT.parent / "shared" / "data" / "ixi_t1"


def graded(data: np.ndarray, sigma: float) -> dict[str, np.ndarray]:
    """The volume blended with its smoothed copy, the weight a ramp along axis 2 (inferior to
    superior): ``sharp-to-smooth`` reaches the smoothed copy at the top, ``smooth-to-sharp`` at
    the bottom."""
    d = data.astype(np.float32)
    smooth = gaussian_filter(d, sigma)
    w = np.linspace(0.0, 1.0, d.shape[2], dtype=np.float32).reshape(1, 1, -1)
    return {"original": d, "sharp-to-smooth": (1 - w) * d + w * smooth,
            "smooth-to-sharp": w * d + (1 - w) * smooth}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--subjects", type=int, default=8)
    parser.add_argument("--sigma", type=float, default=0.5, help="voxels (default 0.5)")
    args = parser.parse_args()
    bundle = load_bundle(args.model)
    ids = bundle.meta["training"]["subjects"]["calibration"][: args.subjects]
    paths = [p for p in sorted(IXI.glob("*.nii.gz")) if p.name.split("-")[0] in ids]
    flagged: dict[str, list[np.ndarray]] = {}
    print(f"bundle {args.model} (threshold {bundle.threshold:.1f}), {len(paths)} calibration "
          f"subjects, sigma {args.sigma} voxels")
    for path in paths:
        vol = load_nifti(path)
        row = []
        for name, data in graded(vol.data, args.sigma).items():
            images, spacing = plane_slices(Volume(vol.subject, data, vol.spacing, ""), "axial")
            s = bundle.score_slices(list(images), [spacing] * len(images), plane="axial",
                                    slice_spacing_mm=float(vol.spacing[2]))
            f = s.abnormal[s.foreground]
            flagged.setdefault(name, []).append(f)
            row.append(f"{name} {int(f.sum())}/{f.size}")
        print(f"{vol.subject}: " + ", ".join(row), flush=True)
    print("\n| variant | slices | flagged |\n|---|---|---|")
    for name, fs in flagged.items():
        f = np.concatenate(fs)
        print(f"| {name} | {f.size} | {100 * f.mean():.1f}% |")


if __name__ == "__main__":
    main()
