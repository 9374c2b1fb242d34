"""ppca_exact: the ELBO of a linear decoder (PPCA) against its closed-form ceiling.

Figure ``elbo_vs_target[_H]``: train (top) and test (bottom) ELBO against epochs, columns =
method, hue = estimator (solid), with the trained decoder's exact log p(x) (dotted, same
colour) and the target of the study: the PPCA maximum-likelihood log p(x) minus the closed-form
approximation gap of the best diagonal Gaussian q at that fit (Tipping & Bishop 1999), the
ELBO a method reaches when both its decoder and its posterior are optimal.
Figure ``grad_variance_vs_n_mc[_H]`` (when ``variance_sweep.csv`` exists): the gradient
variance of reparam (analytic and Monte Carlo KL), STL and the score function at the converged
reparam models against M; where the posterior is in the family, STL's variance vanishes at the
optimum.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pandas as pd
from matplotlib.figure import Figure

from experiments.figures import style
from experiments.figures.curves import Cell, elbo_grid
from experiments.figures.drawing import suptitle
from experiments.figures.loading import ExperimentResults, SkipFigure, dim_suffix, latent_dims
from experiments.figures.marks import Tally, absent_note, legend
from experiments.figures.registry import register
from experiments.figures.style import (
    ELBO_UNITS,
    METHOD_ORDER,
    REFERENCES,
    m_text,
    method_name,
    ordered,
    seeds_text,
)
from experiments.figures.variance import SWEEP_INPUTS, sweep_by_latent_dim, sweep_figure

__all__ = ["INPUTS", "fig_ppca_exact", "fig_ppca_variance", "ppca_targets"]

log = logging.getLogger(__name__)

INPUTS = SWEEP_INPUTS
#: metric → (line style, legend words)
CURVES = {"elbo": ("-", "ELBO (solid)"),
          "log_px_exact": (":", "exact log p(x) of the trained decoder (dotted)")}


def ppca_targets(res: ExperimentResults) -> pd.DataFrame:
    """Per latent dimension and split: the target log p_MLE(x) − approximation gap_MLE (mean
    over the runs' final rows; the same data give the same value) and how many data seeds."""
    ex = res.metric("log_px_mle", "approximation_gap_mle")
    if ex.empty:
        return pd.DataFrame(columns=["latent_dim", "split", "target"])
    ex = ex[ex["epoch"] == ex.groupby(["run_id", "split", "metric"])["epoch"].transform("max")]
    wide = ex.pivot_table(index=["run_id", "latent_dim", "split"], columns="metric",
                          values="value", aggfunc="mean").reset_index()
    if not {"log_px_mle", "approximation_gap_mle"} <= set(wide.columns):
        return pd.DataFrame(columns=["latent_dim", "split", "target"])
    wide["target"] = wide["log_px_mle"] - wide["approximation_gap_mle"]
    return wide.groupby(["latent_dim", "split"], as_index=False)["target"].mean()


@register("ppca_exact", inputs=INPUTS)
def fig_ppca_exact(res: ExperimentResults) -> Iterator[tuple[str, Figure]]:
    """ELBO and exact log p(x) against epochs per method and estimator, with the PPCA
    maximum-likelihood target."""
    e = res.metric(*CURVES)
    e = e[e["split"].isin(["train", "test"])]
    if e.empty:
        raise SkipFigure("no elbo rows")
    targets = ppca_targets(res)
    if targets.empty:
        log.info("%s: no log_px_mle / approximation_gap_mle rows; curves without a target",
                 res.name)
    dims = latent_dims(e)
    for h in dims:
        eh = e[e["latent_dim"] == h]
        methods = ordered(eh["method"], METHOD_ORDER)
        palette = style.palette(eh["estimator_label"])
        tally = Tally()
        cells = []
        for split in ordered(eh["split"], ("train", "test")):
            row = []
            tv = targets.loc[(targets["latent_dim"] == h) & (targets["split"] == split),
                             "target"]
            for method in methods:
                cell = eh[(eh["method"] == method) & (eh["split"] == split)]
                runs = res.runs_where(method=method, latent_dim=h)
                tally.add(runs, cell)
                row.append(Cell(f"{method_name(method)}, {split}"
                                f"{Tally().add(runs, cell).compact()}", cell, runs, split, h,
                                f"{split} ELBO, log p(x)\n({ELBO_UNITS})", extra=_target(tv)))
            cells.append(row)
        fig, _, notes = elbo_grid(res, cells, "epoch", palette, refs=(), style_by="metric",
                                  styles={k: v[0] for k, v in CURVES.items()},
                                  style_names=lambda m: CURVES.get(m, ("-", m))[1])
        suptitle(fig, f"Linear decoder (PPCA data), H = {h:g}: ELBO against epochs beside the "
                      f"closed-form target; {m_text(eh)}; each run until its stopping rule; "
                      f"mean ± sd over {seeds_text(eh['seed'])}{absent_note(res, methods)}")
        legend(fig, title="estimator (line, band: mean ± sd over seeds)",
               notes={**tally.notes(), **notes}, neutral=[v[1] for v in CURVES.values()])
        yield f"elbo_vs_target{dim_suffix(h, dims)}", fig


def _target(values: pd.Series):
    """Draws the target line of one panel; returns its value (to keep it in view)."""
    def draw(ax) -> list[float]:
        if values.empty:
            return []
        label, colour, ls = REFERENCES["target"]
        ax.axhline(float(values.mean()), color=colour, ls=ls, lw=1.6, label=label, zorder=1.5)
        return [float(values.mean())]
    return draw


@register("ppca_exact", inputs=INPUTS)
def fig_ppca_variance(res: ExperimentResults) -> Iterator[tuple[str, Figure]]:
    """Gradient variance against M at the converged reparam models (``variance_sweep.csv``)."""
    for h, suffix, cell, models in sweep_by_latent_dim(res):
        yield (f"grad_variance_vs_n_mc{suffix}",
               sweep_figure(res, cell, models, f"Linear decoder (PPCA data), H = {h:g}: "
                                               f"total gradient variance tr Σ against M (STL's "
                                               f"vanishes where q matches the posterior)"))
