"""Counting runs that diverged or did not converge, and legends built from what was drawn.

- ``Tally`` counts, per estimator label (or another key), the runs that diverged, failed or
  finished without converging (``converged`` False: stopped at the epoch cap before the
  validation ELBO reached a plateau), for legend entries and panel titles;
- ``legend`` / ``axis_legend`` build a legend from the labelled artists of the figure (or one
  panel): an entry appears only when something carrying its label was drawn, estimator labels
  keep their fixed colour and marker, the shared marks (``style.MARKS``) are drawn grey, and
  counts are appended as ``label — 1/5 diverged``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import matplotlib.pyplot as plt
import pandas as pd
from matplotlib.artist import Artist
from matplotlib.collections import Collection, PathCollection
from matplotlib.container import Container
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from experiments.figures.style import (
    LABEL_COLOURS,
    LABEL_MARKERS,
    LABEL_ORDER,
    MARKS,
    REFERENCES,
    label_colour,
    ordered,
)

__all__ = ["SEPARATOR", "STYLE_GID", "Tally", "absent_note", "axis_legend", "drawn_labels",
           "legend"]

#: between a legend entry's series label and its counts
SEPARATOR = " — "
#: a drawn line whose ``gid`` starts with this also stands for the legend entry that follows
#: (its line style, e.g. ``E-steps from the prior``) besides its own label
STYLE_GID = "legend:"


@dataclass
class Tally:
    """Runs per key (estimator label by default) by outcome, over unique run_ids."""

    key: str = "estimator_label"
    counts: dict[str, dict] = field(default_factory=dict)

    def add(self, *frames: pd.DataFrame) -> Tally:
        """Count the runs of ``frames`` not counted yet (frames lacking the columns are
        ignored); returns ``self`` for chaining."""
        cols = ["run_id", self.key, "status"]
        rows = [f[[*cols, *(["converged"] if "converged" in f.columns else [])]]
                for f in frames if len(f) and all(c in f.columns for c in cols)]
        if not rows:
            return self
        ids = pd.concat(rows).drop_duplicates("run_id")
        if "converged" not in ids.columns:
            ids = ids.assign(converged=None)
        seen = {rid for c in self.counts.values() for rid in c["_ids"]}
        for lab, grp in ids[~ids["run_id"].isin(seen)].groupby(self.key, sort=False):
            c = self.counts.setdefault(lab, {"n": 0, "diverged": 0, "failed": 0,
                                             "unconverged": 0, "_ids": set()})
            c["n"] += len(grp)
            c["diverged"] += int((grp["status"] == "diverged").sum())
            c["failed"] += int((grp["status"] == "failed").sum())
            c["unconverged"] += int(((grp["status"] == "ok") & grp["converged"].eq(False)).sum())
            c["_ids"] |= set(grp["run_id"])
        return self

    def total(self, what: str) -> int:
        """Runs counted as ``what`` (``n``, ``diverged``, ``failed``, ``unconverged``)."""
        return sum(c[what] for c in self.counts.values())

    def bad(self) -> bool:
        """Whether any counted run diverged or failed."""
        return bool(self.total("diverged") or self.total("failed"))

    def text(self, lab: str) -> str:
        """``2/6 diverged, 1/6 not converged`` for ``lab``; empty when all its runs converged."""
        c = self.counts.get(lab)
        if not c:
            return ""
        parts = [f"{c[k]}/{c['n']} {name}" for k, name in
                 (("diverged", "diverged"), ("failed", "failed"),
                  ("unconverged", "not converged")) if c[k]]
        return ", ".join(parts)

    def notes(self) -> dict[str, str]:
        """Key → ``text`` for the keys with something to say."""
        return {lab: self.text(lab) for lab in self.counts if self.text(lab)}

    def compact(self) -> str:
        """All keys together, for a panel title: ``\n1/8 diverged, 6/8 not converged``."""
        n = self.total("n")
        parts = [f"{self.total(k)}/{n} {name}" for k, name in
                 (("diverged", "diverged"), ("failed", "failed"),
                  ("unconverged", "not converged")) if self.total(k)]
        return ("\n" + ", ".join(parts)) if parts else ""

    def title_note(self) -> str:
        """A new line with every key's ``text``, for a panel title; empty when all converged."""
        notes = [f"{lab}: {self.text(lab)}" for lab in ordered(self.counts, LABEL_ORDER)
                 if self.text(lab)]
        return ("\n" + "; ".join(notes)) if notes else ""


