"""Gradient-variance instrumentation: per-draw gradients, their statistics (per ensemble member),
the ``gradvar`` probe during training and the analysis sweep.

Statistical tests follow conftest's convention: a seeded z-score against a Bonferroni-corrected
normal critical value at family-wise α = 1e-3.
"""

from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import DTYPE, bonferroni_crit, member_random
from scipy.stats import norm

from vi import gradstats
from vi.config import RunConfig
from vi.decoders import GaussianDecoder
from vi.estimators import configurations, twice_differentiable
from vi.inference import METHODS, MethodSettings, build_method
from vi.objectives import elbo
from vi.probes import GradVar, _evaluation_batch, build_probes
from vi.streams import MemberRandom, generator
from vi.training import Trainer

# every (estimator, baseline) the registry declares: a new estimator is tested at once
CONFIGS = configurations()
METHOD_NAMES = tuple(sorted(METHODS))
SEEDS = [3, 4]  # two members: every statistic is per member


def small_method(name: str, estimator: str, baseline: str, kl: str = "analytic", n_mc: int = 3,
                 *, seen_mean: bool = True):
    """A float64 two-member method on a small MLP decoder (D=5, H=2), off its initial point:
    random table rows for vem, a running mean that has seen one update (for ``mean``)."""
    gens = [generator(s, "init") for s in SEEDS]
    decoder = GaussianDecoder(5, 2, hidden=[7], members=2, generators=gens).to(DTYPE)
    settings = MethodSettings(name=name, estimator=estimator, baseline=baseline, kl=kl,
                              n_mc=n_mc, encoder_hidden=(6,), refine_steps=2, refine_lr=0.05)
    method = build_method(decoder, [settings, dataclasses.replace(settings, lr=0.01)],
                          n_train=10, generators=gens).to(DTYPE)
    if name == "vem":
        with torch.no_grad():
            method.local.copy_(0.5 * torch.randn(method.local.shape, dtype=DTYPE,
                                                 generator=torch.Generator().manual_seed(5)))
    if seen_mean:
        method.running_mean.update(torch.tensor([[[-7.0], [-5.0]]]))
    x = torch.randn(2, 4, 5, generator=torch.Generator().manual_seed(4), dtype=DTYPE)
    return method, x, torch.tensor([[1, 3, 5, 7], [0, 2, 4, 6]])


def digits_method(name: str = "amortized", **method) -> tuple:
    """A digits model at initialisation (one member) and its first 64 training points."""
    config = RunConfig.from_dict({
        "data": {"name": "digits"}, "model": {"latent_dim": 2, "hidden": [64]},
        "method": {"name": name, "encoder_hidden": [64], **method},
        "training": {"max_epochs": 1},
    })
    trainer = Trainer([config])
    return trainer.method, trainer.x["train"][:, :64]


def total_variance_and_se(g: torch.Tensor) -> tuple[float, float]:
    """T̂ = (1/(K−1)) Σ_k ‖g_k − ḡ‖² and its delta-method standard error sd_k(‖g_k − ḡ‖²)/√K,
    for draws g [K, P] (K draws here)."""
    dev = (g - g.mean(0)).pow(2).sum(1).to(DTYPE)
    k = g.shape[0]
    return float(dev.sum() / (k - 1)), float(dev.std() / math.sqrt(k))


