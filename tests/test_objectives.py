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

import pytest
import torch
from conftest import DTYPE, assert_unbiased, bonferroni_crit, member_random
from torch import nn
from torch.distributions import Normal
from torch.func import functional_call, grad, vmap

from vi import linear_gaussian
from vi.decoders import GaussianDecoder
from vi.estimators import configurations, draw_noise
from vi.objectives import KL_MODES, elbo, iwae_bound, log_weights
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


def test_defensive_proposal_is_the_stated_mixture(linear_model):
    """k = 10, α = 0.2: the first 8 samples come from q(μ, σ), the last 2 from q(μ, 2σ), and
    every weight is p(x, z)/r(z) with r = 0.8 q(μ, σ) + 0.2 q(μ, 2σ); the estimate is the log of
    their mean, ESS (Σ w)²/Σ w² and SE √(1/ESS − 1/k)."""
    m, k = linear_model, 10
    iw = _iwae(m, m.x1, m.lam1, k, 6, defensive=0.2)
    eps = member_random(6, key="iwae").randn((k, m.B, m.H), 1, dtype=DTYPE)
    mu, logvar = m.lam1[..., :m.H], m.lam1[..., m.H:]
    scale = torch.tensor([1.0] * 8 + [2.0] * 2, dtype=DTYPE).reshape(k, 1, 1, 1)
    z = mu + scale * torch.exp(0.5 * logvar) * eps
    narrow = Normal(mu, torch.exp(0.5 * logvar)).log_prob(z).sum(-1)
    wide = Normal(mu, 2 * torch.exp(0.5 * logvar)).log_prob(z).sum(-1)
    log_r = torch.logaddexp(math.log(0.8) + narrow, math.log(0.2) + wide)
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


def test_defensive_iwae_is_unbiased_for_p_x_where_the_plain_one_has_infinite_variance(
        linear_model):
    """With the KL-optimal λ* as proposal the plain weights have infinite variance here (see
    the test above); the defensive mixture bounds them, and (1/k) Σ w stays unbiased for p(x):
    E[exp(IWAE_k − log p(x))] = 1 per point, by a Bonferroni z-test over R replications."""
    m, r, k = linear_model, 20_000, 4
    x_r, lam_r = m.x.repeat(r, 1).unsqueeze(0), m.lam_opt.repeat(r, 1).unsqueeze(0)
    log_px = linear_gaussian.exact_log_marginal(m.x, m.W, m.b, m.psi)
    iw = _iwae(m, x_r, lam_r, k, 7, defensive=0.3)
    ratio = torch.exp(iw.value.reshape(r, m.B) - log_px)
    assert_unbiased(ratio, torch.ones(m.B, dtype=DTYPE))
    # and the bound (Jensen) stays below log p(x) on average
    assert bool((iw.value.reshape(r, m.B).mean(0) < log_px).all())


@pytest.mark.parametrize("defensive", [0.0, 0.2])
def test_iwae_chunking_does_not_change_the_value(linear_model, defensive):
    """Chunks combine exactly, and the defensive samples are the last ones whatever the chunks.
    (CPU ``randn`` fills in blocks of 16 numbers, so chunks of 8·B·H = 48 and 240·B·H numbers
    draw the same stream and hence the same samples.)"""
    m = linear_model
    vals = [_iwae(m, m.x1, m.lam1, 240, 1, chunk_size=c, defensive=defensive)
            for c in (8, 48, 240, 1000)]
    for v in vals[1:]:
        torch.testing.assert_close(v.value, vals[0].value, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(v.ess, vals[0].ess, rtol=1e-10, atol=1e-10)


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
