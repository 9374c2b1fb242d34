"""Reading and validating an experiment's CSVs, and selecting rows from them.

``validate_results`` reads every table the figures will use (``metrics.csv``, ``runs.csv``, the
extra tables each figure module registers and ``results/references.csv``), checks them against
``experiments.schema`` and raises ``schema.SchemaError`` listing every problem before anything
is drawn. Each table comes back in an ``ExperimentResults`` with the columns the runner wrote
(nothing renamed) plus ``estimator_label``, ``status`` and ``converged`` (from runs.csv).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from experiments import schema
from experiments.figures import registry
from experiments.figures.style import estimator_label

__all__ = [
    "REFERENCE_COLUMNS",
    "ExperimentResults",
    "SkipFigure",
    "add_labels",
    "at_best",
    "custom_experiments",
    "dim_suffix",
    "final_rows",
    "latent_dims",
    "load_experiment",
    "validate_results",
]

log = logging.getLogger(__name__)

#: the columns of ``results/references.csv`` the reference lines need
REFERENCE_COLUMNS = ("dataset", "data_seed", "model", "latent_dim", "split", "log_px")


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
    """One experiment's validated tables, each with ``estimator_label``, ``status`` and
    ``converged`` columns, and the study's reference models (``references``, or None)."""

    name: str
    folder: Path
    metrics: pd.DataFrame
    runs: pd.DataFrame | None
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    references: pd.DataFrame | None = None

    def table(self, filename: str, columns: Iterable[str] = ()) -> pd.DataFrame:
        """An extra table (e.g. ``variance_sweep.csv``); ``SkipFigure`` naming what is missing."""
        if filename not in self.tables:
            raise SkipFigure(f"{self.folder / filename} not found")
        df = self.tables[filename]
        missing = [c for c in columns if c not in df.columns]
        if missing:
            raise SkipFigure(f"{self.folder / filename} lacks column(s) {', '.join(missing)}")
        return df

    def _from_runs(self, run_ids: pd.Series, column: str, default: object) -> pd.Series:
        if self.runs is None or column not in self.runs.columns:
            return pd.Series(default, index=run_ids.index, dtype=object)
        values = run_ids.map(self.runs.drop_duplicates("run_id").set_index("run_id")[column])
        return values.astype(object).where(values.notna(), default)

    def status_of(self, run_ids: pd.Series) -> pd.Series:
        """Status from runs.csv; a run absent from it counts as ``ok`` (noted once)."""
        status = self._from_runs(run_ids, "status", None)
        if self.runs is not None and status.isna().any():
            log.info("%s: %d run_id(s) in the tables are not in runs.csv; counted as ok",
                     self.name, run_ids[status.isna()].nunique())
        return status.fillna("ok")

    def runs_where(self, **keys: object) -> pd.DataFrame:
        """Rows of runs.csv matching identity keys (empty frame when there is no runs.csv)."""
        if self.runs is None:
            return pd.DataFrame(columns=["run_id", "estimator_label", "status", "converged"])
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


