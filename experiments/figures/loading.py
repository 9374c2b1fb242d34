"""Reading and validating an experiment's CSVs, and selecting rows from them.

``validate_results`` reads every table the figures will use (``metrics.csv``, ``runs.csv`` and
the extra tables each figure module registers), checks them against ``experiments.schema`` and
raises ``schema.SchemaError`` listing every problem before anything is drawn. Each table comes
back as an ``ExperimentResults`` with an ``estimator_label`` and a ``status`` column, and with
the runner's layouts mapped onto the long names the figures use (``_normalise``).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from experiments import schema
from experiments.figures import registry
from experiments.figures.style import estimator_label

__all__ = [
    "RUNNER_NAMES",
    "ExperimentResults",
    "SkipFigure",
    "add_labels",
    "dim_suffix",
    "final_rows",
    "latent_dims",
    "load_experiment",
    "validate_results",
]

log = logging.getLogger(__name__)

#: per table, the runner's name of a column that ``_normalise`` renames (for messages)
RUNNER_NAMES = {
    "images.csv": {"item": "index", "pixel": "p00…", "value": "p00…"},
    "latents.csv": {"z1": "mu1", "z2": "mu2"},
    "variance_sweep.csv": {"estimator": "grad_estimator", "baseline": "grad_baseline",
                           "n_mc": "grad_n_mc"},
}


class SkipFigure(Exception):
    """A figure that cannot be drawn from the results at hand (logged, not raised)."""


def add_labels(df: pd.DataFrame) -> pd.DataFrame:
    """A copy with ``baseline`` filled (``none``) and an ``estimator_label`` column."""
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
        """An extra table (e.g. ``variance_sweep.csv``); ``SkipFigure`` naming what is missing."""
        if filename not in self.tables:
            raise SkipFigure(f"{self.folder / filename} not found")
        df = self.tables[filename]
        missing = [c for c in columns if c not in df.columns]
        if missing:
            alias = RUNNER_NAMES.get(filename, {})
            names = [f"{c} ({alias[c]})" if c in alias else c for c in missing]
            raise SkipFigure(f"{self.folder / filename} lacks column(s) {', '.join(names)}")
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
        """Rows of metrics.csv for the named metrics (and ``split``, when given)."""
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
    for filename, columns in registry.input_tables(name).items():
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
    res = ExperimentResults(name, folder, add_labels(metrics),
                            None if runs is None else add_labels(runs), {})
    res.metrics["status"] = res.status_of(res.metrics["run_id"])
    for filename, df in tables.items():
        if "estimator" in df.columns:
            df = add_labels(df)
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
    known = registry.registered()
    names = list(known if experiments is None else experiments)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown experiment(s) {unknown}; valid: {', '.join(known)}")
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


# -- selecting rows ---------------------------------------------------------------------------
def final_rows(d: pd.DataFrame, keys: Iterable[str] = ("run_id",)) -> pd.DataFrame:
    """Rows at each run's last epoch (per ``keys``: e.g. run, split, metric)."""
    if d.empty:
        return d
    keys = list(keys)
    last = d.groupby(keys, dropna=False)["epoch"].transform("max")
    return d[(d["epoch"] == last) | last.isna()]


def latent_dims(d: pd.DataFrame) -> list:
    """The latent dimensions H present, ascending (none without a ``latent_dim`` column)."""
    return sorted(d["latent_dim"].dropna().unique()) if "latent_dim" in d.columns else []


def dim_suffix(h: object, dims: list) -> str:
    """File-stem suffix ``_H<h>``, only when the experiment has several latent dimensions."""
    return f"_H{int(h)}" if len(dims) > 1 else ""
