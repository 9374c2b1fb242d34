"""lr_selection: the step-size search of every method × estimator (``experiments.selection``).

Figure ``lr_selection[_<dataset>]``: rows = estimator, columns = method; x = the decoder step
size ``lr`` (log), y = validation ELBO at each seed's best epoch; one line per value of the
method's inference step sizes (``local_lr`` for vem, ``encoder_lr`` for amortized,
``encoder_lr`` and ``refine_lr`` for semi_amortized; colour, legend in the panel) joining the
candidates' medians
over seeds (the selection's score, ``candidates.csv``). Marker shape = the round that added the
candidate (initial cross, extension rounds), hollow = unconverged (a seed reached the epoch cap
before a plateau), red ring = unstable; small dots = seeds, × on the lower edge = diverged seeds,
↓n = seeds below the axis; ★ = the chosen step sizes (``selected.csv``, whose flags are in the
panel title). Estimators and methods that reuse another's choice are named in the title.
"""

from __future__ import annotations

import logging
import textwrap
from collections.abc import Iterator

import matplotlib.transforms as mtransforms
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from experiments import schema
from experiments.figures.drawing import (
    elbo_limits,
    empty_panel,
    log_axis,
    panel_grid,
    plain_ticks,
    suptitle,
)
from experiments.figures.loading import ExperimentResults, SkipFigure, add_labels
from experiments.figures.marks import STYLE_GID, axis_legend, legend
from experiments.figures.refs import draw_references
from experiments.figures.registry import register
from experiments.figures.style import (
    ELBO_UNITS,
    LABEL_ORDER,
    MARKS,
    METHOD_ORDER,
    estimator_label,
    m_text,
    method_name,
    ordered,
    seeds_text,
)

__all__ = ["INPUTS", "ROUNDS", "SECOND", "fig_lr_selection"]

log = logging.getLogger(__name__)

INPUTS = {"candidates.csv": ("dataset", "method", "estimator", "baseline", "method.lr", "score",
                             "unstable", "unconverged", "round"),
          "selected.csv": ("dataset", "method", "estimator", "baseline", "method.lr")}
#: the inference step sizes a method may have, as runs.csv names them
SECOND = ("method.local_lr", "method.encoder_lr", "method.refine_lr")
#: round → (marker, legend text)
ROUNDS = {0: ("o", "candidate median, initial cross (●)"),
          1: ("s", "candidate median, extension round 1 (■)"),
          2: ("D", "candidate median, extension round 2 (◆)")}


def _key(frame: pd.DataFrame, cols: list[str]) -> pd.Series:
    """Step sizes as text with 6 significant digits, so that floats from two files match."""
    return frame[cols].apply(lambda c: c.map(lambda v: "" if pd.isna(v) else f"{float(v):.6g}")
                             ).agg("|".join, axis=1)


def _second(c: pd.DataFrame) -> list[str]:
    """The inference step sizes a method's candidates name (empty: only lr)."""
    return [s for s in SECOND if s in c.columns and c[s].notna().any()]


def _levels(frame: pd.DataFrame, secs: list[str]) -> pd.Series:
    """Each row's inference step sizes as a tuple (one line of the panel per distinct tuple)."""
    return pd.Series([tuple(float(row[s]) for s in secs) for _, row in frame.iterrows()],
                     index=frame.index, dtype=object)


def _level_text(secs: list[str], level: tuple) -> str:
    return ", ".join(f"{s.split('.')[1]} = {v:g}" for s, v in zip(secs, level, strict=True))


@register("lr_selection", inputs=INPUTS)
def fig_lr_selection(res: ExperimentResults) -> Iterator[tuple[str, Figure]]:
    """Median validation ELBO per candidate against lr, one line per inference step size."""
    cand = add_labels(res.table("candidates.csv", INPUTS["candidates.csv"]))
    try:
        sel = add_labels(res.table("selected.csv", INPUTS["selected.csv"]))
    except SkipFigure as why:
        log.info("%s: %s; no stars", res.name, why)
        sel = cand.iloc[:0]
    runs = res.runs if res.runs is not None else pd.DataFrame()
    if len(runs):
        col = "final_elbo_validation"
        runs = runs.assign(value=pd.to_numeric(runs[col], errors="coerce") if col in runs
                           else np.nan)
    datasets = ordered(cand["dataset"])
    for dataset in datasets:
        c = cand[cand["dataset"] == dataset]
        s = sel[sel["dataset"] == dataset]
        r = runs[runs["dataset"] == dataset] if len(runs) else runs
        yield (f"lr_selection{'' if len(datasets) == 1 else f'_{dataset}'}",
               _figure(res, c, s, r, dataset))