def _read_csv(path: Path) -> pd.DataFrame:
    try:
        return pd.read_csv(path, dtype={"run_id": str, "baseline": str, "param_group": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise schema.SchemaError(f"{path}: not a readable CSV ({err})") from err


def _table_problems(path: Path, df: pd.DataFrame, columns: tuple[str, ...]) -> list[str]:
    problems = []
    if "value" in columns and "value" in df.columns:
        bad = ~np.isfinite(pd.to_numeric(df["value"], errors="coerce").to_numpy(float))
        if bad.any():
            problems.append(f"{path}: non-finite or non-numeric value on line(s) "
                            f"{(df.index[bad][:5] + 2).tolist()}")
    if "metric" in df.columns:
        unknown = sorted(set(df["metric"].dropna()) - set(schema.METRICS))
        if unknown:
            problems.append(f"{path}: unknown metric name(s) {unknown}")
    return problems


def _references(results: Path) -> tuple[pd.DataFrame | None, list[str]]:
    path = results / "references.csv"
    if not path.is_file():
        return None, []
    try:
        df = _read_csv(path)
    except schema.SchemaError as err:
        return None, [str(err)]
    missing = [c for c in REFERENCE_COLUMNS if c not in df.columns]
    if missing:
        return None, [f"{path}: missing column(s) {', '.join(missing)}"]
    return df, []


def _load(results: Path, name: str, references: pd.DataFrame | None
          ) -> tuple[ExperimentResults | None, list[str]]:
    folder = results / name
    problems: list[str] = []
    if not folder.is_dir():
        return None, problems
    metrics = runs = None
    if schema.stored(folder / "metrics.csv").is_file():
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
        path = schema.stored(folder / filename)
        if path.is_file():
            try:
                df = _read_csv(path)
            except schema.SchemaError as err:
                problems.append(str(err))
                continue
            problems += _table_problems(path, df, columns)
            tables[filename] = df
    if problems or (metrics is None and runs is None and not tables):
        return None, problems
    if metrics is None:
        log.info("%s: no metrics.csv; drawing what the other tables allow", folder)
        metrics = pd.DataFrame({c: pd.Series(dtype=object) for c in schema.METRIC_COLUMNS})
    if runs is not None:
        runs = add_labels(runs)
        runs["converged"] = schema.as_bool(runs["converged"]) if "converged" in runs.columns \
            else np.nan
    res = ExperimentResults(name, folder, add_labels(metrics), runs, {}, references)
    frames = {"metrics": res.metrics, **tables}
    for key, df in frames.items():
        if "estimator" in df.columns and "estimator_label" not in df.columns:
            df = add_labels(df)
        if "run_id" in df.columns:
            df["status"] = res.status_of(df["run_id"])
            df["converged"] = res._from_runs(df["run_id"], "converged", np.nan)
        if key == "metrics":
            res.metrics = df
        else:
            res.tables[key] = df
    return res, problems


def custom_experiments(results: str | Path) -> list[str]:
    """The experiments under ``results`` without a figure module of their own (custom grids):
    folders holding a ``runs.csv`` or ``metrics.csv``, by name."""
    results = Path(results)
    if not results.is_dir():
        return []
    known = registry.registered()
    return sorted(p.name for p in results.iterdir() if p.is_dir() and p.name not in known
                  and ((p / "runs.csv").is_file() or (p / "metrics.csv").is_file()))


def validate_results(results: str | Path, experiments: Iterable[str] | None = None
                     ) -> dict[str, ExperimentResults]:
    """Read and validate every CSV of the named experiments (default: every registered one,
    then ``custom_experiments``, which get the generic figures).

    Raises ``schema.SchemaError`` listing every problem of every file (each names its path)
    before anything is drawn. Returns the experiments that have results.
    """
    results = Path(results)
    known = registry.registered()
    custom = custom_experiments(results)
    names = list([*known, *custom] if experiments is None else experiments)
    unknown = [n for n in names if n not in known and n not in custom]
    if unknown:
        raise ValueError(f"unknown experiment(s) {unknown}; valid: {', '.join(known)} and the "
                         f"folders of {results} holding a runs.csv or metrics.csv")
    references, problems = _references(results)
    loaded = {}
    for name in names:
        res, found = _load(results, name, references)
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


def at_best(res: ExperimentResults, d: pd.DataFrame,
            keys: Iterable[str] = ("run_id",)) -> pd.DataFrame:
    """Rows at each run's best (restored) epoch from runs.csv; per ``keys`` group without a
    row at that epoch (or a run without a best epoch), its last rows instead."""
    if d.empty:
        return d
    keys = list(keys)
    best = pd.Series(np.nan, index=d.index)
    if res.runs is not None and "best_epoch" in res.runs.columns:
        best = d["run_id"].map(res.runs.drop_duplicates("run_id")
                               .set_index("run_id")["best_epoch"])
    hit = d["epoch"] == best
    has = hit.groupby([d[k] for k in keys], dropna=False).transform("any")
    return pd.concat([d[hit], final_rows(d[~has], keys)]).sort_index()


def latent_dims(d: pd.DataFrame) -> list:
    """The latent dimensions H present, ascending (none without a ``latent_dim`` column)."""
    return sorted(d["latent_dim"].dropna().unique()) if "latent_dim" in d.columns else []


def dim_suffix(h: object, dims: list) -> str:
    """File-stem suffix ``_H<h>``, only when the experiment has several latent dimensions."""
    return f"_H{int(h)}" if len(dims) > 1 else ""
