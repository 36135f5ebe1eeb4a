"""Exploration (spectral part): how much of the finest detail a slice keeps, measured on the
decoder's standardized residual, on the calibration stacks of ``bench/select_score.py`` (same
subjects, same TorchIO corruptions, site variants and pure-noise series as
``bench/explore_extras.py``, merged with its cached records by ``bench/explore_judge.py``).

Per slice, with z = the posterior mean (one decode), r = (x - mean) / sigma: the decoder's
log p(x|z) has the quadratic term -0.5 sum r^2, which by Parseval is -0.5 / N sum_f |R_f|^2
over the 2D spectrum R of r: the likelihood is a sum of per-frequency terms, and a slice that
lost its finest detail (blur, motion's k-space mixing) loses its highest-frequency terms,
which makes it MORE likely under a Gaussian decoder. Features, inside the decoder-mean head
mask (mean > 0.1) eroded by 2 px (the mask edge would leak into the spectrum):
- ``{r,d,x}_hf{a}``: log of the mean |F_f|^2 / n over the frequencies with radius >= a
  cycles/pixel (a in 0.25, 0.3125, 0.375, 0.4375, 0.5) of r, of the raw residual x - mean, or
  of the image itself (minus its mean in the mask), n the mask's pixel count;
- ``{r,x}_mid``: the same over 0.0625 <= radius < 0.1875 (for ratios);
- ``x_level``: log of the image's mean inside the mask (a slice's brightness).

    OMP_NUM_THREADS=1 .venv/bin/python bench/explore_spectral.py --model /tmp/runs3/r9 \
        --out /tmp/s5/spectral.pkl
"""

from __future__ import annotations

import argparse
import pickle
import sys
import time
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

CUTS = (0.25, 0.3125, 0.375, 0.4375, 0.5)


def band_masks(size: int) -> dict[str, torch.Tensor]:
    f = torch.fft.fftfreq(size)
    rho = (f.view(size, 1) ** 2 + f.view(1, size) ** 2).sqrt()
    out = {f"hf{a}": rho >= a for a in CUTS}
    out["mid"] = (rho >= 0.0625) & (rho < 0.1875)
    return out


@torch.no_grad()
def spectral(model, x: torch.Tensor, batch: int = 64) -> dict[str, np.ndarray]:
    bands = band_masks(x.shape[-1])
    out: dict[str, list[np.ndarray]] = {}
    for s in range(0, len(x), batch):
        xb = x[s : s + batch]
        mu, _ = model.encode(xb)
        mean, log_sigma = model.decode(mu)
        head = mean > 0.1
        inner = ~(F.max_pool2d((~head).float(), 5, stride=1, padding=2) > 0.5)
        n = inner.flatten(1).sum(1).clamp(min=1).double()
        fields = {"r": (xb - mean) * torch.exp(-log_sigma), "d": xb - mean}
        xm = (xb * inner).flatten(1).sum(1).double() / n
        out.setdefault("x_level", []).append(torch.log(xm.clamp(min=1e-6)).cpu().numpy())
        fields["x"] = xb - xm.float().view(-1, 1, 1, 1)
        for name, img in fields.items():
            power = torch.fft.fft2((img * inner)[:, 0]).abs().double() ** 2
            for band, m in bands.items():
                if name == "d" and band == "mid":
                    continue
                v = torch.log(power[:, m].mean(1) / n + 1e-30)
                out.setdefault(f"{name}_{band}", []).append(v.cpu().numpy())
    return {k: np.concatenate(v) for k, v in out.items()}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--subjects", type=int, default=8)
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    t0 = time.time()
    bundle = load_bundle(a.model)
    model = bundle.model
    ids = bundle.meta["training"]["subjects"]["calibration"][: a.subjects]
    vols = [load_nifti(q) for q in sorted(IXI.glob("*.nii.gz")) if q.name.split("-")[0] in ids]
    print("subjects", [v.subject for v in vols], flush=True)
    rng = np.random.default_rng(0)
    variants = [(subject, name, spectral(model, x), fg)
                for subject, name, x, fg in site_variant_stacks(bundle, vols, rng)]
    print(f"variants done {time.time() - t0:.0f}s", flush=True)
    bundle.components = lambda x, **kw: spectral(model, x)  # type: ignore[method-assign]
    data = collect(bundle, vols, vols, EvalConfig(planes=("axial",), mcmc_subjects=0,
                                                  time_scoring=False), report=print)
    print(f"collect done {time.time() - t0:.0f}s", flush=True)
    rng = np.random.default_rng(0)  # the noise series as select_score builds them
    bundle2 = load_bundle(a.model)
    noise = []
    for kind in ("uniform", "rician"):
        imgs = noise_images(kind, rng)
        x, fg = bundle2.preprocess_stack(imgs, [(2.0, 2.0)] * len(imgs))
        noise.append((spectral(model, x), fg))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    with a.out.open("wb") as fh:
        pickle.dump({"data": data, "variants": variants, "noise": noise}, fh)
    print(f"done {time.time() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