def _figure(res: ExperimentResults, cand: pd.DataFrame, sel: pd.DataFrame, runs: pd.DataFrame,
            dataset: str) -> Figure:
    methods = ordered(cand["method"], METHOD_ORDER)
    labels = ordered(cand["estimator_label"], LABEL_ORDER)
    fig, axes = panel_grid(len(labels), len(methods), sharex=False, sharey="row", w=4.0, h=3.4)
    hue_labels: set[str] = set()
    ref_notes: dict[str, str] = {}
    for i, lab in enumerate(labels):
        row_values, row_axes, marks, keep = [], [], [], []
        for j, method in enumerate(methods):
            ax = axes[i, j]
            c = cand[(cand["method"] == method) & (cand["estimator_label"] == lab)]
            s = sel[(sel["method"] == method) & (sel["estimator_label"] == lab)]
            r = runs[(runs["method"] == method) & (runs["estimator_label"] == lab)] \
                if len(runs) else runs
            ax.set_title(_title(method, lab, s, c), fontsize=8)
            if c.empty:
                empty_panel(ax, "not selected here")
                continue
            values, found = _panel(ax, c, s, r)
            if len(r):
                refs, notes = draw_references(ax, res, r, "validation", r["latent_dim"].iloc[0])
                ref_notes |= notes
                keep += refs
                values = pd.concat([values, pd.Series(refs, dtype=float)])
            hue_labels |= found
            row_values.append(values)
            row_axes.append(ax)
            marks.append((ax, c, r))
            ax.set_xlabel("decoder step size lr (log)")
            ax.set_ylabel(f"{lab}\nvalidation ELBO ({ELBO_UNITS})" if j == 0 else "")
        limits = elbo_limits(row_values, k=6.0, keep=keep)
        for ax, c, r in marks:
            _edge_marks(ax, c, r, limits)
        if limits is not None:
            for ax in row_axes:
                ax.set_ylim(*limits)
    for ax in axes.flat:
        if ax.has_data():
            axis_legend(ax, only=hue_labels, loc="best", title="inference step size")
    share_text = _shared(sel)
    n = seeds_text(runs["seed"]) if len(runs) else "the seeds"
    h = f", H = {runs['latent_dim'].iloc[0]:g}" if len(runs) else ""
    suptitle(fig, f"{dataset}{h}: step-size selection by the median over {n} of the validation "
                  f"ELBO at each seed's best epoch (models trained to convergence or the epoch "
                  f"cap); {m_text(runs) if len(runs) else ''}"
                  + (f". Choices reused without a search: {share_text}" if share_text else ""))
    legend(fig, title="marks", order=[v[1] for v in ROUNDS.values()],
           neutral=[v[1] for v in ROUNDS.values()], skip=hue_labels, notes=ref_notes)
    return fig


def _title(method: str, lab: str, s: pd.DataFrame, c: pd.DataFrame) -> str:
    head = f"{method_name(method)}, {lab}"
    if s.empty:
        return head
    r = s.iloc[0]
    secs = _second(c) or _second(s)
    chosen = ", ".join([f"lr {r['method.lr']:g}"] + [f"{sec.split('.')[1]} {r[sec]:g}"
                                                     for sec in secs if pd.notna(r.get(sec))])
    flags = [f for f in ("unstable", "unconverged", "at_cap") if f in r and
             schema.as_bool(pd.Series([r[f]])).iloc[0] is True]
    if "edge" in r and isinstance(r["edge"], str) and r["edge"]:
        flags.append(f"edge {r['edge']}")
    flags = textwrap.fill("; ".join(flags), 48) if flags else ""
    return f"{head}\nchosen: {chosen}" + (f"\n({flags})" if flags else "")


def _shared(sel: pd.DataFrame) -> str:
    """The share rules seen in ``selected.csv`` (``shared_from`` = ``method/estimator+baseline``
    of the group whose choice was reused): ``stl ← reparam; SA-VAE ← semi-amortized``."""
    if "shared_from" not in sel.columns:
        return ""
    rules = []
    for _, r in sel[sel["shared_from"].notna()].iterrows():
        method, _, label = str(r["shared_from"]).partition("/")
        est, _, base = label.partition("+")
        label = estimator_label(est, base or "none")
        if method != r["method"]:
            rules.append(f"{method_name(r['method'])} ← {method_name(method)}")
        if label != r["estimator_label"]:
            rules.append(f"{r['estimator_label']} ← {label}")
    return "; ".join(dict.fromkeys(sorted(rules)))