# -- batched = loop ------------------------------------------------------------------------------
@pytest.mark.parametrize("kl", ["analytic", "mc"])
@pytest.mark.parametrize(("estimator", "baseline"), CONFIGS)
@pytest.mark.parametrize("name", METHOD_NAMES)
def test_batched_equals_loop_of_autograd_calls(name, estimator, baseline, kl):
    """Every group, every estimator, both members: the batched per-draw gradients (one backward
    over copies, vmap over the encoder's vjp, vmap(grad) for the decoder) equal ordinary
    autograd calls on the same noise, and a refining method's refinement matches
    ``method.local_ascent`` on the same streams."""
    if METHODS[name].refine_through and not twice_differentiable(estimator, kl == "mc"):
        pytest.skip(f"{name} refuses {estimator} with kl={kl} (second derivatives)")
    method, x, idx = small_method(name, estimator, baseline, kl)
    k = 5
    batched = gradstats.per_sample_grads(method, x, idx, draws=k, chunk_size=2,
                                         random=MemberRandom.from_seeds(SEEDS, "g"))
    replay = MemberRandom.from_seeds(SEEDS, "g")  # refinement (refining methods) first, noise
    refined = None
    if method.refines_in_training:
        lam0 = method.encoder(x).detach()
        refined = method.local_ascent(x, lam0, replay, method.settings.refine_steps).detach()
    noise = replay.randn((k, method.settings.n_mc, x.shape[1], 2), 2, dtype=DTYPE)
    loop = gradstats.per_sample_grads_loop(method, x, idx, noise, refined=refined)
    assert set(batched) == set(loop) == set(method.groups)
    for group, g in batched.items():
        assert g.shape == loop[group].shape and g.shape[:2] == (k, 2)
        for member in range(2):
            assert float(g[:, member].abs().max()) > 0, (group, member)
        torch.testing.assert_close(g, loop[group], rtol=1e-6, atol=1e-6 * (1 + float(
            loop[group].abs().max())), msg=f"{name}/{estimator}/{baseline}/{kl}: {group}")
    # the draws are independent: no two rows equal
    assert torch.unique(batched["decoder"][:, 0], dim=0).shape[0] == k


def test_groups_follow_the_training_objective():
    """The λ group is ∇ of the minibatch *sum* (per point), θ/φ of the *mean*; vem's local
    group holds the same numbers as its variational group; members are separate rows."""
    method, x, idx = small_method("vem", "reparam", "none")
    noise = torch.randn((3, 3, 2, 4, 2), generator=torch.Generator().manual_seed(0), dtype=DTYPE)
    g = gradstats.per_sample_grads(method, x, idx, noise=noise)
    torch.testing.assert_close(g["local"], g["variational"], rtol=0, atol=0)
    assert g["local"] is not g["variational"]
    assert g["variational"].shape == (3, 2, 4 * 4)
    assert g["decoder"].shape == (3, *method.decoder.params.flat.shape)

    lam = method.local[torch.arange(2).unsqueeze(1), idx].clone().requires_grad_()
    est = elbo(method.decoder, x, lam, noise[0])
    (g_lam,) = torch.autograd.grad(est.surrogate.sum(), lam, retain_graph=True)
    torch.testing.assert_close(g["variational"][0], g_lam.reshape(2, -1))
    (g_dec,) = torch.autograd.grad(est.surrogate.mean(-1).sum(), method.decoder.params.flat)
    torch.testing.assert_close(g["decoder"][0], g_dec)


def test_encoder_group_is_the_chain_rule_of_the_mean():
    """∇_φ (1/B) Σ_n L_n(f_φ(x_n)) per member, as a plain backward pass computes it."""
    method, x, idx = small_method("amortized", "score", "loo")
    noise = torch.randn((2, 3, 2, 4, 2), generator=torch.Generator().manual_seed(1), dtype=DTYPE)
    g = gradstats.per_sample_grads(method, x, idx, noise=noise, groups=["encoder"])
    assert set(g) == {"encoder"}
    for d in range(2):
        est = elbo(method.decoder, x, method.encoder(x), noise[d], estimator="score",
                   baseline="loo")
        (ref,) = torch.autograd.grad(est.surrogate.mean(-1).sum(), method.encoder.params.flat)
        torch.testing.assert_close(g["encoder"][d], ref, rtol=1e-10, atol=1e-12)


def test_measuring_does_not_touch_the_method():
    method, x, idx = small_method("semi_amortized", "score", "mean")
    state = {k: v.clone() for k, v in method.state_dict().items()}
    opt = {k: v.clone() for k, v in method.optimizer_state().items()}
    gradstats.per_sample_grads(method, x, idx, draws=4, random=member_random(1, 2))
    for k, v in method.state_dict().items():
        assert torch.equal(v, state[k]), k
    for k, v in method.optimizer_state().items():
        assert torch.equal(v, opt[k]), k
    assert all(p.grad is None for p in method.parameters())
    assert all(p.requires_grad for p in method.parameters())


