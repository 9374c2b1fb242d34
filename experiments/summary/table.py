"""The summary over seeds: ``summary_table``, ``write_summary`` (``results/summary.csv``) and
``summary_markdown``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from experiments.summary.quantities import CELL, QUANTITIES, t_interval
from experiments.summary.runs import experiments_present, load_runs
from experiments.summary.values import run_values
from experiments.vocabulary import LABEL_ORDER, METHOD_ORDER
from vi.files import atomic_write

#: finished runs that did not converge, told apart by their ``outcome`` (``vi.contract``)
EXCLUDED = ("cap", "collapsed", "stuck")
COUNTS = ("n_runs", "n_ok", "n_diverged", "n_failed", "n_not_converged",
          *(f"n_{o}" for o in EXCLUDED))


def _with_outcomes(runs: pd.DataFrame | None) -> pd.DataFrame | None:
    """A finished run that did not converge gets its ``outcome`` (cap, collapsed, stuck) as its
    convergence class where runs.csv records one (else it stays ``not converged``)."""
    if runs is None or "outcome" not in runs or "convergence" not in runs:
        return runs
    out = runs["outcome"].astype(str)
    other = runs["status"].eq("ok") & runs["conv"].eq(False) & out.isin(EXCLUDED)
    return runs.assign(convergence=runs["convergence"].where(~other, out))


def _counts(runs: pd.DataFrame) -> pd.DataFrame:
    ok = runs["status"].eq("ok")
    outcome = runs["outcome"].astype(str) if "outcome" in runs else pd.Series("", runs.index)
    flags = runs.copy().assign(  # copy: one block, no fragmentation warning
        n_runs=1, n_ok=ok.astype(int),
        n_diverged=runs["status"].eq("diverged").astype(int),
        n_failed=runs["status"].eq("failed").astype(int),
        n_not_converged=(ok & runs["conv"].eq(False)).astype(int),
        **{f"n_{o}": (ok & outcome.eq(o)).astype(int) for o in EXCLUDED})
    return flags.groupby(CELL, dropna=False)[list(COUNTS)].sum().reset_index()


def _rows(runs: pd.DataFrame) -> pd.DataFrame:
    """The (cell, convergence) rows: one per convergence class among finished runs, and one
    ``none finished`` row for a cell without a finished run."""
    ok = runs[runs["status"] == "ok"]
    rows = ok[[*CELL, "convergence"]].drop_duplicates()
    cells = runs[CELL].drop_duplicates()
    lacking = cells.merge(rows[CELL].drop_duplicates(), on=CELL, how="left", indicator=True)
    lacking = lacking[lacking["_merge"] == "left_only"].drop(columns="_merge")
    return pd.concat([rows, lacking.assign(convergence="none finished")], ignore_index=True)


def summary_table(results: str | Path) -> pd.DataFrame:
    """The summary as a DataFrame (module docstring: keys, sources and statistics)."""
    results = Path(results)
    names = experiments_present(results)
    loaded = {n: _with_outcomes(load_runs(results, n)) for n in names}
    all_runs = [r for r in loaded.values() if r is not None and len(r)]
    stems = list(QUANTITIES)
    if not all_runs:
        cols = [*CELL, "convergence", *COUNTS]
        for s in (s for s, q in QUANTITIES.items() if q.core):
            cols += [f"{s}_{k}" for k in ("mean", "sd", "n", "ci_low", "ci_high", "points")]
        return pd.DataFrame(columns=cols)
    runs = pd.concat(all_runs, ignore_index=True)
    setting_rank = {k: i for i, k in enumerate(dict.fromkeys(
        zip(runs["experiment"], runs["setting"], strict=True)))}
    table = _rows(runs).merge(_counts(runs), on=CELL, how="left")
    values = run_values(results, names, loaded)
    values = values[values["status"] == "ok"]
    key = [*CELL, "convergence"]
    blocks = [table]
    for stem in stems:
        part = values[values["quantity"] == stem]
        if part.empty and not QUANTITIES[stem].core:
            continue
        out = []
        for k, g in part.groupby(key, dropna=False):
            iv = t_interval(g["value"])
            pts = pd.to_numeric(g["points"], errors="coerce")
            out.append((*k, iv.mean, iv.sd, iv.n, iv.lo, iv.hi,
                        float(pts.min()) if pts.notna().any() else np.nan))
        agg = pd.DataFrame(out, columns=[*key, *(f"{stem}_{s}" for s in (
            "mean", "sd", "n", "ci_low", "ci_high", "points"))])
        if len(agg):
            agg = table[key].merge(agg, on=key, how="left").drop(columns=key)
            agg.index = table.index
        else:
            agg = pd.DataFrame({f"{stem}_{s}": np.nan for s in (
                "mean", "sd", "n", "ci_low", "ci_high", "points")}, index=table.index)
        agg[f"{stem}_n"] = agg[f"{stem}_n"].fillna(0).astype(int)
        blocks.append(agg)
    table = pd.concat(blocks, axis=1).copy()
    exp_rank = {e: i for i, e in enumerate(names)}
    method_rank = {m: i for i, m in enumerate(METHOD_ORDER)}
    label_rank = {m: i for i, m in enumerate(LABEL_ORDER)}
    conv_rank = {"converged": 0, "unknown": 1, "cap": 2, "collapsed": 3, "stuck": 4,
                 "not converged": 5, "none finished": 6}
    table = table.assign(
        _e=table["experiment"].map(exp_rank).fillna(len(exp_rank)),
        _s=[setting_rank.get(k, 0) for k in zip(table["experiment"], table["setting"],
                                                 strict=True)],
        _m=table["method"].map(method_rank).fillna(len(method_rank)),
        _l=table["estimator_label"].map(label_rank).fillna(len(label_rank)),
        _c=table["convergence"].map(conv_rank).fillna(9))
    table = (table.sort_values(["_e", "experiment", "dataset", "_s", "_m", "method", "_l",
                                "estimator_label", "latent_dim", "_c"], kind="stable")
             .drop(columns=["_e", "_s", "_m", "_l", "_c"]).reset_index(drop=True))
    front = [*CELL, "convergence", *COUNTS]
    return table[front + [c for c in table.columns if c not in front]]


def write_summary(results: str | Path) -> Path:
    """Write ``results/summary.csv`` atomically, record it in the results folder's
    ``manifest.json`` (``check`` verifies it), and return its path."""
    from experiments.checks import add_to_manifest

    results = Path(results)
    table = summary_table(results)
    path = atomic_write(results / "summary.csv", lambda p: table.to_csv(
        p, index=False, float_format="%.6g", lineterminator="\n"))
    add_to_manifest(results, [path], create=True)
    return path


# --------------------------------------------------------------------------------- Markdown


def _cell(mean: float, sd: float, n: int, digits: int) -> str:
    if not n or pd.isna(mean):
        return "—"
    if n < 2 or pd.isna(sd):
        return f"{mean:.{digits}f} (1 seed)".replace("-", "−")
    return f"{mean:.{digits}f} ± {sd:.{digits}f}".replace("-", "−")


#: the columns of the Markdown tables (each shown only where its experiment measured it)
_MD_STEMS = ("test_elbo", "test_elbo_bpd", "train_elbo", "test_ref_factor_analysis",
             "test_elbo_minus_fa", "test_ais", "test_iwae", "test_log_px_exact",
             "test_approximation_gap",
             "train_amortization_gap", "test_amortization_gap", "test_active_units",
             "seconds_per_epoch")


def summary_markdown(results: str | Path) -> str:
    """The summary as Markdown: one table per experiment, columns where it measured them
    (mean ± sd over seeds; the 95 % intervals are in summary.csv)."""
    table = summary_table(results)
    note = ("Mean ± standard deviation over the seeds of the runs that finished (95 % "
            "t-intervals, seed counts and point counts in `results/summary.csv`). One table per "
            "experiment; nothing is averaged across experiments or training settings. Runs "
            "that finished without converging are a separate row (last column); diverged and "
            "failed runs are counted, never averaged. ELBOs are those of each method's own "
            "posterior over the whole split at the best epoch (nats per data point; bits/dim "
            "for images); FA = exact log p(x) of factor analysis at the same H and data seed; "
            "log p(x) by AIS and by IWAE and the gaps (Cremer et al. 2018) on the points of the "
            "gaps table (`gaps.csv`, whose `points` column names them; the whole test split in "
            "amortization_gap and refinement, so every test number of a row is on the same "
            "points; point counts in the `_points` columns of summary.csv). H = latent "
            "dimension.")
    if table.empty:
        return note + "\n\n(no results yet)\n"
    parts = [note]
    for exp, rows in table.groupby("experiment", sort=False):
        stems = [s for s in _MD_STEMS if f"{s}_n" in rows and rows[f"{s}_n"].gt(0).any()]
        if "test_elbo" not in stems:  # a reference alone compares nothing
            stems = [s for s in stems if s not in ("test_ref_factor_analysis",
                                                   "test_elbo_minus_fa")]
        with_setting = rows["setting"].ne("default").any()
        head = [*(["setting"] if with_setting else []), "dataset", "method", "estimator", "H",
                *(QUANTITIES[s].heading for s in stems), "runs", "diverged", "convergence"]
        lines = [f"#### {exp}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for _, r in rows.iterrows():
            cells = [*([str(r["setting"])] if with_setting else []), str(r["dataset"]),
                     str(r["method"]), str(r["estimator_label"]),
                     f"{r['latent_dim']:g}" if pd.notna(r["latent_dim"]) else "—"]
            for s in stems:
                digits = 3 if s in ("seconds_per_epoch", "test_elbo_bpd") else (
                    1 if s == "test_active_units" else 2)
                cells.append(_cell(r[f"{s}_mean"], r[f"{s}_sd"], int(r[f"{s}_n"]), digits))
            cells.append(str(int(r["n_runs"])))
            bad = f"{int(r['n_diverged'])}/{int(r['n_runs'])}"
            if r["n_failed"]:
                bad += f" (+{int(r['n_failed'])} failed)"
            cells.append(bad)
            cells.append(str(r["convergence"]))
            lines.append("| " + " | ".join(cells) + " |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"
