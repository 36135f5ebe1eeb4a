"""The variational autoencoder of METHOD.md: a recognition model and a generative model.

The encoder maps a slice to a diagonal Gaussian per latent attribute (mean, log-variance); the
decoder maps a latent vector to a diagonal Gaussian over pixels: a mean image and, with
``heteroscedastic=True``, a standard deviation per pixel (otherwise one learned global value).
A per-pixel variance lets the model say "edges and fat are uncertain, the ventricles are not",
which is what makes a localized artifact (a ghost, a spike stripe) stand out in log p(x|z).
The standard deviation has a floor, ``sigma_min``, so that a pixel the model is sure about
cannot make the density of a slightly different pixel explode.

The layers are strided convolutions (encoder) and transposed convolutions (decoder) with few
channels at full resolution: the node must score 20 slices/s on two CPU cores with several
Monte-Carlo samples per slice, and most of the cost is in the high-resolution layers.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

LOG_2PI = math.log(2.0 * math.pi)


@dataclass(frozen=True)
class VAEConfig:
    """Architecture of the VAE; stored in ``model.json`` and checked when loading weights.

    Attributes:
        image_size: input side in pixels; must be divisible by 2**len(channels).
        latent_dim: number of latent attributes.
        channels: encoder channels per stride-2 stage (the decoder mirrors them).
        heteroscedastic: per-pixel decoder variance (else one learned global variance).
        sigma_min: floor of the decoder standard deviation (normalized intensity units).
        in_channels: channels of the modelled input: 1 for pixels; the feature channels of
            the compression stage (:mod:`node.model.compress`) when the VAE models features.
    """

    image_size: int = 128
    latent_dim: int = 128
    channels: tuple[int, ...] = field(default=(16, 32, 64, 128, 256))
    heteroscedastic: bool = True
    sigma_min: float = 0.01
    in_channels: int = 1

    def to_dict(self) -> dict[str, Any]:
        """Plain values for ``model.json``."""
        out = asdict(self)
        out["channels"] = list(self.channels)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VAEConfig:
        """Inverse of :meth:`to_dict`."""
        data = dict(data)
        data["channels"] = tuple(data["channels"])
        return cls(**data)


class Encoder(nn.Module):
    """Recognition model q_phi(z|x): slice -> (mean, log-variance) of each latent attribute."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = cfg.in_channels
        for c_out in cfg.channels:
            layers += [nn.Conv2d(c_in, c_out, 4, 2, 1), nn.LeakyReLU(0.2)]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        side = cfg.image_size // 2 ** len(cfg.channels)
        self.head = nn.Linear(c_in * side * side, 2 * cfg.latent_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.features(x).flatten(1)
        mu, logvar = self.head(h).chunk(2, dim=1)
        return mu, logvar.clamp(-12.0, 8.0)


class Decoder(nn.Module):
    """Generative model p_theta(x|z): latent -> per-pixel (mean, log standard deviation)."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        chans = list(reversed(cfg.channels))
        self.side = cfg.image_size // 2 ** len(cfg.channels)
        self.fc = nn.Linear(cfg.latent_dim, chans[0] * self.side * self.side)
        layers: list[nn.Module] = []
        for c_in, c_out in itertools.pairwise(chans):
            layers += [nn.ConvTranspose2d(c_in, c_out, 4, 2, 1), nn.LeakyReLU(0.2)]
        self.in_channels = cfg.in_channels
        out_ch = cfg.in_channels * (2 if cfg.heteroscedastic else 1)
        layers.append(nn.ConvTranspose2d(chans[-1], out_ch, 4, 2, 1))
        self.body = nn.Sequential(*layers)
        self.chans0 = chans[0]
        # Global log standard deviation, used when the decoder is homoscedastic.
        self.log_sigma = nn.Parameter(torch.tensor(math.log(0.1)))
        if cfg.heteroscedastic:
            # Start with sigma near 0.1 so the first steps are not dominated by 1/sigma^2.
            last = self.body[-1]
            assert isinstance(last, nn.ConvTranspose2d) and last.bias is not None
            with torch.no_grad():
                last.bias[cfg.in_channels :] = math.log(math.expm1(0.1 - cfg.sigma_min))

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = F.leaky_relu(self.fc(z), 0.2).view(-1, self.chans0, self.side, self.side)
        out = self.body(h)
        c = self.in_channels
        mean = out[:, :c]
        if self.cfg.heteroscedastic:
            sigma = self.cfg.sigma_min + F.softplus(out[:, c : 2 * c])
            log_sigma = torch.log(sigma)
        else:
            log_sigma = torch.clamp(self.log_sigma, min=math.log(self.cfg.sigma_min))
            log_sigma = log_sigma.expand_as(mean)
        return mean, log_sigma


class VAE(nn.Module):
    """Encoder and decoder trained together on the negative ELBO (METHOD.md, Training)."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        if cfg.image_size % 2 ** len(cfg.channels):
            raise ValueError("image_size must be divisible by 2**len(channels)")
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Attribute distributions q(z|x): (mean, log-variance), each ``[batch, latent]``."""
        return self.encoder(x)

    def decode(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pixel distribution p(x|z): (mean, log sigma), each ``[batch, C, H, W]``."""
        return self.decoder(z)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """One-sample negative ELBO per slice, with its two terms (the training loss)."""
        mu, logvar = self.encode(x)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        mean, log_sigma = self.decode(z)
        rec = -gaussian_log_prob(x, mean, log_sigma)
        kl = kl_to_standard_normal(mu, logvar)
        return {"rec": rec, "kl": kl, "loss": rec + kl}


def gaussian_log_prob(
    x: torch.Tensor, mean: torch.Tensor, log_sigma: torch.Tensor
) -> torch.Tensor:
    """log N(x; mean, diag(sigma^2)) summed over pixels, one value per batch item (nats)."""
    z = (x - mean) * torch.exp(-log_sigma)
    per_pixel = -0.5 * z * z - log_sigma - 0.5 * LOG_2PI
    return per_pixel.flatten(1).sum(dim=1)


def kl_to_standard_normal(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, diag(exp(logvar))) || N(0, I)) in closed form, summed over attributes."""
    return 0.5 * (mu * mu + torch.exp(logvar) - 1.0 - logvar).sum(dim=1)
