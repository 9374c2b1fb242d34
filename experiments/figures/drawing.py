"""Drawing helpers shared by the figure modules, and saving figures.

- panels: ``panel_grid`` (constrained layout), ``log_axis``, ``steps_axis``, ``plain_ticks``,
  ``bottom_xlabels``, ``suptitle``, ``empty_panel``;
- curves: ``draw_curves`` (mean ± sd over the seeds of finished runs; diverged runs thin and
  dashed up to their last finite value, which carries an ``×``; runs that stopped at the epoch
  cap without converging end in a hollow ``▷``);
- final values: ``ci95`` and ``draw_final`` (mean with a 95 % t-interval over seeds, one dot per
  seed, hollow where the run did not converge);
- ELBO axes: ``elbo_limits`` / ``apply_limits`` keep far-off values from flattening the rest;
- files: ``atomic_write``, ``save_figure`` (PNG and PDF, written atomically, reproducible),
  ``save_table`` (a table as CSV and Markdown).

Every artist that stands for a legend entry carries that entry as its ``label`` (an estimator
label, a ``style.MARKS`` text, a reference name); everything else is labelled ``_…``, so that
``marks.legend`` lists exactly what was drawn.
"""

from __future__ import annotations

import os
import textwrap
from collections.abc import Callable, Iterable
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import Formatter, LogLocator, MaxNLocator, NullLocator

from experiments.figures.marks import STYLE_GID
from experiments.figures.style import DPI, MARKS, marker_of

__all__ = [
    "apply_limits",
    "atomic_write",
    "bottom_xlabels",
    "ci95",
    "draw_band",
    "draw_curves",
    "draw_final",
    "elbo_limits",
    "empty_panel",
    "log_axis",
    "panel_grid",
    "plain_ticks",
    "save_figure",
    "save_table",
    "steps_axis",
    "suptitle",
]

#: x columns that measure training progress (where a run's last point is where it stopped)
TRAINING_AXES = ("epoch", "examples", "wall_s")
#: two-sided 97.5 % quantiles of Student's t with 1..30 degrees of freedom (then 1.96)
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
         2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
         2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


# -- panels ---------------------------------------------------------------------------------------
def panel_grid(nrows: int, ncols: int, *, sharex: bool | str = True, sharey: bool | str = "row",
               w: float = 3.6, h: float = 2.7) -> tuple[Figure, np.ndarray]:
    """A figure of ``nrows`` × ``ncols`` panels of ``w`` × ``h`` inches (axes always 2-D), at
    least 6.5 inches wide, so that its title and legend fit."""
    fig, axes = plt.subplots(nrows, ncols, figsize=(max(w * ncols, 6.5), h * nrows),
                             squeeze=False,
                             sharex=sharex, sharey=sharey, layout="constrained")
    return fig, axes


class ShortLog(Formatter):
    """Log-axis labels as short plain numbers (0.05, 2, 500, 20k, 1M; 1e9 beyond millions):
    every 1-2-5 tick when the axis spans at most 2.5 decades, else only the powers of ten, and
    over more than 8 decades every other power, so labels never crowd."""

    def __call__(self, x: float, pos: int | None = None) -> str:
        lo, hi = sorted(self.axis.get_view_interval()) if self.axis is not None else (x, x)
        decades = np.log10(hi / lo) if lo > 0 else 0.0
        exponent = np.floor(np.log10(x) + 1e-9) if x > 0 else 0
        mant = x / 10**exponent if x > 0 else 0
        if decades > 2.5 and not np.isclose(mant, 1.0):
            return ""
        if decades > 8 and int(exponent) % 2:
            return ""
        if x >= 1e7:
            return f"{mant:g}e{int(exponent)}"
        for div, suffix in ((1e6, "M"), (1e3, "k")):
            if x >= div:
                return f"{x / div:g}{suffix}"
        return f"{x:g}"


