"""The results contract (docs/results.md): column names, metric names and their validation.

Imports only numpy, pandas and the standard-library ``vi.contract`` (the metric names, tables
and columns the library writes), so the figure maker and ``check`` run without torch.

``metrics.csv`` is tidy: one measurement a row, columns ``METRIC_COLUMNS``. Columns that do not
apply are empty (NaN in pandas), never a sentinel number. Wall-clock time lives only in
``wall_s`` so that two runs of one configuration agree on every other column bit for bit.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from vi import contract
from vi.contract import IDENTITY_COLUMNS, METRIC_COLUMNS

__all__ = [
    "BPD_METRICS",
    "CONTRACT_FILE",
    "EXPERIMENT_TABLES",
    "GZIP_ABOVE",
    "IDENTITY_COLUMNS",
    "METRICS",
    "METRIC_COLUMNS",
    "PARAM_GROUPS",
    "PLAIN_TABLES",
    "PROBES",
    "RUN_COLUMNS",
    "SPLITS",
    "STATUSES",
    "STOP_REASONS",
    "TABLE_COLUMNS",
    "SchemaError",
    "as_bool",
    "read_contract",
    "read_metrics",
    "read_runs",
    "stored",
    "table_name",
    "validate_metrics",
    "validate_runs",
]

#: what the trainer and the probes may write: metric names with their descriptions, per-run
#: tables with their columns, and the probes a grid may name (live views of ``vi.contract``, so
#: a probe declared by any imported module, or recorded beside the results read, is known here)
METRICS = contract.METRICS
PROBES = contract.PROBES
#: the declarations an experiment's runs used (``vi.contract.record``), beside its CSVs
CONTRACT_FILE = "contract.json"
STATUSES = ("ok", "diverged", "failed")
STOP_REASONS = ("plateau", "max_epochs", "budget", "diverged")
SPLITS = ("train", "validation", "test")
PARAM_GROUPS = ("variational", "local", "encoder", "decoder", "prior")  # prior/encoder:
# also the start of a test-time curve (``test_curve`` probe)
#: columns every runs.csv row has (configuration columns, dotted, follow)
RUN_COLUMNS = (*IDENTITY_COLUMNS, "status", "message", "stop_reason", "converged",
               "epochs_run", "best_epoch", "git_commit", "git_dirty", "torch_version",
               "python_version", "device", "started", "finished")
#: tables an experiment (not a probe) writes, with the columns they must have
EXPERIMENT_TABLES: dict[str, tuple[str, ...]] = {
    "selected": ("dataset", "method", "estimator", "baseline", "metric", "split", "score",
                 "n_seeds", "n_diverged", "interior", "at_cap", "unstable", "unconverged",
                 "shared_from"),
    "candidates": ("dataset", "method", "estimator", "baseline", "score", "n_seeds",
                   "n_diverged", "unstable", "unconverged", "rank", "round"),
}


#: an experiment's table whose CSV text exceeds this many bytes is published gzipped, as
#: ``<name>.csv.gz`` (pandas reads it directly); runs.csv and the selection's tables never are
GZIP_ABOVE = 1_000_000
PLAIN_TABLES = ("runs", "selected", "candidates")


def stored(path: str | Path) -> Path:
    """Where a published table named ``<name>.csv`` is stored: the file itself, else its gzipped
    form ``<name>.csv.gz`` when only that exists (the path unchanged when neither does)."""
    path = Path(path)
    if path.suffix == ".csv" and not path.exists():
        packed = path.with_name(path.name + ".gz")
        if packed.exists():
            return packed
    return path


def table_name(path: str | Path) -> str:
    """A published table's CSV name, whether stored plain or gzipped (``metrics.csv``)."""
    name = Path(path).name
    return name[:-3] if name.endswith(".csv.gz") else name


class _TableColumns(Mapping):
    """Table name → the columns it must have (more may follow): the experiments' own tables
    and every per-run table the contract declares (identity columns first)."""

    def __getitem__(self, name: str) -> tuple[str, ...]:
        if name in EXPERIMENT_TABLES:
            return EXPERIMENT_TABLES[name]
        return contract.table_columns(name)

    def __iter__(self) -> Iterator[str]:
        return iter([*contract.TABLES, *(t for t in EXPERIMENT_TABLES
                                         if t not in contract.TABLES)])

    def __len__(self) -> int:
        return len(list(iter(self)))


TABLE_COLUMNS: Mapping[str, tuple[str, ...]] = _TableColumns()

#: bits per dimension of the discrete data sets (dequantization bound), by metric
BPD_METRICS = ("elbo", "iwae", "log_px_exact")
_REQUIRED_NONEMPTY = ("run_id", "experiment", "dataset", "method", "estimator", "metric",
                      "value", "split")


class SchemaError(ValueError):
    """A results CSV that breaks the contract; the message lists every problem found."""


