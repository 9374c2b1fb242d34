"""The study's summary table: ``results/summary.csv`` and its Markdown form (issue 6).

One row per dataset × method × estimator (with baseline) × latent dimension H. Sources:

- ``elbo_curves``: final test ELBO (metric ``elbo``, split ``test``, each run's last epoch) and
  seconds per epoch (``wall_s / epoch`` at each run's last ``elbo``/``elbo_running`` row; wall_s
  is the cumulative training time, SPEC §7);
- ``amortization_gap``: IWAE log-likelihood (``iwae``), exact log p(x) where the decoder is
  linear (``log_px_exact``), approximation and amortization gaps (Cremer et al. 2018), all on the
  test split at each run's last measurement.

Each quantity is mean ± standard deviation (ddof = 1) over the seeds of the runs that finished
(status ``ok``); diverged and failed runs are not averaged but counted (``n_diverged``,
``n_failed``, over the runs of both source experiments). Reads CSVs only (never torch).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from experiments import schema
from experiments.figures.style import LABEL_ORDER, METHOD_ORDER, estimator_label

__all__ = ["QUANTITIES", "summary_markdown", "summary_table", "write_summary"]

GROUP = ["dataset", "method", "estimator", "baseline", "estimator_label", "latent_dim"]
#: column stem → (experiment, metric(s), split, heading in the Markdown table)
QUANTITIES: dict[str, tuple[str, tuple[str, ...], str, str]] = {
    "test_elbo": ("elbo_curves", ("elbo",), "test", "test ELBO (nats)"),
    "test_iwae": ("amortization_gap", ("iwae",), "test", "IWAE log p(x) (nats)"),
    "test_log_px_exact": ("amortization_gap", ("log_px_exact",), "test", "exact log p(x) (nats)"),
    "test_approximation_gap": ("amortization_gap", ("approximation_gap",), "test",
                               "approx. gap (nats)"),
    "test_amortization_gap": ("amortization_gap", ("amortization_gap",), "test",
                              "amort. gap (nats)"),
    "seconds_per_epoch": ("elbo_curves", ("elbo", "elbo_running"), "", "s / epoch"),
}
SOURCES = ("elbo_curves", "amortization_gap")


def _labelled(df: pd.DataFrame) -> pd.DataFrame:
    df = df.copy()
    df["baseline"] = df["baseline"].astype(object).where(df["baseline"].notna(), "none")
    df["estimator_label"] = [estimator_label(e, b) for e, b in
                             zip(df["estimator"], df["baseline"], strict=True)]
    return df


def _load(results: Path, name: str) -> tuple[pd.DataFrame | None, pd.DataFrame | None]:
    folder = results / name
    metrics = runs = None
    if (folder / "metrics.csv").is_file():
        metrics = _labelled(schema.read_metrics(folder / "metrics.csv"))
    if (folder / "runs.csv").is_file():
        runs = _labelled(schema.read_runs(folder / "runs.csv"))
    if metrics is not None:
        status = (metrics["run_id"].map(runs.set_index("run_id")["status"])
                  if runs is not None else pd.Series(np.nan, index=metrics.index))
        metrics["status"] = status.fillna("ok")
    return metrics, runs


def _per_run(metrics: pd.DataFrame, stem: str) -> pd.DataFrame:
    """One value per finished run: the quantity at the run's last epoch."""
    _, names, split, _ = QUANTITIES[stem]
    d = metrics[metrics["metric"].isin(names) & (metrics["status"] == "ok")]
    if split:
        d = d[d["split"] == split]
    if stem == "seconds_per_epoch":
        d = d[(d["epoch"] > 0) & d["wall_s"].notna()]
        d = d.assign(value=d["wall_s"] / d["epoch"])
    if d.empty:
        return pd.DataFrame(columns=[*GROUP, "run_id", "value"])
    last = d.groupby("run_id")["epoch"].transform("max")
    d = d[d["epoch"] == last]
    return d.groupby([*GROUP, "run_id"], dropna=False)["value"].mean().reset_index()


def _counts(frames: Iterable[tuple[pd.DataFrame | None, pd.DataFrame | None]]) -> pd.DataFrame:
    """Runs per group by status: runs.csv where present, else the run_ids in metrics.csv."""
    ids = []
    for metrics, runs in frames:
        if runs is not None:
            ids.append(runs[[*GROUP, "run_id", "status"]])
        if metrics is not None:
            ids.append(metrics[[*GROUP, "run_id", "status"]])
    if not ids:
        return pd.DataFrame(columns=[*GROUP, "n_runs", "n_ok", "n_diverged", "n_failed"])
    ids = pd.concat(ids).drop_duplicates("run_id")
    flags = ids.assign(n_runs=1, n_ok=ids["status"].eq("ok").astype(int),
                       n_diverged=ids["status"].eq("diverged").astype(int),
                       n_failed=ids["status"].eq("failed").astype(int))
    return (flags.groupby(GROUP, dropna=False)[["n_runs", "n_ok", "n_diverged", "n_failed"]]
            .sum().reset_index())


