"""Drawing helpers shared by the figure modules, and saving figures.

- panels: ``panel_grid`` (constrained layout), ``log_axis``, ``plain_ticks``,
  ``bottom_xlabels``, ``suptitle``, ``empty_panel``;
- runs that diverged or failed: ``Tally`` counts them per estimator label for legends and panel
  titles (``facet_tally``: one panel's runs);
- curves: ``draw_band`` (mean ± sd over seeds), ``draw_curves`` (bands of finished runs, thin
  dashed lines ending in ``×`` for the others), ``legend``;
- ELBO axes: ``elbo_floor`` / ``cut_outliers`` keep far-off values from flattening the rest;
- files: ``atomic_write``, ``save_figure`` (PNG and PDF, written atomically, reproducible).
"""

from __future__ import annotations

import os
import textwrap
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import LogLocator, MaxNLocator, NullLocator

from experiments.figures.loading import ExperimentResults
from experiments.figures.style import DPI, LABEL_MARKERS, LABEL_ORDER, ordered

__all__ = [
    "Tally",
    "atomic_write",
    "bottom_xlabels",
    "cut_outliers",
    "draw_band",
    "draw_curves",
    "elbo_floor",
    "empty_panel",
    "facet_tally",
    "legend",
    "log_axis",
    "panel_grid",
    "plain_ticks",
    "save_figure",
    "suptitle",
]


# -- panels ---------------------------------------------------------------------------------------
def panel_grid(nrows: int, ncols: int, *, sharex: bool | str = True, sharey: bool | str = "row",
               w: float = 3.6, h: float = 2.7) -> tuple[Figure, np.ndarray]:
    """A figure of ``nrows`` × ``ncols`` panels of ``w`` × ``h`` inches (axes always 2-D)."""
    fig, axes = plt.subplots(nrows, ncols, figsize=(w * ncols, h * nrows), squeeze=False,
                             sharex=sharex, sharey=sharey, layout="constrained")
    return fig, axes


def log_axis(ax: plt.Axes, which: str, base: float = 10) -> None:
    """Log scale with minor ticks at 2 and 5 only (a full set costs most of the drawing time)."""
    axis = ax.xaxis if which == "x" else ax.yaxis
    (ax.set_xscale if which == "x" else ax.set_yscale)("log", base=base)
    if base == 10:
        axis.set_minor_locator(LogLocator(base=10, subs=(2.0, 5.0)))
    else:
        axis.set_minor_locator(NullLocator())


def plain_ticks(ax: plt.Axes, values: pd.Series) -> None:
    """Major x ticks at the grid values themselves (2, 5, 10, 20), written as plain numbers."""
    ticks = sorted(float(v) for v in values.dropna().unique())
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.xaxis.set_minor_locator(NullLocator())


def bottom_xlabels(axes: np.ndarray) -> None:
    """With shared x axes, name the x axis under the bottom row only."""
    for ax in axes[:-1].flat:
        ax.set_xlabel("")


def suptitle(fig: Figure, text: str) -> None:
    """A figure title wrapped to the figure's width (constrained layout would cut it off);
    about 10 characters of a 12-point title per inch."""
    fig.suptitle(textwrap.fill(text, max(int(10 * fig.get_figwidth()), 30)))


def empty_panel(ax: plt.Axes, text: str = "no runs") -> None:
    """A panel without data: ``text`` in its centre, no ticks."""
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4")
    ax.tick_params(labelleft=False, labelbottom=False, left=False, bottom=False)


