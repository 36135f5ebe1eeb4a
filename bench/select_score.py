"""Choose how the slice score is formed, on validation (calibration) subjects only.

Run by hand after training; prints the tables the choice was made from. Never looks at the
evaluation subjects, the studyforrest or prostate series, or any test data.

1. Site allowance (``max_series_shift``): the calibration volumes are altered the way another
   scanner or protocol alters a normal scan (contrast curve, gain, a coarser or finer
   resolution, a different noise floor) and scored as series; the cap on the series shift is
   1.25 times the largest shift these normal variants need.
2. Artifacts: the same subjects corrupted as in ``vaenode evaluate``; for each candidate
   (complexity correction on/off, tail weight) the position-matched AUROC per artifact.
The candidate with the best worst-case AUROC over all artifacts and severities wins.

    .venv/bin/python bench/select_score.py --model BUNDLE [--subjects 8]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from node.model.bundle import load_bundle  # noqa: E402
from node.model.data import Volume, load_nifti, plane_slices  # noqa: E402
from node.model.evaluate import EvalConfig, collect, rescore  # noqa: E402
from node.model.scoring import ScoreConfig, absolute_score  # noqa: E402

IXI = ROOT.parent / "shared" / "data" / "ixi_t1"


def site_variants(vol: Volume, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Normal-looking versions of a volume as another scanner/protocol might produce."""
    from scipy.ndimage import gaussian_filter

    d = vol.data.astype(np.float32)
    hi = float(np.percentile(d, 99.5))
    n = d / hi
    return {
        "gamma0.75": (n.clip(0) ** 0.75) * hi,
        "gamma1.33": (n.clip(0) ** 1.33) * hi,
        "smoother": gaussian_filter(d, 0.5),
        "noisier": (n + rng.normal(0, 0.01, d.shape)).clip(0) * hi,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--subjects", type=int, default=8)
    args = parser.parse_args()
    bundle = load_bundle(args.model)
    ids = bundle.meta["training"]["subjects"]["calibration"][: args.subjects]
    vols = [load_nifti(p) for p in sorted(IXI.glob("*.nii.gz")) if p.name.split("-")[0] in ids]
    pixels = bundle.preprocess.image_size ** 2
    rng = np.random.default_rng(0)
    variant_comps = []
    for vol in vols:
        for name, data in {"original": vol.data, **site_variants(vol, rng)}.items():
            images, spacing = plane_slices(Volume(vol.subject, data, vol.spacing, ""), "axial")
            x, fg = bundle.preprocess_stack(list(images), [spacing] * len(images))
            variant_comps.append((vol.subject, name, bundle.components(x), fg))
    data = collect(bundle, vols, vols, EvalConfig(planes=("axial",), mcmc_subjects=0,
                                                  time_scoring=False), report=print)
    results = []
    for complexity in (True, False):
        for tail in (0.0, 0.5, 1.0, 2.0, 4.0, 8.0):
            base = ScoreConfig.from_dict({**bundle.scoring.to_dict(), "complexity": complexity,
                                          "tail_weight": tail, "series_relative": False})
            meds: dict[str, list[float]] = {}
            for _subject, name, comp, fg in variant_comps:
                a = absolute_score(comp, base, pixels, bundle.preprocess.clip_max)
                meds.setdefault(name, []).append(float(np.median(a[fg])))
            ref = float(np.median(meds["original"]))
            worst = max(abs(m - ref) for k, v in meds.items() for m in v)
            cap = 1.25 * worst
            cfg = ScoreConfig.from_dict({**base.to_dict(), "series_relative": True,
                                         "max_series_shift": cap, "reference_median": ref})
            metrics = rescore(data, bundle, cfg, threshold=0.0)
            aurocs = {c: v["scores"]["final"]["auroc_matched"]
                      for c, v in metrics["conditions"].items()}
            results.append((min(aurocs.values()), complexity, tail, cap, aurocs, meds, ref))
    names = list(results[0][4])
    print("complexity tail  cap(nats) worst | " + " ".join(f"{n[:14]:>14}" for n in names))
    for worst, complexity, tail, cap, aurocs, _, _ in results:
        print(f"{complexity!s:10} {tail:4.1f} {cap:9.0f} {worst:.3f} | "
              + " ".join(f"{aurocs[n]:14.3f}" for n in names))
    best = max(results, key=lambda r: r[0])
    print(f"\nchosen: complexity={best[1]} tail_weight={best[2]} max_series_shift={best[3]:.0f}")
    print("series-median shifts of the site variants (nats, relative to the originals):")
    for k, v in best[5].items():
        print(f"  {k:10} " + " ".join(f"{m - best[6]:8.0f}" for m in v))


if __name__ == "__main__":
    main()
