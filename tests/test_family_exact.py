"""The variational families (``vi.families.FAMILIES``) against exact values.

Every test is parametrised over the registry, so a new family is covered at once:

* the interface: λ's width, the prior at ``init``, ensembles batch member by member;
* densities: log q at a sample equals the change-of-variables density along the sampling path,
  exp(log q) integrates to 1 on a grid (H = 2), the score equals autograd's per-sample gradient;
* the estimators (reparam, STL, score with every baseline, DReG) are unbiased for the ELBO
  gradient of a linear-Gaussian model, against a Gauss–Hermite reference of the pathwise ELBO
  (itself checked against the closed form for the Gaussian families);
* on the linear-Gaussian model the full-covariance ELBO has a closed form that the library's
  Monte Carlo ELBO matches (z-test from its standard error), the full-covariance q* fitted per
  point reaches log p(x) (approximation gap < 0.01 nat), and the diagonal q* its closed form.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import DTYPE, assert_unbiased, bonferroni_crit, member_random

from vi import evaluation, families, linear_gaussian
from vi.data import load_dataset
from vi.decoders import GaussianDecoder
from vi.estimators import ESTIMATORS, configurations, draw_noise, estimate
from vi.inference import StoppingRule
from vi.objectives import elbo
from vi.streams import generator

FAMILIES = list(families.FAMILIES)
UNBIASED = configurations(unbiased=True)


def _lam(family: families.Family, h: int, shape: tuple[int, ...], scale: float, seed: int):
    """λ [*shape, P]: the family's prior moved by scale · N(0, 1) (a generic member)."""
    g = torch.Generator().manual_seed(seed)
    base = family.init(h, torch.zeros((), dtype=DTYPE))
    return base + scale * torch.randn(*shape, base.shape[-1], generator=g, dtype=DTYPE)


# ------------------------------------------------------------------------------ interface


@pytest.mark.parametrize("name", FAMILIES)
def test_width_prior_and_members(name):
    fam = families.get_family(name)
    h, k, b, m = 3, 2, 5, 4
    assert fam.latent_dim(torch.zeros(fam.param_dim(h))) == h
    with pytest.raises(ValueError, match="last axis"):
        fam.latent_dim(torch.zeros(fam.param_dim(h) + 1))
    g = torch.Generator().manual_seed(3)
    eps = torch.randn(m, k, b, h, generator=g, dtype=DTYPE)
    prior = fam.init(h, eps).expand(k, b, -1)
    # at init q is the prior N(0, I): z = ε and log q = log N(ε; 0, I)
    torch.testing.assert_close(fam.sample(prior, eps), eps, rtol=0, atol=1e-14)
    torch.testing.assert_close(fam.log_prob(prior, eps), families.standard_log_prob(eps),
                               rtol=0, atol=1e-12)
    kl = fam.kl_to_prior(prior)
    assert (kl is None) == (not fam.analytic_kl)
    if kl is not None:
        torch.testing.assert_close(kl, torch.zeros(k, b, dtype=DTYPE), rtol=0, atol=1e-14)
    # members batch: member j of a [K, B, P] call equals a call on member j alone
    lam = _lam(fam, h, (k, b), 0.4, 4)
    z = fam.sample(lam, eps)
    lp = fam.log_prob(lam, z)
    assert z.shape == (m, k, b, h) and lp.shape == (m, k, b)
    for j in range(k):
        torch.testing.assert_close(z[:, j], fam.sample(lam[j], eps[:, j]), rtol=0, atol=1e-14)
        torch.testing.assert_close(lp[:, j], fam.log_prob(lam[j], z[:, j]), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="unknown variational family 'gamma'"):
        families.get_family("gamma")


def test_diagonal_family_is_the_module_functions():
    fam = families.get_family("diagonal")
    lam = _lam(fam, 3, (4,), 0.5, 5)
    eps = torch.randn(6, 4, 3, generator=torch.Generator().manual_seed(6), dtype=DTYPE)
    z = families.sample(lam, eps)
    assert torch.equal(fam.sample(lam, eps), z)
    assert torch.equal(fam.log_prob(lam, z), families.log_prob(lam, z))
    assert torch.equal(fam.kl_to_prior(lam), families.kl_to_standard_normal(lam))
    assert torch.equal(fam.score(lam, eps), families.score(lam, eps))


