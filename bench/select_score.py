"""Choose how the slice score is formed, on validation (calibration) subjects only.

Run by hand after training; prints the tables the choice was made from. Never looks at the
evaluation subjects, the studyforrest or prostate series, or any test data.

1. Site allowance (``max_series_shift``, per candidate ``shift_quantile``): the calibration
   volumes are altered the way another scanner or protocol alters a normal scan (contrast
   curve, a coarser resolution, a different noise floor) and scored as series; the cap on the
   series shift is 1.25 times the largest shift these normal variants need.
2. Artifacts: the same subjects corrupted as in ``vaenode evaluate``; for each candidate
   (complexity correction on/off, tail weight) the position-matched AUROC per artifact.
3. Sanity: a series of pure noise (uniform, and Rician like a receive chain with no signal)
   must be flagged on every slice at the calibration threshold (1% of the normal calibration
   slices). A full-weight complexity correction fails this: noise is incompressible, the
   codec's code length grows more than the VAE's likelihood falls, and the series shift does
   the rest.
Among the candidates that pass 3, the one meeting the most AUROC targets (0.95 moderate, 0.80
mild) wins, ties broken by the mean AUROC. The scored records are cached beside the bundle
(``selection-records.pkl``).

    .venv/bin/python bench/select_score.py --model BUNDLE [--subjects 8]
"""

from __future__ import annotations

import argparse
import pickle
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from node.model.bundle import load_bundle  # noqa: E402
from node.model.data import Volume, load_nifti, plane_slices  # noqa: E402
from node.model.evaluate import EvalConfig, collect, rescore  # noqa: E402
from node.model.scoring import ScoreConfig, absolute_score, series_shift  # noqa: E402

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
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    bundle = load_bundle(args.model)
    ids = bundle.meta["training"]["subjects"]["calibration"][: args.subjects]
    vols = [load_nifti(p) for p in sorted(IXI.glob("*.nii.gz")) if p.name.split("-")[0] in ids]
    pixels = bundle.preprocess.image_size ** 2
    rng = np.random.default_rng(0)
    cache = args.model / "selection-records.pkl"
    if cache.exists():
        with cache.open("rb") as fh:
            data, variant_comps = pickle.load(fh)
    else:
        variant_comps = []
        for vol in vols:
            for name, vdata in {"original": vol.data, **site_variants(vol, rng)}.items():
                images, spacing = plane_slices(Volume(vol.subject, vdata, vol.spacing, ""),
                                               "axial")
                x, fg = bundle.preprocess_stack(list(images), [spacing] * len(images))
                variant_comps.append((vol.subject, name, bundle.components(x), fg))
        data = collect(bundle, vols, vols, EvalConfig(planes=("axial",), mcmc_subjects=0,
                                                      time_scoring=False), report=print)
        with cache.open("wb") as fh:
            pickle.dump((data, variant_comps), fh)
    noise_comps = []
    for kind in ("uniform", "rician"):
        if kind == "uniform":
            imgs = [rng.random((120, 120)).astype(np.float32) * 1000 for _ in range(12)]
        else:
            imgs = [np.abs(rng.normal(0, 1, (120, 120)) + 1j * rng.normal(0, 1, (120, 120)))
                    .astype(np.float32) for _ in range(12)]
        x, fg = bundle.preprocess_stack(imgs, [(2.0, 2.0)] * len(imgs))
        noise_comps.append((kind, bundle.components(x), fg))
    results = []
    for weight in (0.0, 0.5, 0.75, 1.0):
        for tail in (0.0, 4.0, 8.0, 16.0):
            for quantile in (0.5, 0.75, 0.9):
                complexity = weight > 0
                base = ScoreConfig.from_dict({
                    **bundle.scoring.to_dict(), "complexity": complexity,
                    "complexity_weight": weight or 1.0, "tail_weight": tail,
                    "series_relative": False, "shift_quantile": quantile,
                })
                meds: dict[str, list[float]] = {}
                for _subject, name, comp, fg in variant_comps:
                    a = absolute_score(comp, base, pixels, bundle.preprocess.clip_max)
                    meds.setdefault(name, []).append(float(np.quantile(a[fg], quantile)))
                ref = float(np.median(meds["original"]))
                worst = max(abs(m - ref) for k, v in meds.items() for m in v)
                cap = 1.25 * worst
                cfg = ScoreConfig.from_dict({**base.to_dict(), "series_relative": True,
                                             "max_series_shift": cap, "reference_median": ref})
                metrics = rescore(data, bundle, cfg, threshold=0.0)
                aurocs = {c: v["scores"]["final"]["auroc_matched"]
                          for c, v in metrics["conditions"].items()}
                finals = []
                for r in data["clean"]:
                    a = absolute_score(r["components"], cfg, pixels, bundle.preprocess.clip_max)
                    fgr = r["foreground"]
                    finals.append((a - series_shift(a, fgr, cfg))[fgr])
                thr = float(np.quantile(np.concatenate(finals), 0.01))
                noise_flagged = min(
                    float(np.mean((lambda a, f: a - series_shift(a, f, cfg))(
                        absolute_score(c, cfg, pixels, bundle.preprocess.clip_max), f) < thr))
                    for _k, c, f in noise_comps
                )
                met = sum(v >= (0.95 if c.endswith("moderate") else 0.80)
                          for c, v in aurocs.items())
                mean = float(np.mean(list(aurocs.values())))
                key = (noise_flagged == 1.0, met, mean)
                results.append((key, weight, tail, cap, aurocs, meds, ref, quantile))
    names = list(results[0][4])
    print("cweight tail q cap(nats) noise met  mean | " + " ".join(f"{n[:14]:>14}" for n in names))
    for (noise_ok, met, mean), weight, tail, cap, aurocs, _, _, q in results:
        print(f"{weight:7.2f} {tail:4.0f} {q:4.2f} {cap:9.0f} {noise_ok!s:5} {met:3d} {mean:.3f} | "
              + " ".join(f"{aurocs[n]:14.3f}" for n in names))
    best = max(results, key=lambda r: r[0])
    print(f"\nchosen (flags pure noise, most targets met, then mean AUROC): "
          f"complexity_weight={best[1]} "
          f"tail_weight={best[2]} shift_quantile={best[7]} max_series_shift={best[3]:.0f}")
    print("series-median shifts of the site variants (nats, relative to the originals):")
    for k, v in best[5].items():
        print(f"  {k:10} " + " ".join(f"{m - best[6]:8.0f}" for m in v))


if __name__ == "__main__":
    main()
