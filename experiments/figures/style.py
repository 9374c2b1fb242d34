"""The shared look of every figure: order, names, colours and markers, units, resolution.

One colour and one marker per estimator label (``estimator_label``) across all figures, so a
reader can follow ``score+none`` from one figure to the next; methods appear in
``METHOD_ORDER`` and are named by ``method_name``. Nothing here draws or reads a file.
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
    "LABEL_COLOURS",
    "LABEL_MARKERS",
    "LABEL_ORDER",
    "METHOD_NAMES",
    "METHOD_ORDER",
    "SPLIT_COLOURS",
    "estimator_label",
    "method_name",
    "ordered",
    "palette",
]

METHOD_ORDER = ("vem", "amortized", "semi_amortized")
METHOD_NAMES = {"vem": "variational EM", "amortized": "amortized (VAE)",
                "semi_amortized": "semi-amortized"}
LABEL_ORDER = ("reparam", "stl", "score+none", "score+mean", "score+loo", "score+cv")
#: seaborn's colour-blind-safe palette; estimator labels and splits index into it
COLORBLIND = sns.color_palette("colorblind", 10)
#: markers tell apart estimators whose curves coincide (reparam and stl often do)
LABEL_MARKERS = {"reparam": "o", "stl": "s", "score+none": "^", "score+mean": "v",
                 "score+loo": "D", "score+cv": "P"}
#: estimator label → index into ``COLORBLIND``; other labels take the unused colours in turn
LABEL_COLOURS = {"reparam": 0, "stl": 1, "score+none": 3, "score+mean": 4, "score+loo": 2,
                 "score+cv": 5}
#: data split → colour, where the hue is the split rather than the estimator (ppca_exact)
SPLIT_COLOURS = {"train": COLORBLIND[0], "validation": COLORBLIND[7], "test": COLORBLIND[1]}
ELBO_UNITS = "nats / data point"
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