def log_axis(ax: plt.Axes, which: str, base: float = 10) -> None:
    """Log scale; base 10: ticks at 1, 2 and 5 per decade labelled by ``ShortLog``; base 2:
    the caller sets the ticks (``plain_ticks``)."""
    axis = ax.xaxis if which == "x" else ax.yaxis
    (ax.set_xscale if which == "x" else ax.set_yscale)("log", base=base)
    axis.set_minor_locator(NullLocator())
    if base == 10:
        # numticks: the default gives up (no ticks at all) beyond ~10 decades with subs
        axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0), numticks=100))
        axis.set_major_formatter(ShortLog())


def plain_ticks(ax: plt.Axes, values: Iterable[float], *, max_ticks: int = 7) -> None:
    """Major x ticks at the grid values themselves (2, 5, 10, 20), written as plain numbers;
    with more than ``max_ticks`` values every other one (from the largest) is left unlabelled,
    so that labels never collide."""
    ticks = sorted({float(v) for v in values if pd.notna(v)})
    while len(ticks) > max_ticks:
        ticks = ticks[::-1][::2][::-1]
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.xaxis.set_minor_locator(NullLocator())


def steps_axis(ax: plt.Axes, steps: Iterable[float]) -> None:
    """An x axis of step counts that may include 0: symlog (linear below 1), ticks at the
    values, or with more than six of them at 0 and the powers of 4 (0, 1, 4, 16, 64, 256), so
    that labels never collide."""
    steps = sorted({float(s) for s in steps if pd.notna(s)})
    if steps and steps[0] <= 0:
        ax.set_xscale("symlog", linthresh=1, linscale=0.5)
    else:
        ax.set_xscale("log")
    top = max(steps) if steps else 1.0
    ticks = steps if len(steps) <= 6 else \
        [s for s in steps if s == 0] + [4.0 ** k for k in range(12) if 4.0 ** k <= top]
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.xaxis.set_minor_locator(NullLocator())


def bottom_xlabels(axes: np.ndarray) -> None:
    """With shared x axes, name the x axis under the bottom row only."""
    for ax in axes[:-1].flat:
        ax.set_xlabel("")


def suptitle(fig: Figure, text: str) -> None:
    """A figure title wrapped to the figure's width (constrained layout would cut it off);
    about 11 characters of an 11-point title per inch."""
    text = textwrap.fill(text, max(int(11 * fig.get_figwidth()), 40))
    fig.set_figheight(fig.get_figheight() + 0.2 * (text.count("\n") + 1))
    fig.suptitle(text, fontsize=11)


def empty_panel(ax: plt.Axes, text: str = "no runs") -> None:
    """A panel without data: ``text`` in its centre, no ticks."""
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4")
    ax.tick_params(labelleft=False, labelbottom=False, left=False, bottom=False)


# -- statistics over seeds ------------------------------------------------------------------------
def ci95(values: Iterable[float]) -> tuple[float, float, int]:
    """(mean, half-width of the 95 % Student-t interval, n) of the finite ``values``; the
    half-width is NaN for fewer than two values."""
    v = np.asarray([x for x in values if np.isfinite(x)], dtype=float)
    n = len(v)
    if n == 0:
        return np.nan, np.nan, 0
    if n == 1:
        return float(v[0]), np.nan, 1
    t = _T975[n - 2] if n - 1 <= len(_T975) else 1.96
    return float(v.mean()), float(t * v.std(ddof=1) / np.sqrt(n)), n