def _panel(ax, c: pd.DataFrame, s: pd.DataFrame, r: pd.DataFrame) -> tuple[pd.Series, set]:
    """Lines, medians, seeds and the star of one method × estimator; returns (the values to
    keep in view, the hue labels drawn)."""
    log_axis(ax, "x")
    secs = _second(c)
    level_of = _levels(c, secs)
    levels = sorted(set(level_of)) if secs else [None]
    colours = dict(zip(levels, sns.color_palette("viridis", len(levels) + 1)[:len(levels)],
                       strict=True))
    keys = ["method.lr", *secs]
    runs = r.assign(_k=_key(r, keys)) if len(r) else r
    found: set[str] = set()
    values = [c["score"].dropna()]
    for level in levels:
        cl = c if level is None else c[level_of == level]
        cl = cl.sort_values("method.lr")
        colour = colours[level]
        name = "_" if level is None else _level_text(secs, level)
        found.add(name)
        ok = cl[cl["score"].notna()]
        ax.plot(ok["method.lr"], ok["score"], color=colour, lw=1.4, label=name)
        for _, row in ok.iterrows():
            rnd = int(row["round"]) if pd.notna(row["round"]) else 0
            marker, words = ROUNDS.get(rnd, ("^", f"candidate median, round {rnd} (▲)"))
            hollow = schema.as_bool(pd.Series([row["unconverged"]])).iloc[0] is True
            point, = ax.plot([row["method.lr"]], [row["score"]], ls="none", marker=marker,
                             ms=7, mfc="white" if hollow else colour, mec=colour, mew=1.5,
                             label=words)
            if hollow:  # the hollow marker also stands for the "not converged" entry
                point.set_gid(STYLE_GID + MARKS["unconverged"])
            if schema.as_bool(pd.Series([row["unstable"]])).iloc[0] is True:
                ax.plot([row["method.lr"]], [row["score"]], ls="none", marker="o", ms=13,
                        mfc="none", mec="red", mew=1.2, label=MARKS["unstable"])
        if len(runs):
            seeds = runs[(runs["_k"].isin(_key(cl, keys))) & runs["value"].notna()]
            conv = seeds["converged"].ne(False).to_numpy()
            for mask, face in ((conv, colour), (~conv, "white")):
                if mask.any():
                    ax.plot(seeds["method.lr"].to_numpy(float)[mask] * 1.06,
                            seeds["value"].to_numpy(float)[mask], ls="none", marker="o", ms=3,
                            mfc=face, mec=colour, mew=0.7, alpha=0.7, label=MARKS["seed"])
            values.append(seeds["value"])
    for _, row in s.iterrows():
        y = c.loc[_key(c, keys) == _key(s.loc[[row.name]], keys).iloc[0], "score"]
        if len(y) and pd.notna(y.iloc[0]):
            level = _levels(s.loc[[row.name]], secs).iloc[0] if secs else None
            ax.plot([row["method.lr"]], [y.iloc[0]], ls="none", marker="*", ms=16, mec="k",
                    mew=0.8, color=colours.get(level, "0.5"), label=MARKS["selected"],
                    zorder=5)
    plain_ticks(ax, c["method.lr"])
    return pd.concat(values), found


def _edge_marks(ax, c: pd.DataFrame, r: pd.DataFrame, limits: tuple[float, float] | None
                ) -> None:
    """× with a count on the lower edge for diverged seeds, ↓ with a count for seeds below
    the axis, at each candidate lr."""
    if r is None or r.empty:
        return
    edge = mtransforms.blended_transform_factory(ax.transData, ax.transAxes)
    for lr, grp in r.groupby("method.lr"):
        bad = int(grp["status"].ne("ok").sum())
        low = int((grp["value"] < limits[0]).sum()) if limits is not None else 0
        if bad:
            ax.plot([lr], [0.03], transform=edge, ls="none", marker="x", ms=8, mew=2,
                    color="0.25", clip_on=False, label=MARKS["diverged_seeds"])
            ax.text(lr * 1.12, 0.03, str(bad), transform=edge, fontsize=7, va="center")
        if low:
            ax.plot([lr], [0.1], transform=edge, ls="none", marker="$\\downarrow$", ms=9,
                    color="0.25", clip_on=False, label=MARKS["off_axis"])
            ax.text(lr * 1.12, 0.1, str(low), transform=edge, fontsize=7, va="center")

