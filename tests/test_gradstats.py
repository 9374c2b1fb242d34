"""Gradient-variance instrumentation (SPEC §6, issue 4): per-draw gradients, their statistics,
logging during training and the analysis sweep.

Statistical tests follow conftest's convention: a seeded z-score against a Bonferroni-corrected
normal critical value at family-wise α = 1e-3.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import DTYPE, bonferroni_crit
from scipy.stats import norm

from vi import gradstats
from vi.decoders import GaussianDecoder
from vi.inference import MethodSettings, build_method, replace_settings
from vi.training import TrainConfig, Trainer

CONFIGS = [
    ("reparam", "none"),
    ("stl", "none"),
    ("score", "none"),
    ("score", "mean"),
    ("score", "loo"),
    ("score", "cv"),
]
METHOD_NAMES = ("vem", "amortized", "semi_amortized")


def small_method(name: str, estimator: str, baseline: str, kl: str = "analytic", n_mc: int = 3):
    """A float64 method on a small MLP decoder (D=5, H=2), off its initial point: random
    table rows for vem, a running mean that has seen one update (for ``mean``)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        decoder = GaussianDecoder(5, 2, hidden=[7]).to(DTYPE)
        settings = MethodSettings(estimator=estimator, baseline=baseline, kl=kl, n_mc=n_mc,
                                  encoder_hidden=(6,), refine_steps=2)
        method = build_method(name, decoder, settings, n_train=10).to(DTYPE)
        if name == "vem":
            method.local.normal_(0.0, 0.5)
    method.running_mean.update(torch.tensor([-7.0]))
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(4), dtype=DTYPE)
    return method, x, torch.tensor([1, 3, 5, 7])


def digits_trainer(method: str = "amortized", **overrides) -> Trainer:
    config = dict(method=method, latent_dim=2, hidden=[64], encoder_hidden=[64], epochs=1)
    return Trainer(TrainConfig.from_dict(config | overrides))


def total_variance_and_se(g: torch.Tensor) -> tuple[float, float]:
    """T̂ = (1/(K−1)) Σ_k ‖g_k − ḡ‖² and its delta-method standard error sd_k(‖g_k − ḡ‖²)/√K."""
    dev = (g - g.mean(0)).pow(2).sum(1).to(DTYPE)
    k = g.shape[0]
    return float(dev.sum() / (k - 1)), float(dev.std() / math.sqrt(k))


# -- batched = loop ------------------------------------------------------------------------------
@pytest.mark.parametrize("kl", ["analytic", "mc"])
@pytest.mark.parametrize(("estimator", "baseline"), CONFIGS)
@pytest.mark.parametrize("name", METHOD_NAMES)
def test_batched_equals_loop_of_autograd_calls(name, estimator, baseline, kl):
    """Every group, every estimator: the batched per-draw gradients (one backward over copies,
    vmap over the encoder's vjp, vmap(grad) for the decoder) equal K ordinary autograd calls on
    the same noise, and the semi-amortized refinement matches ``method.local_ascent``."""
    method, x, idx = small_method(name, estimator, baseline, kl)
    k = 5
    batched = gradstats.per_sample_grads(method, x, idx, draws=k, chunk_size=2,
                                         generator=torch.Generator().manual_seed(9))
    gen = torch.Generator().manual_seed(9)  # replay: refinement (semi) first, then the noise
    refined = None
    if name == "semi_amortized":
        s = method.settings
        lam0 = method.encoder(x).detach()
        refined = method.local_ascent(x, lam0, gen, s.refine_steps, s.refine_lr).detach()
    noise = torch.randn((k, method.settings.n_mc, x.shape[0], 2), generator=gen, dtype=DTYPE)
    loop = gradstats.per_sample_grads_loop(method, x, idx, noise, refined=refined)
    assert set(batched) == set(loop) == set(gradstats.groups_of(method))
    for group, g in batched.items():
        assert g.shape == loop[group].shape and g.shape[0] == k
        assert float(g.abs().max()) > 0, group
        torch.testing.assert_close(g, loop[group], rtol=1e-6, atol=1e-6 * (1 + float(
            loop[group].abs().max())), msg=f"{name}/{estimator}/{baseline}/{kl}: {group}")
    # the draws are independent: no two rows equal
    assert torch.unique(batched["decoder"], dim=0).shape[0] == k


