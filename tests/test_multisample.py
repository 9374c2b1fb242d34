"""The importance-weighted objective and its gradient estimators (``vi.estimators``,
``vi.objectives.iwae``) on linear-Gaussian models.

∇_λ L_k has no closed form for k >= 2. Two references stand in for it:

* one latent dimension, k = 2: the expectation of any estimator is a two-dimensional integral
  over (ε₁, ε₂) ~ N(0, I₂), computed by a tensor-product Gauss–Hermite rule (240² nodes, whose
  result agrees with 160² nodes to 1e-12 here). Its value for ``reparam`` is ∇_λ L_2 itself (the
  pathwise derivative of the quadrature of L̂), so the estimators' exact expectations are compared
  with the exact gradient, and their Monte Carlo means are z-tested against it;
* two latent dimensions, k = 8: a large-sample ``reparam`` mean, compared with each estimator's
  mean by a two-sample z-test (SE² = SE_a² + SE_b²), Bonferroni-corrected over coordinates.

STL is biased for k >= 2 (Tucker et al. 2019): those tests must detect its bias and must not at
k = 1, where every estimator is its ELBO form, bit for bit.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from conftest import DTYPE, assert_unbiased, bonferroni_crit, member_random

from vi import families, gradstats, linear_gaussian
from vi.decoders import GaussianDecoder
from vi.estimators import (
    ESTIMATORS,
    _vimco,
    configurations,
    draw_noise,
    estimate,
    validate_estimator,
)
from vi.inference import MethodSettings, build_method
from vi.objectives import elbo, iwae

IWAE = configurations(objective="iwae")
IWAE_UNBIASED = configurations(objective="iwae", unbiased=True)
IWAE_BIASED = [c for c in IWAE if c not in IWAE_UNBIASED]
MEAN_BASELINE = -3.0

# ------------------------------------------------------------------ the one-dimensional model
# z ~ N(0, 1), x | z ~ N(a z + c, diag s²), D = 2; q = N(μ, σ²) wider than the posterior
# N(0.62, 0.16) and off its mean, so every gradient is far from zero
A1 = torch.tensor([1.5, -0.8], dtype=DTYPE)
C1 = torch.tensor([0.1, 0.2], dtype=DTYPE)
S1 = torch.tensor([0.5, 0.8], dtype=DTYPE)
X1 = torch.tensor([1.3, -0.1], dtype=DTYPE)
LAM1 = torch.tensor([0.3, -1.0], dtype=DTYPE)
QUAD_NODES = 240


def log_weight_1d(a: torch.Tensor, c: torch.Tensor):
    """log w(z) = log N(x; a z + c, s²) + log N(z; 0, 1) − log q(z; λ_f), θ = (a, c)."""

    def f(z, lam_f):
        mean = a * z + c  # z [S, R, 1] against a, c [R, D]
        log_lik = -0.5 * ((X1 - mean) ** 2 / S1 + torch.log(2 * math.pi * S1)).sum(-1)
        return log_lik + families.standard_log_prob(z) - families.log_prob(lam_f, z)

    return f


def copy_grads(estimator, baseline, eps, k, lam0=LAM1, theta=False, objective="iwae"):
    """Per-copy gradients: row r of λ [R, 2] (and of θ, with ``theta``) is copy r, so
    ∇ Σ_r surrogate_r holds R independent estimates. Returns (∇λ [R, 2], ∇θ [R, 4] or None,
    the surrogate's values [R])."""
    r = eps.shape[1]
    lam = lam0.expand(r, 2).clone().requires_grad_()
    a = A1.expand(r, 2).clone().requires_grad_(theta)
    c = C1.expand(r, 2).clone().requires_grad_(theta)
    est = estimate(log_weight_1d(a, c), lam, eps, estimator=estimator, baseline=baseline,
                   baseline_value=MEAN_BASELINE if baseline == "mean" else None,
                   objective=objective, k=k)
    wrt = [lam, a, c] if theta else [lam]
    grads = torch.autograd.grad(est.surrogate.sum(), wrt)
    g_theta = torch.cat(grads[1:], 1) if theta else None
    return grads[0], g_theta, est.surrogate.detach()


def quadrature(estimator, baseline, k=2):
    """The exact expectation of an estimator's λ-gradient and of its value, E over
    (ε_1..ε_k) ~ N(0, I_k), by a tensor-product Gauss–Hermite rule (k <= 2)."""
    nodes, weights = np.polynomial.hermite_e.hermegauss(QUAD_NODES)
    nodes = torch.tensor(nodes, dtype=DTYPE)
    weights = torch.tensor(weights / math.sqrt(2 * math.pi), dtype=DTYPE)
    grid = torch.meshgrid(*([nodes] * k), indexing="ij")
    w = math.prod(torch.meshgrid(*([weights] * k), indexing="ij")).reshape(-1)
    eps = torch.stack([e.reshape(-1) for e in grid]).unsqueeze(-1)  # [k, N, 1]
    g, _, value = copy_grads(estimator, baseline, eps, k)
    return (g * w[:, None]).sum(0), (value * w).sum()


def two_sample_z(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(mean_a − mean_b) / √(SE_a² + SE_b²) per coordinate, for independent draws [R, P]."""
    se2 = a.var(0) / a.shape[0] + b.var(0) / b.shape[0]
    return (a.mean(0) - b.mean(0)) / se2.sqrt()


# ------------------------------------------------------------------------- registry and checks


def test_registry_declares_the_iwae_support():
    """The IWAE estimators of the study are declared, with what each accepts; ``stl`` is the
    one declared biased, ``score``'s ``loo`` is VIMCO, and ``cv`` is refused with k >= 2."""
    assert set(IWAE) == {("reparam", "none"), ("stl", "none"), ("dreg", "none"),
                         ("score", "none"), ("score", "mean"), ("score", "loo")}
    assert IWAE_BIASED == [("stl", "none")]
    for entry in ESTIMATORS.values():
        assert entry.objectives == (("elbo", "iwae") if entry.iwae else ("elbo",))
        assert entry.support(1).baselines == entry.baselines
    with pytest.raises(ValueError, match=r"iwae objective .* accepts the baselines none, mean, "
                                         r"loo; got 'cv'"):
        validate_estimator("score", "cv", 1, objective="iwae", k=4)
    validate_estimator("score", "cv", 2, objective="iwae", k=1)  # k = 1: the ELBO's
    with pytest.raises(ValueError, match="needs n_mc >= 2"):
        validate_estimator("score", "loo", 1, objective="iwae", k=1)
    validate_estimator("score", "loo", 1, objective="iwae", k=2)
    with pytest.raises(ValueError, match="the elbo takes k = 1, got k = 5"):
        validate_estimator("reparam", objective="elbo", k=5)
    with pytest.raises(ValueError, match="unknown objective 'renyi'; valid: elbo, iwae"):
        validate_estimator("reparam", objective="renyi")
    with pytest.raises(ValueError, match="positive integer"):
        validate_estimator("reparam", objective="iwae", k=0)
    with pytest.raises(ValueError, match="groups of k = 3"):
        estimate(log_weight_1d(A1, C1), LAM1, torch.zeros(4, 1, dtype=DTYPE),
                 objective="iwae", k=3)


def test_an_elbo_only_estimator_is_refused_for_the_iwae():
    """An estimator registered without IWAE support is refused with k >= 2, naming the valid
    ones, and still serves the IWAE at k = 1 (the ELBO) without receiving ``k``."""
    from vi import estimators

    def plain(f, lam, eps, baseline="none", baseline_value=None):
        return estimators.reparam(f, lam, eps, baseline, baseline_value)

    estimators.ESTIMATORS["plain"] = estimators.Estimator(plain, {"none": 1},
                                                          drops_direct=False,
                                                          higher_order=True)
    try:
        with pytest.raises(ValueError, match="'plain' does not estimate the iwae objective "
                                             "with k >= 2; valid: reparam, stl, score, dreg"):
            validate_estimator("plain", objective="iwae", k=2)
        eps = draw_noise(3, (5,), 1, generator=torch.Generator().manual_seed(0), dtype=DTYPE)
        g, _, _ = copy_grads("plain", "none", eps, 1)
        g_ref, _, _ = copy_grads("reparam", "none", eps, 1)
        assert torch.equal(g, g_ref)
    finally:
        del estimators.ESTIMATORS["plain"]


def test_method_settings_refuse_impossible_objectives():
    """One readable message per impossible (objective, k, KL mode, estimator) combination,
    before anything runs; SA-VAE differentiates its refinement's gradients, which the IWAE
    (whose log-weight depends on λ directly) allows for ``reparam`` only."""
    ok = MethodSettings(objective="iwae", k=5, kl="mc", estimator="dreg")
    ok.validate()
    assert ok.heldout_settings().objective == "elbo" and ok.heldout_settings().k == 1
    for bad, message in [
        (dict(objective="iwae", k=5), "needs kl='mc'; got kl='analytic'"),
        (dict(objective="elbo", k=5), "the elbo takes k = 1"),
        (dict(objective="iwae", k=5, kl="mc", estimator="score", baseline="cv"),
         "accepts the baselines none, mean, loo; got 'cv'"),
        (dict(objective="iwae", k=5, kl="mc", estimator="dreg", name="sa_vae"),
         "'dreg' with kl='mc' drops the direct term"),
    ]:
        with pytest.raises(ValueError, match=message):
            MethodSettings(**bad).validate()
    MethodSettings(objective="iwae", k=5, kl="mc", name="sa_vae").validate()


def test_vimco_baseline_matches_its_definition():
    """b_i = log (1/k) (Σ_{j≠i} exp f_j + exp mean_{j≠i} f_j), computed without cancellation
    when one weight dominates (here f_0 = 50)."""
    g = torch.Generator().manual_seed(3)
    values = torch.randn(3, 6, 2, generator=g, dtype=DTYPE)
    values[0, 0, 0] = 50.0
    k = values.shape[1]
    expected = torch.empty_like(values)
    for i in range(k):
        others = torch.cat([values[:, :i], values[:, i + 1:]], 1)
        swapped = torch.cat([others, others.mean(1, keepdim=True)], 1)
        expected[:, i] = torch.logsumexp(swapped, 1) - math.log(k)
    torch.testing.assert_close(_vimco(values), expected, rtol=1e-13, atol=1e-13)


# ------------------------------------------------------------------------------- k = 1


@pytest.mark.parametrize(("estimator", "baseline"), configurations())
def test_k1_is_the_elbo_bit_for_bit(estimator, baseline, linear_model):
    """IWAE with k = 1 is the ELBO with the MC KL: value, λ- and θ-gradients identical for
    every estimator and baseline the ELBO accepts."""
    lm = linear_model
    eps = draw_noise(4, (1, lm.B), lm.H, generator=torch.Generator().manual_seed(5),
                     dtype=DTYPE)
    bval = torch.tensor([[MEAN_BASELINE]], dtype=DTYPE) if baseline == "mean" else None
    out = []
    for objective in ("elbo", "iwae"):
        lam = lm.lam1.clone().requires_grad_()
        kw = dict(estimator=estimator, baseline=baseline, baseline_value=bval)
        est = (elbo(lm.decoder, lm.x1, lam, eps, kl="mc", **kw) if objective == "elbo"
               else iwae(lm.decoder, lm.x1, lam, eps, 1, **kw))
        grads = torch.autograd.grad(est.surrogate.sum(), [lam, lm.decoder.params.flat])
        out.append((est.surrogate.detach(), est.samples, *grads))
    for a, b in zip(*out, strict=True):
        assert torch.equal(a, b)


def test_dreg_at_k1_is_stl_and_unbiased_for_the_elbo(linear_model, generator):
    """DReG's weights are 1 at k = 1: it is STL, unbiased for the ELBO gradient (closed
    form)."""
    lm = linear_model
    r = 20_000
    x = lm.x1[:, :1].expand(1, r, lm.D)
    lam0 = lm.lam1[:, :1].expand(1, r, 2 * lm.H)
    eps = draw_noise(1, (1, r), lm.H, generator=generator, dtype=DTYPE)
    grads = {}
    for name in ("dreg", "stl"):
        lam = lam0.clone().requires_grad_()
        est = iwae(lm.decoder, x, lam, eps, 1, estimator=name)
        grads[name] = torch.autograd.grad(est.surrogate.sum(), lam)[0][0]
    assert torch.equal(grads["dreg"], grads["stl"])
    lam = lm.lam[:1].clone().requires_grad_()
    exact = torch.autograd.grad(
        linear_gaussian.elbo_closed_form(lm.x[:1], lam, lm.W, lm.b, lm.psi).sum(), lam)[0]
    assert_unbiased(grads["dreg"], exact[0])


def test_training_with_k1_iwae_is_training_on_the_mc_elbo(linear_model):
    """A method's step with ``objective="iwae"``, k = 1 is the step with the MC-KL ELBO, bit
    for bit (the objective reaches the training step through the one estimate function)."""
    lm = linear_model
    states = []
    for objective in ("elbo", "iwae"):
        for name in ("amortized", "vem"):
            decoder = GaussianDecoder(lm.D, lm.H, mean="linear", variance="learned").to(DTYPE)
            decoder.set_linear_parameters(lm.W, lm.b, lm.psi)
            s = MethodSettings(name=name, kl="mc", n_mc=2, objective=objective, k=1,
                               encoder_hidden=(8,))
            method = build_method(decoder, [s], n_train=lm.B).to(DTYPE)
            idx = torch.arange(lm.B).unsqueeze(0)
            active = torch.ones(1, dtype=torch.bool)
            rec = method.train_step(lm.x1, idx, member_random(1), active)
            states.append((rec, *[v.clone() for v in method.state_dict().values()]))
    for a, b in zip(states[:2], states[2:], strict=True):
        for u, v in zip(a, b, strict=True):
            assert torch.equal(u, v)


# ------------------------------------------------------------------------------- k >= 2


def test_quadrature_expectations_k2():
    """Exact expectations (k = 2, one latent dimension): every estimator declared unbiased
    has E[ĝ] = ∇_λ L_2 to quadrature accuracy; STL's expectation is off by a bias far above it
    (and at k = 1 STL's expectation is the ELBO's gradient)."""
    target, value = quadrature("reparam", "none")
    for estimator, baseline in IWAE_UNBIASED:
        g, v = quadrature(estimator, baseline)
        torch.testing.assert_close(v, value, rtol=0, atol=1e-12)
        torch.testing.assert_close(g, target, rtol=0, atol=1e-9)
    stl, _ = quadrature("stl", "none")
    bias = stl - target
    assert float(bias.abs().max()) > 0.05
    # L_2 exceeds the ELBO (Burda et al.), and at k = 1 STL is unbiased
    lam = LAM1.clone().requires_grad_()
    closed = linear_gaussian.elbo_closed_form(X1, lam, A1.unsqueeze(-1), C1, S1)
    (exact,) = torch.autograd.grad(closed, lam)
    nodes, weights = np.polynomial.hermite_e.hermegauss(QUAD_NODES)
    w = torch.tensor(weights / math.sqrt(2 * math.pi), dtype=DTYPE)
    g1, _, v1 = copy_grads("stl", "none", torch.tensor(nodes, dtype=DTYPE).reshape(1, -1, 1), 1)
    torch.testing.assert_close((g1 * w[:, None]).sum(0), exact, rtol=0, atol=1e-10)
    assert float(value) > float((v1 * w).sum()) + 1e-3


@pytest.mark.parametrize(("estimator", "baseline"), IWAE)
def test_monte_carlo_k2_against_the_exact_gradient(estimator, baseline, generator):
    """Monte Carlo means of 40,000 draws (k = 2) z-tested against ∇_λ L_2 by quadrature:
    unbiased estimators pass, STL is detected as biased."""
    target, _ = quadrature("reparam", "none")
    eps = draw_noise(2, (40_000,), 1, generator=generator, dtype=DTYPE)
    g, _, _ = copy_grads(estimator, baseline, eps, 2)
    if ESTIMATORS[estimator].support(2).biased:
        with pytest.raises(AssertionError, match="biased"):
            assert_unbiased(g, target)
    else:
        assert_unbiased(g, target)


def _lg_grads(lm, estimator, baseline, k, r, generator):
    """Per-copy λ-gradients [r, B·2H] of the IWAE on the linear model (R copies of its B
    points)."""
    x = lm.x1.repeat(1, r, 1)
    lam = lm.lam1.repeat(1, r, 1).clone().requires_grad_()
    eps = draw_noise(k, (1, r * lm.B), lm.H, generator=generator, dtype=DTYPE)
    bval = torch.tensor([[MEAN_BASELINE]], dtype=DTYPE) if baseline == "mean" else None
    est = iwae(lm.decoder, x, lam, eps, k, estimator=estimator, baseline=baseline,
               baseline_value=bval)
    (g,) = torch.autograd.grad(est.surrogate.sum(), lam)
    return g.reshape(r, -1)


def test_dreg_vimco_and_score_agree_with_reparam_k8(linear_model, generator):
    """k = 8 on the two-dimensional linear model (3 points, 12 coordinates): each unbiased
    estimator's mean agrees with a large-sample reparam mean (two-sample z-tests,
    Bonferroni over coordinates and estimators); STL's differs."""
    lm, k = linear_model, 8
    reference = _lg_grads(lm, "reparam", "none", k, 100_000, generator)
    crit = bonferroni_crit(reference.shape[1] * len(IWAE))
    for estimator, baseline in IWAE:
        if (estimator, baseline) == ("reparam", "none"):
            continue
        r = 40_000 if estimator == "score" else 20_000
        z = two_sample_z(_lg_grads(lm, estimator, baseline, k, r, generator), reference)
        if ESTIMATORS[estimator].support(k).biased:
            assert float(z.abs().max()) > crit, f"{estimator}: bias not detected, z = {z}"
        else:
            assert float(z.abs().max()) <= crit, f"{estimator}+{baseline}: z = {z}"


def test_theta_gradient_is_the_iwae_gradient_for_every_estimator(generator):
    """The decoder's gradient is Σ_i w̃_i ∇_θ log p_θ(x, z_i) at the sampled z for every
    estimator, draw by draw (DReG changes only λ's; the score estimator's two evaluations
    cancel in θ)."""
    eps = draw_noise(8, (50,), 1, generator=generator, dtype=DTYPE)
    _, ref, _ = copy_grads("reparam", "none", eps, 4, theta=True)
    for estimator, baseline in IWAE:
        _, g, _ = copy_grads(estimator, baseline, eps, 4, theta=True)
        torch.testing.assert_close(g, ref, rtol=1e-12, atol=1e-12)


def test_training_with_the_iwae_runs_every_estimator(linear_model):
    """One training step per method and IWAE estimator moves the parameters and returns the
    groups' IWAE estimates, which exceed the ELBO's on the same model in the mean."""
    lm = linear_model
    for name in ("amortized", "vem", "semi_amortized"):
        for estimator, baseline in IWAE:
            decoder = GaussianDecoder(lm.D, lm.H, mean="linear", variance="learned").to(DTYPE)
            decoder.set_linear_parameters(lm.W, lm.b, lm.psi)
            s = MethodSettings(name=name, kl="mc", n_mc=2, objective="iwae", k=4,
                               estimator=estimator, baseline=baseline, encoder_hidden=(8,),
                               refine_steps=1)
            method = build_method(decoder, [s], n_train=lm.B).to(DTYPE)
            before = decoder.params.flat.detach().clone()
            rec = method.train_step(lm.x1, torch.arange(lm.B).unsqueeze(0), member_random(2),
                                    torch.ones(1, dtype=torch.bool))
            assert rec.shape == (1, lm.B) and bool(torch.isfinite(rec).all())
            assert not torch.equal(before, decoder.params.flat.detach())


def test_settings_replace_keeps_objective_in_shared_fields():
    """Members of an ensemble must agree on the objective and k (they are not step sizes)."""
    s = MethodSettings(objective="iwae", k=4, kl="mc")
    assert s.shared()["objective"] == "iwae" and s.shared()["k"] == 4
    assert dataclasses.replace(s, lr=0.1).shared() == s.shared()


# ------------------------------------------------------------------- gradient statistics in k


@pytest.mark.parametrize("name", ["amortized", "vem", "semi_amortized"])
def test_batched_iwae_gradients_match_the_loop(name, linear_model):
    """``per_sample_grads`` (one backward over copies, vmap over the decoder's grad, the
    encoder's chain rule) gives the loop reference's numbers for every IWAE estimator."""
    lm = linear_model
    decoder = GaussianDecoder(lm.D, lm.H, mean="linear", variance="learned").to(DTYPE)
    decoder.set_linear_parameters(lm.W, lm.b, lm.psi)
    method = build_method(decoder, [MethodSettings(name=name, kl="mc", encoder_hidden=(8,),
                                                   refine_steps=1)], n_train=lm.B).to(DTYPE)
    idx = torch.arange(lm.B).unsqueeze(0)
    if method.has_local_table:
        method.local.copy_(lm.lam1)
    noise = member_random(4).randn((3, 2 * 4, lm.B, lm.H), 2, dtype=DTYPE)
    refined = lm.lam1 + 0.1 if method.refines_in_training else None
    for estimator, baseline in IWAE:
        s = MethodSettings(name=name, kl="mc", objective="iwae", k=4, estimator=estimator,
                           baseline=baseline, encoder_hidden=(8,), refine_steps=1)
        bval = torch.tensor([[MEAN_BASELINE]], dtype=DTYPE)
        fast = gradstats.per_sample_grads(method, lm.x1, idx, noise=noise, settings=s,
                                          baseline_value=bval, refined=refined)
        slow = gradstats.per_sample_grads_loop(method, lm.x1, idx, noise, settings=s,
                                               baseline_value=bval, refined=refined)
        for group in fast:
            torch.testing.assert_close(fast[group], slow[group], rtol=1e-10, atol=1e-10)


def test_k_sweep_rows(linear_model):
    """Rows per (estimator, baseline, k, group, metric) with the skipped cells absent: VIMCO
    (score+loo) needs k >= 2 at M = 1; k = 1 is the MC-KL ELBO for every estimator, so all
    pathwise estimators have the same statistics there (DReG = STL, and = reparam for θ)."""
    lm = linear_model
    decoder = GaussianDecoder(lm.D, lm.H, mean="linear", variance="learned").to(DTYPE)
    decoder.set_linear_parameters(lm.W, lm.b, lm.psi)
    method = build_method(decoder, [MethodSettings(name="vem")], n_train=lm.B).to(DTYPE)
    method.local.copy_(lm.lam1)
    rows = gradstats.k_sweep(method, lm.x1, torch.arange(lm.B).unsqueeze(0), ks=(1, 4),
                             n_mc=1, draws=50, random=member_random(6))
    cells = {(r["estimator"], r["baseline"], r["k"]) for r in rows}
    assert ("score", "loo", 1) not in cells and ("score", "loo", 4) in cells
    assert {(e, b) for e, b, _ in cells} == set(gradstats.IWAE_SWEEP_ESTIMATORS)
    value = {(r["estimator"], r["k"], r["param_group"], r["metric"]): r["value"] for r in rows
             if r["baseline"] == "none"}
    for group in ("variational", "decoder"):
        assert value[("dreg", 1, group, "grad_snr_mean")] == value[("stl", 1, group,
                                                                     "grad_snr_mean")]
    assert value[("dreg", 4, "decoder", "grad_var_total")] == pytest.approx(
        value[("reparam", 4, "decoder", "grad_var_total")], rel=1e-10)
    with pytest.raises(ValueError, match="draws >= 2"):
        gradstats.k_sweep(method, lm.x1, torch.arange(lm.B).unsqueeze(0), draws=1,
                          random=member_random(6))
