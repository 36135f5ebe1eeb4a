"""Does de-identification move the score? IXI volumes defaced and background-zeroed, scored.

The other-site acceptance series (studyforrest) is defaced: its face is cut away along planes
and set to 0, and 94% of its air is exactly 0 (IXI's: 59-87%). Candidates that failed the
other-site target flagged its lower slices, where the cut runs. This bench tests that reading
on IXI subjects instead of on the acceptance series: each subject's axial stack is scored as
the worker scores it (position reference, series shift) in four versions,

- ``original``;
- ``defaced``: below the brow (105 mm below the highest voxel of the head: the brow in most
  IXI volumes, lower where the field of view clips the vertex), every voxel within 20 mm of the
  forehead's coronal plane at that level set to 0: nose, eyes' front, lips and chin cut off
  along a plane, as defacing tools do;
- ``air0``: every voxel outside the head below 5% of the volume's 99.5th percentile set to 0
  (an export that suppresses the background);
- ``both``.

It prints, per bundle and version, the fraction of foreground slices flagged and where along
the stack the flagged slices lie (relative position, 0 = lowest foreground slice). By default
the subjects are the bundle's calibration subjects (never its evaluation subjects); no choice
is made from it. ``--figure PNG`` draws a mid-sagittal slice of each version of the first
subject, to check the cut.

    .venv/bin/python bench/deidentified.py --model node/models/brain-t1 --model /tmp/s8/A
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from node.model.bundle import Bundle, load_bundle  # noqa: E402
from node.model.data import Volume, find_nifti, load_nifti, plane_slices, subject_of  # noqa: E402

IXI = ROOT.parent / "shared" / "data" / "ixi_t1"
AIR_LEVEL = 0.05  # of the 99.5th percentile
BROW_BELOW_VERTEX_MM = 105.0
FACE_DEPTH_MM = 20.0


def head_mask(d: np.ndarray) -> np.ndarray:
    """Voxels of the head: above the air level, closed and filled slice by slice."""
    hi = float(np.percentile(d, 99.5))
    mask = ndimage.binary_closing(d >= AIR_LEVEL * hi, iterations=3)
    return np.stack([ndimage.binary_fill_holes(mask[:, :, k]) for k in range(mask.shape[2])],
                    axis=2)


def defaced(vol: Volume) -> np.ndarray:
    """The face cut off along a coronal plane below the brow (RAS voxel order)."""
    d = vol.data.copy()
    head = head_mask(d)
    _, sy, sz = vol.spacing
    zs = np.flatnonzero(head.any(axis=(0, 1)))
    z_brow = max(0, int(zs[-1] - BROW_BELOW_VERTEX_MM / sz))
    y_front = int(np.flatnonzero(head[:, :, z_brow].any(axis=0))[-1])
    y_cut = max(0, int(y_front - FACE_DEPTH_MM / sy))
    d[:, y_cut:, :z_brow] = 0
    return d


def air_zeroed(d: np.ndarray) -> np.ndarray:
    """Everything outside the head below the air level set to 0."""
    hi = float(np.percentile(d, 99.5))
    out = d.copy()
    out[(~head_mask(d)) & (d < AIR_LEVEL * hi)] = 0
    return out


def versions(vol: Volume) -> dict[str, np.ndarray]:
    face = defaced(vol)
    return {"original": vol.data, "defaced": face, "air0": air_zeroed(vol.data),
            "both": air_zeroed(face)}


def flagged(bundle: Bundle, vol: Volume, data: np.ndarray) -> tuple[float, np.ndarray]:
    """Fraction of foreground axial slices flagged, and the flagged slices' relative positions."""
    v = Volume(vol.subject, data, vol.spacing, vol.source)
    stack, spacing = plane_slices(v, "axial")
    s = bundle.score_slices(list(stack), [spacing] * len(stack), plane="axial",
                            descending=False, slice_spacing_mm=vol.spacing[2])
    fg = np.flatnonzero(s.foreground)
    hit = fg[s.abnormal[fg]]
    rel = (hit - fg[0]) / max(1, fg[-1] - fg[0])
    return float(s.abnormal[fg].mean()), rel


def figure(vol: Volume, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    vs = versions(vol)
    fig, axes = plt.subplots(1, len(vs), figsize=(4 * len(vs), 4))
    x = vol.data.shape[0] // 2
    for ax, (name, d) in zip(axes, vs.items(), strict=True):
        ax.imshow(d[x].T, cmap="gray", origin="lower", vmin=0,
                  vmax=float(np.percentile(vol.data, 99.5)))
        ax.set_title(f"{vol.subject} {name}")
        ax.axis("off")
    fig.savefig(path, dpi=80, bbox_inches="tight")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, action="append", default=None,
                        help="bundle (repeat to compare; default: the shipped one)")
    parser.add_argument("--subjects", nargs="*", default=None,
                        help="IXI subjects (default: the first bundle's calibration subjects)")
    parser.add_argument("--figure", type=Path, default=None)
    args = parser.parse_args()
    bundles = [load_bundle(m) for m in (args.model or [None])]
    subjects = args.subjects or bundles[0].meta["training"]["subjects"]["calibration"]
    files = {subject_of(p): p for p in find_nifti([IXI])}
    vols = [load_nifti(files[s]) for s in subjects]
    if args.figure:
        figure(vols[0], args.figure)
    names = ("original", "defaced", "air0", "both")
    rows: dict[tuple[int, str], list[tuple[float, np.ndarray]]] = {}
    for vol in tqdm(vols, desc="subjects"):
        vs = versions(vol)
        for b, bundle in enumerate(bundles):
            for name in names:
                rows.setdefault((b, name), []).append(flagged(bundle, vol, vs[name]))
    print(f"{len(vols)} subjects: {' '.join(subjects)}")
    print(f"{'bundle':28} {'version':9} {'flagged':>8} {'worst subject':>14}  "
          "flagged slices' relative positions (quartiles)")
    for b, path in enumerate(args.model or ["shipped"]):
        for name in names:
            res = rows[(b, name)]
            fr = np.array([r[0] for r in res])
            pos = np.concatenate([r[1] for r in res])
            q = (" ".join(f"{v:.2f}" for v in np.quantile(pos, [0.25, 0.5, 0.75]))
                 if len(pos) else "-")
            print(f"{str(path)[-28:]:28} {name:9} {100 * fr.mean():7.1f}% "
                  f"{100 * fr.max():13.1f}%  {q} (n={len(pos)})")


if __name__ == "__main__":
    main()
