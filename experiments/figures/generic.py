"""Figures for an experiment without its own figure module (a custom grid): what every run
records, drawn without knowing what the experiment is about.

A *cell* is a (method, estimator, setting) group of runs that differ only in their seed; the
setting is every configuration field of ``runs.csv`` that varies across the experiment's runs
(a grid's axes), so the legend names exactly what the grid varied.

``elbo_vs_epoch``  the ELBO (nats per data point) against the epoch, one panel per split
                   (validation, train, test, as recorded), the median over a cell's seeds with
                   each seed as a thin line.
``final_elbo``     the ELBO at each run's best (restored) epoch per cell and split: mean and
                   95 % t-interval over seeds, one dot per seed (hollow: not converged).
``gaps``           where the runs measured them, every ``*_gap`` metric at the best epoch, as
                   ``final_elbo``.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from experiments.figures.drawing import ci95, empty_panel, panel_grid, suptitle
from experiments.figures.loading import ExperimentResults, SkipFigure, at_best
from experiments.figures.style import COLORBLIND, ELBO_UNITS, METHOD_ORDER, method_name, ordered

__all__ = ["FIGURES", "cell_labels", "fig_elbo_vs_epoch", "fig_final_elbo", "fig_gaps"]

SPLIT_ORDER = ("validation", "train", "test")
#: runs.csv configuration columns that never name a cell (the seed and what method and
#: estimator already say)
_NOT_SETTINGS = ("seed", "data.seed", "method.name", "method.estimator", "method.baseline",
                 "probes")


def cell_labels(runs: pd.DataFrame) -> pd.Series:
    """run_id → the run's cell label: method, estimator and the varying configuration fields."""
    runs = runs.drop_duplicates("run_id")
    varying = [c for c in runs.columns if "." in c and c not in _NOT_SETTINGS
               and runs[c].astype(str).nunique(dropna=False) > 1]

    def label(row: pd.Series) -> str:
        parts = [method_name(row["method"]), str(row["estimator_label"])]
        parts += [f"{c.split('.')[-1]}={row[c]:g}" if isinstance(row[c], int | float)
                  and not isinstance(row[c], bool) else f"{c.split('.')[-1]}={row[c]}"
                  for c in varying]
        return ", ".join(parts)

    return pd.Series([label(r) for _, r in runs.iterrows()], index=runs["run_id"].to_numpy())


def _cells(res: ExperimentResults, d: pd.DataFrame) -> tuple[pd.DataFrame, list[str], dict]:
    """``d`` with a ``cell`` column, the cells in order (methods in the study's order), and a
    colour per cell."""
    if res.runs is None or res.runs.empty:
        raise SkipFigure(f"{res.folder / 'runs.csv'} not found")
    labels = cell_labels(res.runs)
    d = d.assign(cell=d["run_id"].map(labels)).dropna(subset=["cell"])
    first = res.runs.drop_duplicates("run_id").assign(cell=lambda r: r["run_id"].map(labels))
    rank = {m: i for i, m in enumerate(ordered(first["method"], METHOD_ORDER))}
    cells = sorted(ordered(d["cell"]), key=lambda c: rank.get(
        first.loc[first["cell"] == c, "method"].iloc[0], len(rank)))
    colours = {c: COLORBLIND[i % len(COLORBLIND)] for i, c in enumerate(cells)}
    return d, cells, colours


def _splits(d: pd.DataFrame) -> list[str]:
    return ordered(d["split"], SPLIT_ORDER)