def test_chunking_does_not_change_the_draws():
    method, x, idx = small_method("amortized", "score", "loo")
    noise = torch.randn((7, 3, 2, 4, 2), generator=torch.Generator().manual_seed(1), dtype=DTYPE)
    whole = gradstats.per_sample_grads(method, x, idx, noise=noise)
    chunked = gradstats.per_sample_grads(method, x, idx, noise=noise, chunk_size=3)
    for group in whole:
        torch.testing.assert_close(whole[group], chunked[group], rtol=1e-12, atol=1e-12)


def test_bad_arguments_raise():
    method, x, idx = small_method("vem", "score", "loo")
    random = member_random(1, 2)
    with pytest.raises(ValueError, match="no parameter group"):
        gradstats.per_sample_grads(method, x, idx, draws=2, random=random, groups=["encoder"])
    with pytest.raises(ValueError, match="needs n_mc >= 2"):
        gradstats.per_sample_grads(method, x, idx, draws=2, random=random,
                                   settings=dataclasses.replace(method.settings, n_mc=1))
    with pytest.raises(ValueError, match="draws >= 1 and random"):
        gradstats.per_sample_grads(method, x, idx, draws=0, random=random)
    with pytest.raises(ValueError, match="draws >= 1 and random"):
        gradstats.per_sample_grads(method, x, idx, draws=3)
    with pytest.raises(ValueError, match=r"noise must have shape \[draws, M, 2, 4, 2\]"):
        gradstats.per_sample_grads(method, x, idx, noise=torch.zeros(3, 3, 4, 2, dtype=DTYPE))
    with pytest.raises(ValueError, match="chunk_size must be positive"):
        gradstats.per_sample_grads(method, x, idx, draws=2, random=random, chunk_size=0)
    with pytest.raises(ValueError, match=r"needs draws \[>= 2, K, P\]"):
        gradstats.gradient_statistics(torch.zeros(1, 2, 3))
    with pytest.raises(ValueError, match=r"needs draws \[>= 2, K, P\]"):
        gradstats.gradient_statistics(torch.zeros(4, 3))


# -- statistics ----------------------------------------------------------------------------------
def test_statistics_formulas_per_member():
    """Each member's statistics from its own draws: total variance, relative variance, SNR over
    the random coordinates only, ‖ĝ‖, and the count of deterministic coordinates. (An odd
    number of random coordinates per member: the even case is the next test.)"""
    g = torch.randn(50, 2, 7, generator=torch.Generator().manual_seed(2), dtype=DTYPE) + 1.0
    g[:, 0, 5] = 2.5  # deterministic coordinate: out of the SNR
    g[:, 0, 6] = 0.0  # always zero (e.g. an unused parameter)
    g[:, 1] *= torch.arange(1, 8, dtype=DTYPE)  # member 1: another scale per coordinate
    st = gradstats.gradient_statistics(g)
    assert set(st) == {*gradstats.METRICS, "n_deterministic"}
    assert all(v.shape == (2,) and v.dtype == torch.float64 for v in st.values())
    for member, random_coords in ((0, slice(0, 5)), (1, slice(0, 7))):
        a = g[:, member].numpy()
        v = a.var(0, ddof=1)
        assert float(st["grad_var_total"][member]) == pytest.approx(v.sum(), rel=1e-12)
        assert float(st["grad_mean_norm"][member]) == pytest.approx(np.linalg.norm(a.mean(0)),
                                                                    rel=1e-12)
        assert float(st["grad_var_relative"][member]) == pytest.approx(
            v.sum() / (a.mean(0) ** 2).sum(), rel=1e-12)
        snr = np.abs(a.mean(0)[random_coords]) / np.sqrt(v[random_coords])
        assert float(st["grad_snr_mean"][member]) == pytest.approx(snr.mean(), rel=1e-12)
        assert float(st["grad_snr_median"][member]) == pytest.approx(np.median(snr), rel=1e-12)
    assert st["n_deterministic"].tolist() == [2.0, 0.0]


