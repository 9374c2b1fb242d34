"""gradient_variance: variance and signal-to-noise ratio of the gradient estimators, always
compared at equal M (Monte Carlo samples per estimate).

Figures (rows = parameter group: variational λ; local Λ / encoder φ; decoder θ, columns = method):

- ``grad_variance_vs_epoch[_H]``, ``grad_snr_vs_epoch[_H]``: over training, hue = the estimator
  the run trained with, every estimator measured by the ``gradvar`` probe at the same M (in
  every panel title; ``variance.probe_m``);
- ``grad_variance_vs_latent_dim``, ``grad_snr_vs_latent_dim``: at the final (best-epoch) state
  against H, same M;
- ``grad_variance_vs_n_mc[_H]``: the sweep (``variance_sweep.csv``): every estimator measured on
  the same reparam-trained models at each M, STL (Monte Carlo KL) beside reparam with Monte
  Carlo and analytic KL, with a 1/M reference; ``grad_variance_per_cost_vs_n_mc[_H]``: the
  same as variance × M, the variance at equal cost;
- ``variance_ratio_vs_latent_dim``: tr Σ(estimator) / tr Σ(reparam, analytic KL) at equal M.

Tables ``variance_ratio.csv`` and ``variance_ratio.md`` (``write_variance_ratio``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from experiments.figures import style
from experiments.figures.drawing import (
    bottom_xlabels,
    draw_curves,
    empty_panel,
    log_axis,
    panel_grid,
    plain_ticks,
    save_table,
    steps_axis,
    suptitle,
)
from experiments.figures.loading import (
    ExperimentResults,
    SkipFigure,
    at_best,
    dim_suffix,
    latent_dims,
)
from experiments.figures.marks import Tally, legend
from experiments.figures.registry import register, register_table
from experiments.figures.style import (
    METHOD_ORDER,
    TRAINING_LENGTH,
    label_colour,
    m_text,
    marker_of,
    method_name,
    ordered,
    seeds_text,
)
from experiments.figures.variance import (
    SWEEP_INPUTS,
    group_rows,
    probe_m,
    sweep_by_latent_dim,
    sweep_figure,
    sweep_order,
    variance_ratio,
    with_probe_m,
)

__all__ = ["INPUTS", "fig_gradient_variance", "fig_variance_ratio", "fig_variance_sweep",
           "variance_ratio", "write_variance_ratio"]

log = logging.getLogger(__name__)

INPUTS = SWEEP_INPUTS
#: metric → (file stem, y label, what it is)
PANELS = {"grad_var_total": ("grad_variance", "tr Σ (log)",
                             "total variance tr Σ of one gradient estimate"),
          "grad_snr_mean": ("grad_snr", "mean SNR |ĝᵢ|/√vᵢ (log)",
                            "signal-to-noise ratio of the gradient (Rainforth et al. 2018)")}


def _dataset(d: pd.DataFrame) -> str:
    return "/".join(ordered(d["dataset"])) if len(d) else ""


def _grad_grid(res: ExperimentResults, d: pd.DataFrame, x: str, ylabel: str, title: str,
               m: float) -> Figure:
    """Rows = parameter group, columns = method, hue = training estimator, log y; every panel
    shows estimators measured at the same M (``m``, in its title)."""
    rows = group_rows(d)
    methods = ordered(d["method"], METHOD_ORDER)
    palette = style.palette(d["estimator_label"])
    fig, axes = panel_grid(len(rows), len(methods), sharex=True, sharey="row", w=3.3, h=2.6)
    tally = Tally()
    for i, (_, groups, row_name) in enumerate(rows):
        for j, method in enumerate(methods):
            ax = axes[i, j]
            cell = d[(d["method"] == method) & d["param_group"].isin(groups)]
            tally.add(res.runs_where(method=method, latent_dim=d["latent_dim"].iloc[0])
                      if x == "epoch" else res.runs_where(method=method), cell)
            group = "/".join(ordered(cell["param_group"])) or "/".join(groups)
            ax.set_title(f"{method_name(method)}: {group}\nM = {m:g} for every estimator",
                         fontsize=9)
            if cell.empty:
                empty_panel(ax, "no such parameters")
                continue
            if x == "epoch":
                steps_axis(ax, d["epoch"])
            else:
                log_axis(ax, "x", base=2)
            draw_curves(ax, cell, x, palette, logy=True, marker=True)
            if x != "epoch":
                plain_ticks(ax, d[x])
            ax.set_xlabel("epoch (0, then log)" if x == "epoch" else "latent dimension H (log₂)")
            ax.set_ylabel(f"{row_name}\n{ylabel}" if j == 0 else "")
    bottom_xlabels(axes)
    suptitle(fig, title)
    legend(fig, title="estimator the model trained with (line, band: mean ± sd over seeds)",
           notes=tally.notes())
    return fig


@register("gradient_variance", inputs=INPUTS)
def fig_gradient_variance(res: ExperimentResults) -> Iterator[tuple[str, Figure]]:
    """Variance and SNR over training (per H) and at the final state against H, every
    estimator measured by the gradvar probe at the same M."""
    g = res.metrics[res.metrics["metric"].isin(list(PANELS))]
    if g.empty:
        raise SkipFigure("no grad_var_total / grad_snr_mean rows in metrics.csv")
    g = with_probe_m(res, g)
    dims = latent_dims(g)
    for metric, (stem, ylabel, what) in PANELS.items():
        d = g[g["metric"] == metric]
        for m in sorted(d["probe_m"].unique()):
            dm = d[d["probe_m"] == m]
            suffix = "" if d["probe_m"].nunique() == 1 else f"_M{m:g}"
            common = (f"every estimator measured at M = {m:g} samples per estimate on a fixed "
                      f"training minibatch, each on the model it trained (training used "
                      f"{m_text(dm).removeprefix('training ')})"
                      f"; mean ± sd over {seeds_text(dm['seed'])}")
            for h in dims:
                cell = dm[dm["latent_dim"] == h]
                if cell["epoch"].nunique() > 1:
                    yield (f"{stem}_vs_epoch{dim_suffix(h, dims)}{suffix}",
                           _grad_grid(res, cell, "epoch", ylabel,
                                      f"{_dataset(cell)}, H = {h:g}: {what} over training; "
                                      f"{common}", m))
            if len(dims) > 1:
                last = at_best(res, dm, ["run_id", "param_group"])
                yield (f"{stem}_vs_latent_dim{suffix}",
                       _grad_grid(res, last, "latent_dim", ylabel,
                                  f"{_dataset(dm)}: {what} {TRAINING_LENGTH} against latent "
                                  f"dimension H; {common}", m))


@register("gradient_variance", inputs=INPUTS)
def fig_variance_sweep(res: ExperimentResults) -> Iterator[tuple[str, Figure]]:
    """Variance against M, and variance × M (equal cost), from the sweep, per H."""
    for h, suffix, cell, models in sweep_by_latent_dim(res):
        where = f"{_dataset(cell)}, H = {h:g}"
        yield (f"grad_variance_vs_n_mc{suffix}",
               sweep_figure(res, cell, models, f"{where}: total gradient variance tr Σ of one "
                                               f"estimate against M"))
        yield (f"grad_variance_per_cost_vs_n_mc{suffix}",
               sweep_figure(res, cell, models, f"{where}: variance × M, the variance at equal "
                                               f"cost (M samples cost M single ones; lower is "
                                               f"better)", per_cost=True))


@register("gradient_variance", inputs=INPUTS)
def fig_variance_ratio(res: ExperimentResults) -> Iterator[tuple[str, Figure]]:
    """tr Σ(estimator) / tr Σ(reparam, analytic KL) against H at equal M."""
    ratio = variance_ratio(res)
    if ratio is None or ratio["latent_dim"].nunique() < 2:
        raise SkipFigure("no variance ratio at two or more latent dimensions")
    yield "variance_ratio_vs_latent_dim", _ratio_figure(res, ratio)


def _ratio_m(res: ExperimentResults, ratio: pd.DataFrame) -> float:
    """The M to draw: the gradvar probe's when the ratio has it, else the M with the most
    estimators (the smallest among equals)."""
    m = probe_m(res)
    if m is not None and (ratio["n_mc"] == m).any():
        return float(m)
    counts = ratio.groupby("n_mc")["estimator"].nunique()
    return float(counts[counts == counts.max()].index.min())


def _ratio_figure(res: ExperimentResults, ratio: pd.DataFrame) -> Figure:
    m = _ratio_m(res, ratio)
    d = ratio[ratio["n_mc"] == m]
    trained = ordered(d["trained_with"], ["reparam"])[0]
    d = d[d["trained_with"] == trained]
    rows = group_rows(d)
    methods = ordered(d["method"], METHOD_ORDER)
    fig, axes = panel_grid(len(rows), len(methods), sharex=True, sharey="row", w=3.3, h=2.6)
    for i, (_, groups, row_name) in enumerate(rows):
        for j, method in enumerate(methods):
            ax = axes[i, j]
            cell = d[(d["method"] == method) & d["param_group"].isin(groups)]
            ax.set_title(f"{method_name(method)}: {'/'.join(ordered(cell['param_group']))}"
                         f"\nM = {m:g} for every estimator", fontsize=9)
            if cell.empty:
                empty_panel(ax, "no such parameters")
                continue
            log_axis(ax, "x", base=2)
            log_axis(ax, "y")
            for lab in sweep_order(cell["estimator"]):
                r = cell[cell["estimator"] == lab].sort_values("latent_dim")
                kl = "--" if lab.endswith("KL MC") else "-"
                ax.plot(r["latent_dim"], 10 ** r["log10_ratio_mean"], ls=kl, lw=1.5,
                        color=label_colour(lab.split(",")[0]), marker=marker_of(lab), ms=5,
                        label=lab)
            ax.axhline(1.0, color="0.5", lw=0.8, label="_equal")
            plain_ticks(ax, d["latent_dim"])
            ax.set_xlabel("latent dimension H (log₂)")
            ax.set_ylabel(f"{row_name}\nratio to reparam (log)" if j == 0 else "")
    bottom_xlabels(axes)
    models = "the same models (trained with reparam)" if trained == "reparam" else \
        f"models trained with {trained}"
    suptitle(fig, f"{'/'.join(ordered(d['dataset']))}: gradient variance of each estimator "
                  f"relative to reparam with analytic KL, at equal M = {m:g}, measured on "
                  f"{models} {TRAINING_LENGTH}; geometric mean over "
                  f"{int(d['n_seeds'].max()) if len(d) else 0} seeds (table: variance_ratio.md)")
    legend(fig, title="measured estimator", order=sweep_order(d["estimator"]))
    return fig


def _ratio_markdown(ratio: pd.DataFrame) -> str:
    """One table per M (and per data set / training estimator when there are several): rows =
    method × parameters × estimator, columns = latent dimension H."""
    view = ratio.assign(text=[f"{m:.3g} ± {s:.2g}" if np.isfinite(s) else f"{m:.3g}"
                              for m, s in zip(ratio["ratio_mean"], ratio["ratio_sd"],
                                              strict=True)])
    trained = ", ".join(ordered(ratio["trained_with"]))
    out = [f"Gradient-variance ratio tr Σ(estimator) / tr Σ({ratio['reference'].iloc[0]}) at "
           f"equal M (numerator and denominator both with M samples per estimate), mean ± sd "
           f"over seeds of the per-seed ratio, on models trained with {trained} "
           f"{TRAINING_LENGTH} (source: {ratio['source'].iloc[0]}"
           + ("; 'own': each estimator on the model it trained" if "own" in trained else "")
           + ")."]
    sections = [c for c in ("dataset", "trained_with") if view[c].nunique() > 1] + ["n_mc"]
    for key, part in view.groupby(sections, sort=False):
        key = key if isinstance(key, tuple) else (key,)
        words = {"dataset": "data set {}", "trained_with": "trained with {}", "n_mc": "M = {:g}"}
        out.append("\n### " + ", ".join(words[c].format(k) for c, k in
                                           zip(sections, key, strict=True)) + "\n")
        wide = part.pivot_table(index=["method", "param_group", "estimator"], columns="latent_dim",
                                values="text", aggfunc="first", sort=False)
        wide = wide[sorted(wide.columns)]
        heads = ["method", "parameters", "estimator", *(f"H = {h:g}" for h in wide.columns)]
        out += ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
        for (method, group, lab), row in wide.iterrows():
            cells = ["—" if pd.isna(v) else str(v) for v in row]
            out.append(f"| {method_name(method)} | {group} | {lab} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


@register_table("gradient_variance", outputs=("variance_ratio.csv", "variance_ratio.md"))
def write_variance_ratio(res: ExperimentResults) -> list[Path]:
    """``variance_ratio.csv`` and its Markdown form ``variance_ratio.md`` beside the CSVs
    (nothing when there is no ratio to form); returns the files written."""
    ratio = variance_ratio(res)
    if ratio is None:
        return []
    return save_table(ratio, res.folder, "variance_ratio", _ratio_markdown)
