"""amortization_gap: approximation and amortization gaps (Cremer et al. 2018) per method.

Figures ``gaps_<dataset>`` (bars at the end of training, train vs test) and
``bounds_vs_epoch_<dataset>_<split>`` (log p(x), L[q*], L[q_φ] and both gaps over training, when
they were measured at several epochs).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from experiments.figures import style
from experiments.figures.drawing import (
    Tally,
    bottom_xlabels,
    draw_curves,
    empty_panel,
    facet_tally,
    legend,
    panel_grid,
    suptitle,
)
from experiments.figures.loading import ExperimentResults, final_rows
from experiments.figures.registry import register
from experiments.figures.style import METHOD_ORDER, method_name, ordered

__all__ = ["GAP_METRICS", "fig_amortization_gap"]

log = logging.getLogger(__name__)

GAP_METRICS = (("approximation_gap", "approximation gap\nlog p(x) − L[q*]"),
               ("amortization_gap", "amortization gap\nL[q*] − L[q_φ]"))


@register("amortization_gap")
def fig_amortization_gap(res: ExperimentResults) -> Iterator[tuple[str, Figure]]:
    """Approximation and amortization gaps (Cremer et al. 2018), train vs test, per dataset.

    Bars: mean ± sd over seeds at each run's last measurement, dots: individual seeds; diverged
    runs have no final gaps and are counted under each method. Over training (when gaps were
    measured at several epochs): log p(x), L[q*], L[q_φ] and both gaps against epoch.
    """
    m = res.metrics
    gaps = res.metric(*(g for g, _ in GAP_METRICS))
    if gaps.empty:
        log.info("%s: no gap rows; skipping gap figures", res.name)
    palette = style.palette(m["estimator_label"])
    for dataset in ordered(gaps["dataset"]):
        d = final_rows(gaps[gaps["dataset"] == dataset], ["run_id", "split", "metric"])
        yield f"gaps_{dataset}", _gap_bars(res, d, dataset, palette)
    quantities = (("log_px", "log p(x)"), ("elbo_qstar", "L[q*]"), ("elbo_qphi", "L[q_φ]"),
                  *GAP_METRICS)
    for dataset in ordered(m["dataset"]):
        dm = m[m["dataset"] == dataset]
        lp = "log_px_exact" if (dm["metric"] == "log_px_exact").any() else "iwae"
        dm = dm.assign(metric=dm["metric"].replace({lp: "log_px"}))
        dq = dm[dm["metric"].isin([q for q, _ in quantities])]
        if dq.empty or dq["epoch"].nunique() < 2:
            continue
        for split in ordered(dq["split"], ("train", "test")):
            ds = dq[dq["split"] == split]
            rows = [(q, name.replace("log p(x)", f"log p(x) [{lp}]")) for q, name in quantities
                    if (ds["metric"] == q).any()]
            methods = ordered(ds["method"], METHOD_ORDER)
            fig, axes = panel_grid(len(rows), len(methods), sharey="row", h=2.4)
            tally = Tally()
            for i, (q, name) in enumerate(rows):
                for j, method in enumerate(methods):
                    ax = axes[i, j]
                    cell = ds[(ds["metric"] == q) & (ds["method"] == method)]
                    t = facet_tally(res, cell, method=method, dataset=dataset)
                    tally.add(res.runs_where(method=method, dataset=dataset), cell)
                    ax.set_title((f"{method_name(method)}{t.title_note()}" if i == 0 else ""),
                                 fontsize=9)
                    if cell.empty:
                        empty_panel(ax)
                        continue
                    draw_curves(ax, cell, "epoch", palette)
                    ax.set_xlabel("epoch")
                    ax.set_ylabel(f"{name} (nats)" if j == 0 else "")
            bottom_xlabels(axes)
            suptitle(fig, f"{dataset}: bounds and gaps over training ({split} split)")
            legend(fig, palette, tally)
            yield f"bounds_vs_epoch_{dataset}_{split}", fig


def _gap_bars(res: ExperimentResults, d: pd.DataFrame, dataset: str, palette: dict) -> Figure:
    splits = ordered(d["split"], ("train", "test"))
    methods = ordered(pd.concat([d["method"], res.runs_where(dataset=dataset)["method"]]),
                      METHOD_ORDER)
    fig, axes = panel_grid(len(GAP_METRICS), len(splits), sharex=False, sharey="row",
                           w=1.3 + 1.5 * len(methods), h=3.0)
    tally = Tally().add(res.runs_where(dataset=dataset), d)
    hue_order = [lab for lab in palette if lab in set(d["estimator_label"])]
    for i, (metric, name) in enumerate(GAP_METRICS):
        for j, split in enumerate(splits):
            ax = axes[i, j]
            cell = d[(d["metric"] == metric) & (d["split"] == split)]
            ok = cell[cell["status"] == "ok"]
            if ok.empty:
                empty_panel(ax, "no finished runs")
            else:
                sns.barplot(data=ok, x="method", y="value", hue="estimator_label", order=methods,
                            hue_order=hue_order, palette=palette, errorbar="sd", ax=ax,
                            legend=False, alpha=0.8, capsize=0.1, err_kws={"linewidth": 1})
                sns.stripplot(data=ok, x="method", y="value", hue="estimator_label",
                              order=methods, hue_order=hue_order, palette=palette, dodge=True,
                              ax=ax, legend=False, size=3, jitter=False, edgecolor="k",
                              linewidth=0.5)
                ax.axhline(0, color="0.3", lw=0.8)
            ticks = []
            for method in methods:
                t = Tally().add(res.runs_where(dataset=dataset, method=method),
                                cell[cell["method"] == method])
                n = sum(c["n"] for c in t.counts.values())
                bad = sum(c["diverged"] + c["failed"] for c in t.counts.values())
                ticks.append(method_name(method).replace(" (", "\n(")
                             + (f"\n{bad}/{n} diverged\n(not in bars)" if bad else ""))
            ax.set_xticks(range(len(methods)), ticks, fontsize=8)
            ax.set_xlabel("")
            ax.set_title(f"{split} split", fontsize=9)
            ax.set_ylabel(f"{name} (nats)" if j == 0 else "")
    suptitle(fig, f"{dataset}: inference gaps at the end of training (Cremer et al. 2018)")
    legend(fig, {k: v for k, v in palette.items() if k in hue_order}, tally, band=False,
           diverged_marker=False, title="estimator\n(bar: mean ± sd over seeds; dots: seeds)")
    return fig
