"""The study's figures, drawn from the results CSVs alone (SPEC §7; issue 6, "Results and figures").

``make_figures(results)`` validates every CSV it will read (``experiments.schema``), then draws,
for each experiment that has results, one function per figure into
``results/<experiment>/figures/<name>.{png,pdf}``. Figure code imports numpy, pandas, matplotlib
(Agg), seaborn and ``experiments.schema`` only: never torch or the training code (``vi``), so
re-plotting works from committed CSVs on any machine.

Conventions shared by every figure
- hue = estimator with its baseline (``estimator_label``: ``reparam``, ``stl``, ``score+none``,
  ``score+loo``, ...), columns = inference method; colours are fixed per label across figures.
- Bands are mean ± one standard deviation over seeds of the runs that finished (status ``ok``),
  computed by seaborn (``errorbar="sd"``; on log axes seaborn averages in log space).
- Diverged (and failed) runs are results, never dropped silently (issue 7): their curves are drawn
  thin and dashed up to the last finite value, which carries an ``×``; every legend entry and
  panel title counts them ("score+none — 2/6 runs diverged"); where a figure shows final values
  (bars, tables) they are excluded from the mean and the exclusion is printed on the figure.
- A figure whose input table or column is missing is skipped with a logged note; nothing else
  stops the ``figures`` command short of an invalid CSV, which raises ``schema.SchemaError``.

Figures (``results/<experiment>/figures/<stem>.{png,pdf}``; ``_H<h>`` is added where an
experiment has several latent dimensions, ``_<dataset>`` where lr_selection has several):

- lr_selection: ``lr_selection`` (validation ELBO vs lr; stars = selected; × = diverged)
- elbo_curves: ``elbo_vs_epoch_{train,test}``, ``elbo_vs_seconds_{train,test}``
  (rows = latent dimension, columns = method)
- gradient_variance: ``grad_variance_vs_epoch[_H]``, ``grad_snr_vs_epoch[_H]``,
  ``grad_variance_vs_latent_dim``, ``grad_snr_vs_latent_dim``, ``grad_variance_vs_n_mc[_H]``
  (with a 1/M line), ``variance_ratio_vs_latent_dim``; tables ``variance_ratio.csv``/``.md``
- amortization_gap: ``gaps_<dataset>`` (bars, train vs test), ``bounds_vs_epoch_<dataset>_<split>``
  (log p(x), L[q*], L[q_φ] and the gaps over training, when measured at several epochs)
- ppca_exact: ``elbo_vs_target[_H]`` (ELBO vs epoch, dotted target log p(x) − gap)
- test_time_inference: ``test_time_inference[_H]`` (held-out ELBO and seconds per point vs E-steps)
- samples: ``images[_H]``, ``manifold``, ``latent_scatter``
"""

from __future__ import annotations

import logging
import os
import re
import textwrap
import traceback
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless; must precede pyplot

import matplotlib.pyplot as plt
import matplotlib.transforms as mtransforms
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import LogLocator, MaxNLocator, NullLocator

from experiments import schema

__all__ = [
    "EXPERIMENTS",
    "FIGURES",
    "ExperimentResults",
    "estimator_label",
    "load_experiment",
    "make_figures",
    "validate_results",
    "variance_ratio",
]

log = logging.getLogger(__name__)

EXPERIMENTS = ("lr_selection", "elbo_curves", "gradient_variance", "amortization_gap",
               "ppca_exact", "test_time_inference", "samples")

#: extra tables an experiment may have beside metrics.csv/runs.csv, with the columns figures need
#: after ``_normalise`` (which maps the runner's layout, ``experiments.aggregate.TABLE_COLUMNS``,
#: onto these names: see its docstring)
EXTRA_TABLES: dict[str, dict[str, tuple[str, ...]]] = {
    "gradient_variance": {"variance_sweep.csv": (
        "run_id", "method", "latent_dim", "seed", "estimator", "baseline", "n_mc",
        "param_group", "metric", "value")},
    "samples": {
        "images.csv": ("run_id", "method", "estimator", "baseline", "seed", "kind", "item",
                       "pixel", "value"),
        "latents.csv": ("run_id", "method", "estimator", "baseline", "seed", "label", "z1",
                        "z2"),
    },
    "lr_selection": {"selected.csv": ("method", "estimator", "baseline", "lr")},
}

#: per table, the runner's name of a column that ``_normalise`` renames (for messages)
RUNNER_NAMES = {
    "images.csv": {"item": "index", "pixel": "p00…", "value": "p00…"},
    "latents.csv": {"z1": "mu1", "z2": "mu2"},
    "variance_sweep.csv": {"estimator": "grad_estimator", "baseline": "grad_baseline",
                           "n_mc": "grad_n_mc"},
}

METHOD_ORDER = ("vem", "amortized", "semi_amortized")
METHOD_NAMES = {"vem": "variational EM", "amortized": "amortized (VAE)",
                "semi_amortized": "semi-amortized"}
LABEL_ORDER = ("reparam", "stl", "score+none", "score+mean", "score+loo", "score+cv")
_COLORBLIND = sns.color_palette("colorblind", 10)
#: markers tell apart estimators whose curves coincide (reparam and stl often do)
LABEL_MARKERS = {"reparam": "o", "stl": "s", "score+none": "^", "score+mean": "v",
                 "score+loo": "D", "score+cv": "P"}
_LABEL_COLOURS = {"reparam": 0, "stl": 1, "score+none": 3, "score+mean": 4, "score+loo": 2,
                  "score+cv": 5}
#: gradient-variance rows: the variational parameters λ are comparable across methods; the
#: local table Λ (vem) and the encoder φ (amortized) play the same role, so they share a row.
GROUP_ROWS = (("variational", ("variational",), "variational λ"),
              ("inference", ("local", "encoder"), "local Λ / encoder φ"),
              ("decoder", ("decoder",), "decoder θ"))
ELBO_UNITS = "nats / data point"
DPI = 150


class _Skip(Exception):
    """A figure that cannot be drawn from the results at hand (logged, not raised)."""


# -- labels, order, colours --------------------------------------------------------------------
def estimator_label(estimator: object, baseline: object) -> str:
    """``estimator`` alone for pathwise estimators without a baseline, else ``estimator+baseline``.

    The score function always shows its baseline (``score+none``), since that is what decides
    its variance (Mohamed et al. 2020, §5).
    """
    b = "" if baseline is None or pd.isna(baseline) else str(baseline).strip()
    if str(estimator) == "score" or (b and b != "none"):
        return f"{estimator}+{b or 'none'}"
    return str(estimator)


def _ordered(values: Iterable[object], order: Iterable[object] = ()) -> list:
    present = list(dict.fromkeys(v for v in values if not (isinstance(v, float) and np.isnan(v))))
    first = [v for v in order if v in present]
    return first + sorted((v for v in present if v not in first), key=str)


def _palette(labels: Iterable[str]) -> dict[str, tuple]:
    spare = iter(i for i in range(10) if i not in _LABEL_COLOURS.values())
    out = {}
    for lab in _ordered(labels, LABEL_ORDER):
        idx = _LABEL_COLOURS.get(lab)
        out[lab] = _COLORBLIND[idx if idx is not None else next(spare, 7)]
    return out


def _method_name(method: object) -> str:
    return METHOD_NAMES.get(str(method), str(method))


def _add_labels(df: pd.DataFrame) -> pd.DataFrame:
    df = df.copy()
    if "baseline" not in df.columns:
        df["baseline"] = "none"
    df["baseline"] = df["baseline"].astype(object).where(df["baseline"].notna(), "none")
    df["estimator_label"] = [estimator_label(e, b) for e, b in
                             zip(df["estimator"], df["baseline"], strict=True)]
    return df


# -- loading and validation --------------------------------------------------------------------
@dataclass
class ExperimentResults:
    """One experiment's validated tables, each with ``estimator_label`` and ``status`` columns."""

    name: str
    folder: Path
    metrics: pd.DataFrame
    runs: pd.DataFrame | None
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)

    def table(self, filename: str, columns: Iterable[str] = ()) -> pd.DataFrame:
        """An extra table (e.g. ``variance_sweep.csv``), or ``_Skip`` naming what is missing."""
        if filename not in self.tables:
            raise _Skip(f"{self.folder / filename} not found")
        df = self.tables[filename]
        missing = [c for c in columns if c not in df.columns]
        if missing:
            alias = RUNNER_NAMES.get(filename, {})
            names = [f"{c} ({alias[c]})" if c in alias else c for c in missing]
            raise _Skip(f"{self.folder / filename} lacks column(s) {', '.join(names)}")
        return df

    def status_of(self, run_ids: pd.Series) -> pd.Series:
        """Status from runs.csv; a run absent from it counts as ``ok`` (noted once)."""
        if self.runs is None:
            return pd.Series("ok", index=run_ids.index)
        status = run_ids.map(self.runs.set_index("run_id")["status"])
        if status.isna().any():
            log.info("%s: %d run_id(s) in the tables are not in runs.csv; counted as ok",
                     self.name, run_ids[status.isna()].nunique())
        return status.fillna("ok")

    def runs_where(self, **keys: object) -> pd.DataFrame:
        """Rows of runs.csv matching identity keys (empty frame when there is no runs.csv)."""
        if self.runs is None:
            return pd.DataFrame(columns=["run_id", "estimator_label", "status"])
        sel = self.runs
        for key, value in keys.items():
            if key in sel.columns and not (value is None or pd.isna(value)):
                sel = sel[sel[key] == value]
        return sel

    def metric(self, *names: str, split: str | None = None) -> pd.DataFrame:
        m = self.metrics[self.metrics["metric"].isin(names)]
        if split is not None:
            m = m[m["split"] == split]
        return m


