"""gradient_variance: variance and signal-to-noise ratio of the gradient estimators.

Figures ``grad_variance_vs_epoch[_H]``, ``grad_snr_vs_epoch[_H]``,
``grad_variance_vs_latent_dim``, ``grad_snr_vs_latent_dim``, ``grad_variance_vs_n_mc[_H]`` (with a
1/M line) and ``variance_ratio_vs_latent_dim``; rows = parameter group, columns = method.
Tables ``variance_ratio.csv`` and ``variance_ratio.md`` (``write_variance_ratio``): the ratio
tr Σ(estimator) / tr Σ(reparam) of ``variance_ratio``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from experiments.figures import style
from experiments.figures.drawing import (
    Tally,
    atomic_write,
    bottom_xlabels,
    draw_curves,
    empty_panel,
    facet_tally,
    legend,
    log_axis,
    panel_grid,
    plain_ticks,
    suptitle,
)
from experiments.figures.loading import (
    ExperimentResults,
    SkipFigure,
    dim_suffix,
    final_rows,
    latent_dims,
)
from experiments.figures.registry import register, register_table
from experiments.figures.style import LABEL_MARKERS, LABEL_ORDER, METHOD_ORDER, method_name, ordered

__all__ = ["GROUP_ROWS", "INPUTS", "fig_gradient_variance", "variance_ratio",
           "write_variance_ratio"]

log = logging.getLogger(__name__)

#: gradient-variance rows: the variational parameters λ are comparable across methods; the
#: local table Λ (vem) and the encoder φ (amortized) play the same role, so they share a row.
GROUP_ROWS = (("variational", ("variational",), "variational λ"),
              ("inference", ("local", "encoder"), "local Λ / encoder φ"),
              ("decoder", ("decoder",), "decoder θ"))
#: the extra table the figures read, with the columns they need (after ``loading._normalise``,
#: which maps the runner's ``grad_estimator``/``grad_baseline``/``grad_n_mc`` onto these names)
INPUTS = {"variance_sweep.csv": ("run_id", "method", "latent_dim", "seed", "estimator",
                                 "baseline", "n_mc", "param_group", "metric", "value")}


# -- figures --------------------------------------------------------------------------------------
def _group_rows(d: pd.DataFrame) -> list[tuple[str, tuple[str, ...], str]]:
    present = set(d["param_group"].dropna())
    return [g for g in GROUP_ROWS if present & set(g[1])]


def _grad_grid(res: ExperimentResults, d: pd.DataFrame, x: str, xlabel: str, ylabel: str,
               title: str, *, logx: bool = False, by: str | None = None,
               reference: bool = False, marker: str | None = None,
               palette: dict | None = None, count_runs: bool = True) -> Figure:
    """Rows = parameter group (λ; Λ or φ; θ), columns = method, log y.

    ``count_runs=False`` for the sweep, whose hue is the estimator measured, not the one that
    trained the run: diverged training runs are then only marked, not counted per label.
    """
    rows = _group_rows(d)
    methods = ordered(d["method"], METHOD_ORDER)
    palette = palette or style.palette(d["estimator_label"])
    fig, axes = panel_grid(len(rows), len(methods), sharey="row")
    tally = Tally()
    h = d["latent_dim"].iloc[0] if d["latent_dim"].nunique() == 1 else None
    for i, (_, groups, row_name) in enumerate(rows):
        for j, method in enumerate(methods):
            ax = axes[i, j]
            cell = d[(d["method"] == method) & d["param_group"].isin(groups)]
            keys = {"method": method} | ({} if h is None else {"latent_dim": h})
            t = facet_tally(res, cell, **keys) if count_runs else Tally()
            if count_runs:
                tally.add(res.runs_where(**keys), cell)
            group = "/".join(ordered(cell["param_group"])) or "/".join(groups)
            ax.set_title(f"{method_name(method)}\n{group} parameters{t.title_note()}",
                         fontsize=9)
            if cell.empty:
                empty_panel(ax, "no such parameters")
                continue
            if logx:
                log_axis(ax, "x", base=2 if x == "latent_dim" else 10)
            draw_curves(ax, cell, x, palette, by=by, logy=True, marker=marker)
            if logx:
                plain_ticks(ax, d[x])
            if reference:
                _one_over_m(ax, cell[cell["status"] == "ok"], x)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(f"{row_name}\n{ylabel}" if j == 0 else "")
    extra = [Line2D([], [], color="k", ls=":", lw=1.5, label="∝ 1/M reference")] \
        if reference else []
    bottom_xlabels(axes)
    suptitle(fig, title)
    legend(fig, palette, tally, extra=extra, markers=marker is not None)
    return fig


def _one_over_m(ax: plt.Axes, cell: pd.DataFrame, x: str) -> None:
    """A 1/M line through the largest mean variance at the smallest M (the slope to compare)."""
    if cell.empty:
        return
    m0 = cell[x].min()
    at0 = cell[cell[x] == m0].groupby("estimator_label")["value"].mean()
    if at0.empty:
        return
    c = float(at0.max()) * float(m0)
    ms = np.geomspace(float(m0), float(cell[x].max()), 50)
    ax.plot(ms, c / ms, color="k", ls=":", lw=1.5)


@register("gradient_variance", inputs=INPUTS)
def fig_gradient_variance(res: ExperimentResults) -> Iterator[tuple[str, Figure]]:
    """Gradient variance and SNR (SPEC §6; Rainforth et al. 2018) per parameter group.

    Over training (per latent dimension), against latent dimension (last measurement of each
    run), and against the number of MC samples M (``variance_sweep.csv``) with a 1/M reference.
    """
    g = res.metrics[res.metrics["metric"].astype(str).str.startswith("grad_")]
    palette = style.palette(pd.concat([g["estimator_label"], *(
        [res.tables["variance_sweep.csv"]["estimator_label"]]
        if "variance_sweep.csv" in res.tables and "estimator_label" in
        res.tables["variance_sweep.csv"].columns else [])]))
    snr = "grad_snr_mean" if (g["metric"] == "grad_snr_mean").any() else "grad_snr_median"
    panels = (("grad_var_total", "grad_variance", "tr Σ, one estimate (nats², log)",
               "Total variance of a single gradient estimate"),
              (snr, "grad_snr", f"{snr.removeprefix('grad_snr_')} SNR |ĝᵢ|/√vᵢ (log)",
               "Signal-to-noise ratio of the gradient (Rainforth et al. 2018)"))
    if g.empty:
        log.info("%s: no grad_* rows in metrics.csv; skipping the over-training and "
                 "latent-dimension figures", res.name)
    else:
        dims = latent_dims(g)
        for metric, stem, ylabel, title in panels:
            d = g[g["metric"] == metric]
            if d.empty:
                log.info("%s: no %s rows; skipping %s figures", res.name, metric, stem)
                continue
            for h in dims:
                cell = d[d["latent_dim"] == h]
                if cell["epoch"].nunique() > 1:
                    yield (f"{stem}_vs_epoch{dim_suffix(h, dims)}",
                           _grad_grid(res, cell, "epoch", "epoch", ylabel,
                                      f"{title} over training, H = {h:g}", palette=palette))
            if len(dims) > 1:
                last = final_rows(d, ["run_id", "param_group"])
                yield (f"{stem}_vs_latent_dim",
                       _grad_grid(res, last, "latent_dim", "latent dimension H (log₂)",
                                  ylabel, f"{title} at the last measurement, by latent "
                                  "dimension", logx=True, marker="o", palette=palette))
    try:
        sweep = res.table("variance_sweep.csv", INPUTS["variance_sweep.csv"])
    except SkipFigure as why:
        log.info("%s: %s; skipping variance-vs-n_mc figures", res.name, why)
        return
    sweep, models = _sweep_models(_final_sweep(sweep[sweep["metric"] == "grad_var_total"]))
    dims = latent_dims(sweep)
    for h in dims:
        cell = sweep[sweep["latent_dim"] == h]
        if cell["n_mc"].nunique() < 2:
            log.info("%s: one n_mc value at H=%g; skipping variance vs n_mc", res.name, h)
            continue
        yield (f"grad_variance_vs_n_mc{dim_suffix(h, dims)}",
               _grad_grid(res, cell, "n_mc", "MC samples per estimate M (log)",
                          panels[0][2], f"Total gradient variance against M, H = {h:g}, "
                          f"each estimator measured on the same fixed {models}", logx=True,
                          reference=True, marker="o", palette=palette, count_runs=False))
    ratio = variance_ratio(res)
    if ratio is not None and ratio["latent_dim"].nunique() > 0:
        yield "variance_ratio_vs_latent_dim", _ratio_figure(ratio, palette)


def _final_sweep(sweep: pd.DataFrame) -> pd.DataFrame:
    """Each run's last measurement epoch of the sweep."""
    if "epoch" not in sweep.columns or sweep.empty:
        return sweep
    last = sweep.groupby("run_id")["epoch"].transform("max")
    return sweep[sweep["epoch"] == last]


