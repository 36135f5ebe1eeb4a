"""What differs between scanners but is not an artifact, drawn at random for every training slice.

The training data come from one scanner (IXI's Philips 3T, its copies downsampled to 2 mm
without an anti-aliasing filter). A model that knows only that scanner's look calls every other
scanner's normal image unlikely: on the model grid a Siemens Prisma 2D FLASH has a third of the
fine-detail power of an IXI slice (less than IXI with a moderate blur), another grey-white
contrast, a coil's bias field, and a head lying off-centre or on its side. So each training
slice is shown as another scanner might have made it (domain randomization):

- geometry: the eight flips and 90-degree turns (any in-plane orientation, prone and decubitus
  positions), a small rotation, scale and shift (head size, tilt, field of view), and the edge
  of a smaller field of view cutting through the head (nothing beyond it: a sagittal series
  whose field of view ends at the chin, a head lying off-centre);
- resolution: in-plane Gaussian smoothing of up to ``blur_px`` pixels (k-space apodization,
  interpolation, a coarser matrix), a thicker slice (the mean with up to ``slab_neighbours``
  of its nearest neighbours: 2D acquisitions of 4 to 6 mm), and truncated k-space with zero
  filling (a lower acquired resolution, with its Gibbs ringing);
- contrast: a gamma curve and a random monotone tone curve (MPRAGE, FLASH/SPGR, TFL, spin echo
  map tissue to grey levels differently), a gain;
- a smooth multiplicative bias field (coil sensitivity);
- noise: Rician noise whose level varies smoothly over the slice (parallel imaging), up to
  ``noise_max`` of the normalized intensity, below the evaluation's mild noise artifact
  (0.02-0.03), far above any of the real scanners' at hand (0.001-0.004 in the air);
- air zeroed: the background below a level set to exactly 0, as some scanners and exports do.

What is NOT drawn: motion, ghosting, spikes, stripes, wrap-around, heavier noise: the artifacts
the node must notice stay unlikely under the model.

Everything works on batches of model-grid slices (``[n, 1, size, size]``, intensities
normalized as scoring normalizes them) with torch, from one seeded generator, so a training run
is reproducible.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AugmentConfig:
    """Ranges of the scanner variations drawn in training (stored in ``model.json``).

    Each ``*_p`` is the probability that a slice gets that variation; ranges are drawn
    uniformly (log-uniformly for gamma and scale).
    """

    rotate_deg: float = 12.0
    scale: tuple[float, float] = (0.9, 1.1)
    shift_px: float = 8.0
    blur_p: float = 0.7
    blur_px: float = 1.2
    slab_p: float = 0.35
    slab_neighbours: int = 2
    truncate_p: float = 0.25
    truncate_keep: tuple[float, float] = (0.55, 0.9)
    gamma: tuple[float, float] = (0.6, 1.6)
    curve_p: float = 0.5
    curve_jitter: float = 0.08
    gain: tuple[float, float] = (0.85, 1.15)
    bias_p: float = 0.7
    bias_std: float = 0.25
    noise_p: float = 0.6
    noise_max: float = 0.012
    zero_air_p: float = 0.25
    zero_air_level: tuple[float, float] = (0.02, 0.08)
    fov_edge_p: float = 0.3
    fov_edge_px: tuple[float, float] = (24.0, 60.0)

    def to_dict(self) -> dict[str, Any]:
        """Plain values for ``model.json``."""
        out = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AugmentConfig:
        """Inverse of :meth:`to_dict`."""
        values: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v
                                  for k, v in data.items()}
        return cls(**values)

    def with_settings(self, settings: list[str]) -> AugmentConfig:
        """This configuration with ``name=value`` settings applied (``vaenode train
        --variation scale=0.8,1.3``): a range takes two comma-separated numbers."""
        current = self.to_dict()
        changed: dict[str, Any] = {}
        for item in settings:
            name, sep, text = item.partition("=")
            name = name.strip()
            if not sep or name not in current:
                raise ValueError(f"not a variation setting: {item!r} (name=value; names: "
                                 f"{', '.join(current)})")
            old = current[name]
            try:
                if isinstance(old, list):
                    value: Any = tuple(float(v) for v in text.split(","))
                    if len(value) != len(old):
                        raise ValueError
                else:
                    value = type(old)(text)
            except ValueError:
                shape = "two numbers, lo,hi" if isinstance(old, list) else type(old).__name__
                raise ValueError(f"{name} takes {shape}, not {text!r}") from None
            changed[name] = value
        return AugmentConfig.from_dict({**current, **changed})


def _uniform(n: int, lo: float, hi: float, gen: torch.Generator) -> torch.Tensor:
    return torch.empty(n).uniform_(lo, hi, generator=gen)


def _chosen(n: int, p: float, gen: torch.Generator) -> torch.Tensor:
    """Indices of the slices that get a variation of probability ``p``."""
    return (torch.rand(n, generator=gen) < p).nonzero().flatten()


def dihedral(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Each slice in one of the eight orientations of the square (flips and 90-degree turns)."""
    k = torch.randint(0, 8, (len(x),), generator=gen)
    out = x.clone()
    for t in range(8):
        idx = (k == t).nonzero().flatten()
        if len(idx) == 0:
            continue
        xi = x[idx]
        if t & 4:
            xi = xi.transpose(-1, -2)
        out[idx] = torch.rot90(xi, t & 3, dims=(-2, -1))
    return out