def fig_elbo_vs_epoch(res: ExperimentResults) -> Iterator[tuple[str, Figure]]:
    """The ELBO against the epoch per split: each cell's median over seeds, seeds thin."""
    d = res.metric("elbo")
    d = d[d["status"] == "ok"]
    if d.empty:
        raise SkipFigure("no ELBO rows of finished runs")
    d, cells, colours = _cells(res, d)
    splits = _splits(d)
    fig, axes = panel_grid(1, len(splits), sharex=True, sharey=False, w=4.2, h=3.4)
    for ax, split in zip(axes[0], splits, strict=True):
        part = d[d["split"] == split]
        for cell in cells:
            c = part[part["cell"] == cell]
            if c.empty:
                continue
            for _, run in c.groupby("run_id"):
                run = run.sort_values("epoch")
                ax.plot(run["epoch"], run["value"], color=colours[cell], lw=0.6, alpha=0.35)
            median = c.groupby("epoch")["value"].median()
            ax.plot(median.index, median.to_numpy(), color=colours[cell], lw=1.6, label=cell,
                    marker="o" if len(median) < 3 else None, ms=3)
        ax.set_title(split, fontsize=9)
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"ELBO ({ELBO_UNITS})")
        if len(part) and part["epoch"].max() > 0 and (part["epoch"] > 0).all():
            ax.set_xscale("log")
    axes[0, 0].legend(fontsize=7, loc="best")
    suptitle(fig, f"{res.name}: ELBO during training (median over seeds; thin lines: seeds)")
    yield "elbo_vs_epoch", fig


def _final_figure(res: ExperimentResults, d: pd.DataFrame, metrics: list[str], title: str,
                  unit: str) -> Figure:
    d, cells, colours = _cells(res, d)
    panels = [(m, s) for m in metrics for s in _splits(d[d["metric"] == m])]
    fig, axes = panel_grid(1, len(panels), sharex=False, sharey=False, w=max(3.0, 0.9 * len(
        cells) + 1.5), h=3.6)
    for ax, (metric, split) in zip(axes[0], panels, strict=True):
        part = d[(d["metric"] == metric) & (d["split"] == split)]
        if part.empty:
            empty_panel(ax)
            continue
        for i, cell in enumerate(cells):
            values = part.loc[part["cell"] == cell]
            if values.empty:
                continue
            mean, half, _ = ci95(values["value"].astype(float))
            ax.errorbar([i], [mean], yerr=[0.0 if not np.isfinite(half) else half],
                        color=colours[cell], marker="o", ms=6, capsize=3, ls="none")
            conv = values["converged"].ne(False).to_numpy() if "converged" in values else \
                np.ones(len(values), dtype=bool)
            for mask, face in ((conv, colours[cell]), (~conv, "white")):
                if mask.any():
                    ax.plot(np.full(int(mask.sum()), i + 0.15),
                            values["value"].to_numpy(float)[mask], ls="none", marker="o",
                            ms=3.5, mfc=face, mec=colours[cell], mew=0.8, alpha=0.8)
        ax.set_xticks(range(len(cells)))
        ax.set_xticklabels(cells, rotation=30, ha="right", fontsize=7)
        ax.set_xlim(-0.5, len(cells) - 0.5)
        ax.set_title(f"{metric}, {split}", fontsize=9)
        ax.set_ylabel(unit)
    suptitle(fig, f"{res.name}: {title} at each run's best epoch (mean and 95 % interval over "
                  f"seeds; dots: seeds, hollow: not converged)")
    return fig


def fig_final_elbo(res: ExperimentResults) -> Iterator[tuple[str, Figure]]:
    """The ELBO at each run's best epoch per cell and split."""
    d = at_best(res, res.metric("elbo"), ("run_id", "split"))
    d = d[d["status"] == "ok"] if len(d) else d
    if d.empty:
        raise SkipFigure("no ELBO rows of finished runs")
    yield "final_elbo", _final_figure(res, d, ["elbo"], "final ELBO", f"ELBO ({ELBO_UNITS})")


def fig_gaps(res: ExperimentResults) -> Iterator[tuple[str, Figure]]:
    """Every ``*_gap`` metric the runs measured, at each run's best epoch."""
    names = sorted(m for m in res.metrics["metric"].dropna().unique() if str(m).endswith("_gap"))
    if not names:
        raise SkipFigure("no gap metrics recorded")
    d = at_best(res, res.metric(*names), ("run_id", "split", "metric"))
    d = d[d["status"] == "ok"]
    if d.empty:
        raise SkipFigure("no gap rows of finished runs")
    yield "gaps", _final_figure(res, d, names, "gaps", f"gap ({ELBO_UNITS})")


#: the figure functions drawn for an experiment that registered none
FIGURES = (fig_elbo_vs_epoch, fig_final_elbo, fig_gaps)
