"""Closed forms of the linear-Gaussian model, checked against independent routes: scipy
densities, Gaussian conditioning of the joint, Bayes' rule, torch.distributions KLs and a
numerical maximisation of the PPCA likelihood. The ELBO's closed form is also batched over
ensemble members."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import DTYPE
from scipy import stats
from torch.distributions import MultivariateNormal, Normal, kl_divergence

from vi import families
from vi import linear_gaussian as lg
from vi.decoders import GaussianDecoder, log_joint


def _joint_conditioning(x, W, b, psi):
    """p(z | x) from the joint N((0, b), [[I, Wᵀ], [W, C]]): mean Wᵀ C⁻¹ (x − b),
    covariance I − Wᵀ C⁻¹ W (textbook Gaussian conditioning, no posterior precision)."""
    C = W @ W.T + torch.diag(psi)
    gain = torch.linalg.solve(C, W).T  # Wᵀ C⁻¹ ([H, D]; C symmetric)
    return (x - b) @ gain.T, torch.eye(W.shape[1], dtype=DTYPE) - gain @ W


def test_exact_log_marginal_matches_scipy(linear_model):
    m = linear_model
    C = (m.W @ m.W.T + torch.diag(m.psi)).numpy()
    expected = stats.multivariate_normal(m.b.numpy(), C).logpdf(m.x.numpy())
    np.testing.assert_allclose(lg.exact_log_marginal(m.x, m.W, m.b, m.psi).numpy(), expected,
                               rtol=1e-12)
    # a scalar ψ (isotropic, PPCA) broadcasts
    expected_iso = stats.multivariate_normal(
        m.b.numpy(), (m.W @ m.W.T).numpy() + 0.4 * np.eye(m.D)).logpdf(m.x.numpy())
    np.testing.assert_allclose(
        lg.exact_log_marginal(m.x, m.W, m.b, torch.tensor(0.4, dtype=DTYPE)).numpy(),
        expected_iso, rtol=1e-12)


def test_exact_posterior_matches_gaussian_conditioning(linear_model):
    m = linear_model
    post = lg.exact_posterior(m.x, m.W, m.b, m.psi)
    mean, cov = _joint_conditioning(m.x, m.W, m.b, m.psi)
    torch.testing.assert_close(post.mean, mean, rtol=1e-11, atol=1e-12)
    torch.testing.assert_close(post.covariance_matrix, cov.expand(m.B, m.H, m.H), rtol=1e-11,
                               atol=1e-12)
    torch.testing.assert_close(lg.posterior_precision(m.W, m.psi), torch.linalg.inv(cov),
                               rtol=1e-10, atol=1e-10)


def test_exact_posterior_satisfies_bayes_rule(linear_model, generator):
    """log p(z | x) = log p(x | z) + log p(z) − log p(x) at arbitrary z."""
    m = linear_model
    z = 2 * torch.randn(7, m.B, m.H, generator=generator, dtype=DTYPE)
    lhs = lg.exact_posterior(m.x, m.W, m.b, m.psi).log_prob(z)
    joint = log_joint(m.decoder, m.x1, z.unsqueeze(1))[:, 0]  # the decoder's member axis
    rhs = joint - lg.exact_log_marginal(m.x, m.W, m.b, m.psi)
    torch.testing.assert_close(lhs, rhs, rtol=1e-11, atol=1e-11)


def test_optimal_diagonal_posterior_form(linear_model):
    m = linear_model
    mu, logvar = families.split_params(m.lam_opt)
    torch.testing.assert_close(mu, lg.exact_posterior(m.x, m.W, m.b, m.psi).mean)
    prec = lg.posterior_precision(m.W, m.psi)
    torch.testing.assert_close(logvar.exp(), (1 / torch.diagonal(prec)).expand(m.B, m.H))


def test_elbo_closed_form_is_log_px_minus_kl_to_posterior(linear_model, generator):
    """L(λ) = log p(x) − KL(q_λ ‖ p(z | x)) for every λ (KL from torch.distributions)."""
    m = linear_model
    post = lg.exact_posterior(m.x, m.W, m.b, m.psi)
    log_px = lg.exact_log_marginal(m.x, m.W, m.b, m.psi)
    for lam in (m.lam, m.lam_opt, torch.randn(m.B, 2 * m.H, generator=generator, dtype=DTYPE)):
        mu, logvar = families.split_params(lam)
        q = MultivariateNormal(mu, covariance_matrix=torch.diag_embed(logvar.exp()))
        torch.testing.assert_close(lg.elbo_closed_form(m.x, lam, m.W, m.b, m.psi),
                                   log_px - kl_divergence(q, post), rtol=1e-11, atol=1e-11)


def test_elbo_closed_form_matches_expected_log_joint_by_quadrature(linear_model):
    """L = E_q[log p(x, z)] + H[q], the expectation by tensor Gauss–Hermite quadrature (exact
    for the quadratic-in-z integrand)."""
    m = linear_model
    nodes, weights = np.polynomial.hermite_e.hermegauss(5)
    e1, e2 = np.meshgrid(nodes, nodes, indexing="ij")
    eps = torch.tensor(np.stack([e1.ravel(), e2.ravel()], -1), dtype=DTYPE)  # [25, H]
    w = torch.tensor(np.outer(weights, weights).ravel() / weights.sum() ** 2, dtype=DTYPE)
    z = families.sample(m.lam, eps[:, None, :].expand(-1, m.B, -1))
    joint = log_joint(m.decoder, m.x1, z.unsqueeze(1))[:, 0]
    expected = (w[:, None] * joint).sum(0) + families.entropy(m.lam)
    torch.testing.assert_close(lg.elbo_closed_form(m.x, m.lam, m.W, m.b, m.psi), expected,
                               rtol=1e-11, atol=1e-11)


def test_elbo_at_diagonal_optimum_is_log_px_minus_gap(linear_model):
    m = linear_model
    gap = lg.approximation_gap(m.W, m.psi)
    assert float(gap) > 0  # the posterior is correlated, so a diagonal q cannot reach it
    torch.testing.assert_close(lg.elbo_closed_form(m.x, m.lam_opt, m.W, m.b, m.psi),
                               lg.exact_log_marginal(m.x, m.W, m.b, m.psi) - gap,
                               rtol=1e-11, atol=1e-11)


def test_approximation_gap_is_kl_from_optimum_to_posterior(linear_model):
    m = linear_model
    mu, logvar = families.split_params(m.lam_opt)
    q_star = MultivariateNormal(mu, covariance_matrix=torch.diag_embed(logvar.exp()))
    kl = kl_divergence(q_star, lg.exact_posterior(m.x, m.W, m.b, m.psi))
    torch.testing.assert_close(kl, lg.approximation_gap(m.W, m.psi).expand(m.B), rtol=1e-10,
                               atol=1e-12)


def test_gap_vanishes_for_orthogonal_columns():
    """With Wᵀ Ψ⁻¹ W diagonal the posterior factorises, so the diagonal family is exact."""
    W = torch.tensor([[2.0, 0.0], [0.0, 1.0], [0.0, 0.0]], dtype=DTYPE)
    assert float(lg.approximation_gap(W, torch.ones(3, dtype=DTYPE))) == pytest.approx(0, abs=1e-14)


def test_optimal_diagonal_posterior_is_stationary(linear_model, generator):
    m = linear_model
    lam = m.lam_opt.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(lg.elbo_closed_form(m.x, lam, m.W, m.b, m.psi).sum(), lam)
    torch.testing.assert_close(g, torch.zeros_like(g), rtol=0, atol=1e-10)
    # ... and a maximum: random perturbations only lower the ELBO
    best = lg.elbo_closed_form(m.x, m.lam_opt, m.W, m.b, m.psi)
    for _ in range(5):
        delta = 0.1 * torch.randn(m.B, 2 * m.H, generator=generator, dtype=DTYPE)
        assert bool((lg.elbo_closed_form(m.x, m.lam_opt + delta, m.W, m.b, m.psi) < best).all())


def _ppca_data(n=400, d=5, h=2, seed=3):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(d, h, generator=g, dtype=DTYPE)
    b = torch.randn(d, generator=g, dtype=DTYPE)
    z = torch.randn(n, h, generator=g, dtype=DTYPE)
    return b + z @ W.T + 0.5 * torch.randn(n, d, generator=g, dtype=DTYPE)


def test_elbo_closed_form_is_batched_over_members(linear_model, generator):
    """x [K, N, D], λ [K, N, 2H], W [K, D, H], b and ψ [K, 1, D] give member k's closed form in
    row k, and the decoder's own (W, b, Ψ) plug in directly."""
    m, k = linear_model, 3
    W = torch.randn(k, m.D, m.H, generator=generator, dtype=DTYPE)
    b = torch.randn(k, m.D, generator=generator, dtype=DTYPE)
    psi = 0.2 + torch.rand(k, m.D, generator=generator, dtype=DTYPE)
    x = torch.randn(k, m.B, m.D, generator=generator, dtype=DTYPE)
    lam = torch.randn(k, m.B, 2 * m.H, generator=generator, dtype=DTYPE)
    got = lg.elbo_closed_form(x, lam, W, b.unsqueeze(1), psi.unsqueeze(1))
    assert got.shape == (k, m.B)
    for j in range(k):
        torch.testing.assert_close(got[j], lg.elbo_closed_form(x[j], lam[j], W[j], b[j], psi[j]),
                                   rtol=1e-13, atol=1e-13)
    W1, b1, psi1 = m.decoder.linear_parameters()
    torch.testing.assert_close(
        lg.elbo_closed_form(m.x1, m.lam1, W1, b1.unsqueeze(1), psi1.unsqueeze(1))[0],
        lg.elbo_closed_form(m.x, m.lam, m.W, m.b, m.psi), rtol=1e-13, atol=1e-13)