def test_groups_follow_the_training_objective():
    """The λ group is ∇ of the minibatch *sum* (per point), θ/φ of the *mean*; vem's local
    group holds the same numbers as its variational group."""
    method, x, idx = small_method("vem", "reparam", "none")
    noise = torch.randn((3, 3, 4, 2), generator=torch.Generator().manual_seed(0), dtype=DTYPE)
    g = gradstats.per_sample_grads(method, x, idx, noise=noise)
    torch.testing.assert_close(g["local"], g["variational"], rtol=0, atol=0)
    from vi.objectives import elbo

    lam = method.local[idx].clone().requires_grad_()
    est = elbo(method.decoder, x, lam, noise[0])
    (g_lam,) = torch.autograd.grad(est.surrogate.sum(), lam, retain_graph=True)
    torch.testing.assert_close(g["variational"][0], g_lam.reshape(-1))
    grads = torch.autograd.grad(est.surrogate.mean(), list(method.decoder.parameters()))
    torch.testing.assert_close(g["decoder"][0], torch.cat([t.reshape(-1) for t in grads]))


def test_measuring_does_not_touch_the_method():
    method, x, idx = small_method("semi_amortized", "score", "mean")
    state = {k: v.clone() for k, v in method.state_dict().items()}
    opt, rm = repr(method.optimizer_state()), method.running_mean.state_dict()
    gradstats.per_sample_grads(method, x, idx, draws=4, generator=torch.Generator())
    for k, v in method.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert repr(method.optimizer_state()) == opt and method.running_mean.state_dict() == rm
    assert all(p.grad is None for p in method.parameters())


def test_chunking_does_not_change_the_draws():
    method, x, idx = small_method("amortized", "score", "loo")
    noise = torch.randn((7, 3, 4, 2), generator=torch.Generator().manual_seed(1), dtype=DTYPE)
    whole = gradstats.per_sample_grads(method, x, idx, noise=noise)
    chunked = gradstats.per_sample_grads(method, x, idx, noise=noise, chunk_size=3)
    for group in whole:
        torch.testing.assert_close(whole[group], chunked[group], rtol=1e-12, atol=1e-12)


def test_bad_arguments_raise():
    method, x, idx = small_method("vem", "score", "loo")
    with pytest.raises(ValueError, match="no parameter group"):
        gradstats.per_sample_grads(method, x, idx, draws=2, groups=["encoder"])
    with pytest.raises(ValueError, match="needs n_mc >= 2"):
        gradstats.per_sample_grads(method, x, idx, draws=2, n_mc=1)
    with pytest.raises(ValueError, match="draws"):
        gradstats.per_sample_grads(method, x, idx, draws=0)
    with pytest.raises(ValueError, match="idx"):
        gradstats.per_sample_grads(method, x, None, draws=2)
    with pytest.raises(ValueError, match="K >= 2"):
        gradstats.gradient_statistics(torch.zeros(1, 3))