def _sweep_models(sweep: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """The sweep rows measured on models trained with reparam, when the table says which model
    (``trained_with``) and has such models; else every row. Returns (rows, description)."""
    if "trained_with" in sweep.columns and (sweep["trained_with"] == "reparam").any():
        return sweep[sweep["trained_with"] == "reparam"], "models trained with reparam"
    return sweep, "models"


# -- the variance ratio: table and figure ---------------------------------------------------------
def variance_ratio(res: ExperimentResults) -> pd.DataFrame | None:
    """Variance ratio tr Σ(estimator) / tr Σ(reparam) per method, group, H and M, over seeds.

    Source: ``variance_sweep.csv`` (every estimator measured on the same trained model at the
    run's last sweep epoch; ``trained_with`` says which estimator trained that model), else the
    last ``grad_var_total`` of each run in metrics.csv (``trained_with`` = the run's own
    estimator, so numerator and denominator come from different models). Ratios are taken per
    seed and summarised by mean, sd and the mean of log10; diverged runs excluded.
    """
    cols = ["method", "latent_dim", "seed", "n_mc", "param_group", "estimator_label", "value"]
    if "variance_sweep.csv" in res.tables:
        src, source = res.tables["variance_sweep.csv"], "variance_sweep.csv"
        src = _final_sweep(src[src["metric"] == "grad_var_total"])
    else:
        src, source = final_rows(res.metric("grad_var_total"), ["run_id", "param_group"]), \
            "metrics.csv"
    if src.empty or not all(c in src.columns for c in cols):
        log.info("%s: no grad_var_total to form the score/reparam ratio", res.name)
        return None
    src = src[src["status"] == "ok"]
    if "trained_with" not in src.columns:
        src = src.assign(trained_with="")
    keys = ["trained_with", "method", "latent_dim", "seed", "n_mc", "param_group"]
    if "dataset" in src.columns:
        keys.insert(0, "dataset")
    per = src.groupby([*keys, "estimator_label"], dropna=False)["value"].mean().reset_index()
    ref = per[per["estimator_label"] == "reparam"].drop(columns="estimator_label")
    if ref.empty:
        log.info("%s: no reparam variance to divide by; no variance ratio", res.name)
        return None
    both = per[per["estimator_label"] != "reparam"].merge(ref, on=keys, suffixes=("", "_ref"))
    both = both[both["value_ref"] > 0]
    both["ratio"] = both["value"] / both["value_ref"]
    both["log10_ratio"] = np.log10(both["ratio"])
    group = [k for k in keys if k != "seed"]
    out = (both.groupby([*group, "estimator_label"], dropna=False)
           .agg(ratio_mean=("ratio", "mean"), ratio_sd=("ratio", "std"),
                log10_ratio_mean=("log10_ratio", "mean"), n_seeds=("ratio", "size"))
           .reset_index().rename(columns={"estimator_label": "estimator"}))
    out.insert(0, "source", source)
    out["reference"] = "reparam"
    rank = {m: i for i, m in enumerate(
        [*METHOD_ORDER, *LABEL_ORDER, *(p for g in GROUP_ROWS for p in g[1])])}
    keys = ["method", "estimator", "param_group"]
    order = out[keys].apply(lambda col: col.map(rank).fillna(len(rank))).rename(
        columns=lambda c: f"_{c}")
    out = (pd.concat([out, order], axis=1)
           .sort_values(["trained_with", *order.columns, *keys, "n_mc", "latent_dim"])
           .drop(columns=order.columns).reset_index(drop=True))
    return out


def _ratio_view(ratio: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """Rows measured on reparam-trained models when there are any (the cleanest comparison)."""
    if (ratio["trained_with"] == "reparam").any():
        return ratio[ratio["trained_with"] == "reparam"], " on models trained with reparam"
    return ratio, ""


def _ratio_markdown(ratio: pd.DataFrame) -> str:
    view, where = _ratio_view(ratio)
    view = view.assign(text=[f"{m:.3g} ± {s:.2g}" if np.isfinite(s) else f"{m:.3g}"
                             for m, s in zip(view["ratio_mean"], view["ratio_sd"], strict=True)])
    index = [c for c in ("dataset", "trained_with") if c in view.columns
             and view[c].nunique() > 1] + ["method", "estimator", "param_group", "n_mc"]
    wide = view.pivot_table(index=index, columns="latent_dim", values="text", aggfunc="first",
                            sort=False)
    wide = wide[sorted(wide.columns)]
    dims = [f"H = {h:g}" for h in wide.columns]
    names = {"dataset": "dataset", "trained_with": "model trained with", "method": "method",
             "estimator": "estimator", "param_group": "parameters", "n_mc": "M"}
    lines = ["| " + " | ".join([*(names[c] for c in index), *dims]) + " |",
             "|" + "---|" * (len(index) + len(dims))]
    for key, row in wide.iterrows():
        keys = [f"{k:g}" if isinstance(k, float | int | np.number) else str(k) for k in key]
        vals = ["—" if pd.isna(v) else str(v) for v in row]
        lines.append("| " + " | ".join([*keys, *vals]) + " |")
    note = (f"Gradient-variance ratio tr Σ(estimator) / tr Σ(reparam){where}, mean ± sd over "
            f"seeds, M samples per estimate (source: {ratio['source'].iloc[0]}).")
    return note + "\n\n" + "\n".join(lines) + "\n"


@register_table("gradient_variance")
def write_variance_ratio(res: ExperimentResults) -> list[Path]:
    """``variance_ratio.csv`` and its Markdown form ``variance_ratio.md`` beside the CSVs
    (nothing when there is no ratio to form); returns the files written."""
    ratio = variance_ratio(res)
    if ratio is None:
        return []
    csv = atomic_write(res.folder / "variance_ratio.csv",
                       lambda p: ratio.to_csv(p, index=False, float_format="%.6g"))
    md = atomic_write(res.folder / "variance_ratio.md",
                      lambda p: p.write_text(_ratio_markdown(ratio), encoding="utf-8"))
    return [csv, md]


def _ratio_figure(ratio: pd.DataFrame, palette: dict) -> Figure:
    view, where = _ratio_view(ratio)
    d = view.rename(columns={"estimator": "estimator_label"})
    methods = ordered(d["method"], METHOD_ORDER)
    groups = ordered(d["param_group"], [p for g in GROUP_ROWS for p in g[1]])
    fig, axes = panel_grid(1, len(groups), sharey=True)
    pal = {k: v for k, v in palette.items() if k in set(d["estimator_label"])}
    styles = dict(zip(methods, ("-", "--", ":", "-."), strict=False))
    for j, grp in enumerate(groups):
        ax = axes[0, j]
        log_axis(ax, "x", base=2)
        log_axis(ax, "y")
        cell = d[(d["param_group"] == grp) & (d["n_mc"] == d["n_mc"].min())]
        for (method, lab), r in cell.groupby(["method", "estimator_label"]):
            r = r.sort_values("latent_dim")
            ax.errorbar(r["latent_dim"], r["ratio_mean"], yerr=r["ratio_sd"].fillna(0),
                        color=pal.get(lab, "0.3"), ls=styles.get(method, "-"),
                        marker=LABEL_MARKERS.get(lab, "o"),
                        ms=4, capsize=2)
        ax.axhline(1.0, color="0.5", lw=0.8)
        plain_ticks(ax, d["latent_dim"])
        ax.set_title(f"{grp} parameters, M = {cell['n_mc'].min():g}", fontsize=9)
        ax.set_xlabel("latent dimension H (log₂)")
        ax.set_ylabel("variance ratio to reparam (log)" if j == 0 else "")
    extra = [Line2D([], [], color="0.3", ls=s, label=method_name(m)) for m, s in styles.items()]
    suptitle(fig, f"Gradient variance relative to the reparameterization estimator{where}")
    legend(fig, pal, Tally(), extra=extra, band=False, markers=True,
           title="estimator (mean ± sd over seeds)")
    return fig
