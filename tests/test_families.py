"""The diagonal-Gaussian family q(z; λ), λ = (μ, log σ²), against scipy and closed forms; the
same functions serve a stacked ensemble's λ [K, B, 2H]."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from vi import families

DTYPE = torch.float64


@pytest.fixture
def lam(generator) -> torch.Tensor:
    """λ for a batch of 5 points with H = 3: μ ~ N(0, 1), log σ² ~ U(−2, 1)."""
    mu = torch.randn(5, 3, generator=generator, dtype=DTYPE)
    logvar = -2.0 + 3.0 * torch.rand(5, 3, generator=generator, dtype=DTYPE)
    return families.join_params(mu, logvar)


def test_split_join_round_trip(lam):
    mu, logvar = families.split_params(lam)
    assert mu.shape == logvar.shape == (5, 3)
    assert torch.equal(mu, lam[:, :3]) and torch.equal(logvar, lam[:, 3:])
    assert torch.equal(families.join_params(mu, logvar), lam)
    assert families.latent_dim_of(lam) == 3


def test_sample_is_mu_plus_sigma_eps(lam, generator):
    eps = torch.randn(7, 5, 3, generator=generator, dtype=DTYPE)
    mu, logvar = lam[:, :3], lam[:, 3:]
    z = families.sample(lam, eps)
    assert z.shape == (7, 5, 3)
    torch.testing.assert_close(z, mu + torch.sqrt(torch.exp(logvar)) * eps, rtol=1e-13, atol=1e-15)


def test_log_prob_matches_scipy(lam, generator):
    z = torch.randn(4, 5, 3, generator=generator, dtype=DTYPE)
    mu, logvar = lam[:, :3].numpy(), lam[:, 3:].numpy()
    expected = stats.norm.logpdf(z.numpy(), loc=mu, scale=np.exp(0.5 * logvar)).sum(-1)
    got = families.log_prob(lam, z)
    assert got.shape == (4, 5)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12)


def test_entropy_matches_scipy(lam):
    mu, logvar = lam[:, :3].numpy(), lam[:, 3:].numpy()
    expected = [stats.multivariate_normal(m, np.diag(np.exp(v))).entropy()
                for m, v in zip(mu, logvar, strict=True)]
    np.testing.assert_allclose(families.entropy(lam).numpy(), expected, rtol=1e-12)


def test_kl_to_standard_normal_closed_form(lam):
    mu, logvar = lam[:, :3], lam[:, 3:]
    expected = 0.5 * (logvar.exp() + mu**2 - 1.0 - logvar).sum(-1)
    torch.testing.assert_close(families.kl_to_standard_normal(lam), expected, rtol=1e-12,
                               atol=1e-14)
    assert torch.allclose(families.kl_to_standard_normal(torch.zeros(2, 6, dtype=DTYPE)),
                          torch.zeros(2, dtype=DTYPE))


def test_kl_matches_monte_carlo_identity(lam):
    """KL(q ‖ p) = E_q[log q − log p]; checked with scipy's entropy: KL = −H[q] − E_q[log p]."""
    mu, logvar = lam[:, :3], lam[:, 3:]
    neg_cross_entropy = -0.5 * (3 * np.log(2 * np.pi) + (mu**2 + logvar.exp()).sum(-1))
    expected = -families.entropy(lam) - neg_cross_entropy
    torch.testing.assert_close(families.kl_to_standard_normal(lam), expected, rtol=1e-12,
                               atol=1e-13)


def test_score_matches_autograd_of_log_prob(lam, generator):
    eps = torch.randn(6, 5, 3, generator=generator, dtype=DTYPE)
    lam = lam.clone().requires_grad_(True)
    z = families.sample(lam.detach(), eps)  # z held fixed: the score is ∂/∂λ log q(z; λ)
    for m in range(eps.shape[0]):
        (auto,) = torch.autograd.grad(families.log_prob(lam, z[m]).sum(), lam)
        torch.testing.assert_close(families.score(lam.detach(), eps)[m], auto, rtol=1e-11,
                                   atol=1e-12)


def test_distribution_objects_have_the_right_shapes(lam):
    q = families.diag_gaussian(lam)
    assert q.batch_shape == (5,) and q.event_shape == (3,)
    p = families.standard_normal(3, lam)
    assert p.event_shape == (3,) and p.mean.dtype == DTYPE


def test_stacked_members_are_independent_batches(generator):
    """λ [K, B, 2H] of an ensemble with noise [M, K, B, H]: every function acts per (member,
    point), exactly as on each member's [B, 2H] alone."""
    k, b, h, m = 3, 4, 2, 5
    lam = torch.randn(k, b, 2 * h, generator=generator, dtype=DTYPE)
    eps = torch.randn(m, k, b, h, generator=generator, dtype=DTYPE)
    z = families.sample(lam, eps)
    assert z.shape == (m, k, b, h)
    assert families.log_prob(lam, z).shape == (m, k, b)
    assert families.score(lam, eps).shape == (m, k, b, 2 * h)
    assert families.kl_to_standard_normal(lam).shape == families.entropy(lam).shape == (k, b)
    for j in range(k):
        torch.testing.assert_close(z[:, j], families.sample(lam[j], eps[:, j]), rtol=0, atol=0)
        torch.testing.assert_close(families.log_prob(lam, z)[:, j],
                                   families.log_prob(lam[j], z[:, j]), rtol=0, atol=0)
        torch.testing.assert_close(families.kl_to_standard_normal(lam)[j],
                                   families.kl_to_standard_normal(lam[j]), rtol=0, atol=0)


def test_odd_or_empty_lambda_raises():
    with pytest.raises(ValueError, match="even, non-zero last axis"):
        families.split_params(torch.zeros(4, 3))
    with pytest.raises(ValueError, match="even, non-zero last axis"):
        families.latent_dim_of(torch.zeros(4, 0))
    with pytest.raises(ValueError, match="even, non-zero last axis"):
        families.kl_to_standard_normal(torch.zeros(5))


def test_mismatched_join_and_noise_raise():
    with pytest.raises(ValueError, match="shapes differ"):
        families.join_params(torch.zeros(2, 3), torch.zeros(2, 2))
    with pytest.raises(ValueError, match="latent dimension is 3"):
        families.sample(torch.zeros(2, 6), torch.zeros(4, 2, 2))
