"""Gradient estimators as surrogates: unbiasedness on textbook integrands, single-draw
variances against closed forms, the exact score-function surrogate, second derivatives in
expectation (where a gradient is differentiated again), the declared capabilities, and the
argument checks.

Unbiasedness is tested by drawing R independent estimates in one call: λ is replicated into R
rows (one copy per row), so ∇ of the summed surrogate w.r.t. the [R, 2H] tensor is R independent
per-copy gradients. Each coordinate's mean is z-tested against the exact gradient with a
Bonferroni correction (``conftest.assert_unbiased``).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import DTYPE, assert_unbiased, bonferroni_crit, zscores
from scipy import stats

from vi import families
from vi.estimators import (
    BASELINES,
    ESTIMATORS,
    Estimate,
    Estimator,
    RunningMean,
    configurations,
    draw_noise,
    dreg,
    estimate,
    get_estimator,
    reparam,
    score,
    stl,
    twice_differentiable,
    validate_estimator,
    validate_twice_differentiable,
)

# every (estimator, baseline) the registry declares: a new estimator is tested at once
CONFIGS = configurations()
UNBIASED = configurations(unbiased=True)
MEAN_BASELINE = 2.5  # any constant keeps the `mean` baseline unbiased
R, M = 20_000, 4


def per_copy_grads(f, lam0, eps, estimator, baseline, baseline_value=None):
    """R independent gradient estimates [R, 2H] from one call: row r of λ is copy r."""
    lam = lam0.clone().requires_grad_(True)
    est = estimate(f, lam, eps, estimator=estimator, baseline=baseline,
                   baseline_value=baseline_value)
    (grad,) = torch.autograd.grad(est.surrogate.sum(), lam)
    return grad


def quadratic(a: torch.Tensor, c: torch.Tensor):
    """f(z) = Σ_i a_i z_i² + c_i z_i and its exact mean E(λ) = Σ a_i(μ_i² + σ_i²) + c_i μ_i."""

    def f(z, lam_f):
        return (a * z**2 + c * z).sum(-1)

    def expectation(lam):
        mu, logvar = families.split_params(lam)
        return (a * (mu**2 + logvar.exp()) + c * mu).sum(-1)

    return f, expectation


def exact_grad(expectation, lam):
    lam = lam.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(expectation(lam).sum(), lam)
    return grad


def _quadratic_problem(h: int):
    g = torch.Generator().manual_seed(100 + h)
    a = torch.randn(h, generator=g, dtype=DTYPE)
    c = torch.randn(h, generator=g, dtype=DTYPE)
    lam = torch.cat([torch.randn(h, generator=g, dtype=DTYPE),
                     -1.0 + torch.rand(h, generator=g, dtype=DTYPE)])
    return a, c, lam, g


@pytest.mark.parametrize("h", [1, 3], ids=["1d", "3d"])
@pytest.mark.parametrize(("estimator", "baseline"), UNBIASED)
def test_unbiased_on_quadratic(h, estimator, baseline):
    """E[ĝ] = ∇_λ E_q[f] for f(z) = Σ a_i z_i² + c_i z_i: ∇_μ = 2aμ + c, ∇_{log σ²} = a σ²."""
    a, c, lam, g = _quadratic_problem(h)
    f, expectation = quadratic(a, c)
    target = exact_grad(expectation, lam)
    mu, logvar = lam[:h], lam[h:]
    torch.testing.assert_close(target, torch.cat([2 * a * mu + c, a * logvar.exp()]))

    eps = draw_noise(max(M, ESTIMATORS[estimator].baselines[baseline]), (R,), h, generator=g,
                     dtype=DTYPE)
    bv = MEAN_BASELINE if baseline == "mean" else None
    grads = per_copy_grads(f, lam.expand(R, 2 * h), eps, estimator, baseline, bv)
    assert_unbiased(grads, target)


def test_stl_and_score_drop_the_direct_term_reparam_keeps_it(generator):
    """For f(z; λ) = Σ μ_i z_i, which depends on λ directly, E_q[f] = Σ μ_i², ∇_μ = 2μ.

    ``reparam`` is unbiased; ``stl`` and ``score`` drop E_q[∇_λ f|_z] = μ (documented in
    ``vi.estimators``: zero for the ELBO integrand, not in general) and must be rejected.
    """
    h = 2
    lam = torch.tensor([0.8, -0.5, -0.3, 0.2], dtype=DTYPE)
    target = torch.cat([2 * lam[:h], torch.zeros(h, dtype=DTYPE)])

    def f(z, lam_f):
        return (lam_f[..., :h] * z).sum(-1)

    eps = draw_noise(M, (R,), h, generator=generator, dtype=DTYPE)
    lam_r = lam.expand(R, 2 * h)
    assert_unbiased(per_copy_grads(f, lam_r, eps, "reparam", "none"), target)
    for name in ("stl", "score"):
        with pytest.raises(AssertionError, match="biased"):
            assert_unbiased(per_copy_grads(f, lam_r, eps, name, "none"), target)


def test_z_test_rejects_deliberately_biased_estimators(generator):
    """The helper that passes the estimators above can fail: two biased estimators are caught.

    1. Score function whose baseline is the mean of all M samples *including the sample itself*:
       b_m depends on z_m, E[(f_m − b_m) h_m] = (1 − 1/M) E[f h], a 25 % shrinkage at M = 4.
    2. The pathwise gradient with a wrong sign.
    A deterministic mismatch (zero variance) is rejected too.
    """
    a, c, lam, _ = _quadratic_problem(3)
    f, expectation = quadratic(a, c)
    target = exact_grad(expectation, lam)
    eps = draw_noise(M, (R,), 3, generator=generator, dtype=DTYPE)
    lam_r = lam.expand(R, 6)

    self_inclusive = f(families.sample(lam_r, eps), lam_r).mean(0)  # [R], uses z_m itself
    biased = per_copy_grads(f, lam_r, eps, "score", "mean", baseline_value=self_inclusive)
    with pytest.raises(AssertionError, match="biased"):
        assert_unbiased(biased, target)
    # the same draws with a leave-one-out baseline pass
    assert_unbiased(per_copy_grads(f, lam_r, eps, "score", "loo"), target)

    wrong_sign = -per_copy_grads(f, lam_r, eps, "reparam", "none")
    with pytest.raises(AssertionError, match="biased"):
        assert_unbiased(wrong_sign, target)

    constant = torch.ones(10, 2, dtype=DTYPE)
    assert_unbiased(constant, torch.ones(2, dtype=DTYPE))
    with pytest.raises(AssertionError, match="biased"):
        assert_unbiased(constant, torch.tensor([1.0, 1.001], dtype=DTYPE))
    assert torch.isinf(zscores(constant, torch.tensor([1.0, 1.001], dtype=DTYPE))[1])


# ---------------------------------------------------------------------------------------------
# Variance of the single-draw estimators


def _gauss_hermite_moments(fn, n_nodes: int = 20) -> tuple[float, float, float]:
    """Exact (mean, variance, 4th central moment) of fn(ε), ε ~ N(0, 1), for polynomial fn.

    Probabilists' Gauss–Hermite with n nodes integrates polynomials of degree ≤ 2n − 1 exactly;
    here fn has degree ≤ 3, so (fn − mean)⁴ has degree ≤ 12 < 39.
    """
    nodes, weights = np.polynomial.hermite_e.hermegauss(n_nodes)
    weights = weights / weights.sum()
    vals = fn(nodes)
    mean = float(weights @ vals)
    return mean, float(weights @ (vals - mean) ** 2), float(weights @ (vals - mean) ** 4)


def test_single_draw_variances_match_closed_forms():
    r"""Var of the M = 1 reparam and score (b = 0) estimators on f(z) = a z² + c z, z ~ N(μ, σ²).

    With z = μ + σε, s = log σ², write f = A + Bε + Cε² with A = aμ² + cμ, B = (2aμ + c)σ,
    C = aσ², and use E ε^{2k} = (2k − 1)!! (1, 3, 15, 105), odd moments 0.

    reparam  ĝ_μ = f'(z) = (2aμ + c) + 2aσε               Var = 4a²σ²
             ĝ_s = f'(z) ∂z/∂s = f'(z) σε/2 = Bε/2 + Cε²  Var = B²/4 + 2C²
    score    ĝ_μ = f(z) ε/σ = (Aε + Bε² + Cε³)/σ           Var = (A² + 2B² + 6AC + 15C²)/σ²
             ĝ_s = f(z) (ε² − 1)/2                          Var = A²/2 + 5B²/2 + 5AC + 37C²/2
    (the last from E[ε^{2k}(ε² − 1)²] = 2, 10, 78 for k = 0, 1, 2, minus the squared mean C²).
    All four means are the exact gradient (2aμ + c, aσ²).

    Test: the sample variance s² of R iid draws has Var(s²) = μ₄/R − v²(R − 3)/(R(R − 1)) with
    v the variance and μ₄ the 4th central moment (computed exactly by Gauss–Hermite, which also
    cross-checks the closed forms above); z = (s² − v)/SE(s²) is compared with a Bonferroni
    bound over the four checks. ĝ_μ of reparam is exactly Gaussian, so there
    (R − 1)s²/v ~ χ²_{R−1} gives an exact interval instead.
    """
    a, c, mu, var = 1.3, -0.4, 0.7, 0.5
    sig = math.sqrt(var)
    A, B, C = a * mu**2 + c * mu, (2 * a * mu + c) * sig, a * var
    closed = {
        ("reparam", 0): 4 * a**2 * var,
        ("reparam", 1): B**2 / 4 + 2 * C**2,
        ("score", 0): (A**2 + 2 * B**2 + 6 * A * C + 15 * C**2) / var,
        ("score", 1): A**2 / 2 + 5 * B**2 / 2 + 5 * A * C + 37 * C**2 / 2,
    }
    polys = {
        ("reparam", 0): lambda e: (2 * a * mu + c) + 2 * a * sig * e,
        ("reparam", 1): lambda e: B * e / 2 + C * e**2,
        ("score", 0): lambda e: (A + B * e + C * e**2) * e / sig,
        ("score", 1): lambda e: (A + B * e + C * e**2) * (e**2 - 1) / 2,
    }
    means = [2 * a * mu + c, a * var]

    n = 200_000
    g = torch.Generator().manual_seed(11)
    lam = torch.tensor([mu, math.log(var)], dtype=DTYPE).expand(n, 2)
    eps = draw_noise(1, (n,), 1, generator=g, dtype=DTYPE)
    f, _ = quadratic(torch.tensor([a], dtype=DTYPE), torch.tensor([c], dtype=DTYPE))
    crit = bonferroni_crit(len(closed))
    for (name, coord), v in closed.items():
        gh_mean, gh_var, mu4 = _gauss_hermite_moments(polys[name, coord])
        assert gh_mean == pytest.approx(means[coord], rel=1e-12)
        assert gh_var == pytest.approx(v, rel=1e-12)

        draws = per_copy_grads(f, lam, eps, name, "none")[:, coord]
        s2 = float(draws.var(unbiased=True))
        if (name, coord) == ("reparam", 0):
            lo, hi = stats.chi2.interval(1 - 1e-3 / len(closed), n - 1)
            assert lo <= (n - 1) * s2 / v <= hi, (name, coord, s2, v)
        else:
            se = math.sqrt(mu4 / n - v**2 * (n - 3) / (n * (n - 1)))
            z = (s2 - v) / se
            assert abs(z) <= crit, f"{name}[{coord}]: s² = {s2:.4f}, Var = {v:.4f}, z = {z:.2f}"
    # the score function is the noisier estimator here, by a wide margin
    assert closed["score", 0] > 5 * closed["reparam", 0]


# ---------------------------------------------------------------------------------------------
# Exact surrogates and values


@pytest.mark.parametrize("baseline", BASELINES)
def test_score_surrogate_is_the_textbook_formula(baseline, generator):
    """∇ of the surrogate = (1/M) Σ_m (f_m − b_m) ∇_λ log q(z_m; λ), with b_m spelled out:
    none 0, mean the given constant, loo the mean of the other M − 1 values, cv
    Σ_{j≠m} f_j ‖h_j‖² / Σ_{j≠m} ‖h_j‖² with h = ∇_λ log q."""
    h, b, m = 3, 5, 6
    lam = torch.randn(b, 2 * h, generator=generator, dtype=DTYPE)
    eps = torch.randn(m, b, h, generator=generator, dtype=DTYPE)
    a, c = torch.randn(h, generator=generator, dtype=DTYPE), torch.randn(h, dtype=DTYPE)
    f, _ = quadratic(a, c)

    fz = f(families.sample(lam, eps), lam)  # [M, B]
    hs = families.score(lam, eps)  # [M, B, 2H]
    if baseline == "none":
        bm = torch.zeros_like(fz)
    elif baseline == "mean":
        bm = torch.full_like(fz, MEAN_BASELINE)
    elif baseline == "loo":
        bm = torch.stack([torch.cat([fz[:j], fz[j + 1:]]).mean(0) for j in range(m)])
    else:
        h2 = hs.pow(2).sum(-1)
        bm = torch.stack([
            (torch.cat([fz[:j], fz[j + 1:]]) * torch.cat([h2[:j], h2[j + 1:]])).sum(0)
            / torch.cat([h2[:j], h2[j + 1:]]).sum(0)
            for j in range(m)
        ])
    expected = ((fz - bm).unsqueeze(-1) * hs).mean(0)

    bv = MEAN_BASELINE if baseline == "mean" else None
    got = per_copy_grads(f, lam, eps, "score", baseline, bv)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(("estimator", "baseline"), CONFIGS)
def test_surrogate_value_is_the_monte_carlo_mean(estimator, baseline, generator):
    """The DiCE weight is one and the baseline term zero in value: every surrogate's value is
    (1/M) Σ_m f(z_m), and the ``samples`` are the detached f(z_m), identical across
    estimators under common noise."""
    lam = torch.randn(4, 4, generator=generator, dtype=DTYPE).requires_grad_(True)
    eps = torch.randn(M, 4, 2, generator=generator, dtype=DTYPE)
    f, _ = quadratic(torch.tensor([0.5, -1.0], dtype=DTYPE), torch.tensor([1.0, 2.0], dtype=DTYPE))
    est = estimate(f, lam, eps, estimator=estimator, baseline=baseline,
                   baseline_value=MEAN_BASELINE if baseline == "mean" else None)
    fz = f(families.sample(lam.detach(), eps), lam.detach())
    torch.testing.assert_close(est.samples, fz, rtol=1e-14, atol=0)
    torch.testing.assert_close(est.surrogate.detach(), fz.mean(0), rtol=1e-14, atol=1e-15)
    assert not est.samples.requires_grad and est.surrogate.requires_grad


def test_stl_equals_reparam_without_direct_dependence(generator):
    lam = torch.randn(3, 4, generator=generator, dtype=DTYPE)
    eps = torch.randn(M, 3, 2, generator=generator, dtype=DTYPE)
    f, _ = quadratic(torch.tensor([0.5, -1.0], dtype=DTYPE), torch.tensor([1.0, 2.0], dtype=DTYPE))
    torch.testing.assert_close(per_copy_grads(f, lam, eps, "stl", "none"),
                               per_copy_grads(f, lam, eps, "reparam", "none"))


def test_registry_and_direct_calls_agree(generator):
    assert {n: e.fn for n, e in ESTIMATORS.items()} == {"reparam": reparam, "stl": stl,
                                                         "score": score, "dreg": dreg}
    for name, entry in ESTIMATORS.items():
        assert isinstance(entry, Estimator) and get_estimator(name) is entry
    lam = torch.randn(3, 4, generator=generator, dtype=DTYPE)
    eps = torch.randn(M, 3, 2, generator=generator, dtype=DTYPE)
    f, _ = quadratic(torch.tensor([0.5, -1.0], dtype=DTYPE), torch.tensor([1.0, 2.0], dtype=DTYPE))
    direct = score(f, lam.clone().requires_grad_(True), eps, baseline="loo").surrogate
    torch.testing.assert_close(direct, estimate(f, lam, eps, estimator="score",
                                                baseline="loo").surrogate)


def test_draw_noise_is_reproducible():
    a = draw_noise(3, (4, 5), 2, generator=torch.Generator().manual_seed(1), dtype=DTYPE)
    b = draw_noise(3, (4, 5), 2, generator=torch.Generator().manual_seed(1), dtype=DTYPE)
    assert a.shape == (3, 4, 5, 2) and a.dtype == DTYPE
    assert torch.equal(a, b)


def test_running_mean():
    """Bias-corrected running average per member: ``value`` [K, 1] starts at 0, the first
    update gives the member's batch mean, later ones the corrected exponential average; a
    member outside ``active`` neither moves nor counts a step; state round-trips."""
    rm = RunningMean(members=2, decay=0.9)
    assert rm.value.shape == (2, 1) and torch.equal(rm.value, torch.zeros(2, 1, dtype=DTYPE))
    # samples [M, K, B]: member 0 averages 2, member 1 averages 10
    rm.update(torch.tensor([[[1.0, 3.0], [9.0, 11.0]]]))
    assert rm.value[:, 0].tolist() == pytest.approx([2.0, 10.0])  # the batch means
    rm.update(torch.tensor([[[4.0, 4.0], [0.0, 0.0]]]), active=torch.tensor([True, False]))
    assert rm.value[0, 0] == pytest.approx((0.9 * 0.1 * 2.0 + 0.1 * 4.0) / (1 - 0.9**2))
    assert rm.value[1, 0] == pytest.approx(10.0)  # inactive: untouched
    assert rm.steps.tolist() == [2.0, 1.0]
    # a member that has not started yet keeps the plain score function (value 0)
    late = RunningMean(members=2)
    late.update(torch.tensor([[[5.0], [7.0]]]), active=torch.tensor([False, True]))
    assert late.value[:, 0].tolist() == pytest.approx([0.0, 7.0])
    # the value broadcasts against per-point values [..., K, B]
    assert (torch.zeros(4, 2, 3, dtype=DTYPE) + rm.value).shape == (4, 2, 3)

    other = RunningMean(members=2, decay=0.9)
    other.load_state_dict(rm.state_dict())
    assert torch.equal(other.value, rm.value)
    state = rm.state_dict()
    state["avg"].add_(1.0)  # the state is a copy, not a view of the live buffers
    assert torch.equal(other.value, rm.value)
    with pytest.raises(ValueError, match=r"decay must lie in \[0, 1\)"):
        RunningMean(decay=1.0)


# ---------------------------------------------------------------------------------------------
# Second derivatives: where a gradient is differentiated again (SA-VAE's refinement)

R2 = 50_000


def per_copy_hessians(f, params, n_lam, eps, estimator, baseline, baseline_value=None):
    """R independent Hessians [R, P, P] of the surrogate in the parameters [R, P] (row r is
    copy r): the first ``n_lam`` columns are λ, the rest parameters f closes over (θ)."""
    p = params.clone().requires_grad_(True)
    est = estimate(lambda z, lam_f: f(z, lam_f, p), p[:, :n_lam], eps, estimator=estimator,
                   baseline=baseline, baseline_value=baseline_value)
    (g,) = torch.autograd.grad(est.surrogate.sum(), p, create_graph=True)
    rows = [torch.autograd.grad(g[:, i].sum(), p, retain_graph=True)[0]
            for i in range(p.shape[1])]
    return torch.stack(rows, dim=1).detach()


def magic_box(f, lam, eps, baseline="none", baseline_value=None):
    """The first-order-only score surrogate f + (log q − stop log q) · stop(f − b), b = 0: the
    right value and gradient, the wrong second derivative (the negative control)."""
    z = families.sample(lam.detach(), eps)
    values = f(z, lam.detach())
    log_q = families.log_prob(lam, z)
    return Estimate((values + (log_q - log_q.detach()) * values.detach()).mean(0),
                    values.detach())


def _toy(z, lam_f, p):
    """f(z) = −(z − θ)²/2 with θ = p[:, 2]: E_q[f] = −((μ − θ)² + σ²)/2."""
    return -0.5 * (z[..., 0] - p[:, 2]) ** 2


# the exact Hessian of E_q[f] in (μ, log σ², θ) at μ = 0.3, σ = 1, θ = 0
TOY_POINT = (0.3, 0.0, 0.0)
TOY_HESSIAN = [[-1.0, 0.0, 1.0], [0.0, -0.5, 0.0], [1.0, 0.0, -1.0]]


@pytest.mark.parametrize(("estimator", "baseline"),
                         [c for c in CONFIGS if twice_differentiable(c[0], direct=False)])
def test_second_derivatives_on_a_closed_form_integrand(estimator, baseline, generator):
    """f(z) = −(z − θ)²/2, z ~ N(μ, σ²) at μ = 0.3, log σ² = 0, θ = 0: E[f] = −((μ − θ)² + σ²)/2,
    so ∂²/∂μ² = −1, ∂²/∂(log σ²)² = −σ²/2, ∂²/∂μ∂θ = 1, ∂²/∂θ² = −1, the rest 0. Every
    estimator that declares its second derivatives unbiased for an f without direct
    λ-dependence matches all nine entries in expectation (z-test over R per-copy Hessians)."""
    params = torch.tensor(TOY_POINT, dtype=DTYPE).expand(R2, 3)
    m = max(M, ESTIMATORS[estimator].baselines[baseline])
    eps = draw_noise(m, (R2,), 1, generator=generator, dtype=DTYPE)
    hess = per_copy_hessians(_toy, params, 2, eps, estimator, baseline,
                             MEAN_BASELINE if baseline == "mean" else None)
    assert_unbiased(hess.reshape(R2, -1), torch.tensor(TOY_HESSIAN, dtype=DTYPE).reshape(-1))


def test_first_order_surrogate_has_the_wrong_second_derivative(generator):
    """The negative control: the magic box's ∂ĝ_μ/∂μ is f ∂²log q/∂μ² = −f/σ², mean
    (μ² + σ²)/(2σ²) = +0.545 where the truth is −1, and the z-test catches it. The DiCE
    surrogate, on the same draws, passes."""
    lam = torch.tensor(TOY_POINT[:2], dtype=DTYPE).expand(R2, 2).clone().requires_grad_(True)
    eps = draw_noise(1, (R2,), 1, generator=generator, dtype=DTYPE)

    def f(z, lam_f):
        return -0.5 * z[..., 0] ** 2

    def d2_mu(surrogate):
        (g,) = torch.autograd.grad(surrogate.sum(), lam, create_graph=True)
        return torch.autograd.grad(g[:, 0].sum(), lam)[0][:, :1].detach()

    old = d2_mu(magic_box(f, lam, eps).surrogate)
    assert float(old.mean()) == pytest.approx((0.3**2 + 1) / 2, abs=5 * float(old.std()) / R2**0.5)
    with pytest.raises(AssertionError, match="biased"):
        assert_unbiased(old, torch.tensor([-1.0], dtype=DTYPE))
    assert_unbiased(d2_mu(score(f, lam, eps).surrogate), torch.tensor([-1.0], dtype=DTYPE))


ELBO_X = 1.0
ELBO_POINT = (0.2, -0.5, 0.0)


def _elbo_mc(z, lam_f, p):
    """The MC-KL ELBO integrand of p(z) = N(0, 1), p(x | z) = N(x; z + θ, 1) at x = 1:
    log p(z) + log p(x | z) − log q(z; λ)."""
    zz = z[..., 0]
    return (-0.5 * zz**2 - 0.5 * (ELBO_X - zz - p[:, 2]) ** 2 - math.log(2 * math.pi)
            - families.log_prob(lam_f, z))


def _elbo_hessian(fisher: bool = False) -> torch.Tensor:
    """The exact Hessian of L = −(μ² + σ²)/2 − ((x − θ − μ)² + σ²)/2 + log σ²/2 + const in
    (μ, log σ², θ): ∂²μ = −2, ∂²(log σ²) = −σ², ∂μ∂θ = −1, ∂²θ = −1, the rest 0; with
    ``fisher`` plus the Fisher information of q, diag(1/σ², 1/2) on λ."""
    var = math.exp(ELBO_POINT[1])
    h = torch.tensor([[-2.0, 0.0, -1.0], [0.0, -var, 0.0], [-1.0, 0.0, -1.0]], dtype=DTYPE)
    if fisher:
        h[0, 0] += 1 / var
        h[1, 1] += 0.5
    return h


@pytest.mark.parametrize(("estimator", "baseline"), CONFIGS)
def test_second_derivatives_of_the_mc_kl_elbo(estimator, baseline, generator):
    """The ELBO with the MC KL at (μ, log σ²) = (0.2, −0.5): true Hessian diagonal
    (−2, −0.607) on λ, off-diagonal 0. An estimator declared twice differentiable for an
    integrand with direct λ-dependence matches it; one that drops the direct term (f sees
    stop(λ)) estimates the Hessian of E_{q(λ)}[f(z; λ₀)], which is the truth plus the Fisher
    information of q (the Hessian of KL(q_λ ‖ q_λ₀)): that is why SA-VAE refuses it with
    kl = "mc". Either way its first derivative stays unbiased (the tests above)."""
    params = torch.tensor(ELBO_POINT, dtype=DTYPE).expand(R2, 3)
    m = max(M, ESTIMATORS[estimator].baselines[baseline])
    eps = draw_noise(m, (R2,), 1, generator=generator, dtype=DTYPE)
    hess = per_copy_hessians(_elbo_mc, params, 2, eps, estimator, baseline,
                             MEAN_BASELINE if baseline == "mean" else None).reshape(R2, -1)
    ok = twice_differentiable(estimator, direct=True)
    assert ok == (not ESTIMATORS[estimator].drops_direct)
    assert_unbiased(hess, _elbo_hessian(fisher=not ok).reshape(-1))
    if not ok:
        with pytest.raises(AssertionError, match="biased"):
            assert_unbiased(hess, _elbo_hessian().reshape(-1))


@pytest.mark.parametrize(("estimator", "baseline"),
                         [c for c in CONFIGS if twice_differentiable(c[0], direct=False)])
def test_second_derivatives_of_the_analytic_kl_elbo(estimator, baseline, generator):
    """The same ELBO with the KL in closed form (the estimator sees log p(x | z) only, no
    direct λ-dependence): every estimator declared twice differentiable there matches the
    exact Hessian."""
    params = torch.tensor(ELBO_POINT, dtype=DTYPE).expand(R2, 3)
    m = max(M, ESTIMATORS[estimator].baselines[baseline])
    eps = draw_noise(m, (R2,), 1, generator=generator, dtype=DTYPE)
    p = params.clone().requires_grad_(True)

    def rec(z, lam_f):
        return -0.5 * (ELBO_X - z[..., 0] - p[:, 2]) ** 2 - 0.5 * math.log(2 * math.pi)

    est = estimate(rec, p[:, :2], eps, estimator=estimator, baseline=baseline,
                   baseline_value=MEAN_BASELINE if baseline == "mean" else None)
    surrogate = est.surrogate - families.kl_to_standard_normal(p[:, :2])
    (g,) = torch.autograd.grad(surrogate.sum(), p, create_graph=True)
    hess = torch.stack([torch.autograd.grad(g[:, i].sum(), p, retain_graph=True)[0]
                        for i in range(3)], dim=1).detach()
    assert_unbiased(hess.reshape(R2, -1), _elbo_hessian().reshape(-1))


def test_twice_differentiable_validation_names_the_valid_estimators():
    """Refinement through which gradients flow refuses, up front, an estimator whose second
    derivatives are wrong for the objective, naming the valid ones per KL mode."""
    for name in ESTIMATORS:
        for kl in ("analytic", "mc"):
            if twice_differentiable(name, kl == "mc"):
                validate_twice_differentiable(name, kl, "x")
            else:
                mc = [n for n in ESTIMATORS if twice_differentiable(n, True)]
                with pytest.raises(ValueError, match=f"Valid with kl='mc': {', '.join(mc)};"):
                    validate_twice_differentiable(name, kl, "x")
    with pytest.raises(ValueError, match=r"^sa_vae differentiates.*'stl' with kl='mc'"):
        validate_twice_differentiable("stl", "mc", "sa_vae differentiates its refinement")


# ---------------------------------------------------------------------------------------------
# Declared capabilities


def test_capabilities_drive_the_baseline_checks():
    """Each estimator accepts exactly the baselines it declares, each from its declared
    minimum number of samples; every other baseline is refused with a readable message."""
    for name, entry in ESTIMATORS.items():
        assert entry.objectives[0] == "elbo" and entry.baselines.get("none") == 1
        assert entry.accepts_baseline == (set(entry.baselines) != {"none"})
        for baseline in BASELINES:
            if baseline not in entry.baselines:
                with pytest.raises(ValueError, match="baseline"):
                    validate_estimator(name, baseline)
                continue
            need = entry.baselines[baseline]
            validate_estimator(name, baseline, need)
            if need > 1:
                with pytest.raises(ValueError, match=f"needs n_mc >= {need} samples"):
                    validate_estimator(name, baseline, need - 1)
    assert configurations() == [(n, b) for n, e in ESTIMATORS.items() for b in e.baselines]
    assert set(configurations(unbiased=True)) == {
        (n, b) for n, b in configurations() if not ESTIMATORS[n].biased}


# ---------------------------------------------------------------------------------------------
# Argument checks


def _f(z, lam_f):
    return z.sum(-1)


def test_wrong_noise_shape_raises():
    lam = torch.zeros(3, 4)
    for eps in (torch.zeros(2, 3, 3), torch.zeros(2, 4, 2), torch.zeros(3, 2)):
        with pytest.raises(ValueError, match=r"noise must have shape \[M, 3, 2\]"):
            estimate(_f, lam, eps)
        for name in ESTIMATORS:
            with pytest.raises(ValueError, match="noise must have shape"):
                ESTIMATORS[name](_f, lam, eps)


@pytest.mark.parametrize("baseline", ["loo", "cv"])
def test_loo_and_cv_need_two_samples(baseline):
    assert ESTIMATORS["score"].baselines[baseline] == 2
    with pytest.raises(ValueError, match=f"baseline '{baseline}' needs n_mc >= 2 samples; got 1"):
        estimate(_f, torch.zeros(3, 4), torch.zeros(1, 3, 2), estimator="score", baseline=baseline)
    with pytest.raises(ValueError, match="needs n_mc >= 2"):
        score(_f, torch.zeros(3, 4), torch.zeros(1, 3, 2), baseline=baseline)
    with pytest.raises(ValueError, match="needs n_mc >= 2"):
        validate_estimator("score", baseline, n_mc=1)


def test_unknown_estimator_lists_valid_ones():
    valid = "valid: reparam, stl, score"
    with pytest.raises(ValueError, match=f"unknown estimator 'reinforce'; {valid}"):
        get_estimator("reinforce")
    with pytest.raises(ValueError, match=f"unknown estimator 'nvil'; {valid}"):
        estimate(_f, torch.zeros(3, 4), torch.zeros(2, 3, 2), estimator="nvil")


def test_unknown_baseline_lists_valid_ones():
    with pytest.raises(ValueError, match="unknown baseline 'vimco'; valid: none, mean, loo, cv"):
        validate_estimator("score", "vimco")
    with pytest.raises(ValueError, match="unknown baseline 'vimco'"):
        score(_f, torch.zeros(3, 4), torch.zeros(2, 3, 2), baseline="vimco")


@pytest.mark.parametrize("estimator", [n for n, e in ESTIMATORS.items()
                                       if not e.accepts_baseline])
def test_baseline_with_pathwise_estimator_raises(estimator):
    with pytest.raises(ValueError, match="baselines apply to the score estimator only"):
        estimate(_f, torch.zeros(3, 4), torch.zeros(2, 3, 2), estimator=estimator, baseline="loo")
    with pytest.raises(ValueError, match="baselines apply to the score estimator only"):
        ESTIMATORS[estimator](_f, torch.zeros(3, 4), torch.zeros(2, 3, 2), baseline="mean")


def test_bad_n_mc_and_integrand_shape_raise():
    with pytest.raises(ValueError, match="n_mc must be a positive"):
        validate_estimator("reparam", "none", n_mc=0)
    with pytest.raises(ValueError, match=r"one value per sample, shape \(2, 3\)"):
        estimate(lambda z, lam_f: z, torch.zeros(3, 4), torch.zeros(2, 3, 2))
