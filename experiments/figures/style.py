"""The shared look of every figure: order, names, colours, markers, line styles, units, titles.

One colour and one marker per estimator label (``estimator_label``) across all figures, so a
reader can follow ``score+none`` from one figure to the next; methods appear in ``METHOD_ORDER``
(the columns of a figure, left to right), are named by ``method_name`` and drawn with
``method_style``; reference models and the marks of runs that diverged or did not converge look
the same everywhere (``REFERENCES``, ``MARKS``). Names, orders, labels, markers, line styles and
colours, with their defaults for names not known, are the plot-free ``experiments.vocabulary``
(re-exported here); this module adds what only figures need. Nothing here draws or reads a file.
"""

from __future__ import annotations

from collections.abc import Iterable

import pandas as pd

from experiments.vocabulary import (
    COLORBLIND,
    LABEL_COLOURS,
    LABEL_MARKERS,
    LABEL_ORDER,
    LINE_STYLES,
    METHOD_COLOURS,
    METHOD_NAMES,
    METHOD_ORDER,
    METHOD_STYLES,
    estimator_label,
    label_colour,
    marker_of,
    method_colour,
    method_name,
    method_style,
    ordered,
    palette,
    style_word,
)

__all__ = [
    "COLORBLIND",
    "DPI",
    "ELBO_UNITS",
    "KL_STYLES",
    "LABEL_COLOURS",
    "LABEL_MARKERS",
    "LABEL_ORDER",
    "LINE_STYLES",
    "MARKS",
    "METHOD_COLOURS",
    "METHOD_NAMES",
    "METHOD_ORDER",
    "METHOD_STYLES",
    "REFERENCES",
    "SPLIT_COLOURS",
    "SPLIT_STYLES",
    "TRAINING_LENGTH",
    "estimator_label",
    "label_colour",
    "m_text",
    "marker_of",
    "method_colour",
    "method_name",
    "method_style",
    "ordered",
    "palette",
    "seeds_text",
    "style_word",
]

#: KL term of a measured gradient: analytic (closed form) or Monte Carlo
KL_STYLES = {"analytic": "-", "mc": "--"}
#: data split → colour and line style, where a panel shows several splits
SPLIT_COLOURS = {"train": COLORBLIND[0], "validation": COLORBLIND[7], "test": COLORBLIND[1]}
SPLIT_STYLES = {"train": "-", "validation": ":", "test": "--"}
#: reference model → (legend label, colour, line style) of its horizontal line
REFERENCES = {
    "no_latent": ("no-latent Gaussian (reference)", "0.45", (0, (6, 2, 1, 2))),
    "factor_analysis": ("factor analysis, same H (reference)", "0.1", (0, (4, 2))),
    "ppca": ("PPCA maximum likelihood: log p(x)", "0.1", (0, (4, 2))),
    "target": ("PPCA maximum likelihood: log p(x) − approximation gap (ELBO ceiling)", "0.1",
               (0, (7, 2, 1, 2, 1, 2))),
}
#: legend labels of the marks every figure shares (drawn grey in the legend)
MARKS = {
    "diverged": "diverged run (dashed; × = last finite value)",
    "unconverged": "not converged: stopped at the epoch cap before a plateau (hollow ▷ or "
                   "hollow marker)",
    "seed": "one seed (hollow: not converged)",
    "diverged_seeds": "diverged seeds (× on the lower edge, with their count)",
    "selected": "selected step sizes (★)",
    "unstable": "unstable candidate (red ring)",
    "off_axis": "seeds below the axis (↓ count)",
}
ELBO_UNITS = "nats / data point"
#: how long the models behind every "final" value trained
TRAINING_LENGTH = "at convergence (best epoch)"
#: resolution of the PNG files
DPI = 150


def seeds_text(seeds: Iterable[object] | pd.Series, per: pd.Series | None = None) -> str:
    """``5 seeds``; with ``per`` (seed counts per series) ``2–5 seeds`` when they differ."""
    if per is not None and len(per):
        lo, hi = int(per.min()), int(per.max())
        return f"{hi} seed{'s' * (hi != 1)}" if lo == hi else f"{lo}–{hi} seeds"
    n = len(ordered(seeds))
    return f"{n} seed{'s' * (n != 1)}"


def m_text(d: pd.DataFrame) -> str:
    """The Monte Carlo samples per training estimate M of each estimator label in ``d``
    (identity column ``n_mc``): ``M = 1 (reparam, stl), 4 (score+loo)``."""
    if d.empty or "n_mc" not in d.columns:
        return ""
    pairs = d[["estimator_label", "n_mc"]].dropna().drop_duplicates()
    groups: dict[float, list[str]] = {}
    for lab in ordered(pairs["estimator_label"], LABEL_ORDER):
        for m in sorted(pairs.loc[pairs["estimator_label"] == lab, "n_mc"]):
            groups.setdefault(float(m), []).append(lab)
    return "training M = " + ", ".join(f"{m:g} ({', '.join(labs)})"
                                       for m, labs in sorted(groups.items()))
