"""The study's summary table: ``results/summary.csv`` and its Markdown form.

One row per experiment × dataset × method × estimator (label, with ``kl`` and ``n_mc``) ×
latent dimension H × training setting × convergence. Nothing is ever averaged across
experiments or across training settings:

- ``setting`` names the configuration columns (dotted, from ``runs.csv``) that vary *within* one
  experiment × dataset × method × estimator × H cell besides the seed and the step sizes, with
  their values, e.g. ``method.e_steps=20, method.e_tol=—`` in ``vem_e_steps`` or
  ``method.refine_steps=5`` in ``refinement``; ``default`` where nothing varies. A column that
  varies only between cells (``training.batch_size`` for ppca) is already fixed by the keys.
- ``convergence``: finished runs (status ``ok``) that stopped at a plateau (``converged`` true in
  ``runs.csv``) and those that ran out of epochs or budget are **separate rows** (``converged`` /
  ``not converged``; ``unknown`` where runs.csv does not say); diverged and failed runs are
  never averaged. The counts ``n_runs``, ``n_ok``, ``n_diverged``, ``n_failed``,
  ``n_not_converged`` describe the whole cell and repeat on each of its rows; a cell without a
  finished run keeps one row (``convergence`` = ``none finished``) with its counts.
- ``lr_selection`` is left out: its runs differ in step size, the quantity it selects.

Quantities (per run first, then over the seeds of a row). Each column stem names its split:

=============================  ================================================================
``<split>_elbo``               ``final_elbo_<split>`` of runs.csv: the ELBO of the method's own
                               posterior at the best (restored) epoch, over all ``n_<split>``
                               points; ``_bpd`` in bits/dim for quantized (image) data
``<split>_iwae``,              the ``gaps`` table (Cremer et al. 2018): per-point log p(x) (IWAE,
``<split>_log_px_exact``,      or exact for a linear decoder), L[q*], L[q_φ], approximation gap
``<split>_elbo_qstar``,        log p(x) − L[q*], amortization gap L[q*] − L[q_φ]; mean over the
``<split>_elbo_qphi``,         table's points (``_points`` = their number) at the run's last
``<split>_approximation_gap``, measurement; without a gaps table, the run's final value of that
``<split>_amortization_gap``   metric over the whole split (closed forms of ``ppca_exact``)
``<split>_log_px_mle``,        the PPCA maximum-likelihood fit of the training split (closed
``<split>_approximation_gap_   form, ``ppca_exact``)
mle``
``<split>_ref_no_latent``,     ``references.csv``: exact log p(x) of the no-latent Gaussian, of
``<split>_ref_factor_          factor analysis and (for the ppca data only) of PPCA at the row's
analysis``, ``<split>_ref_     H, fitted on the training split of each run's own data seed
ppca``
``<split>_elbo_minus_fa``      per run ``<split>_elbo`` − factor analysis at the same H and data
                               seed (same points), then averaged: > 0 means the model's bound
                               beats factor analysis's exact log-likelihood
``test_active_units``          active units (Burda et al. 2016) at the best epoch, test split
``test_kl_total``, ``test_     KL(q ‖ p) per point; E-steps of the held-out fit (test split)
e_steps``
``seconds_per_epoch``          training seconds / epochs run (runs.csv; else from ``wall_s``)
``epochs_run``                 epochs trained before stopping
=============================  ================================================================

For each quantity ``<q>``: ``<q>_mean``, ``<q>_sd`` (ddof 1), ``<q>_n`` (seeds averaged),
``<q>_ci_low``/``<q>_ci_high`` (95 % Student-t interval mean ± t_{0.975, n−1} · sd / √n, from
``scipy.stats.t``; empty for n < 2) and ``<q>_points`` (data points behind each run's value;
the smallest over the row's runs). Quantities that no row measures are left out, except a core
set that is always present. Reads CSVs only (pandas, numpy, scipy.stats; never torch).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from experiments import schema

try:  # the figures' order and names; the summary must not fail with the figure package
    from experiments.figures.style import LABEL_ORDER, METHOD_ORDER, estimator_label
except Exception:  # pragma: no cover - a broken figure package must not stop the summary
    METHOD_ORDER = ("vem", "amortized", "semi_amortized", "sa_vae")
    LABEL_ORDER = ("reparam", "stl", "score+none", "score+mean", "score+loo", "score+cv")

    def estimator_label(estimator: object, baseline: object) -> str:
        """``estimator`` alone for pathwise estimators without a baseline, else
        ``estimator+baseline`` (the figures' labels)."""
        b = "" if baseline is None or pd.isna(baseline) else str(baseline).strip()
        if str(estimator) == "score" or (b and b != "none"):
            return f"{estimator}+{b or 'none'}"
        return str(estimator)

__all__ = [
    "CELL",
    "EXCLUDED",
    "EXPERIMENT_ORDER",
    "QUANTITIES",
    "Interval",
    "bits_per_dim",
    "experiments_present",
    "load_runs",
    "read_csv",
    "run_values",
    "summary_markdown",
    "summary_table",
    "t_interval",
    "write_summary",
]

#: experiments in the order the summary lists them (others follow alphabetically)
EXPERIMENT_ORDER = ("elbo_curves", "gradient_variance", "amortization_gap", "ppca_exact",
                    "refinement", "vem_e_steps", "mnist_curves")
#: experiments whose runs are not comparable rows (step-size candidates)
EXCLUDED = ("lr_selection",)
#: the keys of a summary cell (``setting`` and ``convergence`` complete a row)
CELL = ["experiment", "dataset", "method", "estimator", "baseline", "estimator_label", "kl",
        "n_mc", "latent_dim", "setting"]
_METHOD_ORDER = (*METHOD_ORDER, *(m for m in ("sa_vae",) if m not in METHOD_ORDER))
#: configuration columns that never define a setting: identity duplicates and seeds
_NOT_SETTINGS = {"data.name", "method.name", "method.estimator", "method.baseline", "method.kl",
                 "method.n_mc", "model.latent_dim", "data.seed", "data.path"}
_SPLITS = ("train", "test")
_GAP_COLUMNS = {"iwae": "log_px_iwae", "log_px_exact": "log_px_exact",
                "elbo_qstar": "elbo_qstar", "elbo_qphi": "elbo_qphi",
                "approximation_gap": "approximation_gap", "amortization_gap": "amortization_gap"}
_BPD_STEMS = ("elbo", "iwae", "log_px_exact", "ref_no_latent", "ref_factor_analysis")


@dataclass(frozen=True)
class Quantity:
    """A summary column stem: its split, where its per-run value comes from, its heading."""

    split: str
    source: str
    heading: str
    core: bool = False


def _quantities() -> dict[str, Quantity]:
    q: dict[str, Quantity] = {}
    for s in _SPLITS:
        q[f"{s}_elbo"] = Quantity(s, f"runs.csv final_elbo_{s}", f"{s} ELBO", True)
        q[f"{s}_elbo_bpd"] = Quantity(s, f"runs.csv final_elbo_{s}, bits/dim",
                                      f"{s} ELBO (bits/dim)")
        for stem, head in (("iwae", "IWAE log p(x)"), ("log_px_exact", "exact log p(x)"),
                           ("elbo_qstar", "L[q*]"), ("elbo_qphi", "L[q_φ]"),
                           ("approximation_gap", "approx. gap"),
                           ("amortization_gap", "amort. gap")):
            q[f"{s}_{stem}"] = Quantity(s, f"gaps.csv {_GAP_COLUMNS[stem]} ({s})",
                                        f"{s} {head}", s == "test" or stem == "amortization_gap")
        q[f"{s}_iwae_bpd"] = Quantity(s, "gaps.csv log_px_iwae, bits/dim",
                                      f"{s} IWAE (bits/dim)")
        q[f"{s}_log_px_mle"] = Quantity(s, f"runs.csv final_log_px_mle_{s}",
                                        f"{s} PPCA-MLE log p(x)")
        q[f"{s}_approximation_gap_mle"] = Quantity(s, f"runs.csv final_approximation_gap_mle_{s}",
                                                   f"{s} PPCA-MLE approx. gap")
        for ref, head in (("no_latent", "no-latent"), ("factor_analysis", "FA"),
                          ("ppca", "PPCA")):
            q[f"{s}_ref_{ref}"] = Quantity(s, f"references.csv {ref} ({s})",
                                           f"{s} {head} log p(x)", ref == "factor_analysis")
        for ref, head in (("no_latent", "no-latent"), ("factor_analysis", "FA")):
            q[f"{s}_ref_{ref}_bpd"] = Quantity(s, f"references.csv {ref} ({s}), bits/dim",
                                               f"{s} {head} (bits/dim)")
        q[f"{s}_elbo_minus_fa"] = Quantity(s, f"runs.csv final_elbo_{s} − references.csv "
                                              f"factor_analysis ({s})", f"{s} ELBO − FA", True)
    q["test_active_units"] = Quantity("test", "runs.csv final_active_units_test",
                                      "active units", True)
    q["test_kl_total"] = Quantity("test", "runs.csv final_kl_total_test", "KL(q‖p)")
    q["test_e_steps"] = Quantity("test", "runs.csv final_e_steps_test", "held-out E-steps")
    q["seconds_per_epoch"] = Quantity("train", "runs.csv seconds_per_epoch", "s / epoch", True)
    q["epochs_run"] = Quantity("train", "runs.csv epochs_run", "epochs")
    return q


#: column stem → (split, source, heading, always present)
QUANTITIES: dict[str, Quantity] = _quantities()


# ------------------------------------------------------------------------------- statistics


@dataclass(frozen=True)
class Interval:
    """Mean, standard deviation (ddof 1), count and 95 % Student-t interval of some values."""

    mean: float
    sd: float
    n: int
    lo: float
    hi: float

    @property
    def defined(self) -> bool:
        """True when the interval exists (n ≥ 2 finite values)."""
        return self.n >= 2 and math.isfinite(self.lo) and math.isfinite(self.hi)


def t_interval(values, level: float = 0.95) -> Interval:
    """Mean ± t_{(1+level)/2, n−1} · sd / √n over the finite ``values`` (NaN bounds if n < 2).

    With seeds as the units this is the usual interval for a mean over independent runs; for
    paired designs pass the per-seed differences."""
    x = np.asarray(pd.to_numeric(pd.Series(values, dtype=object), errors="coerce"), dtype=float)
    x = x[np.isfinite(x)]
    n = int(x.size)
    if n == 0:
        return Interval(math.nan, math.nan, 0, math.nan, math.nan)
    mean = float(x.mean())
    if n < 2:
        return Interval(mean, math.nan, 1, math.nan, math.nan)
    sd = float(x.std(ddof=1))
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
    return Interval(mean, sd, n, mean - half, mean + half)


def bits_per_dim(nats, data_dim, levels):
    """Bits per dimension of quantized data: −(L − D ln K) / (D ln 2) for a log-density L per
    point in nats, D dimensions and K levels (the dequantization bound); NaN without D or K."""
    nats = np.asarray(nats, dtype=float)
    d = np.asarray(pd.to_numeric(pd.Series(np.atleast_1d(data_dim)), errors="coerce"), float)
    k = np.asarray(pd.to_numeric(pd.Series(np.atleast_1d(levels)), errors="coerce"), float)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = -(nats - d * np.log(k)) / (d * np.log(2.0))
    return out if out.ndim else float(out)


# ---------------------------------------------------------------------------------- reading


def read_csv(path: Path) -> pd.DataFrame | None:
    """A results CSV as a DataFrame, or None when it is missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        if path.name == "metrics.csv":
            return schema.read_metrics(path, validate=False)
        return pd.read_csv(path, dtype={"run_id": str, "param_group": str, "baseline": str,
                                        "grad_baseline": str})
    except (OSError, ValueError, UnicodeDecodeError, pd.errors.ParserError,
            pd.errors.EmptyDataError):
        return None


def experiments_present(results: str | Path) -> list[str]:
    """Experiment folders under ``results`` holding a runs.csv or metrics.csv, in
    ``EXPERIMENT_ORDER`` then alphabetically, without ``EXCLUDED``."""
    results = Path(results)
    names = {p.parent.name for pat in ("*/runs.csv", "*/metrics.csv")
             for p in results.glob(pat)} - set(EXCLUDED)
    return [e for e in EXPERIMENT_ORDER if e in names] + sorted(names - set(EXPERIMENT_ORDER))


def _converged(values: pd.Series) -> pd.Series:
    """runs.csv ``converged`` as True / False / NaN (missing or unreadable)."""
    text = values.astype(str).str.strip().str.lower()
    out = pd.Series(np.nan, index=values.index, dtype=object)
    out[text.isin(["true", "1", "1.0"])] = True
    out[text.isin(["false", "0", "0.0"])] = False
    return out


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
    runs = runs.drop_duplicates("run_id").reset_index(drop=True)
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
        for col in fin.columns:
            filler = fin[col].reindex(idx).to_numpy()
            if col in runs.columns:
                runs[col] = runs[col].where(runs[col].notna(), filler)
            else:
                runs[col] = filler
    runs["conv"] = _converged(runs["converged"]) if "converged" in runs else np.nan
    runs["convergence"] = runs["conv"].map({True: "converged", False: "not converged"}
                                           ).fillna("unknown")
    seed = runs["data.seed"] if "data.seed" in runs else pd.Series(np.nan, index=runs.index)
    runs["data_seed"] = pd.to_numeric(seed, errors="coerce").fillna(
        pd.to_numeric(runs["seed"], errors="coerce"))
    runs["setting"] = _settings(runs)
    return runs.copy()


# ----------------------------------------------------------------------------- run values


def _gap_values(results: Path, experiment: str, runs: pd.DataFrame) -> pd.DataFrame:
    """Per run and split: the gaps table's per-point columns averaged over its points at the
    run's last measurement, with the number of points."""
    gaps = read_csv(results / experiment / "gaps.csv")
    if gaps is None or gaps.empty or "run_id" not in gaps or "split" not in gaps:
        return pd.DataFrame(columns=["run_id", "quantity", "value", "points"])
    if "epoch" in gaps:
        gaps = gaps[gaps["epoch"] == gaps.groupby(["run_id", "split"])["epoch"].transform("max")]
    rows = []
    info = runs.set_index("run_id")
    for (rid, split), part in gaps.groupby(["run_id", "split"]):
        for stem, col in _GAP_COLUMNS.items():
            if col not in part:
                continue
            v = pd.to_numeric(part[col], errors="coerce")
            if not v.notna().any():
                continue
            rows.append((rid, f"{split}_{stem}", float(v.mean()), int(v.notna().sum())))
            if stem == "iwae" and rid in info.index:
                r = info.loc[rid]
                rows.append((rid, f"{split}_iwae_bpd",
                             bits_per_dim(float(v.mean()), r.get("data_dim"), r.get("levels")),
                             int(v.notna().sum())))
    return pd.DataFrame(rows, columns=["run_id", "quantity", "value", "points"])


def _references(results: Path) -> pd.DataFrame | None:
    ref = read_csv(results / "references.csv")
    if ref is None or ref.empty or not {"dataset", "model", "split", "log_px"} <= set(ref):
        return None
    if "data_seed" not in ref:
        ref["data_seed"] = np.nan
    return ref


def _reference_values(ref: pd.DataFrame | None, runs: pd.DataFrame) -> pd.DataFrame:
    """Per run: the reference log p(x) of its data set, data seed (and split fractions where
    both tables record them) and, for factor analysis and PPCA, its H, on each split."""
    cols = ["run_id", "quantity", "value", "points"]
    if ref is None or runs.empty:
        return pd.DataFrame(columns=cols)
    ref = ref.assign(data_seed=pd.to_numeric(ref["data_seed"], errors="coerce"),
                     latent_dim=pd.to_numeric(ref.get("latent_dim"), errors="coerce"),
                     n_points=ref.get("n_points", np.nan),
                     log_px_bpd=ref.get("log_px_bpd", np.nan))
    r = pd.DataFrame({"run_id": runs["run_id"], "dataset": runs["dataset"],
                      "data_seed": pd.to_numeric(runs["data_seed"], errors="coerce"),
                      "latent_dim": pd.to_numeric(runs["latent_dim"], errors="coerce")})
    keys = ["dataset", "data_seed"]
    for c in ("test_fraction", "validation_fraction"):
        if c in ref and f"data.{c}" in runs:
            ref[c] = pd.to_numeric(ref[c], errors="coerce").round(9)
            r[c] = pd.to_numeric(runs[f"data.{c}"], errors="coerce").round(9).to_numpy()
            keys.append(c)
    out = []
    for model in ("no_latent", "factor_analysis", "ppca"):
        k = keys if model == "no_latent" else [*keys, "latent_dim"]
        m = ref[(ref["model"] == model) & ref["split"].isin(_SPLITS)]
        m = m[[*k, "split", "log_px", "n_points", "log_px_bpd"]].drop_duplicates([*k, "split"])
        left = r if model != "ppca" else r[r["dataset"] == "ppca"]
        j = left[["run_id", *k]].merge(m, on=k, how="inner")
        if j.empty:
            continue
        out.append(pd.DataFrame({"run_id": j["run_id"],
                                 "quantity": j["split"] + f"_ref_{model}",
                                 "value": j["log_px"].astype(float), "points": j["n_points"]}))
        if model != "ppca":
            b = j[j["log_px_bpd"].notna()]
            out.append(pd.DataFrame({"run_id": b["run_id"],
                                     "quantity": b["split"] + f"_ref_{model}_bpd",
                                     "value": b["log_px_bpd"].astype(float),
                                     "points": b["n_points"]}))
    out = [o for o in out if len(o)]
    return pd.concat(out, ignore_index=True) if out else pd.DataFrame(columns=cols)


def run_values(results: str | Path, experiments: list[str] | None = None,
               loaded: dict[str, pd.DataFrame | None] | None = None) -> pd.DataFrame:
    """Every summary quantity per run, long: the run's cell keys, ``seed``, ``data_seed``,
    ``status``, ``conv``, ``convergence``, then ``quantity``, ``value``, ``points``. Rows of
    every status are returned (the summary averages status ``ok`` only). ``loaded`` may hold
    experiments' ``load_runs`` frames already read."""
    results = Path(results)
    names = experiments if experiments is not None else experiments_present(results)
    ref = _references(results)
    loaded = loaded or {}
    frames = []
    for name in names:
        runs = loaded[name] if name in loaded else load_runs(results, name)
        if runs is None or runs.empty:
            continue
        long = []
        for s in _SPLITS:
            n_pts = runs.get(f"n_{s}", pd.Series(np.nan, index=runs.index))
            for stem, col in (("elbo", f"final_elbo_{s}"),
                              ("log_px_mle", f"final_log_px_mle_{s}"),
                              ("approximation_gap_mle", f"final_approximation_gap_mle_{s}")):
                if col in runs:
                    long.append(pd.DataFrame({"run_id": runs["run_id"],
                                              "quantity": f"{s}_{stem}",
                                              "value": pd.to_numeric(runs[col], errors="coerce"),
                                              "points": n_pts}))
            if f"final_elbo_{s}" in runs and {"data_dim", "levels"} <= set(runs):
                long.append(pd.DataFrame({"run_id": runs["run_id"], "quantity": f"{s}_elbo_bpd",
                                          "value": bits_per_dim(pd.to_numeric(
                                              runs[f"final_elbo_{s}"], errors="coerce"),
                                              runs["data_dim"], runs["levels"]),
                                          "points": n_pts}))
        for stem, col in (("test_active_units", "final_active_units_test"),
                          ("test_kl_total", "final_kl_total_test"),
                          ("test_e_steps", "final_e_steps_test"),
                          ("seconds_per_epoch", "seconds_per_epoch"),
                          ("epochs_run", "epochs_run")):
            if col in runs:
                pts = runs.get("n_test", np.nan) if stem.startswith("test") else np.nan
                long.append(pd.DataFrame({"run_id": runs["run_id"], "quantity": stem,
                                          "value": pd.to_numeric(runs[col], errors="coerce"),
                                          "points": pts}))
        gaps = _gap_values(results, name, runs)
        have = set(zip(gaps["run_id"], gaps["quantity"], strict=True))
        long.append(gaps)
        for s in _SPLITS:  # runs without a gaps table: the metric's final value, whole split
            for stem in _GAP_COLUMNS:
                col = f"final_{stem}_{s}"
                if col not in runs:
                    continue
                keep = [(rid, f"{s}_{stem}") not in have for rid in runs["run_id"]]
                part = runs[keep]
                long.append(pd.DataFrame({
                    "run_id": part["run_id"], "quantity": f"{s}_{stem}",
                    "value": pd.to_numeric(part[col], errors="coerce"),
                    "points": part.get(f"n_{s}", pd.Series(np.nan, index=part.index))}))
        refs = _reference_values(ref, runs)
        long.append(refs)
        frame = pd.concat([f for f in long if len(f)], ignore_index=True) if any(
            len(f) for f in long) else pd.DataFrame(columns=["run_id", "quantity", "value",
                                                             "points"])
        # ELBO − factor analysis, per run (same data seed, H, split and points)
        for s in _SPLITS:
            e = frame[frame["quantity"] == f"{s}_elbo"].set_index("run_id")["value"]
            f = frame[frame["quantity"] == f"{s}_ref_factor_analysis"].set_index("run_id")
            both = e.index.intersection(f.index)
            if len(both):
                frame = pd.concat([frame, pd.DataFrame({
                    "run_id": both, "quantity": f"{s}_elbo_minus_fa",
                    "value": (e[both] - f.loc[both, "value"]).to_numpy(dtype=float),
                    "points": f.loc[both, "points"].to_numpy()})], ignore_index=True)
        frame = frame[frame["value"].notna()]
        keys = [*CELL, "seed", "data_seed", "status", "conv", "convergence"]
        frames.append(runs[["run_id", *keys]].merge(frame, on="run_id", how="right"))
    if not frames:
        return pd.DataFrame(columns=["run_id", *CELL, "seed", "data_seed", "status", "conv",
                                     "convergence", "quantity", "value", "points"])
    return pd.concat(frames, ignore_index=True)


# ---------------------------------------------------------------------------------- summary


def _counts(runs: pd.DataFrame) -> pd.DataFrame:
    flags = runs.assign(
        n_runs=1, n_ok=runs["status"].eq("ok").astype(int),
        n_diverged=runs["status"].eq("diverged").astype(int),
        n_failed=runs["status"].eq("failed").astype(int),
        n_not_converged=(runs["status"].eq("ok") & runs["conv"].eq(False)).astype(int))
    return (flags.groupby(CELL, dropna=False)[["n_runs", "n_ok", "n_diverged", "n_failed",
                                              "n_not_converged"]].sum().reset_index())


def _rows(runs: pd.DataFrame) -> pd.DataFrame:
    """The (cell, convergence) rows: one per convergence class among finished runs, and one
    ``none finished`` row for a cell without a finished run."""
    ok = runs[runs["status"] == "ok"]
    rows = ok[[*CELL, "convergence"]].drop_duplicates()
    cells = runs[CELL].drop_duplicates()
    lacking = cells.merge(rows[CELL].drop_duplicates(), on=CELL, how="left", indicator=True)
    lacking = lacking[lacking["_merge"] == "left_only"].drop(columns="_merge")
    return pd.concat([rows, lacking.assign(convergence="none finished")], ignore_index=True)


def summary_table(results: str | Path) -> pd.DataFrame:
    """The summary as a DataFrame (module docstring: keys, sources and statistics)."""
    results = Path(results)
    names = experiments_present(results)
    loaded = {n: load_runs(results, n) for n in names}
    all_runs = [r for r in loaded.values() if r is not None and len(r)]
    stems = [s for s, q in QUANTITIES.items()]
    if not all_runs:
        cols = [*CELL, "convergence", "n_runs", "n_ok", "n_diverged", "n_failed",
                "n_not_converged"]
        for s in (s for s, q in QUANTITIES.items() if q.core):
            cols += [f"{s}_{k}" for k in ("mean", "sd", "n", "ci_low", "ci_high", "points")]
        return pd.DataFrame(columns=cols)
    runs = pd.concat(all_runs, ignore_index=True)
    setting_rank = {k: i for i, k in enumerate(dict.fromkeys(
        zip(runs["experiment"], runs["setting"], strict=True)))}
    table = _rows(runs).merge(_counts(runs), on=CELL, how="left")
    values = run_values(results, names, loaded)
    values = values[values["status"] == "ok"]
    key = [*CELL, "convergence"]
    blocks = [table]
    for stem in stems:
        part = values[values["quantity"] == stem]
        if part.empty and not QUANTITIES[stem].core:
            continue
        out = []
        for k, g in part.groupby(key, dropna=False):
            iv = t_interval(g["value"])
            pts = pd.to_numeric(g["points"], errors="coerce")
            out.append((*k, iv.mean, iv.sd, iv.n, iv.lo, iv.hi,
                        float(pts.min()) if pts.notna().any() else np.nan))
        agg = pd.DataFrame(out, columns=[*key, *(f"{stem}_{s}" for s in (
            "mean", "sd", "n", "ci_low", "ci_high", "points"))])
        if len(agg):
            agg = table[key].merge(agg, on=key, how="left").drop(columns=key)
            agg.index = table.index
        else:
            agg = pd.DataFrame({f"{stem}_{s}": np.nan for s in (
                "mean", "sd", "n", "ci_low", "ci_high", "points")}, index=table.index)
        agg[f"{stem}_n"] = agg[f"{stem}_n"].fillna(0).astype(int)
        blocks.append(agg)
    table = pd.concat(blocks, axis=1).copy()
    exp_rank = {e: i for i, e in enumerate(names)}
    method_rank = {m: i for i, m in enumerate(_METHOD_ORDER)}
    label_rank = {m: i for i, m in enumerate(LABEL_ORDER)}
    conv_rank = {"converged": 0, "unknown": 1, "not converged": 2, "none finished": 3}
    table = table.assign(
        _e=table["experiment"].map(exp_rank).fillna(len(exp_rank)),
        _s=[setting_rank.get(k, 0) for k in zip(table["experiment"], table["setting"],
                                                 strict=True)],
        _m=table["method"].map(method_rank).fillna(len(method_rank)),
        _l=table["estimator_label"].map(label_rank).fillna(len(label_rank)),
        _c=table["convergence"].map(conv_rank).fillna(9))
    table = (table.sort_values(["_e", "experiment", "dataset", "_s", "_m", "method", "_l",
                                "estimator_label", "latent_dim", "_c"], kind="stable")
             .drop(columns=["_e", "_s", "_m", "_l", "_c"]).reset_index(drop=True))
    front = [*CELL, "convergence", "n_runs", "n_ok", "n_diverged", "n_failed",
             "n_not_converged"]
    return table[front + [c for c in table.columns if c not in front]]


def write_summary(results: str | Path) -> Path:
    """Write ``results/summary.csv`` atomically and return its path."""
    results = Path(results)
    table = summary_table(results)
    path = results / "summary.csv"
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        table.to_csv(tmp, index=False, float_format="%.6g", lineterminator="\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


# --------------------------------------------------------------------------------- Markdown


def _cell(mean: float, sd: float, n: int, digits: int) -> str:
    if not n or pd.isna(mean):
        return "—"
    if n < 2 or pd.isna(sd):
        return f"{mean:.{digits}f} (1 seed)".replace("-", "−")
    return f"{mean:.{digits}f} ± {sd:.{digits}f}".replace("-", "−")


#: the columns of the Markdown tables (each shown only where its experiment measured it)
_MD_STEMS = ("test_elbo", "test_elbo_bpd", "train_elbo", "test_ref_factor_analysis",
             "test_elbo_minus_fa", "test_iwae", "test_log_px_exact", "test_approximation_gap",
             "train_amortization_gap", "test_amortization_gap", "test_active_units",
             "seconds_per_epoch")


def summary_markdown(results: str | Path) -> str:
    """The summary as Markdown: one table per experiment, columns where it measured them
    (mean ± sd over seeds; the 95 % intervals are in summary.csv)."""
    table = summary_table(results)
    note = ("Mean ± standard deviation over the seeds of the runs that finished (95 % "
            "t-intervals, seed counts and point counts in `results/summary.csv`). One table per "
            "experiment; nothing is averaged across experiments or training settings. Runs "
            "that finished without converging are a separate row (last column); diverged and "
            "failed runs are counted, never averaged. ELBOs are those of each method's own "
            "posterior over the whole split at the best epoch (nats per data point; bits/dim "
            "for images); FA = exact log p(x) of factor analysis at the same H and data seed; "
            "IWAE log p(x) and the gaps (Cremer et al. 2018) over the first points of the split "
            "(`gaps.csv`). H = latent dimension.")
    if table.empty:
        return note + "\n\n(no results yet)\n"
    parts = [note]
    for exp, rows in table.groupby("experiment", sort=False):
        stems = [s for s in _MD_STEMS if f"{s}_n" in rows and rows[f"{s}_n"].gt(0).any()]
        if "test_elbo" not in stems:  # a reference alone compares nothing
            stems = [s for s in stems if s not in ("test_ref_factor_analysis",
                                                   "test_elbo_minus_fa")]
        with_setting = rows["setting"].ne("default").any()
        head = [*(["setting"] if with_setting else []), "dataset", "method", "estimator", "H",
                *(QUANTITIES[s].heading for s in stems), "runs", "diverged", "convergence"]
        lines = [f"#### {exp}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for _, r in rows.iterrows():
            cells = [*([str(r["setting"])] if with_setting else []), str(r["dataset"]),
                     str(r["method"]), str(r["estimator_label"]),
                     f"{r['latent_dim']:g}" if pd.notna(r["latent_dim"]) else "—"]
            for s in stems:
                digits = 3 if s in ("seconds_per_epoch", "test_elbo_bpd") else (
                    1 if s == "test_active_units" else 2)
                cells.append(_cell(r[f"{s}_mean"], r[f"{s}_sd"], int(r[f"{s}_n"]), digits))
            cells.append(str(int(r["n_runs"])))
            bad = f"{int(r['n_diverged'])}/{int(r['n_runs'])}"
            if r["n_failed"]:
                bad += f" (+{int(r['n_failed'])} failed)"
            cells.append(bad)
            cells.append(str(r["convergence"]))
            lines.append("| " + " | ".join(cells) + " |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"