def absent_note(res, shown: Iterable[str], **keys: object) -> str:
    """``; not shown: SA-VAE (16/16 diverged, nothing to draw)`` for the methods of runs.csv
    (matching ``keys``) that have nothing to draw."""
    from experiments.figures.style import METHOD_ORDER, method_name

    runs = res.runs_where(**keys)
    if runs is None or runs.empty:
        return ""
    parts = []
    for method in ordered(runs["method"], METHOD_ORDER):
        if method in set(shown):
            continue
        why = Tally().add(runs[runs["method"] == method]).compact().strip() or "no rows"
        parts.append(f"{method_name(method)} ({why}, nothing to draw)")
    return ("; not shown: " + "; ".join(parts)) if parts else ""


# -- legends --------------------------------------------------------------------------------------
def _style(handle: Artist) -> dict:
    """Line2D keyword arguments that reproduce ``handle``'s look."""
    if isinstance(handle, Container):
        lines = [a for a in handle if isinstance(a, Line2D)]
        handle = lines[0] if lines else (handle[0] if len(handle) else handle)
    if isinstance(handle, Line2D):
        return {"color": handle.get_color(), "ls": handle.get_linestyle(),
                "lw": handle.get_linewidth(), "marker": handle.get_marker(),
                "ms": min(handle.get_markersize(), 9), "mfc": handle.get_markerfacecolor(),
                "mec": handle.get_markeredgecolor(), "mew": handle.get_markeredgewidth()}
    if isinstance(handle, PathCollection):  # a scatter: its colour as a dot
        face = handle.get_facecolor()
        return {"color": face[0] if len(face) else "0.3", "ls": "none", "marker": "o", "ms": 5}
    if isinstance(handle, Patch | Collection):
        face = handle.get_facecolor()
        face = face[0] if getattr(face, "ndim", 1) == 2 and len(face) else face
        return {"patch": True, "facecolor": face}
    return {"color": "0.3"}


def _proxy(label: str, handle: Artist, neutral: Iterable[str] = ()) -> Artist:
    """The legend handle of ``label``: an estimator label's colour and marker; a shared mark or
    a ``neutral`` label (a line style, say) in grey; anything else as drawn."""
    if label in LABEL_COLOURS:
        return Line2D([], [], color=label_colour(label), lw=2, marker=LABEL_MARKERS[label],
                      ms=5)
    refs = {name: (colour, ls) for name, colour, ls in REFERENCES.values()}
    if label in refs:  # a custom dash pattern does not survive get_linestyle()
        return Line2D([], [], color=refs[label][0], ls=refs[label][1], lw=1.5)
    kw = _style(handle)
    if kw.pop("patch", False):
        return Patch(facecolor=kw["facecolor"], edgecolor="0.2", lw=0.5)
    if label in neutral:  # grey; a line style loses its marker, so that the dashes show
        kw.update(color="0.3", mec="0.3")
        if kw.get("ls") not in ("None", "none", "", " "):
            kw.update(marker="None", lw=1.5)
        else:  # a marker kind (a selection round): filled, as its legend text says
            kw["mfc"] = "0.3"
    if label in MARKS.values():
        kw["color"] = "0.3"
        kw["mec"] = "0.3" if label != MARKS["unstable"] else kw.get("mec")
        if kw.get("mfc") not in ("white", "none", (1.0, 1.0, 1.0, 1.0)):
            kw["mfc"] = "0.3"
    return Line2D([], [], **kw)