def test_full_covariance_against_torch_distributions():
    """log q and the KL of ``full`` equal MultivariateNormal(μ, scale_tril=L)'s."""
    fam = families.get_family("full")
    h = 4
    lam = _lam(fam, h, (3,), 0.6, 7)
    mu, tril = fam.mean_and_scale_tril(lam)
    assert torch.equal(tril, tril.tril()) and bool((torch.diagonal(tril, 0, -2, -1) > 0).all())
    q = torch.distributions.MultivariateNormal(mu, scale_tril=tril)
    z = torch.randn(5, 3, h, generator=torch.Generator().manual_seed(8), dtype=DTYPE)
    torch.testing.assert_close(fam.log_prob(lam, z), q.log_prob(z), rtol=1e-12, atol=1e-12)
    p = torch.distributions.MultivariateNormal(torch.zeros(h, dtype=DTYPE),
                                               scale_tril=torch.eye(h, dtype=DTYPE))
    torch.testing.assert_close(fam.kl_to_prior(lam), torch.distributions.kl_divergence(q, p),
                               rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(families.FullCovariance.join(mu, tril), lam, rtol=1e-12,
                               atol=1e-12)


# ------------------------------------------------------------------------------- densities


@pytest.mark.parametrize("name", FAMILIES)
def test_log_prob_is_the_change_of_variables_density(name):
    """log q(r(λ, ε); λ) from ``log_prob`` (for the flow: by inverting the steps) equals the
    density carried along the sampling path, log N(ε) − log |det ∂r/∂ε|, the latter by
    autograd's Jacobian of r."""
    fam = families.get_family(name)
    h = 3
    lam = _lam(fam, h, (), 0.7, 9)
    eps = torch.randn(5, h, generator=torch.Generator().manual_seed(10), dtype=DTYPE)
    z, path = fam.sample_and_log_prob(lam.expand(5, -1), eps)
    torch.testing.assert_close(fam.log_prob(lam, z), path, rtol=0, atol=1e-10)
    for i in range(eps.shape[0]):  # five points: the Jacobian is per point
        jac = torch.autograd.functional.jacobian(lambda e: fam.sample(lam, e), eps[i])
        expected = families.standard_log_prob(eps[i]) - torch.linalg.slogdet(jac)[1]
        torch.testing.assert_close(path[i], expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("name", FAMILIES)
def test_density_integrates_to_one(name):
    """∫ exp(log q(z)) dz = 1 for H = 2 by the trapezoid rule on a 801² grid over [−10, 10]²
    (q's mass outside and the rule's error are both far below 1e-4 here)."""
    fam = families.get_family(name)
    lam = _lam(fam, 2, (), 0.5, 11)
    grid = torch.linspace(-10.0, 10.0, 801, dtype=DTYPE)
    z = torch.stack(torch.meshgrid(grid, grid, indexing="ij"), -1).reshape(-1, 2)
    dens = fam.log_prob(lam, z).exp().reshape(801, 801).numpy()
    total = np.trapezoid(np.trapezoid(dens, grid.numpy(), axis=1), grid.numpy())
    assert total == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize("name", FAMILIES)
def test_score_is_the_per_sample_gradient(name):
    fam = families.get_family(name)
    h = 2
    lam = _lam(fam, h, (3,), 0.5, 12)
    eps = torch.randn(4, 3, h, generator=torch.Generator().manual_seed(13), dtype=DTYPE)
    got = fam.score(lam, eps)
    z = fam.sample(lam, eps).detach()
    for m in range(eps.shape[0]):
        leaf = lam.clone().requires_grad_()
        (auto,) = torch.autograd.grad(fam.log_prob(leaf, z[m]).sum(), leaf)
        torch.testing.assert_close(got[m], auto, rtol=1e-10, atol=1e-10)


# ----------------------------------------------------------------------------- estimators

# a one-point linear-Gaussian model, H = 2, D = 3: x | z ~ N(W z + b, diag ψ)
_G = torch.Generator().manual_seed(14)
W_SMALL = torch.randn(3, 2, generator=_G, dtype=DTYPE)
B_SMALL = torch.randn(3, generator=_G, dtype=DTYPE)
PSI_SMALL = 0.5 + torch.rand(3, generator=_G, dtype=DTYPE)
X_SMALL = torch.randn(3, generator=_G, dtype=DTYPE)


def _log_joint(z):
    mean = z @ W_SMALL.T + B_SMALL
    loglik = -0.5 * ((X_SMALL - mean) ** 2 / PSI_SMALL + torch.log(2 * math.pi * PSI_SMALL))
    return loglik.sum(-1) + families.standard_log_prob(z)


def _quadrature_elbo(fam, lam, nodes: int = 48):
    """E_ε[log p(x, r(λ, ε)) − log q] by tensor Gauss–Hermite quadrature over ε ∈ R², the
    density carried along the sampling path (``sample_and_log_prob``, not ``log_prob``)."""
    x, w = np.polynomial.hermite_e.hermegauss(nodes)
    w = w / w.sum()
    e = torch.tensor(np.stack(np.meshgrid(x, x, indexing="ij"), -1).reshape(-1, 2), dtype=DTYPE)
    wt = torch.tensor(np.outer(w, w).reshape(-1), dtype=DTYPE)
    z, log_q = fam.sample_and_log_prob(lam.unsqueeze(-2).expand(*lam.shape[:-1], len(wt), -1),
                                       e.expand(*lam.shape[:-1], -1, -1))
    return ((_log_joint(z) - log_q) * wt).sum(-1)


@pytest.mark.parametrize("name", [n for n, f in families.FAMILIES.items() if f.gaussian])
def test_quadrature_reference_is_the_closed_form(name):
    """The Gauss–Hermite reference of the estimator tests equals the linear model's closed-form
    ELBO (value and gradient) for the Gaussian families."""
    fam = families.get_family(name)
    lam = _lam(fam, 2, (), 0.5, 15).requires_grad_()
    exact = linear_gaussian.elbo_closed_form(X_SMALL, lam, W_SMALL, B_SMALL, PSI_SMALL,
                                             family=fam)
    quad = _quadrature_elbo(fam, lam)
    torch.testing.assert_close(quad, exact, rtol=0, atol=1e-10)
    g_exact, = torch.autograd.grad(exact, lam)
    g_quad, = torch.autograd.grad(_quadrature_elbo(fam, lam), lam)
    torch.testing.assert_close(g_quad, g_exact, rtol=0, atol=1e-9)


@pytest.mark.parametrize(("estimator", "baseline"), UNBIASED)
@pytest.mark.parametrize("name", FAMILIES)
def test_estimators_unbiased_for_every_family(name, estimator, baseline):
    """E[ĝ] = ∇_λ L(λ) for the ELBO integrand log p(x, z) − log q(z; λ) (which depends on λ
    directly, so STL and the score estimators rely on E_q[∇_λ log q] = 0), from R = 20,000
    independent copies of λ, each coordinate z-tested against the quadrature reference."""
    fam = families.get_family(name)
    lam0 = _lam(fam, 2, (), 0.5, 16)
    leaf = lam0.clone().requires_grad_()
    (target,) = torch.autograd.grad(_quadrature_elbo(fam, leaf), leaf)
    r = 20_000
    m = max(4, ESTIMATORS[estimator].baselines[baseline])
    eps = draw_noise(m, (r,), 2, generator=torch.Generator().manual_seed(17), dtype=DTYPE)
    lam = lam0.expand(r, -1).clone().requires_grad_()

    def f(z, lam_f):
        return _log_joint(z) - fam.log_prob(lam_f, z)

    est = estimate(f, lam, eps, estimator=estimator, baseline=baseline,
                   baseline_value=-5.0 if baseline == "mean" else None, family=fam)
    (grads,) = torch.autograd.grad(est.surrogate.sum(), lam)
    assert_unbiased(grads, target)


def test_the_estimator_check_can_fail_for_a_family():
    """The same check rejects the flow's score estimator with a biased baseline: the mean of
    the M samples including the sample itself."""
    fam = families.get_family("flow")
    lam0 = _lam(fam, 2, (), 0.5, 16)
    leaf = lam0.clone().requires_grad_()
    (target,) = torch.autograd.grad(_quadrature_elbo(fam, leaf), leaf)
    r = 20_000
    eps = draw_noise(4, (r,), 2, generator=torch.Generator().manual_seed(17), dtype=DTYPE)
    lam = lam0.expand(r, -1).clone().requires_grad_()

    def f(z, lam_f):
        return _log_joint(z) - fam.log_prob(lam_f, z)

    with torch.no_grad():
        z = fam.sample(lam, eps)
        inclusive = f(z, lam).mean(0)
    est = estimate(f, lam, eps, estimator="score", baseline="mean", baseline_value=inclusive,
                   family=fam)
    (grads,) = torch.autograd.grad(est.surrogate.sum(), lam)
    with pytest.raises(AssertionError, match="biased"):
        assert_unbiased(grads, target)


# ------------------------------------------------------------- the linear-Gaussian model


@pytest.fixture(scope="module")
def ppca():
    """The ppca data set (D = 20, H = 4) with a float64 linear decoder at its generating
    parameters, 50 training points [1, 50, D]."""
    ds = load_dataset("ppca", seed=0)
    t = ds.ground_truth
    W, b, psi = t["W"].to(DTYPE), t["b"].to(DTYPE), t["psi"].to(DTYPE)
    decoder = GaussianDecoder(ds.data_dim, W.shape[1], mean="linear", variance="learned",
                              isotropic=True, generators=[generator(0, "init")]).to(DTYPE)
    decoder.set_linear_parameters(W, b, psi[0])
    x = ds.train.to(DTYPE)[:50]
    exact = linear_gaussian.exact_log_marginal(x, W, b, psi)
    return dict(decoder=decoder, W=W, b=b, psi=psi, x=x.unsqueeze(0), exact=exact,
                gap=float(linear_gaussian.approximation_gap(W, psi)))


@pytest.mark.parametrize("kl", ["analytic", "mc"])
def test_full_covariance_mc_elbo_matches_closed_form(ppca, kl):
    """The library's Monte Carlo ELBO of a full-covariance q (any λ, not only the optimum)
    is unbiased for the closed form: per point, |mean − exact| / SE within the Bonferroni
    bound over the 50 points."""
    fam = families.get_family("full")
    lam = linear_gaussian.optimal_full_posterior(ppca["x"], ppca["W"], ppca["b"], ppca["psi"])
    lam = lam + 0.3 * torch.randn(lam.shape, generator=torch.Generator().manual_seed(18),
                                  dtype=DTYPE)
    exact = linear_gaussian.elbo_closed_form(ppca["x"][0], lam[0], ppca["W"], ppca["b"],
                                             ppca["psi"], family=fam)
    eps = torch.randn(4000, *lam.shape[:-1], 4, generator=torch.Generator().manual_seed(19),
                      dtype=DTYPE)
    samples = elbo(ppca["decoder"], ppca["x"], lam, eps, kl=kl, family=fam).samples[:, 0]
    z = (samples.mean(0) - exact) / (samples.std(0) / math.sqrt(samples.shape[0]))
    assert float(z.abs().max()) < bonferroni_crit(z.numel()), z
    # the reporting path is the closed form itself
    value = evaluation.elbo_value(ppca["decoder"], ppca["x"], lam, n_mc=1,
                                  random=member_random(0), family="full")
    assert value.exact
    torch.testing.assert_close(value.value[0], exact)
    # at the exact posterior the closed form is log p(x)
    star = linear_gaussian.optimal_full_posterior(ppca["x"][0], ppca["W"], ppca["b"],
                                                  ppca["psi"])
    torch.testing.assert_close(
        linear_gaussian.elbo_closed_form(ppca["x"][0], star, ppca["W"], ppca["b"],
                                         ppca["psi"], family=fam), ppca["exact"])


@pytest.mark.parametrize("name", ["full", "diagonal"])
def test_fitted_qstar_per_family_on_ppca(ppca, name):
    """q* fitted per point from the prior (``fit_optimal_posterior``): the full-covariance
    family contains the posterior, so its approximation gap is < 0.01 nat on every point; the
    diagonal one reaches its closed form KL(q* ‖ p(z | x)) within 0.01 nat on average and never
    beats it."""
    fam = families.get_family(name)
    x = ppca["x"]
    init = fam.init(4, x).expand(1, x.shape[1], -1)
    fit = evaluation.fit_optimal_posterior(ppca["decoder"], x, init, n_mc=10, lr=3e-2,
                                           rule=StoppingRule(50, 3, 4000, decays=4),
                                           random=member_random(20), family=name)
    assert not bool(fit.capped.any())
    value = evaluation.elbo_value(ppca["decoder"], x, fit.lam, n_mc=1,
                                  random=member_random(0), family=name)
    gap = ppca["exact"] - value.value[0]
    assert bool((gap >= -1e-9).all())
    if name == "full":
        assert float(gap.max()) < 0.01, float(gap.max())
    else:
        assert bool((gap >= ppca["gap"] - 1e-9).all())
        assert float(gap.mean()) == pytest.approx(ppca["gap"], abs=0.01)