# -- statistics ----------------------------------------------------------------------------------
def test_statistics_formulas_and_no_nan():
    g = torch.randn(50, 6, generator=torch.Generator().manual_seed(2), dtype=DTYPE) + 1.0
    g[:, 4] = 2.5  # deterministic coordinate: out of the SNR
    g[:, 5] = 0.0  # always zero (e.g. an unused parameter)
    st = gradstats.gradient_statistics(g)
    a = g.numpy()
    v = a.var(0, ddof=1)
    assert st["grad_var_total"] == pytest.approx(v.sum(), rel=1e-12)
    assert st["grad_mean_norm"] == pytest.approx(np.linalg.norm(a.mean(0)), rel=1e-12)
    assert st["grad_var_relative"] == pytest.approx(v.sum() / (a.mean(0) ** 2).sum(), rel=1e-12)
    snr = np.abs(a.mean(0)[:4]) / np.sqrt(v[:4])
    assert st["grad_snr_mean"] == pytest.approx(snr.mean(), rel=1e-12)
    assert st["grad_snr_median"] == pytest.approx(np.median(snr), rel=1e-12)
    assert st["n_deterministic"] == 2 and st["draws"] == 50 and st["n_coords"] == 6
    zero = gradstats.gradient_statistics(torch.zeros(4, 3))
    assert set(zero) & set(gradstats.METRICS) == {"grad_var_total", "grad_mean_norm"}
    assert all(math.isfinite(v) for k, v in zero.items() if k in gradstats.METRICS)
    bad = g.clone()
    bad[0, 0] = float("nan")
    assert all(math.isfinite(v) for k, v in gradstats.gradient_statistics(bad).items()
               if k in gradstats.METRICS)


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
    method = build_method("vem", m.decoder, MethodSettings(n_mc=n_mc), n_train=m.B).to(DTYPE)
    method.local.copy_(m.lam)
    idx = torch.arange(m.B)
    g = gradstats.per_sample_grads(method, m.x, idx, draws=k, generator=torch.Generator()
                                   .manual_seed(11), groups=["variational"])["variational"]
    tr_mu, tr_mu2, tr_s = linear_gaussian_variance(m, m.lam, n_mc)
    blocks = g.reshape(k, m.B, 2 * m.H)
    g_mu, g_s = (blocks[..., : m.H].reshape(k, -1), blocks[..., m.H:].reshape(k, -1))
    crit = bonferroni_crit(3)
    measured_mu = gradstats.gradient_statistics(g_mu)["grad_var_total"]
    z_mu = (measured_mu - tr_mu) / math.sqrt(2 * tr_mu2 / (k - 1))
    measured_s, se_s = total_variance_and_se(g_s)
    measured, se = total_variance_and_se(g)
    assert gradstats.gradient_statistics(g)["grad_var_total"] == pytest.approx(measured)
    z_s, z_all = (measured_s - tr_s) / se_s, (measured - tr_mu - tr_s) / se
    assert max(abs(z_mu), abs(z_s), abs(z_all)) <= crit, (z_mu, z_s, z_all)
    # the test has power: a 10% error in either block would be caught
    assert se_s / tr_s < 0.02 and math.sqrt(2 * tr_mu2 / (k - 1)) / tr_mu < 0.02


def test_reparam_variance_scales_as_one_over_m():
    """log tr Σ̂_M against log M has slope −1 (the M-sample estimate averages M iid single-sample
    gradients). Var(log T̂) ≈ (SE/T̂)² by the delta method; the OLS slope's SE follows from those
    independent (fresh noise per M) errors, and the check uses crit · SE."""
    trainer = digits_trainer()
    idx = torch.arange(8)
    x = trainer.x["train"][idx]
    ms = np.array([1, 2, 4, 8, 16])
    gen = torch.Generator().manual_seed(5)
    groups = ("variational", "decoder")
    logs = {g: [] for g in groups}
    var_logs = {g: [] for g in groups}
    for m in ms:
        grads = gradstats.per_sample_grads(trainer.method, x, idx, draws=100, n_mc=int(m),
                                           generator=gen, groups=groups)
        for g in groups:
            t, se = total_variance_and_se(grads[g])
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
    trainer = digits_trainer(name)
    method = trainer.method
    idx = gradstats.evaluation_batch(trainer)[:32]
    x = trainer.x["train"][idx]
    noise = torch.randn((300, 4, idx.shape[0], 2), generator=torch.Generator().manual_seed(6))
    tv = {}
    for est, base in [("reparam", "none"), ("score", "none"), ("score", "loo")]:
        s = replace_settings(method.settings, estimator=est, baseline=base)
        g = gradstats.per_sample_grads(method, x, idx, noise=noise, settings=s,
                                       groups=["variational"])["variational"]
        tv[base if est == "score" else est] = total_variance_and_se(g)
    crit = float(norm.ppf(1 - 1e-3 / 2))  # two comparisons, one-sided, α = 1e-3 overall

    def z(a, b):
        return (tv[a][0] - tv[b][0]) / math.hypot(tv[a][1], tv[b][1])

    assert z("none", "reparam") > crit, tv
    assert z("none", "loo") > crit, tv


