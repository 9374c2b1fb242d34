"""Tests of vi.ais: annealed importance sampling, reverse AIS and bidirectional Monte Carlo.

The linear-Gaussian model is the ground truth (exact log p(x), exact posterior). Checks:
- where q₀ is the exact posterior every weight is exactly p(x), whatever the transitions do;
- E[w] = p(x) (forward) and E[w̃] = 1/p(x) (reverse from exact posterior samples): with many
  chains, log-mean-exp of the weights is within Bonferroni-corrected standard errors of the exact
  value, from q* and from the prior (a step size adapted on the chains' own past fails this);
- the HMC transition leaves the intermediate distribution invariant;
- at the default settings, AIS from q* is within 0.05 nat of the exact log p(x) at every point
  of the study's ppca model, and BDMC's bounds bracket the exact value;
- ensemble members are independent computations (a member's numbers do not depend on the
  others), float32 works, and a small nonlinear decoder's AIS sits above its ELBO and IWAE.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import DTYPE, bonferroni_crit, member_random

from vi import ais as vi_ais
from vi import linear_gaussian as lg
from vi.data import load_dataset
from vi.decoders import GaussianDecoder, log_joint
from vi.objectives import elbo, iwae_bound
from vi.streams import MemberRandom, generator


def _linear(W: torch.Tensor, b: torch.Tensor, psi: torch.Tensor, *, dtype=DTYPE
            ) -> GaussianDecoder:
    d, h = W.shape
    decoder = GaussianDecoder(d, h, mean="linear", variance="learned",
                              generators=[generator(0, "init")]).to(dtype)
    decoder.set_linear_parameters(W.to(dtype), b.to(dtype), psi.to(dtype))
    return decoder


@pytest.fixture(scope="module")
def ppca():
    """The study's ppca model (D = 20, H = 4) at its generating parameters, in float64, with
    40 of its points; the diagonal family loses > 0.05 nat on it (a correlated posterior)."""
    ds = load_dataset("ppca", seed=0)
    t = ds.ground_truth
    W, b, psi = t["W"].to(DTYPE), t["b"].to(DTYPE), t["psi"].to(DTYPE)
    x = ds.train.to(DTYPE)[:40]
    assert float(lg.approximation_gap(W, psi)) > 0.05
    return dict(decoder=_linear(W, b, psi), W=W, b=b, psi=psi, x=x,
                exact=lg.exact_log_marginal(x, W, b, psi),
                lam=lg.optimal_diagonal_posterior(x, W, b, psi))


@pytest.fixture(scope="module")
def small():
    """A small factor-analysis model (D = 5, H = 2) with a correlated posterior (the diagonal
    family loses 0.22 nat) and 5 points drawn from it."""
    g = torch.Generator().manual_seed(11)
    W = torch.randn(5, 2, generator=g, dtype=DTYPE)
    W[:, 1] = 0.5 * W[:, 0] + 0.75**0.5 * W[:, 1]
    b = torch.randn(5, generator=g, dtype=DTYPE)
    psi = 0.5 + 0.75 * torch.rand(5, generator=g, dtype=DTYPE)
    z = torch.randn(5, 2, generator=g, dtype=DTYPE)
    x = b + z @ W.T + psi.sqrt() * torch.randn(5, 5, generator=g, dtype=DTYPE)
    assert float(lg.approximation_gap(W, psi)) > 0.2
    return dict(decoder=_linear(W, b, psi), W=W, b=b, psi=psi, x=x,
                exact=lg.exact_log_marginal(x, W, b, psi),
                lam=lg.optimal_diagonal_posterior(x, W, b, psi))


# ------------------------------------------------------------------------------ schedule


def test_sigmoid_schedule_runs_from_zero_to_one_with_small_steps_at_both_ends():
    beta = vi_ais.schedule(100)
    assert beta.dtype == torch.float64 and beta.shape == (101,)
    assert beta[0] == 0 and beta[-1] == 1
    steps = beta.diff()
    assert bool((steps > 0).all())
    torch.testing.assert_close(beta + beta.flip(0), torch.ones_like(beta))  # symmetric
    assert float(steps[0]) < 0.2 / 100 and float(steps[49]) > 1.5 / 100
    torch.testing.assert_close(vi_ais.schedule(4, "linear"),
                               torch.tensor([0, 0.25, 0.5, 0.75, 1], dtype=torch.float64))
    with pytest.raises(ValueError, match="unknown schedule"):
        vi_ais.schedule(10, "cosine")
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        vi_ais.schedule(0)


# ------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_every_weight_is_p_of_x_when_q0_is_the_posterior(dtype):
    """H = 1: the diagonal q* is the exact posterior, so log p(x, z) − log q₀(z) = log p(x) at
    every z and every chain's log-weight is log p(x), forward and reverse, whatever the HMC
    moves do (a wrong integrand or increment would show here to rounding)."""
    g = torch.Generator().manual_seed(3)
    W, b = torch.randn(4, 1, generator=g, dtype=DTYPE), torch.randn(4, generator=g, dtype=DTYPE)
    psi = 0.5 + torch.rand(4, generator=g, dtype=DTYPE)
    x = b + torch.randn(6, 4, generator=g, dtype=DTYPE)
    exact = lg.exact_log_marginal(x, W, b, psi)
    lam = lg.optimal_diagonal_posterior(x, W, b, psi).to(dtype).unsqueeze(0)
    decoder, x1 = _linear(W, b, psi, dtype=dtype), x.to(dtype).unsqueeze(0)
    tol = 1e-9 if dtype == torch.float64 else 2e-4 * float(exact.abs().max())
    fwd = vi_ais.ais(decoder, x1, lam, random=member_random(0), steps=10, chains=3)
    assert fwd.log_px.dtype == torch.float64 and fwd.log_w.shape == (3, 1, 6)
    torch.testing.assert_close(fwd.log_w, exact.expand(3, 1, 6), atol=tol, rtol=0)
    assert float(fwd.acceptance.mean()) > 0.3  # the chains did move
    z = lam[..., :1] + 0.3  # any start: the weights do not depend on the states here
    rev = vi_ais.reverse_ais(decoder, x1, z, lam, random=member_random(1), steps=10, chains=3,
                             step_sizes=fwd.step_sizes)
    torch.testing.assert_close(rev.log_px[0], exact, atol=tol, rtol=0)
    torch.testing.assert_close(rev.log_w, -exact.expand(3, 1, 6), atol=tol, rtol=0)
    assert bool((fwd.se < 1e-5).all()) and bool((fwd.ess > 3 - 1e-6).all())


@pytest.mark.parametrize("init", ["qstar", "prior"])
def test_weights_are_unbiased_for_p_of_x(small, init):
    """E[w] = p(x): with C = 3000 chains, log (1/C) Σ w is within Bonferroni-corrected standard
    errors of the exact log p(x) at each point, on a short path (T = 50) where the chains are
    far from equilibrium. (With each chain's step size adapted on its own past instead of fixed
    by the pilot, this fails from the prior: z = +4 to +7 at the five points, measured.)"""
    lam = small["lam"].unsqueeze(0) if init == "qstar" else None
    out = vi_ais.ais(small["decoder"], small["x"].unsqueeze(0), lam, random=member_random(5),
                     steps=50, chains=3000)
    z = (out.log_px[0] - small["exact"]) / out.se[0]
    assert float(z.abs().max()) <= bonferroni_crit(5), z.tolist()
    assert float(out.ess.min()) > 100  # the delta-method SE is meaningful


def test_reverse_weights_are_unbiased_for_one_over_p_of_x(small):
    """E[w̃] = 1/p(x) for reverse chains started at independent exact posterior samples."""
    g = torch.Generator().manual_seed(8)
    post = lg.exact_posterior(small["x"], small["W"], small["b"], small["psi"])
    chains = 3000
    eps = torch.randn(chains, 5, 2, generator=g, dtype=DTYPE)
    z = post.mean + (eps.unsqueeze(-2) @ post.scale_tril.transpose(-1, -2)).squeeze(-2)
    x1, lam = small["x"].unsqueeze(0), small["lam"].unsqueeze(0)
    fwd = vi_ais.ais(small["decoder"], x1, lam, random=member_random(6), steps=20, chains=4)
    out = vi_ais.reverse_ais(small["decoder"], x1, z.unsqueeze(1), lam, random=member_random(7),
                             steps=20, chains=chains, step_sizes=fwd.step_sizes)
    zs = (out.log_px[0] - small["exact"]) / out.se[0]
    assert float(zs.abs().max()) <= bonferroni_crit(5), zs.tolist()


def test_hmc_transition_leaves_the_posterior_invariant(small):
    """At β = 1, chains started at exact posterior samples and moved by 10 transitions (L = 3,
    a large step size) still have the posterior's mean and variances."""
    g = torch.Generator().manual_seed(9)
    post = lg.exact_posterior(small["x"][:1], small["W"], small["b"], small["psi"])
    n = 4000
    z0 = post.sample((n,)).reshape(n, 1, 1, 2)
    path = vi_ais._Path(small["decoder"], small["x"][:1].unsqueeze(0),
                        small["lam"][:1].unsqueeze(0))
    u = (z0 - path.mu) / path.sigma
    lp, grad = path.value_and_grad(u)
    random = member_random(10)
    log_eps = torch.full((n, 1, 1, 1), math.log(0.9), dtype=DTYPE)
    accepted = []
    for _ in range(10):
        u, lp, grad, a = vi_ais._hmc(path, 1.0, u, lp, grad, log_eps, 3, random)
        accepted.append(a.mean())
    z = (path.mu + path.sigma * u).reshape(n, 2)
    assert 0.2 < float(torch.stack(accepted).mean()) < 0.95
    cov = post.covariance_matrix[0]
    zm = (z.mean(0) - post.mean[0]) / (cov.diagonal() / n).sqrt()
    # correlated draws after few transitions: allow for an effective sample size of n / 4
    assert float(zm.abs().max()) <= 2 * bonferroni_crit(2), zm.tolist()
    torch.testing.assert_close(z.var(0), cov.diagonal(), rtol=0.15, atol=0)
    del g


