"""Baselines the VAE score must beat: reconstruction error and training-free quality metrics.

The quality metrics follow MRIQC (Esteban et al. 2017) in spirit, computed per 2D slice on the
model grid:
- ``background_noise``: standard deviation of the dim, non-padding pixels (noise floor);
- ``hf_energy``: fraction of the spectral energy above half the Nyquist frequency (noise, ghosts
  and spikes raise it, blur lowers it);
- ``efc``: entropy focus criterion, the normalized entropy of pixel brightness (motion and
  ghosting spread energy, raising it).
None is learned. To turn them into one anomaly score, each is expressed as a robust z-score
against normal reference slices (median and MAD) and the largest absolute z counts (``qc``).
"""

from __future__ import annotations

import numpy as np
import torch

QC_METRICS = ("background_noise", "hf_energy", "efc")


def qc_metrics(x: torch.Tensor) -> dict[str, np.ndarray]:
    """Per-slice quality metrics of preprocessed slices ``[n, 1, H, W]``."""
    img = x[:, 0].double()
    n, h, w = img.shape
    valid = img > 0
    dim = valid & (img < 0.1)
    bg = []
    for i in range(n):
        vals = img[i][dim[i]]
        bg.append(float(vals.std()) if vals.numel() > 10 else 0.0)
    spec = torch.fft.fftshift(torch.fft.fft2(img), dim=(-2, -1)).abs() ** 2
    fy = torch.linspace(-1, 1, h, dtype=torch.float64).view(h, 1)
    fx = torch.linspace(-1, 1, w, dtype=torch.float64).view(1, w)
    high = (fy**2 + fx**2).sqrt() > 0.5
    total = spec.flatten(1).sum(1).clamp(min=1e-12)
    hf = spec[:, high].sum(1) / total
    energy = (img**2).flatten(1).sum(1).clamp(min=1e-12).sqrt()
    b = img.flatten(1) / energy[:, None]
    ent = -(b * torch.log(b.clamp(min=1e-12))).sum(1)
    npx = h * w
    e_max = np.log(np.sqrt(npx))  # entropy of a perfectly uniform image, for normalization
    efc = ent / e_max
    return {
        "background_noise": np.asarray(bg),
        "hf_energy": hf.numpy(),
        "efc": efc.numpy(),
    }


def qc_reference(metrics: dict[str, np.ndarray]) -> dict[str, tuple[float, float]]:
    """Median and MAD (scaled to a standard deviation) of each metric on normal slices."""
    out = {}
    for k in QC_METRICS:
        v = np.asarray(metrics[k], float)
        med = float(np.median(v))
        mad = float(np.median(np.abs(v - med))) * 1.4826 or 1e-12
        out[k] = (med, mad)
    return out


def qc_score(
    metrics: dict[str, np.ndarray], reference: dict[str, tuple[float, float]]
) -> np.ndarray:
    """Combined anomaly score: the largest absolute robust z over the metrics (higher: worse)."""
    zs = [np.abs((np.asarray(metrics[k], float) - reference[k][0]) / reference[k][1])
          for k in QC_METRICS]
    return np.max(np.stack(zs), axis=0)
