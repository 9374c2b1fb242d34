"""test_time_inference: held-out ELBO and cost against the number of test-time E-steps.

Figure ``test_time_inference[_H]``: columns = methods with curves, top row held-out ELBO, bottom
row seconds per test point; dotted lines = the amortized one-pass reference.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import NullLocator

from experiments.figures import style
from experiments.figures.drawing import (
    Tally,
    bottom_xlabels,
    cut_outliers,
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
from experiments.figures.registry import register
from experiments.figures.style import ELBO_UNITS, METHOD_ORDER, method_name, ordered

__all__ = ["INIT_STYLES", "fig_test_time_inference"]

log = logging.getLogger(__name__)

INIT_STYLES = {"encoder": ("-", "E-steps from the encoder output"),
               "prior": ("--", "E-steps from the fixed (prior) initialisation"),
               "": ("-", "E-steps")}


@register("test_time_inference")
def fig_test_time_inference(res: ExperimentResults) -> Iterator[tuple[str, Figure]]:
    """Held-out ELBO against test-time E-steps, and seconds per test point (SPEC §5).

    Columns = methods with curves (several E-step counts); line style = where the E-steps start
    (``param_group`` of the ``test_curve_elbo`` rows: ``encoder`` output or the fixed ``prior``
    initialisation); x = E-steps on a log scale (symlog when 0 is present). Dotted horizontal
    lines: the amortized one-pass ELBO (its curve from the encoder at the fewest steps, else its
    final test ``elbo``) and its seconds per point, per estimator.
    """
    tc = res.metric("test_curve_elbo")
    if tc.empty:
        raise SkipFigure("no test_curve_elbo rows")
    if (tc["split"] == "test").any():
        tc = tc[tc["split"] == "test"]
    tc = tc.assign(step=tc["step"].astype(float),
                   init=tc["param_group"].fillna("").astype(str))
    curve_methods = [mth for mth in ordered(tc["method"], METHOD_ORDER)
                     if tc.loc[tc["method"] == mth, "step"].nunique() > 1]
    if not curve_methods:
        raise SkipFigure("no method has a test_curve_elbo at more than one E-step count")
    palette = style.palette(res.metrics["estimator_label"])
    dims = latent_dims(tc)
    for h in dims:
        th = tc[tc["latent_dim"] == h]
        amort = _amortized_reference(res, th, h)
        inits = ordered(th["init"], INIT_STYLES)
        fig, axes = panel_grid(2, len(curve_methods), sharey="row", sharex=True)
        tally = Tally()
        top_axes: list = []
        top_values: list = []
        for j, method in enumerate(curve_methods):
            cell = th[th["method"] == method]
            t = facet_tally(res, cell, method=method, latent_dim=h)
            tally.add(res.runs_where(method=method, latent_dim=h), cell)
            for i, (y, ylabel) in enumerate((("value", f"held-out ELBO ({ELBO_UNITS})"),
                                            ("wall_s", "seconds per test point (log)"))):
                ax = axes[i, j]
                if (cell["step"] <= 0).any():
                    ax.set_xscale("symlog", linthresh=1)
                    ax.xaxis.set_minor_locator(NullLocator())
                else:
                    log_axis(ax, "x")
                if cell["step"].nunique() <= 10:
                    plain_ticks(ax, cell["step"])
                ax.set_title(f"{method_name(method)}{t.title_note()}" if i == 0 else "",
                             fontsize=9)
                if cell.empty or cell[y].isna().all():
                    empty_panel(ax, "no timings" if y == "wall_s" else "no runs")
                    continue
                for init, sub in cell.groupby("init", sort=False):
                    draw_curves(ax, sub, "step", palette, y=y, logy=(y == "wall_s"),
                                marker="o", ls=INIT_STYLES.get(init, ("-", ""))[0])
                ref = amort[amort[y].notna()] if y in amort.columns else amort.iloc[:0]
                for lab, r in ref.groupby("estimator_label"):
                    ax.axhline(r[y].mean(), color=palette.get(lab, "0.3"), ls=":", lw=1.4)
                if y == "value":
                    top_axes.append(ax)
                    top_values.append(pd.concat([cell["value"], ref["value"]]))
                ax.set_xlabel("test-time E-steps (log)")
                ax.set_ylabel(ylabel if j == 0 else "")
        extra = [Line2D([], [], color="0.3", ls=INIT_STYLES.get(i, ("-", i))[0], lw=1.5,
                        label=INIT_STYLES.get(i, ("-", f"E-steps from {i}"))[1])
                 for i in inits if len(inits) > 1 or i]
        if len(amort):
            extra.append(Line2D([], [], color="0.3", ls=":", lw=1.4,
                                label="amortized (VAE), one encoder pass"))
        cut_outliers(top_axes, top_values)
        bottom_xlabels(axes)
        suptitle(fig, f"Test-time inference on held-out data, H = {h:g}")
        legend(fig, palette, tally, extra=extra, markers=True)
        yield f"test_time_inference{dim_suffix(h, dims)}", fig


def _amortized_reference(res: ExperimentResults, th: pd.DataFrame, h: object) -> pd.DataFrame:
    """Amortized one-pass held-out ELBO per finished run: its test curve from the encoder at the
    fewest E-steps (a curve without ``param_group`` counts as from the encoder), else its final
    test ``elbo``."""
    a = th[(th["method"] == "amortized") & (th["status"] == "ok") & th["init"].isin(
        ["encoder", ""])]
    if len(a):
        return a[a["step"] == a.groupby("run_id")["step"].transform("min")]
    e = res.metric("elbo", split="test")
    e = e[(e["method"] == "amortized") & (e["latent_dim"] == h) & (e["status"] == "ok")]
    return final_rows(e).assign(wall_s=np.nan)