# -- runs that diverged or failed -----------------------------------------------------------------
@dataclass
class Tally:
    """Runs per estimator label by status, over unique run_ids."""

    counts: dict[str, dict[str, int]] = field(default_factory=dict)

    def add(self, *frames: pd.DataFrame) -> Tally:
        """Count the runs of ``frames`` not counted yet (frames lacking the columns are
        ignored); returns ``self`` for chaining."""
        cols = ["run_id", "estimator_label", "status"]
        rows = [f[cols] for f in frames if len(f) and all(c in f.columns for c in cols)]
        if not rows:
            return self
        ids = pd.concat(rows).drop_duplicates("run_id")
        seen = {rid for c in self.counts.values() for rid in c.get("_ids", ())}
        for lab, grp in ids[~ids["run_id"].isin(seen)].groupby("estimator_label", sort=False):
            c = self.counts.setdefault(lab, {"n": 0, "diverged": 0, "failed": 0, "_ids": set()})
            c["n"] += len(grp)
            c["diverged"] += int((grp["status"] == "diverged").sum())
            c["failed"] += int((grp["status"] == "failed").sum())
            c["_ids"] |= set(grp["run_id"])
        return self

    def bad(self) -> bool:
        """Whether any counted run diverged or failed."""
        return any(c["diverged"] or c["failed"] for c in self.counts.values())

    def text(self, lab: str) -> str:
        """``2/6 runs diverged, 1/6 failed`` for ``lab``; empty when all its runs finished."""
        c = self.counts.get(lab)
        if not c:
            return ""
        parts = []
        if c["diverged"]:
            parts.append(f"{c['diverged']}/{c['n']} runs diverged")
        if c["failed"]:
            parts.append(f"{c['failed']}/{c['n']} failed")
        return ", ".join(parts)

    def title_note(self) -> str:
        """A new line with every label's ``text``, for a panel title; empty when all finished."""
        notes = [f"{lab}: {self.text(lab)}" for lab in ordered(self.counts, LABEL_ORDER)
                 if self.text(lab)]
        return ("\n" + "; ".join(notes)) if notes else ""


def facet_tally(res: ExperimentResults, data: pd.DataFrame, **keys: object) -> Tally:
    """The tally of one panel: runs.csv rows matching ``keys`` and the runs in ``data``."""
    return Tally().add(res.runs_where(**keys), data)


# -- curves and legends ---------------------------------------------------------------------------
def legend(fig: Figure, palette: dict[str, tuple], tally: Tally, *, title: str = "estimator",
           extra: Iterable[Line2D | Patch] = (), band: bool = True,
           diverged_marker: bool = True, markers: bool = False) -> None:
    """The figure's legend, outside on the right: one entry per label of ``palette`` with its
    diverged/failed counts, the diverged-run style when any diverged (``diverged_marker``),
    then ``extra``; ``band`` says in the title that lines and bands are mean ± sd."""
    handles: list = []
    for lab, colour in palette.items():
        note = tally.text(lab)
        handles.append(Line2D([], [], color=colour, lw=2.5,
                              marker=LABEL_MARKERS.get(lab, "o") if markers else None, ms=6,
                              label=f"{lab} — {note}" if note else lab))
    if diverged_marker and tally.bad():
        handles.append(Line2D([], [], color="0.3", lw=0.9, ls="--", marker="x", ms=8, mew=2,
                              label="diverged run (× = last finite value)"))
    handles += list(extra)
    if band:
        title += "\n(line, band: mean ± sd over seeds)"
    fig.legend(handles=handles, title=title, loc="outside right center", frameon=False)


def draw_band(ax: plt.Axes, d: pd.DataFrame, x: str, y: str, colour: object, *, logy: bool,
              marker: str | None, ls: str = "-") -> None:
    """Mean ± sd over runs at each x (in log10 space on a log axis: geometric mean ×/÷ gsd)."""
    v = np.log10(d[y].astype(float)) if logy else d[y].astype(float)
    stats = v.groupby(d[x]).agg(["mean", "std"]).sort_index()
    mid, sd = stats["mean"].to_numpy(), stats["std"].fillna(0.0).to_numpy()
    lo, hi = mid - sd, mid + sd
    if logy:
        mid, lo, hi = 10.0 ** mid, 10.0 ** lo, 10.0 ** hi
    xs = stats.index.to_numpy(float)
    ax.plot(xs, mid, color=colour, lw=1.8, ls=ls, marker=marker, ms=4)
    if (sd > 0).any():
        ax.fill_between(xs, lo, hi, color=colour, alpha=0.2, lw=0)


