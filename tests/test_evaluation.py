"""Tests of vi.evaluation and the probes built on it: log p(x), q*, the gap decomposition,
test-time curves, latent activity, and the probes' contracts.

The linear-Gaussian model is the ground truth: with the decoder set to the generating PPCA
parameters (W non-orthogonal, so the diagonal family has a non-zero approximation gap), exact
log p(x), the exact ELBO of any diagonal q and the closed-form gap KL(q* ‖ p(z | x)) are known.
Monte Carlo comparisons use Bonferroni-corrected z-scores (``conftest``); the nats tolerances
for q* and the IWAE are the study's acceptance thresholds.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import DTYPE, bonferroni_crit, member_random

from vi import evaluation, linear_gaussian
from vi.config import RunConfig
from vi.data import load_dataset
from vi.decoders import GaussianDecoder
from vi.inference import MethodSettings, StoppingRule, build_method
from vi.objectives import iwae_bound
from vi.probes import PROBES, build_probes
from vi.streams import MemberRandom, generator
from vi.training import ProbeContext, Trainer, load_checkpoint

GAP_METRICS = {"iwae", "elbo_qstar", "elbo_qphi", "approximation_gap", "amortization_gap",
               "qstar_steps", "qstar_decays", "qstar_capped", "iwae_ess_min",
               "iwae_low_ess_points"}
AIS_METRICS = {"ais", "ais_se", "ais_ess_min", "ais_acceptance"}

# Small probe settings shared by the trainer-level tests (the defaults are for real runs).
QUICK_GAPS = {"points": 40, "qstar_window": 50, "qstar_patience": 5, "qstar_max_steps": 1500,
              "qstar_n_mc": 10, "iwae_k": 500, "gap_n_mc": 500, "ais_steps": 100}
QUICK_CURVE = {"steps": [0, 1, 4, 16], "n_mc": 50, "points": 40}
# Cheaper still where only reproducibility is tested.
REPRO_GAPS = {**QUICK_GAPS, "points": 20, "qstar_window": 10, "qstar_patience": 2,
              "qstar_max_steps": 100, "iwae_k": 100, "gap_n_mc": 100}


@pytest.fixture(scope="module")
def ppca():
    """The ppca data set (D=20, H=4) and a float64 one-member linear decoder at its generating
    parameters; x is [1, 50, D] (member axis first)."""
    ds = load_dataset("ppca", seed=0)
    t = ds.ground_truth
    W, b, psi = t["W"].to(DTYPE), t["b"].to(DTYPE), t["psi"].to(DTYPE)
    decoder = GaussianDecoder(ds.data_dim, W.shape[1], mean="linear", variance="learned",
                              isotropic=True, generators=[generator(0, "init")]).to(DTYPE)
    decoder.set_linear_parameters(W, b, psi[0])
    x = ds.train.to(DTYPE)[:50]
    gap = float(linear_gaussian.approximation_gap(W, psi))
    assert gap > 0.05  # the test is only informative when the diagonal family loses something
    return dict(dataset=ds, decoder=decoder, W=W, b=b, psi=psi, x=x.unsqueeze(0), gap=gap,
                lam_opt=linear_gaussian.optimal_diagonal_posterior(x, W, b, psi).unsqueeze(0))


def _check_ppca_gaps(p, lam_star, random):
    decoder, x = p["decoder"], p["x"]
    iw, exact_lpx = evaluation.log_marginal(decoder, x, lam_star, k=5000, defensive=0.2,
                                            random=random)
    l_star = evaluation.elbo_value(decoder, x, lam_star, n_mc=1, random=random)
    assert l_star.exact and exact_lpx is not None and torch.equal(l_star.se,
                                                                  torch.zeros_like(l_star.se))
    exact = linear_gaussian.exact_log_marginal(x[0], p["W"], p["b"], p["psi"])
    torch.testing.assert_close(exact_lpx[0], exact)
    # IWAE_5000 with the defensive proposal on q* within 0.1 nats of the exact log p(x), every
    # point.
    assert float((iw.value[0] - exact).abs().max()) < 0.1
    # L[q*] ≤ log p(x) − gap exactly (no diagonal q beats the optimum), within 0.05 nats on average.
    target = exact - p["gap"]
    assert bool((l_star.value[0] <= target + 1e-9).all())
    assert float((target - l_star.value[0]).mean()) < 0.05
    estimated_gap = float((exact_lpx - l_star.value).mean())
    assert estimated_gap == pytest.approx(p["gap"], abs=0.05)


def test_ppca_gap_matches_closed_form(ppca):
    g = torch.Generator().manual_seed(1)
    lam_opt = ppca["lam_opt"]
    start = lam_opt + 0.5 * torch.randn(lam_opt.shape, generator=g, dtype=DTYPE)
    random = member_random(1)
    fit = evaluation.fit_optimal_posterior(
        ppca["decoder"], ppca["x"], start, n_mc=30, lr=1e-2, rule=StoppingRule(50, 5, 1500),
        random=random)
    lam_star, steps = fit.lam, fit.steps
    assert steps.shape == (1,) and int(steps.max()) <= 1500
    assert lam_star.shape == lam_opt.shape and not lam_star.requires_grad
    _check_ppca_gaps(ppca, lam_star, random)


@pytest.mark.slow
def test_ppca_gap_from_the_prior_with_the_gaps_probe_rule(ppca):
    """q* from λ = 0 with the Cremer et al. window (100, patience 10, cap 5000), the gaps
    probe's default."""
    random = member_random(2)
    fit = evaluation.fit_optimal_posterior(
        ppca["decoder"], ppca["x"], torch.zeros_like(ppca["lam_opt"]), n_mc=30, lr=1e-2,
        rule=StoppingRule(100, 10, 5000), random=random)
    assert int(fit.steps[0]) >= 1100  # window · (patience + 1): the earliest possible stop
    _check_ppca_gaps(ppca, fit.lam, random)


