"""ELBO curves in a grid of panels, with reference lines: shared by elbo_curves, vem_e_steps,
mnist_curves and ppca_exact.

``elbo_grid`` draws one ``Cell`` per panel (its rows of metrics.csv, its runs, split and H):
mean ± sd curves per series (``draw_curves``), the reference models of the panel's data, H and
split (``refs.draw_references``), y limits shared along a row that keep the bulk readable and
the reference lines in view, and optionally a bits-per-dimension axis on the right.
``examples_seen`` adds the K&W x axis: training examples seen = epoch × n_train.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from experiments.figures.drawing import (
    apply_limits,
    draw_curves,
    elbo_limits,
    empty_panel,
    log_axis,
    panel_grid,
)
from experiments.figures.loading import ExperimentResults
from experiments.figures.refs import DEFAULT_MODELS, bpd_axis, draw_references

__all__ = ["X_AXES", "Cell", "elbo_grid", "examples_seen"]

#: x column → (axis label, log scale, average x over seeds at each epoch)
X_AXES = {
    "examples": ("training examples seen (epoch × N_train, log)", True, False),
    "epoch": ("epoch", False, False),
    "wall_s": ("training wall-clock seconds (log)", True, True),
}


@dataclass
class Cell:
    """One panel: its title, metric rows, runs (runs.csv rows: counts and reference data
    seeds), split and latent dimension H; ``extra`` draws more (e.g. a target line) and
    returns the values to keep in view; ``x`` overrides the grid's x column for this panel;
    ``empty`` is the text of a panel without data (default: why, from its runs)."""

    title: str
    data: pd.DataFrame
    runs: pd.DataFrame
    split: str
    h: object
    ylabel: str = ""
    extra: Callable | None = field(default=None, repr=False)
    x: str | None = None
    empty: str = ""


def examples_seen(res: ExperimentResults, d: pd.DataFrame) -> pd.DataFrame:
    """``d`` with an ``examples`` column, epoch × n_train of the run (runs.csv; epoch 0 is left
    out on its log axis by ``elbo_grid``); without n_train in runs.csv, the column is
    missing."""
    if res.runs is None or "n_train" not in res.runs.columns:
        return d
    n = d["run_id"].map(res.runs.drop_duplicates("run_id").set_index("run_id")["n_train"])
    return d.assign(examples=pd.to_numeric(d["epoch"], errors="coerce") * pd.to_numeric(
        n, errors="coerce"))


def elbo_grid(res: ExperimentResults, cells: list[list[Cell]], x: str, palette: dict,
              *, key: str = "estimator_label", refs: tuple[str, ...] = DEFAULT_MODELS,
              bpd: tuple[float, float] | None = None, style_by: str | None = None,
              styles: dict | None = None, style_names: Callable[[object], str] | None = None,
              marker: bool = False, w: float = 3.6, h: float = 2.7
              ) -> tuple[Figure, np.ndarray, dict[str, str]]:
    """A grid of ELBO-curve panels (rows share y), one per cell; returns (figure, axes,
    legend notes of the reference lines). ``style_by``: a column whose values are drawn with
    ``styles`` line styles in the same panel (named in the legend by ``style_names``)."""
    nrows, ncols = len(cells), max(len(r) for r in cells)
    fig, axes = panel_grid(nrows, ncols, sharex=False, sharey="row", w=w, h=h)
    notes: dict[str, str] = {}
    for i, row in enumerate(cells):
        values: list[pd.Series] = []
        keep: list[float] = []
        for j, cell in enumerate(row):
            ax = axes[i, j]
            drawn, found = draw_references(ax, res, cell.runs, cell.split, cell.h, refs) \
                if refs and len(cell.data) else ([], {})
            notes |= found
            more = cell.extra(ax) if cell.extra is not None and len(cell.data) else []
            keep += [*drawn, *more]
            values.append(pd.concat([cell.data["value"].astype(float),
                                     pd.Series(drawn + list(more), dtype=float)]))
        limits = elbo_limits(values, keep=keep)
        for j, cell in enumerate(row):
            ax = axes[i, j]
            ax.set_title(cell.title, fontsize=9)
            ax.set_ylabel(cell.ylabel if j == 0 else "")
            cx = cell.x or x
            xlabel, logx, average = X_AXES.get(cx, (cx, False, False))
            d = cell.data[cell.data[cx].notna()] if cx in cell.data.columns \
                else cell.data.iloc[:0]
            if logx:
                d = d[d[cx] > 0]
            if d.empty:
                empty_panel(ax, cell.empty or ("not in the grid" if cell.runs is None
                                               or cell.runs.empty else "no finite values"))
                continue
            if logx:
                log_axis(ax, "x")
            groups = [(None, d)] if style_by is None else list(d.groupby(style_by, sort=False))
            for value, sub in groups:
                ls = "-" if value is None else (styles or {}).get(value, "-")
                draw_curves(ax, sub, cx, palette, key=key, by="epoch" if average else None,
                            ls=ls, marker=marker, floor=None if limits is None else limits[0],
                            style_label=style_names(value) if style_names and value is not None
                            else "")
            ax.set_xlabel(xlabel)
        apply_limits(axes[i, :len(row)], limits, values)
        if bpd is not None:
            bpd_axis(axes[i, len(row) - 1], *bpd)
        for j in range(len(row), ncols):
            axes[i, j].set_visible(False)
    if all(c.x is None for row in cells for c in row):  # one x quantity: named once, below
        for ax in axes[:-1].flat:
            ax.set_xlabel("")
    return fig, axes, notes