def draw_curves(ax: plt.Axes, d: pd.DataFrame, x: str, palette: dict[str, tuple], *,
                by: str | None = None, y: str = "value", logy: bool = False,
                marker: str | None = None, ls: str = "-") -> None:
    """Mean ± sd over seeds of finished runs; diverged/failed runs thin, dashed, ending in ×.

    The band is mean ± one (sample) standard deviation over the finished runs at each x; on a
    log axis both are taken of log10 values (seaborn's convention for log-scaled axes). With
    ``by`` (e.g. ``epoch``) the x coordinate is itself averaged over seeds at each ``by`` value
    (wall-clock seconds differ between seeds at the same epoch).
    """
    if logy:
        log_axis(ax, "y")
    d = d[np.isfinite(d[y].astype(float)) & d[x].notna()]
    if logy:
        d = d[d[y] > 0]
    ok = d[d["status"] == "ok"]
    if by is not None and by != x and len(ok):
        ok = ok.assign(**{x: ok.groupby(["estimator_label", by])[x].transform("mean")})
    for lab, grp in ok.groupby("estimator_label", sort=False):
        draw_band(ax, grp, x, y, palette.get(lab, "0.3"), logy=logy, ls=ls,
                  marker=LABEL_MARKERS.get(lab, marker) if marker else None)
    sort_key = by or x
    for _, r in d[d["status"] != "ok"].groupby("run_id", sort=True):
        r = r.sort_values(sort_key)
        colour = palette.get(r["estimator_label"].iloc[0], "0.3")
        ax.plot(r[x], r[y], color=colour, lw=0.9, ls="--", alpha=0.9)
        ax.plot(r[x].iloc[-1:], r[y].iloc[-1:], color=colour, ls="none", marker="x", ms=9,
                mew=2)
    if x in ("epoch", "step") and ax.get_xscale() == "linear":
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


# -- ELBO axes ------------------------------------------------------------------------------------
def elbo_floor(values: pd.Series, *, k: float = 10.0) -> tuple[float, float] | None:
    """y limits that keep the bulk of ELBO values readable, or None (no cut needed).

    Values below median − k·MAD (median absolute deviation) are far-off: an untrained start, a
    score-function run gone astray. The limits sit 8 % of the kept range beyond the kept values;
    they are only applied when something falls below the lower one.
    """
    v = values[np.isfinite(values.astype(float))].astype(float)
    if len(v) < 5:
        return None
    med = float(v.median())
    mad = float((v - med).abs().median())
    kept = v[v >= med - k * max(mad, 1e-6 * abs(med), 1e-9)]
    span = max(float(kept.max() - kept.min()), 1e-9)
    lo = float(kept.min()) - 0.08 * span
    return (lo, float(kept.max()) + 0.08 * span) if float(v.min()) < lo else None


def cut_outliers(axes: plt.Axes | Iterable[plt.Axes], values: pd.Series | Iterable[pd.Series]
                 ) -> None:
    """Apply ``elbo_floor`` to axes that share a y axis (one row), from all their values,
    and write "axis cut at …" on each panel that has points below the cut. ``values`` should
    include any reference line, so that it stays in view."""
    axes = [axes] if isinstance(axes, plt.Axes) else list(axes)
    values = [values] if isinstance(values, pd.Series) else list(values)
    limits = elbo_floor(pd.concat(values)) if values else None
    if limits is None:
        return
    lo, hi = limits
    for ax, v in zip(axes, values, strict=True):
        ax.set_ylim(lo, hi)
        if (v.astype(float) < lo).any():
            ax.text(0.98, 0.02, f"axis cut at {lo:.4g}; lower values off-scale",
                    transform=ax.transAxes, ha="right", va="bottom", fontsize=7, color="0.35")


# -- files ----------------------------------------------------------------------------------------
def atomic_write(path: Path, write: Callable[[Path], None]) -> Path:
    """Call ``write`` on a temporary file beside ``path``, then move it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def save_figure(fig: Figure, folder: Path, stem: str) -> list[Path]:
    """PNG (150 dpi) and PDF, atomically; the PDF without a creation date, so reruns match.

    Constrained layout (which keeps the outside legend in the canvas) runs once, for the PNG;
    the PDF reuses the frozen positions, which halves the cost of drawing many log axes.
    """
    png = atomic_write(folder / f"{stem}.png", lambda p: fig.savefig(p, format="png", dpi=DPI))
    fig.set_layout_engine("none")
    pdf = atomic_write(folder / f"{stem}.pdf",
                       lambda p: fig.savefig(p, format="pdf", metadata={"CreationDate": None}))
    plt.close(fig)
    return [png, pdf]