# -- curves ---------------------------------------------------------------------------------------
def draw_band(ax: plt.Axes, d: pd.DataFrame, x: str, y: str, colour: object, *, logy: bool,
              marker: str | None, ls: str = "-", label: str = "_",
              floor: float | None = None, gid: str = "") -> None:
    """Mean ± sd over runs at each x (in log10 space on a log axis: geometric mean ×/÷ gsd).
    The band is left out where the mean lies below ``floor`` (an axis cut), so that a far-off
    start never paints a stray column over the panel."""
    v = np.log10(d[y].astype(float)) if logy else d[y].astype(float)
    stats = v.groupby(d[x]).agg(["mean", "std"]).sort_index()
    mid, sd = stats["mean"].to_numpy(), stats["std"].fillna(0.0).to_numpy()
    lo, hi = mid - sd, mid + sd
    if logy:
        mid, lo, hi = 10.0 ** mid, 10.0 ** lo, 10.0 ** hi
    xs = stats.index.to_numpy(float)
    line, = ax.plot(xs, mid, color=colour, lw=1.8, ls=ls, marker=marker, ms=4, label=label)
    if gid:
        line.set_gid(gid)
    keep = sd > 0
    if floor is not None:
        keep &= mid >= floor
    if keep.any():
        ax.fill_between(xs, np.where(keep, lo, np.nan), np.where(keep, hi, np.nan),
                        color=colour, alpha=0.2, lw=0, label="_band")


def draw_curves(ax: plt.Axes, d: pd.DataFrame, x: str, palette: dict[str, tuple], *,
                by: str | None = None, y: str = "value", key: str = "estimator_label",
                logy: bool = False, marker: bool = False, ls: str = "-",
                floor: float | None = None, legend: bool = True,
                style_label: str = "") -> None:
    """Mean ± sd over seeds of finished runs, one curve per ``key`` value (its label);
    diverged/failed runs thin, dashed, ending in ×; on a training axis (``TRAINING_AXES``)
    finished runs that did not converge end in a hollow ▷ at their own last point.

    With ``by`` (e.g. ``epoch``) the x coordinate is itself averaged over seeds at each ``by``
    value (wall-clock seconds differ between seeds at the same epoch). ``marker``: the label's
    marker on the mean curve. ``legend=False`` labels nothing; ``style_label`` names the line
    style of these curves in the legend too (e.g. ``E-steps from the prior``), through the
    curves' ``gid`` (``marks.STYLE_GID``).
    """
    def name(lab: object) -> str:
        return str(lab) if legend else "_"

    if logy:
        log_axis(ax, "y")
    d = d[np.isfinite(d[y].astype(float)) & d[x].notna()]
    if logy:
        d = d[d[y] > 0]
    ok = d[d["status"] == "ok"]
    if by is not None and by != x and len(ok):
        ok = ok.assign(**{x: ok.groupby([key, by])[x].transform("mean")})
    for lab, grp in ok.groupby(key, sort=False):
        draw_band(ax, grp, x, y, palette.get(lab, "0.3"), logy=logy, ls=ls, floor=floor,
                  marker=marker_of(lab) if marker else None, label=name(lab),
                  gid=STYLE_GID + style_label if style_label and legend else "")
    sort_key = by or x
    drawn: set = set(ok[key])
    for _, r in d[d["status"] != "ok"].groupby("run_id", sort=True):
        r = r.sort_values(sort_key)
        lab = r[key].iloc[0]
        colour = palette.get(lab, "0.3")
        first = lab not in drawn
        drawn.add(lab)
        ax.plot(r[x], r[y], color=colour, lw=0.9, ls="--", alpha=0.9,
                label=name(lab) if first else "_")
        ax.plot(r[x].iloc[-1:], r[y].iloc[-1:], color=colour, ls="none", marker="x", ms=9,
                mew=2, label=MARKS["diverged"])
    if "converged" in d.columns and (by or x) in TRAINING_AXES:
        late = d[(d["status"] == "ok") & d["converged"].eq(False)]
        for _, r in late.groupby("run_id", sort=True):
            r = r.sort_values(sort_key)
            ax.plot(r[x].iloc[-1:], r[y].iloc[-1:], ls="none", marker=">", ms=7, mew=1.3,
                    mfc="white", color=palette.get(r[key].iloc[0], "0.3"),
                    label=MARKS["unconverged"])
    if x in ("epoch", "step") and ax.get_xscale() == "linear":
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def draw_final(ax: plt.Axes, d: pd.DataFrame, x: str, y: str, colour: object, *,
               marker: str = "o", ls: str = "-", label: str = "_", offset: float = 1.0,
               seeds: bool = True) -> None:
    """Mean and 95 % t-interval over the finished runs at each x (errorbars joined by a line),
    one dot per seed beside it (hollow: the run did not converge). ``offset`` multiplies x
    (a log axis) so that series at the same x do not hide each other."""
    ok = d[(d["status"] == "ok") & np.isfinite(d[y].astype(float))]
    if ok.empty:
        return
    rows = [(xv, *ci95(g[y].astype(float))) for xv, g in ok.groupby(x)]
    xs = np.array([r[0] for r in rows], dtype=float) * offset
    mean = np.array([r[1] for r in rows])
    half = np.nan_to_num(np.array([r[2] for r in rows]))
    ax.errorbar(xs, mean, yerr=half, color=colour, marker=marker, ms=5, ls=ls, lw=1.5,
                capsize=3, label=label)
    if seeds:
        conv = ok["converged"].ne(False) if "converged" in ok.columns else \
            pd.Series(True, index=ok.index)
        sx = ok[x].astype(float).to_numpy() * offset * 1.04
        for mask, face in ((conv.to_numpy(), colour), (~conv.to_numpy(), "white")):
            if mask.any():
                ax.plot(sx[mask], ok[y].to_numpy(float)[mask], ls="none", marker=marker, ms=3.5,
                        mfc=face, mec=colour, mew=0.8, alpha=0.8,
                        label=MARKS["seed"])