def test_snr_median_of_an_even_number_of_coordinates():
    """The median of an even number of SNRs is the mean of the two middle ones (numpy's and
    pandas' median, and the statistic before the ensemble redesign)."""
    g = torch.randn(50, 1, 4, generator=torch.Generator().manual_seed(2), dtype=DTYPE) + 1.0
    a = g[:, 0].numpy()
    snr = np.abs(a.mean(0)) / a.std(0, ddof=1)
    st = gradstats.gradient_statistics(g)
    assert float(st["grad_snr_median"][0]) == pytest.approx(np.median(snr), rel=1e-12)


def test_snr_of_zero_mean_coordinates_reads_the_noise_floor():
    """SNR_i = |ĝ_i|/s_i is biased high for weak coordinates: with n Gaussian draws of a
    coordinate of mean 0 it is |t_{n−1}|/√n, of mean E|t_{n−1}|/√n (0.0804 at n = 100, against
    √(2/(π n)) = 0.0798) and median t_{n−1, 0.75}/√n (0.0677). 20,000 zero-mean coordinates
    (two members, other scales): the mean SNR within the Bonferroni bound times its standard
    error sd(|t|)/√(n P), the median within the bound times the sample median's asymptotic
    standard error 1/(2 f(m) √P), f the density of |t_{n−1}|/√n at its median m."""
    from scipy import stats

    n, p = 100, 20_000
    g = torch.randn(n, 2, p, generator=torch.Generator().manual_seed(5), dtype=DTYPE)
    g[:, 1] *= 1e-3 * torch.exp(torch.linspace(-3, 3, p, dtype=DTYPE))
    st = gradstats.gradient_statistics(g)
    t = stats.t(n - 1)
    mean_abs_t = t.expect(lambda v: abs(v))
    mean, sd = mean_abs_t / math.sqrt(n), math.sqrt(t.var() - mean_abs_t**2) / math.sqrt(n)
    median = t.ppf(0.75) / math.sqrt(n)
    density = 2 * math.sqrt(n) * t.pdf(t.ppf(0.75))
    assert mean == pytest.approx(0.0804, abs=5e-5) and median == pytest.approx(0.0677, abs=5e-5)
    crit = bonferroni_crit(4)
    for member in range(2):
        z_mean = (float(st["grad_snr_mean"][member]) - mean) / (sd / math.sqrt(p))
        z_median = (float(st["grad_snr_median"][member]) - median) * 2 * density * math.sqrt(p)
        assert abs(z_mean) < crit and abs(z_median) < crit, (member, z_mean, z_median)


def test_undefined_statistics_are_nan_and_stay_in_their_member():
    """All-zero draws: variance and ‖ĝ‖ are 0, relative variance and SNR undefined (NaN, so the
    probe leaves the row out); a NaN draw of member 0 leaves member 1's numbers as they were."""
    g = torch.randn(20, 2, 3, generator=torch.Generator().manual_seed(3), dtype=DTYPE)
    clean = gradstats.gradient_statistics(g)
    zero = gradstats.gradient_statistics(torch.zeros(4, 1, 3, dtype=DTYPE))
    assert zero["grad_var_total"].item() == 0 and zero["grad_mean_norm"].item() == 0
    for metric in ("grad_var_relative", "grad_snr_mean", "grad_snr_median"):
        assert math.isnan(zero[metric].item()), metric
    bad = g.clone()
    bad[0, 0, 0] = math.nan
    st = gradstats.gradient_statistics(bad)
    assert math.isnan(st["grad_var_total"][0].item())
    for metric in gradstats.METRICS:
        assert torch.equal(st[metric][1], clean[metric][1]), metric


