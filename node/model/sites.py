"""Normal volumes rendered as other scanners and sites would produce them (the site sweep).

The model is trained on one scanner; what a department sees is other scanners' normal images.
The real ones at hand are few (``../shared/data/dicom``), so ``vaenode evaluate --sites``
also renders held-out normal volumes the way other scanners, protocols and sites differ without
any artifact, each at two strengths, and measures how many of their slices the bundle flags at
its threshold (specificity where it fails) and how well it still finds an artifact block in
them (sensitivity on top of the site).

Every variation is physical and applied to the whole 3D volume (in RAS voxel order, as
:func:`node.model.data.load_nifti` gives it), so that an axial stack cut from it looks like what
such a scanner sends: thick 2D slices, apodized or zero-filled k-space, more noise (Rician),
another contrast curve, a coil's bias field, another field of view, coverage or head position,
other intensity units, air zeroed by the scanner or an export.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from node.model.data import Volume

STRENGTHS = ("mild", "strong")


def _robust_max(data: np.ndarray) -> float:
    return float(np.percentile(data, 99.5)) or 1.0


def _kspace_filter(data: np.ndarray, weight: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Multiply each axial slice's 2D spectrum by ``weight(|f| / 0.5)`` (per in-plane axis:
    the product of the weights along x and y, as a scanner filters each encoding direction)."""
    fx = np.abs(np.fft.fftfreq(data.shape[0]))[:, None, None] / 0.5
    fy = np.abs(np.fft.fftfreq(data.shape[1]))[None, :, None] / 0.5
    spectrum = np.fft.fft2(data, axes=(0, 1)) * (weight(fx) * weight(fy))
    return np.abs(np.fft.ifft2(spectrum, axes=(0, 1))).astype(np.float32)


def thick_slices(vol: Volume, strength: str, rng: np.random.Generator) -> Volume:
    """A 2D axial acquisition with thicker slices: 2 (mild) or 3 (strong) voxels averaged along
    the slice normal (4 or 6 mm from IXI's 2 mm), one slice per slab."""
    k = {"mild": 2, "strong": 3}[strength]
    n = vol.data.shape[2] // k
    data = vol.data[:, :, : n * k].reshape(*vol.data.shape[:2], n, k).mean(axis=3)
    sx, sy, sz = vol.spacing
    return replace(vol, data=data.astype(np.float32), spacing=(sx, sy, sz * k))


def apodized(vol: Volume, strength: str, rng: np.random.Generator) -> Volume:
    """K-space apodization (a Tukey window over the outer 50% / 100% of k-space): a smoother
    reconstruction filter than IXI's."""
    alpha = {"mild": 0.5, "strong": 1.0}[strength]

    def weight(f: np.ndarray) -> np.ndarray:
        edge = 1 - alpha
        w = 0.5 * (1 + np.cos(np.pi * (f - edge) / max(alpha, 1e-6)))
        return np.where(f <= edge, 1.0, w)

    return replace(vol, data=_kspace_filter(vol.data, weight))


def zero_filled(vol: Volume, strength: str, rng: np.random.Generator) -> Volume:
    """A coarser acquired matrix, zero-filled to the same grid: the central 75% / 55% of
    k-space kept along each in-plane axis (with the Gibbs ringing that comes with it)."""
    keep = {"mild": 0.75, "strong": 0.55}[strength]
    return replace(vol, data=_kspace_filter(vol.data, lambda f: (f <= keep).astype(float)))


def noisier(vol: Volume, strength: str, rng: np.random.Generator) -> Volume:
    """More thermal noise (Rician magnitude noise of 0.5% / 1% of the robust maximum)."""
    sigma = {"mild": 0.005, "strong": 0.01}[strength] * _robust_max(vol.data)
    real = vol.data + rng.normal(0, sigma, vol.data.shape)
    imag = rng.normal(0, sigma, vol.data.shape)
    return replace(vol, data=np.hypot(real, imag).astype(np.float32))


#: The contrast curve's fade-in (fractions of the robust maximum): none at or below the
#: noise floor, all of it from dark tissue up.
CONTRAST_FLOOR = 0.02
CONTRAST_FULL = 0.3


def contrast_curve(x: np.ndarray, gamma: float) -> np.ndarray:
    """``x`` (fractions of the robust maximum) through a gamma curve that leaves the noise
    floor alone.

    Another sequence's contrast is the tissue's signal; the receiver's noise is added after
    it and keeps its amplitude. A plain gamma curve of 0.65 has an unbounded slope at 0 and
    raised the air's noise about fourfold (rms of the volume corners, 0.2-0.5% of the robust
    maximum -> 0.9-1.9% on IXI volumes; the real Prisma FLASH series, whose contrast is the
    flatter one, have 0.25-0.57%), and a curve of 1.5 all but removed it. Here the curve is
    faded in by a smoothstep from ``CONTRAST_FLOOR`` to ``CONTRAST_FULL``: unit slope in the
    air, the whole curve in tissue; monotone for curves of 0.65 to 1.5.
    """
    t = np.clip((x - CONTRAST_FLOOR) / (CONTRAST_FULL - CONTRAST_FLOOR), 0.0, 1.0)
    return x + t * t * (3.0 - 2.0 * t) * (x ** gamma - x)


def _gamma(vol: Volume, gamma: float) -> Volume:
    hi = _robust_max(vol.data)
    data = contrast_curve(np.clip(vol.data, 0, None) / hi, gamma) * hi
    return replace(vol, data=data.astype(np.float32))


