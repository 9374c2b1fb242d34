"""elbo_curves: what each method × estimator reaches on digits, how fast, with what latents.

Figures (``results/elbo_curves/figures/``):

- ``elbo_vs_examples_{train,test}``: ELBO against training examples seen (epoch × N_train, log
  axis; Kingma & Welling 2014, Fig. 2), rows = latent dimension H, columns = method, hue =
  estimator, with the reference models at each panel's H; ``elbo_vs_epoch_{split}`` and
  ``elbo_vs_seconds_{split}`` the same against epochs and training wall-clock seconds;
- ``final_elbo_vs_latent_dim``: train and test ELBO at convergence (best epoch) against H, mean
  and 95 % t-interval over seeds, one dot per seed, with the reference models;
- ``active_units_vs_latent_dim``: latent units in use at the best epoch against H;
- ``test_time_inference[_H]``: held-out ELBO after s E-steps from the prior and from the encoder
  (log axis of s) and the seconds per test point it costs;
- ``images[_H]``, ``manifold``, ``latent_scatter`` (``pictures``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from experiments.figures import pictures, style
from experiments.figures.curves import X_AXES, Cell, elbo_grid, examples_seen
from experiments.figures.drawing import (
    apply_limits,
    bottom_xlabels,
    draw_curves,
    draw_final,
    elbo_limits,
    empty_panel,
    log_axis,
    panel_grid,
    plain_ticks,
    steps_axis,
    suptitle,
)
from experiments.figures.loading import ExperimentResults, SkipFigure, at_best, dim_suffix
from experiments.figures.marks import Tally, absent_note, legend
from experiments.figures.refs import draw_references, reference_value
from experiments.figures.registry import register
from experiments.figures.style import (
    ELBO_UNITS,
    LABEL_MARKERS,
    LABEL_ORDER,
    METHOD_ORDER,
    REFERENCES,
    TRAINING_LENGTH,
    m_text,
    method_name,
    ordered,
    seeds_text,
)

__all__ = ["INPUTS", "fig_active_units", "fig_elbo_curves", "fig_final_elbo",
           "fig_pictures", "fig_test_time_inference", "final_values"]

log = logging.getLogger(__name__)

INPUTS = pictures.INPUTS
#: x column → (file stem, words for the title)
CURVE_X = {"examples": ("elbo_vs_examples", "training examples seen"),
           "epoch": ("elbo_vs_epoch", "epochs"),
           "wall_s": ("elbo_vs_seconds", "training wall-clock seconds")}
#: test-time E-steps start → (line style, legend text)
INITS = {"encoder": ("-", "E-steps from the encoder output (solid)"),
         "prior": ("--", "E-steps from the prior (dashed)")}


def _dataset(d: pd.DataFrame) -> str:
    return "/".join(ordered(d["dataset"])) if "dataset" in d.columns and len(d) else ""


@register("elbo_curves", inputs=INPUTS)
def fig_elbo_curves(res: ExperimentResults) -> Iterator[tuple[str, Figure]]:
    """Train and test ELBO against training examples seen, epochs and seconds (rows = H,
    columns = method, hue = estimator; reference models at each panel's H and split)."""
    for split in ("train", "test"):
        d = res.metric("elbo", split=split)
        if d.empty:
            log.info("%s: no %s elbo rows; no %s curves", res.name, split, split)
            continue
        d = examples_seen(res, d)
        for x, (stem, words) in CURVE_X.items():
            if x not in d.columns or d[x].isna().all():
                log.info("%s: no %s for the %s curves", res.name, x, split)
                continue
            yield f"{stem}_{split}", _curves(res, d, x, split, words)


def _curves(res: ExperimentResults, d: pd.DataFrame, x: str, split: str, words: str
            ) -> Figure:
    dims = sorted(d["latent_dim"].dropna().unique()) or [np.nan]
    methods = ordered(d["method"], METHOD_ORDER)
    palette = style.palette(d["estimator_label"])
    tally = Tally()
    cells = []
    for h in dims:
        row = []
        for method in methods:
            cell = d[(d["method"] == method) & ((d["latent_dim"] == h) | pd.isna(h))]
            runs = res.runs_where(method=method, latent_dim=h)
            tally.add(runs, cell)
            note = Tally().add(runs, cell).compact()
            row.append(Cell(f"{method_name(method)}, H = {h:g}{note}", cell, runs, split, h,
                            f"{split} ELBO ({ELBO_UNITS})"))
        cells.append(row)
    fig, _, notes = elbo_grid(res, cells, x, palette)
    suptitle(fig, f"{_dataset(d)}: {split} ELBO (full split) against {words}"
                  f"{' on a log axis' if X_AXES[x][1] else ''}; rows = latent dimension H, "
                  f"columns = method; {m_text(d)}; each run until its stopping rule; mean ± sd "
                  f"over {seeds_text(d['seed'])}{absent_note(res, methods)}")
    legend(fig, title="estimator (line, band: mean ± sd over seeds)",
           notes={**tally.notes(), **notes})
    return fig


# -- final values against H ----------------------------------------------------------------------
def final_values(res: ExperimentResults, metric: str, split: str) -> pd.DataFrame:
    """One row per run with ``value`` = ``metric`` on ``split`` at the run's best epoch
    (runs.csv ``final_<metric>_<split>``, else the metrics.csv rows at the best epoch); runs
    without it (diverged before any evaluation) keep NaN so that they are still counted."""
    col = f"final_{metric}_{split}"
    if res.runs is not None and col in res.runs.columns:
        return res.runs.assign(value=pd.to_numeric(res.runs[col], errors="coerce"))
    m = at_best(res, res.metric(metric, split=split))
    if m.empty:
        raise SkipFigure(f"no {metric} on {split} in runs.csv or metrics.csv")
    vals = m.groupby("run_id")["value"].last()
    base = res.runs if res.runs is not None else m.drop_duplicates("run_id")
    return base.assign(value=base["run_id"].map(vals))


def _dodge(labels: list[str], lab: str) -> float:
    """A multiplicative x offset (log axis) per series, so that intervals do not overlap."""
    k = labels.index(lab) - (len(labels) - 1) / 2
    return float(2 ** (0.06 * k))


@register("elbo_curves")
def fig_final_elbo(res: ExperimentResults) -> Iterator[tuple[str, Figure]]:
    """Train and test ELBO at convergence (best epoch) against latent dimension H, per method
    (columns) and estimator (hue): mean and 95 % t-interval over seeds, one dot per seed,
    with the no-latent Gaussian and factor analysis at each H."""
    rows = [(s, final_values(res, "elbo", s)) for s in ("train", "test")]
    rows = [(s, r) for s, r in rows if r["value"].notna().any()]
    if not rows or rows[0][1]["latent_dim"].nunique() < 2:
        raise SkipFigure("final ELBO at fewer than two latent dimensions")
    every = pd.concat([r for _, r in rows])
    methods = ordered(every.loc[every["value"].notna(), "method"], METHOD_ORDER)
    labels = ordered(rows[0][1]["estimator_label"], LABEL_ORDER)
    palette = style.palette(labels)
    fig, axes = panel_grid(len(rows), len(methods), sharex=True, sharey="row", w=3.4, h=3.0)
    notes: dict[str, str] = {}
    tally = Tally().add(rows[0][1])
    for i, (split, d) in enumerate(rows):
        values, keep = [], []
        for j, method in enumerate(methods):
            ax = axes[i, j]
            log_axis(ax, "x", base=2)
            cell = d[d["method"] == method]
            for lab in labels:
                draw_final(ax, cell[cell["estimator_label"] == lab], "latent_dim", "value",
                           palette[lab], marker=LABEL_MARKERS.get(lab, "o"), label=lab,
                           offset=_dodge(labels, lab))
            refs = _reference_curves(ax, res, cell, split)
            keep += refs
            values.append(pd.concat([cell["value"].dropna(), pd.Series(refs, dtype=float)]))
            plain_ticks(ax, d["latent_dim"])
            ax.set_title(f"{method_name(method)}{Tally().add(cell).compact()}", fontsize=9)
            ax.set_xlabel("latent dimension H (log₂)")
            ax.set_ylabel(f"{split} ELBO at best epoch\n({ELBO_UNITS})" if j == 0 else "")
        apply_limits(axes[i], elbo_limits(values, keep=keep), values)
    notes |= _ref_notes(res, rows[0][1])
    d = rows[0][1]
    bottom_xlabels(axes)
    suptitle(fig, f"{_dataset(d)}: train and test ELBO {TRAINING_LENGTH} against latent "
                  f"dimension H; {m_text(d)}; mean and 95 % t-interval over "
                  f"{seeds_text(d.loc[d['status'] == 'ok', 'seed'])}"
                  f"{absent_note(res, methods)}")
    legend(fig, title="estimator (mean, 95 % interval)", notes={**tally.notes(), **notes})
    yield "final_elbo_vs_latent_dim", fig


def _reference_curves(ax, res: ExperimentResults, runs: pd.DataFrame, split: str
                      ) -> list[float]:
    """No-latent Gaussian (flat) and factor analysis at each H, as lines across H."""
    drawn = []
    dims = sorted(runs["latent_dim"].dropna().unique())
    for model in ("no_latent", "factor_analysis"):
        pts = [(h, reference_value(res, runs[runs["latent_dim"] == h], split, model, h)[0])
               for h in dims]
        pts = [(h, v) for h, v in pts if np.isfinite(v)]
        if not pts:
            continue
        label, colour, ls = REFERENCES[model]
        hs, vs = zip(*pts, strict=True)
        if model == "no_latent":
            ax.axhline(float(np.mean(vs)), color=colour, ls=ls, lw=1.3, label=label)
        else:
            ax.plot(hs, vs, color=colour, ls=ls, lw=1.3, marker="_", ms=10, label=label)
        drawn += list(vs)
    return drawn


def _ref_notes(res: ExperimentResults, runs: pd.DataFrame) -> dict[str, str]:
    n = reference_value(res, runs, "test", "no_latent")[1]
    return {REFERENCES[m][0]: f"mean over {n} data seed{'s' * (n != 1)}"
            for m in ("no_latent", "factor_analysis")} if n else {}


@register("elbo_curves")
def fig_active_units(res: ExperimentResults) -> Iterator[tuple[str, Figure]]:
    """Active latent units (Burda et al. 2016) at the best epoch against H, per method and
    estimator, with the line of all H units active."""
    d = final_values(res, "active_units", "test")
    if d["value"].notna().sum() == 0 or d["latent_dim"].nunique() < 2:
        raise SkipFigure("active units at fewer than two latent dimensions")
    methods = ordered(d.loc[d["value"].notna(), "method"], METHOD_ORDER)
    labels = ordered(d["estimator_label"], LABEL_ORDER)
    palette = style.palette(labels)
    fig, axes = panel_grid(1, len(methods), sharex=True, sharey=True, w=3.3, h=3.0)
    dims = sorted(d["latent_dim"].dropna().unique())
    for j, method in enumerate(methods):
        ax = axes[0, j]
        log_axis(ax, "x", base=2)
        ax.plot(dims, dims, color="0.5", ls=":", lw=1.2, label="all H units active")
        cell = d[d["method"] == method]
        for lab in labels:
            draw_final(ax, cell[cell["estimator_label"] == lab], "latent_dim", "value",
                       palette[lab], marker=LABEL_MARKERS.get(lab, "o"), label=lab,
                       offset=_dodge(labels, lab))
        plain_ticks(ax, d["latent_dim"])
        ax.set_ylim(-0.5, max(dims) + 0.5)
        ax.set_title(f"{method_name(method)}{Tally().add(cell).compact()}", fontsize=9)
        ax.set_xlabel("latent dimension H (log₂)")
        ax.set_ylabel("active units (test split)" if j == 0 else "")
    suptitle(fig, f"{_dataset(d)}: active latent units {TRAINING_LENGTH} (Cov_x E_q[z_h] above "
                  f"the threshold, test split) against H; {m_text(d)}; mean and 95 % t-interval "
                  f"over "
                  f"{seeds_text(d.loc[d['status'] == 'ok', 'seed'])}"
                  f"{absent_note(res, methods)}")
    legend(fig, title="estimator (mean, 95 % interval)", notes=Tally().add(d).notes())
    yield "active_units_vs_latent_dim", fig


# -- test-time inference -------------------------------------------------------------------------
@register("elbo_curves")
def fig_test_time_inference(res: ExperimentResults) -> Iterator[tuple[str, Figure]]:
    """Held-out ELBO after s test-time E-steps from the prior (dashed) and from the encoder
    (solid), and the seconds per test point they cost (rows), per method (columns); s on a log
    axis (symlog through 0); the reference models on the ELBO row."""
    tc = res.metric("test_curve_elbo")
    if tc.empty:
        raise SkipFigure("no test_curve_elbo rows")
    tc = tc.assign(step=tc["step"].astype(float), init=tc["param_group"].fillna("encoder"))
    split = "test" if (tc["split"] == "test").any() else str(tc["split"].iloc[0])
    tc = tc[tc["split"] == split]
    dims = sorted(tc["latent_dim"].dropna().unique())
    for h in dims:
        th = tc[tc["latent_dim"] == h]
        yield f"test_time_inference{dim_suffix(h, dims)}", _test_time(res, th, h, split)


def _test_time(res: ExperimentResults, th: pd.DataFrame, h: object, split: str) -> Figure:
    methods = ordered(th["method"], METHOD_ORDER)
    palette = style.palette(th["estimator_label"])
    fig, axes = panel_grid(2, len(methods), sharex=True, sharey="row", w=3.3, h=2.8)
    tally, notes = Tally(), {}
    values, keep = [], []
    for j, method in enumerate(methods):
        cell = th[th["method"] == method]
        runs = res.runs_where(method=method, latent_dim=h)
        tally.add(runs, cell)
        refs, found = draw_references(axes[0, j], res, runs, split, h)
        notes |= found
        keep += refs
        values.append(pd.concat([cell["value"], pd.Series(refs, dtype=float)]))
    limits = elbo_limits(values, keep=keep)
    for j, method in enumerate(methods):
        cell = th[th["method"] == method]
        for i, (y, ylabel) in enumerate((("value", f"held-out ELBO ({ELBO_UNITS})"),
                                        ("wall_s", "seconds per test point (log)"))):
            ax = axes[i, j]
            steps_axis(ax, th["step"])
            sub = cell[cell[y].notna() & ((cell[y] > 0) if y == "wall_s" else True)]
            if sub.empty:
                empty_panel(ax, "no timings" if y == "wall_s" else "no runs")
                continue
            for init in ordered(sub["init"], INITS):
                ls, words = INITS.get(init, ("-.", f"E-steps from {init}"))
                draw_curves(ax, sub[sub["init"] == init], "step", palette, y=y,
                            logy=y == "wall_s", marker=True, ls=ls,
                            style_label=words,
                            floor=None if limits is None or i else limits[0])
            ax.set_title(f"{method_name(method)}{Tally().add(cell).compact()}" if i == 0
                         else "", fontsize=9)
            ax.set_xlabel("test-time E-steps s (0, then log)")
            ax.set_ylabel(ylabel if j == 0 else "")
    apply_limits(axes[0], limits, values)
    for ax in axes[0]:
        ax.set_xlabel("")
    suptitle(fig, f"{_dataset(th)}: test-time inference on held-out ({split}) points, H = "
                  f"{h:g}: ELBO after s E-steps and its cost; models {TRAINING_LENGTH} with "
                  f"{m_text(th).removeprefix('training ')}; mean ± sd over "
                  f"{seeds_text(th['seed'])}")
    legend(fig, title="estimator (line, band: mean ± sd over seeds)",
           notes={**tally.notes(), **notes}, neutral=[w for _, w in INITS.values()])
    return fig


@register("elbo_curves", inputs=INPUTS)
def fig_pictures(res: ExperimentResults) -> Iterator[tuple[str, Figure]]:
    """Data, reconstructions, samples; the 2-D manifold; the encoded test set."""
    yield from pictures.pictures(res)

