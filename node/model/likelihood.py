"""Monte-Carlo estimators of the marginal likelihood log p(x) (METHOD.md, Inference step 3).

Everything is in the log domain: p(x) of a 16384-pixel slice is far below the smallest float,
so sums of probabilities are ``logsumexp`` of log-probabilities. Samples are batched: one
decoder call scores all samples of all slices in a batch.

Estimators (``name`` as used in config and model.json):
- ``plain`` (eq. 2): z_i ~ q(z|x), p(x) ~ 1/N sum p(x|z_i). It estimates the expectation of
  p(x|z) under q, not p(x): it ignores the prior, so it is biased upwards by about
  KL(q || p(z|x)) + ... and says little about how typical z is. Kept because the method names
  it; the unit tests show the bias.
- ``importance`` (eq. 3, the default): z_i ~ q(z|x), p(x) ~ 1/N sum p(z_i) p(x|z_i) / q(z_i|x).
  Unbiased in p(x) (consistent in log p(x), with a downward bias that shrinks with N).
- ``mcmc`` (eq. 4): posterior samples from a random-walk Metropolis sampler started at draws
  from q, a diagonal Gaussian fitted to them (narrowed, which keeps the estimator's variance
  finite), N further posterior samples, and reciprocal importance sampling
  p(x) ~ [1/N sum q_fit(z_i) / (p(z_i) p(x|z_i))]^-1.
The ELBO (E_q[log p(x,z) - log q(z|x)]) comes free with the importance samples; the KL of the
attribute distributions to N(0, I) is closed-form (the "match likelihood": the smaller, the
more normal). The decode of the posterior mean, done once for the reconstruction error, also
gives the background log-likelihood and its residual term alone
(:func:`background_statistics`, the background part of :mod:`node.model.scoring`).

Models only need ``encode(x) -> (mu, logvar)`` and ``decode(z) -> (mean, log_sigma)``, which
lets the tests use a linear-Gaussian model whose log p(x) is known exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import torch
import torch.nn.functional as F

from node.model.vae import LOG_2PI, gaussian_log_prob, kl_to_standard_normal

ESTIMATORS = ("importance", "plain", "mcmc")
#: Decoder-mean level (preprocessed units) above which a pixel is head, for the background.
BACKGROUND_LEVEL = 0.1
#: Pixels by which the head mask is dilated before the background is taken.
BACKGROUND_DILATION = 1
#: Cap of each pixel's 0.5 r^2 in the background residual (r = 5): a handful of bright pixels
#: that the head mask leaves out must not decide a slice; a ghost spreads over many pixels.
RESIDUAL_CAP = 12.5


class LatentModel(Protocol):
    """What an estimator needs from a model."""

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def decode(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


@dataclass
class Estimate:
    """Per-slice results of one estimator run (tensors of shape ``[batch]``).

    Attributes:
        log_likelihood: estimate of log p(x) in nats.
        kl: KL(q(z|x) || N(0, I)) in nats.
        elbo: Monte-Carlo ELBO in nats (from the q samples).
        tail: mean over samples of the mean of the largest 1% squared standardized residuals
            0.5 ((x - mean) / sigma)^2 (nats per pixel); localized artifacts raise it.
        rec_error: mean squared error of the decoded posterior mean (a baseline score).
        plain: the ``plain`` estimate (eq. 2) from the same q samples, for comparison.
        background: mean per-pixel log p(x | z = posterior mean) over the background
            (:func:`background_statistics`; nats per pixel).
        background_residual: its residual term alone, the mean of ``-0.5 r^2`` (each
            pixel's capped at ``RESIDUAL_CAP``) over the same pixels (nats per pixel).
    """

    log_likelihood: torch.Tensor
    kl: torch.Tensor
    elbo: torch.Tensor
    tail: torch.Tensor
    rec_error: torch.Tensor
    plain: torch.Tensor
    background: torch.Tensor
    background_residual: torch.Tensor


class BackgroundStatistics(NamedTuple):
    """The background's statistics per slice, named as the estimator components that hold
    them."""

    background: torch.Tensor
    background_residual: torch.Tensor


def background_statistics(
    x: torch.Tensor, mean: torch.Tensor, log_sigma: torch.Tensor,
    level: float = BACKGROUND_LEVEL, dilation: int = BACKGROUND_DILATION,
) -> BackgroundStatistics:
    """Mean per-pixel Gaussian log-likelihood of ``x`` outside the head, and its residual term
    alone, one value each per slice, from one head mask and one pass over the residuals.

    ``ll = -0.5 r^2 - log sigma - 0.5 log 2 pi`` with ``r = (x - mean) / sigma`` (the terms
    whose sum over all pixels is log p(x|z)), averaged over the pixels where the decoder mean
    and its square neighbourhood of ``dilation`` pixels are at most ``level``. The head mask
    comes from the reconstruction, not from ``x``: a ghost or a motion smear in the image's
    background does not move the mask, it lowers the likelihood there. A slice whose whole
    grid is head scores 0.0. Images are ``[B, C, H, W]`` (the mask per channel); other shapes
    (a model of flat vectors) get the undilated mask.

    The residual keeps the ``-0.5 r^2`` term alone, each pixel's capped at ``RESIDUAL_CAP``:
    on real normal 3D series the ``-log sigma`` term by itself flags the middle sagittal
    slices, where the head fills most of the grid, while their residuals stay small;
    uncapped, 11 bright pixels at the edge of one real normal slice's head carried 87% of its
    residual and flagged it (node/models/README.md). A ghost or a smear in the air shows in
    the residual either way.
    """
    head = (mean > level).to(x.dtype)
    if dilation > 0 and head.dim() == 4:
        head = F.max_pool2d(head, 2 * dilation + 1, stride=1, padding=dilation)
    bg = (head < 0.5).to(x.dtype)
    n = bg.flatten(1).sum(dim=1).clamp(min=1.0)
    r = (x - mean) * torch.exp(-log_sigma)
    half_r2 = 0.5 * r * r

    def mean_over_bg(per_pixel: torch.Tensor) -> torch.Tensor:
        return (per_pixel * bg).flatten(1).sum(dim=1) / n

    return BackgroundStatistics(mean_over_bg(-half_r2 - log_sigma - 0.5 * LOG_2PI),
                                mean_over_bg(-half_r2.clamp(max=RESIDUAL_CAP)))


def log_normal_diag(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log N(z; mu, diag(exp(logvar))) summed over the last dimension."""
    return -0.5 * (((z - mu) ** 2) * torch.exp(-logvar) + logvar + LOG_2PI).sum(dim=-1)


def log_standard_normal(z: torch.Tensor) -> torch.Tensor:
    """log N(z; 0, I) summed over the last dimension."""
    return -0.5 * (z * z + LOG_2PI).sum(dim=-1)


def _expand(x: torch.Tensor, n: int) -> torch.Tensor:
    """Repeat each batch item ``n`` times: ``[B, ...] -> [B * n, ...]`` (item-major)."""
    return x.repeat_interleave(n, dim=0)


def _log_px_given_z(
    model: LatentModel, x: torch.Tensor, z: torch.Tensor, want_tail: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log p(x|z) for z ``[B, N, L]`` -> ``[B, N]``; optionally the tail statistic ``[B, N]``."""
    b, n, latent = z.shape
    mean, log_sigma = model.decode(z.reshape(b * n, latent))
    xs = _expand(x, n)
    logp = gaussian_log_prob(xs, mean, log_sigma).view(b, n)
    tail = None
    if want_tail:
        r = (0.5 * ((xs - mean) * torch.exp(-log_sigma)) ** 2).flatten(1)
        k = max(1, r.shape[1] // 100)
        tail = r.topk(k, dim=1).values.mean(dim=1).view(b, n)
    return logp, tail


def _sample_q(
    mu: torch.Tensor, logvar: torch.Tensor, n: int, generator: torch.Generator | None
) -> torch.Tensor:
    eps = torch.randn(
        (mu.shape[0], n, mu.shape[1]), generator=generator, device=mu.device, dtype=mu.dtype
    )
    return mu.unsqueeze(1) + eps * torch.exp(0.5 * logvar).unsqueeze(1)


def estimate(
    model: LatentModel,
    x: torch.Tensor,
    estimator: str = "importance",
    samples: int = 16,
    generator: torch.Generator | None = None,
    mcmc_burn_in: int = 64,
    background_level: float = BACKGROUND_LEVEL,
    background_dilation: int = BACKGROUND_DILATION,
) -> Estimate:
    """Estimate log p(x), KL, ELBO and the residual tail for a batch of slices.

    Args:
        model: a VAE (or anything with ``encode``/``decode``).
        x: batch of preprocessed slices.
        estimator: ``importance`` (eq. 3), ``plain`` (eq. 2) or ``mcmc`` (eq. 4).
        samples: Monte-Carlo samples per slice (N).
        generator: random source, for reproducible scores.
        mcmc_burn_in: Metropolis steps before samples are used (``mcmc`` only).
        background_level: head level of :func:`background_statistics`.
        background_dilation: head dilation of :func:`background_statistics`.

    Returns:
        An :class:`Estimate` with one value per slice.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; expected one of {ESTIMATORS}")
    if samples < 1:
        raise ValueError("samples must be at least 1")
    mu, logvar = model.encode(x)
    kl = kl_to_standard_normal(mu, logvar)
    z = _sample_q(mu, logvar, samples, generator)
    log_pxz, tail = _log_px_given_z(model, x, z, want_tail=True)
    assert tail is not None
    log_pz = log_standard_normal(z)
    log_qz = log_normal_diag(z, mu.unsqueeze(1), logvar.unsqueeze(1))
    log_w = log_pxz + log_pz - log_qz
    elbo = log_w.mean(dim=1)
    log_n = math.log(samples)
    plain = torch.logsumexp(log_pxz, dim=1) - log_n
    if estimator == "importance":
        ll = torch.logsumexp(log_w, dim=1) - log_n
    elif estimator == "plain":
        ll = plain
    else:
        ll = mcmc_log_likelihood(model, x, mu, logvar, samples, mcmc_burn_in, generator)
    mean0, log_sigma0 = model.decode(mu)
    rec = ((x - mean0) ** 2).flatten(1).mean(dim=1)
    background, residual = background_statistics(x, mean0, log_sigma0, background_level,
                                                 background_dilation)
    return Estimate(ll, kl, elbo, tail.mean(dim=1), rec, plain, background, residual)


def _log_joint(model: LatentModel, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    log_pxz, _ = _log_px_given_z(model, x, z)
    return log_pxz + log_standard_normal(z)


def mcmc_log_likelihood(
    model: LatentModel,
    x: torch.Tensor,
    mu: torch.Tensor,
    logvar: torch.Tensor,
    samples: int,
    burn_in: int = 64,
    generator: torch.Generator | None = None,
    chains: int = 8,
    shrink: float = 0.8,
) -> torch.Tensor:
    """Eq. 4: reciprocal importance sampling with a density fitted to MCMC posterior samples.

    Random-walk Metropolis chains start at draws from q(z|x) (close to the posterior), with a
    proposal shaped like q's standard deviations and a step size adapted during burn-in towards
    an acceptance rate near 0.3. After burn-in, the chains' states fit a diagonal Gaussian
    (standard deviations narrowed by ``shrink``: reciprocal importance sampling needs a density
    with lighter tails than the posterior); the chains then run on to give ``samples`` further
    posterior draws z_i, and log p(x) = -log(1/N sum_i q_fit(z_i) / p(x, z_i)).
    """
    b, latent = mu.shape
    c = chains
    std_q = torch.exp(0.5 * logvar).unsqueeze(1)
    z = _sample_q(mu, logvar, c, generator)
    lj = _log_joint(model, x, z)
    step = torch.full((b, 1, 1), 2.38 / math.sqrt(latent), device=mu.device, dtype=mu.dtype)
    collected: list[torch.Tensor] = []

    def move(z: torch.Tensor, lj: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        eps = torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
        prop = z + step * std_q * eps
        lj_prop = _log_joint(model, x, prop)
        u = torch.rand(lj.shape, generator=generator, device=z.device, dtype=z.dtype)
        accept = torch.log(u) < (lj_prop - lj)
        z = torch.where(accept.unsqueeze(-1), prop, z)
        lj = torch.where(accept, lj_prop, lj)
        return z, lj, accept.to(z.dtype).mean(dim=1)

    for _ in range(burn_in):
        z, lj, rate = move(z, lj)
        step = step * torch.exp(0.5 * (rate - 0.3)).view(b, 1, 1)
        collected.append(z)
    fit = torch.cat(collected[burn_in // 2 :], dim=1)  # second half of burn-in: [B, M, L]
    fit_mu = fit.mean(dim=1, keepdim=True)
    fit_logvar = torch.log(fit.var(dim=1, keepdim=True) * shrink**2 + 1e-8)
    draws: list[torch.Tensor] = []
    log_j: list[torch.Tensor] = []
    while sum(d.shape[1] for d in draws) < samples:
        z, lj, _ = move(z, lj)
        draws.append(z)
        log_j.append(lj)
    zs = torch.cat(draws, dim=1)[:, :samples]
    ljs = torch.cat(log_j, dim=1)[:, :samples]
    log_ratio = log_normal_diag(zs, fit_mu, fit_logvar) - ljs
    return -(torch.logsumexp(log_ratio, dim=1) - math.log(samples))
