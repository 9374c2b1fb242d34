"""ppca_exact: the ELBO of a linear decoder (PPCA) against its closed-form ceiling.

Figure ``elbo_vs_target[_H]``: ELBO against epochs per method × estimator, hue = split, dotted
line = log p(x) − approximation gap.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from experiments.figures.drawing import (
    Tally,
    bottom_xlabels,
    cut_outliers,
    draw_curves,
    empty_panel,
    panel_grid,
    suptitle,
)
from experiments.figures.loading import (
    ExperimentResults,
    SkipFigure,
    dim_suffix,
    final_rows,
    latent_dims,
)
from experiments.figures.registry import register
from experiments.figures.style import (
    ELBO_UNITS,
    LABEL_ORDER,
    METHOD_ORDER,
    SPLIT_COLOURS,
    method_name,
    ordered,
)

__all__ = ["fig_ppca_exact"]

log = logging.getLogger(__name__)


def _ppca_targets(res: ExperimentResults, elbo_runs: set) -> tuple[pd.DataFrame, str]:
    """Target ELBO per run and split: the best diagonal-Gaussian ELBO of the closed-form PPCA fit,
    ``log_px_mle − approximation_gap_mle`` (SPEC §5; Tipping & Bishop 1999), or, without those
    rows, the trained decoder's own ceiling ``log_px_exact − approximation_gap``.

    Rows of runs without ELBO curves become targets for every panel of their dataset, latent
    dimension and split. Returns (targets, which pair was used).
    """
    for lp, gap, what in (("log_px_mle", "approximation_gap_mle", "closed-form PPCA MLE"),
                          ("log_px_exact", "approximation_gap", "trained decoder")):
        ex = res.metric(lp, gap)
        if ex.empty:
            continue
        ex = final_rows(ex, ["run_id", "split", "metric"])
        wide = ex.pivot_table(index=["run_id", "dataset", "latent_dim", "split"],
                              columns="metric", values="value", aggfunc="mean").reset_index()
        if not {lp, gap} <= set(wide.columns):
            continue
        wide["target"] = wide[lp] - wide[gap]
        wide["global"] = ~wide["run_id"].isin(elbo_runs)
        return wide.dropna(subset=["target"]), what
    return pd.DataFrame(), ""


@register("ppca_exact")
def fig_ppca_exact(res: ExperimentResults) -> Iterator[tuple[str, Figure]]:
    """PPCA: the ELBO against epochs beside its ceiling log p_exact(x) − approximation gap.

    For a linear decoder both terms are closed forms (Tipping & Bishop 1999; SPEC §5): the best
    diagonal-Gaussian ELBO is the exact log-likelihood minus the closed-form approximation gap.
    Panels = method × estimator, hue = split, dotted line = the target (mean over runs).
    """
    e = res.metric("elbo")
    if e.empty:
        raise SkipFigure("no elbo rows")
    targets, what = _ppca_targets(res, set(e["run_id"]))
    if targets.empty:
        log.info("%s: no log_px_mle/approximation_gap_mle or log_px_exact/approximation_gap "
                 "rows; ELBO curves without a target", res.name)
    dims = latent_dims(e)
    for h in dims:
        eh = e[e["latent_dim"] == h]
        methods = ordered(eh["method"], METHOD_ORDER)
        labels = ordered(eh["estimator_label"], LABEL_ORDER)
        fig, axes = panel_grid(len(methods), len(labels), sharey="row", w=3.6, h=2.6)
        for i, method in enumerate(methods):
            row_axes: list = []
            row_values: list = []
            for j, lab in enumerate(labels):
                ax = axes[i, j]
                cell = eh[(eh["method"] == method) & (eh["estimator_label"] == lab)]
                runs = res.runs_where(method=method, latent_dim=h)
                if len(runs):
                    runs = runs[runs["estimator_label"] == lab]
                t = Tally().add(runs, cell)
                c = t.counts.get(lab, {"n": 0})
                ax.set_title(f"{method_name(method)}\n{lab}, {c['n']} run(s)"
                             f"{t.title_note()}", fontsize=9)
                if cell.empty:
                    empty_panel(ax)
                    continue
                pal = {s: SPLIT_COLOURS.get(s, "0.3")
                       for s in ordered(cell["split"], SPLIT_COLOURS)}
                draw_curves(ax, cell.assign(estimator_label=cell["split"]), "epoch", pal)
                if not targets.empty:
                    th = targets[targets["latent_dim"] == h]
                    mine = th[th["run_id"].isin(cell.loc[cell["status"] == "ok", "run_id"])
                              | th["global"]]
                    for split, tv in mine.groupby("split"):
                        ax.axhline(tv["target"].mean(), color=pal.get(split, "0.3"), ls=":",
                                   lw=1.6)
                    mine = mine["target"]
                else:
                    mine = pd.Series(dtype=float)
                row_axes.append(ax)
                row_values.append(pd.concat([cell["value"], mine]))
                ax.set_xlabel("epoch")
                ax.set_ylabel(f"ELBO ({ELBO_UNITS})" if j == 0 else "")
            cut_outliers(row_axes, row_values)
        splits = ordered(e["split"], SPLIT_COLOURS)
        handles = [Line2D([], [], color=SPLIT_COLOURS.get(s, "0.3"), lw=2.5, label=f"{s} ELBO")
                   for s in splits]
        handles.append(Line2D([], [], color="0.3", ls=":", lw=1.6,
                              label=f"target: log p(x) − approx. gap, {what}"))
        if res.metrics["status"].ne("ok").any():
            handles.append(Line2D([], [], color="0.3", lw=0.9, ls="--", marker="x", ms=8, mew=2,
                                  label="diverged run (× = last finite value)"))
        fig.legend(handles=handles, loc="outside right center", frameon=False,
                   title="split (mean ± sd over seeds)")
        bottom_xlabels(axes)
        suptitle(fig, f"Linear decoder (PPCA), H = {h:g}: ELBO against its closed-form ceiling")
        yield f"elbo_vs_target{dim_suffix(h, dims)}", fig
