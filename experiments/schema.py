"""The results contract (docs/results.md): column names, metric names and their validation.

Imports only numpy and pandas, so the figure maker and ``check`` run without torch.

``metrics.csv`` is tidy: one measurement a row, columns ``METRIC_COLUMNS``. Columns that do not
apply are empty (NaN in pandas), never a sentinel number. Wall-clock time lives only in
``wall_s`` so that two runs of one configuration agree on every other column bit for bit.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

__all__ = [
    "BPD_METRICS",
    "IDENTITY_COLUMNS",
    "METRICS",
    "METRIC_COLUMNS",
    "PARAM_GROUPS",
    "PROBES",
    "RUN_COLUMNS",
    "SPLITS",
    "STATUSES",
    "STOP_REASONS",
    "TABLE_COLUMNS",
    "SchemaError",
    "as_bool",
    "read_metrics",
    "read_runs",
    "validate_metrics",
    "validate_runs",
]

IDENTITY_COLUMNS = (
    "run_id", "experiment", "dataset", "method", "estimator", "baseline", "kl",
    "latent_dim", "n_mc", "seed",
)
METRIC_COLUMNS = (*IDENTITY_COLUMNS, "epoch", "step", "wall_s", "split", "param_group",
                  "metric", "value")

#: metric name → what it measures (units); the only names a metrics.csv may contain. The trainer
#: writes the first three, the probes (``vi.probes``, by name in ``PROBES``) the rest; a test
#: pins this list to theirs (this module stays torch-free).
METRICS: dict[str, str] = {
    "elbo": "ELBO per data point of the method's own posterior, full split (nats)",
    "elbo_running": "running mean of the minibatch ELBO estimates over a training epoch (nats)",
    "e_steps": "E-steps the held-out fit took before the stopping rule fired (count)",
    "iwae": "IWAE estimate of log p(x) with the defensive proposal built on q* (nats)",
    "log_px_exact": "exact log p(x) of a linear decoder (nats)",
    "log_px_mle": "exact log p(x) under the closed-form PPCA maximum-likelihood fit of the "
                  "training split (nats)",
    "approximation_gap_mle": "closed-form approximation gap of the best diagonal q at the PPCA "
                             "maximum-likelihood decoder (nats)",
    "elbo_qstar": "ELBO of the per-datapoint optimum q* on the trained decoder (nats)",
    "elbo_qphi": "ELBO of the method's own posterior, evaluated like L[q*] (nats)",
    "approximation_gap": "log p(x) − L[q*] (nats)",
    "amortization_gap": "L[q*] − L[q_φ] (nats)",
    "qstar_steps": "optimisation steps taken to fit q* (count)",
    "iwae_ess_min": "smallest effective sample size of the IWAE weights over the points",
    "iwae_low_ess_points": "points whose IWAE effective sample size is below low_ess · k",
    "test_curve_elbo": "held-out ELBO after `step` E-steps of test-time inference (nats)",
    "grad_var_total": "total variance tr Σ of a single gradient estimate",
    "grad_var_relative": "tr Σ / ||mean gradient||²",
    "grad_snr_mean": "mean over coordinates of |ĝ_i| / sqrt(v_i)",
    "grad_snr_median": "median over coordinates of |ĝ_i| / sqrt(v_i)",
    "grad_mean_norm": "||mean gradient||",
    "active_units": "latent dimensions with Cov_x(E_q[z_h]) above the threshold (count)",
    "kl_total": "KL(q(z | x) ‖ p(z)) averaged over the points (nats)",
}
#: the probes a grid may name (``vi.probes.PROBES``; pinned by a test)
PROBES = ("gradvar", "gaps", "test_curve", "exact", "activity", "images", "latents",
          "variance_sweep")
STATUSES = ("ok", "diverged", "failed")
STOP_REASONS = ("plateau", "max_epochs", "budget", "diverged")
SPLITS = ("train", "validation", "test")
PARAM_GROUPS = ("variational", "local", "encoder", "decoder", "prior")  # prior/encoder:
# also the start of a test-time curve (``test_curve`` probe)
#: columns every runs.csv row has (configuration columns, dotted, follow)
RUN_COLUMNS = (*IDENTITY_COLUMNS, "status", "message", "stop_reason", "converged",
               "epochs_run", "best_epoch", "git_commit", "git_dirty", "torch_version",
               "python_version", "device", "started", "finished")
#: columns each per-run table must have (more may follow), by table name
TABLE_COLUMNS: dict[str, tuple[str, ...]] = {
    "images": (*IDENTITY_COLUMNS, "epoch", "kind", "index", "label", "z1", "z2", "height",
               "width"),
    "latents": (*IDENTITY_COLUMNS, "epoch", "point", "label", "mu1", "logvar1"),
    "variance_sweep": (*IDENTITY_COLUMNS, "epoch", "param_group", "grad_estimator",
                       "grad_baseline", "grad_kl", "grad_n_mc", "draws", "metric", "value"),
    "gaps": (*IDENTITY_COLUMNS, "epoch", "split", "point", "log_px_iwae", "iwae_ess",
             "iwae_low_ess", "elbo_qstar", "elbo_qphi", "approximation_gap",
             "amortization_gap"),
    "activity": (*IDENTITY_COLUMNS, "epoch", "split", "dim", "kl_per_dim", "activity", "active"),
    "selected": ("dataset", "method", "estimator", "baseline", "metric", "split", "score",
                 "n_seeds", "n_diverged", "interior", "at_cap", "unstable", "unconverged",
                 "shared_from"),
    "candidates": ("dataset", "method", "estimator", "baseline", "score", "n_seeds",
                   "n_diverged", "unstable", "unconverged", "rank", "round"),
}
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


def read_metrics(path: str | Path, *, validate: bool = True) -> pd.DataFrame:
    """Read a metrics.csv with the contract's dtypes (strings stay strings; empty → NaN)."""
    path = Path(path)
    if not path.is_file():
        raise SchemaError(f"{path}: no such file")
    try:
        df = pd.read_csv(path, dtype={"run_id": str, "param_group": str, "baseline": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise SchemaError(f"{path}: not a readable CSV ({err})") from err
    if validate:
        validate_metrics(df, str(path))
    return df


def read_runs(path: str | Path, *, validate: bool = True) -> pd.DataFrame:
    """Read a runs.csv (one row per run)."""
    path = Path(path)
    if not path.is_file():
        raise SchemaError(f"{path}: no such file")
    try:
        df = pd.read_csv(path, dtype={"run_id": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise SchemaError(f"{path}: not a readable CSV ({err})") from err
    if validate:
        validate_runs(df, str(path))
    return df