def linear_gaussian_variance(model, lam: torch.Tensor, n_mc: int):
    """Closed-form covariance of the reparameterization λ-gradient of the linear-Gaussian ELBO
    (analytic KL), per draw of M samples. With A = Wᵀ Ψ⁻¹ W, d = Wᵀ Ψ⁻¹ (x − b − W μ),
    u = σ ⊙ ε ~ N(0, S), S = diag σ² and s = log σ²:

        ∇_μ = Wᵀ Ψ⁻¹ (x − b − W(μ + u)) − μ = d − μ − A u    ⇒ Cov = A S A / M,
        ∇_{s_j} = ½ u_j (d − A u)_j − ½ (σ_j² − 1)           (∂z_j/∂s_j = ½ u_j)
        ⇒ Var = ¼ [d_j² σ_j² + σ_j² Σ_l A_jl² σ_l² + A_jj² σ_j⁴] / M

    (Isserlis: E[u_j² u_l²] = σ_j² σ_l², E[u_j⁴] = 3σ_j⁴, odd moments vanish, so the two terms
    of ∇_{s_j} are uncorrelated). Returns (tr Σ_μ, tr (Σ_μ²), tr Σ_s), summed over the
    minibatch's points, Σ_μ being block-diagonal across points.
    """
    W, b, psi = model.W, model.b, model.psi
    A = W.T @ (W / psi[:, None])
    h = model.H
    mu, var = lam[:, :h], lam[:, h:].exp()
    d = ((model.x - b - mu @ W.T) / psi) @ W  # [B, H]
    cov_mu = A[None] * var[:, None, :] @ A[None]  # A S_n A, [B, H, H]
    tr_mu = float(torch.diagonal(cov_mu, dim1=1, dim2=2).sum()) / n_mc
    tr_mu2 = float((cov_mu @ cov_mu).diagonal(dim1=1, dim2=2).sum()) / n_mc**2
    var_s = 0.25 * (d**2 * var + var * (var @ (A**2).T) + torch.diagonal(A) ** 2 * var**2)
    return tr_mu, tr_mu2, float(var_s.sum()) / n_mc


@pytest.mark.parametrize("n_mc", [1, 3])
def test_total_variance_matches_closed_form(linear_model, n_mc):
    """Measured tr Σ of the λ group equals the closed form within its standard error.

    μ block (Gaussian in ε): (K−1) Σ̂ ~ Wishart(Σ, K−1), so Var(tr Σ̂) = 2 tr(Σ²)/(K−1) exactly.
    log σ² block and whole λ (not Gaussian): delta-method SE, sd_k(‖g_k − ḡ‖²)/√K.
    """
    m, k = linear_model, 20_000
    method = build_method(m.decoder, [MethodSettings(name="vem", n_mc=n_mc)],
                          n_train=m.B).to(DTYPE)
    with torch.no_grad():
        method.local.copy_(m.lam1)
    idx = torch.arange(m.B).unsqueeze(0)
    g = gradstats.per_sample_grads(method, m.x1, idx, draws=k, random=member_random(11),
                                   groups=["variational"])["variational"][:, 0]
    tr_mu, tr_mu2, tr_s = linear_gaussian_variance(m, m.lam, n_mc)
    blocks = g.reshape(k, m.B, 2 * m.H)
    g_mu, g_s = (blocks[..., : m.H].reshape(k, -1), blocks[..., m.H:].reshape(k, -1))
    crit = bonferroni_crit(3)
    measured_mu = float(gradstats.gradient_statistics(g_mu.unsqueeze(1))["grad_var_total"][0])
    z_mu = (measured_mu - tr_mu) / math.sqrt(2 * tr_mu2 / (k - 1))
    measured_s, se_s = total_variance_and_se(g_s)
    measured, se = total_variance_and_se(g)
    assert float(gradstats.gradient_statistics(g.unsqueeze(1))["grad_var_total"][0]) == \
        pytest.approx(measured)
    z_s, z_all = (measured_s - tr_s) / se_s, (measured - tr_mu - tr_s) / se
    assert max(abs(z_mu), abs(z_s), abs(z_all)) <= crit, (z_mu, z_s, z_all)
    # the test has power: a 10% error in either block would be caught
    assert se_s / tr_s < 0.02 and math.sqrt(2 * tr_mu2 / (k - 1)) / tr_mu < 0.02


