"""The ELBO and IWAE bound (SPEC §3, §5) on the linear-Gaussian model, whose exact ELBO
(``elbo_closed_form``) and exact log p(x) are known.

Per-copy gradients: λ is replicated R times (x too), so ∇ of the summed surrogate w.r.t. the
[R·B, 2H] tensor gives R independent λ-gradient estimates at once. For θ, which every copy
shares, ``torch.func.vmap(grad(...))`` over R independent noise tensors gives R per-copy
gradients in one batched call. Both are z-tested against autograd of the exact ELBO.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import DTYPE, assert_unbiased, bonferroni_crit
from torch import nn
from torch.func import functional_call, grad, vmap

from vi import linear_gaussian
from vi.decoders import GaussianDecoder
from vi.estimators import draw_noise
from vi.objectives import KL_MODES, elbo, iwae_bound, log_weights

CONFIGS = [
    ("reparam", "none"),
    ("stl", "none"),
    ("score", "none"),
    ("score", "mean"),
    ("score", "loo"),
    ("score", "cv"),
]
MEAN_BASELINE = -9.0  # a constant near the model's ELBO; any constant keeps `mean` unbiased
M = 4


def exact_elbo(model, lam: torch.Tensor) -> torch.Tensor:
    """The closed-form ELBO [B], differentiable in λ and in the decoder's (W, b, raw_var)."""
    W, b, psi = model.decoder.linear_parameters()
    return linear_gaussian.elbo_closed_form(model.x, lam, W, b, psi)


