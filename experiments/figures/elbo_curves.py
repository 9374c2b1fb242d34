"""elbo_curves: train and test ELBO during training, against epochs and wall-clock seconds.

Figures ``elbo_vs_epoch_{train,test}`` and ``elbo_vs_seconds_{train,test}``: rows = latent
dimension, columns = method, hue = estimator.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from experiments.figures import style
from experiments.figures.drawing import (
    Tally,
    bottom_xlabels,
    cut_outliers,
    draw_curves,
    empty_panel,
    facet_tally,
    legend,
    panel_grid,
    suptitle,
)
from experiments.figures.loading import ExperimentResults, latent_dims
from experiments.figures.registry import register
from experiments.figures.style import ELBO_UNITS, METHOD_ORDER, method_name, ordered

__all__ = ["fig_elbo_curves"]

log = logging.getLogger(__name__)


@register("elbo_curves")
def fig_elbo_curves(res: ExperimentResults) -> Iterator[tuple[str, Figure]]:
    """Train and test ELBO (nats) against epochs and against wall-clock seconds.

    The analogue of Kingma & Welling (2014), Fig. 2: rows = latent dimension H, columns = method.
    Train uses the full-split ``elbo``; without it, the minibatch running mean ``elbo_running``.
    """
    m = res.metrics
    for split in ("train", "test"):
        d = res.metric("elbo", split=split)
        what = "full-split ELBO"
        if d.empty and split == "train":
            d, what = res.metric("elbo_running", split="train"), "running minibatch ELBO"
            if not d.empty:
                log.info("%s: no full-split train elbo; using elbo_running", res.name)
        if d.empty:
            log.info("%s: no %s elbo rows; skipping its curves", res.name, split)
            continue
        for x, xlabel, stem in (("epoch", "epoch", "elbo_vs_epoch"),
                                ("wall_s", "training wall-clock time (seconds)",
                                 "elbo_vs_seconds")):
            if x == "wall_s" and d["wall_s"].isna().all():
                log.info("%s: no wall_s; skipping %s_%s", res.name, stem, split)
                continue
            yield f"{stem}_{split}", _elbo_grid(res, m, d, x, xlabel, split, what)


def _elbo_grid(res: ExperimentResults, m: pd.DataFrame, d: pd.DataFrame, x: str, xlabel: str,
               split: str, what: str) -> Figure:
    dims = latent_dims(d) or [np.nan]
    methods = ordered(d["method"], METHOD_ORDER)
    palette = style.palette(m["estimator_label"])
    fig, axes = panel_grid(len(dims), len(methods), sharey="row")
    tally = Tally()
    for i, h in enumerate(dims):
        row_axes: list = []
        row_values: list = []
        for j, method in enumerate(methods):
            ax = axes[i, j]
            cell = d[(d["method"] == method) & ((d["latent_dim"] == h) | pd.isna(h))]
            t = facet_tally(res, cell, method=method, latent_dim=h)
            tally.add(res.runs_where(method=method, latent_dim=h), cell)
            ax.set_title(f"{method_name(method)}, H = {h:g}{t.title_note()}", fontsize=9)
            if cell.empty:
                empty_panel(ax)
                continue
            draw_curves(ax, cell, x, palette, by="epoch")
            row_axes.append(ax)
            row_values.append(cell["value"])
            ax.set_xlabel(xlabel)
            ax.set_ylabel(f"{split} ELBO ({ELBO_UNITS})" if j == 0 else "")
        cut_outliers(row_axes, row_values)
    bottom_xlabels(axes)
    suptitle(fig, f"{split.capitalize()} {what} during training")
    legend(fig, palette, tally)
    return fig
