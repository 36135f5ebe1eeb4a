"""Exploration (background part): extra per-slice likelihood statistics on the calibration stacks
of ``bench/select_score.py`` (same subjects, same TorchIO corruptions, same site variants and
pure-noise series), merged with its cached records.

Per slice, with z = the posterior mean mu(x) (one decode), the decoder's per-pixel Gaussian
terms ll_ij = -0.5 r_ij^2 - log sigma_ij - 0.5 log 2 pi, r = (x - mean) / sigma, and
``head`` = the decoder mean above 0.1 (the model's own head, so ghosts in the image do not
move the mask), squares dilated/eroded with max-pooling:
- ``bg_ll`` / ``bg_rr`` / ``bg_n``: sum of ll, of 0.5 r^2, pixel count outside head dilated 3 px;
- ``band_ll`` / ``band_rr`` / ``band_n``: the same in head dilated 5 px minus head eroded 3 px;
- ``pm_ll``: log p(x | mu) over all pixels; ``pm_tail{k}``: mean of the k largest 0.5 r^2;
- ``pm_tail1638``, ``pm_tail3277`` (10%, 20%); ``bg{1,6,10}_ll`` / ``_n``: background with
  other dilations; ``bg_tail820``: 820 largest outside the head; ``head_ll`` / ``head_n``: sum of
  ll and count inside the decoder-mean head mask (undilated);
- ``pool8`` / ``pool16``: the largest mean of 0.5 r^2 over 8x8 (stride 4) / 16x16 (stride 8)
  windows; ``bg_tail``: mean of the 164 largest 0.5 r^2 outside the dilated head.

    OMP_NUM_THREADS=1 .venv/bin/python bench/explore_extras.py --model /tmp/runs3/r9 \
        --out /tmp/helper-model/extras.pkl
"""

from __future__ import annotations

import argparse
import math
import pickle
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.select_score import IXI, noise_images  # noqa: E402
from node.model.bundle import load_bundle  # noqa: E402
from node.model.data import load_nifti  # noqa: E402
from node.model.evaluate import EvalConfig, collect  # noqa: E402
from node.model.train import site_variant_stacks  # noqa: E402

LOG_2PI = math.log(2 * math.pi)


def dilate(m: torch.Tensor, r: int) -> torch.Tensor:
    return F.max_pool2d(m.float(), 2 * r + 1, stride=1, padding=r) > 0.5


def erode(m: torch.Tensor, r: int) -> torch.Tensor:
    return ~dilate(~m, r)


@torch.no_grad()
def extras(model, x: torch.Tensor, batch: int = 64) -> dict[str, np.ndarray]:
    out: dict[str, list[np.ndarray]] = {}
    for s in range(0, len(x), batch):
        xb = x[s : s + batch]
        mu, _ = model.encode(xb)
        mean, log_sigma = model.decode(mu)
        r2 = 0.5 * ((xb - mean) * torch.exp(-log_sigma)) ** 2
        ll = -r2 - log_sigma - 0.5 * LOG_2PI
        head = mean > 0.1
        bg = ~dilate(head, 3)
        band = dilate(head, 5) & ~erode(head, 3)
        vals = {
            "bg_ll": (ll * bg).flatten(1).sum(1), "bg_rr": (r2 * bg).flatten(1).sum(1),
            "bg_n": bg.flatten(1).sum(1).double(),
            "band_ll": (ll * band).flatten(1).sum(1), "band_rr": (r2 * band).flatten(1).sum(1),
            "band_n": band.flatten(1).sum(1).double(),
            "pm_ll": ll.flatten(1).sum(1),
            "pool8": F.avg_pool2d(r2, 8, stride=4).flatten(1).max(1).values,
            "pool16": F.avg_pool2d(r2, 16, stride=8).flatten(1).max(1).values,
            "bg_tail": (r2 * bg).flatten(1).topk(164, dim=1).values.mean(1),
        }
        flat = r2.flatten(1)
        for k in (41, 82, 164, 328, 820, 1638, 3277):
            vals[f"pm_tail{k}"] = flat.topk(k, dim=1).values.mean(1)
        for rad in (1, 6, 10):
            m = ~dilate(head, rad)
            vals[f"bg{rad}_ll"] = (ll * m).flatten(1).sum(1)
            vals[f"bg{rad}_n"] = m.flatten(1).sum(1).double()
        vals["bg_tail820"] = (r2 * bg).flatten(1).topk(820, dim=1).values.mean(1)
        vals["head_ll"] = (ll * head).flatten(1).sum(1)
        vals["head_n"] = head.flatten(1).sum(1).double()
        for key, v in vals.items():
            out.setdefault(key, []).append(v.double().cpu().numpy())
    return {k: np.concatenate(v) for k, v in out.items()}


def record(model_path: Path, subjects: int, out_path: Path,
           features: Callable[[torch.nn.Module, torch.Tensor], dict[str, np.ndarray]],
           skip: int = 0) -> None:
    """Score ``features(model, x)`` on the calibration stacks of ``bench/select_score.py`` (the
    first ``subjects`` calibration subjects: their site variants, the same TorchIO corruptions
    as ``collect``, the pure-noise series with the bundle's components too) and pickle them to
    ``out_path`` for ``bench/explore_judge.py``'s merge; ``skip``: leave out the first
    calibration subjects, as ``select_score.load_records`` does)."""
    torch.set_num_threads(1)
    t0 = time.time()
    bundle = load_bundle(model_path)
    model = bundle.model
    ids = bundle.meta["training"]["subjects"]["calibration"][skip : skip + subjects]
    vols = [load_nifti(q) for q in sorted(IXI.glob("*.nii.gz")) if q.name.split("-")[0] in ids]
    print("subjects", [v.subject for v in vols], flush=True)
    rng = np.random.default_rng(0)
    variants = []
    for subject, name, x, fg in site_variant_stacks(bundle, vols, rng):
        variants.append((subject, name, features(model, x), fg))
    print(f"variants done {time.time() - t0:.0f}s", flush=True)

    # Same stacks as collect(): replace the estimator pass by the features (the cached records
    # hold the estimator outputs; merged by order and checked on the foreground masks).
    bundle.components = lambda x, **kw: features(model, x)  # type: ignore[method-assign]
    data = collect(bundle, vols, vols, EvalConfig(planes=("axial",), mcmc_subjects=0,
                                                  time_scoring=False), report=print)
    print(f"collect done {time.time() - t0:.0f}s", flush=True)
    rng = np.random.default_rng(0)  # the noise series as select_score builds them (cached case)
    bundle2 = load_bundle(model_path)
    noise = []
    for kind in ("uniform", "rician"):
        imgs = noise_images(kind, rng)
        x, fg = bundle2.preprocess_stack(imgs, [(2.0, 2.0)] * len(imgs))
        comp = bundle2.components(x)
        comp.update(features(model, x))
        noise.append((comp, fg))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with out_path.open("wb") as fh:
        pickle.dump({"data": data, "variants": variants, "noise": noise}, fh)
    print(f"done {time.time() - t0:.0f}s", flush=True)


def arguments() -> argparse.Namespace:
    """``--model BUNDLE [--subjects N] [--skip K] --out PKL`` of the feature-recording
    scripts."""
    p = argparse.ArgumentParser()
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--subjects", type=int, default=8)
    p.add_argument("--skip", type=int, default=0, help="leave out the first K calibration "
                   "subjects")
    p.add_argument("--out", type=Path, required=True)
    return p.parse_args()


def main() -> None:
    a = arguments()
    record(a.model, a.subjects, a.out, extras, a.skip)


if __name__ == "__main__":
    main()
