"""amortization_gap: approximation and amortization gaps (Cremer, Li & Duvenaud 2018) of the
converged models, per data set, method and estimator, train versus test.

Figure ``gaps_<dataset>``: bars (mean ± sd over seeds, one dot per seed, hollow where the run did
not converge) of the approximation gap log p(x) − L[q*] (top) and the amortization gap
L[q*] − L[q_φ] (bottom), columns = split, x = method, hue = estimator.

Table ``gaps_table.csv`` / ``gaps_table.md`` (``write_gaps_table``; Cremer et al. 2018, Table
2): per data set × method × variational family × estimator × split, log p̂(x) (exact, else
AIS), the AIS and IWAE estimates beside it and how far IWAE sits below AIS, L[q*], L[q_φ] and
both gaps (mean ± sd over seeds and their number), every number on the same points
(``points``: which), the fraction of points whose IWAE weights had a low effective sample size,
the steps q* took, and the BDMC sandwich of the decoders (``bdmc.csv``); the Markdown states how
q* and log p(x) were estimated.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from experiments import schema
from experiments.figures import style
from experiments.figures.drawing import empty_panel, panel_grid, save_table, suptitle
from experiments.figures.loading import ExperimentResults, SkipFigure, at_best
from experiments.figures.marks import Tally, legend
from experiments.figures.registry import register, register_table
from experiments.figures.style import (
    LABEL_ORDER,
    MARKS,
    METHOD_ORDER,
    TRAINING_LENGTH,
    m_text,
    method_name,
    ordered,
    seeds_text,
)

__all__ = ["FAMILY_ORDER", "GAPS", "INPUTS", "QUANTITIES", "family_of", "fig_amortization_gap",
           "gaps_table", "per_run_gaps", "write_gaps_table"]

log = logging.getLogger(__name__)

#: the variational families (``vi.families.FAMILIES``) in the order tables and figures show them
FAMILY_ORDER = ("diagonal", "full", "flow")

INPUTS = {"gaps.csv": ("run_id", "split", "epoch", "elbo_qstar", "elbo_qphi",
                       "approximation_gap", "amortization_gap"),
          "bdmc.csv": ("run_id", "epoch", "point", "lower", "upper", "width")}
#: per-run quantity → heading
QUANTITIES = {"log_px": "log p̂(x)", "log_px_ais": "AIS", "log_px_iwae": "IWAE",
              "iwae_below_ais": "AIS − IWAE", "ais_minus_exact": "AIS − exact",
              "elbo_qstar": "L[q*]", "elbo_qphi": "L[q_φ]",
              "approximation_gap": "approximation gap", "amortization_gap": "amortization gap"}
GAPS = (("approximation_gap", "approximation gap\nlog p(x) − L[q*] (nats)"),
        ("amortization_gap", "amortization gap\nL[q*] − L[q_φ] (nats)"))


def family_of(runs: pd.DataFrame) -> pd.Series:
    """Each run's variational family (``method.family`` in runs.csv; ``diagonal`` where
    runs.csv predates the family axis)."""
    if "method.family" not in runs.columns:
        return pd.Series("diagonal", index=runs.index)
    return runs["method.family"].astype(object).where(runs["method.family"].notna(), "diagonal")


def per_run_gaps(res: ExperimentResults) -> pd.DataFrame:
    """One row per run × split with the point means of ``QUANTITIES``, ``low_ess_fraction``,
    ``qstar_steps``, ``n_points``, ``points`` (which points: ``all N`` / ``first N of M``) and
    ``log_px_kind`` (exact / AIS / IWAE: log p̂(x) and the approximation gap), from
    ``gaps.csv`` (each run's last measurement) or, without it, from metrics.csv at the best
    epoch; runs.csv identity, variational family (``family_of``), status and convergence
    joined. Runs without gaps (diverged) keep NaN rows."""
    if "gaps.csv" in res.tables and len(res.tables["gaps.csv"]):
        g = res.tables["gaps.csv"]
        g = g[g["epoch"] == g.groupby(["run_id", "split"])["epoch"].transform("max")]

        def num(col: str) -> pd.Series:
            return pd.to_numeric(g[col], errors="coerce") if col in g else pd.Series(
                np.nan, index=g.index)

        exact, ais, iwae = num("log_px_exact"), num("log_px_ais"), num("log_px_iwae")
        kind = np.where(exact.notna(), "exact", np.where(ais.notna(), "AIS", "IWAE"))
        g = g.assign(log_px=exact.fillna(ais).fillna(iwae), log_px_ais=ais, log_px_iwae=iwae,
                     iwae_below_ais=ais - iwae, ais_minus_exact=ais - exact, kind=kind,
                     points=g["points"] if "points" in g else "first points",
                     low=schema.as_bool(g["iwae_low_ess"]).astype(float) if "iwae_low_ess" in g
                     else np.nan,
                     steps=num("qstar_steps"))
        per = g.groupby(["run_id", "split"]).agg(
            **{q: (q, "mean") for q in QUANTITIES}, low_ess_fraction=("low", "mean"),
            qstar_steps=("steps", "mean"), n_points=("log_px", "size"),
            points=("points", "first"), log_px_kind=("kind", "first")).reset_index()
    else:
        names = ["iwae", "ais", "log_px_exact", *list(QUANTITIES)[5:], "qstar_steps"]
        m = at_best(res, res.metric(*names), ["run_id", "split", "metric"])
        if m.empty:
            raise SkipFigure("no gaps.csv and no gap rows in metrics.csv")
        per = m.pivot_table(index=["run_id", "split"], columns="metric", values="value",
                            aggfunc="mean").reset_index()
        exact = per["log_px_exact"] if "log_px_exact" in per else pd.Series(np.nan, per.index)
        iwae = per["iwae"] if "iwae" in per else pd.Series(np.nan, per.index)
        ais = per["ais"] if "ais" in per else pd.Series(np.nan, per.index)
        per = per.assign(log_px=exact.fillna(ais).fillna(iwae), log_px_ais=ais,
                         log_px_iwae=iwae, iwae_below_ais=ais - iwae,
                         ais_minus_exact=ais - exact,
                         low_ess_fraction=np.nan, n_points=np.nan, points="",
                         log_px_kind=np.where(exact.notna(), "exact",
                                              np.where(ais.notna(), "AIS", "IWAE")))
    if res.runs is None:
        return per
    ident = res.runs[["run_id", "dataset", "method", "estimator_label", "seed", "status",
                      "converged", *(c for c in ("latent_dim", "n_mc", "method.refine_steps")
                                     if c in res.runs.columns)]]
    ident = ident.assign(family=family_of(res.runs))
    splits = ordered(per["split"], ("train", "validation", "test"))
    grid = ident.merge(pd.DataFrame({"split": splits}), how="cross")
    return grid.merge(per, on=["run_id", "split"], how="left")


@register("amortization_gap", inputs=INPUTS)
def fig_amortization_gap(res: ExperimentResults) -> Iterator[tuple[str, Figure]]:
    """Approximation and amortization gaps of the converged models, train vs test, per data
    set: bars = mean ± sd over finished runs, dots = seeds (hollow: not converged)."""
    per = per_run_gaps(res)
    for dataset in ordered(per["dataset"]):
        yield f"gaps_{dataset}", _gap_bars(per[per["dataset"] == dataset], dataset)


def _gap_bars(d: pd.DataFrame, dataset: str) -> Figure:
    splits = ordered(d["split"], ("train", "test"))
    methods = ordered(d.loc[d[[g for g, _ in GAPS]].notna().any(axis=1), "method"], METHOD_ORDER)
    labels = ordered(d["estimator_label"], LABEL_ORDER)
    palette = style.palette(labels)
    fig, axes = panel_grid(len(GAPS), len(splits), sharex=False, sharey="row",
                           w=1.2 + 1.0 * len(methods) * max(len(labels), 1) ** 0.5, h=2.9)
    width = 0.8 / max(len(labels), 1)
    for i, (gap, name) in enumerate(GAPS):
        for j, split in enumerate(splits):
            ax = axes[i, j]
            cell = d[(d["split"] == split) & d["method"].isin(methods)]
            ok = cell[(cell["status"] == "ok") & cell[gap].notna()]
            if ok.empty:
                empty_panel(ax, "no finished runs")
                continue
            for k, lab in enumerate(labels):
                for x, method in enumerate(methods):
                    v = ok[(ok["method"] == method) & (ok["estimator_label"] == lab)]
                    if v.empty:
                        continue
                    pos = x - 0.4 + width * (k + 0.5)
                    sd = v[gap].std(ddof=1) if len(v) > 1 else 0.0
                    ax.bar(pos, v[gap].mean(), width * 0.9, yerr=sd, color=palette[lab],
                           alpha=0.8, capsize=2, error_kw={"lw": 1}, label=lab)
                    conv = v["converged"].ne(False).to_numpy()
                    for mask, face in ((conv, "k"), (~conv, "white")):
                        if mask.any():
                            ax.plot(np.full(mask.sum(), pos), v[gap].to_numpy(float)[mask],
                                    ls="none", marker="o", ms=3.5, mfc=face, mec="k", mew=0.7,
                                    label=MARKS["seed"])
            ax.axhline(0, color="0.3", lw=0.8)
            ticks = []
            for method in methods:
                t = Tally().add(d[(d["method"] == method) & (d["split"] == split)])
                ticks.append(method_name(method).replace(" (", "\n(") + t.compact())
            ax.set_xticks(range(len(methods)), ticks, fontsize=7)
            ax.set_title(f"{split} split", fontsize=9)
            ax.set_ylabel(name if j == 0 else "")
    kinds = ", ".join(ordered(d["log_px_kind"].dropna()))
    ok = d[d["status"] == "ok"]
    suptitle(fig, f"{dataset}: inference gaps of the models {TRAINING_LENGTH} (Cremer et al. "
                  f"2018), train vs test; {_h_text(d)}{m_text(d)}; log p(x) {kinds}; bars: mean "
                  f"± sd over "
                  f"{seeds_text(ok['seed'])}, diverged runs counted under each method, not in "
                  f"the bars")
    legend(fig, title="estimator (bar: mean ± sd over seeds)",
           notes=Tally().add(d.drop_duplicates("run_id")).notes())
    return fig


def _h_text(d: pd.DataFrame) -> str:
    dims = ordered(d["latent_dim"]) if "latent_dim" in d.columns else []
    return f"H = {', '.join(f'{h:g}' for h in dims)}; " if dims else ""


# -- the table ------------------------------------------------------------------------------------
def gaps_table(res: ExperimentResults) -> pd.DataFrame:
    """Per data set × method × variational family × estimator × split (q* fitted in the
    method's own family): mean, sd and n over the finished runs of each quantity, the mean
    low-ESS fraction and q* steps, and the runs counted."""
    per = per_run_gaps(res)
    bdmc = _bdmc_per_run(res)
    keys = ["dataset", "method", "family", "estimator_label", "split"]
    rows = []
    for key, grp in per.groupby(keys, sort=False):
        ok = grp[(grp["status"] == "ok") & grp["elbo_qstar"].notna()]
        row = dict(zip(keys, key, strict=True))
        row |= {"n_runs": grp["run_id"].nunique(),
                "n_diverged": int(grp["status"].isin(["diverged", "failed"]).sum()),
                "n_unconverged": int(((grp["status"] == "ok") & grp["converged"].eq(False))
                                     .sum()),
                "n_seeds": len(ok), "log_px_kind": ", ".join(ordered(ok["log_px_kind"]))}
        for q in QUANTITIES:
            row[f"{q}_mean"] = ok[q].mean() if len(ok) else np.nan
            row[f"{q}_sd"] = ok[q].std(ddof=1) if len(ok) > 1 else np.nan
        row["low_ess_fraction"] = ok["low_ess_fraction"].mean() if len(ok) else np.nan
        row["qstar_steps_mean"] = ok["qstar_steps"].mean() if len(ok) else np.nan
        row["n_points"] = ok["n_points"].mean() if len(ok) else np.nan
        row["points"] = "; ".join(ordered(ok["points"].dropna().astype(str))) if len(ok) else ""
        w = bdmc[bdmc["run_id"].isin(ok["run_id"])] if len(bdmc) else bdmc
        row["bdmc_width_mean"] = w["width"].mean() if len(w) else np.nan
        row["bdmc_width_max"] = w["width_max"].max() if len(w) else np.nan
        row["bdmc_points"] = w["n"].sum() if len(w) else 0
        rows.append(row)
    out = pd.DataFrame(rows).rename(columns={"estimator_label": "estimator"})
    rank = {v: i for i, v in enumerate([*METHOD_ORDER, *LABEL_ORDER, "train", "validation",
                                        "test"])}
    order = out[["method", "estimator", "split"]].apply(lambda c: c.map(rank).fillna(99))
    family = out["family"].map({f: i for i, f in enumerate(FAMILY_ORDER)}).fillna(99)
    return out.iloc[np.lexsort([order["split"], order["estimator"], family, order["method"],
                                out["dataset"].astype(str)])].reset_index(drop=True)


def _bdmc_per_run(res: ExperimentResults) -> pd.DataFrame:
    """Per run: the mean and largest BDMC sandwich over its simulated points and their number
    (``bdmc.csv``, the run's last measurement); empty without the table."""
    b = res.tables.get("bdmc.csv")
    if b is None or b.empty:
        return pd.DataFrame(columns=["run_id", "width", "width_max", "n"])
    b = b[b["epoch"] == b.groupby("run_id")["epoch"].transform("max")]
    width = pd.to_numeric(b["width"], errors="coerce")
    return (b.assign(width=width).groupby("run_id")
            .agg(width=("width", "mean"), width_max=("width", "max"), n=("width", "size"))
            .reset_index())


def _qstar_rule(experiment: str = "amortization_gap") -> str:
    """How q* is fitted, with the settings of the experiment's grid (default scale)."""
    try:
        from experiments.grids import load_grid

        o = load_grid(experiment).probes.get("gaps", {})
    except Exception:  # no grid: the probe's defaults
        o = {}
    o = {k: o.get(k, "?") for k in (
        "qstar_window", "qstar_patience", "qstar_max_steps", "qstar_lr", "qstar_tol",
        "qstar_decay", "qstar_decays", "iwae_k", "defensive", "ais_steps", "ais_chains",
        "ais_leapfrog", "bdmc_points")} | {"points": o.get("points")}
    w, p, cap = o["qstar_window"], o["qstar_patience"], o["qstar_max_steps"]
    k, mix, t, c = o["iwae_k"], o["defensive"], o["ais_steps"], o["ais_chains"]
    pts = "every point of each split" if o["points"] is None else (
        f"the first {o['points']} points of each split (all of a smaller one)")
    return (f"Every number of a row is on the same points: {pts} (column 'points'). "
            f"q* is fitted separately for every point, in the method's own variational family "
            f"(column 'family'), by Adam from step size {o['qstar_lr']}, "
            f"starting from the method's own q_φ (vem: its local parameters), under the "
            f"held-out stopping rule: a check every {w} steps on common noise, a plateau after "
            f"{p} checks without a gain above {o['qstar_tol']} nat, then the step size × "
            f"{o['qstar_decay']}, up to {o['qstar_decays']} decays, stopping at the last "
            f"plateau or after {cap} steps (the grid's default scale; the steps actually taken "
            f"are in the last column). log p̂(x) is exact for the linear decoder (ppca), else "
            f"annealed importance sampling from q* (T = {t} distributions, {c} chains, "
            f"{o['ais_leapfrog']} leapfrog step(s) per HMC move; AIS − exact on ppca measures "
            f"its error); beside it an IWAE estimate with k = {k} samples from a defensive "
            f"proposal (mixture weight {mix} on a widened copy of q* and the prior), and "
            f"AIS − IWAE, how far that lower bound sits below AIS; 'low ESS' is the fraction of "
            f"points whose IWAE weights have an effective sample size below 1 % of k; 'BDMC' is "
            f"the mean sandwich (reverse − forward AIS) on {o['bdmc_points']} points per run "
            f"simulated from the decoder, which bounds AIS's error on data like the model's. "
            f"Gap = difference of the point means; mean ± sd over seeds (n), models "
            f"{TRAINING_LENGTH}; diverged runs are counted, not averaged.")


def _gaps_markdown(table: pd.DataFrame, experiment: str = "amortization_gap") -> str:
    def pm(row: pd.Series, q: str) -> str:
        m, s = row[f"{q}_mean"], row[f"{q}_sd"]
        if not np.isfinite(m):
            return "—"
        d = 3 if q in ("iwae_below_ais", "ais_minus_exact") else 2
        return f"{m:.{d}f} ± {s:.{d}f}" if np.isfinite(s) else f"{m:.{d}f}"

    heads = ["data set", "method", "family", "estimator", "split", "points",
             *QUANTITIES.values(), "n",
             "low ESS", "q* steps", "BDMC", "runs (diverged / not converged)"]
    lines = [_qstar_rule(experiment), "", "| " + " | ".join(heads) + " |",
             "|" + "---|" * len(heads)]
    for _, r in table.iterrows():
        low = "—" if not np.isfinite(r["low_ess_fraction"]) else f"{r['low_ess_fraction']:.0%}"
        steps = "—" if not np.isfinite(r["qstar_steps_mean"]) else f"{r['qstar_steps_mean']:.0f}"
        bdmc = "—" if not np.isfinite(r["bdmc_width_mean"]) else f"{r['bdmc_width_mean']:.3f}"
        lines.append("| " + " | ".join([
            str(r["dataset"]), method_name(r["method"]), str(r["family"]), str(r["estimator"]),
            str(r["split"]),
            str(r["points"]) or "—", *(pm(r, q) for q in QUANTITIES), str(int(r["n_seeds"])),
            low, steps, bdmc,
            f"{int(r['n_runs'])} ({int(r['n_diverged'])} / {int(r['n_unconverged'])})"]) + " |")
    return "\n".join(lines) + "\n"


@register_table("amortization_gap", outputs=("gaps_table.csv", "gaps_table.md"))
def write_gaps_table(res: ExperimentResults) -> list[Path]:
    """``gaps_table.csv`` and ``gaps_table.md`` beside the CSVs; returns the files written."""
    try:
        table = gaps_table(res)
    except SkipFigure as why:
        log.info("%s: %s; no gaps table", res.name, why)
        return []
    return save_table(table, res.folder, "gaps_table", _gaps_markdown)