# -- logging during training ---------------------------------------------------------------------
def test_default_schedule():
    config = TrainConfig(epochs=20)
    assert [e for e in range(25) if gradstats.scheduled(config, e)] == [0, 1, 2, 4, 8, 16, 20]
    config = TrainConfig(epochs=3, gradvar_epochs=[0, 3])
    assert [e for e in range(5) if gradstats.scheduled(config, e)] == [0, 3]


def _tiny(method: str, gradvar: bool) -> dict:
    return dict(method=method, estimator="score", baseline="mean", n_mc=2, latent_dim=2,
                hidden=[16], encoder_hidden=[16], epochs=2, batch_size=480, refine_steps=2,
                refine_lr=0.01,  # score-function refinement at 0.1 diverges on this model
                eval_splits=["train"], eval_n_mc=1, gradvar=gradvar, gradvar_draws=6,
                gradvar_batch=10)


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_logging_leaves_training_identical(name):
    """Same configuration with and without gradient-variance logging: the non-gradient rows
    (wall_s aside), the final parameters and the trainer's other streams are identical; the
    logged rows cover the schedule (0, 1, 2), every group and metric, and are finite."""
    on = Trainer(TrainConfig.from_dict(_tiny(name, True)))
    off = Trainer(TrainConfig.from_dict(_tiny(name, False)))
    rows_on, rows_off = on.fit(progress=False).rows, off.fit(progress=False).rows
    assert on.status == off.status == "ok"

    def strip(rows):
        return [{k: v for k, v in r.items() if k != "wall_s"} for r in rows
                if not r["metric"].startswith("grad_")]

    assert strip(rows_on) == strip(rows_off)
    for k, v in on.method.state_dict().items():
        assert torch.equal(v, off.method.state_dict()[k]), k
    for key in ("data", "noise", "eval"):
        assert torch.equal(on.generators[key].get_state(), off.generators[key].get_state())
    grad_rows = [r for r in rows_on if r["metric"].startswith("grad_")]
    assert {r["epoch"] for r in grad_rows} == {0, 1, 2}
    assert {r["param_group"] for r in grad_rows} == set(gradstats.groups_of(on.method))
    assert {r["metric"] for r in grad_rows} == set(gradstats.METRICS)
    assert all(r["split"] == "train" and r["n_mc"] == 2 for r in grad_rows)
    assert all(math.isfinite(r["value"]) for r in rows_on)
    assert len(grad_rows) == 3 * len(gradstats.METRICS) * 3


def test_evaluation_batch_is_fixed():
    a, b = digits_trainer("vem", gradvar_batch=20), digits_trainer("amortized", gradvar_batch=20)
    ia = gradstats.evaluation_batch(a)
    b.run_epoch()
    assert torch.equal(ia, gradstats.evaluation_batch(b))
    assert ia.shape == (20,) and bool((ia[1:] > ia[:-1]).all())


# -- analysis sweep ------------------------------------------------------------------------------
def test_variance_sweep_rows():
    trainer = digits_trainer("semi_amortized", refine_steps=1, gradvar_batch=8)
    estimators = [("reparam", "none"), ("score", "none"), ("score", "mean"), ("score", "loo")]
    rows = gradstats.variance_sweep(trainer, n_mcs=(1, 2), draws=5, estimators=estimators)
    cells = {(r["estimator"], r["baseline"], r["n_mc"]) for r in rows}
    assert cells == {(e, b, m) for e, b in estimators for m in (1, 2) if (b, m) != ("loo", 1)}
    assert {r["param_group"] for r in rows} == {"variational", "encoder", "decoder"}
    assert {r["metric"] for r in rows} == set(gradstats.METRICS)
    assert all(math.isfinite(r["value"]) for r in rows)
    assert all(r["method"] == "semi_amortized" and r["latent_dim"] == 2 and r["draws"] == 5
               for r in rows)
    # a fixed generator fixes the sweep
    assert rows == gradstats.variance_sweep(trainer, n_mcs=(1, 2), draws=5, estimators=estimators)
    # the untrained model's `mean` baseline is the pilot ELBO, not 0 (= the plain score function)
    value = {(r["baseline"], r["n_mc"], r["param_group"], r["metric"]): r["value"] for r in rows
             if r["estimator"] == "score"}
    key = (1, "variational", "grad_var_total")
    assert value[("mean", *key)] != value[("none", *key)]
