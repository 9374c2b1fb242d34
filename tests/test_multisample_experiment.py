"""The multisample experiment's measurements: the bias of an estimator against a reference on
common noise (``vi.gradstats.bias_statistics``), the ``k_sweep`` probe (measurements during
training kept and published with the final one) and the ``iwae_bounds`` probe (L_k of the
method's own posterior, rising with k), and the grid at every scale."""

from __future__ import annotations

import math

import pytest
import torch

import vi
from experiments.grids import load_grid
from vi import gradstats
from vi.probes import build_probes

TRIALS, DRAWS, P = 4000, 20, 5


def _draws(bias: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """g_ref = m + noise, g = g_ref + bias + other noise: [DRAWS, TRIALS, P], float64."""
    gen = torch.Generator().manual_seed(seed)
    m = torch.linspace(1.0, 2.0, P, dtype=torch.float64)
    sd = torch.linspace(0.5, 1.5, P, dtype=torch.float64)
    ref = m + torch.randn(DRAWS, TRIALS, P, generator=gen, dtype=torch.float64)
    g = ref + bias + sd * torch.randn(DRAWS, TRIALS, P, generator=gen, dtype=torch.float64)
    return g, ref


def test_bias_statistics_estimate_the_squared_bias_without_noise_bias() -> None:
    """excess = ‖d̄‖² − tr Σ_d / n is unbiased for ‖b‖² (the raw ‖d̄‖² is not): the mean over
    independent trials (members) is within 4 standard errors of ‖b‖², with b = 0 and b ≠ 0."""
    ref_norm2 = float(torch.linspace(1.0, 2.0, P, dtype=torch.float64).pow(2).sum())
    for b in (torch.zeros(P, dtype=torch.float64),
              torch.tensor([0.3, 0.0, -0.2, 0.0, 0.1], dtype=torch.float64)):
        g, ref = _draws(b, seed=1)
        stats = gradstats.bias_statistics(g, ref)
        rel = stats["grad_bias_relative"]
        se = float(rel.std() / math.sqrt(TRIALS))
        target = float(b.pow(2).sum()) / ref_norm2
        assert abs(float(rel.mean()) - target) < 4 * se + 0.01 * target, (rel.mean(), target)
        z = stats["grad_bias_z"]
        if float(b.abs().sum()) == 0:
            assert abs(float(z.mean())) < 4 * float(z.std()) / math.sqrt(TRIALS)
            # the raw squared distance is biased: it would fail the same test
            raw = (g - ref).mean(0).pow(2).sum(1) / ref_norm2
            assert float(raw.mean()) > 10 * se
        else:
            assert float(z.mean()) > 4 * float(z.std()) / math.sqrt(TRIALS)


def test_bias_statistics_refuse_mismatched_draws() -> None:
    with pytest.raises(ValueError, match="one shape"):
        gradstats.bias_statistics(torch.zeros(3, 1, 2), torch.zeros(3, 1, 3))


def _train(method: str, probes: dict):
    """One run of a tiny ppca model with ``probes``; its result."""
    config = _config(method)
    (run,) = vi.train([config], probes=build_probes(probes, config))
    return run


def _config(method: str) -> vi.RunConfig:
    return vi.RunConfig.from_dict({
        "data": {"name": "ppca", "options": {"data_dim": 6, "latent_dim": 2, "n": 120}},
        "model": {"latent_dim": 2, "hidden": [8]},
        "method": {"name": method, "encoder_hidden": [8], "kl": "mc",
                   "heldout": {"window": 5, "patience": 1, "max_steps": 20}},
        "training": {"max_epochs": 3, "batch_size": 40, "eval_splits": ["train"],
                     "eval_n_mc": 1, "stopping": None},
        "seed": 0})


@pytest.mark.parametrize("method", ["amortized", "vem"])
def test_k_sweep_publishes_measurements_during_training_with_the_final_one(method) -> None:
    """Measured at epoch 1 and at the end, one table: both epochs, every estimator that the
    registry supports at each k (VIMCO only at k >= 2), bias rows for all but the reference,
    and the inference group of the method (encoder or local λ)."""
    probes = {"k_sweep": {"ks": [1, 2, 4], "draws": 4, "batch": 6, "epochs": [1]}}
    run = _train(method, probes)
    t = run.tables["k_sweep"]
    assert 1 in set(t["epoch"]) and t["epoch"].nunique() == 2
    assert {"encoder" if method == "amortized" else "local", "decoder"} <= set(t["param_group"])
    loo = t[(t["grad_estimator"] == "score") & (t["grad_baseline"] == "loo")]
    assert set(loo["grad_k"]) == {2, 4}
    bias = t[t["metric"] == "grad_bias_relative"]
    assert "reparam" not in set(bias["grad_estimator"])
    assert {"stl", "dreg", "score"} <= set(bias["grad_estimator"])
    assert t["value"].map(math.isfinite).all()


def test_iwae_bounds_rise_with_k() -> None:
    """L_1 ≤ L_k ≤ … in expectation (Burda et al. 2016, Theorem 1): with enough points the
    measured bounds are ordered, each with a finite standard error."""
    probes = {"iwae_bounds": {"ks": [1, 10, 100], "splits": ["train"], "points": 120,
                              "repeats": 4}}
    run = _train("amortized", probes)
    t = run.tables["iwae_bounds"].sort_values("k")
    assert t["k"].tolist() == [1, 10, 100]
    values = t["value"].to_numpy()
    assert values[0] < values[1] < values[2]
    assert (t["se"] > 0).all() and t["points"].str.startswith("all ").all()


@pytest.mark.parametrize("scale", ["default", "quick"])
def test_grid_expands(scale) -> None:
    """Every cell of both scales has a valid IWAE setting (kl = mc for k > 1) and the k_sweep
    probe only on the ELBO-trained models."""
    grid = load_grid("multisample").scaled(scale)
    cells = grid.cells()
    assert len(cells) == (48 if scale == "default" else 6)
    for c in cells:
        m = c["method"]
        assert m["kl"] == "mc" and (m["objective"] == "iwae") == (m["k"] > 1)
        assert ("k_sweep" in grid.probes_for(c)) == (m["k"] == 1)


def test_k_sweep_keeps_each_members_measurements_when_an_ensemble_shrinks(monkeypatch) -> None:
    """An ensemble's members finish at different epochs: the first to finish is probed alone
    as member 0 of a subset, and members finishing together are probed together once per best
    epoch. Each member's table still holds its own measurements made during training (not
    member 0's, and none lost for the members still running or probed again)."""
    from vi import probes as P

    configs = [_config("amortized"), _config("vem")]  # two distinct members (objects)
    tag = {id(c): 10.0 * (i + 1) for i, c in enumerate(configs)}

    def fake(method, x, idx, *, ks, n_mc, draws, random, estimators, reference):
        # one row per member, its value the member's tag plus the epoch: who measured what
        return [[m, "encoder", "reparam", "none", "iwae", 1, n_mc, draws, "grad_snr",
                 tag[id(ctx.configs[m])] + ctx.epoch] for m in range(len(ctx.configs))]

    monkeypatch.setattr(gradstats, "k_sweep", fake)
    probe = P.KSweep(P.KSweep.Options(ks=(1,), draws=2, batch=2, epochs=(1,)))

    def context(members, epoch, final):
        return P.ProbeContext(None, {"train": torch.zeros(len(members), 4, 2)}, {},
                              [0] * len(members), [configs[k] for k in members], epoch,
                              final, final, None, None, None)

    ctx = context([0, 1], 1, False)
    assert probe(ctx).tables == {}
    ctx = context([1], 5, True)  # member 1 finishes first, alone: member 0 of the subset
    first = probe(ctx).tables["k_sweep"]
    got = first[["epoch", "value", "member"]].itertuples(index=False, name=None)
    assert sorted(got) == [(1, 21.0, 0), (5, 25.0, 0)]
    # the rest finish together at different best epochs: each final call probes both, and
    # the trainer keeps each member's table of its own best epoch
    for epoch in (7, 9):
        ctx = context([0, 1], epoch, True)
        both = probe(ctx).tables["k_sweep"]
        got = both[["epoch", "value", "member"]].itertuples(index=False, name=None)
        assert sorted(got) == [(1, 11.0, 0), (1, 21.0, 1), (epoch, 10.0 + epoch, 0),
                               (epoch, 20.0 + epoch, 1)]
    ctx = context([0], 9, True)
    last = probe(ctx).tables["k_sweep"]
    got = last[["epoch", "value", "member"]].itertuples(index=False, name=None)
    assert sorted(got) == [(1, 11.0, 0), (9, 19.0, 0)]