# -- ELBO axes ------------------------------------------------------------------------------------
def elbo_limits(values: pd.Series | Iterable[pd.Series], *, k: float = 10.0,
                keep: Iterable[float] = ()) -> tuple[float, float] | None:
    """y limits that keep the bulk of ELBO values readable, or None (no cut needed).

    Values below median − k·MAD (median absolute deviation) are far-off: an untrained start, a
    score-function run gone astray. The limits sit 8 % of the kept range beyond the kept values
    and the ``keep`` values (reference lines, which must stay in view); they are only returned
    when something falls below the lower one.
    """
    keep = [float(v) for v in keep if np.isfinite(v)]
    if not isinstance(values, pd.Series):
        values = [v for v in values if len(v)]
        values = pd.concat(values) if values else pd.Series(dtype=float)
    v = values[np.isfinite(values.astype(float))].astype(float)
    if len(v) < 5:
        return None
    med = float(v.median())
    mad = float((v - med).abs().median())
    kept = v[v >= med - k * max(mad, 1e-6 * abs(med), 1e-9)]
    kept = pd.concat([kept, pd.Series(keep, dtype=float)])
    span = max(float(kept.max() - kept.min()), 1e-9)
    lo = float(kept.min()) - 0.08 * span
    return (lo, float(kept.max()) + 0.08 * span) if float(v.min()) < lo else None


def apply_limits(axes: Iterable[plt.Axes], limits: tuple[float, float] | None,
                 values: Iterable[pd.Series]) -> None:
    """Set ``limits`` on ``axes`` and write "axis cut at …" on each panel that has values below
    the cut (``values``: each panel's values, in the order of ``axes``)."""
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


def save_table(table: pd.DataFrame, folder: Path, stem: str,
               markdown: Callable[[pd.DataFrame], str]) -> list[Path]:
    """``<stem>.csv`` (6 significant digits) and its Markdown form ``<stem>.md``
    (``markdown(table)``), each written atomically; returns both paths."""
    csv = atomic_write(folder / f"{stem}.csv",
                       lambda p: table.to_csv(p, index=False, float_format="%.6g"))
    md = atomic_write(folder / f"{stem}.md",
                      lambda p: p.write_text(markdown(table), encoding="utf-8"))
    return [csv, md]