def summary_table(results: str | Path) -> pd.DataFrame:
    """The summary as a DataFrame (see the module docstring for sources and statistics).

    Columns: the group keys, ``n_mc`` (the values seen), ``n_runs``, ``n_ok``, ``n_diverged``,
    ``n_failed``, then for each quantity ``<q>_mean``, ``<q>_sd`` and ``<q>_n`` (seeds
    averaged).
    """
    results = Path(results)
    loaded = {name: _load(results, name) for name in SOURCES}
    table = _counts(loaded.values())
    n_mc = pd.concat([m[[*GROUP, "n_mc"]] for m, _ in loaded.values() if m is not None]
                     or [pd.DataFrame(columns=[*GROUP, "n_mc"])])
    if len(n_mc):
        n_mc = (n_mc.dropna(subset=["n_mc"]).groupby(GROUP, dropna=False)["n_mc"]
                .agg(lambda s: ",".join(str(int(v)) for v in sorted(set(s)))).reset_index())
        table = table.merge(n_mc, on=GROUP, how="left")
    else:
        table["n_mc"] = pd.Series(dtype=object)
    for stem, (source, *_rest) in QUANTITIES.items():
        metrics = loaded[source][0]
        per = _per_run(metrics, stem) if metrics is not None else pd.DataFrame()
        if per.empty:
            for suffix in ("mean", "sd"):
                table[f"{stem}_{suffix}"] = np.nan
            table[f"{stem}_n"] = 0
            continue
        agg = (per.groupby(GROUP, dropna=False)["value"]
               .agg(**{f"{stem}_mean": "mean", f"{stem}_sd": "std", f"{stem}_n": "size"})
               .reset_index())
        table = table.merge(agg, on=GROUP, how="left")
        table[f"{stem}_n"] = table[f"{stem}_n"].fillna(0).astype(int)
    method_rank = {m: i for i, m in enumerate(METHOD_ORDER)}
    label_rank = {m: i for i, m in enumerate(LABEL_ORDER)}
    table = table.assign(
        _m=table["method"].map(method_rank).fillna(len(method_rank)),
        _l=table["estimator_label"].map(label_rank).fillna(len(label_rank)))
    table = (table.sort_values(["dataset", "_m", "method", "_l", "estimator_label",
                                "latent_dim"])
             .drop(columns=["_m", "_l"]).reset_index(drop=True))
    front = [*GROUP, "n_mc", "n_runs", "n_ok", "n_diverged", "n_failed"]
    return table[front + [c for c in table.columns if c not in front]]


def write_summary(results: str | Path) -> Path:
    """Write ``results/summary.csv`` atomically and return its path."""
    results = Path(results)
    table = summary_table(results)
    path = results / "summary.csv"
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        table.to_csv(tmp, index=False, float_format="%.6g")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _cell(mean: float, sd: float, n: int, digits: int) -> str:
    if not n or pd.isna(mean):
        return "—"
    if n < 2 or pd.isna(sd):
        return f"{mean:.{digits}f} (1 seed)".replace("-", "−")
    return f"{mean:.{digits}f} ± {sd:.{digits}f}".replace("-", "−")


def summary_markdown(results: str | Path) -> str:
    """The summary as a Markdown table (mean ± sd over seeds; diverged runs counted)."""
    table = summary_table(results)
    stems = [s for s in QUANTITIES if s != "test_log_px_exact"
             or table[f"{s}_n"].gt(0).any()]
    head = ["dataset", "method", "estimator", "H",
            *(QUANTITIES[s][3] for s in stems), "runs", "diverged"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, r in table.iterrows():
        cells = [str(r["dataset"]), str(r["method"]), str(r["estimator_label"]),
                 f"{r['latent_dim']:g}"]
        for s in stems:
            digits = 3 if s == "seconds_per_epoch" else 2
            cells.append(_cell(r[f"{s}_mean"], r[f"{s}_sd"], int(r[f"{s}_n"]), digits))
        cells.append(str(int(r["n_runs"])))
        bad = f"{int(r['n_diverged'])}/{int(r['n_runs'])}"
        if r["n_failed"]:
            bad += f" (+{int(r['n_failed'])} failed)"
        cells.append(bad)
        lines.append("| " + " | ".join(cells) + " |")
    note = ("Mean ± standard deviation over seeds of the runs that finished; diverged and failed "
            "runs are counted, not averaged. Test ELBO and seconds per epoch (cumulative "
            "training wall-clock time / epochs) from `elbo_curves`; IWAE log p(x) and the "
            "approximation and amortization gaps (test split) from `amortization_gap`. "
            "H = latent dimension; runs counted over both experiments.")
    return note + "\n\n" + "\n".join(lines) + "\n"
