"""Aggregation of run folders into an experiment's published CSVs, and their verification.

``aggregate(exp_dir, run_ids)`` rebuilds ``results/<experiment>/``:

``metrics.csv``   every run's rows, concatenated in grid order (SPEC §7 schema)
``runs.csv``      one row per run: identity, ``status``/``message``, ``lr_source``, provenance,
                  every configuration field (lists as JSON text), ``seconds_per_epoch`` and
                  ``final_<metric>_<split>`` — the last value of each metric without a parameter
                  group (e.g. ``final_elbo_test``)
``<table>.csv``   each per-run ``tables/<table>.csv`` concatenated (``images``, ``latents``,
                  ``variance_sweep``, ``gaps``)
``selected.csv``  (``lr_selection`` only) the chosen step sizes, and ``candidates.csv`` the
                  score of every candidate
``manifest.json`` SHA-256 and row count of each CSV above, which ``check`` verifies

It refuses, listing every bad folder, a run folder that is incomplete or inconsistent: no or
unreadable ``config.json``/``provenance.json``, a ``run_id`` that differs from the folder's name
or from the hash of its configuration, a run still ``running`` (interrupted: rerun the
experiment to resume it), a ``metrics.csv`` or table missing or not matching the checksum the run
recorded when it finished (truncated or edited), or rows that break the schema.

Pure Python + pandas: importing this module never imports torch, so ``check`` and ``figures``
stay light.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from experiments.grids import LR_FIELDS, config_hash, run_id_for
from experiments.schema import (
    IDENTITY_COLUMNS,
    SchemaError,
    read_metrics,
    read_runs,
    validate_metrics,
    validate_runs,
)

__all__ = [
    "TABLE_COLUMNS",
    "AggregateError",
    "aggregate",
    "atomic_write_text",
    "check_results",
    "verify_run",
    "write_selection",
]

#: columns each known table must have (more may follow)
TABLE_COLUMNS: dict[str, tuple[str, ...]] = {
    "images": (*IDENTITY_COLUMNS, "epoch", "kind", "index", "label", "z1", "z2", "height",
               "width"),
    "latents": (*IDENTITY_COLUMNS, "epoch", "point", "label", "mu1", "mu2", "logvar1",
                "logvar2"),
    "variance_sweep": (*IDENTITY_COLUMNS, "epoch", "param_group", "grad_estimator",
                       "grad_baseline", "grad_n_mc", "draws", "metric", "value"),
    "gaps": (*IDENTITY_COLUMNS, "epoch", "split", "point"),
    "selected": ("dataset", "method", "estimator", "baseline", *LR_FIELDS, "metric", "split",
                 "score_mean", "score_sd", "n_seeds", "n_diverged"),
    "candidates": ("dataset", "method", "estimator", "baseline", *LR_FIELDS, "score_mean",
                   "score_sd", "n_seeds", "n_diverged", "rank"),
}
#: step sizes that matter per method (the others are not recorded as selected)
RELEVANT_LR = {"vem": ("lr", "local_lr"), "amortized": ("lr",),
               "semi_amortized": ("lr", "refine_lr")}
_PROVENANCE_COLUMNS = ("lr_source", "git_commit", "git_dirty", "torch_version", "python_version",
                       "device", "hostname", "started", "finished", "resumed", "epochs_done",
                       "run_seconds")
_RESERVED = {"metrics", "runs", "manifest"}


class AggregateError(ValueError):
    """Run folders that cannot be aggregated; the message lists each one and why."""


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to a temporary file beside ``path``, then rename it over ``path``
    (the same protocol as ``vi.training.atomic_write``, without importing torch)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", newline="") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _csv_text(frame: pd.DataFrame) -> str:
    return frame.to_csv(index=False, lineterminator="\n")


def _digest(text: str | bytes) -> str:
    return hashlib.sha256(text.encode() if isinstance(text, str) else text).hexdigest()


def _write_csv(path: Path, frame: pd.DataFrame) -> dict[str, Any]:
    text = _csv_text(frame)
    atomic_write_text(path, text)
    return {"sha256": _digest(text), "rows": len(frame)}


def _read_json(path: Path) -> tuple[dict | None, str]:
    if not path.is_file():
        return None, f"{path.name} missing"
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as err:
        return None, f"{path.name} unreadable ({err})"
    if not isinstance(value, dict):
        return None, f"{path.name} is not a JSON object"
    return value, ""


# ------------------------------------------------------------------------------ run folders


def verify_run(run_dir: Path) -> tuple[list[str], dict | None]:
    """Problems with one run folder (empty if usable) and, when usable, its parts:
    {config, provenance, metrics (DataFrame), tables {name: DataFrame}}."""
    run_dir = Path(run_dir)
    problems: list[str] = []
    cfg, why = _read_json(run_dir / "config.json")
    if cfg is None:
        return [why], None
    missing = [k for k in ("run_id", "experiment", "config", "products") if k not in cfg]
    if missing:
        return [f"config.json lacks {', '.join(missing)}"], None
    if cfg["run_id"] != run_dir.name:
        problems.append(f"run_id mismatch: config.json says {cfg['run_id']!r}, the folder is "
                        f"{run_dir.name!r}")
    try:
        expected = run_id_for(cfg["experiment"], cfg["config"], cfg["products"])
    except (KeyError, TypeError, ValueError) as err:
        return [*problems, f"config.json is not a full configuration ({err})"], None
    if expected != cfg["run_id"]:
        problems.append(
            f"config hash mismatch: config.json hashes to "
            f"{config_hash(cfg['experiment'], cfg['config'], cfg['products'])}, the run_id "
            f"{cfg['run_id']!r} says otherwise (edited, or written by another version)")
    prov, why = _read_json(run_dir / "provenance.json")
    if prov is None:
        return [*problems, why], None
    status = prov.get("status")
    if status not in ("ok", "diverged", "failed"):
        return [*problems, f"incomplete (status {status!r}): rerun the experiment to resume "
                           f"or finish it"], None
    files = prov.get("files")
    if not isinstance(files, dict) or "metrics.csv" not in files:
        return [*problems, "provenance.json records no files (the run never finished writing)"
                ], None
    frames: dict[str, pd.DataFrame] = {}
    for name, record in files.items():
        path = run_dir / name
        if not path.is_file():
            problems.append(f"{name} missing")
            continue
        raw = path.read_bytes()
        if _digest(raw) != record.get("sha256"):
            problems.append(f"{name} does not match the checksum recorded when the run finished "
                            f"(truncated or edited; rerun with --force)")
            continue
        try:
            frame = pd.read_csv(io.BytesIO(raw), dtype={"run_id": str, "param_group": str,
                                                        "baseline": str})
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
            problems.append(f"{name} is not a readable CSV ({err})")
            continue
        if len(frame) != record.get("rows"):
            problems.append(f"{name} has {len(frame)} rows; the run recorded {record.get('rows')}")
            continue
        frames[name] = frame
    metrics = frames.get("metrics.csv")
    if metrics is not None:
        try:
            validate_metrics(metrics, str(run_dir / "metrics.csv"))
        except SchemaError as err:
            problems.append(str(err))
        ids = set(metrics["run_id"].dropna().astype(str)) if "run_id" in metrics else set()
        if ids - {cfg["run_id"]}:
            problems.append(f"metrics.csv holds rows of other run(s) {sorted(ids)[:3]}")
    if problems:
        return problems, None
    tables = {Path(n).stem: f for n, f in frames.items() if n.startswith("tables/")}
    return [], {"config": cfg, "provenance": prov, "metrics": metrics, "tables": tables}


def _cell(value: Any) -> Any:
    if isinstance(value, (list, dict)):
        return json.dumps(value, sort_keys=True)
    return value


def _runs_row(parts: dict) -> dict[str, Any]:
    cfg, prov, metrics = parts["config"], parts["provenance"], parts["metrics"]
    c = cfg["config"]
    row: dict[str, Any] = {"run_id": cfg["run_id"], "experiment": cfg["experiment"]}
    row.update({k: c[k] for k in IDENTITY_COLUMNS if k in c})
    row.update({"status": prov.get("status"), "message": prov.get("message", "")})
    row.update({k: prov.get(k, "") for k in _PROVENANCE_COLUMNS})
    epochs = prov.get("epochs_done") or 0
    row["seconds_per_epoch"] = (round(prov["run_seconds"] / epochs, 4)
                                if epochs and prov.get("run_seconds") is not None else None)
    for key, value in c.items():
        row.setdefault(key, _cell(value))
    row["products"] = ",".join(sorted(cfg["products"]))
    if len(metrics):
        plain = metrics[metrics["param_group"].isna()]
        last = plain.groupby(["metric", "split"], sort=True).tail(1)
        for _, r in last.sort_values(["metric", "split"]).iterrows():
            row[f"final_{r['metric']}_{r['split']}"] = float(r["value"])
        row["last_epoch"] = int(metrics["epoch"].max())
    return row


def aggregate(
    exp_dir: str | os.PathLike,
    run_ids: list[str] | None = None,
    *,
    select: dict | None = None,
) -> dict[str, Any]:
    """Rebuild an experiment's CSVs from its run folders (``run_ids`` in grid order, or every
    folder). Raises ``AggregateError`` listing each unusable folder; writes nothing then.

    Returns {"runs": runs frame, "written": [paths], "stale": [folders not in run_ids]}.
    """
    exp_dir = Path(exp_dir)
    runs_dir = exp_dir / "runs"
    present = sorted(p.name for p in runs_dir.iterdir() if p.is_dir()) if runs_dir.is_dir() \
        else []
    ids = list(run_ids) if run_ids is not None else present
    stale = sorted(set(present) - set(ids))
    problems, parts = [], []
    for rid in ids:
        folder = runs_dir / rid
        if not folder.is_dir():
            problems.append(f"{folder}: run folder missing")
            continue
        bad, got = verify_run(folder)
        problems += [f"{folder}: {p}" for p in bad]
        if got is not None:
            parts.append(got)
    if problems:
        raise AggregateError("cannot aggregate " + str(exp_dir) + "; rerun these runs (e.g. "
                             "`python -m experiments run ... --force`):\n  " +
                             "\n  ".join(problems))
    if not parts:
        raise AggregateError(f"{exp_dir}: no run folders to aggregate")
    metric_cols = list(parts[0]["metrics"].columns)
    metrics = pd.concat([p["metrics"] for p in parts], ignore_index=True)[metric_cols]
    validate_metrics(metrics, str(exp_dir / "metrics.csv"))
    runs = pd.DataFrame([_runs_row(p) for p in parts])
    validate_runs(runs, str(exp_dir / "runs.csv"))
    outputs = {"metrics": metrics, "runs": runs}
    names = sorted({n for p in parts for n in p["tables"]})
    for name in names:
        if name in _RESERVED:
            raise AggregateError(f"{exp_dir}: a run table may not be called {name!r}")
        outputs[name] = pd.concat([p["tables"][name] for p in parts if name in p["tables"]],
                                  ignore_index=True)
    if select is not None:
        selected, candidates = write_selection(runs, select)
        outputs["selected"], outputs["candidates"] = selected, candidates
    manifest = {"experiment": exp_dir.name, "runs": len(parts), "files": {}}
    written = []
    for name, frame in outputs.items():
        manifest["files"][f"{name}.csv"] = _write_csv(exp_dir / f"{name}.csv", frame)
        written.append(exp_dir / f"{name}.csv")
    atomic_write_text(exp_dir / "manifest.json", json.dumps(manifest, indent=2, sort_keys=True)
                      + "\n")
    return {"runs": runs, "written": written, "stale": stale}


# -------------------------------------------------------------------------- lr selection


def write_selection(runs: pd.DataFrame, select: dict) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Pick, per (dataset, method, estimator, baseline), the step sizes with the best mean
    final ``select.metric`` on ``select.split`` over seeds (validation ELBO by default).

    Candidates with fewer diverged (or failed) seeds rank first; among equals the higher mean
    wins, ties going to the earlier candidate in grid order. Returns (selected, candidates).
    """
    metric = select.get("metric", "elbo")
    split = select.get("split", "validation")
    column = f"final_{metric}_{split}"
    group = ["dataset", "method", "estimator", "baseline"]
    table = runs.copy()
    if column not in table:
        table[column] = np.nan
    table["_score"] = np.where(table["status"] == "ok", table[column].astype(float), np.nan)
    for name in LR_FIELDS:
        relevant = table["method"].map(lambda m, n=name: n in RELEVANT_LR.get(m, ()))
        table[name] = table[name].where(relevant)
    table["_order"] = np.arange(len(table))
    keys = group + list(LR_FIELDS)
    rows = []
    for key, part in table.groupby(keys, sort=False, dropna=False):
        scores = part["_score"].dropna()
        rows.append({**dict(zip(keys, key, strict=True)),
                     "score_mean": float(scores.mean()) if len(scores) else math.nan,
                     "score_sd": float(scores.std(ddof=1)) if len(scores) > 1 else math.nan,
                     "n_seeds": len(part), "n_diverged": int(len(part) - len(scores)),
                     "_order": int(part["_order"].min())})
    cand = pd.DataFrame(rows)
    cand["_key"] = list(zip(cand["n_diverged"], -cand["score_mean"].fillna(-math.inf),
                            cand["_order"], strict=True))
    cand = cand.sort_values("_order")
    cand["rank"] = cand.groupby(group, sort=False)["_key"].rank(method="first").astype(int)
    best = cand[cand["rank"] == 1].copy()
    best["metric"], best["split"] = metric, split
    best["n_candidates"] = best.apply(
        lambda r: int(((cand[group] == r[group]).all(axis=1)).sum()), axis=1)
    selected = best[[*group, *LR_FIELDS, "metric", "split", "score_mean", "score_sd", "n_seeds",
                     "n_diverged", "n_candidates"]].reset_index(drop=True)
    candidates = cand[[*group, *LR_FIELDS, "score_mean", "score_sd", "n_seeds", "n_diverged",
                       "rank"]].reset_index(drop=True)
    return selected, candidates


