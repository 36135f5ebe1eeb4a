"""Simulated acquisition artifacts (TorchIO) at two severities, for evaluation and tests.

TorchIO simulates the physics in 3D: motion and ghosting and spikes in k-space, noise, blur
and a smooth bias field in image space. The parameters below fix each artifact to a narrow
range so that "mild" and "moderate" mean the same thing in every run; the ranges are given in
units of the volume's robust maximum (its 99.5th percentile is scaled to 1 before corrupting
and back after), so they do not depend on the scanner's intensity units.

Other packages (the end-to-end test of the worker) import :func:`corrupt_volume` and
:func:`splice_block` so that "a moderate-motion block" means one thing across the project.
"""

from __future__ import annotations

from typing import Any

import numpy as np

ARTIFACTS = ("motion", "ghosting", "spike", "noise", "blur", "bias")
SEVERITIES = ("mild", "moderate")

# TorchIO keyword arguments per artifact and severity (ranges sampled uniformly).
PARAMETERS: dict[str, dict[str, dict[str, Any]]] = {
    "motion": {
        "mild": {"degrees": (1.0, 2.0), "translation": (1.0, 2.0), "num_transforms": 2},
        "moderate": {"degrees": (4.0, 6.0), "translation": (4.0, 6.0), "num_transforms": 3},
    },
    "ghosting": {
        "mild": {"num_ghosts": (4, 8), "axes": (0, 1), "intensity": (0.15, 0.25)},
        "moderate": {"num_ghosts": (4, 8), "axes": (0, 1), "intensity": (0.45, 0.6)},
    },
    "spike": {
        "mild": {"num_spikes": 1, "intensity": (0.25, 0.35)},
        "moderate": {"num_spikes": (1, 2), "intensity": (0.7, 1.0)},
    },
    "noise": {
        "mild": {"mean": 0.0, "std": (0.02, 0.03)},
        "moderate": {"mean": 0.0, "std": (0.05, 0.07)},
    },
    "blur": {  # standard deviation of the Gaussian kernel in mm
        "mild": {"std": (0.6, 0.8)},
        "moderate": {"std": (1.2, 1.6)},
    },
    "bias": {
        "mild": {"coefficients": (0.2, 0.3), "order": 3},
        "moderate": {"coefficients": (0.5, 0.6), "order": 3},
    },
}


def make_transform(artifact: str, severity: str) -> Any:
    """The TorchIO transform for one artifact and severity."""
    import torchio as tio

    if artifact not in PARAMETERS or severity not in PARAMETERS[artifact]:
        raise ValueError(f"unknown artifact/severity {artifact}/{severity}")
    kwargs = PARAMETERS[artifact][severity]
    cls = {
        "motion": tio.RandomMotion,
        "ghosting": tio.RandomGhosting,
        "spike": tio.RandomSpike,
        "noise": tio.RandomNoise,
        "blur": tio.RandomBlur,
        "bias": tio.RandomBiasField,
    }[artifact]
    return cls(**kwargs)


def corrupt_volume(
    data: np.ndarray,
    spacing: tuple[float, float, float],
    artifact: str,
    severity: str,
    seed: int,
) -> np.ndarray:
    """Apply one artifact to a 3D volume (any orientation); same shape and units out.

    Args:
        data: the volume ``[x, y, z]`` in modality units.
        spacing: voxel size in mm (blur and motion are in mm).
        artifact: one of :data:`ARTIFACTS`.
        severity: ``mild`` or ``moderate``.
        seed: random seed (the artifact's parameters and, for noise, the noise itself).

    Returns:
        The corrupted volume as float32, clipped at 0 (magnitude images are non-negative).
    """
    import torch
    import torchio as tio

    scale = float(np.percentile(data, 99.5)) or 1.0
    affine = np.diag([*spacing, 1.0])
    image = tio.ScalarImage(tensor=torch.from_numpy(np.asarray(data, np.float32) / scale)[None],
                            affine=affine)
    torch.manual_seed(seed)
    out = make_transform(artifact, severity)(image)
    return (out.data[0].numpy().clip(min=0) * scale).astype(np.float32)


def splice_block(
    clean: np.ndarray, corrupted: np.ndarray, start: int, stop: int, axis: int = 2
) -> np.ndarray:
    """The clean volume with slices ``start:stop`` along ``axis`` taken from the corrupted one.

    Models an artifact confined to a contiguous run of slices (the patient moved during part
    of a 2D multi-slice acquisition).
    """
    out = np.array(clean, dtype=np.float32, copy=True)
    index: list[Any] = [slice(None)] * out.ndim
    index[axis] = slice(start, stop)
    out[tuple(index)] = corrupted[tuple(index)]
    return out


def site_variants(data: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Normal-looking versions of a volume as another scanner or protocol might produce them
    (contrast curve, a coarser resolution, a different noise floor): what a series shift cap
    must allow (``bench/select_score.py`` step 1, the background part's cap in
    ``vaenode calibrate``). ``rng`` draws the added noise."""
    from scipy.ndimage import gaussian_filter

    d = data.astype(np.float32)
    hi = float(np.percentile(d, 99.5))
    n = d / hi
    return {
        "gamma0.75": (n.clip(0) ** 0.75) * hi,
        "gamma1.33": (n.clip(0) ** 1.33) * hi,
        "smoother": gaussian_filter(d, 0.5),
        "noisier": (n + rng.normal(0, 0.01, d.shape)).clip(0) * hi,
    }