def similarity(x: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator) -> torch.Tensor:
    """A small random rotation, scale and shift of each slice (bilinear, zero outside)."""
    n, _, h, w = x.shape
    angle = _uniform(n, -cfg.rotate_deg, cfg.rotate_deg, gen) * math.pi / 180
    scale = torch.exp(_uniform(n, math.log(cfg.scale[0]), math.log(cfg.scale[1]), gen))
    shift = _uniform(2 * n, -cfg.shift_px, cfg.shift_px, gen).view(n, 2) * 2 / torch.tensor(
        [w, h], dtype=torch.float32)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1),
                         torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def fov_edges(x: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator) -> torch.Tensor:
    """Each slice cut by the edge of a field of view: one or two sides of the grid set to 0
    beyond a line ``fov_edge_px`` pixels from the centre (edges stay parallel to the grid, as a
    scanner's field of view is to its image)."""
    n, _, h, w = x.shape
    out = x.clone()
    rows = torch.arange(h, dtype=torch.float32).view(1, h, 1) - (h - 1) / 2
    cols = torch.arange(w, dtype=torch.float32).view(1, 1, w) - (w - 1) / 2
    for _ in range(2):
        side = torch.randint(0, 4, (n,), generator=gen)
        at = _uniform(n, *cfg.fov_edge_px, gen).view(n, 1, 1)
        keep = torch.stack([(rows <= at).expand(n, h, w), (rows >= -at).expand(n, h, w),
                            (cols <= at).expand(n, h, w), (cols >= -at).expand(n, h, w)])
        keep = keep[side, torch.arange(n)]
        out = out * keep.unsqueeze(1)
        if torch.rand(1, generator=gen).item() < 0.5:
            break
    return out


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Each slice smoothed by its own Gaussian (``sigma`` in pixels, one per slice), in k-space."""
    h, w = x.shape[-2:]
    fy = torch.fft.fftfreq(h).view(1, 1, h, 1)
    fx = torch.fft.rfftfreq(w).view(1, 1, 1, w // 2 + 1)
    s = sigma.view(-1, 1, 1, 1)
    kernel = torch.exp(-2 * (math.pi * s) ** 2 * (fy**2 + fx**2))
    return torch.fft.irfft2(torch.fft.rfft2(x) * kernel, s=(h, w))


def truncate_kspace(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Keep the central fraction ``keep`` of k-space along each axis, zero-fill the rest: the
    image a scanner with a coarser acquired matrix interpolates to a finer one."""
    h, w = x.shape[-2:]
    fy = torch.fft.fftfreq(h).abs().view(1, 1, h, 1)
    fx = torch.fft.rfftfreq(w).view(1, 1, 1, w // 2 + 1)
    limit = 0.5 * keep.view(-1, 1, 1, 1)
    mask = ((fy <= limit) & (fx <= limit)).to(x.dtype)
    return torch.fft.irfft2(torch.fft.rfft2(x) * mask, s=(h, w))


def smooth_field(n: int, size: int, std: torch.Tensor, gen: torch.Generator,
                 grid: int = 4) -> torch.Tensor:
    """Smooth random fields ``[n, 1, size, size]`` (a ``grid`` x ``grid`` lattice of normal
    values, bicubically upsampled), with per-slice standard deviation ``std``."""
    coarse = torch.randn(n, 1, grid, grid, generator=gen) * std.view(-1, 1, 1, 1)
    return F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=True)