def _normalise(filename: str, df: pd.DataFrame) -> pd.DataFrame:
    """Map the runner's table layouts onto the long names the figures use.

    - ``variance_sweep.csv``: ``grad_estimator``/``grad_baseline``/``grad_n_mc`` (the estimator
      being measured) become ``estimator``/``baseline``/``n_mc``; the estimator the model was
      trained with becomes ``trained_with`` (an estimator label).
    - ``images.csv``: wide pixel columns ``p00 … pNN`` (row-major, ``height`` × ``width``) are
      melted to ``pixel``/``value``; ``index`` → ``item``; kind ``data`` → ``original``.
    - ``latents.csv``: ``mu1``/``mu2`` → ``z1``/``z2``, ``point`` → ``index``.
    - ``selected.csv``: ``score_mean`` (validation ELBO of the chosen step sizes) →
      ``validation_elbo``.
    Tables already in the long layout pass unchanged.
    """
    if filename == "variance_sweep.csv" and "grad_estimator" in df.columns:
        trained = [estimator_label(e, b) for e, b in
                   zip(df["estimator"], df.get("baseline", pd.Series("none", index=df.index)),
                       strict=True)]
        df = (df.drop(columns=[c for c in ("estimator", "baseline", "n_mc") if c in df.columns])
              .rename(columns={"grad_estimator": "estimator", "grad_baseline": "baseline",
                               "grad_n_mc": "n_mc"})
              .assign(trained_with=trained))
    elif filename == "images.csv":
        pixels = [c for c in df.columns if re.fullmatch(r"p\d+", str(c))]
        if pixels and "pixel" not in df.columns:
            ids = [c for c in df.columns if c not in pixels]
            df = df.melt(id_vars=ids, value_vars=pixels, var_name="pixel", value_name="value")
            df["pixel"] = df["pixel"].str[1:].astype(int)
        if "item" not in df.columns and "index" in df.columns:
            df = df.rename(columns={"index": "item"})
        if "kind" in df.columns:
            df["kind"] = df["kind"].replace({"data": "original"})
    elif filename == "latents.csv":
        if "z1" not in df.columns:
            df = df.rename(columns={"mu1": "z1", "mu2": "z2"})
        if "index" not in df.columns and "point" in df.columns:
            df = df.rename(columns={"point": "index"})
    elif filename == "selected.csv":
        if "validation_elbo" not in df.columns and "score_mean" in df.columns:
            df = df.assign(validation_elbo=df["score_mean"])
    return df