@pytest.mark.parametrize("variance", ["learned", "fixed", "heteroscedastic"])
def test_the_paths_log_joint_is_the_decoders(variance):
    """The sampler's log p(x, z) (σ² computed once where it does not depend on z) is
    ``vi.decoders.log_joint``, value and gradient."""
    decoder = GaussianDecoder(7, 3, members=2, hidden=(8,), variance=variance, fixed_var=0.3,
                              generators=[generator(s, "init") for s in (0, 1)]).to(DTYPE)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 7, generator=g, dtype=DTYPE)
    lam = 0.3 * torch.randn(2, 4, 6, generator=g, dtype=DTYPE)
    path = vi_ais._Path(decoder, x, lam)
    u = torch.randn(5, 2, 4, 3, generator=g, dtype=DTYPE, requires_grad=True)
    z = path.mu + path.sigma * u
    expected = log_joint(decoder, x, z)
    (expected_grad,) = torch.autograd.grad(expected.sum(), u)
    value, grad = path.value_and_grad(u)
    torch.testing.assert_close(value, expected.detach(), rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-12, atol=1e-10)


# ------------------------------------------------------------- accuracy at the defaults


def test_ais_from_qstar_is_within_005_nat_of_exact_at_every_ppca_point(ppca):
    """The study's settings (defaults) on the study's ppca model: |AIS − log p(x)| ≤ 0.05 nat at
    each of 40 points; the mean error over the points is within its standard error (the
    points' SEs combined) of zero, less the O(SE²) downward bias of a log-mean-exp."""
    out = vi_ais.ais(ppca["decoder"], ppca["x"].unsqueeze(0), ppca["lam"].unsqueeze(0),
                     random=member_random(0))
    error = out.log_px[0] - ppca["exact"]
    assert float(error.abs().max()) <= 0.05, error.abs().max()
    se_mean = float(out.se.pow(2).mean().sqrt()) / math.sqrt(error.numel())
    assert abs(float(error.mean())) <= bonferroni_crit(1) * se_mean + float(
        out.se.pow(2).mean()), (float(error.mean()), se_mean)
    assert 0.5 < float(out.acceptance.mean()) < 0.8  # the pilot's step sizes hit the target
    assert out.step_sizes.shape == (out.settings["steps"] - 1, 1, 40)


