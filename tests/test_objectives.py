"""The ELBO and the IWAE bound on the linear-Gaussian model, whose exact ELBO
(``elbo_closed_form``) and exact log p(x) are known.

Shapes carry the ensemble's member axis: x [K, B, D], λ [K, B, 2H], noise [M, K, B, H]; the
statistical tests use one member (K = 1), and separate tests check that members of a stacked
decoder are computed independently.

Per-copy gradients: λ is replicated R times (x too), so ∇ of the summed surrogate w.r.t. the
[1, R·B, 2H] tensor gives R independent λ-gradient estimates at once. For θ (one flat leaf
[K, P]), which every copy shares, ``torch.func.vmap(grad(...))`` over R independent noise
tensors gives R per-copy gradients in one batched call. Both are z-tested against autograd of
the exact ELBO.
"""

from __future__ import annotations

import math
from statistics import NormalDist
from types import SimpleNamespace

import pytest
import torch
from conftest import DTYPE, assert_unbiased, bonferroni_crit, member_random
from torch import nn
from torch.distributions import Normal
from torch.func import functional_call, grad, vmap

from vi import linear_gaussian
from vi.decoders import GaussianDecoder, log_joint
from vi.estimators import configurations, draw_noise
from vi.objectives import KL_MODES, PRIOR, defensive_weights, elbo, iwae_bound, log_weights
from vi.streams import MemberRandom
from vi.streams import generator as stream_generator

# every (estimator, baseline) the registry declares: a new estimator is tested at once
CONFIGS = configurations()
UNBIASED = configurations(unbiased=True)
MEAN_BASELINE = -9.0  # a constant near the model's ELBO; any constant keeps `mean` unbiased
M = 4


def exact_elbo(model, lam: torch.Tensor) -> torch.Tensor:
    """The closed-form ELBO [1, B] of λ [1, B, 2H], differentiable in λ and in the decoder's
    flat parameters (W, b and the raw variance live in one leaf)."""
    W, b, psi = model.decoder.linear_parameters()
    return linear_gaussian.elbo_closed_form(model.x1, lam, W, b.unsqueeze(1), psi.unsqueeze(1))