def test_ppca_mle_matches_numerical_maximisation():
    """Tipping & Bishop's closed form against L-BFGS on the exact log-likelihood from a random
    start. W is identifiable only up to rotation, so compare W Wᵀ, s², b and the likelihood."""
    x, h = _ppca_data(), 2
    W, b, s2 = lg.ppca_mle(x, h)
    assert W.shape == (5, h) and b.shape == (5,) and s2.shape == ()

    g = torch.Generator().manual_seed(0)
    W_opt = torch.randn(5, h, generator=g, dtype=DTYPE).requires_grad_(True)
    b_opt = torch.zeros(5, dtype=DTYPE, requires_grad=True)
    log_s2 = torch.zeros((), dtype=DTYPE, requires_grad=True)
    opt = torch.optim.LBFGS([W_opt, b_opt, log_s2], lr=1, max_iter=500, tolerance_grad=1e-12,
                            tolerance_change=1e-15, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = -lg.exact_log_marginal(x, W_opt, b_opt, log_s2.exp()).mean()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        ll_numeric = lg.exact_log_marginal(x, W_opt, b_opt, log_s2.exp()).mean()
        ll_closed = lg.exact_log_marginal(x, W, b, s2).mean()
        assert float(ll_closed) >= float(ll_numeric) - 1e-10  # the closed form is the maximum
        assert float(ll_closed - ll_numeric) < 1e-8
        torch.testing.assert_close(W @ W.T, W_opt @ W_opt.T, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(s2, log_s2.exp(), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(b, b_opt, rtol=1e-5, atol=1e-7)


def test_ppca_mle_is_a_stationary_point_and_loads_into_a_decoder():
    x, h = _ppca_data(), 2
    W, b, s2 = (t.clone().requires_grad_(True) for t in lg.ppca_mle(x, h))
    grads = torch.autograd.grad(lg.exact_log_marginal(x, W, b, s2).mean(), (W, b, s2))
    for g in grads:
        torch.testing.assert_close(g, torch.zeros_like(g), rtol=0, atol=1e-9)

    dec = GaussianDecoder(5, h, mean="linear", variance="learned", isotropic=True).to(DTYPE)
    dec.set_linear_parameters(W.detach(), b.detach(), s2.detach())
    W2, b2, psi2 = (t[0] for t in dec.linear_parameters())  # the one member
    torch.testing.assert_close(lg.exact_log_marginal(x, W2, b2, psi2),
                               lg.exact_log_marginal(x, W, b, s2).detach())


def test_posterior_precision_formula(linear_model):
    m = linear_model
    expected = torch.eye(m.H, dtype=DTYPE) + m.W.T @ torch.diag(1 / m.psi) @ m.W
    torch.testing.assert_close(lg.posterior_precision(m.W, m.psi), expected)


def test_marginal_is_the_pushforward_of_the_prior(linear_model, generator):
    """Cov[x] = W Wᵀ + diag ψ by Monte Carlo moments of ancestral samples (sanity, loose)."""
    m = linear_model
    n = 200_000
    z = torch.randn(n, m.H, generator=generator, dtype=DTYPE)
    e = Normal(torch.zeros(m.D, dtype=DTYPE), m.psi.sqrt()).sample((n,))
    x = m.b + z @ m.W.T + e
    marg = lg.marginal(m.W, m.b, m.psi)
    # SE of a sample covariance entry is ≤ sqrt((C_ii C_jj + C_ij²)/n); allow 5 SE
    C = marg.covariance_matrix
    se = torch.sqrt((torch.diagonal(C)[:, None] * torch.diagonal(C)[None, :] + C**2) / n)
    assert bool(((torch.cov(x.T) - C).abs() < 5 * se).all())


def test_bad_arguments_raise(linear_model):
    m = linear_model
    x = torch.zeros(10, 4, dtype=DTYPE)
    with pytest.raises(ValueError, match=r"PPCA needs 1 <= latent_dim < D = 4; got 4"):
        lg.ppca_mle(x, 4)
    with pytest.raises(ValueError, match="PPCA needs 1 <= latent_dim < D"):
        lg.ppca_mle(x, 0)
    with pytest.raises(ValueError, match="must be positive"):
        lg.exact_log_marginal(m.x, m.W, m.b, torch.zeros(m.D, dtype=DTYPE))
    with pytest.raises(ValueError, match=r"expected W \[\.\.\., D, H\] and b \[\.\.\., D\]"):
        lg.exact_posterior(m.x, m.W, m.b[:2], m.psi)
    with pytest.raises(ValueError, match=r"expected W \[\.\.\., D, H\]"):
        lg.elbo_closed_form(m.x, m.lam, m.W[0], m.b, m.psi)
    with pytest.raises(ValueError, match="even, non-zero last axis"):
        lg.elbo_closed_form(m.x, m.lam[:, :3], m.W, m.b, m.psi)