def tone_curve(x: torch.Tensor, jitter: float, gen: torch.Generator,
               knots: int = 5) -> torch.Tensor:
    """A random monotone piecewise-linear map of [0, 1] onto itself per slice (values above 1
    follow the last segment's slope): tissue contrasts moved against each other."""
    n = len(x)
    base = torch.linspace(0, 1, knots + 1)
    y = base.repeat(n, 1)
    y[:, 1:-1] += torch.empty(n, knots - 1).uniform_(-jitter, jitter, generator=gen)
    y = torch.cummax(y.clamp(0, 1), dim=1).values
    pos = (x.clamp(min=0) * knots).flatten(1)
    seg = pos.floor().clamp(max=knots - 1).long()
    frac = pos - seg
    y0 = torch.gather(y, 1, seg)
    y1 = torch.gather(y, 1, seg + 1)
    return (y0 + frac * (y1 - y0)).view_as(x)


def scanner_variation(
    x: torch.Tensor,
    cfg: AugmentConfig,
    gen: torch.Generator,
    clip_max: float,
    neighbours: tuple[torch.Tensor, ...] = (),
) -> torch.Tensor:
    """A batch of model-grid slices as other scanners and protocols might show them.

    Args:
        x: ``[n, 1, size, size]`` normalized slices.
        cfg: the ranges to draw from.
        gen: the training run's generator.
        clip_max: the preprocessing's upper clip.
        neighbours: the slices next to each one in its stack, nearest first on alternating
            sides (``[n, 1, size, size]`` each, the slice itself where the stack ends), for
            thicker slices; empty: no slab variation.

    Returns:
        A new tensor of the same shape, clipped to [0, clip_max].
    """
    n, _, size, _ = x.shape
    out = x.clone()
    if neighbours and cfg.slab_neighbours > 0:
        idx = _chosen(n, cfg.slab_p, gen)
        if len(idx):
            extra = torch.randint(1, cfg.slab_neighbours + 1, (len(idx),), generator=gen)
            total = x[idx].clone()
            for k, nb in enumerate(neighbours[: cfg.slab_neighbours]):
                total += nb[idx] * (extra > k).view(-1, 1, 1, 1)
            out[idx] = total / (extra + 1).view(-1, 1, 1, 1)
    out = similarity(dihedral(out, gen), cfg, gen)
    idx = _chosen(n, cfg.fov_edge_p, gen)
    if len(idx):
        out[idx] = fov_edges(out[idx], cfg, gen)
    idx = _chosen(n, cfg.truncate_p, gen)
    if len(idx):
        out[idx] = truncate_kspace(out[idx], _uniform(len(idx), *cfg.truncate_keep, gen))
    idx = _chosen(n, cfg.blur_p, gen)
    if len(idx):
        out[idx] = gaussian_blur(out[idx], _uniform(len(idx), 0.0, cfg.blur_px, gen))
    out = out.clamp(min=0)
    idx = _chosen(n, cfg.curve_p, gen)
    if len(idx):
        out[idx] = tone_curve(out[idx], cfg.curve_jitter, gen)
    gamma = torch.exp(_uniform(n, math.log(cfg.gamma[0]), math.log(cfg.gamma[1]), gen))
    gain = _uniform(n, *cfg.gain, gen)
    out = out ** gamma.view(-1, 1, 1, 1) * gain.view(-1, 1, 1, 1)
    idx = _chosen(n, cfg.bias_p, gen)
    if len(idx):
        field = smooth_field(len(idx), size, _uniform(len(idx), 0.0, cfg.bias_std, gen), gen)
        out[idx] = out[idx] * torch.exp(field)
    idx = _chosen(n, cfg.noise_p, gen)
    if len(idx):
        level = _uniform(len(idx), 0.0, cfg.noise_max, gen).view(-1, 1, 1, 1)
        sigma = level * torch.exp(smooth_field(len(idx), size, torch.full((len(idx),), 0.3),
                                               gen))
        real = out[idx] + sigma * torch.randn(out[idx].shape, generator=gen)
        imag = sigma * torch.randn(out[idx].shape, generator=gen)
        out[idx] = torch.sqrt(real**2 + imag**2)  # magnitude images: Rician
    idx = _chosen(n, cfg.zero_air_p, gen)
    if len(idx):
        level = _uniform(len(idx), *cfg.zero_air_level, gen).view(-1, 1, 1, 1)
        smooth = gaussian_blur(out[idx], torch.full((len(idx),), 1.5))
        out[idx] = torch.where(smooth < level, torch.zeros_like(out[idx]), out[idx])
    return out.clamp_(0.0, clip_max)
