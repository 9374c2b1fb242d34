"""mnist_curves: Kingma & Welling (2014), Fig. 2, on the MNIST subset mnist5k.

Figures (``results/mnist_curves/figures/``):

- ``elbo_vs_examples``: train (top) and test (bottom) ELBO against training examples seen (log
  axis), columns = latent dimension H, colour = estimator, line style = method, with the
  no-latent Gaussian and factor analysis at each H and a bits-per-dimension axis on the right;
- ``final_elbo_vs_latent_dim`` and ``active_units_vs_latent_dim`` as in elbo_curves (with two
  or more latent dimensions);
- ``images[_H]`` (data, reconstructions, samples) and, where present, ``manifold``.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from experiments.figures import pictures, style
from experiments.figures.curves import Cell, elbo_grid, examples_seen
from experiments.figures.drawing import suptitle
from experiments.figures.elbo_curves import fig_active_units, fig_final_elbo
from experiments.figures.loading import ExperimentResults, SkipFigure
from experiments.figures.marks import Tally, absent_note, legend
from experiments.figures.registry import register
from experiments.figures.style import (
    ELBO_UNITS,
    METHOD_ORDER,
    m_text,
    method_name,
    method_style,
    ordered,
    seeds_text,
    style_word,
)

__all__ = ["INPUTS", "fig_mnist_curves", "fig_mnist_pictures"]

INPUTS = pictures.INPUTS


def _style_name(method: object) -> str:
    return f"{method_name(method)} ({style_word(method_style(method))})"


def _bpd(res: ExperimentResults) -> tuple[float, float] | None:
    """(data_dim, levels) of the runs when the data are discrete, else None."""
    if res.runs is None or not {"data_dim", "levels"} <= set(res.runs.columns):
        return None
    d = pd.to_numeric(res.runs["data_dim"], errors="coerce").dropna().unique()
    k = pd.to_numeric(res.runs["levels"], errors="coerce").dropna().unique()
    return (float(d[0]), float(k[0])) if len(d) == 1 and len(k) == 1 else None


@register("mnist_curves", inputs=INPUTS)
def fig_mnist_curves(res: ExperimentResults) -> Iterator[tuple[str, Figure]]:
    """ELBO against training examples seen, columns = H, colour = estimator, line style =
    method, rows = split; reference models and bits per dimension."""
    d = examples_seen(res, res.metric("elbo"))
    d = d[d["split"].isin(["train", "test"])] if len(d) else d
    if d.empty or "examples" not in d.columns:
        raise SkipFigure("no elbo rows with n_train in runs.csv")
    dims = sorted(d["latent_dim"].dropna().unique()) or [np.nan]
    palette = style.palette(d["estimator_label"])
    tally = Tally()
    cells = []
    for split in ordered(d["split"], ("train", "test")):
        row = []
        for h in dims:
            cell = d[(d["split"] == split) & (d["latent_dim"] == h)]
            runs = res.runs_where(latent_dim=h)
            tally.add(runs, cell)
            row.append(Cell(f"H = {h:g}, {split}{Tally().add(runs, cell).compact()}", cell,
                            runs, split, h, f"{split} ELBO ({ELBO_UNITS})"))
        cells.append(row)
    fig, _, notes = elbo_grid(res, cells, "examples", palette, bpd=_bpd(res), style_by="method",
                              styles={m: method_style(m) for m in ordered(d["method"])},
                              style_names=_style_name, w=3.8, h=3.0)
    methods = ordered(d["method"], METHOD_ORDER)
    suptitle(fig, f"{'/'.join(ordered(d['dataset']))} (after Kingma & Welling 2014, Fig. 2): "
                  f"train and test ELBO against training examples seen, columns = latent "
                  f"dimension H, line style = method; {m_text(d)}; each run until its stopping "
                  f"rule; mean ± sd over {seeds_text(d['seed'])}; right axis: bits per "
                  f"dimension{absent_note(res, methods)}")
    legend(fig, title="estimator, method (line, band: mean ± sd over seeds)",
           notes={**tally.notes(), **notes}, neutral=[_style_name(m) for m in METHOD_ORDER],
           order=[*style.LABEL_ORDER, *(_style_name(m) for m in METHOD_ORDER)])
    yield "elbo_vs_examples", fig


register("mnist_curves")(fig_final_elbo)
register("mnist_curves")(fig_active_units)


@register("mnist_curves", inputs=INPUTS)
def fig_mnist_pictures(res: ExperimentResults) -> Iterator[tuple[str, Figure]]:
    """Data, reconstructions and samples (and the manifold where H = 2)."""
    yield from pictures.pictures(res)