# ------------------------------------------------------------------------------------ check


def _check_table(path: Path, frame: pd.DataFrame, name: str) -> list[str]:
    need = TABLE_COLUMNS.get(name)
    if need is None:
        return []
    missing = [c for c in need if c not in frame.columns]
    return [f"{path}: missing column(s) {', '.join(missing)}"] if missing else []


def check_results(results: str | os.PathLike,
                  experiments: list[str] | None = None,
                  progress: Callable[[Path], None] | None = None) -> tuple[int, list[str]]:
    """Validate every CSV under ``results`` (or under the named experiments' folders): the
    schema of metrics/runs tables, the columns of known tables, run folders against their
    recorded checksums, experiment CSVs against ``manifest.json``, and that every run in an
    experiment's metrics.csv is in its runs.csv. Returns (files checked, problems)."""
    results = Path(results)
    roots = [results / e for e in experiments] if experiments else [results]
    problems: list[str] = []
    checked = 0
    run_dirs: set[Path] = set()
    for root in roots:
        if not root.exists():
            problems.append(f"{root}: no such folder")
            continue
        for path in sorted(root.rglob("*.csv")):
            if path.name.startswith("."):
                continue
            checked += 1
            if progress is not None:
                progress(path)
            if path.parent.parent.name == "runs" or (path.parent.name == "tables"
                                                      and path.parent.parent.parent.name == "runs"):
                run_dirs.add(path.parent if path.parent.name != "tables" else path.parent.parent)
            problems += _check_csv(path)
        for manifest in sorted(root.rglob("manifest.json")):
            problems += _check_manifest(manifest)
            problems += _check_crossrefs(manifest.parent)
    for run_dir in sorted(run_dirs):
        bad, _ = verify_run(run_dir)
        problems += [f"{run_dir}: {p}" for p in bad]
    return checked, problems


