"""Reading the results CSVs and each experiment's runs with their derived columns (estimator
label, setting, convergence, data seed, final values filled from metrics.csv)."""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import numpy as np
import pandas as pd

from experiments import schema
from experiments.summary.quantities import _NOT_SETTINGS, CELL, EXCLUDED
from experiments.vocabulary import estimator_label, experiment_order


def read_csv(path: Path) -> pd.DataFrame | None:
    """A results CSV as a DataFrame, or None when it is missing or unreadable."""
    path = schema.stored(path)
    if not path.is_file():
        return None
    with contextlib.suppress(schema.SchemaError):  # the estimators' declarations, for labels
        schema.read_contract(path.parent)  # (a malformed one is reported by check)
    try:
        if schema.table_name(path) == "metrics.csv":
            return schema.read_metrics(path, validate=False)
        return pd.read_csv(path, dtype={"run_id": str, "param_group": str, "baseline": str,
                                        "grad_baseline": str})
    except (OSError, ValueError, UnicodeDecodeError, pd.errors.ParserError,
            pd.errors.EmptyDataError):
        return None


def experiments_present(results: str | Path) -> list[str]:
    """Experiment folders under ``results`` holding a runs.csv or metrics.csv, in
    the grids' order (``experiments.vocabulary.experiment_order``) then alphabetically, without
    ``EXCLUDED``."""
    results = Path(results)
    names = {p.parent.name for pat in ("*/runs.csv", "*/metrics.csv", "*/metrics.csv.gz")
             for p in results.glob(pat)} - set(EXCLUDED)
    return experiment_order(names)


