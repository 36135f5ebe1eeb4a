"""The optional compression stage of METHOD.md: a plain autoencoder whose features the VAE models.

METHOD.md allows the VAE to model a compressed representation instead of raw pixels: a
deterministic convolutional autoencoder is trained first on the same normal slices
(reconstruction loss only), then frozen; the VAE is trained on its bottleneck feature map and
the likelihood estimators score slices in that feature space. The point is to spend the VAE's
density on image structure rather than on pixel-level noise texture, which is what made a
pixel-space model scanner-specific (issue 3, "What is already known").

The feature map is ``[feature_dim, side, side]`` with ``side = image_size / 2**len(channels)``.
Its values are standardized per channel with the mean and standard deviation measured on the
training slices (stored as buffers with the weights), so that the VAE's decoder variance floor
(``sigma_min``) means the same thing whatever scale the autoencoder happened to learn.

The stage is off by default (``vaenode train --compress`` turns it on); a bundle that has it
stores the autoencoder's weights beside the VAE's and declares it under ``compression`` in
``model.json`` (:mod:`node.model.bundle`).
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FeatureAEConfig:
    """Architecture of the feature autoencoder; stored in ``model.json`` under ``compression``.

    Attributes:
        image_size: input side in pixels (the preprocessing grid).
        channels: channels per stride-2 stage of the encoder (the decoder mirrors them).
        feature_dim: channels of the bottleneck feature map (``--compress-dim``).
    """

    image_size: int = 128
    channels: tuple[int, ...] = field(default=(16, 32))
    feature_dim: int = 8

    @property
    def side(self) -> int:
        """Side of the feature map in cells."""
        return self.image_size // 2 ** len(self.channels)

    def to_dict(self) -> dict[str, Any]:
        """Plain values for ``model.json``."""
        out = asdict(self)
        out["channels"] = list(self.channels)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FeatureAEConfig:
        """Inverse of :meth:`to_dict` (extra keys such as ``file`` are ignored)."""
        return cls(int(data["image_size"]), tuple(int(c) for c in data["channels"]),
                   int(data["feature_dim"]))


class FeatureAE(nn.Module):
    """Deterministic convolutional autoencoder: slice -> standardized feature map -> slice."""

    def __init__(self, cfg: FeatureAEConfig) -> None:
        super().__init__()
        if not cfg.channels or cfg.image_size % 2 ** len(cfg.channels):
            raise ValueError("image_size must be divisible by 2**len(channels), channels >= 1")
        self.cfg = cfg
        enc: list[nn.Module] = []
        c_in = 1
        for c_out in cfg.channels:
            enc += [nn.Conv2d(c_in, c_out, 4, 2, 1), nn.LeakyReLU(0.2)]
            c_in = c_out
        enc.append(nn.Conv2d(c_in, cfg.feature_dim, 3, 1, 1))  # linear bottleneck
        self.encoder = nn.Sequential(*enc)
        chans = list(reversed(cfg.channels))
        dec: list[nn.Module] = [nn.Conv2d(cfg.feature_dim, chans[0], 3, 1, 1), nn.LeakyReLU(0.2)]
        for a, b in itertools.pairwise(chans):
            dec += [nn.ConvTranspose2d(a, b, 4, 2, 1), nn.LeakyReLU(0.2)]
        dec.append(nn.ConvTranspose2d(chans[-1], 1, 4, 2, 1))
        self.decoder = nn.Sequential(*dec)
        self.register_buffer("feat_mean", torch.zeros(cfg.feature_dim))
        self.register_buffer("feat_std", torch.ones(cfg.feature_dim))

    def _standardize(self, h: torch.Tensor) -> torch.Tensor:
        mean = self.get_buffer("feat_mean").view(1, -1, 1, 1)
        std = self.get_buffer("feat_std").view(1, -1, 1, 1)
        return (h - mean) / std

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Standardized feature map ``[batch, feature_dim, side, side]`` of slices."""
        return self._standardize(self.encoder(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction of ``x`` through the bottleneck (the training target is ``x``)."""
        return self.decoder(self.encoder(x))

    @torch.no_grad()
    def fit_standardization(self, x: torch.Tensor, batch_size: int = 128) -> None:
        """Measure the per-channel mean and standard deviation of the raw features on ``x``."""
        dev = next(self.parameters()).device
        s1 = torch.zeros(self.cfg.feature_dim, dtype=torch.float64)
        s2 = torch.zeros_like(s1)
        count = 0
        for start in range(0, len(x), batch_size):
            h = self.encoder(x[start : start + batch_size].float().to(dev)).double().cpu()
            s1 += h.sum(dim=(0, 2, 3))
            s2 += (h * h).sum(dim=(0, 2, 3))
            count += h.shape[0] * h.shape[2] * h.shape[3]
        mean = s1 / max(count, 1)
        var = (s2 / max(count, 1) - mean * mean).clamp(min=1e-8)
        self.get_buffer("feat_mean").copy_(mean.float())
        self.get_buffer("feat_std").copy_(var.sqrt().float())


def train_feature_ae(
    x: torch.Tensor,
    cfg: FeatureAEConfig,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    generator: torch.Generator,
    device: torch.device,
    augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
    report: Callable[[str], None] | None = None,
) -> tuple[FeatureAE, dict[str, Any]]:
    """Train the autoencoder on slices ``x`` (mean squared error), then fit standardization.

    Args:
        x: training slices ``[n, 1, H, W]`` on the model grid (any float dtype).
        cfg: architecture.
        epochs: passes over ``x``.
        batch_size: slices per step.
        lr: Adam learning rate.
        generator: source of the batch order (the caller seeds it: reproducible runs).
        device: where to train.
        augment: the same normal-variation augmentation the VAE sees, or None.
        report: progress messages.

    Returns:
        The trained autoencoder (CPU, eval mode) and its history (loss per epoch).
    """
    say = report or log.info
    ae = FeatureAE(cfg).to(device)
    opt = torch.optim.Adam(ae.parameters(), lr=lr)
    n = len(x)
    steps = max(1, math.ceil(n / batch_size))
    history: dict[str, Any] = {"epochs": []}
    t0 = time.time()
    for epoch in range(epochs):
        ae.train()
        order = torch.randperm(n, generator=generator)
        total = 0.0
        for b in range(steps):
            xb = x[order[b * batch_size : (b + 1) * batch_size]].float()
            if augment is not None:
                xb = augment(xb)
            xb = xb.to(device)
            loss = F.mse_loss(ae(xb), xb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach())
        history["epochs"].append({"epoch": epoch + 1, "mse": total / steps})
        say(f"feature autoencoder epoch {epoch + 1}/{epochs}: mse {total / steps:.5f}")
    ae.eval()
    ae.fit_standardization(x)
    history["train_seconds"] = round(time.time() - t0, 1)
    return ae.cpu().eval(), history
