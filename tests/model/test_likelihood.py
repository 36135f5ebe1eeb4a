"""Estimators against a linear-Gaussian VAE, whose exact log p(x) has a closed form.

Model: p(z) = N(0, I_L), p(x|z) = N(W z + b, s^2 I_D), so p(x) = N(b, W W^T + s^2 I). The
"encoder" returns the exact posterior with its mean nudged and its variance widened, as a
trained encoder would be slightly off.
"""

from __future__ import annotations

import math

import pytest
import torch

from node.model.likelihood import estimate

L, D, SIGMA = 3, 12, 0.5


class LinearGaussian:
    """encode/decode of a linear-Gaussian VAE with an imperfect (but close) encoder."""

    def __init__(self, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.w = torch.randn(D, L, generator=g, dtype=torch.float64)
        self.b = torch.randn(D, generator=g, dtype=torch.float64)
        prec = torch.eye(L, dtype=torch.float64) + self.w.T @ self.w / SIGMA**2
        self.post_cov = torch.linalg.inv(prec)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu = (x - self.b) @ self.w @ self.post_cov.T / SIGMA**2
        var = torch.diagonal(self.post_cov) * 1.5
        return mu + 0.05, torch.log(var).expand_as(mu)

    def decode(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = z @ self.w.T + self.b
        return mean, torch.full_like(mean, math.log(SIGMA))

    def exact_log_px(self, x: torch.Tensor) -> torch.Tensor:
        cov = self.w @ self.w.T + SIGMA**2 * torch.eye(D, dtype=torch.float64)
        dist = torch.distributions.MultivariateNormal(self.b, covariance_matrix=cov)
        return dist.log_prob(x)


@pytest.fixture
def model_and_data() -> tuple[LinearGaussian, torch.Tensor]:
    model = LinearGaussian()
    g = torch.Generator().manual_seed(1)
    z = torch.randn(6, L, generator=g, dtype=torch.float64)
    x = model.decode(z)[0] + SIGMA * torch.randn(6, D, generator=g, dtype=torch.float64)
    return model, x


def test_importance_matches_exact_log_px(model_and_data) -> None:
    """Eq. 3 with 2000 samples: within 0.05 nats of the closed form on every item."""
    model, x = model_and_data
    exact = model.exact_log_px(x)
    est = estimate(model, x, "importance", 2000, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(est.log_likelihood, exact, atol=0.05)


def test_mcmc_matches_exact_log_px(model_and_data) -> None:
    """Eq. 4 (MCMC + fitted density + reciprocal importance sampling): within 0.25 nats."""
    model, x = model_and_data
    exact = model.exact_log_px(x)
    est = estimate(model, x, "mcmc", 2000, generator=torch.Generator().manual_seed(0),
                   mcmc_burn_in=200)
    assert torch.allclose(est.log_likelihood, exact, atol=0.25)


def test_plain_is_biased_upwards(model_and_data) -> None:
    """Eq. 2 ignores the prior: it estimates log E_q[p(x|z)], which here exceeds log p(x) by
    more than a nat on every item, however many samples are drawn. Shown, not hidden."""
    model, x = model_and_data
    exact = model.exact_log_px(x)
    est = estimate(model, x, "plain", 2000, generator=torch.Generator().manual_seed(0))
    bias = est.log_likelihood - exact
    assert (bias > 1.0).all(), bias


def test_elbo_is_a_lower_bound_and_kl_closed_form(model_and_data) -> None:
    model, x = model_and_data
    exact = model.exact_log_px(x)
    est = estimate(model, x, "importance", 4000, generator=torch.Generator().manual_seed(0))
    assert (est.elbo < exact).all()
    mu, logvar = model.encode(x)
    q = torch.distributions.Normal(mu, torch.exp(0.5 * logvar))
    p = torch.distributions.Normal(torch.zeros_like(mu), torch.ones_like(mu))
    assert torch.allclose(est.kl, torch.distributions.kl_divergence(q, p).sum(1))


def test_log_domain_survives_tiny_probabilities() -> None:
    """A slice-sized model: p(x) underflows float64, the log estimate stays finite."""
    model = LinearGaussian()
    x = torch.full((2, D), 1e3, dtype=torch.float64)  # absurdly unlikely data
    est = estimate(model, x, "importance", 64, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(est.log_likelihood).all()
    assert (est.log_likelihood < -1e5).all()


def test_unknown_estimator_is_refused(model_and_data) -> None:
    model, x = model_and_data
    with pytest.raises(ValueError, match="unknown estimator"):
        estimate(model, x, "harmonic", 4)