def _read_csv(path: Path) -> pd.DataFrame:
    try:
        return pd.read_csv(path, dtype={"run_id": str, "baseline": str, "param_group": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise schema.SchemaError(f"{path}: not a readable CSV ({err})") from err


def _load(results: Path, name: str) -> tuple[ExperimentResults | None, list[str]]:
    folder = results / name
    problems: list[str] = []
    if not folder.is_dir():
        return None, problems
    metrics = runs = None
    if (folder / "metrics.csv").is_file():
        try:
            metrics = schema.read_metrics(folder / "metrics.csv")
        except schema.SchemaError as err:
            problems.append(str(err))
    if (folder / "runs.csv").is_file():
        try:
            runs = schema.read_runs(folder / "runs.csv")
        except schema.SchemaError as err:
            problems.append(str(err))
    tables = {}
    for filename, columns in EXTRA_TABLES.get(name, {}).items():
        if (folder / filename).is_file():
            try:
                df = _read_csv(folder / filename)
            except schema.SchemaError as err:
                problems.append(str(err))
                continue
            if "value" in columns and "value" in df.columns:
                bad = ~np.isfinite(pd.to_numeric(df["value"], errors="coerce").to_numpy(float))
                if bad.any():
                    problems.append(f"{folder / filename}: non-finite or non-numeric value on "
                                    f"line(s) {(df.index[bad][:5] + 2).tolist()}")
            if "metric" in df.columns:
                unknown = sorted(set(df["metric"].dropna()) - set(schema.METRICS))
                if unknown:
                    problems.append(f"{folder / filename}: unknown metric name(s) {unknown}")
            tables[filename] = _normalise(filename, df)
    if problems or (metrics is None and runs is None and not tables):
        return None, problems
    if metrics is None:
        log.info("%s: no metrics.csv; drawing what the other tables allow", folder)
        metrics = pd.DataFrame({c: pd.Series(dtype=object) for c in schema.METRIC_COLUMNS})
    res = ExperimentResults(name, folder, _add_labels(metrics),
                            None if runs is None else _add_labels(runs), {})
    res.metrics["status"] = res.status_of(res.metrics["run_id"])
    for filename, df in tables.items():
        if "estimator" in df.columns:
            df = _add_labels(df)
        if "run_id" in df.columns:
            df["status"] = res.status_of(df["run_id"])
        res.tables[filename] = df
    return res, problems


def validate_results(results: str | Path, experiments: Iterable[str] | None = None
                     ) -> dict[str, ExperimentResults]:
    """Read and validate every CSV of the named experiments (default: all with a folder).

    Raises ``schema.SchemaError`` listing every problem of every file (each names its path)
    before anything is drawn. Returns the experiments that have results.
    """
    results = Path(results)
    names = list(EXPERIMENTS if experiments is None else experiments)
    unknown = [n for n in names if n not in EXPERIMENTS]
    if unknown:
        raise ValueError(f"unknown experiment(s) {unknown}; valid: {', '.join(EXPERIMENTS)}")
    loaded, problems = {}, []
    for name in names:
        res, found = _load(results, name)
        problems += found
        if res is not None:
            loaded[name] = res
        elif not found:
            log.info("%s: no results in %s; no figures", name, results / name)
    if problems:
        raise schema.SchemaError("\n".join(problems))
    return loaded


def load_experiment(results: str | Path, name: str) -> ExperimentResults:
    """One experiment's validated tables (``schema.SchemaError`` if invalid or absent)."""
    loaded = validate_results(results, [name])
    if name not in loaded:
        raise schema.SchemaError(f"{Path(results) / name}: no results")
    return loaded[name]


# -- shared drawing helpers --------------------------------------------------------------------
def _grid(nrows: int, ncols: int, *, sharex: bool | str = True, sharey: bool | str = "row",
          w: float = 3.6, h: float = 2.7) -> tuple[Figure, np.ndarray]:
    fig, axes = plt.subplots(nrows, ncols, figsize=(w * ncols, h * nrows), squeeze=False,
                             sharex=sharex, sharey=sharey, layout="constrained")
    return fig, axes


def _log(ax: plt.Axes, which: str, base: float = 10) -> None:
    """Log scale with minor ticks at 2 and 5 only (a full set costs most of the drawing time)."""
    axis = ax.xaxis if which == "x" else ax.yaxis
    (ax.set_xscale if which == "x" else ax.set_yscale)("log", base=base)
    if base == 10:
        axis.set_minor_locator(LogLocator(base=10, subs=(2.0, 5.0)))
    else:
        axis.set_minor_locator(NullLocator())


def _plain_ticks(ax: plt.Axes, values: pd.Series) -> None:
    """Major x ticks at the grid values themselves (2, 5, 10, 20), written as plain numbers."""
    ticks = sorted(float(v) for v in values.dropna().unique())
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.xaxis.set_minor_locator(NullLocator())


def _bottom_xlabels(axes: np.ndarray) -> None:
    """With shared x axes, name the x axis under the bottom row only."""
    for ax in axes[:-1].flat:
        ax.set_xlabel("")


def _suptitle(fig: Figure, text: str) -> None:
    """A figure title wrapped to the figure's width (constrained layout would cut it off);
    about 10 characters of a 12-point title per inch."""
    fig.suptitle(textwrap.fill(text, max(int(10 * fig.get_figwidth()), 30)))


def _empty(ax: plt.Axes, text: str = "no runs") -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4")
    ax.tick_params(labelleft=False, labelbottom=False, left=False, bottom=False)


@dataclass
class _Tally:
    """Runs per estimator label by status, over unique run_ids."""

    counts: dict[str, dict[str, int]] = field(default_factory=dict)

    def add(self, *frames: pd.DataFrame) -> _Tally:
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
        return any(c["diverged"] or c["failed"] for c in self.counts.values())

    def text(self, lab: str) -> str:
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
        notes = [f"{lab}: {self.text(lab)}" for lab in _ordered(self.counts, LABEL_ORDER)
                 if self.text(lab)]
        return ("\n" + "; ".join(notes)) if notes else ""


def _facet_tally(res: ExperimentResults, data: pd.DataFrame, **keys: object) -> _Tally:
    return _Tally().add(res.runs_where(**keys), data)


def _legend(fig: Figure, palette: dict[str, tuple], tally: _Tally, *, title: str = "estimator",
            extra: Iterable[Line2D | Patch] = (), band: bool = True,
            diverged_marker: bool = True, markers: bool = False) -> None:
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


def _band(ax: plt.Axes, d: pd.DataFrame, x: str, y: str, colour: object, *, logy: bool,
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


def _draw_curves(ax: plt.Axes, d: pd.DataFrame, x: str, palette: dict[str, tuple], *,
                 by: str | None = None, y: str = "value", logy: bool = False,
                 marker: str | None = None, ls: str = "-") -> None:
    """Mean ± sd over seeds of finished runs; diverged/failed runs thin, dashed, ending in ×.

    The band is mean ± one (sample) standard deviation over the finished runs at each x; on a
    log axis both are taken of log10 values (seaborn's convention for log-scaled axes). With
    ``by`` (e.g. ``epoch``) the x coordinate is itself averaged over seeds at each ``by`` value
    (wall-clock seconds differ between seeds at the same epoch).
    """
    if logy:
        _log(ax, "y")
    d = d[np.isfinite(d[y].astype(float)) & d[x].notna()]
    if logy:
        d = d[d[y] > 0]
    ok = d[d["status"] == "ok"]
    if by is not None and by != x and len(ok):
        ok = ok.assign(**{x: ok.groupby(["estimator_label", by])[x].transform("mean")})
    for lab, grp in ok.groupby("estimator_label", sort=False):
        _band(ax, grp, x, y, palette.get(lab, "0.3"), logy=logy, ls=ls,
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


def _elbo_floor(values: pd.Series, *, k: float = 10.0) -> tuple[float, float] | None:
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


def _cut_outliers(axes: plt.Axes | Iterable[plt.Axes], values: pd.Series | Iterable[pd.Series]
                  ) -> None:
    """Apply ``_elbo_floor`` to axes that share a y axis (one row), from all their values,
    and write "axis cut at …" on each panel that has points below the cut. ``values`` should
    include any reference line, so that it stays in view."""
    axes = [axes] if isinstance(axes, plt.Axes) else list(axes)
    values = [values] if isinstance(values, pd.Series) else list(values)
    limits = _elbo_floor(pd.concat(values)) if values else None
    if limits is None:
        return
    lo, hi = limits
    for ax, v in zip(axes, values, strict=True):
        ax.set_ylim(lo, hi)
        if (v.astype(float) < lo).any():
            ax.text(0.98, 0.02, f"axis cut at {lo:.4g}; lower values off-scale",
                    transform=ax.transAxes, ha="right", va="bottom", fontsize=7, color="0.35")


def _final(d: pd.DataFrame, keys: Iterable[str] = ("run_id",)) -> pd.DataFrame:
    """Rows at each run's last epoch (per ``keys``: e.g. run, split, metric)."""
    if d.empty:
        return d
    keys = list(keys)
    last = d.groupby(keys, dropna=False)["epoch"].transform("max")
    return d[(d["epoch"] == last) | last.isna()]


def _latent_dims(d: pd.DataFrame) -> list:
    return sorted(d["latent_dim"].dropna().unique()) if "latent_dim" in d.columns else []


def _suffix(h: object, dims: list) -> str:
    return f"_H{int(h)}" if len(dims) > 1 else ""


# -- elbo_curves ------------------------------------------------------------------------------
def fig_elbo_curves(res: ExperimentResults) -> Iterator[tuple[str, Figure]]:
    """Train and test ELBO (nats) against epochs and against wall-clock seconds.

    The analogue of Kingma & Welling (2014), Fig. 2: rows = latent dimension H, columns = method.
    Train uses the full-split ``elbo``; without it, the minibatch running mean ``elbo_running``.
    """
    m = res.metrics
    for split in ("train", "test"):
        d = res.metric("elbo", split=split)
        what = "full-split ELBO"
        if d.empty and split == "train":
            d, what = res.metric("elbo_running", split="train"), "running minibatch ELBO"
            if not d.empty:
                log.info("%s: no full-split train elbo; using elbo_running", res.name)
        if d.empty:
            log.info("%s: no %s elbo rows; skipping its curves", res.name, split)
            continue
        for x, xlabel, stem in (("epoch", "epoch", "elbo_vs_epoch"),
                                ("wall_s", "training wall-clock time (seconds)",
                                 "elbo_vs_seconds")):
            if x == "wall_s" and d["wall_s"].isna().all():
                log.info("%s: no wall_s; skipping %s_%s", res.name, stem, split)
                continue
            yield f"{stem}_{split}", _elbo_grid(res, m, d, x, xlabel, split, what)


def _elbo_grid(res: ExperimentResults, m: pd.DataFrame, d: pd.DataFrame, x: str, xlabel: str,
               split: str, what: str) -> Figure:
    dims = _latent_dims(d) or [np.nan]
    methods = _ordered(d["method"], METHOD_ORDER)
    palette = _palette(m["estimator_label"])
    fig, axes = _grid(len(dims), len(methods), sharey="row")
    tally = _Tally()
    for i, h in enumerate(dims):
        row_axes: list = []
        row_values: list = []
        for j, method in enumerate(methods):
            ax = axes[i, j]
            cell = d[(d["method"] == method) & ((d["latent_dim"] == h) | pd.isna(h))]
            t = _facet_tally(res, cell, method=method, latent_dim=h)
            tally.add(res.runs_where(method=method, latent_dim=h), cell)
            ax.set_title(f"{_method_name(method)}, H = {h:g}{t.title_note()}", fontsize=9)
            if cell.empty:
                _empty(ax)
                continue
            _draw_curves(ax, cell, x, palette, by="epoch")
            row_axes.append(ax)
            row_values.append(cell["value"])
            ax.set_xlabel(xlabel)
            ax.set_ylabel(f"{split} ELBO ({ELBO_UNITS})" if j == 0 else "")
        _cut_outliers(row_axes, row_values)
    _bottom_xlabels(axes)
    _suptitle(fig, f"{split.capitalize()} {what} during training")
    _legend(fig, palette, tally)
    return fig


# -- gradient_variance ------------------------------------------------------------------------
def _group_rows(d: pd.DataFrame) -> list[tuple[str, tuple[str, ...], str]]:
    present = set(d["param_group"].dropna())
    return [g for g in GROUP_ROWS if present & set(g[1])]


def _grad_grid(res: ExperimentResults, d: pd.DataFrame, x: str, xlabel: str, ylabel: str,
               title: str, *, logx: bool = False, by: str | None = None,
               reference: bool = False, marker: str | None = None,
               palette: dict | None = None, count_runs: bool = True) -> Figure:
    """Rows = parameter group (λ; Λ or φ; θ), columns = method, log y.

    ``count_runs=False`` for the sweep, whose hue is the estimator measured, not the one that
    trained the run: diverged training runs are then only marked, not counted per label.
    """
    rows = _group_rows(d)
    methods = _ordered(d["method"], METHOD_ORDER)
    palette = palette or _palette(d["estimator_label"])
    fig, axes = _grid(len(rows), len(methods), sharey="row")
    tally = _Tally()
    h = d["latent_dim"].iloc[0] if d["latent_dim"].nunique() == 1 else None
    for i, (_, groups, row_name) in enumerate(rows):
        for j, method in enumerate(methods):
            ax = axes[i, j]
            cell = d[(d["method"] == method) & d["param_group"].isin(groups)]
            keys = {"method": method} | ({} if h is None else {"latent_dim": h})
            t = _facet_tally(res, cell, **keys) if count_runs else _Tally()
            if count_runs:
                tally.add(res.runs_where(**keys), cell)
            group = "/".join(_ordered(cell["param_group"])) or "/".join(groups)
            ax.set_title(f"{_method_name(method)}\n{group} parameters{t.title_note()}",
                         fontsize=9)
            if cell.empty:
                _empty(ax, "no such parameters")
                continue
            if logx:
                _log(ax, "x", base=2 if x == "latent_dim" else 10)
            _draw_curves(ax, cell, x, palette, by=by, logy=True, marker=marker)
            if logx:
                _plain_ticks(ax, d[x])
            if reference:
                _one_over_m(ax, cell[cell["status"] == "ok"], x)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(f"{row_name}\n{ylabel}" if j == 0 else "")
    extra = [Line2D([], [], color="k", ls=":", lw=1.5, label="∝ 1/M reference")] \
        if reference else []
    _bottom_xlabels(axes)
    _suptitle(fig, title)
    _legend(fig, palette, tally, extra=extra, markers=marker is not None)
    return fig


def _one_over_m(ax: plt.Axes, cell: pd.DataFrame, x: str) -> None:
    """A 1/M line through the largest mean variance at the smallest M (the slope to compare)."""
    if cell.empty:
        return
    m0 = cell[x].min()
    at0 = cell[cell[x] == m0].groupby("estimator_label")["value"].mean()
    if at0.empty:
        return
    c = float(at0.max()) * float(m0)
    ms = np.geomspace(float(m0), float(cell[x].max()), 50)
    ax.plot(ms, c / ms, color="k", ls=":", lw=1.5)


def fig_gradient_variance(res: ExperimentResults) -> Iterator[tuple[str, Figure]]:
    """Gradient variance and SNR (SPEC §6; Rainforth et al. 2018) per parameter group.

    Over training (per latent dimension), against latent dimension (last measurement of each
    run), and against the number of MC samples M (``variance_sweep.csv``) with a 1/M reference.
    """
    g = res.metrics[res.metrics["metric"].astype(str).str.startswith("grad_")]
    palette = _palette(pd.concat([g["estimator_label"], *(
        [res.tables["variance_sweep.csv"]["estimator_label"]]
        if "variance_sweep.csv" in res.tables and "estimator_label" in
        res.tables["variance_sweep.csv"].columns else [])]))
    snr = "grad_snr_mean" if (g["metric"] == "grad_snr_mean").any() else "grad_snr_median"
    panels = (("grad_var_total", "grad_variance", "tr Σ, one estimate (nats², log)",
               "Total variance of a single gradient estimate"),
              (snr, "grad_snr", f"{snr.removeprefix('grad_snr_')} SNR |ĝᵢ|/√vᵢ (log)",
               "Signal-to-noise ratio of the gradient (Rainforth et al. 2018)"))
    if g.empty:
        log.info("%s: no grad_* rows in metrics.csv; skipping the over-training and "
                 "latent-dimension figures", res.name)
    else:
        dims = _latent_dims(g)
        for metric, stem, ylabel, title in panels:
            d = g[g["metric"] == metric]
            if d.empty:
                log.info("%s: no %s rows; skipping %s figures", res.name, metric, stem)
                continue
            for h in dims:
                cell = d[d["latent_dim"] == h]
                if cell["epoch"].nunique() > 1:
                    yield (f"{stem}_vs_epoch{_suffix(h, dims)}",
                           _grad_grid(res, cell, "epoch", "epoch", ylabel,
                                      f"{title} over training, H = {h:g}", palette=palette))
            if len(dims) > 1:
                last = _final(d, ["run_id", "param_group"])
                yield (f"{stem}_vs_latent_dim",
                       _grad_grid(res, last, "latent_dim", "latent dimension H (log₂)",
                                  ylabel, f"{title} at the last measurement, by latent "
                                  "dimension", logx=True, marker="o", palette=palette))
    try:
        sweep = res.table("variance_sweep.csv", EXTRA_TABLES["gradient_variance"][
            "variance_sweep.csv"])
    except _Skip as why:
        log.info("%s: %s; skipping variance-vs-n_mc figures", res.name, why)
        return
    sweep, models = _sweep_models(_final_sweep(sweep[sweep["metric"] == "grad_var_total"]))
    dims = _latent_dims(sweep)
    for h in dims:
        cell = sweep[sweep["latent_dim"] == h]
        if cell["n_mc"].nunique() < 2:
            log.info("%s: one n_mc value at H=%g; skipping variance vs n_mc", res.name, h)
            continue
        yield (f"grad_variance_vs_n_mc{_suffix(h, dims)}",
               _grad_grid(res, cell, "n_mc", "MC samples per estimate M (log)",
                          panels[0][2], f"Total gradient variance against M, H = {h:g}, "
                          f"each estimator measured on the same fixed {models}", logx=True,
                          reference=True, marker="o", palette=palette, count_runs=False))
    ratio = variance_ratio(res)
    if ratio is not None and ratio["latent_dim"].nunique() > 0:
        yield "variance_ratio_vs_latent_dim", _ratio_figure(ratio, palette)


def _final_sweep(sweep: pd.DataFrame) -> pd.DataFrame:
    """Each run's last measurement epoch of the sweep."""
    if "epoch" not in sweep.columns or sweep.empty:
        return sweep
    last = sweep.groupby("run_id")["epoch"].transform("max")
    return sweep[sweep["epoch"] == last]


def _sweep_models(sweep: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """The sweep rows measured on models trained with reparam, when the table says which model
    (``trained_with``) and has such models; else every row. Returns (rows, description)."""
    if "trained_with" in sweep.columns and (sweep["trained_with"] == "reparam").any():
        return sweep[sweep["trained_with"] == "reparam"], "models trained with reparam"
    return sweep, "models"


def variance_ratio(res: ExperimentResults) -> pd.DataFrame | None:
    """Variance ratio tr Σ(estimator) / tr Σ(reparam) per method, group, H and M, over seeds.

    Source: ``variance_sweep.csv`` (every estimator measured on the same trained model at the
    run's last sweep epoch; ``trained_with`` says which estimator trained that model), else the
    last ``grad_var_total`` of each run in metrics.csv (``trained_with`` = the run's own
    estimator, so numerator and denominator come from different models). Ratios are taken per
    seed and summarised by mean, sd and the mean of log10; diverged runs excluded.
    """
    cols = ["method", "latent_dim", "seed", "n_mc", "param_group", "estimator_label", "value"]
    if "variance_sweep.csv" in res.tables:
        src, source = res.tables["variance_sweep.csv"], "variance_sweep.csv"
        src = _final_sweep(src[src["metric"] == "grad_var_total"])
    else:
        src, source = _final(res.metric("grad_var_total"), ["run_id", "param_group"]), \
            "metrics.csv"
    if src.empty or not all(c in src.columns for c in cols):
        log.info("%s: no grad_var_total to form the score/reparam ratio", res.name)
        return None
    src = src[src["status"] == "ok"]
    if "trained_with" not in src.columns:
        src = src.assign(trained_with="")
    keys = ["trained_with", "method", "latent_dim", "seed", "n_mc", "param_group"]
    if "dataset" in src.columns:
        keys.insert(0, "dataset")
    per = src.groupby([*keys, "estimator_label"], dropna=False)["value"].mean().reset_index()
    ref = per[per["estimator_label"] == "reparam"].drop(columns="estimator_label")
    if ref.empty:
        log.info("%s: no reparam variance to divide by; no variance ratio", res.name)
        return None
    both = per[per["estimator_label"] != "reparam"].merge(ref, on=keys, suffixes=("", "_ref"))
    both = both[both["value_ref"] > 0]
    both["ratio"] = both["value"] / both["value_ref"]
    both["log10_ratio"] = np.log10(both["ratio"])
    group = [k for k in keys if k != "seed"]
    out = (both.groupby([*group, "estimator_label"], dropna=False)
           .agg(ratio_mean=("ratio", "mean"), ratio_sd=("ratio", "std"),
                log10_ratio_mean=("log10_ratio", "mean"), n_seeds=("ratio", "size"))
           .reset_index().rename(columns={"estimator_label": "estimator"}))
    out.insert(0, "source", source)
    out["reference"] = "reparam"
    rank = {m: i for i, m in enumerate(
        [*METHOD_ORDER, *LABEL_ORDER, *(p for g in GROUP_ROWS for p in g[1])])}
    keys = ["method", "estimator", "param_group"]
    order = out[keys].apply(lambda col: col.map(rank).fillna(len(rank))).rename(
        columns=lambda c: f"_{c}")
    out = (pd.concat([out, order], axis=1)
           .sort_values(["trained_with", *order.columns, *keys, "n_mc", "latent_dim"])
           .drop(columns=order.columns).reset_index(drop=True))
    return out


def _ratio_view(ratio: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """Rows measured on reparam-trained models when there are any (the cleanest comparison)."""
    if (ratio["trained_with"] == "reparam").any():
        return ratio[ratio["trained_with"] == "reparam"], " on models trained with reparam"
    return ratio, ""


def _ratio_markdown(ratio: pd.DataFrame) -> str:
    view, where = _ratio_view(ratio)
    view = view.assign(text=[f"{m:.3g} ± {s:.2g}" if np.isfinite(s) else f"{m:.3g}"
                             for m, s in zip(view["ratio_mean"], view["ratio_sd"], strict=True)])
    index = [c for c in ("dataset", "trained_with") if c in view.columns
             and view[c].nunique() > 1] + ["method", "estimator", "param_group", "n_mc"]
    wide = view.pivot_table(index=index, columns="latent_dim", values="text", aggfunc="first",
                            sort=False)
    wide = wide[sorted(wide.columns)]
    dims = [f"H = {h:g}" for h in wide.columns]
    names = {"dataset": "dataset", "trained_with": "model trained with", "method": "method",
             "estimator": "estimator", "param_group": "parameters", "n_mc": "M"}
    lines = ["| " + " | ".join([*(names[c] for c in index), *dims]) + " |",
             "|" + "---|" * (len(index) + len(dims))]
    for key, row in wide.iterrows():
        keys = [f"{k:g}" if isinstance(k, float | int | np.number) else str(k) for k in key]
        vals = ["—" if pd.isna(v) else str(v) for v in row]
        lines.append("| " + " | ".join([*keys, *vals]) + " |")
    note = (f"Gradient-variance ratio tr Σ(estimator) / tr Σ(reparam){where}, mean ± sd over "
            f"seeds, M samples per estimate (source: {ratio['source'].iloc[0]}).")
    return note + "\n\n" + "\n".join(lines) + "\n"


def _ratio_figure(ratio: pd.DataFrame, palette: dict) -> Figure:
    view, where = _ratio_view(ratio)
    d = view.rename(columns={"estimator": "estimator_label"})
    methods = _ordered(d["method"], METHOD_ORDER)
    groups = _ordered(d["param_group"], [p for g in GROUP_ROWS for p in g[1]])
    fig, axes = _grid(1, len(groups), sharey=True)
    pal = {k: v for k, v in palette.items() if k in set(d["estimator_label"])}
    styles = dict(zip(methods, ("-", "--", ":", "-."), strict=False))
    for j, grp in enumerate(groups):
        ax = axes[0, j]
        _log(ax, "x", base=2)
        _log(ax, "y")
        cell = d[(d["param_group"] == grp) & (d["n_mc"] == d["n_mc"].min())]
        for (method, lab), r in cell.groupby(["method", "estimator_label"]):
            r = r.sort_values("latent_dim")
            ax.errorbar(r["latent_dim"], r["ratio_mean"], yerr=r["ratio_sd"].fillna(0),
                        color=pal.get(lab, "0.3"), ls=styles.get(method, "-"),
                        marker=LABEL_MARKERS.get(lab, "o"),
                        ms=4, capsize=2)
        ax.axhline(1.0, color="0.5", lw=0.8)
        _plain_ticks(ax, d["latent_dim"])
        ax.set_title(f"{grp} parameters, M = {cell['n_mc'].min():g}", fontsize=9)
        ax.set_xlabel("latent dimension H (log₂)")
        ax.set_ylabel("variance ratio to reparam (log)" if j == 0 else "")
    extra = [Line2D([], [], color="0.3", ls=s, label=_method_name(m)) for m, s in styles.items()]
    _suptitle(fig, f"Gradient variance relative to the reparameterization estimator{where}")
    _legend(fig, pal, _Tally(), extra=extra, band=False, markers=True,
            title="estimator (mean ± sd over seeds)")
    return fig


# -- amortization_gap -------------------------------------------------------------------------
GAP_METRICS = (("approximation_gap", "approximation gap\nlog p(x) − L[q*]"),
               ("amortization_gap", "amortization gap\nL[q*] − L[q_φ]"))


def fig_amortization_gap(res: ExperimentResults) -> Iterator[tuple[str, Figure]]:
    """Approximation and amortization gaps (Cremer et al. 2018), train vs test, per dataset.

    Bars: mean ± sd over seeds at each run's last measurement, dots: individual seeds; diverged
    runs have no final gaps and are counted under each method. Over training (when gaps were
    measured at several epochs): log p(x), L[q*], L[q_φ] and both gaps against epoch.
    """
    m = res.metrics
    gaps = res.metric(*(g for g, _ in GAP_METRICS))
    if gaps.empty:
        log.info("%s: no gap rows; skipping gap figures", res.name)
    palette = _palette(m["estimator_label"])
    for dataset in _ordered(gaps["dataset"]):
        d = _final(gaps[gaps["dataset"] == dataset], ["run_id", "split", "metric"])
        yield f"gaps_{dataset}", _gap_bars(res, d, dataset, palette)
    quantities = (("log_px", "log p(x)"), ("elbo_qstar", "L[q*]"), ("elbo_qphi", "L[q_φ]"),
                  *GAP_METRICS)
    for dataset in _ordered(m["dataset"]):
        dm = m[m["dataset"] == dataset]
        lp = "log_px_exact" if (dm["metric"] == "log_px_exact").any() else "iwae"
        dm = dm.assign(metric=dm["metric"].replace({lp: "log_px"}))
        dq = dm[dm["metric"].isin([q for q, _ in quantities])]
        if dq.empty or dq["epoch"].nunique() < 2:
            continue
        for split in _ordered(dq["split"], ("train", "test")):
            ds = dq[dq["split"] == split]
            rows = [(q, name.replace("log p(x)", f"log p(x) [{lp}]")) for q, name in quantities
                    if (ds["metric"] == q).any()]
            methods = _ordered(ds["method"], METHOD_ORDER)
            fig, axes = _grid(len(rows), len(methods), sharey="row", h=2.4)
            tally = _Tally()
            for i, (q, name) in enumerate(rows):
                for j, method in enumerate(methods):
                    ax = axes[i, j]
                    cell = ds[(ds["metric"] == q) & (ds["method"] == method)]
                    t = _facet_tally(res, cell, method=method, dataset=dataset)
                    tally.add(res.runs_where(method=method, dataset=dataset), cell)
                    ax.set_title((f"{_method_name(method)}{t.title_note()}" if i == 0 else ""),
                                 fontsize=9)
                    if cell.empty:
                        _empty(ax)
                        continue
                    _draw_curves(ax, cell, "epoch", palette)
                    ax.set_xlabel("epoch")
                    ax.set_ylabel(f"{name} (nats)" if j == 0 else "")
            _bottom_xlabels(axes)
            _suptitle(fig, f"{dataset}: bounds and gaps over training ({split} split)")
            _legend(fig, palette, tally)
            yield f"bounds_vs_epoch_{dataset}_{split}", fig


def _gap_bars(res: ExperimentResults, d: pd.DataFrame, dataset: str, palette: dict) -> Figure:
    splits = _ordered(d["split"], ("train", "test"))
    methods = _ordered(pd.concat([d["method"], res.runs_where(dataset=dataset)["method"]]),
                       METHOD_ORDER)
    fig, axes = _grid(len(GAP_METRICS), len(splits), sharex=False, sharey="row",
                      w=1.3 + 1.5 * len(methods), h=3.0)
    tally = _Tally().add(res.runs_where(dataset=dataset), d)
    hue_order = [lab for lab in palette if lab in set(d["estimator_label"])]
    for i, (metric, name) in enumerate(GAP_METRICS):
        for j, split in enumerate(splits):
            ax = axes[i, j]
            cell = d[(d["metric"] == metric) & (d["split"] == split)]
            ok = cell[cell["status"] == "ok"]
            if ok.empty:
                _empty(ax, "no finished runs")
            else:
                sns.barplot(data=ok, x="method", y="value", hue="estimator_label", order=methods,
                            hue_order=hue_order, palette=palette, errorbar="sd", ax=ax,
                            legend=False, alpha=0.8, capsize=0.1, err_kws={"linewidth": 1})
                sns.stripplot(data=ok, x="method", y="value", hue="estimator_label",
                              order=methods, hue_order=hue_order, palette=palette, dodge=True,
                              ax=ax, legend=False, size=3, jitter=False, edgecolor="k",
                              linewidth=0.5)
                ax.axhline(0, color="0.3", lw=0.8)
            ticks = []
            for method in methods:
                t = _Tally().add(res.runs_where(dataset=dataset, method=method),
                                 cell[cell["method"] == method])
                n = sum(c["n"] for c in t.counts.values())
                bad = sum(c["diverged"] + c["failed"] for c in t.counts.values())
                ticks.append(_method_name(method).replace(" (", "\n(")
                             + (f"\n{bad}/{n} diverged\n(not in bars)" if bad else ""))
            ax.set_xticks(range(len(methods)), ticks, fontsize=8)
            ax.set_xlabel("")
            ax.set_title(f"{split} split", fontsize=9)
            ax.set_ylabel(f"{name} (nats)" if j == 0 else "")
    _suptitle(fig, f"{dataset}: inference gaps at the end of training (Cremer et al. 2018)")
    _legend(fig, {k: v for k, v in palette.items() if k in hue_order}, tally, band=False,
            diverged_marker=False, title="estimator\n(bar: mean ± sd over seeds; dots: seeds)")
    return fig


# -- ppca_exact --------------------------------------------------------------------------------
def _ppca_targets(res: ExperimentResults, elbo_runs: set) -> tuple[pd.DataFrame, str]:
    """Target ELBO per run and split: the best diagonal-Gaussian ELBO of the closed-form PPCA fit,
    ``log_px_mle − approximation_gap_mle`` (SPEC §5; Tipping & Bishop 1999), or, without those
    rows, the trained decoder's own ceiling ``log_px_exact − approximation_gap``.

    Rows of runs without ELBO curves become targets for every panel of their dataset, latent
    dimension and split. Returns (targets, which pair was used).
    """
    for lp, gap, what in (("log_px_mle", "approximation_gap_mle", "closed-form PPCA MLE"),
                          ("log_px_exact", "approximation_gap", "trained decoder")):
        ex = res.metric(lp, gap)
        if ex.empty:
            continue
        ex = _final(ex, ["run_id", "split", "metric"])
        wide = ex.pivot_table(index=["run_id", "dataset", "latent_dim", "split"],
                              columns="metric", values="value", aggfunc="mean").reset_index()
        if not {lp, gap} <= set(wide.columns):
            continue
        wide["target"] = wide[lp] - wide[gap]
        wide["global"] = ~wide["run_id"].isin(elbo_runs)
        return wide.dropna(subset=["target"]), what
    return pd.DataFrame(), ""


def fig_ppca_exact(res: ExperimentResults) -> Iterator[tuple[str, Figure]]:
    """PPCA: the ELBO against epochs beside its ceiling log p_exact(x) − approximation gap.

    For a linear decoder both terms are closed forms (Tipping & Bishop 1999; SPEC §5): the best
    diagonal-Gaussian ELBO is the exact log-likelihood minus the closed-form approximation gap.
    Panels = method × estimator, hue = split, dotted line = the target (mean over runs).
    """
    e = res.metric("elbo")
    if e.empty:
        raise _Skip("no elbo rows")
    targets, what = _ppca_targets(res, set(e["run_id"]))
    if targets.empty:
        log.info("%s: no log_px_mle/approximation_gap_mle or log_px_exact/approximation_gap "
                 "rows; ELBO curves without a target", res.name)
    dims = _latent_dims(e)
    split_colours = {"train": _COLORBLIND[0], "validation": _COLORBLIND[7],
                     "test": _COLORBLIND[1]}
    for h in dims:
        eh = e[e["latent_dim"] == h]
        methods = _ordered(eh["method"], METHOD_ORDER)
        labels = _ordered(eh["estimator_label"], LABEL_ORDER)
        fig, axes = _grid(len(methods), len(labels), sharey="row", w=3.6, h=2.6)
        for i, method in enumerate(methods):
            row_axes: list = []
            row_values: list = []
            for j, lab in enumerate(labels):
                ax = axes[i, j]
                cell = eh[(eh["method"] == method) & (eh["estimator_label"] == lab)]
                runs = res.runs_where(method=method, latent_dim=h)
                if len(runs):
                    runs = runs[runs["estimator_label"] == lab]
                t = _Tally().add(runs, cell)
                c = t.counts.get(lab, {"n": 0})
                ax.set_title(f"{_method_name(method)}\n{lab}, {c['n']} run(s)"
                             f"{t.title_note()}", fontsize=9)
                if cell.empty:
                    _empty(ax)
                    continue
                pal = {s: split_colours.get(s, "0.3") for s in _ordered(cell["split"],
                                                                        split_colours)}
                _draw_curves(ax, cell.assign(estimator_label=cell["split"]), "epoch", pal)
                if not targets.empty:
                    th = targets[targets["latent_dim"] == h]
                    mine = th[th["run_id"].isin(cell.loc[cell["status"] == "ok", "run_id"])
                              | th["global"]]
                    for split, tv in mine.groupby("split"):
                        ax.axhline(tv["target"].mean(), color=pal.get(split, "0.3"), ls=":",
                                   lw=1.6)
                    mine = mine["target"]
                else:
                    mine = pd.Series(dtype=float)
                row_axes.append(ax)
                row_values.append(pd.concat([cell["value"], mine]))
                ax.set_xlabel("epoch")
                ax.set_ylabel(f"ELBO ({ELBO_UNITS})" if j == 0 else "")
            _cut_outliers(row_axes, row_values)
        splits = _ordered(e["split"], split_colours)
        handles = [Line2D([], [], color=split_colours.get(s, "0.3"), lw=2.5, label=f"{s} ELBO")
                   for s in splits]
        handles.append(Line2D([], [], color="0.3", ls=":", lw=1.6,
                              label=f"target: log p(x) − approx. gap, {what}"))
        if res.metrics["status"].ne("ok").any():
            handles.append(Line2D([], [], color="0.3", lw=0.9, ls="--", marker="x", ms=8, mew=2,
                                  label="diverged run (× = last finite value)"))
        fig.legend(handles=handles, loc="outside right center", frameon=False,
                   title="split (mean ± sd over seeds)")
        _bottom_xlabels(axes)
        _suptitle(fig, f"Linear decoder (PPCA), H = {h:g}: ELBO against its closed-form ceiling")
        yield f"elbo_vs_target{_suffix(h, dims)}", fig


# -- test_time_inference ------------------------------------------------------------------------
INIT_STYLES = {"encoder": ("-", "E-steps from the encoder output"),
               "prior": ("--", "E-steps from the fixed (prior) initialisation"),
               "": ("-", "E-steps")}


def fig_test_time_inference(res: ExperimentResults) -> Iterator[tuple[str, Figure]]:
    """Held-out ELBO against test-time E-steps, and seconds per test point (SPEC §5).

    Columns = methods with curves (several E-step counts); line style = where the E-steps start
    (``param_group`` of the ``test_curve_elbo`` rows: ``encoder`` output or the fixed ``prior``
    initialisation); x = E-steps on a log scale (symlog when 0 is present). Dotted horizontal
    lines: the amortized one-pass ELBO (its curve from the encoder at the fewest steps, else its
    final test ``elbo``) and its seconds per point, per estimator.
    """
    tc = res.metric("test_curve_elbo")
    if tc.empty:
        raise _Skip("no test_curve_elbo rows")
    if (tc["split"] == "test").any():
        tc = tc[tc["split"] == "test"]
    tc = tc.assign(step=tc["step"].astype(float),
                   init=tc["param_group"].fillna("").astype(str))
    curve_methods = [mth for mth in _ordered(tc["method"], METHOD_ORDER)
                     if tc.loc[tc["method"] == mth, "step"].nunique() > 1]
    if not curve_methods:
        raise _Skip("no method has a test_curve_elbo at more than one E-step count")
    palette = _palette(res.metrics["estimator_label"])
    dims = _latent_dims(tc)
    for h in dims:
        th = tc[tc["latent_dim"] == h]
        amort = _amortized_reference(res, th, h)
        inits = _ordered(th["init"], INIT_STYLES)
        fig, axes = _grid(2, len(curve_methods), sharey="row", sharex=True)
        tally = _Tally()
        top_axes: list = []
        top_values: list = []
        for j, method in enumerate(curve_methods):
            cell = th[th["method"] == method]
            t = _facet_tally(res, cell, method=method, latent_dim=h)
            tally.add(res.runs_where(method=method, latent_dim=h), cell)
            for i, (y, ylabel) in enumerate((("value", f"held-out ELBO ({ELBO_UNITS})"),
                                            ("wall_s", "seconds per test point (log)"))):
                ax = axes[i, j]
                if (cell["step"] <= 0).any():
                    ax.set_xscale("symlog", linthresh=1)
                    ax.xaxis.set_minor_locator(NullLocator())
                else:
                    _log(ax, "x")
                if cell["step"].nunique() <= 10:
                    _plain_ticks(ax, cell["step"])
                ax.set_title(f"{_method_name(method)}{t.title_note()}" if i == 0 else "",
                             fontsize=9)
                if cell.empty or cell[y].isna().all():
                    _empty(ax, "no timings" if y == "wall_s" else "no runs")
                    continue
                for init, sub in cell.groupby("init", sort=False):
                    _draw_curves(ax, sub, "step", palette, y=y, logy=(y == "wall_s"),
                                 marker="o", ls=INIT_STYLES.get(init, ("-", ""))[0])
                ref = amort[amort[y].notna()] if y in amort.columns else amort.iloc[:0]
                for lab, r in ref.groupby("estimator_label"):
                    ax.axhline(r[y].mean(), color=palette.get(lab, "0.3"), ls=":", lw=1.4)
                if y == "value":
                    top_axes.append(ax)
                    top_values.append(pd.concat([cell["value"], ref["value"]]))
                ax.set_xlabel("test-time E-steps (log)")
                ax.set_ylabel(ylabel if j == 0 else "")
        extra = [Line2D([], [], color="0.3", ls=INIT_STYLES.get(i, ("-", i))[0], lw=1.5,
                        label=INIT_STYLES.get(i, ("-", f"E-steps from {i}"))[1])
                 for i in inits if len(inits) > 1 or i]
        if len(amort):
            extra.append(Line2D([], [], color="0.3", ls=":", lw=1.4,
                                label="amortized (VAE), one encoder pass"))
        _cut_outliers(top_axes, top_values)
        _bottom_xlabels(axes)
        _suptitle(fig, f"Test-time inference on held-out data, H = {h:g}")
        _legend(fig, palette, tally, extra=extra, markers=True)
        yield f"test_time_inference{_suffix(h, dims)}", fig


def _amortized_reference(res: ExperimentResults, th: pd.DataFrame, h: object) -> pd.DataFrame:
    """Amortized one-pass held-out ELBO per finished run: its test curve from the encoder at the
    fewest E-steps (a curve without ``param_group`` counts as from the encoder), else its final
    test ``elbo``."""
    a = th[(th["method"] == "amortized") & (th["status"] == "ok") & th["init"].isin(
        ["encoder", ""])]
    if len(a):
        return a[a["step"] == a.groupby("run_id")["step"].transform("min")]
    e = res.metric("elbo", split="test")
    e = e[(e["method"] == "amortized") & (e["latent_dim"] == h) & (e["status"] == "ok")]
    return _final(e).assign(wall_s=np.nan)


# -- samples ------------------------------------------------------------------------------------
def _image_shape(img: pd.DataFrame) -> tuple[int, int]:
    """(height, width) from the table's columns, else the square root of the pixel count."""
    n = int(img["pixel"].max()) + 1
    if {"height", "width"} <= set(img.columns) and img["height"].notna().any():
        shape = int(img["height"].dropna().iloc[0]), int(img["width"].dropna().iloc[0])
    else:
        side = round(np.sqrt(n))
        shape = side, side
    if shape[0] * shape[1] != n:
        raise _Skip(f"{n} pixels per image do not make a {shape[0]}×{shape[1]} image")
    return shape


def _mosaic(images: np.ndarray, ncols: int) -> np.ndarray:
    """Tile [n, h, w] images into one array with a 1-pixel NaN gutter (drawn blank)."""
    n, h, w = images.shape
    nrows = -(-n // ncols)
    pad = np.full((nrows * ncols, h + 1, w + 1), np.nan)
    pad[:n, :h, :w] = images
    return (pad.reshape(nrows, ncols, h + 1, w + 1).transpose(0, 2, 1, 3)
            .reshape(nrows * (h + 1), ncols * (w + 1))[:-1, :-1])


def _images(d: pd.DataFrame, shape: tuple[int, int], max_items: int = 10) -> np.ndarray:
    wide = d.pivot_table(index="item", columns="pixel", values="value", aggfunc="mean")
    wide = wide.reindex(columns=range(shape[0] * shape[1])).iloc[:max_items]
    return wide.to_numpy(float).reshape(-1, *shape)


def _first_seed(d: pd.DataFrame) -> pd.DataFrame:
    """The run with the smallest seed per (method, estimator label, latent dim)."""
    keys = [k for k in ("method", "estimator_label", "latent_dim") if k in d.columns]
    first = d.groupby(keys, dropna=False)["seed"].transform("min")
    d = d[d["seed"] == first]
    run = d.groupby(keys, dropna=False)["run_id"].transform("min")
    return d[d["run_id"] == run]


def fig_samples(res: ExperimentResults) -> Iterator[tuple[str, Figure]]:
    """Pictures per method: data, reconstructions, decoder samples; 2-D latent manifold; the
    encoded test set coloured by digit (Kingma & Welling 2014, Figs. 4–5). One seed each."""
    cmap = matplotlib.colormaps["gray_r"].with_extremes(bad="white")
    try:
        img = res.table("images.csv", EXTRA_TABLES["samples"]["images.csv"])
    except _Skip as why:
        log.info("%s: %s; skipping image figures", res.name, why)
        img = None
    if img is not None and not img.empty:
        shape = _image_shape(img)
        orig = img[img["kind"] == "original"]
        vmin, vmax = ((orig["value"].min(), orig["value"].max()) if len(orig)
                      else (img["value"].min(), img["value"].max()))
        if "latent_dim" not in img.columns:
            img = img.assign(latent_dim=np.nan)
        pic = img[img["kind"].isin(["original", "reconstruction", "sample"])]
        dims = _latent_dims(pic) or [np.nan]
        for h in dims:
            ph = pic[(pic["latent_dim"] == h) | pd.isna(h)]
            if ph.empty:
                continue
            yield (f"images{_suffix(h, dims)}",
                   _image_grid(res, _first_seed(ph), shape, vmin, vmax, cmap, h))
        man = img[img["kind"] == "manifold"]
        if man.empty:
            log.info("%s: no manifold images", res.name)
        elif not {"z1", "z2"} <= set(man.columns):
            log.info("%s: images.csv lacks z1/z2; skipping the manifold", res.name)
        else:
            yield "manifold", _manifold(_first_seed(man), shape, vmin, vmax, cmap)
    try:
        lat = res.table("latents.csv", EXTRA_TABLES["samples"]["latents.csv"])
    except _Skip as why:
        log.info("%s: %s; skipping the latent scatter", res.name, why)
        return
    if not lat.empty:
        yield "latent_scatter", _latent_scatter(_first_seed(lat))


def _combos(d: pd.DataFrame) -> list[tuple[str, str]]:
    methods = _ordered(d["method"], METHOD_ORDER)
    labels = _ordered(d["estimator_label"], LABEL_ORDER)
    have = set(zip(d["method"], d["estimator_label"], strict=True))
    return [(m, lab) for m in methods for lab in labels if (m, lab) in have]


def _image_grid(res: ExperimentResults, d: pd.DataFrame, shape: tuple[int, int], vmin: float,
                vmax: float, cmap, h: object) -> Figure:
    kinds = [k for k in ("original", "reconstruction", "sample") if (d["kind"] == k).any()]
    runs = res.runs_where(**({} if pd.isna(h) else {"latent_dim": h}))
    combos = _combos(pd.concat([d[["method", "estimator_label"]],
                                runs[["method", "estimator_label"]]]))
    n_items = int(min(d.groupby(["run_id", "kind"])["item"].nunique().max(), 10))
    ncols = min(n_items, 5)
    aspect = (-(-n_items // ncols) * (shape[0] + 1)) / (ncols * (shape[1] + 1))
    fig, axes = _grid(len(combos), len(kinds), sharex=False, sharey=False, w=2.6,
                      h=2.4 * aspect + 0.45)
    for i, (method, lab) in enumerate(combos):
        cell = d[(d["method"] == method) & (d["estimator_label"] == lab)]
        mine = runs[(runs["method"] == method) & (runs["estimator_label"] == lab)] \
            if len(runs) else runs
        for j, kind in enumerate(kinds):
            ax = axes[i, j]
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(f"{kind}s", fontsize=10)
            if j == 0:
                bad = int(mine["status"].ne("ok").sum()) if len(mine) else 0
                note = f"\n{bad}/{len(mine)} diverged" if bad else ""
                seed = cell["seed"].iloc[0] if len(cell) else None
                ax.set_ylabel(f"{_method_name(method)}\n{lab}"
                              + (f"\nseed {seed:g}" if seed is not None else "") + note,
                              fontsize=8, rotation=0, ha="right", va="center")
            k = cell[cell["kind"] == kind]
            if k.empty:
                status = ", ".join(sorted(set(mine["status"]))) if len(mine) else "absent"
                _empty(ax, f"no images\n(run {status})")
                continue
            ims = _images(k, shape)
            ax.imshow(_mosaic(ims, ncols), cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
            ax.grid(False)
    where = "" if pd.isna(h) else f", H = {h:g}"
    _suptitle(fig, f"Data, reconstructions and decoder samples{where}")
    return fig


def _manifold(d: pd.DataFrame, shape: tuple[int, int], vmin: float, vmax: float,
              cmap) -> Figure:
    """Decoder means on a regular grid of z = (z1, z2), placed at their latent coordinates."""
    combos = _combos(d)
    methods = _ordered(d["method"], METHOD_ORDER)
    labels = _ordered(d["estimator_label"], LABEL_ORDER)
    fig, axes = _grid(len(labels), len(methods), sharex=False, sharey=False, w=3.0, h=3.0)
    for i, lab in enumerate(labels):
        for j, method in enumerate(methods):
            ax = axes[i, j]
            ax.set_title(f"{_method_name(method)}, {lab}", fontsize=9)
            if (method, lab) not in combos:
                _empty(ax)
                continue
            cell = d[(d["method"] == method) & (d["estimator_label"] == lab)]
            coords = cell.groupby("item")[["z1", "z2"]].first()
            z1, z2 = np.sort(coords["z1"].unique()), np.sort(coords["z2"].unique())
            ims = _images(cell, shape, max_items=len(coords))
            items = cell.pivot_table(index="item", columns="pixel", values="value").index
            coords = coords.loc[items]
            col = np.searchsorted(z1, coords["z1"].to_numpy())
            row = len(z2) - 1 - np.searchsorted(z2, coords["z2"].to_numpy())
            grid = np.full((len(z2) * len(z1), *shape), np.nan)
            grid[row * len(z1) + col] = ims
            dz1 = (z1[-1] - z1[0]) / max(len(z1) - 1, 1) or 1.0
            dz2 = (z2[-1] - z2[0]) / max(len(z2) - 1, 1) or 1.0
            ax.imshow(_mosaic(grid, len(z1)), cmap=cmap, vmin=vmin, vmax=vmax,
                      interpolation="nearest", aspect="auto",
                      extent=(z1[0] - dz1 / 2, z1[-1] + dz1 / 2, z2[0] - dz2 / 2,
                              z2[-1] + dz2 / 2))
            ax.grid(False)
            ax.set_xlabel("z₁")
            ax.set_ylabel("z₂")
    _suptitle(fig, "Learned 2-D latent manifold: decoder means over a grid of z")
    return fig


def _latent_scatter(d: pd.DataFrame) -> Figure:
    methods = _ordered(d["method"], METHOD_ORDER)
    labels = _ordered(d["estimator_label"], LABEL_ORDER)
    digits = _ordered(d["label"])
    pal = dict(zip(digits, sns.color_palette("tab10", max(len(digits), 1)), strict=False))
    fig, axes = _grid(len(labels), len(methods), sharex=False, sharey=False, w=3.2, h=3.0)
    for i, lab in enumerate(labels):
        for j, method in enumerate(methods):
            ax = axes[i, j]
            cell = d[(d["method"] == method) & (d["estimator_label"] == lab)]
            seed = f", seed {cell['seed'].iloc[0]:g}" if len(cell) else ""
            ax.set_title(f"{_method_name(method)}, {lab}{seed}", fontsize=9)
            if cell.empty:
                _empty(ax)
                continue
            sns.scatterplot(data=cell, x="z1", y="z2", hue="label", hue_order=digits,
                            palette=pal, s=10, linewidth=0, alpha=0.8, ax=ax, legend=False)
            ax.set_xlabel("posterior mean μ₁")
            ax.set_ylabel("posterior mean μ₂")
    handles = [Line2D([], [], ls="none", marker="o", color=c, label=str(k))
               for k, c in pal.items()]
    fig.legend(handles=handles, title="digit", loc="outside right center", frameon=False)
    _suptitle(fig, "Encoded test set (posterior means, H = 2)")
    return fig


# -- lr_selection ------------------------------------------------------------------------------
SECOND_LR = ("local_lr", "refine_lr")


def fig_lr_selection(res: ExperimentResults) -> Iterator[tuple[str, Figure]]:
    """Validation ELBO at the end of training against the learning rate, per method.

    Lines: mean ± sd over seeds of finished runs; ``×`` on the lower edge: a diverged run at
    that step size (count beside it); star: the step sizes chosen (``selected.csv``). A second
    step size (``local_lr`` for vem, ``refine_lr`` for semi_amortized) that is paired with
    ``lr`` in the candidate grid is written under each lr tick; one that varies independently
    gets its own line style. One figure per dataset (suffix when several).
    """
    if res.runs is None or "lr" not in res.runs.columns:
        raise _Skip("runs.csv with an 'lr' column is needed")
    e = _final(res.metric("elbo", split="validation"))
    vals = e[["run_id", "value"]].drop_duplicates("run_id")
    runs = res.runs.merge(vals, on="run_id", how="left")
    try:
        sel = _add_labels(res.table("selected.csv", EXTRA_TABLES["lr_selection"][
            "selected.csv"]))
    except _Skip as why:
        log.info("%s: %s; no selection marks", res.name, why)
        sel = None
    datasets = _ordered(runs["dataset"])
    for dataset in datasets:
        d = runs[runs["dataset"] == dataset]
        s = None if sel is None else (sel[sel["dataset"] == dataset] if "dataset" in
                                      sel.columns else sel)
        yield (f"lr_selection{'' if len(datasets) == 1 else f'_{dataset}'}",
               _lr_figure(res, d, s, dataset))


def _lr_figure(res: ExperimentResults, d: pd.DataFrame, sel: pd.DataFrame | None,
               dataset: str) -> Figure:
    palette = _palette(d["estimator_label"])
    methods = _ordered(d["method"], METHOD_ORDER)
    fig, axes = _grid(1, len(methods), sharex=False, sharey=True, w=4.0, h=3.4)
    styles = ("-", "--", ":", "-.")
    extra: list = []
    tally = _Tally().add(d)
    for j, method in enumerate(methods):
        ax = axes[0, j]
        _log(ax, "x")
        dm = d[d["method"] == method]
        second = [c for c in SECOND_LR if c in dm.columns and dm[c].nunique() > 1]
        sec = second[0] if second else None
        paired = sec is not None and (dm.groupby("lr")[sec].nunique() <= 1).all()
        levels = _ordered(dm[sec]) if sec and not paired else [None]
        for k, level in enumerate(levels):
            dl = dm if level is None else dm[dm[sec] == level]
            ok = dl[(dl["status"] == "ok") & dl["value"].notna()]
            for lab, grp in ok.groupby("estimator_label", sort=False):
                _band(ax, grp, "lr", "value", palette.get(lab, "0.3"), logy=False,
                      marker=LABEL_MARKERS.get(lab, "o"),
                      ls=styles[k % 4])
            if level is not None:
                extra.append(Line2D([], [], color="0.3", ls=styles[k % 4],
                                    label=f"{_method_name(method)}: {sec} = {level:g}"))
        if paired:
            pairs = dm.groupby("lr")[sec].first()
            ax.set_xticks(pairs.index.to_numpy(float),
                          [f"{lr:g}\n{sec}={v:g}" for lr, v in pairs.items()], fontsize=7)
            ax.xaxis.set_minor_locator(NullLocator())
        elif dm["lr"].nunique() <= 8:
            _plain_ticks(ax, dm["lr"])
        edge = mtransforms.blended_transform_factory(ax.transData, ax.transAxes)
        for (lr, lab), grp in dm[dm["status"] != "ok"].groupby(["lr", "estimator_label"]):
            ax.plot([lr], [0.03], transform=edge, marker="x", ms=9, mew=2, ls="none",
                    color=palette.get(lab, "0.3"), clip_on=False)
            if len(grp) > 1:
                ax.text(lr, 0.07, f"{len(grp)}", transform=edge, fontsize=7, ha="center",
                        color=palette.get(lab, "0.3"))
        if sel is not None:
            for _, r in sel[sel["method"] == method].iterrows():
                y = r.get("validation_elbo", np.nan)
                if pd.isna(y):
                    y = dm.loc[(dm["lr"] == r["lr"]) & (dm["estimator_label"] ==
                                                        r["estimator_label"]), "value"].mean()
                ax.plot([r["lr"]], [y], marker="*", ms=15, mec="k", mew=0.8, ls="none",
                        color=palette.get(r["estimator_label"], "0.3"))
        t = _Tally().add(dm)
        ax.set_title(f"{_method_name(method)}{t.title_note()}", fontsize=9)
        ax.set_xlabel("learning rate (log)")
        ax.set_ylabel(f"validation ELBO ({ELBO_UNITS})" if j == 0 else "")
        if not dm["value"].notna().any():
            _empty(ax, "no finished runs")
    _cut_outliers(axes[0, 0], d.loc[d["status"] == "ok", "value"].dropna())
    if sel is not None and len(sel):
        extra.append(Line2D([], [], ls="none", marker="*", ms=12, mec="k", color="0.7",
                            label="selected step sizes"))
    if tally.bad():
        extra.append(Line2D([], [], ls="none", marker="x", ms=8, mew=2, color="0.3",
                            label="diverged at this lr (count beside ×)"))
    _suptitle(fig, f"{dataset}: step-size selection on the validation split")
    _legend(fig, palette, tally, extra=extra, diverged_marker=False, markers=True)
    return fig


#: experiment → figure functions, each yielding (file stem, figure)
FIGURES: dict[str, tuple[Callable[[ExperimentResults], Iterator[tuple[str, Figure]]], ...]] = {
    "lr_selection": (fig_lr_selection,),
    "elbo_curves": (fig_elbo_curves,),
    "gradient_variance": (fig_gradient_variance,),
    "amortization_gap": (fig_amortization_gap,),
    "ppca_exact": (fig_ppca_exact,),
    "test_time_inference": (fig_test_time_inference,),
    "samples": (fig_samples,),
}


# -- writing ------------------------------------------------------------------------------------
def _atomic(path: Path, write: Callable[[Path], None]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _save(fig: Figure, folder: Path, stem: str) -> list[Path]:
    """PNG (150 dpi) and PDF, atomically; the PDF without a creation date, so reruns match.

    Constrained layout (which keeps the outside legend in the canvas) runs once, for the PNG;
    the PDF reuses the frozen positions, which halves the cost of drawing many log axes.
    """
    png = _atomic(folder / f"{stem}.png", lambda p: fig.savefig(p, format="png", dpi=DPI))
    fig.set_layout_engine("none")
    pdf = _atomic(folder / f"{stem}.pdf",
                  lambda p: fig.savefig(p, format="pdf", metadata={"CreationDate": None}))
    plt.close(fig)
    return [png, pdf]


def _write_tables(res: ExperimentResults) -> list[Path]:
    if res.name != "gradient_variance":
        return []
    ratio = variance_ratio(res)
    if ratio is None:
        return []
    csv = _atomic(res.folder / "variance_ratio.csv",
                  lambda p: ratio.to_csv(p, index=False, float_format="%.6g"))
    md = _atomic(res.folder / "variance_ratio.md",
                 lambda p: p.write_text(_ratio_markdown(ratio), encoding="utf-8"))
    return [csv, md]


def make_figures(results: str | Path, experiments: list[str] | None = None, *,
                 strict: bool = False) -> list[Path]:
    """Validate the CSVs, then draw every figure of every experiment that has results.

    Returns the files written (PNG and PDF per figure; for gradient_variance also
    ``variance_ratio.csv``/``.md``). Raises ``schema.SchemaError`` before drawing anything if a
    CSV breaks the contract. A figure whose inputs are missing is skipped with a logged note; a
    figure that fails unexpectedly is logged with its traceback and the others still drawn,
    unless ``strict`` (tests), which re-raises. When every figure function of an experiment
    ran, PNG/PDF files in its ``figures/`` folder that this call did not write (left from an
    earlier grid or version) are removed, so the folder shows exactly what the CSVs support.
    Output is byte-identical across reruns on the same CSVs and library versions.
    """
    results = Path(results)
    loaded = validate_results(results, experiments)
    written: list[Path] = []
    with sns.axes_style("whitegrid"), sns.plotting_context("paper", font_scale=1.0), \
            plt.rc_context({"figure.max_open_warning": 0}):
        for name, res in loaded.items():
            written += _write_tables(res)
            folder, mine, failed = res.folder / "figures", [], False
            for make in FIGURES[name]:
                try:
                    for stem, fig in make(res):
                        mine += _save(fig, folder, stem)
                except _Skip as why:
                    log.info("%s: skipping %s: %s", name, make.__name__, why)
                except Exception:
                    plt.close("all")
                    if strict:
                        raise
                    failed = True
                    log.error("%s: %s failed; other figures go on\n%s", name, make.__name__,
                              traceback.format_exc())
            if not failed and folder.is_dir():
                for old in sorted(folder.glob("*.p[dn][gf]")):
                    if old.suffix in (".png", ".pdf") and old not in mine:
                        log.info("%s: removing stale %s", name, old)
                        old.unlink()
            log.info("%s: %d figure files in %s", name, len(mine), folder)
            written += mine
    return written