def test_bdmc_brackets_the_exact_log_marginal(ppca):
    """On points simulated from the model, forward AIS is below and reverse AIS above the exact
    log p(x) on average over the points (each bound's error against its spread over the points:
    the reverse chains of a point share their start, so their SE over chains leaves out the
    start's own noise), forward AIS below it at each point within its SE; the sandwich is
    narrow at the defaults."""
    decoder = ppca["decoder"]
    x, z = vi_ais.simulate(decoder, 40, member_random(1))
    assert x.shape == (1, 40, 20) and z.shape == (1, 40, 4)
    W, b, psi = ppca["W"], ppca["b"], ppca["psi"]
    exact = lg.exact_log_marginal(x[0], W, b, psi)
    lam = lg.optimal_diagonal_posterior(x[0], W, b, psi).unsqueeze(0)
    out = vi_ais.bdmc(decoder, x, z, lam, random=member_random(2))
    lower, upper = out.lower, out.upper
    assert lower.bound == "lower" and upper.bound == "upper"
    torch.testing.assert_close(upper.step_sizes, lower.step_sizes)  # the same kernels
    assert bool((lower.log_px[0] <= exact + bonferroni_crit(40) * lower.se[0]).all())
    crit, n = bonferroni_crit(2), exact.numel()
    below, above = lower.log_px[0] - exact, upper.log_px[0] - exact
    assert float(below.mean()) <= crit * float(below.std()) / n**0.5
    assert float(above.mean()) >= -crit * float(above.std()) / n**0.5
    summary = out.summary()
    assert set(summary) >= {"lower", "upper", "width", "width_se", "width_median",
                            "width_q90", "width_max"}
    assert abs(float(summary["width"][0])) < 0.02
    frame = out.frame()
    assert len(frame) == 40 and {"lower", "upper", "width"} <= set(frame.columns)


