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

import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.explore_extras import arguments, record  # noqa: E402

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
    a = arguments()
    record(a.model, a.subjects, a.out, spectral, a.skip)


if __name__ == "__main__":
    main()
