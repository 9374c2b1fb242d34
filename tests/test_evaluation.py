"""Tests of vi.evaluation: log p(x), q*, the gap decomposition, test-time curves (SPEC §5).

The linear-Gaussian model is the ground truth: with the decoder set to the generating PPCA
parameters (W non-orthogonal, so the diagonal family has a non-zero approximation gap), exact
log p(x), the exact ELBO of any diagonal q and the closed-form gap KL(q* ‖ p(z | x)) are known.
Monte Carlo comparisons use Bonferroni-corrected z-scores (``conftest``); the nats tolerances
for q* and IWAE are the issue's acceptance thresholds.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import DTYPE, bonferroni_crit

from vi import evaluation, linear_gaussian
from vi.data import load_dataset
from vi.decoders import GaussianDecoder
from vi.inference import StoppingRule
from vi.objectives import iwae_bound
from vi.training import TrainConfig, Trainer, save_checkpoint

GAP_METRICS = {"iwae", "elbo_qstar", "elbo_qphi", "approximation_gap", "amortization_gap",
               "qstar_steps"}

# Small evaluation settings shared by the trainer-level tests (defaults are for real runs).
QUICK_EVAL = {
    "gap_points": 40, "qstar_window": 50, "qstar_patience": 5, "qstar_max_steps": 1500,
    "qstar_n_mc": 10, "iwae_k": 500, "gap_n_mc": 500, "test_curve_steps": [0, 1, 4, 16],
    "test_curve_n_mc": 50,
}
# Cheaper still where only reproducibility is tested.
REPRO_EVAL = {**QUICK_EVAL, "gap_points": 20, "qstar_window": 10, "qstar_patience": 2,
              "qstar_max_steps": 100, "iwae_k": 100, "gap_n_mc": 100}


@pytest.fixture(scope="module")
def ppca():
    """The ppca data set (D=20, H=4) and a float64 linear decoder at its generating parameters."""
    ds = load_dataset("ppca", seed=0)
    t = ds.ground_truth
    W, b, psi = t["W"].to(DTYPE), t["b"].to(DTYPE), t["psi"].to(DTYPE)
    decoder = GaussianDecoder(ds.data_dim, W.shape[1], mean="linear", variance="learned",
                              isotropic=True).to(DTYPE)
    decoder.set_linear_parameters(W, b, psi[0])
    x = ds.train.to(DTYPE)[:50]
    gap = float(linear_gaussian.approximation_gap(W, psi))
    assert gap > 0.05  # the test is only informative when the diagonal family loses something
    return dict(dataset=ds, decoder=decoder, W=W, b=b, psi=psi, x=x, gap=gap,
                lam_opt=linear_gaussian.optimal_diagonal_posterior(x, W, b, psi))


def _check_ppca_gaps(p, lam_star, generator):
    decoder, x = p["decoder"], p["x"]
    lpx = evaluation.log_marginal(decoder, x, lam_star, 5000, generator=generator)
    l_star = evaluation.elbo_value(decoder, x, lam_star)
    assert l_star.exact and lpx.exact is not None
    exact = linear_gaussian.exact_log_marginal(x, p["W"], p["b"], p["psi"])
    torch.testing.assert_close(lpx.exact, exact)
    # IWAE_5000 with proposal q* within 0.1 nats of the exact log p(x), every point.
    assert float((lpx.iwae - exact).abs().max()) < 0.1
    # L[q*] ≤ log p(x) − gap exactly (no diagonal q beats the optimum), within 0.05 nats on average.
    target = exact - p["gap"]
    assert bool((l_star.value <= target + 1e-9).all())
    assert float((target - l_star.value).mean()) < 0.05
    estimated_gap = float((lpx.exact - l_star.value).mean())
    assert estimated_gap == pytest.approx(p["gap"], abs=0.05)


def test_ppca_gap_matches_closed_form(ppca):
    g = torch.Generator().manual_seed(1)
    lam_opt = ppca["lam_opt"]
    start = lam_opt + 0.5 * torch.randn(lam_opt.shape, generator=g, dtype=DTYPE)
    lam_star, steps = evaluation.fit_optimal_posterior(
        ppca["decoder"], ppca["x"], init=start, n_mc=30, lr=1e-2,
        rule=StoppingRule(50, 5, 1500), generator=g,
    )
    assert steps.shape == (ppca["x"].shape[0],) and int(steps.max()) <= 1500
    _check_ppca_gaps(ppca, lam_star, g)


@pytest.mark.slow
def test_ppca_gap_from_the_prior_with_default_rule(ppca):
    """q* from λ = 0 with the Cremer et al. rule (window 100, patience 10, cap 5000)."""
    g = torch.Generator().manual_seed(2)
    lam_star, steps = evaluation.fit_optimal_posterior(
        ppca["decoder"], ppca["x"], init=torch.zeros_like(ppca["lam_opt"]), n_mc=30, lr=1e-2,
        generator=g,
    )
    assert int(steps[0]) >= 1100  # window · (patience + 1): the earliest possible stop
    _check_ppca_gaps(ppca, lam_star, g)


def test_log_marginal_matches_iwae_bound_on_the_same_noise(ppca):
    decoder, x, lam = ppca["decoder"], ppca["x"], ppca["lam_opt"]
    ours = evaluation.log_marginal(decoder, x, lam, 300, point_chunk=None, chunk_size=128,
                                   generator=torch.Generator().manual_seed(3))
    ref = iwae_bound(decoder, x, lam, 300, chunk_size=128,
                     generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(ours.iwae, ref)
    assert bool((ours.ess > 0).all() and (ours.ess <= 300 + 1e-6).all())


def test_monte_carlo_elbo_agrees_with_closed_form(ppca):
    decoder, x, lam = ppca["decoder"], ppca["x"], ppca["lam_opt"] + 0.3
    g = torch.Generator().manual_seed(4)
    mc = evaluation.elbo_value(decoder, x, lam, n_mc=400, chunk_size=128, point_chunk=16,
                               generator=g, closed_form=False)
    exact = evaluation.elbo_value(decoder, x, lam)
    assert not mc.exact and bool((mc.se > 0).all())
    z = (mc.value - exact.value) / mc.se
    assert float(z.abs().max()) < bonferroni_crit(x.shape[0])


def test_stopping_rule_stops_early_at_the_optimum(ppca):
    rule = StoppingRule(window=20, patience=3, max_steps=2000)
    _, steps = evaluation.fit_optimal_posterior(
        ppca["decoder"], ppca["x"], init=ppca["lam_opt"], n_mc=10, lr=1e-3, rule=rule,
        generator=torch.Generator().manual_seed(5),
    )
    n = int(steps[0])
    assert rule.window * (rule.patience + 1) <= n < rule.max_steps and n % rule.window == 0


def test_stopping_rule_runs_to_the_cap_while_improving(ppca):
    # From the prior with a small step, every 100-step window improves on the last.
    rule = StoppingRule(window=100, patience=3, max_steps=1000)
    lam, steps = evaluation.fit_optimal_posterior(
        ppca["decoder"], ppca["x"], init=torch.zeros_like(ppca["lam_opt"]), n_mc=10, lr=1e-3,
        rule=rule, generator=torch.Generator().manual_seed(6),
    )
    assert bool((steps == rule.max_steps).all())
    gain = evaluation.elbo_value(ppca["decoder"], ppca["x"], lam).value - evaluation.elbo_value(
        ppca["decoder"], ppca["x"], torch.zeros_like(lam)).value
    assert float(gain.mean()) > 0


def test_fit_optimal_posterior_chunks_report_steps_per_point(ppca):
    rule = StoppingRule(window=10, patience=1, max_steps=30)
    lam, steps = evaluation.fit_optimal_posterior(
        ppca["decoder"], ppca["x"], init=torch.zeros_like(ppca["lam_opt"]), n_mc=2, lr=1e-2,
        rule=rule, generator=torch.Generator().manual_seed(7), point_chunk=20,
    )
    assert lam.shape == ppca["lam_opt"].shape and steps.shape == (ppca["x"].shape[0],)
    assert bool(((steps >= 20) & (steps <= 30)).all())
    with pytest.raises(ValueError, match="init must be"):
        evaluation.fit_optimal_posterior(ppca["decoder"], ppca["x"], init=lam[:3])


def _assert_gaps_nonnegative(frame, linear: bool) -> None:
    """Approximation gaps per point and both mean gaps ≥ 0 up to their Monte Carlo error."""
    crit = bonferroni_crit(len(frame))
    ap, ap_se = frame["approximation_gap"], frame["approximation_gap_se"]
    am, am_se = frame["amortization_gap"], frame["amortization_gap_se"]
    assert not frame.drop(columns=["log_px_exact"]).isna().any().any()
    if linear:  # exact ELBOs and log p(x): log p(x) − L[q] = KL(q ‖ p(z | x)) ≥ 0 exactly
        assert (ap >= -1e-6).all()
    else:
        assert ((ap + crit * ap_se) >= 0).all(), frame[["approximation_gap", "point"]]
    n = len(frame)
    assert ap.mean() >= -bonferroni_crit(1) * math.sqrt((ap_se**2).sum()) / n
    # Per point, q* can end a hair below q_φ from Adam's own noise (not counted in the SE).
    assert am.mean() >= -bonferroni_crit(1) * math.sqrt((am_se**2).sum()) / n


def _train(values: dict) -> Trainer:
    trainer = Trainer(TrainConfig.from_dict(values))
    result = trainer.fit(progress=False)
    assert result.status == "ok", result.message
    return trainer


def test_final_rows_on_ppca_vae():
    trainer = _train({
        "dataset": "ppca", "decoder_mean": "linear", "isotropic": True, "latent_dim": 4,
        "method": "amortized", "epochs": 3, "lr": 1e-2, "encoder_hidden": [32],
        "gaps": True, "test_curve": True, **QUICK_EVAL,
    })
    final = [r for r in trainer.rows if r["metric"] in GAP_METRICS | {"log_px_exact"}]
    assert {(r["split"], r["metric"]) for r in final} == {
        (s, m) for s in ("train", "test") for m in GAP_METRICS | {"log_px_exact"}
    }
    curve = [r for r in trainer.rows if r["metric"] == "test_curve_elbo"]
    assert {(r["param_group"], r["step"]) for r in curve} == {
        (init, s) for init in ("prior", "encoder") for s in (0, 1, 4, 16)
    }
    assert all(r["split"] == "test" and r["wall_s"] >= 0 for r in curve)
    assert all(math.isfinite(r["value"]) for r in final + curve)
    frame = trainer.tables["gaps"]
    assert len(frame) == 2 * QUICK_EVAL["gap_points"]
    for _, part in frame.groupby("split"):
        _assert_gaps_nonnegative(part, linear=True)
    # Step 0 from the encoder is the one-pass amortized ELBO (exact for a linear decoder).
    x = trainer.x["test"][:QUICK_EVAL["gap_points"]]
    with torch.no_grad():
        one_pass = evaluation.elbo_value(trainer.decoder, x, trainer.method.encoder(x)).value
    step0 = next(r for r in curve if r["param_group"] == "encoder" and r["step"] == 0)
    assert step0["value"] == pytest.approx(float(one_pass.double().mean()), rel=1e-6)
    # The amortized posterior's own ELBO is the gap decomposition's L[q_φ] on the same points.
    test_rows = frame[frame["split"] == "test"]
    assert test_rows["elbo_qphi"].to_numpy() == pytest.approx(one_pass.numpy(), rel=1e-5)


@pytest.mark.slow
def test_gaps_nonnegative_on_a_small_digits_model():
    trainer = _train({
        "dataset": "digits", "method": "amortized", "epochs": 30, "lr": 1e-2, "latent_dim": 2,
        "hidden": [64], "encoder_hidden": [64], "gaps": True, "test_curve": False,
        **QUICK_EVAL,
    })
    rows = {(r["split"], r["metric"]): r["value"] for r in trainer.rows
            if r["metric"] in GAP_METRICS}
    assert set(rows) == {(s, m) for s in ("train", "test") for m in GAP_METRICS}
    frame = trainer.tables["gaps"]
    assert frame["log_px_exact"].isna().all()
    for _, part in frame.groupby("split"):
        _assert_gaps_nonnegative(part, linear=False)


def test_checkpoint_evaluation_reproduces_the_final_rows(tmp_path):
    trainer = _train({
        "dataset": "ppca", "decoder_mean": "linear", "isotropic": True, "latent_dim": 4,
        "method": "vem", "epochs": 2, "heldout_max_steps": 100, "gaps": True,
        "test_curve": True, **REPRO_EVAL,
    })
    path = save_checkpoint(trainer, tmp_path / "run.pt")

    def strip(rows):
        return [{k: v for k, v in r.items() if k != "wall_s"} for r in rows]

    trained = strip(r for r in trainer.rows
                    if r["metric"] in GAP_METRICS | {"log_px_exact", "test_curve_elbo"})
    assert {r["param_group"] for r in trained if r["metric"] == "test_curve_elbo"} == {"prior"}
    first = evaluation.evaluate_checkpoint(path)
    second = evaluation.evaluate_checkpoint(path)
    assert strip(first.rows) == strip(second.rows) == trained
    assert first.per_point.equals(second.per_point)
    other = evaluation.evaluate_checkpoint(path, seed=123, test_curve=False)
    assert {r["metric"] for r in other.rows} == GAP_METRICS | {"log_px_exact"}
    iwae = [r["value"] for r in other.rows if r["metric"] == "iwae"]
    assert iwae != [r["value"] for r in first.rows if r["metric"] == "iwae"]
    with pytest.raises(ValueError, match="not an evaluation setting"):
        evaluation.evaluate_checkpoint(path, lr=0.1)


def test_config_rejects_bad_evaluation_settings():
    with pytest.raises(ValueError, match="qstar_init"):
        TrainConfig.from_dict({"qstar_init": "encoder"})
    with pytest.raises(ValueError, match="test_curve_steps"):
        TrainConfig.from_dict({"test_curve_steps": [-1, 2]})
    with pytest.raises(ValueError, match="gap_points"):
        TrainConfig.from_dict({"gap_points": 0})