# ------------------------------------------------------------------- batching, dtypes


def test_members_are_independent_computations():
    """An ensemble of two different decoders run at once gives each member exactly what it
    gets alone with its own stream (the chains, points and members are one batch)."""
    decoder = GaussianDecoder(6, 2, members=2, hidden=(8,),
                              generators=[generator(s, "init") for s in (0, 1)]).to(DTYPE)
    x = torch.randn(2, 3, 6, generator=torch.Generator().manual_seed(0), dtype=DTYPE)
    lam = 0.1 * torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(1), dtype=DTYPE)
    both = vi_ais.ais(decoder, x, lam, random=member_random(3, 4), steps=8, chains=5)
    for k, seed in enumerate((3, 4)):
        alone = GaussianDecoder(6, 2, hidden=(8,)).to(DTYPE)
        with torch.no_grad():
            alone.params.flat.copy_(decoder.params.flat[k:k + 1])
        one = vi_ais.ais(alone, x[k:k + 1], lam[k:k + 1], random=member_random(seed),
                         steps=8, chains=5)
        torch.testing.assert_close(both.log_w[:, k], one.log_w[:, 0], rtol=0, atol=1e-10)
        torch.testing.assert_close(both.step_sizes[:, k], one.step_sizes[:, 0])


def test_chunks_do_not_change_the_estimate_beyond_noise(small):
    x1, lam = small["x"].unsqueeze(0), small["lam"].unsqueeze(0)
    one = vi_ais.ais(small["decoder"], x1, lam, random=member_random(0), steps=30, chains=8,
                     chunk_size=2)
    assert one.log_px.shape == (1, 5) and one.step_sizes.shape == (29, 1, 5)
    assert one.acceptance_path.shape == (29, 1)
    assert float((one.log_px[0] - small["exact"]).abs().max()) < 0.5


def test_float32_agrees_with_float64(ppca):
    x = ppca["x"][:10].unsqueeze(0)
    decoder32 = _linear(ppca["W"], ppca["b"], ppca["psi"], dtype=torch.float32)
    out = vi_ais.ais(decoder32, x.float(), ppca["lam"][:10].unsqueeze(0).float(),
                     random=member_random(0), steps=100, chains=8)
    assert out.log_px.dtype == torch.float64
    assert float((out.log_px[0] - ppca["exact"][:10]).abs().max()) < 0.1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_runs_on_cuda(small):
    dev = torch.device("cuda")
    decoder = _linear(small["W"], small["b"], small["psi"]).to(dev)
    random = MemberRandom.from_seeds([0], "cuda", device=dev)
    out = vi_ais.ais(decoder, small["x"].unsqueeze(0).to(dev),
                     small["lam"].unsqueeze(0).to(dev), random=random, steps=50, chains=64)
    assert out.log_px.device.type == "cuda"
    assert float((out.log_px[0].cpu() - small["exact"]).abs().max()) < 0.1