def test_reparam_variance_scales_as_one_over_m():
    """log tr Σ̂_M against log M has slope −1 (the M-sample estimate averages M iid single-sample
    gradients). Var(log T̂) ≈ (SE/T̂)² by the delta method; the OLS slope's SE follows from those
    independent (fresh noise per M) errors, and the check uses crit · SE."""
    method, x = digits_method()
    idx = torch.arange(8).unsqueeze(0)
    x = x[:, :8]
    ms = np.array([1, 2, 4, 8, 16])
    random = member_random(5)
    groups = ("variational", "decoder")
    logs = {g: [] for g in groups}
    var_logs = {g: [] for g in groups}
    for m in ms:
        settings = dataclasses.replace(method.settings, n_mc=int(m))
        grads = gradstats.per_sample_grads(method, x, idx, draws=100, settings=settings,
                                           random=random, groups=groups)
        for g in groups:
            t, se = total_variance_and_se(grads[g][:, 0])
            logs[g].append(math.log(t))
            var_logs[g].append((se / t) ** 2)
    lm = np.log(ms)
    w = (lm - lm.mean()) / ((lm - lm.mean()) ** 2).sum()
    crit = bonferroni_crit(len(groups))
    for g in groups:
        slope = float(w @ np.array(logs[g]))
        se_slope = float(np.sqrt((w**2) @ np.array(var_logs[g])))
        assert se_slope < 0.05, (g, se_slope)  # tight enough to reject slope −0.8 or −1.2
        assert abs(slope + 1.0) <= crit * se_slope, (g, slope, se_slope)


@pytest.mark.parametrize("name", ["amortized", "vem"])
def test_score_noisier_than_reparam_and_loo_helps(name):
    """Digits model at initialisation, λ group, common noise (M = 4): tr Σ(score, none) exceeds
    tr Σ(reparam), and the leave-one-out baseline reduces it; one-sided z-tests."""
    method, x = digits_method(name)
    idx = torch.arange(32).unsqueeze(0)
    x = x[:, :32]
    noise = torch.randn((300, 4, 1, 32, 2), generator=torch.Generator().manual_seed(6))
    tv = {}
    for est, base in [("reparam", "none"), ("score", "none"), ("score", "loo")]:
        s = dataclasses.replace(method.settings, estimator=est, baseline=base)
        g = gradstats.per_sample_grads(method, x, idx, noise=noise, settings=s,
                                       groups=["variational"])["variational"]
        tv[base if est == "score" else est] = total_variance_and_se(g[:, 0])
    crit = float(norm.ppf(1 - 1e-3 / 2))  # two comparisons, one-sided, α = 1e-3 overall

    def z(a, b):
        return (tv[a][0] - tv[b][0]) / math.hypot(tv[a][1], tv[b][1])

    assert z("none", "reparam") > crit, tv
    assert z("none", "loo") > crit, tv


# -- the gradvar probe during training -----------------------------------------------------------
def test_default_schedule():
    """Due at epochs 0, 1, 2, 4, 8, … and at the end; or exactly at the listed epochs."""
    config = RunConfig()

    def due(probe, epoch, final=False):
        return probe.due(SimpleNamespace(epoch=epoch, final=final))

    probe = build_probes({"gradvar": {}}, config)[0]
    assert isinstance(probe, GradVar)
    assert [e for e in range(25) if due(probe, e)] == [0, 1, 2, 4, 8, 16]
    assert due(probe, 20, final=True)
    listed = build_probes({"gradvar": {"epochs": [0, 3]}}, config)[0]
    assert [e for e in range(5) if due(listed, e)] == [0, 3]
    assert due(listed, 7, final=True)


