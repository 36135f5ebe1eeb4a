"""Exploration (background part): extra normal-looking site variants, beyond select_score's four,
that a background-restricted component could be sensitive to. Each calibration subject's
axial volume is altered, scored (estimator components + ``explore_extras`` extras), and the
fraction of its foreground slices flagged at the unreferenced selection threshold (1% of the
clean calibration slices, as ``select_score.judge``) is printed for the shipped triple and the
candidates.
- ``zerobg05`` / ``zerobg02``: voxels below 5% / 2% of the 99.5th percentile set to 0 (a
  scanner or export that suppresses background noise);
- ``noisier2`` / ``noisier3``: Gaussian noise of 2% / 3% of the 99.5th percentile (select_score
  uses 1%);
- ``gamma0.6``: contrast curve 0.6 (select_score: 0.75 and 1.33).

    OMP_NUM_THREADS=1 .venv/bin/python bench/explore_stress.py --model /tmp/runs3/r9 \
        --extras /tmp/helper-model/extras2.pkl
"""

from __future__ import annotations

import argparse
import pickle
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.explore_extras import extras  # noqa: E402
from bench.explore_judge import SHIPPED, custom_part, merge  # noqa: E402
from bench.select_score import IXI, make_part  # noqa: E402
from node.model.bundle import load_bundle  # noqa: E402
from node.model.data import Volume, load_nifti, plane_slices  # noqa: E402
from node.model.scoring import alternative_final, match_scales, series_shift  # noqa: E402


def variants_of(vol: Volume, rng: np.random.Generator) -> dict[str, np.ndarray]:
    d = vol.data.astype(np.float32)
    hi = float(np.percentile(d, 99.5))
    n = d / hi
    return {
        "zerobg05": np.where(n < 0.05, 0.0, n) * hi,
        "zerobg02": np.where(n < 0.02, 0.0, n) * hi,
        "noisier2": (n + rng.normal(0, 0.02, d.shape)).clip(0) * hi,
        "noisier3": (n + rng.normal(0, 0.03, d.shape)).clip(0) * hi,
        "gamma0.6": (n.clip(0) ** 0.6) * hi,
    }


def stress_flags(bundle, parts, fns, stress) -> dict[str, float]:
    """Fraction of each stress variant's foreground slices flagged at the unreferenced
    selection threshold (1% of the clean calibration slices) by the minimum of ``parts``
    (``fns[i]``: the part's absolute score from components; None: a weighting)."""
    pixels, clip = bundle.modelled_values, bundle.preprocess.clip_max
    main = parts[0]
    maps = [(1.0, 0.0)] + [match_scales(np.concatenate(main.clean), np.concatenate(pp.clean))
                           for pp in parts[1:]]
    clean = np.concatenate([np.min([o + g * pp.clean[i] for (g, o), pp
                                    in zip(maps, parts, strict=True)], axis=0)
                            for i in range(len(main.clean))])
    thr = float(np.quantile(clean, 0.01))
    out: dict[str, list[np.ndarray]] = {}
    for _s, name, comp, fg in stress:
        finals = []
        for pp, fn in zip(parts, fns, strict=True):
            if fn is None:
                finals.append(alternative_final(comp, fg, pp.cfg, pixels, clip))
            else:
                ab = fn(comp)
                finals.append(ab - series_shift(ab, fg, pp.cfg))
        s = np.min([o + g * f for (g, o), f in zip(maps, finals, strict=True)], axis=0)
        out.setdefault(name, []).append(s[fg] < thr)
    return {k: float(np.mean(np.concatenate(v))) for k, v in out.items()}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--extras", type=Path, required=True)
    p.add_argument("--cache", type=Path, default=Path("/tmp/helper-model/stress.pkl"))
    a = p.parse_args()
    torch.set_num_threads(1)
    bundle = load_bundle(a.model)
    data, variants, noise = merge(a.model / "selection-records.pkl", a.extras)
    if a.cache.exists():
        stress = pickle.loads(a.cache.read_bytes())
    else:
        ids = bundle.meta["training"]["subjects"]["calibration"][:8]
        vols = [load_nifti(q) for q in sorted(IXI.glob("*.nii.gz"))
                if q.name.split("-")[0] in ids]
        rng = np.random.default_rng(1)
        stress = []
        for vol in vols:
            for name, vdata in variants_of(vol, rng).items():
                images, spacing = plane_slices(Volume(vol.subject, vdata, vol.spacing, ""),
                                               "axial")
                x, fg = bundle.preprocess_stack(list(images), [spacing] * len(images))
                comp = bundle.components(x)
                comp.update(extras(bundle.model, x))
                stress.append((vol.subject, name, comp, fg))
            print("scored", vol.subject, flush=True)
        a.cache.write_bytes(pickle.dumps(stress))

    def bg(r):
        return lambda c: c[f"bg{r}_ll"] / np.maximum(c[f"bg{r}_n"], 1)

    shipped = [make_part(bundle, data, variants, noise, w, t, q) for w, t, q in SHIPPED]
    fns: list = [None, None, None]
    cands = {"shipped triple": (shipped, fns)}
    for r, q in (("1", 0.75), ("1", 0.5), ("", 0.5)):
        part = custom_part(bundle, data, variants, noise, "b", bg(r), q)
        cands[f"+bg{r or 3}_ll/n q{q}"] = ([*shipped, part], [*fns, bg(r)])
    for name, (parts, absfns) in cands.items():
        flagged = stress_flags(bundle, parts, absfns, stress)
        print(f"{name:22} " + " ".join(f"{k} {v:.3f}" for k, v in flagged.items()), flush=True)


if __name__ == "__main__":
    main()