def _value_text(v) -> str:
    """A configuration value as text: ``—`` when empty, whole floats without ``.0``."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    if isinstance(v, float | np.floating) and float(v).is_integer():
        return str(int(v))
    return str(v)


def _settings(runs: pd.DataFrame) -> pd.Series:
    """Each run's training setting: the configuration columns that vary inside a cell (the
    identity keys without the seed) besides seeds and step sizes, as ``name=value, …``."""
    keys = [c for c in CELL if c not in ("setting", "experiment")]
    config = [c for c in runs.columns if "." in c and c not in _NOT_SETTINGS
              and not c.rsplit(".", 1)[-1].endswith("lr") and not c.endswith("seed")]
    if not config or runs.empty:
        return pd.Series("default", index=runs.index)
    text = runs[config].apply(lambda col: col.map(_value_text))
    grouped = text.assign(**{k: runs[k].astype(str) for k in keys}).groupby(keys, dropna=False)
    counts = grouped[config].nunique().gt(1).any()
    varying = [c for c in config if counts[c]]
    if not varying:
        return pd.Series("default", index=runs.index)
    return pd.Series([", ".join(f"{c}={v}" for c, v in zip(varying, row, strict=True))
                      for row in text[varying].itertuples(index=False)], index=runs.index)


def _from_metrics(metrics: pd.DataFrame) -> pd.DataFrame:
    """Runs described by metrics.csv alone (no runs.csv): identity, status ``ok``."""
    ident = [c for c in schema.IDENTITY_COLUMNS if c in metrics.columns]
    return metrics[ident].drop_duplicates("run_id").assign(status="ok").reset_index(drop=True)


def _final_from_metrics(metrics: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """``final_<metric>_<split>`` per run from metrics.csv: the value at the run's best epoch
    where runs.csv records it, else at its last epoch; plus ``seconds_per_epoch`` =
    ``wall_s / epoch`` at the last ELBO row (cumulative training seconds)."""
    plain = metrics[metrics["param_group"].isna()]
    if plain.empty:
        return pd.DataFrame({"run_id": pd.Series(dtype=str)})
    best = runs.set_index("run_id")["best_epoch"] if "best_epoch" in runs else None
    if best is not None:
        b = plain["run_id"].map(best)
        has = plain.assign(_b=b)[plain["epoch"] == b].groupby(["run_id", "metric", "split"])
        at_best = has.tail(1)
    else:
        at_best = plain.iloc[0:0]
    last = plain[plain["epoch"] == plain.groupby("run_id")["epoch"].transform("max")]
    rows = pd.concat([at_best, last]).drop_duplicates(["run_id", "metric", "split"])
    wide = rows.pivot_table(index="run_id", columns=["metric", "split"], values="value",
                            aggfunc="last")
    wide.columns = [f"final_{m}_{s}" for m, s in wide.columns]
    timed = plain[plain["metric"].isin(["elbo", "elbo_running"]) & (plain["epoch"] > 0)
                  & plain["wall_s"].notna()]
    if len(timed):
        t = timed.sort_values(["run_id", "epoch"], kind="stable").groupby("run_id").tail(1)
        sec = pd.Series((t["wall_s"] / t["epoch"]).to_numpy(dtype=float),
                        index=pd.Index(t["run_id"]), name="seconds_per_epoch")
        wide = wide.join(sec, how="outer")
    return wide.rename_axis("run_id").reset_index()


def load_runs(results: str | Path, experiment: str) -> pd.DataFrame | None:
    """One experiment's runs (runs.csv, else the runs of metrics.csv) with derived columns:
    ``estimator_label``, ``baseline`` (``none`` where empty), ``setting``, ``conv``
    (True/False/NaN), ``convergence`` (text), ``data_seed`` (``data.seed``, else the seed), and
    every ``final_<metric>_<split>`` / ``seconds_per_epoch`` that runs.csv lacks filled from
    metrics.csv. None when the experiment has neither CSV."""
    folder = Path(results) / experiment
    runs = read_csv(folder / "runs.csv")
    metrics = read_csv(folder / "metrics.csv")
    if runs is None and metrics is None:
        return None
    if runs is None:
        runs = _from_metrics(metrics)
    if "run_id" not in runs.columns:
        return None
    # a runs.csv has hundreds of columns: copy once so the columns added below do not
    # fragment the frame
    runs = runs.drop_duplicates("run_id").reset_index(drop=True).copy()
    for col in ("experiment", "dataset", "method", "estimator", "kl", "status"):
        if col not in runs.columns:
            runs[col] = experiment if col == "experiment" else ("ok" if col == "status"
                                                                else np.nan)
    for col in ("baseline", "n_mc", "latent_dim", "seed"):
        if col not in runs.columns:
            runs[col] = np.nan
    runs["baseline"] = runs["baseline"].astype(object).where(runs["baseline"].notna(), "none")
    runs["estimator_label"] = [estimator_label(e, b) for e, b in
                               zip(runs["estimator"], runs["baseline"], strict=True)]
    if metrics is not None and len(metrics):
        fin = _final_from_metrics(metrics, runs)
        fin = fin[fin["run_id"].isin(runs["run_id"])].set_index("run_id")
        idx = runs.set_index("run_id").index
        new = {}
        for col in fin.columns:
            filler = fin[col].reindex(idx).to_numpy()
            if col in runs.columns:
                runs[col] = runs[col].where(runs[col].notna(), filler)
            else:
                new[col] = filler
        if new:  # added at once, not column by column
            runs = pd.concat([runs, pd.DataFrame(new, index=runs.index)], axis=1)
    runs["conv"] = schema.as_bool(runs["converged"]) if "converged" in runs else np.nan
    runs["convergence"] = runs["conv"].map({True: "converged", False: "not converged"}
                                           ).fillna("unknown")
    seed = runs["data.seed"] if "data.seed" in runs else pd.Series(np.nan, index=runs.index)
    runs["data_seed"] = pd.to_numeric(seed, errors="coerce").fillna(
        pd.to_numeric(runs["seed"], errors="coerce"))
    runs["setting"] = _settings(runs)
    return runs.copy()