def _tiny(method: str) -> RunConfig:
    return RunConfig.from_dict({
        "data": {"name": "digits"}, "model": {"latent_dim": 2, "hidden": [16]},
        "method": {"name": method, "estimator": "score", "baseline": "mean", "n_mc": 2,
                   "encoder_hidden": [16], "refine_steps": 2,
                   # score-function refinement at 0.1 (and at 1e-3 from a decoder started at
                   # the data's variances) diverges on this model
                   "refine_lr": 1e-4,
                   "heldout": {"window": 5, "patience": 1, "max_steps": 20}},
        "training": {"max_epochs": 2, "batch_size": 480, "eval_splits": ["train"],
                     "eval_n_mc": 1, "stopping": None},
    })


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_logging_leaves_training_identical(name):
    """Same configuration with and without the gradvar probe: the non-gradient rows (wall_s
    aside), the final parameters and optimiser state and the training streams are identical;
    the logged rows cover the schedule (0, 1, 2), every group and metric, and are finite."""
    config = _tiny(name)
    probes = build_probes({"gradvar": {"draws": 6, "batch": 10}}, config)
    (on,) = Trainer([config]).fit(probes)
    (off,) = Trainer([config]).fit()
    assert on.status == off.status == "ok"

    def strip(rows):
        return [{k: v for k, v in r.items() if k != "wall_s"} for r in rows
                if not r["metric"].startswith("grad_")]

    assert strip(on.rows) == strip(off.rows)
    for part in ("module", "optim"):
        for k, v in on.state[part].items():
            assert torch.equal(v, off.state[part][k]), k
    for key in ("data", "noise"):
        assert torch.equal(on.state["streams"][key], off.state["streams"][key]), key
    grad_rows = [r for r in on.rows if r["metric"].startswith("grad_")]
    assert {r["epoch"] for r in grad_rows} == {0, 1, 2}
    assert {r["param_group"] for r in grad_rows} == set(METHODS[name].groups)
    assert {r["metric"] for r in grad_rows} == set(gradstats.METRICS)
    assert all(r["split"] == "train" and r["n_mc"] == 2 for r in grad_rows)
    assert all(math.isfinite(r["value"]) for r in on.rows)
    keys = {(r["epoch"], r["param_group"], r["metric"]) for r in grad_rows}
    assert len(keys) == 3 * len(gradstats.METRICS) * len(METHODS[name].groups)


def test_evaluation_batch_is_fixed():
    """The gradvar minibatch depends only on the member's seed and N: the same points for every
    method and epoch of a seed, sorted, other points for another seed."""
    x = {"train": torch.zeros(2, 100, 3)}
    a = _evaluation_batch(SimpleNamespace(x=x, seeds=[0, 7], epoch=0), 20)
    b = _evaluation_batch(SimpleNamespace(x=x, seeds=[0, 7], epoch=9), 20)
    c = _evaluation_batch(SimpleNamespace(x={"train": torch.zeros(1, 100, 3)}, seeds=[7]), 20)
    assert a.shape == (2, 20) and torch.equal(a, b) and torch.equal(a[1], c[0])
    assert bool((a[:, 1:] > a[:, :-1]).all()) and not torch.equal(a[0], a[1])
    assert _evaluation_batch(SimpleNamespace(x=x, seeds=[0, 7]), 500).shape == (2, 100)


# -- analysis sweep ------------------------------------------------------------------------------
def test_variance_sweep_rows():
    method, x, idx = small_method("semi_amortized", "reparam", "none", seen_mean=False)
    estimators = [("reparam", "none", "analytic"), ("score", "none", "analytic"),
                  ("score", "mean", "analytic"), ("score", "loo", "analytic"),
                  ("stl", "none", "mc")]
    rows = gradstats.variance_sweep(method, x, idx, estimators=estimators, n_mcs=(1, 2), draws=5,
                                    random=MemberRandom.from_seeds(SEEDS, "sweep"))
    cells = {(r["estimator"], r["baseline"], r["kl"], r["n_mc"]) for r in rows}
    assert cells == {(e, b, kl, m) for e, b, kl in estimators for m in (1, 2)
                     if (b, m) != ("loo", 1)}
    assert {r["member"] for r in rows} == {0, 1}
    assert {r["param_group"] for r in rows} == {"variational", "encoder", "decoder"}
    assert {r["metric"] for r in rows} == set(gradstats.METRICS)
    assert all(math.isfinite(r["value"]) and r["draws"] == 5 for r in rows)
    # the same streams fix the sweep
    assert rows == gradstats.variance_sweep(method, x, idx, estimators=estimators, n_mcs=(1, 2),
                                            draws=5,
                                            random=MemberRandom.from_seeds(SEEDS, "sweep"))
    # the untrained model's `mean` baseline is the pilot ELBO, not 0 (= the plain score function)
    value = {(r["member"], r["baseline"], r["n_mc"], r["param_group"], r["metric"]): r["value"]
             for r in rows if r["estimator"] == "score"}
    for member in (0, 1):
        key = (1, "variational", "grad_var_total")
        assert value[(member, "mean", *key)] != value[(member, "none", *key)]