def flatter_contrast(vol: Volume, strength: str, rng: np.random.Generator) -> Volume:
    """Less grey-white contrast, brighter dark tissue (a gamma curve of 0.8 / 0.65, as a
    2D FLASH or a spin echo T1 gives relative to an MPRAGE)."""
    return _gamma(vol, {"mild": 0.8, "strong": 0.65}[strength])


def steeper_contrast(vol: Volume, strength: str, rng: np.random.Generator) -> Volume:
    """More contrast, darker grey matter and CSF (a gamma curve of 1.25 / 1.5)."""
    return _gamma(vol, {"mild": 1.25, "strong": 1.5}[strength])


def bias_field(vol: Volume, strength: str, rng: np.random.Generator) -> Volume:
    """A head coil's smooth sensitivity profile: brighter towards the back and top, up to
    +-10% / +-20% (the exponential of a linear and quadratic field over the volume)."""
    amp = {"mild": 0.1, "strong": 0.2}[strength]
    axes = [np.linspace(-1, 1, n) for n in vol.data.shape]
    x, y, z = np.meshgrid(*axes, indexing="ij")
    field = amp * (-0.6 * y + 0.4 * z + 0.5 * (x**2 + y**2) - 0.3)
    return replace(vol, data=(vol.data * np.exp(field)).astype(np.float32))


def shifted(vol: Volume, strength: str, rng: np.random.Generator) -> Volume:
    """The head off-centre in the field of view: moved 20 / 40 mm right and forward (what
    falls out of the field of view is lost, as on a scanner)."""
    mm = {"mild": 20.0, "strong": 40.0}[strength]
    data = vol.data
    for axis in (0, 1):
        k = round(mm / vol.spacing[axis])
        data = np.roll(data, k, axis=axis)
        index: list[slice] = [slice(None)] * 3
        index[axis] = slice(0, k)
        data[tuple(index)] = 0
    return replace(vol, data=data.astype(np.float32))


def partial_coverage(vol: Volume, strength: str, rng: np.random.Generator) -> Volume:
    """A brain series without the neck: only the upper 70% / 50% of the head's axial extent."""
    keep = {"mild": 0.7, "strong": 0.5}[strength]
    profile = (vol.data > 0.1 * _robust_max(vol.data)).mean(axis=(0, 1))
    fg = np.flatnonzero(profile >= 0.05)
    if fg.size == 0:
        return vol
    start = int(fg[-1] - keep * (fg[-1] - fg[0]))
    return replace(vol, data=vol.data[:, :, start:].copy())


def head_turned(vol: Volume, strength: str, rng: np.random.Generator) -> Volume:
    """Another head position: turned 90 degrees about the body axis (decubitus, mild) or
    180 degrees (prone, strong)."""
    turns = {"mild": 1, "strong": 2}[strength]
    return replace(vol, data=np.ascontiguousarray(np.rot90(vol.data, turns, axes=(0, 1))))


def other_units(vol: Volume, strength: str, rng: np.random.Generator) -> Volume:
    """Other intensity units (the scanner's scaling): all values times 0.25 / 8."""
    factor = {"mild": 0.25, "strong": 8.0}[strength]
    return replace(vol, data=(vol.data * factor).astype(np.float32))


def zeroed_air(vol: Volume, strength: str, rng: np.random.Generator) -> Volume:
    """The air set to exactly 0 (a scanner's background suppression or an export): values
    below 3% / 8% of the robust maximum."""
    level = {"mild": 0.03, "strong": 0.08}[strength] * _robust_max(vol.data)
    return replace(vol, data=np.where(vol.data < level, 0, vol.data).astype(np.float32))


@dataclass(frozen=True)
class Site:
    """One simulated way of differing from the training scanner.

    Attributes:
        name: what the sweep's tables call it.
        render: the change, applied to a whole volume.
        signal: the change is the tissue's signal (another sequence's contrast), which moves
            with the head, so an artifact of the acquisition (motion, a spike, noise) acts on
            the site's rendering; the other changes happen in the acquisition or after it
            (the receiver's noise, resolution, k-space filters, geometry, units, an export)
            and act on what the artifact left.
    """

    name: str
    render: Callable[[Volume, str, np.random.Generator], Volume]
    signal: bool = False

    @property
    def description(self) -> str:
        """The first line of the render function's docstring."""
        return (self.render.__doc__ or self.name).strip().splitlines()[0]


SITES: tuple[Site, ...] = (
    Site("thick_slices", thick_slices),
    Site("apodized", apodized),
    Site("zero_filled", zero_filled),
    Site("noisier", noisier),
    Site("flatter_contrast", flatter_contrast, signal=True),
    Site("steeper_contrast", steeper_contrast, signal=True),
    Site("bias_field", bias_field),
    Site("shifted", shifted),
    Site("partial_coverage", partial_coverage),
    Site("head_turned", head_turned),
    Site("other_units", other_units),
    Site("zeroed_air", zeroed_air),
)


def site_by_name(name: str) -> Site:
    """The simulated site called ``name``."""
    for site in SITES:
        if site.name == name:
            return site
    raise ValueError(f"unknown site {name!r}; expected one of {[s.name for s in SITES]}")


def render(vol: Volume, site: str, strength: str, seed: int = 0) -> Volume:
    """``vol`` as simulated site ``site`` at ``strength`` (``mild`` or ``strong``) makes it."""
    if strength not in STRENGTHS:
        raise ValueError(f"unknown strength {strength!r}; expected one of {STRENGTHS}")
    return site_by_name(site).render(vol, strength, np.random.default_rng(seed))
