"""lr_selection: validation ELBO against the learning rate, per method and estimator.

Figure ``lr_selection[_<dataset>]``: mean ± sd over seeds of the finished runs at each step
size, ``×`` on the lower edge where runs diverged, stars at the step sizes chosen
(``selected.csv``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import matplotlib.transforms as mtransforms
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import NullLocator

from experiments.figures import style
from experiments.figures.drawing import (
    Tally,
    cut_outliers,
    draw_band,
    empty_panel,
    legend,
    log_axis,
    panel_grid,
    plain_ticks,
    suptitle,
)
from experiments.figures.loading import ExperimentResults, SkipFigure, add_labels, final_rows
from experiments.figures.registry import register
from experiments.figures.style import ELBO_UNITS, LABEL_MARKERS, METHOD_ORDER, method_name, ordered

__all__ = ["INPUTS", "SECOND_LR", "fig_lr_selection"]

log = logging.getLogger(__name__)

#: the extra table the figure reads, with the columns it needs
INPUTS = {"selected.csv": ("method", "estimator", "baseline", "lr")}
#: the second step size of a method, written under the lr ticks or as its own line style
SECOND_LR = ("local_lr", "refine_lr")


@register("lr_selection", inputs=INPUTS)
def fig_lr_selection(res: ExperimentResults) -> Iterator[tuple[str, Figure]]:
    """Validation ELBO at the end of training against the learning rate, per method.

    Lines: mean ± sd over seeds of finished runs; ``×`` on the lower edge: a diverged run at
    that step size (count beside it); star: the step sizes chosen (``selected.csv``). A second
    step size (``local_lr`` for vem, ``refine_lr`` for semi_amortized) that is paired with
    ``lr`` in the candidate grid is written under each lr tick; one that varies independently
    gets its own line style. One figure per dataset (suffix when several).
    """
    if res.runs is None or "lr" not in res.runs.columns:
        raise SkipFigure("runs.csv with an 'lr' column is needed")
    e = final_rows(res.metric("elbo", split="validation"))
    vals = e[["run_id", "value"]].drop_duplicates("run_id")
    runs = res.runs.merge(vals, on="run_id", how="left")
    try:
        sel = add_labels(res.table("selected.csv", INPUTS["selected.csv"]))
    except SkipFigure as why:
        log.info("%s: %s; no selection marks", res.name, why)
        sel = None
    datasets = ordered(runs["dataset"])
    for dataset in datasets:
        d = runs[runs["dataset"] == dataset]
        s = None if sel is None else (sel[sel["dataset"] == dataset] if "dataset" in
                                      sel.columns else sel)
        yield (f"lr_selection{'' if len(datasets) == 1 else f'_{dataset}'}",
               _lr_figure(res, d, s, dataset))


def _lr_figure(res: ExperimentResults, d: pd.DataFrame, sel: pd.DataFrame | None,
               dataset: str) -> Figure:
    palette = style.palette(d["estimator_label"])
    methods = ordered(d["method"], METHOD_ORDER)
    fig, axes = panel_grid(1, len(methods), sharex=False, sharey=True, w=4.0, h=3.4)
    styles = ("-", "--", ":", "-.")
    extra: list = []
    tally = Tally().add(d)
    for j, method in enumerate(methods):
        ax = axes[0, j]
        log_axis(ax, "x")
        dm = d[d["method"] == method]
        second = [c for c in SECOND_LR if c in dm.columns and dm[c].nunique() > 1]
        sec = second[0] if second else None
        paired = sec is not None and (dm.groupby("lr")[sec].nunique() <= 1).all()
        levels = ordered(dm[sec]) if sec and not paired else [None]
        for k, level in enumerate(levels):
            dl = dm if level is None else dm[dm[sec] == level]
            ok = dl[(dl["status"] == "ok") & dl["value"].notna()]
            for lab, grp in ok.groupby("estimator_label", sort=False):
                draw_band(ax, grp, "lr", "value", palette.get(lab, "0.3"), logy=False,
                          marker=LABEL_MARKERS.get(lab, "o"),
                          ls=styles[k % 4])
            if level is not None:
                extra.append(Line2D([], [], color="0.3", ls=styles[k % 4],
                                    label=f"{method_name(method)}: {sec} = {level:g}"))
        if paired:
            pairs = dm.groupby("lr")[sec].first()
            ax.set_xticks(pairs.index.to_numpy(float),
                          [f"{lr:g}\n{sec}={v:g}" for lr, v in pairs.items()], fontsize=7)
            ax.xaxis.set_minor_locator(NullLocator())
        elif dm["lr"].nunique() <= 8:
            plain_ticks(ax, dm["lr"])
        edge = mtransforms.blended_transform_factory(ax.transData, ax.transAxes)
        for (lr, lab), grp in dm[dm["status"] != "ok"].groupby(["lr", "estimator_label"]):
            ax.plot([lr], [0.03], transform=edge, marker="x", ms=9, mew=2, ls="none",
                    color=palette.get(lab, "0.3"), clip_on=False)
            if len(grp) > 1:
                ax.text(lr, 0.07, f"{len(grp)}", transform=edge, fontsize=7, ha="center",
                        color=palette.get(lab, "0.3"))
        if sel is not None:
            for _, r in sel[sel["method"] == method].iterrows():
                y = r.get("validation_elbo", np.nan)
                if pd.isna(y):
                    y = dm.loc[(dm["lr"] == r["lr"]) & (dm["estimator_label"] ==
                                                        r["estimator_label"]), "value"].mean()
                ax.plot([r["lr"]], [y], marker="*", ms=15, mec="k", mew=0.8, ls="none",
                        color=palette.get(r["estimator_label"], "0.3"))
        t = Tally().add(dm)
        ax.set_title(f"{method_name(method)}{t.title_note()}", fontsize=9)
        ax.set_xlabel("learning rate (log)")
        ax.set_ylabel(f"validation ELBO ({ELBO_UNITS})" if j == 0 else "")
        if not dm["value"].notna().any():
            empty_panel(ax, "no finished runs")
    cut_outliers(axes[0, 0], d.loc[d["status"] == "ok", "value"].dropna())
    if sel is not None and len(sel):
        extra.append(Line2D([], [], ls="none", marker="*", ms=12, mec="k", color="0.7",
                            label="selected step sizes"))
    if tally.bad():
        extra.append(Line2D([], [], ls="none", marker="x", ms=8, mew=2, color="0.3",
                            label="diverged at this lr (count beside ×)"))
    suptitle(fig, f"{dataset}: step-size selection on the validation split")
    legend(fig, palette, tally, extra=extra, diverged_marker=False, markers=True)
    return fig


#: experiment → figure functions, each yielding (file stem, figure)
