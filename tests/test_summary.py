"""The summary table from CSVs alone: comparable rows, sources, statistics and robustness.

Synthetic runs.csv / metrics.csv / gaps.csv / references.csv in the runner's layout; every value
encodes where it came from, so a row that mixed experiments, training settings or convergence
classes would show it in its mean.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from experiments import schema
from experiments import summary as S

ROOT = Path(__file__).resolve().parents[1]


def _ident(exp: str, seed: int, *, method: str = "vem", h: int = 5, dataset: str = "digits",
           tag: str = "") -> dict:
    return {"run_id": f"{exp}-{dataset}-{method}-h{h}-s{seed}{tag}", "experiment": exp,
            "dataset": dataset, "method": method, "estimator": "reparam", "baseline": "none",
            "kl": "analytic", "latent_dim": h, "n_mc": 1, "seed": seed}


def _run(ident: dict, *, status: str = "ok", converged: bool | None = True, **extra) -> dict:
    row = {**ident, "status": status, "message": "", "stop_reason": "plateau",
           "converged": converged, "epochs_run": 10, "best_epoch": 10, "git_commit": "0" * 40,
           "git_dirty": False, "torch_version": "x", "python_version": "3.11", "device": "cpu",
           "started": "", "finished": "", "n_train": 100, "n_validation": 10, "n_test": 50,
           "data_dim": 64, "levels": 17, "seconds_per_epoch": 0.5,
           "method.lr": 1e-3 * (1 + ident["seed"]), "data.seed": np.nan,
           "data.test_fraction": 0.2, "data.validation_fraction": 0.1,
           "method.e_steps": 1, "training.batch_size": 100}
    row.update(extra)
    return row


def _write(root: Path, exp: str, name: str, rows: list[dict]) -> None:
    (root / exp).mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(root / exp / f"{name}.csv", index=False)


def _rows(table: pd.DataFrame, **key) -> pd.DataFrame:
    sel = np.logical_and.reduce([table[k] == v for k, v in key.items()])
    return table[sel]


@pytest.fixture
def two_experiments(tmp_path: Path) -> Path:
    """expA varies method.e_steps (1 or 5) inside one identity cell, and the step size with the
    seed; expB has the same identity with one setting. Test ELBO = 10·k + seed in expA and
    100 + seed in expB."""
    runs = []
    for k in (1, 5):
        for s in (0, 1, 2):
            runs.append(_run(_ident("expA", s, tag=f"-e{k}"), final_elbo_test=10.0 * k + s,
                             **{"method.e_steps": k}))
    _write(tmp_path, "expA", "runs", runs)
    _write(tmp_path, "expB", "runs", [_run(_ident("expB", s), final_elbo_test=100.0 + s)
                                      for s in (0, 1, 2)])
    return tmp_path


def test_no_row_mixes_experiments_or_settings(two_experiments: Path) -> None:
    table = S.summary_table(two_experiments)
    assert len(table) == 3
    assert not table.duplicated([*S.CELL, "convergence"]).any()
    got = {(r.experiment, r.setting): r.test_elbo_mean for r in table.itertuples()}
    assert got == {("expA", "method.e_steps=1"): pytest.approx(11.0),
                   ("expA", "method.e_steps=5"): pytest.approx(51.0),
                   ("expB", "default"): pytest.approx(101.0)}
    # every row averages exactly the runs of its own experiment and setting
    for r in table.itertuples():
        runs = pd.read_csv(two_experiments / r.experiment / "runs.csv")
        if r.setting != "default":
            runs = runs[runs["method.e_steps"] == int(r.setting.split("=")[1])]
        assert r.test_elbo_n == len(runs)
        assert r.test_elbo_mean == pytest.approx(runs["final_elbo_test"].mean())
    assert table["test_elbo_n"].sum() == 9  # no run counted twice or dropped


def test_statistics_counts_and_convergence_rows(tmp_path: Path) -> None:
    runs = [_run(_ident("exp", s), final_elbo_test=v)
            for s, v in zip(range(4), (1.0, 2.0, 4.0, 7.0), strict=True)]
    runs.append(_run(_ident("exp", 4), converged=False, final_elbo_test=100.0))
    runs.append(_run(_ident("exp", 5), status="diverged", converged=False,
                     final_elbo_test=-1e9))
    runs.append(_run(_ident("exp", 6), status="failed", converged=False))
    _write(tmp_path, "exp", "runs", runs)
    table = S.summary_table(tmp_path)
    assert table["convergence"].tolist() == ["converged", "not converged"]
    for col, v in (("n_runs", 7), ("n_ok", 5), ("n_diverged", 1), ("n_failed", 1),
                   ("n_not_converged", 1)):
        assert table[col].tolist() == [v, v], col  # the cell's counts, on each of its rows
    conv = table.iloc[0]
    x = np.array([1.0, 2.0, 4.0, 7.0])
    half = stats.t.ppf(0.975, 3) * x.std(ddof=1) / 2
    assert conv["test_elbo_mean"] == pytest.approx(3.5)
    assert conv["test_elbo_sd"] == pytest.approx(x.std(ddof=1))
    assert conv["test_elbo_n"] == 4
    assert (conv["test_elbo_ci_low"], conv["test_elbo_ci_high"]) == pytest.approx(
        (3.5 - half, 3.5 + half))
    late = table.iloc[1]
    assert (late["test_elbo_mean"], late["test_elbo_n"]) == (100.0, 1)
    assert math.isnan(late["test_elbo_ci_low"]) and math.isnan(late["test_elbo_sd"])


def test_a_cell_without_finished_runs_keeps_its_counts(tmp_path: Path) -> None:
    _write(tmp_path, "exp", "runs", [_run(_ident("exp", s), status="diverged", converged=False)
                                     for s in (0, 1)])
    row = S.summary_table(tmp_path).iloc[0]
    assert row["convergence"] == "none finished"
    assert (row["n_runs"], row["n_diverged"], row["test_elbo_n"]) == (2, 2, 0)


def test_sources_points_bits_per_dim_and_references(tmp_path: Path) -> None:
    runs, gaps, refs = [], [], []
    for s in (0, 1):
        ident = _ident("gapexp", s)
        runs.append(_run(ident, final_elbo_test=30.0 + s, final_elbo_train=31.0 + s,
                         final_iwae_test=-1.0))  # the gaps table wins over final_iwae_test
        for split, n_pts in (("train", 3), ("test", 5)):
            for p in range(n_pts):
                gaps.append({**ident, "epoch": 10, "split": split, "point": p,
                             "log_px_iwae": 40.0 + p, "elbo_qstar": 35.0, "elbo_qphi": 34.0,
                             "approximation_gap": 5.0 + p, "amortization_gap": 1.0})
        # an earlier measurement must be ignored
        gaps.append({**ident, "epoch": 2, "split": "test", "point": 0, "log_px_iwae": -1e6,
                     "elbo_qstar": 0, "elbo_qphi": 0, "approximation_gap": 0,
                     "amortization_gap": 1e6})
        for split in ("train", "test"):
            refs.append({"dataset": "digits", "data_seed": s, "model": "factor_analysis",
                         "latent_dim": 5, "split": split, "n_points": 50, "log_px": 20.0 + s,
                         "test_fraction": 0.2, "validation_fraction": 0.1, "log_px_bpd": 3.0})
            refs.append({"dataset": "digits", "data_seed": s, "model": "factor_analysis",
                         "latent_dim": 2, "split": split, "n_points": 50, "log_px": -99.0,
                         "test_fraction": 0.2, "validation_fraction": 0.1, "log_px_bpd": 9.0})
            refs.append({"dataset": "digits", "data_seed": s, "model": "no_latent",
                         "latent_dim": np.nan, "split": split, "n_points": 50, "log_px": 10.0,
                         "test_fraction": 0.2, "validation_fraction": 0.1, "log_px_bpd": 3.5})
            refs.append({"dataset": "digits", "data_seed": s, "model": "ppca",
                         "latent_dim": 5, "split": split, "n_points": 50, "log_px": 0.0,
                         "test_fraction": 0.2, "validation_fraction": 0.1, "log_px_bpd": 4.0})
    _write(tmp_path, "gapexp", "runs", runs)
    _write(tmp_path, "gapexp", "gaps", gaps)
    pd.DataFrame(refs).to_csv(tmp_path / "references.csv", index=False)
    # an experiment without a gaps table: the final closed-form value over the whole split
    _write(tmp_path, "exactexp", "runs", [_run(_ident("exactexp", 0, dataset="ppca"),
                                               final_approximation_gap_test=0.25)])
    t = S.summary_table(tmp_path)
    r = _rows(t, experiment="gapexp").iloc[0]
    assert (r["test_elbo_mean"], r["test_elbo_points"]) == (30.5, 50)
    assert (r["test_iwae_mean"], r["test_iwae_points"]) == (42.0, 5)
    assert (r["train_iwae_mean"], r["train_iwae_points"]) == (41.0, 3)
    assert r["test_amortization_gap_mean"] == 1.0 and r["test_approximation_gap_mean"] == 7.0
    assert r["test_elbo_bpd_mean"] == pytest.approx(
        np.mean([S.bits_per_dim(30.0 + s, 64, 17) for s in (0, 1)]))
    assert r["test_elbo_bpd_mean"] == pytest.approx(
        -(30.5 - 64 * math.log(17)) / (64 * math.log(2)))
    # references of each run's own data seed and H; ELBO − FA per run
    assert r["test_ref_factor_analysis_mean"] == 20.5 and r["test_ref_no_latent_mean"] == 10.0
    assert r["test_elbo_minus_fa_mean"] == 10.0 and r["test_elbo_minus_fa_sd"] == 0.0
    assert r["test_ref_factor_analysis_bpd_mean"] == 3.0
    assert math.isnan(r.get("test_ref_ppca_mean", math.nan))  # PPCA: for the ppca data only
    e = _rows(t, experiment="exactexp").iloc[0]
    assert (e["test_approximation_gap_mean"], e["test_approximation_gap_points"]) == (0.25, 50)


def test_data_seed_column_selects_the_reference(tmp_path: Path) -> None:
    runs = [_run(_ident("exp", s), final_elbo_test=0.0, **{"data.seed": 7}) for s in (0, 1)]
    _write(tmp_path, "exp", "runs", runs)
    pd.DataFrame([{"dataset": "digits", "data_seed": d, "model": "factor_analysis",
                   "latent_dim": 5, "split": "test", "n_points": 50, "log_px": float(d)}
                  for d in (0, 1, 7)]).to_csv(tmp_path / "references.csv", index=False)
    r = S.summary_table(tmp_path).iloc[0]
    assert r["test_ref_factor_analysis_mean"] == 7.0 and r["test_elbo_minus_fa_mean"] == -7.0


def test_step_sizes_seeds_and_cell_constants_are_not_settings(tmp_path: Path) -> None:
    runs = []
    for dataset, batch in (("digits", 100), ("ppca", 50)):
        for s in (0, 1):
            runs.append(_run(_ident("exp", s, dataset=dataset), final_elbo_test=1.0,
                             **{"data.seed": s, "training.batch_size": batch,
                                "method.local_lr": 0.1 * (s + 1)}))
    _write(tmp_path, "exp", "runs", runs)
    table = S.summary_table(tmp_path)
    assert table["setting"].tolist() == ["default", "default"]
    assert table["test_elbo_n"].tolist() == [2, 2]


def test_lr_selection_is_left_out(two_experiments: Path) -> None:
    _write(two_experiments, "lr_selection", "runs", [_run(_ident("lr_selection", 0))])
    assert "lr_selection" not in set(S.summary_table(two_experiments)["experiment"])


def test_missing_and_partial_inputs(tmp_path: Path) -> None:
    empty = S.summary_table(tmp_path)
    assert empty.empty and {"test_elbo_mean", "test_elbo_ci_low"} <= set(empty.columns)
    assert pd.read_csv(S.write_summary(tmp_path)).empty
    assert "(no results yet)" in S.summary_markdown(tmp_path)
    # metrics.csv without runs.csv: the runs it names, each at its last epoch
    ident = _ident("metricsonly", 0)
    rows = [{**ident, "epoch": ep, "step": ep, "wall_s": 2.0 * ep, "split": "test",
             "param_group": None, "metric": "elbo", "value": float(ep)} for ep in (1, 2, 3)]
    _write(tmp_path, "metricsonly", "metrics",
           [dict(zip(schema.METRIC_COLUMNS, (r[c] for c in schema.METRIC_COLUMNS),
                     strict=True)) for r in rows])
    # an unreadable runs.csv beside its metrics.csv is treated as missing
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "runs.csv").write_bytes(b"\xff\xfe\x00garbage\n\"unterminated")
    table = S.summary_table(tmp_path)
    r = _rows(table, experiment="metricsonly").iloc[0]
    assert (r["test_elbo_mean"], r["seconds_per_epoch_mean"], r["convergence"]) == (
        3.0, 2.0, "unknown")
    assert "broken" not in set(table["experiment"])


def test_markdown_tables_per_experiment(two_experiments: Path) -> None:
    md = S.summary_markdown(two_experiments)
    assert "#### expA" in md and "#### expB" in md
    a = md.split("#### expA")[1].split("#### expB")[0]
    b = md.split("#### expB")[1]
    assert "| setting |" in a and "| setting |" not in b
    assert "| method.e_steps=5 | digits | vem | reparam | 5 | 51.00 ± 1.00 |" in a
    assert "| digits | vem | reparam | 5 | 101.00 ± 1.00 |" in b
    assert "converged |" in b


def test_write_summary_is_atomic_and_sorted(two_experiments: Path) -> None:
    path = S.write_summary(two_experiments)
    assert path == two_experiments / "summary.csv"
    assert not list(two_experiments.glob(".summary.csv*"))  # no temporary file left
    table = pd.read_csv(path)
    assert table["experiment"].tolist() == ["expA", "expA", "expB"]
    assert table["setting"].tolist()[:2] == ["method.e_steps=1", "method.e_steps=5"]


def test_summary_and_findings_read_csvs_only(two_experiments: Path) -> None:
    """Neither module may import torch or the training library: of ``vi``, only the
    standard-library ``vi.contract`` (the results contract) and ``vi.files`` (atomic writes)."""
    code = textwrap.dedent("""
        import json, sys
        from experiments import findings, summary
        summary.write_summary(sys.argv[1])
        findings.write_findings(sys.argv[1])
        print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "vi"))))
    """)
    out = subprocess.run([sys.executable, "-c", code, str(two_experiments)], cwd=ROOT,
                         capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == ["vi", "vi.contract", "vi.files"]
    assert (two_experiments / "FINDINGS.md").is_file()