def test_closed_form_matches_the_decoder_parameters(linear_model):
    W, b, psi = linear_model.decoder.linear_parameters()
    torch.testing.assert_close(W, linear_model.W)
    torch.testing.assert_close(b, linear_model.b)
    torch.testing.assert_close(psi, linear_model.psi, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("kl", KL_MODES)
@pytest.mark.parametrize(("estimator", "baseline"), CONFIGS)
def test_elbo_lambda_gradient_unbiased(linear_model, estimator, baseline, kl, generator):
    """E[ĝ_λ] = ∇_λ L(λ, θ), L the exact ELBO of the linear-Gaussian model, per data point."""
    m, r = linear_model, 20_000
    lam = m.lam.clone().requires_grad_(True)
    (target,) = torch.autograd.grad(exact_elbo(m, lam).sum(), lam)

    lam_r = m.lam.repeat(r, 1).requires_grad_(True)  # [R·B, 2H], copy-major
    eps = draw_noise(M, (r * m.B,), m.H, generator=generator, dtype=DTYPE)
    est = elbo(m.decoder, m.x.repeat(r, 1), lam_r, eps, estimator=estimator, baseline=baseline,
               kl=kl, baseline_value=MEAN_BASELINE if baseline == "mean" else None)
    (grads,) = torch.autograd.grad(est.surrogate.sum(), lam_r)
    assert_unbiased(grads.reshape(r, m.B, 2 * m.H), target)


class _SummedElbo(nn.Module):
    """Σ_n of the ELBO surrogate as a module, so ``functional_call`` can swap θ in."""

    def __init__(self, decoder, x, lam, **kw):
        super().__init__()
        self.decoder, self.x, self.lam, self.kw = decoder, x, lam, kw

    def forward(self, eps):
        return elbo(self.decoder, self.x, self.lam, eps, **self.kw).surrogate.sum()


@pytest.mark.parametrize("kl", KL_MODES)
@pytest.mark.parametrize(("estimator", "baseline"), CONFIGS)
def test_elbo_theta_gradient_unbiased(linear_model, estimator, baseline, kl, generator):
    """E[ĝ_θ] = ∇_θ Σ_n L_n for θ = (W, b, raw_var) of GaussianDecoder(linear, learned)."""
    m, r = linear_model, 2_000
    module = _SummedElbo(m.decoder, m.x, m.lam, estimator=estimator, baseline=baseline, kl=kl,
                         baseline_value=MEAN_BASELINE if baseline == "mean" else None)
    params = {k: v.detach() for k, v in module.named_parameters()}
    assert set(params) == {"decoder.net.weight", "decoder.net.bias", "decoder.raw_var"}
    targets = torch.autograd.grad(exact_elbo(m, m.lam).sum(), list(module.parameters()))
    target = torch.cat([t.reshape(-1) for t in targets])

    eps = draw_noise(r, (M, m.B), m.H, generator=generator, dtype=DTYPE)  # R noise tensors
    per_copy = vmap(grad(lambda p, e: functional_call(module, p, (e,))), in_dims=(None, 0))(
        params, eps)
    draws = torch.cat([per_copy[k].reshape(r, -1) for k in params], dim=1)
    assert_unbiased(draws, target)


def test_theta_gradient_does_not_depend_on_the_estimator(linear_model, generator):
    """SPEC §3: the decoder gradient is always ∇_θ log p_θ(x | z) at the sampled z."""
    m = linear_model
    eps = draw_noise(M, (m.B,), m.H, generator=generator, dtype=DTYPE)
    params = list(m.decoder.parameters())
    ref = None
    for kl in KL_MODES:
        for estimator, baseline in CONFIGS:
            est = elbo(m.decoder, m.x, m.lam.clone().requires_grad_(True), eps,
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
    eps = draw_noise(M, (m.B,), m.H, generator=generator, dtype=DTYPE)
    est = elbo(m.decoder, m.x, m.lam.clone().requires_grad_(True), eps, estimator=estimator,
               baseline=baseline, kl="mc",
               baseline_value=MEAN_BASELINE if baseline == "mean" else None)
    lw = log_weights(m.decoder, m.x, m.lam, eps)
    torch.testing.assert_close(est.samples, lw, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(est.surrogate.detach(), lw.mean(0), rtol=1e-13, atol=1e-13)


def test_analytic_and_mc_kl_agree_in_expectation(linear_model, generator):
    """Both value estimators are unbiased for the exact ELBO, and their paired difference
    (common random numbers) has mean zero."""
    m, r = linear_model, 20_000
    eps = draw_noise(M, (r * m.B,), m.H, generator=generator, dtype=DTYPE)
    x_r, lam_r = m.x.repeat(r, 1), m.lam.repeat(r, 1)
    target = exact_elbo(m, m.lam).detach()
    values = {kl: elbo(m.decoder, x_r, lam_r, eps, kl=kl).surrogate.detach().reshape(r, m.B)
              for kl in KL_MODES}
    assert_unbiased(values["analytic"], target)
    assert_unbiased(values["mc"], target)
    assert_unbiased(values["analytic"] - values["mc"], torch.zeros_like(target))


def test_iwae_k1_is_the_single_sample_elbo(linear_model):
    """IWAE_1 with the same noise is exactly the M = 1, kl="mc" ELBO estimate."""
    m = linear_model
    iw = iwae_bound(m.decoder, m.x, m.lam, 1, generator=torch.Generator().manual_seed(3))
    eps = draw_noise(1, (m.B,), m.H, generator=torch.Generator().manual_seed(3), dtype=DTYPE)
    torch.testing.assert_close(iw, elbo(m.decoder, m.x, m.lam, eps, kl="mc").surrogate,
                               rtol=1e-13, atol=1e-13)


def test_iwae_k1_equals_elbo_in_expectation(linear_model, generator):
    m, r = linear_model, 20_000
    with torch.no_grad():
        iw = iwae_bound(m.decoder, m.x.repeat(r, 1), m.lam.repeat(r, 1), 1, generator=generator)
    assert_unbiased(iw.reshape(r, m.B), exact_elbo(m, m.lam).detach())


def test_iwae_is_nondecreasing_in_k(linear_model, generator):
    """E[IWAE_1] ≤ E[IWAE_10] ≤ E[IWAE_100] ≤ log p(x) (Burda et al., 2016, Thm 1).

    With the deliberately poor proposal used here (λ off the optimum), the increases are strict,
    so each consecutive difference of means must be positive by more than the Bonferroni bound
    times its standard error (independent draws: SE² = SE₁² + SE₂²); and no mean may exceed the
    exact log p(x) by more than that bound.
    """
    m, r = linear_model, 4_000
    x_r, lam_r = m.x.repeat(r, 1), m.lam.repeat(r, 1)
    log_px = linear_gaussian.exact_log_marginal(m.x, m.W, m.b, m.psi)
    ks = (1, 10, 100)
    with torch.no_grad():
        draws = [iwae_bound(m.decoder, x_r, lam_r, k, generator=generator).reshape(r, m.B)
                 for k in ks]
    means = [d.mean(0) for d in draws]
    ses = [d.std(0) / math.sqrt(r) for d in draws]
    crit = bonferroni_crit(2 * m.B + 3 * m.B)
    for i in range(len(ks) - 1):
        z = (means[i + 1] - means[i]) / torch.sqrt(ses[i] ** 2 + ses[i + 1] ** 2)
        assert bool((z > crit).all()), f"IWAE_{ks[i + 1]} not above IWAE_{ks[i]}: z = {z}"
    for mean, se in zip(means, ses, strict=True):
        assert bool(((mean - log_px) / se < crit).all())


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
    post_mean = linear_gaussian.exact_posterior(m.x, m.W, m.b, m.psi).mean
    q_var = torch.diagonal(cov)
    lam = torch.cat([post_mean, q_var.log().expand_as(post_mean)], dim=-1)

    a_mat = 2 * prec - torch.diag(1 / q_var)
    assert float(torch.linalg.eigvalsh(a_mat).min()) > 0
    rho = torch.sqrt(q_var.prod()) / (torch.det(cov) * torch.sqrt(torch.det(a_mat))) - 1
    assert 0 < float(rho) < 1.5
    narrow = 2 * prec - torch.diag(torch.diagonal(prec))  # λ*'s A: not positive definite
    assert float(torch.linalg.eigvalsh(narrow).min()) < 0

    with torch.no_grad():
        iw = iwae_bound(m.decoder, m.x, lam, 5000, generator=torch.Generator().manual_seed(5),
                        chunk_size=1000)
    assert bool(((iw - log_px).abs() < 0.05).all()), (iw, log_px)
    exact_gap = log_px - linear_gaussian.elbo_closed_form(m.x, lam, m.W, m.b, m.psi)
    assert bool((exact_gap > 0.1).all())  # the ELBO of this q is far off: IWAE does the work


def test_iwae_chunking_does_not_change_the_value(linear_model):
    """Chunks combine exactly. (CPU ``randn`` fills in blocks of 16 numbers, so chunks of
    8·B·H = 48 and 240·B·H numbers draw the same stream and hence the same samples.)"""
    m = linear_model
    vals = [iwae_bound(m.decoder, m.x, m.lam, 240, generator=torch.Generator().manual_seed(1),
                       chunk_size=c) for c in (8, 48, 240, 1000)]
    for v in vals[1:]:
        torch.testing.assert_close(v, vals[0], rtol=1e-12, atol=1e-12)


def test_bad_arguments_raise(linear_model):
    m = linear_model
    eps = torch.zeros(M, m.B, m.H, dtype=DTYPE)
    with pytest.raises(ValueError, match="unknown kl mode 'exact'; valid: analytic, mc"):
        elbo(m.decoder, m.x, m.lam, eps, kl="exact")
    with pytest.raises(ValueError, match="the same B"):
        elbo(m.decoder, m.x[:2], m.lam, eps)
    with pytest.raises(ValueError, match="noise must have shape"):
        elbo(m.decoder, m.x, m.lam, torch.zeros(M, m.B, m.H + 1, dtype=DTYPE))
    with pytest.raises(ValueError, match="unknown estimator"):
        elbo(m.decoder, m.x, m.lam, eps, estimator="pathwise")
    with pytest.raises(ValueError, match="k and chunk_size must be positive"):
        iwae_bound(m.decoder, m.x, m.lam, 0)


@pytest.mark.slow
def test_estimators_agree_on_a_nonlinear_decoder():
    """Beyond closed forms: on an MLP decoder with heteroscedastic variance (no exact ELBO), every
    estimator's mean λ-gradient equals that of ``reparam`` with the analytic KL, by a two-sample
    z-test (independent noise, SE² = SE_a² + SE_b²), Bonferroni over all configurations and
    coordinates."""
    torch.manual_seed(0)
    d, h, b, r = 5, 2, 2, 40_000
    decoder = GaussianDecoder(d, h, mean="mlp", variance="heteroscedastic", hidden=(16,),
                              var_floor=1e-2).to(DTYPE)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(b, d, generator=g, dtype=DTYPE)
    lam = 0.5 * torch.randn(b, 2 * h, generator=g, dtype=DTYPE)

    def draws(estimator, baseline, kl):
        lam_r = lam.repeat(r, 1).requires_grad_(True)
        eps = draw_noise(M, (r * b,), h, generator=g, dtype=DTYPE)
        est = elbo(decoder, x.repeat(r, 1), lam_r, eps, estimator=estimator, baseline=baseline,
                   kl=kl, baseline_value=MEAN_BASELINE if baseline == "mean" else None)
        (grads,) = torch.autograd.grad(est.surrogate.sum(), lam_r)
        return grads.reshape(r, -1)

    ref = draws("reparam", "none", "analytic")
    ref_mean, ref_var = ref.mean(0), ref.var(0) / r
    configs = [(e, bl, kl) for kl in KL_MODES for e, bl in CONFIGS][1:]
    crit = bonferroni_crit(len(configs) * ref.shape[1])
    for estimator, baseline, kl in configs:
        other = draws(estimator, baseline, kl)
        z = (other.mean(0) - ref_mean) / torch.sqrt(other.var(0) / r + ref_var)
        assert bool((z.abs() <= crit).all()), (estimator, baseline, kl, z)
