"""families: the gap decomposition per variational family (Cremer, Li & Duvenaud 2018, Table 2
and §5): with a richer q the approximation gap log p(x) − L[q*] should shrink, and the
amortization gap L[q*] − L[q_φ] may become the larger part.

Figure ``families_<dataset>``: per method (x) one stacked bar per family (diagonal, full
covariance, planar flow): the approximation gap at the bottom (solid) and the amortization gap
on top of it (hatched), their sum log p(x) − L[q_φ]; each segment's mean over the finished runs
with its sd as an error bar at the segment's top; rows = estimator, columns = split (train,
test), as Cremer et al.'s Fig. 3.

Table ``gaps_table.csv`` / ``gaps_table.md``: the amortization_gap experiment's table
(``experiments.figures.amortization_gap.gaps_table``) with its ``family`` column: per data set
× method × family × estimator × split, log p̂(x), L[q*] (q* fitted per point in the method's
own family), L[q_φ] and both gaps.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from experiments.figures import style
from experiments.figures.amortization_gap import (
    FAMILY_ORDER,
    INPUTS,
    _gaps_markdown,
    gaps_table,
    per_run_gaps,
)
from experiments.figures.drawing import empty_panel, panel_grid, save_table, suptitle
from experiments.figures.loading import ExperimentResults, SkipFigure
from experiments.figures.marks import Tally, legend
from experiments.figures.registry import register, register_table
from experiments.figures.style import (
    LABEL_ORDER,
    METHOD_ORDER,
    TRAINING_LENGTH,
    method_name,
    ordered,
    seeds_text,
)

__all__ = ["FAMILY_NAMES", "fig_families", "write_families_table"]

log = logging.getLogger(__name__)

EXPERIMENT = "families"
#: the families as the figures name them
FAMILY_NAMES = {"diagonal": "diagonal Gaussian", "full": "full-covariance Gaussian",
                "flow": "planar flow"}
#: the two stacked segments: (column, legend text, hatch)
SEGMENTS = (("approximation_gap", "approximation gap log p(x) − L[q*]", None),
            ("amortization_gap", "amortization gap L[q*] − L[q_φ]", "///"))


@register(EXPERIMENT, inputs=INPUTS)
def fig_families(res: ExperimentResults) -> Iterator[tuple[str, Figure]]:
    """Stacked approximation + amortization gaps per method × family, train and test, per
    data set."""
    per = per_run_gaps(res)
    if per.empty:
        raise SkipFigure("no gap rows")
    for dataset in ordered(per["dataset"]):
        yield f"families_{dataset}", _stacked(per[per["dataset"] == dataset], dataset)


def _stacked(d: pd.DataFrame, dataset: str) -> Figure:
    splits = ordered(d["split"], ("train", "test"))
    labels = ordered(d["estimator_label"], LABEL_ORDER)
    methods = ordered(d["method"], METHOD_ORDER)
    fams = ordered(d["family"], FAMILY_ORDER)
    colours = dict(zip(fams, style.COLORBLIND, strict=False))
    fig, axes = panel_grid(len(labels), len(splits), sharex=False, sharey="row",
                           w=1.4 + 0.9 * len(methods) * max(len(fams), 1) ** 0.5, h=2.9)
    width = 0.8 / max(len(fams), 1)
    for i, lab in enumerate(labels):
        for j, split in enumerate(splits):
            ax = axes[i, j]
            cell = d[(d["split"] == split) & (d["estimator_label"] == lab)]
            ok = cell[(cell["status"] == "ok") & cell["approximation_gap"].notna()]
            if ok.empty:
                empty_panel(ax, "no finished runs")
                continue
            for k, fam in enumerate(fams):
                for x, method in enumerate(methods):
                    v = ok[(ok["method"] == method) & (ok["family"] == fam)]
                    if v.empty:
                        continue
                    pos = x - 0.4 + width * (k + 0.5)
                    bottom = 0.0
                    for col, _, hatch in SEGMENTS:
                        mean = float(v[col].mean())
                        sd = float(v[col].std(ddof=1)) if len(v) > 1 else 0.0
                        ax.bar(pos, mean, width * 0.9, bottom=bottom, color=colours[fam],
                               alpha=0.85 if hatch is None else 0.45, hatch=hatch,
                               edgecolor="0.2", lw=0.5, label=_label(fam, col))
                        ax.errorbar(pos, bottom + mean, yerr=sd, color="0.15", lw=0.8,
                                    capsize=1.5)
                        bottom += mean
            ax.axhline(0, color="0.3", lw=0.8)
            ticks = []
            for method in methods:
                t = Tally().add(cell[cell["method"] == method])
                ticks.append(method_name(method).replace(" (", "\n(") + t.compact())
            ax.set_xticks(range(len(methods)), ticks, fontsize=7)
            ax.set_title(f"{lab}, {split} split", fontsize=9)
            ax.set_ylabel("nats / data point" if j == 0 else "")
    ok = d[d["status"] == "ok"]
    kinds = ", ".join(ordered(d["log_px_kind"].dropna()))
    suptitle(fig, f"{dataset}: approximation and amortization gaps per variational family "
                  f"(Cremer et al. 2018), models {TRAINING_LENGTH}; q* fitted in the method's "
                  f"own family; log p(x) {kinds}; segments: mean over {seeds_text(ok['seed'])}, "
                  f"error bars: sd")
    notes = Tally().add(d.drop_duplicates("run_id")).notes()
    title = ("family: segment (bottom: approximation gap, hatched top: amortization gap)"
             + ("; " + "; ".join(f"{k}: {v}" for k, v in notes.items()) if notes else ""))
    legend(fig, title=title, order=[_label(f, c) for f in fams for c, _, _ in SEGMENTS],
           ncols=2)
    return fig


def _label(family: str, column: str) -> str:
    """The legend entry of one family's segment."""
    text = dict((c, t) for c, t, _ in SEGMENTS)[column]
    return f"{FAMILY_NAMES.get(family, family)}: {text}"


@register_table(EXPERIMENT, outputs=("gaps_table.csv", "gaps_table.md"))
def write_families_table(res: ExperimentResults) -> list[Path]:
    """``gaps_table.csv`` and ``gaps_table.md`` (Cremer et al.'s layout with a family column)
    beside the CSVs; returns the files written."""
    try:
        table = gaps_table(res)
    except SkipFigure as why:
        log.info("%s: %s; no gaps table", res.name, why)
        return []
    return save_table(table, res.folder, "gaps_table",
                      lambda t: _gaps_markdown(t, EXPERIMENT))