# ------------------------------------------------------------------- nonlinear decoder


def test_nonlinear_decoder_ais_is_above_the_elbo_and_the_iwae():
    """A small MLP decoder (H = 2) whose posteriors are far from Gaussian: AIS from a diagonal q
    lies above the ELBO of q and above IWAE-1000 on q (less a few SEs), and agrees with an
    IWAE of 50,000 samples (accurate in two dimensions) within a few SEs."""
    decoder = GaussianDecoder(6, 2, hidden=(16,), variance="fixed", fixed_var=0.05,
                              generators=[generator(0, "nonlinear")]).to(DTYPE)
    with torch.no_grad():
        decoder.params.flat.mul_(3.0)
    x, _ = vi_ais.simulate(decoder, 8, member_random(0))
    # q: a rough diagonal fit (300 Adam steps on the ELBO from the prior, written out: importing
    # torch.optim costs seconds)
    lam = torch.zeros(1, 8, 4, dtype=DTYPE)
    m1, m2 = torch.zeros_like(lam), torch.zeros_like(lam)
    g = torch.Generator().manual_seed(1)
    for t in range(1, 301):
        lam.requires_grad_(True)
        eps = torch.randn(8, 1, 8, 2, generator=g, dtype=DTYPE)
        (grad,) = torch.autograd.grad(elbo(decoder, x, lam, eps).surrogate.sum(), lam)
        with torch.no_grad():
            m1 = 0.9 * m1 + 0.1 * grad
            m2 = 0.999 * m2 + 0.001 * grad**2
            lam = lam + 0.05 * (m1 / (1 - 0.9**t)) / ((m2 / (1 - 0.999**t)).sqrt() + 1e-8)
    lam = lam.detach()
    eps = torch.randn(20000, 1, 8, 2, generator=g, dtype=DTYPE)
    l_q = elbo(decoder, x, lam, eps).samples.mean(0)[0]
    iw = iwae_bound(decoder, x, lam, 1000, member_random(2))
    ref = iwae_bound(decoder, x, lam, 50_000, member_random(3), defensive=0.2)
    out = vi_ais.ais(decoder, x, lam, random=member_random(4))
    est, se = out.log_px[0], out.se[0]
    crit = bonferroni_crit(8)
    assert bool((est >= l_q).all())
    assert bool((est >= iw.value[0] - crit * torch.sqrt(se**2 + iw.se[0] ** 2)).all())
    gap = (est - ref.value[0]).abs()
    assert bool((gap <= crit * torch.sqrt(se**2 + ref.se[0] ** 2) + 0.01).all()), gap.tolist()
    assert float((ref.value[0] - l_q).mean()) > 0.1  # the test is informative: q is far off


# ------------------------------------------------------------------------ bad input


def test_bad_input_raises_one_readable_message(small):
    d, x1, lam = small["decoder"], small["x"].unsqueeze(0), small["lam"].unsqueeze(0)
    r = member_random(0)
    with pytest.raises(ValueError, match=r"x \[K=1, N, D=5\]"):
        vi_ais.ais(d, small["x"], lam, random=r)
    with pytest.raises(ValueError, match="initial distribution"):
        vi_ais.ais(d, x1, lam[..., :3], random=r)
    with pytest.raises(ValueError, match="share dtype"):
        vi_ais.ais(d, x1.float(), lam.float(), random=r)
    with pytest.raises(ValueError, match="chains must be a positive integer"):
        vi_ais.ais(d, x1, lam, random=r, chains=0)
    with pytest.raises(ValueError, match="target_accept"):
        vi_ais.ais(d, x1, lam, random=r, target_accept=1.5)
    with pytest.raises(ValueError, match="step_sizes must be"):
        vi_ais.ais(d, x1, lam, random=r, steps=10, step_sizes=torch.ones(10, 1, 5))
    with pytest.raises(ValueError, match="one generator per member"):
        vi_ais.ais(d, x1, lam, random=member_random(0, 1))
    with pytest.raises(ValueError, match="start z"):
        vi_ais.reverse_ais(d, x1, torch.zeros(1, 5, 3, dtype=DTYPE), lam, random=r)
    with pytest.raises(ValueError, match="non-finite"):
        vi_ais.ais(d, x1, lam * math.nan, random=r)