def _problems_metrics(df: pd.DataFrame, where: str) -> list[str]:
    problems = []
    missing = [c for c in METRIC_COLUMNS if c not in df.columns]
    if missing:
        return [f"{where}: missing column(s) {', '.join(missing)}"]
    extra = [c for c in df.columns if c not in METRIC_COLUMNS]
    if extra:
        problems.append(f"{where}: unexpected column(s) {', '.join(extra)}")
    for col in _REQUIRED_NONEMPTY:
        empty = df[col].isna() | (df[col].astype(str).str.strip() == "")
        if empty.any():
            rows = (df.index[empty][:5] + 2).tolist()  # +2: header line, 1-based lines
            problems.append(f"{where}: empty {col!r} on line(s) {rows}")
    values = pd.to_numeric(df["value"], errors="coerce").to_numpy(dtype=float)
    bad = ~np.isfinite(values)  # NaN (empty or non-numeric) or ±inf
    if bad.any():
        problems.append(f"{where}: non-finite or non-numeric value on line(s) "
                        f"{(df.index[bad][:5] + 2).tolist()}")
    unknown = sorted(set(df["metric"].dropna()) - set(METRICS))
    if unknown:
        problems.append(f"{where}: unknown metric name(s) {unknown}; valid: {', '.join(METRICS)}")
    unknown = sorted(set(df["split"].dropna()) - set(SPLITS))
    if unknown:
        problems.append(f"{where}: unknown split(s) {unknown}; valid: {', '.join(SPLITS)}")
    unknown = sorted(set(df["param_group"].dropna()) - set(PARAM_GROUPS))
    if unknown:
        problems.append(f"{where}: unknown param_group(s) {unknown}")
    return problems


def validate_metrics(df: pd.DataFrame, where: str = "metrics.csv") -> None:
    """Raise ``SchemaError`` listing every way ``df`` breaks the metrics contract."""
    problems = _problems_metrics(df, where)
    if problems:
        raise SchemaError("\n".join(problems))


def validate_runs(df: pd.DataFrame, where: str = "runs.csv") -> None:
    """Raise ``SchemaError`` if a runs table lacks columns, has unknown statuses or repeats."""
    problems = []
    missing = [c for c in RUN_COLUMNS if c not in df.columns]
    if missing:
        problems.append(f"{where}: missing column(s) {', '.join(missing)}")
    else:
        bad = sorted(set(df["status"].dropna()) - set(STATUSES)) + (
            ["<empty>"] if df["status"].isna().any() else [])
        if bad:
            problems.append(f"{where}: unknown status(es) {bad}; valid: {', '.join(STATUSES)}")
        if "outcome" in df:  # vi.contract.OUTCOMES (runs.csv written before it: no column)
            bad = sorted(set(df["outcome"].dropna().astype(str)) - set(contract.OUTCOMES))
            if bad:
                problems.append(f"{where}: unknown outcome(s) {bad}; valid: "
                                f"{', '.join(contract.OUTCOMES)}")
        dup = df["run_id"][df["run_id"].duplicated()].tolist()
        if dup:
            problems.append(f"{where}: repeated run_id(s) {dup[:5]}")
    if problems:
        raise SchemaError("\n".join(problems))


def as_bool(values: pd.Series) -> pd.Series:
    """A flag column as read back from a CSV (``converged``, ``unstable``, …: ``True``/``False``,
    bool or text) as an object column of True, False and NaN (missing or unreadable)."""
    text = values.astype(str).str.strip().str.lower()
    out = pd.Series(np.nan, index=values.index, dtype=object)
    out[text.isin(["true", "1", "1.0"])] = True
    out[text.isin(["false", "0", "0.0"])] = False
    return out


def read_contract(folder: str | Path) -> dict[str, dict]:
    """The declarations recorded beside an experiment's CSVs (``contract.json``, written when
    its runs were aggregated), learnt by this process (``vi.contract.adopt``): the metrics and
    tables of a probe, and the baselines of an estimator, defined in a module this process never
    imported. Empty parts when there is none (results written before it existed know only the
    built-in contract); ``SchemaError`` for an unreadable or malformed one."""
    path = Path(folder) / CONTRACT_FILE
    if not path.is_file():
        return {"metrics": {}, "tables": {}, "estimators": {}}
    try:
        return contract.adopt(json.loads(path.read_text()), str(path))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise SchemaError(f"{path}: unreadable ({type(err).__name__}: {err})") from err
    except contract.ContractError as err:
        raise SchemaError(str(err)) from err


def read_metrics(path: str | Path, *, validate: bool = True) -> pd.DataFrame:
    """Read a metrics.csv with the contract's dtypes (strings stay strings; empty → NaN), after
    learning the declarations recorded beside it (``read_contract``)."""
    path = stored(path)
    if not path.is_file():
        raise SchemaError(f"{path}: no such file")
    try:
        read_contract(path.parent)
    except SchemaError:
        if validate:
            raise
    try:
        df = pd.read_csv(path, dtype={"run_id": str, "param_group": str, "baseline": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise SchemaError(f"{path}: not a readable CSV ({err})") from err
    if validate:
        validate_metrics(df, str(path))
    return df


def read_runs(path: str | Path, *, validate: bool = True) -> pd.DataFrame:
    """Read a runs.csv (one row per run), after learning the declarations recorded beside it
    (``read_contract``)."""
    path = stored(path)
    if not path.is_file():
        raise SchemaError(f"{path}: no such file")
    try:
        read_contract(path.parent)
    except SchemaError:
        if validate:
            raise
    try:
        df = pd.read_csv(path, dtype={"run_id": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise SchemaError(f"{path}: not a readable CSV ({err})") from err
    if validate:
        validate_runs(df, str(path))
    return df
