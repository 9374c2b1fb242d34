"""The study's words for its methods, estimators and experiments: display names,
orders, estimator labels, markers, line styles and colours (plain strings), each with a default
for a name it does not know, so a new method or estimator is drawn and listed without an edit
here.

Plot-free (the standard library, numpy and pandas): the figures (``experiments.figures.style``
builds on it), the summary and the findings all read it, and importing the summary or the
findings loads no plotting library. The experiments' order is the grids' (``order`` in each
``experiments/grids/<name>.json``, then the name): ``reproduce`` runs them, the figures draw them
and the summary lists them in that order.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable

import numpy as np
import pandas as pd

from vi import contract

__all__ = [
    "COLORBLIND",
    "LABEL_COLOURS",
    "LABEL_MARKERS",
    "LABEL_ORDER",
    "LINE_STYLES",
    "METHOD_COLOURS",
    "METHOD_NAMES",
    "METHOD_ORDER",
    "METHOD_STYLES",
    "estimator_label",
    "experiment_order",
    "label_colour",
    "marker_of",
    "method_colour",
    "method_name",
    "method_style",
    "ordered",
    "palette",
    "style_word",
]

#: inference methods, in the order figures (columns, left to right) and tables show them
METHOD_ORDER = ("vem", "amortized", "semi_amortized", "sa_vae")
METHOD_NAMES = {"vem": "variational EM", "amortized": "amortized (VAE)",
                "semi_amortized": "semi-amortized (VAE + SVI)", "sa_vae": "SA-VAE"}
#: estimator labels (``estimator_label``) in the order legends and tables show them
LABEL_ORDER = ("reparam", "stl", "score+none", "score+mean", "score+loo", "score+cv")

#: seaborn's colour-blind-safe palette ("colorblind", 10 colours) as hex strings
COLORBLIND = ("#0173b2", "#de8f05", "#029e73", "#d55e00", "#cc78bc", "#ca9161", "#fbafe4",
              "#949494", "#ece133", "#56b4e9")
#: markers tell apart estimators whose curves coincide (reparam and stl often do)
LABEL_MARKERS = {"reparam": "o", "stl": "s", "score+none": "^", "score+mean": "v",
                 "score+loo": "D", "score+cv": "P"}
_SPARE_MARKERS = ("X", "*", "h", "<", ">", "p", "d")
#: estimator label → colour; other labels take the colours no known label uses, in turn
LABEL_COLOURS = {"reparam": COLORBLIND[0], "stl": COLORBLIND[1], "score+none": COLORBLIND[3],
                 "score+mean": COLORBLIND[4], "score+loo": COLORBLIND[2],
                 "score+cv": COLORBLIND[5]}
#: line style → the word a legend uses for it; the first four are the known methods', the rest
#: go to other methods in turn
LINE_STYLES = {"-": "solid", "--": "dashed", "-.": "dash-dot", ":": "dotted",
               (0, (8, 2)): "long dashes", (0, (3, 1, 1, 1, 1, 1)): "dash-dot-dot",
               (0, (1, 3)): "sparse dots", (0, (6, 2, 2, 2)): "long dash-short dash"}
#: methods drawn in one panel (hue = estimator) differ by line style; where the hue is the
#: method itself (refinement) it takes these colours, which no estimator label uses
METHOD_STYLES = {"vem": "-", "amortized": "--", "semi_amortized": "-.", "sa_vae": ":"}
METHOD_COLOURS = {"vem": COLORBLIND[7], "amortized": COLORBLIND[8],
                  "semi_amortized": COLORBLIND[9], "sa_vae": COLORBLIND[6]}
_GREY = "#4d4d4d"


def ordered(values: Iterable[object], order: Iterable[object] = ()) -> list:
    """The distinct values (NaN dropped): those in ``order`` first, in that order, then the
    rest sorted by their text."""
    present = list(dict.fromkeys(v for v in values if not (isinstance(v, float) and np.isnan(v))))
    first = [v for v in order if v in present]
    return first + sorted((v for v in present if v not in first), key=str)


def _pick(name: str, choices: tuple | list) -> object:
    """One of ``choices`` for a name the vocabulary does not know, derived from the name alone
    (CRC-32), so a new method or estimator looks the same in every figure whatever else is
    drawn beside it."""
    return choices[zlib.crc32(name.encode()) % len(choices)]


def method_name(method: object) -> str:
    """The readable name of an inference method (``vem`` → ``variational EM``; others as
    they are)."""
    return METHOD_NAMES.get(str(method), str(method))


def method_style(method: object) -> str | tuple:
    """The line style of a method: its own (``METHOD_STYLES``), else one of the styles no known
    method uses, chosen by its name (the same in every figure)."""
    name = str(method)
    if name in METHOD_STYLES:
        return METHOD_STYLES[name]
    return _pick(name, [s for s in LINE_STYLES if s not in METHOD_STYLES.values()])


def style_word(style: object) -> str:
    """The word a legend uses for a line style (``--`` → ``dashed``; ``custom`` otherwise)."""
    return LINE_STYLES.get(style, "custom") if isinstance(style, str | tuple) else "custom"


def method_colour(method: object) -> str:
    """The colour of a method where the hue is the method (``METHOD_COLOURS``; a grey for
    another)."""
    return METHOD_COLOURS.get(str(method), _GREY)


def estimator_label(estimator: object, baseline: object) -> str:
    """``estimator+baseline`` for an estimator that accepts a baseline besides ``none``, or
    whose baseline is not ``none``; else ``estimator`` alone (``reparam``, ``stl``).

    What an estimator accepts is its declaration in the library's registry
    (``vi.estimators.Estimator.baselines``), recorded with the results it trained and learnt
    when they are read (``vi.contract.ESTIMATORS``, ``experiments.schema.read_contract``): so
    the score function always shows its baseline (``score+none``), since that is what decides
    its variance (Mohamed et al. 2020, §5), and so does any estimator declaring baselines.
    """
    b = "" if baseline is None or pd.isna(baseline) else str(baseline).strip()
    accepts = any(a != "none" for a in contract.ESTIMATORS.get(str(estimator), ()))
    if accepts or (b and b != "none"):
        return f"{estimator}+{b or 'none'}"
    return str(estimator)


def label_colour(label: object) -> str:
    """The fixed colour of an estimator label (a grey for an unknown one)."""
    return LABEL_COLOURS.get(str(label), _GREY)


def marker_of(label: object) -> str:
    """The marker of an estimator label, also of a qualified one (``reparam, KL MC``); an
    unknown label gets a spare marker chosen by its name."""
    text = str(label)
    for key in (text, text.split(",")[0]):
        if key in LABEL_MARKERS:
            return LABEL_MARKERS[key]
    return _pick(text.split(",")[0], _SPARE_MARKERS)


def palette(labels: Iterable[str]) -> dict[str, str]:
    """Estimator label → colour for the labels present, in ``LABEL_ORDER``.

    Known labels always get their ``LABEL_COLOURS`` entry, whatever else is present; unknown
    labels take the colours no known label uses, in turn.
    """
    used = set(LABEL_COLOURS.values())
    spare = iter([c for c in COLORBLIND if c not in used])
    out = {}
    for lab in ordered(labels, LABEL_ORDER):
        out[lab] = LABEL_COLOURS.get(lab) or next(spare, COLORBLIND[7])
    return out


def experiment_order(names: Iterable[str] | None = None) -> list[str]:
    """``names`` (default: every experiment with a grid file) in the grids' order (each grid's
    ``order``, then its name); names without a grid file follow, alphabetically."""
    from experiments.grids import available

    known = list(available())
    if names is None:
        return known
    return ordered(names, known)