def _check_csv(path: Path) -> list[str]:
    raw = path.read_bytes()
    if not raw.strip():
        return [f"{path}: empty file"]
    if not raw.endswith(b"\n"):
        return [f"{path}: does not end with a newline (truncated?)"]
    try:
        if path.name == "metrics.csv":
            read_metrics(path)
        elif path.name == "runs.csv":
            read_runs(path)
        else:
            frame = pd.read_csv(path)
            return _check_table(path, frame, path.stem)
    except SchemaError as err:
        return str(err).splitlines()
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        return [f"{path}: not a readable CSV ({err})"]
    return []


def _check_manifest(path: Path) -> list[str]:
    manifest, why = _read_json(path)
    if manifest is None:
        return [f"{path}: {why}"]
    problems = []
    for name, record in manifest.get("files", {}).items():
        file = path.parent / name
        if not file.is_file():
            problems.append(f"{file}: listed in manifest.json but missing")
        elif _digest(file.read_bytes()) != record.get("sha256"):
            problems.append(f"{file}: does not match the checksum in manifest.json (truncated "
                            f"or edited after aggregation; re-run the experiment to rebuild it)")
    return problems


def _check_crossrefs(exp_dir: Path) -> list[str]:
    metrics, runs = exp_dir / "metrics.csv", exp_dir / "runs.csv"
    if not (metrics.is_file() and runs.is_file()):
        return []
    try:
        m = pd.read_csv(metrics, usecols=["run_id", "metric"], dtype={"run_id": str})
        r = pd.read_csv(runs, usecols=["run_id"], dtype={"run_id": str})
    except (ValueError, pd.errors.ParserError, pd.errors.EmptyDataError):
        return []  # reported by the schema checks
    orphans = sorted(set(m["run_id"].dropna()) - set(r["run_id"].dropna()))
    problems = []
    if orphans:
        problems.append(f"{metrics}: run_id(s) {orphans[:3]} have no row in runs.csv")
    return problems
