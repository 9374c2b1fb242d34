"""The family axis of the study: the size of λ in validation's memory bounds, the family column
of the gap table, the ``families`` grid and its findings on synthetic results."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import DTYPE, member_random

import vi
from experiments.figures.amortization_gap import _gaps_markdown, gaps_table
from experiments.figures.loading import ExperimentResults
from experiments.grids import load_grid
from vi import evaluation
from vi.data import load_dataset
from vi.decoders import GaussianDecoder
from vi.families import FAMILIES
from vi.inference import MethodSettings, StoppingRule, build_method
from vi.streams import generator


@pytest.mark.parametrize("family", list(FAMILIES))
def test_lambda_size_follows_the_family(family: str) -> None:
    """parameter_count's encoder output and memory_bytes' local table use P of the family
    (2H, H + H(H+1)/2, 2H + S(2H+1)), not 2H."""
    h, d, hidden, n = 10, 200, 32, 1000  # D above every P: the widest layer stays D
    cfg = vi.RunConfig.from_dict({"model": {"latent_dim": h, "hidden": [hidden]},
                                  "method": {"name": "vem", "family": family,
                                             "encoder_hidden": [hidden]}})
    diag = cfg.replace(method=cfg.method.__class__(**{**cfg.method.__dict__,
                                                      "family": "diagonal"}))
    p = FAMILIES[family].param_dim(h)
    assert cfg.lambda_dim() == p
    assert cfg.parameter_count(d) - diag.parameter_count(d) == (hidden + 1) * (p - 2 * h)
    extra_params = 4 * 6 * (hidden + 1) * (p - 2 * h)
    assert (cfg.memory_bytes(d, n, 10) - diag.memory_bytes(d, n, 10)
            == extra_params + n * (p - 2 * h) * 20)
    if family != "diagonal":
        assert p > 2 * h


def test_lambda_sizes_of_the_families() -> None:
    for h, (name, fam) in itertools.product((1, 4, 10), FAMILIES.items()):
        expected = {"diagonal": 2 * h, "full": h + h * (h + 1) // 2,
                    "flow": 2 * h + fam.__dict__.get("steps", 0) * (2 * h + 1)}[name]
        assert fam.param_dim(h) == expected


@pytest.mark.parametrize("family", list(FAMILIES))
def test_gaps_frame_names_the_family(family: str) -> None:
    """Every per-point row of the gap decomposition names the method's family, in which q* is
    fitted: its λ* has that family's length."""
    ds = load_dataset("ppca", seed=0)
    t = ds.ground_truth
    decoder = GaussianDecoder(ds.data_dim, 4, mean="linear", variance="learned", isotropic=True,
                              generators=[generator(0, "init")]).to(DTYPE)
    decoder.set_linear_parameters(t["W"].to(DTYPE), t["b"].to(DTYPE), t["psi"].to(DTYPE)[0])
    settings = MethodSettings(name="amortized", encoder_hidden=(8,), family=family)
    method = build_method(decoder, [settings], ds.data_dim,
                          generators=[generator(0, "init")]).to(DTYPE)
    x = ds.train.to(DTYPE)[:5].unsqueeze(0)
    out = evaluation.gap_decomposition(
        method, x, qstar_init="posterior", qstar_n_mc=4, qstar_lr=0.03,
        qstar_rule=StoppingRule(5, 1, 10), iwae_k=10, defensive=0.2, gap_n_mc=10,
        low_ess=0.01, random=member_random(1))
    assert (out.per_point["family"] == family).all() and len(out.per_point) == 5


def _results(with_family: bool = True) -> ExperimentResults:
    """Two seeds of amortized on ppca in the diagonal and the full family: approximation gap
    0.3 (diagonal) and 0.001 (full) plus the seed, amortization gap 1 + seed."""
    runs, gaps = [], []
    for fam in ("diagonal", "full"):
        for seed in (0, 1):
            rid = f"ppca-amortized-{fam}-s{seed}"
            runs.append({"run_id": rid, "dataset": "ppca", "method": "amortized",
                         "estimator_label": "reparam", "seed": seed, "status": "ok",
                         "converged": True, "latent_dim": 4, "n_mc": 1,
                         **({"method.family": fam} if with_family else {})})
            approx = (0.3 if fam == "diagonal" else 0.001) + 0.1 * seed
            for split in ("train", "test"):
                for p in range(3):
                    gaps.append({"run_id": rid, "split": split, "epoch": 5, "point": p,
                                 "family": fam, "log_px_exact": -40.0, "log_px_iwae": -40.1,
                                 "elbo_qstar": -40.0 - approx,
                                 "elbo_qphi": -41.0 - approx - seed,
                                 "approximation_gap": approx, "amortization_gap": 1.0 + seed,
                                 "iwae_low_ess": False, "qstar_steps": 100,
                                 "points": "first 3 of 100"})
    return ExperimentResults("families", Path("."), pd.DataFrame(), pd.DataFrame(runs),
                             {"gaps.csv": pd.DataFrame(gaps)})


def test_gap_table_has_a_row_per_family() -> None:
    table = gaps_table(_results())
    assert list(table["family"].unique()) == ["diagonal", "full"]
    assert len(table) == 4  # 2 families x 2 splits
    test = table[table["split"] == "test"].set_index("family")
    assert test.loc["diagonal", "approximation_gap_mean"] == pytest.approx(0.35)
    assert test.loc["full", "approximation_gap_mean"] == pytest.approx(0.051)
    assert test.loc["full", "approximation_gap_sd"] == pytest.approx(0.1 / np.sqrt(2))
    assert test.loc["full", "amortization_gap_mean"] == pytest.approx(1.5)
    assert (table["n_seeds"] == 2).all()
    md = _gaps_markdown(table, "families")
    assert "| data set | method | family | estimator |" in md
    assert "| ppca | amortized (VAE) | full | reparam | test |" in md
    assert "own variational family" in md


def test_gap_table_without_a_family_column_reads_diagonal() -> None:
    """runs.csv written before the family axis: every run is the diagonal Gaussian."""
    table = gaps_table(_results(with_family=False))
    assert set(table["family"]) == {"diagonal"}
    assert (table["n_seeds"] == 4).all()


def test_families_grid_covers_methods_families_and_data() -> None:
    """The default scale: on ppca vem and amortized × the two Gaussian families (the full
    covariance contains the exact posterior there), reparam and score+loo; on digits amortized
    × the three families, reparam (vem there, semi-amortized and mnist5k cut for time); 3 seeds
    each; the quick scale runs ppca and digits."""
    g = load_grid("families")
    cells = g.cells()
    key = {(c["data"]["name"], c["method"]["name"], c["method"]["family"],
            c["method"]["estimator"]) for c in cells}
    assert key == {("ppca", m, f, e) for m in ("vem", "amortized") for f in ("diagonal", "full")
                   for e in ("reparam", "score")} | {("digits", "amortized", f, "reparam")
                                                     for f in FAMILIES}
    seeds = pd.Series([c["seed"] for c in cells]).value_counts()
    assert (seeds == len(cells) // 3).all() and len(seeds) == 3
    assert {c["data"]["name"] for c in g.scaled("quick").cells()} == {"ppca", "digits"}