def test_closed_form_matches_the_decoder_parameters(linear_model):
    m = linear_model
    W, b, psi = m.decoder.linear_parameters()
    assert W.shape == (1, m.D, m.H) and b.shape == psi.shape == (1, m.D)
    torch.testing.assert_close(W[0], m.W)
    torch.testing.assert_close(b[0], m.b)
    torch.testing.assert_close(psi[0], m.psi, rtol=1e-13, atol=1e-15)
    # the batched closed form is the plain one
    torch.testing.assert_close(exact_elbo(m, m.lam1)[0].detach(),
                               linear_gaussian.elbo_closed_form(m.x, m.lam, m.W, m.b, m.psi),
                               rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("kl", KL_MODES)
@pytest.mark.parametrize(("estimator", "baseline"), UNBIASED)
def test_elbo_lambda_gradient_unbiased(linear_model, estimator, baseline, kl, generator):
    """E[ĝ_λ] = ∇_λ L(λ, θ), L the exact ELBO of the linear-Gaussian model, per data point."""
    m, r = linear_model, 20_000
    lam = m.lam1.clone().requires_grad_(True)
    (target,) = torch.autograd.grad(exact_elbo(m, lam).sum(), lam)

    lam_r = m.lam.repeat(r, 1).unsqueeze(0).requires_grad_(True)  # [1, R·B, 2H], copy-major
    eps = draw_noise(M, (1, r * m.B), m.H, generator=generator, dtype=DTYPE)
    est = elbo(m.decoder, m.x.repeat(r, 1).unsqueeze(0), lam_r, eps, estimator=estimator,
               baseline=baseline, kl=kl,
               baseline_value=MEAN_BASELINE if baseline == "mean" else None)
    assert est.surrogate.shape == (1, r * m.B) and est.samples.shape == (M, 1, r * m.B)
    (grads,) = torch.autograd.grad(est.surrogate.sum(), lam_r)
    assert_unbiased(grads.reshape(r, m.B, 2 * m.H), target[0])


class _SummedElbo(nn.Module):
    """Σ_n of the ELBO surrogate as a module, so ``functional_call`` can swap θ in."""

    def __init__(self, decoder, x, lam, **kw):
        super().__init__()
        self.decoder, self.x, self.lam, self.kw = decoder, x, lam, kw

    def forward(self, eps):
        return elbo(self.decoder, self.x, self.lam, eps, **self.kw).surrogate.sum()


@pytest.mark.parametrize("kl", KL_MODES)
@pytest.mark.parametrize(("estimator", "baseline"), UNBIASED)
def test_elbo_theta_gradient_unbiased(linear_model, estimator, baseline, kl, generator):
    """E[ĝ_θ] = ∇_θ Σ_n L_n for θ = (W, b, raw_var) of GaussianDecoder(linear, learned), all in
    the decoder's one flat leaf [1, P]."""
    m, r = linear_model, 2_000
    module = _SummedElbo(m.decoder, m.x1, m.lam1, estimator=estimator, baseline=baseline, kl=kl,
                         baseline_value=MEAN_BASELINE if baseline == "mean" else None)
    params = {k: v.detach() for k, v in module.named_parameters()}
    assert set(params) == {"decoder.net.params.flat"}
    assert params["decoder.net.params.flat"].shape == (1, m.D * m.H + 2 * m.D)
    (target,) = torch.autograd.grad(exact_elbo(m, m.lam1).sum(), list(module.parameters()))

    eps = draw_noise(r, (M, 1, m.B), m.H, generator=generator, dtype=DTYPE)  # R noise tensors
    per_copy = vmap(grad(lambda p, e: functional_call(module, p, (e,))), in_dims=(None, 0))(
        params, eps)
    draws = per_copy["decoder.net.params.flat"].reshape(r, -1)
    assert_unbiased(draws, target.reshape(-1))


def test_theta_gradient_does_not_depend_on_the_estimator(linear_model, generator):
    """The decoder gradient is always ∇_θ log p_θ(x | z) at the sampled z."""
    m = linear_model
    eps = draw_noise(M, (1, m.B), m.H, generator=generator, dtype=DTYPE)
    params = list(m.decoder.parameters())
    ref = None
    for kl in KL_MODES:
        for estimator, baseline in CONFIGS:
            est = elbo(m.decoder, m.x1, m.lam1.clone().requires_grad_(True), eps,
                       estimator=estimator, baseline=baseline, kl=kl,
                       baseline_value=MEAN_BASELINE if baseline == "mean" else None)
            grads = torch.autograd.grad(est.surrogate.sum(), params)
            if ref is None:
                ref = grads
            for g_, r_ in zip(grads, ref, strict=True):
                torch.testing.assert_close(g_, r_, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("estimator", "baseline"), CONFIGS)
def test_elbo_value_is_shared_across_estimators(linear_model, estimator, baseline, generator):
    """Value = (1/M) Σ_m [log p(x, z_m) − log q(z_m)] (mc) whatever the estimator."""
    m = linear_model
    eps = draw_noise(M, (1, m.B), m.H, generator=generator, dtype=DTYPE)
    est = elbo(m.decoder, m.x1, m.lam1.clone().requires_grad_(True), eps, estimator=estimator,
               baseline=baseline, kl="mc",
               baseline_value=MEAN_BASELINE if baseline == "mean" else None)
    lw = log_weights(m.decoder, m.x1, m.lam1, eps)
    assert lw.shape == (M, 1, m.B)
    torch.testing.assert_close(est.samples, lw, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(est.surrogate.detach(), lw.mean(0), rtol=1e-13, atol=1e-13)


def test_analytic_and_mc_kl_agree_in_expectation(linear_model, generator):
    """Both value estimators are unbiased for the exact ELBO, and their paired difference
    (common random numbers) has mean zero."""
    m, r = linear_model, 20_000
    eps = draw_noise(M, (1, r * m.B), m.H, generator=generator, dtype=DTYPE)
    x_r, lam_r = m.x.repeat(r, 1).unsqueeze(0), m.lam.repeat(r, 1).unsqueeze(0)
    target = exact_elbo(m, m.lam1).detach()[0]
    values = {kl: elbo(m.decoder, x_r, lam_r, eps, kl=kl).surrogate.detach().reshape(r, m.B)
              for kl in KL_MODES}
    assert_unbiased(values["analytic"], target)
    assert_unbiased(values["mc"], target)
    assert_unbiased(values["analytic"] - values["mc"], torch.zeros_like(target))


def _iwae(m, x, lam, k, seed, **kw):
    return iwae_bound(m.decoder, x, lam, k, member_random(seed, key="iwae"), **kw)


def test_iwae_k1_is_the_single_sample_elbo(linear_model):
    """IWAE_1 with the same noise is exactly the M = 1, kl="mc" ELBO estimate (ESS 1, SE 0)."""
    m = linear_model
    iw = _iwae(m, m.x1, m.lam1, 1, 3)
    assert iw.k == 1 and iw.value.shape == iw.ess.shape == iw.se.shape == (1, m.B)
    eps = member_random(3, key="iwae").randn((1, m.B, m.H), 1, dtype=DTYPE)
    assert eps.shape == (1, 1, m.B, m.H)
    torch.testing.assert_close(iw.value, elbo(m.decoder, m.x1, m.lam1, eps, kl="mc").surrogate,
                               rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(iw.ess, torch.ones_like(iw.ess))
    assert torch.equal(iw.se, torch.zeros_like(iw.se))


def test_iwae_k1_equals_elbo_in_expectation(linear_model):
    m, r = linear_model, 20_000
    iw = _iwae(m, m.x.repeat(r, 1).unsqueeze(0), m.lam.repeat(r, 1).unsqueeze(0), 1, 4)
    assert_unbiased(iw.value.reshape(r, m.B), exact_elbo(m, m.lam1).detach()[0])


def test_iwae_is_nondecreasing_in_k(linear_model):
    """E[IWAE_1] ≤ E[IWAE_10] ≤ E[IWAE_100] ≤ log p(x) (Burda et al., 2016, Thm 1).

    With the deliberately poor proposal used here (λ off the optimum), the increases are strict,
    so each consecutive difference of means must be positive by more than the Bonferroni bound
    times its standard error (independent draws: SE² = SE₁² + SE₂²); and no mean may exceed the
    exact log p(x) by more than that bound.
    """
    m, r = linear_model, 4_000
    x_r, lam_r = m.x.repeat(r, 1).unsqueeze(0), m.lam.repeat(r, 1).unsqueeze(0)
    log_px = linear_gaussian.exact_log_marginal(m.x, m.W, m.b, m.psi)
    ks = (1, 10, 100)
    draws = [_iwae(m, x_r, lam_r, k, 10 + k).value.reshape(r, m.B) for k in ks]
    means = [d.mean(0) for d in draws]
    ses = [d.std(0) / math.sqrt(r) for d in draws]
    crit = bonferroni_crit(2 * m.B + 3 * m.B)
    for i in range(len(ks) - 1):
        z = (means[i + 1] - means[i]) / torch.sqrt(ses[i] ** 2 + ses[i + 1] ** 2)
        assert bool((z > crit).all()), f"IWAE_{ks[i + 1]} not above IWAE_{ks[i]}: z = {z}"
    for mean, se in zip(means, ses, strict=True):
        assert bool(((mean - log_px) / se < crit).all())


def _moment_matched(m) -> torch.Tensor:
    """The exact posterior mean with the posterior's marginal variances diag(P⁻¹): [B, 2H]."""
    cov = torch.linalg.inv(linear_gaussian.posterior_precision(m.W, m.psi))
    post_mean = linear_gaussian.exact_posterior(m.x, m.W, m.b, m.psi).mean
    return torch.cat([post_mean, torch.diagonal(cov).log().expand_as(post_mean)], dim=-1)


def test_iwae_5000_reaches_exact_log_marginal(linear_model):
    """IWAE_5000 is within 0.05 nats of the exact log p(x).

    Proposal: the exact posterior mean with the posterior's marginal variances diag(P⁻¹) (the
    moment-matched diagonal Gaussian). The KL-optimal diagonal λ* (variances 1/P_hh) is too
    narrow here: its weights p(z | x)/q(z) have infinite variance, because E_q[w²] < ∞ needs
    A = 2P − Σ_q⁻¹ ≻ 0. For Gaussians, ρ = E_q[w²]/p(x)² − 1 = |Σ_q|^½ / (|P⁻¹| |A|^½) − 1;
    the delta method gives bias ≈ ρ/(2k) and SD ≈ (ρ/k)^½, which for ρ < 1.5 and k = 5000 are
    < 2e-4 and < 0.018 nats, so 0.05 nats is about three standard deviations.
    """
    m = linear_model
    log_px = linear_gaussian.exact_log_marginal(m.x, m.W, m.b, m.psi)
    prec = linear_gaussian.posterior_precision(m.W, m.psi)
    cov = torch.linalg.inv(prec)
    lam = _moment_matched(m)
    q_var = torch.diagonal(cov)

    a_mat = 2 * prec - torch.diag(1 / q_var)
    assert float(torch.linalg.eigvalsh(a_mat).min()) > 0
    rho = torch.sqrt(q_var.prod()) / (torch.det(cov) * torch.sqrt(torch.det(a_mat))) - 1
    assert 0 < float(rho) < 1.5
    narrow = 2 * prec - torch.diag(torch.diagonal(prec))  # λ*'s A: not positive definite
    assert float(torch.linalg.eigvalsh(narrow).min()) < 0

    iw = _iwae(m, m.x1, lam.unsqueeze(0), 5000, 5, chunk_size=1000)
    assert bool(((iw.value[0] - log_px).abs() < 0.05).all()), (iw.value, log_px)
    assert bool((iw.ess > 0.3 * 5000).all()) and bool((iw.ess <= 5000 * (1 + 1e-9)).all())
    exact_gap = log_px - linear_gaussian.elbo_closed_form(m.x, lam, m.W, m.b, m.psi)
    assert bool((exact_gap > 0.1).all())  # the ELBO of this q is far off: IWAE does the work


def test_iwae_with_the_exact_posterior_is_exact():
    """A posterior that factorises (Wᵀ Ψ⁻¹ W diagonal) is in the family: with it as the
    proposal every weight equals p(x), so the estimate is exact, ESS = k and SE = 0."""
    W = torch.tensor([[2.0, 0.0], [0.0, 1.0], [0.0, 0.0]], dtype=DTYPE)
    b, psi = torch.tensor([0.1, -0.2, 0.3], dtype=DTYPE), torch.ones(3, dtype=DTYPE)
    decoder = GaussianDecoder(3, 2, mean="linear", variance="learned").to(DTYPE)
    decoder.set_linear_parameters(W, b, psi)
    x = torch.tensor([[1.0, 2.0, -1.0], [0.0, -0.5, 0.5]], dtype=DTYPE)
    lam = linear_gaussian.optimal_diagonal_posterior(x, W, b, psi)
    iw = iwae_bound(decoder, x.unsqueeze(0), lam.unsqueeze(0), 64, member_random(1))
    log_px = linear_gaussian.exact_log_marginal(x, W, b, psi)
    torch.testing.assert_close(iw.value[0], log_px, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(iw.ess, torch.full_like(iw.ess, 64.0), rtol=1e-10, atol=0)
    assert float(iw.se.max()) < 1e-6


def _defensive_draws(m, k, seed, alpha):
    """The stream of ``_iwae(..., defensive=alpha)`` redrawn by hand: noise ε [k, 1, B, H], and
    each draw's component from the extra coordinate c (prior if c < Φ⁻¹(α/4), widened q if
    c < Φ⁻¹(α), q otherwise)."""
    noise = member_random(seed, key="iwae").randn((k, m.B, m.H + 1), 1, dtype=DTYPE)
    c = noise[..., m.H]
    prior = c < NormalDist().inv_cdf(alpha / 4)
    wide = ~prior & (c < NormalDist().inv_cdf(alpha))
    return noise[..., :m.H], prior, wide


def test_defensive_proposal_is_the_stated_mixture(linear_model):
    """k = 60, α = 0.2: each z comes from q(μ, σ), q(μ, 2σ) or the prior N(0, I) as its extra
    noise coordinate says, and every weight is p(x, z)/r(z) with
    r = 0.8 q(μ, σ) + 0.15 q(μ, 2σ) + 0.05 N(0, I); the estimate is the log of their mean, ESS
    (Σ w)²/Σ w² and SE √(1/ESS − 1/k)."""
    m, k, alpha = linear_model, 60, 0.2
    assert defensive_weights(alpha) == pytest.approx((0.8, 0.15, 0.05), abs=1e-15)
    iw = _iwae(m, m.x1, m.lam1, k, 6, defensive=alpha)
    eps, prior, wide = _defensive_draws(m, k, 6, alpha)
    assert bool(prior.any()) and bool(wide.any()) and bool((~prior & ~wide).any())
    mu, sd = m.lam1[..., :m.H], torch.exp(0.5 * m.lam1[..., m.H:])
    z = torch.where(prior.unsqueeze(-1), eps,
                    mu + torch.where(wide.unsqueeze(-1), 2.0, 1.0) * sd * eps)
    log_r = torch.logsumexp(torch.stack([
        math.log(0.8) + Normal(mu, sd).log_prob(z).sum(-1),
        math.log(0.15) + Normal(mu, 2 * sd).log_prob(z).sum(-1),
        math.log(0.05) + Normal(0.0, 1.0).log_prob(z).sum(-1)]), 0)
    lw = linear_gaussian_log_joint(m, z) - log_r
    torch.testing.assert_close(iw.value, torch.logsumexp(lw, 0) - math.log(k), rtol=1e-12,
                               atol=1e-12)
    w = torch.exp(lw - lw.max(0).values)
    ess = w.sum(0) ** 2 / (w**2).sum(0)
    torch.testing.assert_close(iw.ess, ess, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(iw.se, torch.sqrt(1 / ess - 1 / k), rtol=1e-8, atol=1e-10)


def linear_gaussian_log_joint(m, z: torch.Tensor) -> torch.Tensor:
    """log N(x; W z + b, diag ψ) + log N(z; 0, I) by hand, z [..., 1, B, H] → [..., 1, B]."""
    mean = z @ m.W.T + m.b
    lik = Normal(mean, m.psi.sqrt()).log_prob(m.x1).sum(-1)
    return lik + Normal(0.0, 1.0).log_prob(z).sum(-1)


@pytest.mark.parametrize("k", [1, 4])
def test_defensive_iwae_is_unbiased_for_p_x_where_the_plain_one_has_infinite_variance(
        linear_model, k):
    """With the KL-optimal λ* as proposal the plain weights have infinite variance here (see
    ``test_iwae_5000_reaches_exact_log_marginal``); the defensive mixture bounds them, and
    (1/k) Σ w stays unbiased for p(x): E[exp(IWAE_k − log p(x))] = 1 per point, by a Bonferroni
    z-test over R replications. At k = 1 this holds only if each component is drawn with its
    weight in r (α = 0.6 makes all three frequent)."""
    m, r = linear_model, 20_000
    x_r, lam_r = m.x.repeat(r, 1).unsqueeze(0), m.lam_opt.repeat(r, 1).unsqueeze(0)
    log_px = linear_gaussian.exact_log_marginal(m.x, m.W, m.b, m.psi)
    iw = _iwae(m, x_r, lam_r, k, 7 + k, defensive=0.6)
    ratio = torch.exp(iw.value.reshape(r, m.B) - log_px)
    assert_unbiased(ratio, torch.ones(m.B, dtype=DTYPE))
    # and the bound (Jensen) stays below log p(x) on average
    assert bool((iw.value.reshape(r, m.B).mean(0) < log_px).all())


def test_defensive_iwae_is_nondecreasing_in_k_even_from_the_exact_posterior():
    """E[IWAE_k] is non-decreasing in k for i.i.d. draws from one proposal (Burda et al., 2016,
    Thm 1). The proposal is the exact posterior (a factorising one), so q alone would give
    log p(x) at every k; the defensive mixture's weights vary, and E[IWAE_1] < E[IWAE_2] <
    E[IWAE_3] < E[IWAE_5] < log p(x) strictly, each step by more than the Bonferroni bound
    times its standard error (independent draws). A proposal whose mixture proportions change
    with k (k = 1 all from q, k = 2 half from the widened q, ...) fails this: its IWAE_1 is
    exactly log p(x) and its IWAE_2 lower."""
    W = torch.tensor([[2.0, 0.0], [0.0, 1.0], [0.0, 0.0]], dtype=DTYPE)
    b, psi = torch.tensor([0.1, -0.2, 0.3], dtype=DTYPE), torch.ones(3, dtype=DTYPE)
    decoder = GaussianDecoder(3, 2, mean="linear", variance="learned").to(DTYPE)
    decoder.set_linear_parameters(W, b, psi)
    x = torch.tensor([[1.0, 2.0, -1.0], [0.0, -0.5, 0.5]], dtype=DTYPE)
    lam = linear_gaussian.optimal_diagonal_posterior(x, W, b, psi)
    log_px = linear_gaussian.exact_log_marginal(x, W, b, psi)
    r, ks = 40_000, (1, 2, 3, 5)
    draws = [iwae_bound(decoder, x.repeat(r, 1).unsqueeze(0), lam.repeat(r, 1).unsqueeze(0),
                        k, member_random(30 + k), defensive=0.2).value.reshape(r, 2)
             for k in ks]
    means = [d.mean(0) for d in draws]
    ses = [d.std(0) / math.sqrt(r) for d in draws]
    crit = bonferroni_crit(2 * (len(ks) - 1) + 2 * len(ks))
    for i in range(len(ks) - 1):
        z = (means[i + 1] - means[i]) / torch.sqrt(ses[i] ** 2 + ses[i + 1] ** 2)
        assert bool((z > crit).all()), f"IWAE_{ks[i + 1]} not above IWAE_{ks[i]}: z = {z}"
    for mean, se in zip(means, ses, strict=True):
        assert bool(((log_px - mean) / se > crit).all())


@pytest.mark.parametrize(("defensive", "chunks"), [(0.0, (8, 48, 240, 1000)),
                                                   (0.2, (16, 48, 240, 1000))])
def test_iwae_chunking_does_not_change_the_value(linear_model, defensive, chunks):
    """Chunks combine exactly and draw the same samples and components whatever the chunks.
    (CPU ``randn`` fills in blocks of 16 numbers, so chunks whose draws are a multiple of 16
    numbers — n·B·H for q, n·B·(H + 1) for the mixture — draw the same stream.)"""
    m = linear_model
    vals = [_iwae(m, m.x1, m.lam1, 240, 1, chunk_size=c, defensive=defensive) for c in chunks]
    for v in vals[1:]:
        torch.testing.assert_close(v.value, vals[0].value, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(v.ess, vals[0].ess, rtol=1e-10, atol=1e-10)


# ---------------------------------------------- importance-weight variance: the exact conditions
#
# A two-dimensional linear-Gaussian model (D = H = 2, ψ = 1) with posterior precision
# P = I + WᵀW = I + c S, S = [[1, s], [s, 1]]: its normalised off-diagonal
# ρ = P₁₂/√(P₁₁P₂₂) = c s/(1 + c) is set by s. The conditions are invariant under rescaling the
# coordinates, so this is the unit-diagonal case: P/(1 + c) = [[1, ρ], [ρ, 1]].
#
# For the posterior N(m, P⁻¹) and a proposal N(m, C) with the same mean, the weights
# w = p(x, z)/q(z) = p(x) N(z; m, P⁻¹)/N(z; m, C) have the moments
#
#     E_q[w^j]/p(x)^j = |C|^((j−1)/2) |P|^(j/2) / |j P − (j − 1) C⁻¹|^(1/2)
#
# when j P − (j − 1) C⁻¹ ≻ 0, and are infinite otherwise (a Gaussian integral). The best
# diagonal q* (Ψ-free: C = diag(P)⁻¹) has a finite second moment exactly when
# 2P − diag(P) ≻ 0, i.e. |ρ| < ½.


def _weight_moment(prec: torch.Tensor, cov_q: torch.Tensor, j: int) -> float:
    """E_q[w^j]/p(x)^j for the posterior N(m, prec⁻¹) and the proposal N(m, cov_q)."""
    a = j * prec - (j - 1) * torch.linalg.inv(cov_q)
    if float(torch.linalg.eigvalsh(a).min()) <= 0:
        return math.inf
    return float(torch.det(cov_q) ** ((j - 1) / 2) * torch.det(prec) ** (j / 2)
                 / torch.sqrt(torch.det(a)))


def _correlated_model(rho: float, c: float = 20.0):
    s = rho * (1 + c) / c
    assert abs(s) < 1
    W = math.sqrt(c) * torch.linalg.cholesky(torch.tensor([[1.0, s], [s, 1.0]], dtype=DTYPE)).T
    b, psi = torch.zeros(2, dtype=DTYPE), torch.ones(2, dtype=DTYPE)
    decoder = GaussianDecoder(2, 2, mean="linear", variance="learned").to(DTYPE)
    decoder.set_linear_parameters(W, b, psi)
    x = torch.tensor([[0.7, -0.4]], dtype=DTYPE)
    prec = linear_gaussian.posterior_precision(W, psi)
    d = torch.diagonal(prec).sqrt()
    assert float(prec[0, 1] / (d[0] * d[1])) == pytest.approx(rho, abs=1e-12)
    lam = linear_gaussian.optimal_diagonal_posterior(x, W, b, psi)
    torch.testing.assert_close(torch.exp(-lam[0, 2:]), torch.diagonal(prec))  # q*: diag(P)⁻¹
    return SimpleNamespace(decoder=decoder, x=x, prec=prec, lam=lam, W=W, psi=psi,
                           log_px=linear_gaussian.exact_log_marginal(x, W, b, psi))


@torch.no_grad()
def _log_box_moment(m, half_width: float, *, defensive: float = 0.0, power: int = 2,
                    h: float = 0.1) -> float:
    """log of E_r[(w/p(x))^power] restricted to the square of ``half_width`` around μ: the sum
    over a grid of step h of h² p(x, z) (w/p(x))^(power − 1)/p(x), with the library's weights
    w (``log_weights``) of q* (or of the defensive mixture: the grid enters as prior draws,
    z = ε)."""
    grid = torch.arange(-half_width, half_width + h / 2, h, dtype=DTYPE)
    mu, sd = m.lam[0, :2], torch.exp(0.5 * m.lam[0, 2:])
    z = torch.stack(torch.meshgrid(grid, grid, indexing="ij"), -1).reshape(-1, 1, 1, 2) + mu
    x, lam = m.x.unsqueeze(0), m.lam.unsqueeze(0)
    if defensive > 0:
        component = torch.full(z.shape[:-1], PRIOR)
        lw = log_weights(m.decoder, x, lam, z, defensive=defensive, component=component)
    else:
        lw = log_weights(m.decoder, x, lam, (z - mu) / sd)
    integrand = log_joint(m.decoder, x, z) + (power - 1) * lw - power * m.log_px
    return float(torch.logsumexp(integrand.reshape(-1), 0)) + 2 * math.log(h)


@pytest.mark.parametrize("rho", [0.3, 0.45, 0.55, 0.9])
def test_best_diagonal_weights_have_finite_variance_exactly_when_2p_minus_diag_p_is_positive(
        rho):
    """q* = N(m, diag(P)⁻¹): E[w²] is finite exactly when 2P − diag(P) ≻ 0 (|ρ| < ½). The
    library's weights, integrated on a grid around μ over squares of half-width 10, 20 and 40
    (46 to 185 of q*'s standard deviations), give the closed form to 1e-9 when |ρ| < ½; beyond,
    the restricted integral grows without bound (by more than 100 nats per doubling: 207, 837,
    3357 nats at ρ = 0.55). A correlated posterior alone is not enough: at ρ = 0.3 E[w²] is
    1.1375 p(x)²."""
    m = _correlated_model(rho)
    closed = _weight_moment(m.prec, torch.diag(torch.exp(m.lam[0, 2:])), 2)
    boxes = [_log_box_moment(m, half) for half in (10.0, 20.0, 40.0)]
    positive = float(torch.linalg.eigvalsh(2 * m.prec - torch.diag(torch.diagonal(m.prec))).min())
    if abs(rho) < 0.5:
        assert positive > 0 and math.isfinite(closed)
        for box in boxes:
            assert box == pytest.approx(math.log(closed), abs=1e-9)
        if rho == 0.3:
            assert closed == pytest.approx(0.91 / 0.8, rel=1e-12)  # (1 − ρ²)/√(1 − 4ρ²)
    else:
        assert positive < 0 and closed == math.inf
        assert boxes[1] > boxes[0] + 100 and boxes[2] > boxes[1] + 100


def test_weight_second_moment_by_monte_carlo():
    """The same statements from the samples iwae_bound draws (k = 10⁴ per point, 200 points:
    n = 2·10⁶ draws), with the per-point mean of (w/p(x))² = exp(2 (IWAE_k − log p(x))) k/ESS.

    ρ = 0.2 (q*): the mean equals the closed form 1.0474 within the Bonferroni bound times its
    standard error √((E[w⁴] − E[w²]²)/n) (E[w⁴] finite: 4P − 3 diag(P) ≻ 0 needs |ρ| < ¼).
    ρ = 0.9 (q*): infinite variance; the median over the points of k/ESS (an estimate of
    E[w²]/E[w]²) grows with k — from about 3 at k = 100 to about 50 at k = 10⁴ — where it
    would settle for finite variance. ρ = 0.9 with the defensive mixture (α = 0.2): bounded
    weights; the mean equals the grid value (9.43) within the bound times its standard error
    (E[w⁴] from the grid too)."""
    k, points = 10_000, 200
    crit = bonferroni_crit(2)

    def draws(m, kk, defensive, seed):
        return iwae_bound(m.decoder, m.x.repeat(points, 1).unsqueeze(0),
                          m.lam.repeat(points, 1).unsqueeze(0), kk, member_random(seed),
                          defensive=defensive)

    def check_mean(m, defensive, seed, second, fourth):
        iw = draws(m, k, defensive, seed)
        mean = float((torch.exp(2 * (iw.value - m.log_px)) * k / iw.ess).mean())
        se = math.sqrt((fourth - second**2) / (k * points))
        assert abs(mean - second) < crit * se, (mean, second, se)

    weak = _correlated_model(0.2)
    cov = torch.diag(torch.exp(weak.lam[0, 2:]))
    check_mean(weak, 0.0, 1, _weight_moment(weak.prec, cov, 2),
               _weight_moment(weak.prec, cov, 4))

    strong = _correlated_model(0.9)
    ratio = [float((kk / draws(strong, kk, 0.0, 2).ess).median()) for kk in (100, k)]
    assert ratio[1] > 5 * ratio[0], ratio
    check_mean(strong, 0.2, 3, math.exp(_log_box_moment(strong, 40.0, defensive=0.2)),
               math.exp(_log_box_moment(strong, 40.0, defensive=0.2, power=4)))


@torch.no_grad()
def test_defensive_weights_are_bounded_by_the_likelihood_over_alpha():
    """r ≥ (α/4) p(z) gives log w ≤ log p(x | z) + log(4/α) at every z, whatever q and the
    posterior. Checked on a grid of half-width 40 around μ at ρ = 0.9, where q*'s own weights
    exceed that bound by hundreds of nats; far from μ (where r ≈ (α/4) p) the bound is reached.
    The second moment under the mixture is finite there: the grid integrals of half-width 10,
    20 and 40 agree to 1e-9."""
    m, alpha, h = _correlated_model(0.9), 0.2, 0.1
    grid = torch.arange(-40.0, 40.0 + h / 2, h, dtype=DTYPE)
    mu, sd = m.lam[0, :2], torch.exp(0.5 * m.lam[0, 2:])
    z = torch.stack(torch.meshgrid(grid, grid, indexing="ij"), -1).reshape(-1, 1, 1, 2) + mu
    x, lam = m.x.unsqueeze(0), m.lam.unsqueeze(0)
    lik = m.decoder.log_likelihood(x, z)
    mixture = log_weights(m.decoder, x, lam, z, defensive=alpha,
                          component=torch.full(z.shape[:-1], PRIOR))
    slack = lik + math.log(4 / alpha) - mixture
    assert float(slack.min()) > -1e-9 and float(slack.min()) < 1e-6
    plain = log_weights(m.decoder, x, lam, (z - mu) / sd)
    assert float((plain - lik).max()) > math.log(4 / alpha) + 100
    boxes = [_log_box_moment(m, half, defensive=alpha) for half in (10.0, 20.0, 40.0)]
    assert boxes[1] == pytest.approx(boxes[0], abs=1e-9)
    assert boxes[2] == pytest.approx(boxes[0], abs=1e-9)


def _two_member_linear_decoder(m) -> GaussianDecoder:
    """Member 0: the fixture's model; member 1: another linear-Gaussian model."""
    g = torch.Generator().manual_seed(21)
    W = torch.stack([m.W, torch.randn(m.D, m.H, generator=g, dtype=DTYPE)])
    b = torch.stack([m.b, torch.randn(m.D, generator=g, dtype=DTYPE)])
    psi = torch.stack([m.psi, 0.2 + torch.rand(m.D, generator=g, dtype=DTYPE)])
    decoder = GaussianDecoder(m.D, m.H, members=2, mean="linear", variance="learned").to(DTYPE)
    decoder.set_linear_parameters(W, b, psi)
    return decoder


def test_members_of_a_stacked_decoder_are_computed_independently(linear_model):
    """A two-member decoder: ELBO estimates, their gradients and the IWAE of each member equal
    those of the member alone (same per-member noise streams)."""
    m = linear_model
    both = _two_member_linear_decoder(m)
    g = torch.Generator().manual_seed(22)
    x = torch.stack([m.x, torch.randn(m.B, m.D, generator=g, dtype=DTYPE)])
    lam = torch.stack([m.lam, 0.3 * torch.randn(m.B, 2 * m.H, generator=g, dtype=DTYPE)])
    seeds = [4, 9]
    eps = MemberRandom.from_seeds(seeds, "elbo").randn((M, m.B, m.H), 1, dtype=DTYPE)
    lam_both = lam.clone().requires_grad_(True)
    est = elbo(both, x, lam_both, eps, estimator="score", baseline="loo")
    g_lam, g_theta = torch.autograd.grad(est.surrogate.sum(), [lam_both, both.params.flat])
    iw = iwae_bound(both, x, lam, 50, MemberRandom.from_seeds(seeds, "iwae"), defensive=0.2)
    for k in range(2):
        alone = GaussianDecoder(m.D, m.H, mean="linear", variance="learned").to(DTYPE)
        with torch.no_grad():
            alone.params.flat.copy_(both.params.flat[k:k + 1])
        eps_k = MemberRandom.from_seeds([seeds[k]], "elbo").randn((M, m.B, m.H), 1,
                                                                  dtype=DTYPE)
        torch.testing.assert_close(eps_k[:, 0], eps[:, k], rtol=0, atol=0)
        lam_k = lam[k:k + 1].clone().requires_grad_(True)
        est_k = elbo(alone, x[k:k + 1], lam_k, eps_k, estimator="score", baseline="loo")
        gl, gt = torch.autograd.grad(est_k.surrogate.sum(), [lam_k, alone.params.flat])
        torch.testing.assert_close(est.surrogate[k:k + 1], est_k.surrogate, rtol=1e-13,
                                   atol=1e-13)
        torch.testing.assert_close(g_lam[k:k + 1], gl, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(g_theta[k:k + 1], gt, rtol=1e-12, atol=1e-12)
        iw_k = iwae_bound(alone, x[k:k + 1], lam[k:k + 1], 50,
                          MemberRandom.from_seeds([seeds[k]], "iwae"), defensive=0.2)
        torch.testing.assert_close(iw.value[k:k + 1], iw_k.value, rtol=1e-12, atol=1e-12)


def test_bad_arguments_raise(linear_model):
    m = linear_model
    eps = torch.zeros(M, 1, m.B, m.H, dtype=DTYPE)
    with pytest.raises(ValueError, match="unknown kl mode 'exact'; valid: analytic, mc"):
        elbo(m.decoder, m.x1, m.lam1, eps, kl="exact")
    with pytest.raises(ValueError, match="the same leading axes"):
        elbo(m.decoder, m.x1[:, :2], m.lam1, eps)
    with pytest.raises(ValueError, match="noise must have shape"):
        elbo(m.decoder, m.x1, m.lam1, torch.zeros(M, 1, m.B, m.H + 1, dtype=DTYPE))
    with pytest.raises(ValueError, match="noise must have shape"):
        elbo(m.decoder, m.x1, m.lam1, torch.zeros(M, m.B, m.H, dtype=DTYPE))  # no member axis
    with pytest.raises(ValueError, match="unknown estimator"):
        elbo(m.decoder, m.x1, m.lam1, eps, estimator="pathwise")
    with pytest.raises(ValueError, match=r"decoder expects z \[\.\.\., K=1"):
        elbo(m.decoder, m.x.expand(2, -1, -1), m.lam.expand(2, -1, -1),
             torch.zeros(M, 2, m.B, m.H, dtype=DTYPE))  # two members for a one-member decoder
    random = member_random(0)
    with pytest.raises(ValueError, match=r"k must be positive and defensive in \[0, 1\)"):
        iwae_bound(m.decoder, m.x1, m.lam1, 0, random)
    with pytest.raises(ValueError, match=r"k must be positive and defensive in \[0, 1\)"):
        iwae_bound(m.decoder, m.x1, m.lam1, 10, random, defensive=1.0)
    with pytest.raises(ValueError, match=r"iwae_bound expects lam \[K, B, 2H\]"):
        iwae_bound(m.decoder, m.x, m.lam, 10, random)


@pytest.mark.slow
def test_estimators_agree_on_a_nonlinear_decoder():
    """Beyond closed forms: on an MLP decoder with heteroscedastic variance (no exact ELBO), every
    estimator's mean λ-gradient equals that of ``reparam`` with the analytic KL, by a two-sample
    z-test (independent noise, SE² = SE_a² + SE_b²), Bonferroni over all configurations and
    coordinates."""
    d, h, b, r = 5, 2, 2, 40_000
    decoder = GaussianDecoder(d, h, mean="mlp", variance="heteroscedastic", hidden=(16,),
                              var_floor=1e-2,
                              generators=[stream_generator(0, "init")]).to(DTYPE)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(b, d, generator=g, dtype=DTYPE)
    lam = 0.5 * torch.randn(b, 2 * h, generator=g, dtype=DTYPE)

    def draws(estimator, baseline, kl):
        lam_r = lam.repeat(r, 1).unsqueeze(0).requires_grad_(True)
        eps = draw_noise(M, (1, r * b), h, generator=g, dtype=DTYPE)
        est = elbo(decoder, x.repeat(r, 1).unsqueeze(0), lam_r, eps, estimator=estimator,
                   baseline=baseline, kl=kl,
                   baseline_value=MEAN_BASELINE if baseline == "mean" else None)
        (grads,) = torch.autograd.grad(est.surrogate.sum(), lam_r)
        return grads.reshape(r, -1)

    ref = draws("reparam", "none", "analytic")
    ref_mean, ref_var = ref.mean(0), ref.var(0) / r
    configs = [(e, bl, kl) for kl in KL_MODES for e, bl in UNBIASED][1:]
    crit = bonferroni_crit(len(configs) * ref.shape[1])
    for estimator, baseline, kl in configs:
        other = draws(estimator, baseline, kl)
        z = (other.mean(0) - ref_mean) / torch.sqrt(other.var(0) / r + ref_var)
        assert bool((z.abs() <= crit).all()), (estimator, baseline, kl, z)