def _has_data(artist: Artist) -> bool:
    if isinstance(artist, Line2D):
        return len(artist.get_xdata()) > 0
    if isinstance(artist, Container):
        return len(artist) > 0
    return True


def drawn_labels(axes: Iterable[plt.Axes]) -> dict[str, Artist]:
    """Label → first artist carrying it, over the labelled artists with data of ``axes`` (in
    drawing order; labels starting with ``_`` are not legend entries), and the line styles
    named by ``STYLE_GID`` gids."""
    out: dict[str, Artist] = {}
    for ax in axes:
        handles, labels = ax.get_legend_handles_labels()
        for h, lab in zip(handles, labels, strict=True):
            if lab and not lab.startswith("_") and _has_data(h):
                out.setdefault(lab, h)
        for line in ax.get_lines():
            gid = line.get_gid() or ""
            if gid.startswith(STYLE_GID) and _has_data(line):
                out.setdefault(gid.removeprefix(STYLE_GID), line)
    return out


def _entries(found: dict[str, Artist], notes: Mapping[str, str], order: Iterable[str],
             neutral: Iterable[str] = ()) -> tuple[list[Artist], list[str]]:
    marks = [m for m in MARKS.values() if m in found]
    rest = [lab for lab in found if lab not in marks]
    first = [lab for lab in order if lab in rest]
    labels = first + [lab for lab in rest if lab not in first] + marks
    texts = [f"{lab}{SEPARATOR}{notes[lab]}" if notes.get(lab) else lab for lab in labels]
    neutral = set(neutral)
    return [_proxy(lab, found[lab], neutral) for lab in labels], texts


def legend(fig: Figure, *, title: str = "estimator", notes: Mapping[str, str] | None = None,
           order: Iterable[str] = LABEL_ORDER, loc: str = "outside lower center",
           ncols: int | None = None, neutral: Iterable[str] = (),
           skip: Iterable[str] = ()) -> None:
    """The figure's legend (outside, below the panels by default, in as many columns as the
    figure's width holds), listing only what was drawn: one entry per label found on the
    figure's panels, ``notes`` appended to its text; ``neutral`` labels (line styles) are shown
    in grey; ``skip`` labels belong to panel legends (``axis_legend``) and are left out."""
    skip = set(skip)
    found = {k: v for k, v in drawn_labels(fig.axes).items() if k not in skip}
    handles, texts = _entries(found, notes or {}, order, neutral)
    if not handles:
        return
    if ncols is None:
        if "right" in loc or "left" in loc:
            ncols = 1
        else:  # about 0.075 inch per character of 8-point text, plus the handle
            width = 0.075 * max(len(t) for t in texts) + 0.6
            ncols = max(1, min(len(texts), int(fig.get_figwidth() // width)))
            fig.set_figwidth(max(fig.get_figwidth(), width * ncols))
    if "lower" in loc or "upper" in loc:  # room for the legend, so the panels keep their size
        rows = -(-len(texts) // ncols)
        fig.set_figheight(fig.get_figheight() + 0.19 * rows + 0.35)
    fig.legend(handles, texts, title=title, loc=loc, frameon=False, ncols=ncols, fontsize=8,
               title_fontsize=9)


def axis_legend(ax: plt.Axes, *, title: str | None = None, notes: Mapping[str, str] | None = None,
                order: Iterable[str] = (), loc: str = "best", neutral: Iterable[str] = (),
                only: Iterable[str] | None = None, **kw: object) -> None:
    """A legend inside one panel, from that panel's labelled artists only (only the ``only``
    labels, when given)."""
    found = drawn_labels([ax])
    if only is not None:
        only = set(only)
        found = {k: v for k, v in found.items() if k in only}
    handles, texts = _entries(found, notes or {}, order, neutral)
    if handles:
        ax.legend(handles, texts, title=title, loc=loc, fontsize=7, title_fontsize=7,
                  framealpha=0.85, **kw)
