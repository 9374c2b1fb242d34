"""The shared look of every figure: order, names, colours, markers, line styles, units, titles.

One colour and one marker per estimator label (``estimator_label``) across all figures, so a
reader can follow ``score+none`` from one figure to the next; methods appear in ``METHOD_ORDER``
(the columns of a figure, left to right) and are named by ``method_name``; reference models and
the marks of runs that diverged or did not converge look the same everywhere (``REFERENCES``,
``MARKS``). Nothing here draws or reads a file.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pandas as pd
import seaborn as sns

__all__ = [
    "COLORBLIND",
    "DPI",
    "ELBO_UNITS",
    "KL_STYLES",
    "LABEL_COLOURS",
    "LABEL_MARKERS",
    "LABEL_ORDER",
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
    "method_name",
    "ordered",
    "palette",
    "seeds_text",
]

METHOD_ORDER = ("vem", "amortized", "semi_amortized", "sa_vae")
METHOD_NAMES = {"vem": "variational EM", "amortized": "amortized (VAE)",
                "semi_amortized": "semi-amortized (VAE + SVI)", "sa_vae": "SA-VAE"}
LABEL_ORDER = ("reparam", "stl", "score+none", "score+mean", "score+loo", "score+cv")
#: seaborn's colour-blind-safe palette; estimator labels and splits index into it
COLORBLIND = sns.color_palette("colorblind", 10)
#: markers tell apart estimators whose curves coincide (reparam and stl often do)
LABEL_MARKERS = {"reparam": "o", "stl": "s", "score+none": "^", "score+mean": "v",
                 "score+loo": "D", "score+cv": "P"}
#: estimator label → index into ``COLORBLIND``; other labels take the unused colours in turn
LABEL_COLOURS = {"reparam": 0, "stl": 1, "score+none": 3, "score+mean": 4, "score+loo": 2,
                 "score+cv": 5}
#: methods drawn in one panel (hue = estimator) differ by line style; where the hue is the
#: method itself (refinement) it takes these colours, which no estimator label uses
METHOD_STYLES = {"vem": "-", "amortized": "--", "semi_amortized": "-.", "sa_vae": ":"}
METHOD_COLOURS = {"vem": COLORBLIND[7], "amortized": COLORBLIND[8],
                  "semi_amortized": COLORBLIND[9], "sa_vae": COLORBLIND[6]}
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


def estimator_label(estimator: object, baseline: object) -> str:
    """``estimator`` alone for pathwise estimators without a baseline, else ``estimator+baseline``.

    The score function always shows its baseline (``score+none``), since that is what decides
    its variance (Mohamed et al. 2020, §5).
    """
    b = "" if baseline is None or pd.isna(baseline) else str(baseline).strip()
    if str(estimator) == "score" or (b and b != "none"):
        return f"{estimator}+{b or 'none'}"
    return str(estimator)


def ordered(values: Iterable[object], order: Iterable[object] = ()) -> list:
    """The distinct values (NaN dropped): those in ``order`` first, in that order, then the
    rest sorted by their text."""
    present = list(dict.fromkeys(v for v in values if not (isinstance(v, float) and np.isnan(v))))
    first = [v for v in order if v in present]
    return first + sorted((v for v in present if v not in first), key=str)


def label_colour(label: str) -> tuple:
    """The fixed colour of an estimator label (grey for an unknown one)."""
    idx = LABEL_COLOURS.get(str(label))
    return COLORBLIND[idx] if idx is not None else (0.3, 0.3, 0.3)


def marker_of(label: object) -> str:
    """The marker of an estimator label, also of a qualified one (``reparam, KL MC``)."""
    return LABEL_MARKERS.get(str(label), LABEL_MARKERS.get(str(label).split(",")[0], "o"))


def palette(labels: Iterable[str]) -> dict[str, tuple]:
    """Estimator label → colour for the labels present, in ``LABEL_ORDER``.

    Known labels always get their ``LABEL_COLOURS`` entry, whatever else is present; unknown
    labels take the colours no known label uses, in turn.
    """
    spare = iter(i for i in range(10) if i not in LABEL_COLOURS.values())
    out = {}
    for lab in ordered(labels, LABEL_ORDER):
        idx = LABEL_COLOURS.get(lab)
        out[lab] = COLORBLIND[idx if idx is not None else next(spare, 7)]
    return out


def method_name(method: object) -> str:
    """The readable name of an inference method (``vem`` → ``variational EM``)."""
    return METHOD_NAMES.get(str(method), str(method))


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
