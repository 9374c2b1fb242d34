"""Every summary quantity per run (``run_values``): runs.csv, the gaps tables and the
reference models of references.csv."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from experiments.summary.quantities import _GAP_COLUMNS, _SPLITS, CELL, bits_per_dim
from experiments.summary.runs import experiments_present, load_runs, read_csv


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