def test_log_marginal_matches_iwae_bound_on_the_same_noise(ppca):
    decoder, x, lam = ppca["decoder"], ppca["x"], ppca["lam_opt"]
    ours, exact = evaluation.log_marginal(decoder, x, lam, k=300, defensive=0.2,
                                          random=member_random(3))
    ref = iwae_bound(decoder, x, lam, 300, member_random(3), defensive=0.2)
    torch.testing.assert_close(ours.value, ref.value)
    torch.testing.assert_close(exact, evaluation.exact_log_marginal(decoder, x))
    assert bool((ours.ess > 0).all() and (ours.ess <= 300 + 1e-6).all())


def test_exact_log_marginal_only_for_linear_decoders(ppca):
    x = ppca["x"]
    torch.testing.assert_close(
        evaluation.exact_log_marginal(ppca["decoder"], x)[0],
        linear_gaussian.exact_log_marginal(x[0], ppca["W"], ppca["b"], ppca["psi"]))
    mlp = GaussianDecoder(x.shape[-1], 4, hidden=(8,)).to(DTYPE)
    assert evaluation.exact_log_marginal(mlp, x) is None


def test_monte_carlo_elbo_agrees_with_closed_form(ppca, monkeypatch):
    """The Monte Carlo route of ``elbo_value`` (any decoder that is not linear), forced onto
    the linear decoder: unbiased for the closed form within its reported standard error."""
    decoder, x, lam = ppca["decoder"], ppca["x"], ppca["lam_opt"] + 0.3
    exact = evaluation.elbo_value(decoder, x, lam, n_mc=1, random=member_random(4))
    monkeypatch.setattr(evaluation, "_is_linear", lambda decoder: False)
    mc = evaluation.elbo_value(decoder, x, lam, n_mc=400, chunk_size=128,
                               random=member_random(4))
    assert exact.exact and not mc.exact and bool((mc.se > 0).all())
    z = (mc.value - exact.value) / mc.se
    assert float(z.abs().max()) < bonferroni_crit(x.shape[1])
    # chunks combine exactly (chunks of 128 · B · H numbers draw the stream one draw does)
    whole = evaluation.elbo_value(decoder, x, lam, n_mc=400, chunk_size=400,
                                  random=member_random(4))
    torch.testing.assert_close(whole.value, mc.value, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(whole.se, mc.se, rtol=1e-9, atol=1e-12)


def test_stopping_rule_stops_early_at_the_optimum(ppca):
    """From λ* every check after the first fails to improve: each phase ends after ``patience``
    checks, so the fit stops at its earliest possible step, window · (1 + patience · phases),
    having taken every decay, below the cap."""
    rule = StoppingRule(window=20, patience=3, max_steps=2000, decays=2)
    fit = evaluation.fit_optimal_posterior(
        ppca["decoder"], ppca["x"], ppca["lam_opt"], n_mc=10, lr=1e-3, rule=rule,
        random=member_random(5))
    n = int(fit.steps[0])
    assert n % rule.window == 0 and n < rule.max_steps
    assert n >= rule.window * (1 + rule.patience * (rule.decays + 1))
    assert fit.decays.tolist() == [rule.decays] and fit.capped.tolist() == [False]


def test_stopping_rule_runs_to_the_cap_while_improving(ppca):
    # From the prior with a small step, every 100-step window improves on the last.
    rule = StoppingRule(window=100, patience=3, max_steps=1000)
    random = member_random(6)
    fit = evaluation.fit_optimal_posterior(
        ppca["decoder"], ppca["x"], torch.zeros_like(ppca["lam_opt"]), n_mc=10, lr=1e-3,
        rule=rule, random=random)
    assert bool((fit.steps == rule.max_steps).all())
    assert fit.capped.tolist() == [True] and fit.decays.tolist() == [0]
    gain = evaluation.elbo_value(ppca["decoder"], ppca["x"], fit.lam, n_mc=1,
                                 random=random).value \
        - evaluation.elbo_value(ppca["decoder"], ppca["x"], torch.zeros_like(fit.lam), n_mc=1,
                                random=random).value
    assert float(gain.mean()) > 0


def test_fit_stops_per_member(ppca):
    """Two members of one decoder: member 0 starts at λ* and stops early, member 1 starts at
    the prior and runs to the cap; each member's fit (λ, steps, decays, cap) is the one it gets
    alone."""
    W, b, psi = ppca["W"], ppca["b"], ppca["psi"]
    decoder = GaussianDecoder(W.shape[0], W.shape[1], members=2, mean="linear",
                              variance="learned", isotropic=True).to(DTYPE)
    decoder.set_linear_parameters(W, b, psi[0])
    x = ppca["x"].expand(2, -1, -1)
    init = torch.cat([ppca["lam_opt"], torch.zeros_like(ppca["lam_opt"])])
    rule = StoppingRule(window=20, patience=3, max_steps=400, decays=1)
    fit = evaluation.fit_optimal_posterior(
        decoder, x, init, n_mc=4, lr=1e-3, rule=rule, random=MemberRandom.from_seeds([0, 1], "q"))
    assert fit.steps.shape == (2,) and int(fit.steps[0]) < rule.max_steps == int(fit.steps[1])
    assert fit.capped.tolist() == [False, True] and fit.decays.tolist() == [1, 0]
    for k in range(2):
        alone = evaluation.fit_optimal_posterior(
            ppca["decoder"], ppca["x"], init[k:k + 1], n_mc=4, lr=1e-3, rule=rule,
            random=MemberRandom.from_seeds([k], "q"))
        for name in ("steps", "decays", "capped"):
            assert getattr(alone, name).tolist() == [getattr(fit, name).tolist()[k]], name
        torch.testing.assert_close(fit.lam[k:k + 1], alone.lam, rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------------ gaps


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


def _ppca_amortized(ppca, members: int = 1):
    decoder = GaussianDecoder(ppca["W"].shape[0], 4, members=members, mean="linear",
                              variance="learned", isotropic=True).to(DTYPE)
    decoder.set_linear_parameters(ppca["W"], ppca["b"], ppca["psi"][0])
    settings = MethodSettings(name="amortized", encoder_hidden=(16,))
    return build_method(decoder, [settings] * members, 10,
                        generators=[generator(k, "init") for k in range(members)]).to(DTYPE)


def test_gap_decomposition_on_a_linear_decoder(ppca):
    """An untrained encoder on the true decoder: log p(x) exact, L[q*] ≥ L[q_φ], both gaps
    ≥ 0, the frame's columns agree with the means, and no approximation gap is below the closed
    form's (no diagonal q beats the optimum)."""
    method = _ppca_amortized(ppca)
    x = ppca["x"][:, :20]
    out = evaluation.gap_decomposition(
        method, x, qstar_init="posterior", qstar_n_mc=10, qstar_lr=1e-2,
        qstar_rule=StoppingRule(50, 5, 1500), iwae_k=200, defensive=0.2, gap_n_mc=100,
        low_ess=0.01, random=member_random(8), ais_steps=250)
    assert set(out.means) == GAP_METRICS | AIS_METRICS | {"log_px_exact", "seconds"}
    assert all(v.shape == (1,) for v in out.means.values())
    frame = out.per_point
    assert len(frame) == 20 and (frame["member"] == 0).all()
    assert (frame["log_px_kind"] == "exact").all()  # the gap uses the exact value, AIS beside it
    _assert_gaps_nonnegative(frame, linear=True)
    assert (frame["approximation_gap"] >= ppca["gap"] - 2e-4).all()  # numbers rounded to 1e-4
    exact = linear_gaussian.exact_log_marginal(x[0], ppca["W"], ppca["b"], ppca["psi"])
    torch.testing.assert_close(torch.tensor(frame["log_px_exact"].to_numpy()), exact,
                               atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.tensor((frame["log_px_exact"] - frame["elbo_qstar"])
                                            .to_numpy()),
                               torch.tensor(frame["approximation_gap"].to_numpy()),
                               atol=2e-4, rtol=0)
    # AIS from q* (T = 250, 16 chains) beside the exact value: each point within its
    # Bonferroni-corrected standard errors plus 0.01 nat (the downward bias a finite T leaves),
    # and the mean error within 0.02 nat plus the mean's standard error
    ais = torch.tensor(frame["log_px_ais"].to_numpy())
    se = torch.tensor(frame["log_px_ais_se"].to_numpy())
    assert bool(((ais - exact).abs() <= bonferroni_crit(len(ais)) * se + 0.01).all())
    mean_se = float(se.pow(2).sum().sqrt()) / len(ais)
    assert abs(float((ais - exact).mean())) < 0.02 + bonferroni_crit(1) * mean_se
    assert float(out.means["ais"][0]) == pytest.approx(float(ais.mean()), abs=1e-4)
    assert ((frame["ais_ess"] >= 1) & (frame["ais_ess"] <= 16)).all()
    assert frame["ais_acceptance"].between(0.3, 1).all()
    assert float(out.means["amortization_gap"][0]) > 1.0  # an untrained encoder is far off
    assert float(out.means["elbo_qphi"][0]) == pytest.approx(frame["elbo_qphi"].mean())
    assert (frame["iwae_k"] == 200).all() and (frame["elbo_qstar_se"] == 0).all()


def _nonlinear_amortized(members: int = 2):
    decoder = GaussianDecoder(20, 2, members=members, hidden=(16,), mean="mlp",
                              generators=[generator(k, "init") for k in range(members)]
                              ).to(DTYPE)
    settings = MethodSettings(name="amortized", encoder_hidden=(16,))
    return build_method(decoder, [settings] * members, 10,
                        generators=[generator(k, "init") for k in range(members)]).to(DTYPE)


def test_gap_decomposition_takes_log_px_from_ais_with_iwae_beside_it(ppca):
    """A nonlinear decoder: the approximation gap is AIS − L[q*] per point; the IWAE estimate
    from the same q* sits below AIS up to their standard errors (both estimate log p(x), IWAE
    with the larger downward bias); without AIS the gap falls back to IWAE and the AIS columns
    are empty."""
    method = _nonlinear_amortized()
    x = ppca["x"][:, :30].expand(2, -1, -1).contiguous()
    settings = dict(qstar_init="posterior", qstar_n_mc=10, qstar_lr=0.03,
                    qstar_rule=StoppingRule(10, 3, 1000), iwae_k=200, defensive=0.2,
                    gap_n_mc=200, low_ess=0.01)
    out = evaluation.gap_decomposition(method, x, random=member_random(3, 4), ais_steps=200,
                                       **settings)
    frame = out.per_point
    assert set(out.means) == GAP_METRICS | AIS_METRICS | {"seconds"}
    assert (frame["log_px_kind"] == "AIS").all() and frame["log_px_exact"].isna().all()
    np.testing.assert_allclose(frame["approximation_gap"],
                               frame["log_px_ais"] - frame["elbo_qstar"], atol=2e-4)
    _assert_gaps_nonnegative(frame, linear=False)
    below = frame["log_px_ais"] - frame["log_px_iwae"]
    se = np.sqrt(frame["log_px_ais_se"] ** 2 + frame["log_px_iwae_se"] ** 2)
    assert below.mean() >= -bonferroni_crit(1) * math.sqrt((se**2).sum()) / len(frame)
    assert (frame["qstar_capped"] == 0).all()
    off = evaluation.gap_decomposition(method, x, random=member_random(3, 4), ais_steps=0,
                                       **settings)
    assert set(off.means) == GAP_METRICS | {"seconds"}
    g = off.per_point
    assert (g["log_px_kind"] == "IWAE").all() and g["log_px_ais"].isna().all()
    np.testing.assert_allclose(g["approximation_gap"], g["log_px_iwae"] - g["elbo_qstar"],
                               atol=2e-4)


def test_bdmc_check_of_a_linear_decoder_is_tight(ppca):
    """On points simulated from the true linear decoder, q* fitted from the encoder: the
    sandwich reverse − forward AIS is small at T = 200 (the exact path leaves ~0.01 nat;
    a reverse run that did not start from the simulated latents would not close it)."""
    method = _ppca_amortized(ppca)
    check = evaluation.bdmc_check(method, 20, qstar_n_mc=10, qstar_lr=0.03,
                                  qstar_rule=StoppingRule(10, 3, 1000), random=member_random(5),
                                  steps=200, chains=8)
    f = check.frame
    assert len(f) == 20 and set(check.summary) >= {"width", "width_se", "width_max"}
    assert float(check.summary["width"][0]) == pytest.approx(f["width"].mean())
    assert -0.01 < f["width"].mean() < 0.05


def _config(values: dict) -> RunConfig:
    base = {"data": {"name": "ppca", "options": {"n": 500}},
            "model": {"latent_dim": 4, "decoder_mean": "linear", "isotropic": True},
            "training": {"stopping": None, "eval_n_mc": 10}}
    for section, part in values.items():
        base[section] = {**base.get(section, {}), **part} if isinstance(part, dict) else part
    return RunConfig.from_dict(base)


def _train(config: RunConfig, probes: dict):
    (result,) = Trainer([config]).fit(build_probes(probes, config))
    assert result.status == "ok", result.message
    return result


def test_final_rows_on_ppca_vae():
    config = _config({"method": {"name": "amortized", "lr": 1e-2, "encoder_hidden": [32]},
                      "training": {"max_epochs": 3}})
    result = _train(config, {"gaps": QUICK_GAPS, "test_curve": QUICK_CURVE})
    final = [r for r in result.rows if r["metric"] in GAP_METRICS | {"log_px_exact"}]
    assert {(r["split"], r["metric"]) for r in final} == {
        (s, m) for s in ("train", "test") for m in GAP_METRICS | {"log_px_exact"}
    }
    assert all(r["epoch"] == result.best_epoch == 3 for r in final)
    curve = [r for r in result.rows if r["metric"] == "test_curve_elbo"]
    assert {(r["param_group"], r["step"]) for r in curve} == {
        (init, s) for init in ("prior", "encoder") for s in (0, 1, 4, 16)
    }
    assert all(r["split"] == "test" and r["wall_s"] >= 0 for r in curve)
    assert all(math.isfinite(r["value"]) for r in final + curve)
    frame = result.tables["gaps"]
    assert len(frame) == 2 * QUICK_GAPS["points"]
    for _, part in frame.groupby("split"):
        _assert_gaps_nonnegative(part, linear=True)
    # Step 0 from the encoder is the one-pass amortized ELBO (exact for a linear decoder).
    method = Trainer.from_states([result.state]).method
    x = Trainer([config]).x["test"][:, :QUICK_GAPS["points"]]
    with torch.no_grad():
        one_pass = evaluation.elbo_value(method.decoder, x, method.encoder(x), n_mc=1,
                                         random=member_random(0)).value[0]
    step0 = next(r for r in curve if r["param_group"] == "encoder" and r["step"] == 0)
    assert step0["value"] == pytest.approx(float(one_pass.double().mean()), rel=1e-6)
    # The amortized posterior's own ELBO is the gap decomposition's L[q_φ] on the same points.
    test_rows = frame[frame["split"] == "test"]
    assert test_rows["elbo_qphi"].to_numpy() == pytest.approx(one_pass.numpy(), rel=1e-5)


@pytest.mark.slow
def test_gaps_nonnegative_on_a_small_digits_model():
    config = RunConfig.from_dict({
        "data": {"name": "digits"}, "model": {"latent_dim": 2, "hidden": [64]},
        "method": {"name": "amortized", "lr": 1e-2, "encoder_hidden": [64]},
        "training": {"max_epochs": 30, "stopping": None},
    })
    result = _train(config, {"gaps": QUICK_GAPS})
    rows = {(r["split"], r["metric"]): r["value"] for r in result.rows
            if r["metric"] in GAP_METRICS}
    assert set(rows) == {(s, m) for s in ("train", "test") for m in GAP_METRICS}
    frame = result.tables["gaps"]
    assert frame["log_px_exact"].isna().all()
    for _, part in frame.groupby("split"):
        _assert_gaps_nonnegative(part, linear=False)


def test_checkpoint_measurement_reproduces_the_final_rows(tmp_path):
    """The final probes of a saved member state, run again from the checkpoint with the same
    seed, give the final rows exactly (each measurement has its own seeded stream); another
    seed gives other IWAE values."""
    config = _config({"method": {"name": "vem",
                                 "heldout": {"window": 5, "patience": 1, "max_steps": 20}},
                      "training": {"max_epochs": 1, "eval_splits": ["test"]}})
    spec = {"gaps": {**REPRO_GAPS, "splits": ["test"]}, "test_curve": QUICK_CURVE}
    result = _train(config, spec)
    path = tmp_path / "run.pt"
    torch.save(result.state, path)
    trainer = load_checkpoint(path)
    assert trainer.epoch == 1

    def measure(seed):
        ctx = ProbeContext(trainer.method, trainer.x, trainer.labels, [seed], trainer.configs,
                           result.best_epoch, True, True, trainer.levels)
        out = {}
        for probe in build_probes(spec, config):
            for r in probe(ctx).rows:
                key = (r["split"], r["metric"], r.get("param_group", ""), r.get("step"))
                out[key] = r["value"][0]
        return out

    trained = {(r["split"], r["metric"], r["param_group"],
                r["step"] if r["metric"] == "test_curve_elbo" else None): r["value"]
               for r in result.rows if r["metric"] in GAP_METRICS | AIS_METRICS | {
                   "log_px_exact", "test_curve_elbo"}}
    assert {k[2] for k in trained if k[1] == "test_curve_elbo"} == {"prior"}
    first, second = measure(config.seed), measure(config.seed)
    assert first == second
    first = {(s, m, g, st if m == "test_curve_elbo" else None): v
             for (s, m, g, st), v in first.items()}
    assert first == trained
    other = measure(123)
    iwae = [v for k, v in other.items() if k[1] == "iwae"]
    assert iwae != [v for k, v in first.items() if k[1] == "iwae"]


@pytest.mark.slow
def test_defensive_iwae_reaches_exact_log_marginal_on_every_ppca_test_point():
    """The PPCA maximum-likelihood decoder of the ppca training split, rotated by a fixed R
    (W R is as good an MLE as W: the same log p(x)); q* = the best diagonal posterior of each
    of the 400 test points. IWAE_5000 with the defensive proposal (α = 0.2) is within 0.1 nat
    of the exact log p(x) on every point.

    Why rotate: the unrotated MLE, W = U (Λ − s² I)^½, has orthogonal columns, so the posterior
    factorises, q* is exact and every proposal is perfect. Rotated, the posterior is correlated
    (closed-form gap 0.19 nats) and q* is narrower than the posterior. Measured (float64,
    streams 0, 1, 2): the plain proposal (defensive = 0) misses by up to 0.18, 0.09, 0.06 nats
    (2 of the 400 points beyond 0.1 nat on stream 0), with smallest ESS 41, 234 and 447 of
    5000; the defensive mixture's worst error is 0.035 nat with ESS above 2,960 on every point.
    """
    ds = load_dataset("ppca", seed=0, n=2000)
    x, xt = ds.train.to(DTYPE), ds.test.to(DTYPE)
    assert xt.shape[0] == 400
    W, b, s2 = linear_gaussian.ppca_mle(x, 4)
    rotation, _ = torch.linalg.qr(torch.randn(4, 4, generator=torch.Generator().manual_seed(0),
                                              dtype=DTYPE))
    decoder = GaussianDecoder(20, 4, mean="linear", variance="learned", isotropic=True).to(DTYPE)
    decoder.set_linear_parameters(W @ rotation, b, s2)
    Wd, bd, psi = (t[0].detach() for t in decoder.linear_parameters())
    torch.testing.assert_close(linear_gaussian.exact_log_marginal(x, Wd, bd, psi),
                               linear_gaussian.exact_log_marginal(x, W, b, s2))  # still the MLE
    assert float(linear_gaussian.approximation_gap(Wd, psi)) > 0.1
    lam_star = linear_gaussian.optimal_diagonal_posterior(xt, Wd, bd, psi).unsqueeze(0)
    exact = evaluation.exact_log_marginal(decoder, xt.unsqueeze(0))
    iw = iwae_bound(decoder, xt.unsqueeze(0), lam_star, 5000,
                    MemberRandom.from_seeds([0], "iwae"), defensive=0.2)
    error = (iw.value - exact).abs()
    assert float(error.max()) < 0.1, int((error >= 0.1).sum())
    assert float(iw.ess.min()) > 0.5 * 5000


# ------------------------------------------------------------------------ test-time inference


def test_test_time_curve_starts(ppca):
    """One curve per start of the method; step 0 from the prior is the ELBO at λ = 0 and from
    the encoder the one-pass amortized ELBO; E-steps from the prior raise the ELBO."""
    method = _ppca_amortized(ppca)
    x = ppca["x"][:, :20]
    out = evaluation.test_time_curve(method, x, [0, 8, 2], n_mc=10, random=member_random(9))
    assert [(init, s) for init, s, _, _ in out] == [
        (init, s) for init in ("prior", "encoder") for s in (0, 2, 8)]
    values = {(init, s): v for init, s, v, _ in out}
    assert all(v.shape == (1,) for v in values.values())
    assert all(t >= 0 for *_, t in out)
    prior0 = linear_gaussian.elbo_closed_form(x[0], torch.zeros(20, 8, dtype=DTYPE),
                                              ppca["W"], ppca["b"], ppca["psi"]).mean()
    assert float(values["prior", 0]) == pytest.approx(float(prior0), rel=1e-10)
    with torch.no_grad():
        enc0 = linear_gaussian.elbo_closed_form(x[0], method.encoder(x)[0], ppca["W"], ppca["b"],
                                                ppca["psi"]).mean()
    assert float(values["encoder", 0]) == pytest.approx(float(enc0), rel=1e-10)
    assert float(values["prior", 8]) > float(values["prior", 2]) > float(values["prior", 0])
    with pytest.raises(ValueError, match="steps must be counts >= 0"):
        evaluation.test_time_curve(method, x, [-1, 2], n_mc=10, random=member_random(9))
    with pytest.raises(ValueError, match="steps must be counts >= 0"):
        evaluation.test_time_curve(method, x, [], n_mc=10, random=member_random(9))


# --------------------------------------------------------------------------- latent activity


def test_latent_activity_finds_the_dead_dimension():
    """An encoder whose output for latent dimension 0 is constant (μ₀ = 0, log σ₀² = 0 for every
    x: its weights and biases zeroed) has H − 1 active units, and that dimension's KL to the
    prior is 0 (the collapsed posterior is the prior); the other dimensions vary with x."""
    d, h, n = 6, 3, 200
    decoder = GaussianDecoder(d, h, hidden=(8,), generators=[generator(0, "init")]).to(DTYPE)
    method = build_method(decoder, [MethodSettings(name="amortized", encoder_hidden=(16,))], n,
                          generators=[generator(0, "init")]).to(DTYPE)
    views = method.encoder.params.views()
    with torch.no_grad():
        for column in (0, h):  # μ₀ and log σ₀²
            views["w1"][..., column] = 0.0
            views["b1"][..., column] = 0.0
        views["w1"][..., :h] *= 10  # the live means vary well above the threshold
    x = 2.0 * torch.randn(1, n, d, generator=torch.Generator().manual_seed(3), dtype=DTYPE)
    out = evaluation.latent_activity(method, x, threshold=0.01, random=member_random(0))
    assert out.active_units.tolist() == [h - 1]
    assert out.activity.shape == out.kl_per_dim.shape == (1, h)
    assert float(out.activity[0, 0]) == 0.0 and bool((out.activity[0, 1:] > 0.01).all())
    assert float(out.kl_per_dim[0, 0]) == pytest.approx(0.0, abs=1e-12)
    assert bool((out.kl_per_dim[0, 1:] > 0.01).all())
    # the KL per dimension is the closed form, averaged over the points
    with torch.no_grad():
        lam = method.encoder(x)[0]
    mu, logvar = lam[:, :h], lam[:, h:]
    torch.testing.assert_close(out.kl_per_dim[0],
                               (0.5 * (logvar.exp() + mu**2 - 1 - logvar)).mean(0))


# ------------------------------------------------------------------------------------ probes


def test_build_probes_rejects_unknown_probes_and_options():
    config = RunConfig.from_dict({"data": {"name": "ppca"}})
    linear = RunConfig.from_dict({"data": {"name": "ppca"},
                                  "model": {"decoder_mean": "linear", "isotropic": True}})
    with pytest.raises(ValueError, match=r"unknown probe 'gap'; valid: gradvar, gaps"):
        build_probes({"gap": {}}, config)
    with pytest.raises(ValueError, match=r"probe 'gaps': .*probes\.gaps\.iwae_samples"):
        build_probes({"gaps": {"iwae_samples": 10}}, config)
    bad = [
        ({"gaps": {"qstar_init": "encoder"}}, "probe 'gaps': qstar_init"),
        ({"gaps": {"points": 0}}, "probe 'gaps': points"),
        ({"gaps": {"defensive": 1.0}}, "probe 'gaps': defensive"),
        ({"gaps": {"iwae_k": 2.5}}, "probe 'gaps': .*probes.gaps.iwae_k"),
        ({"test_curve": {"steps": [-1, 2]}}, "probe 'test_curve': steps"),
        ({"test_curve": {"split": "dev"}}, "probe 'test_curve': unknown split 'dev'"),
        ({"gradvar": {"draws": 1}}, "probe 'gradvar': draws must be >= 2"),
        ({"gradvar": {"epochs": [-3]}}, "probe 'gradvar': epochs"),
        ({"activity": {"threshold": -1.0}}, "probe 'activity': threshold"),
        ({"exact": {}}, "probe 'exact': needs a linear decoder"),
        ({"latents": {}}, "probe 'latents': needs labelled data"),
        ({"images": {"n_recon": 0}}, "probe 'images': n_recon"),
        ({"variance_sweep": {"n_mc": []}}, "probe 'variance_sweep': n_mc"),
        ({"variance_sweep": {"estimators": [["score", "loo"]]}},
         r"probe 'variance_sweep': estimators entries are \[estimator, baseline, kl\]"),
        ({"variance_sweep": {"estimators": [["reparam", "loo", "mc"]]}},
         "probe 'variance_sweep': baselines apply to the score estimator only"),
    ]
    for spec, match in bad:
        with pytest.raises(ValueError, match=match):
            build_probes(spec, config)
    assert [p.name for p in build_probes({"exact": {}, "gaps": {}}, linear)] == ["exact", "gaps"]


@pytest.fixture(scope="module")
def probe_contexts():
    """Final-state contexts of two-member ensembles at initialisation: a linear-isotropic ppca
    VAE with H = 2 (every probe but ``latents``) and a digits VAE (labelled data)."""
    out = {}
    for name, data, model in (
            ("ppca", {"name": "ppca", "options": {"data_dim": 6, "latent_dim": 2, "n": 100}},
             {"latent_dim": 2, "decoder_mean": "linear", "isotropic": True}),
            ("digits", {"name": "digits"}, {"latent_dim": 2, "hidden": [8]})):
        config = RunConfig.from_dict({"data": data, "model": model,
                                      "method": {"name": "amortized", "encoder_hidden": [8]},
                                      "training": {"stopping": None, "batch_size": 20}})
        trainer = Trainer([config, config.replace(seed=1)])
        out[name] = (config, ProbeContext(trainer.method, trainer.x, trainer.labels,
                                          trainer.seeds, trainer.configs, 0, True, True,
                                          trainer.levels, trainer.image_shape, trainer.pixels))
    return out


def test_images_of_data_that_keep_some_pixels_name_each_pixel_by_its_place() -> None:
    """mnist5k keeps 486 of the 784 pixels: the images table names each column by its pixel's
    row-major index in the 28 × 28 image, and the pictures put every value back in its place."""
    from experiments.figures.pictures import _as_images

    config = RunConfig.from_dict({"data": {"name": "mnist5k"},
                                  "model": {"latent_dim": 2, "hidden": [8]},
                                  "method": {"name": "amortized", "encoder_hidden": [8]},
                                  "training": {"stopping": None, "batch_size": 20}})
    trainer = Trainer([config])
    ctx = trainer._context(final=True, evaluating=True, epoch=0)
    (probe,) = build_probes({"images": {"n_recon": 2, "n_samples": 1, "manifold": 2}}, config)
    table = probe(ctx).tables["images"]
    pix = [c for c in table.columns if c.startswith("p") and c[1:].isdigit()]
    assert [int(c[1:]) for c in pix] == trainer.pixels and len(pix) == 486
    assert set(table["height"]) == {28} and set(table["width"]) == {28}
    data = table[table["kind"] == "data"].sort_values("index")
    images = _as_images(data, pix, (28, 28), -1.0).reshape(2, 784)
    every = load_dataset("mnist5k", min_pixel_fraction=0).test[:2].numpy()
    kept = np.zeros(784, dtype=bool)
    kept[trainer.pixels] = True
    np.testing.assert_array_equal(images[:, kept], every[:, kept])
    assert np.all(images[:, ~kept] == -1.0)


#: small options for the study's probes; a probe not listed runs with its defaults
PROBE_OPTIONS = {
    "gradvar": {"draws": 4, "batch": 8},
    "gaps": {"points": 6, "qstar_window": 5, "qstar_patience": 1, "qstar_max_steps": 10,
             "iwae_k": 20, "gap_n_mc": 10, "ais_steps": 5, "ais_chains": 2, "bdmc_points": 3},
    "test_curve": {"steps": [0, 2], "points": 6, "n_mc": 5},
    "exact": {},
    "activity": {},
    "images": {"n_recon": 3, "n_samples": 2, "manifold": 3},
    "latents": {},
    "variance_sweep": {"n_mc": [2], "draws": 3, "batch": 4,
                       "estimators": [["reparam", "none", "analytic"], ["score", "loo", "mc"]]},
    "k_sweep": {"ks": [1, 2], "draws": 3, "batch": 4},
    "iwae_bounds": {"ks": [1, 3], "points": 6, "repeats": 2},
}


@pytest.mark.parametrize("name", sorted(PROBES))
def test_each_probe_returns_the_metrics_it_declares(probe_contexts, name):
    """Each probe on a tiny two-member model: exactly its declared metrics (one finite value per
    member) and its declared tables (a ``member`` column with both members)."""
    config, ctx = probe_contexts["digits" if name == "latents" else "ppca"]
    (probe,) = build_probes({name: PROBE_OPTIONS.get(name, {})}, config)
    assert probe.name == name and probe.due(ctx)
    result = probe(ctx)
    assert {r["metric"] for r in result.rows} == set(probe.metrics)
    for r in result.rows:
        assert len(r["value"]) == 2 and all(math.isfinite(v) for v in r["value"]), r
        assert r["split"] in ("train", "validation", "test")
    assert set(result.tables) == set(probe.tables)
    for table in result.tables.values():
        assert set(table["member"]) == {0, 1} and len(table) > 0
    assert result.failed == set()
