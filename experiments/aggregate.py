"""Aggregation of run folders into an experiment's published CSVs, and their verification.

``aggregate(exp_dir, run_ids)`` rebuilds ``results/<experiment>/``:

``metrics.csv``   every run's rows, concatenated in grid order (``experiments.schema``)
``runs.csv``      one row per run: identity, ``status``/``message``, how training stopped
                  (``stop_reason``, ``converged``, ``epochs_run``, ``best_epoch``),
                  ``lr_source``, provenance (code and package versions), every configuration
                  field under its dotted name (``method.lr``, ``model.hidden``; lists as JSON
                  text), ``seconds_per_epoch`` and ``final_<metric>_<split>``: each metric
                  without a parameter group at the run's best (restored) epoch, with
                  ``final_<metric>_bpd_<split>`` in bits per dimension for image data
``<table>.csv``   each per-run ``tables/<table>.csv`` concatenated (``gaps``, ``images``, …)
``selected.csv``  (``lr_selection``) the chosen step sizes, and ``candidates.csv`` every
                  candidate's score (``experiments.selection``)
``manifest.json`` SHA-256 and row count of each CSV above, which ``check`` verifies; while
                  the CSVs are being rewritten it says ``"complete": false``, so an
                  interrupted aggregation is reported as such

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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from experiments.grids import config_hash, flatten, run_id_for
from experiments.schema import (
    BPD_METRICS,
    TABLE_COLUMNS,
    SchemaError,
    read_metrics,
    read_runs,
    validate_metrics,
    validate_runs,
)
from vi.files import atomic_write

__all__ = [
    "AggregateError",
    "add_to_manifest",
    "aggregate",
    "check_results",
    "verify_manifest_file",
    "verify_run",
]

_PROVENANCE_COLUMNS = (
    "lr_source", "stop_reason", "converged", "epochs_run", "best_epoch", "git_commit",
    "git_dirty", "python_version", "torch_version", "numpy_version", "pandas_version",
    "scipy_version", "scikit_learn_version", "mlxtend_version", "device", "hostname", "command",
    "started", "finished", "resumed", "run_seconds", "n_train", "n_validation", "n_test",
    "data_dim", "levels", "ensemble", "ensemble_size")
_RESERVED = {"metrics", "runs", "manifest"}


class AggregateError(ValueError):
    """Run folders that cannot be aggregated; the message lists each one and why."""


def _csv_text(frame: pd.DataFrame) -> str:
    return frame.to_csv(index=False, lineterminator="\n")


def _digest(text: str | bytes) -> str:
    return hashlib.sha256(text.encode() if isinstance(text, str) else text).hexdigest()


def _write_csv(path: Path, frame: pd.DataFrame) -> dict[str, Any]:
    text = _csv_text(frame)
    atomic_write(path, text)
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
    missing = [k for k in ("run_id", "experiment", "config") if k not in cfg]
    if missing:
        return [f"config.json lacks {', '.join(missing)}"], None
    if cfg["run_id"] != run_dir.name:
        problems.append(f"run_id mismatch: config.json says {cfg['run_id']!r}, the folder is "
                        f"{run_dir.name!r}")
    try:
        expected = run_id_for(cfg["experiment"], cfg["config"])
    except (KeyError, TypeError, ValueError) as err:
        return [*problems, f"config.json is not a full configuration ({err})"], None
    if expected != cfg["run_id"]:
        problems.append(
            f"config hash mismatch: config.json hashes to "
            f"{config_hash(cfg['experiment'], cfg['config'])}, the run_id {cfg['run_id']!r} "
            f"says otherwise (edited, or written by another version)")
    prov, why = _read_json(run_dir / "provenance.json")
    if prov is None:
        return [*problems, why], None
    status = prov.get("status")
    if status not in ("ok", "diverged", "failed"):
        return [*problems, f"unfinished run (status {status!r}): rerun the experiment to resume "
                           f"or finish it"], None
    files = prov.get("files")
    if status == "failed" and not isinstance(files, dict):
        return [*problems, f"failed run ({prov.get('message', '')}): rerun the experiment"], None
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
    if status in ("ok", "diverged") and not (run_dir / "checkpoint.pt").is_file():
        problems.append("checkpoint.pt missing (the finished model cannot be evaluated again)")
    if problems:
        return problems, None
    tables = {Path(n).stem: f for n, f in frames.items() if n.startswith("tables/")}
    return [], {"config": cfg, "provenance": prov, "metrics": metrics, "tables": tables}


def _cell(value: Any) -> Any:
    if isinstance(value, list | dict):
        return json.dumps(value, sort_keys=True)
    return value


def _bpd(nats: float, data_dim: Any, levels: Any) -> float:
    """Bits per dimension of the discrete data: −(L − D ln K) / (D ln 2) (``vi.data``)."""
    return -(nats - int(data_dim) * math.log(int(levels))) / (int(data_dim) * math.log(2))


def _runs_row(parts: dict) -> dict[str, Any]:
    cfg, prov, metrics = parts["config"], parts["provenance"], parts["metrics"]
    c = cfg["config"]
    row: dict[str, Any] = {
        "run_id": cfg["run_id"], "experiment": cfg["experiment"], "dataset": c["data"]["name"],
        "method": c["method"]["name"], "estimator": c["method"]["estimator"],
        "baseline": c["method"]["baseline"], "kl": c["method"]["kl"],
        "latent_dim": c["model"]["latent_dim"], "n_mc": c["method"]["n_mc"], "seed": c["seed"],
        "status": prov.get("status"), "message": prov.get("message", "")}
    row.update({k: prov.get(k, "") for k in _PROVENANCE_COLUMNS})
    row["selection_round"] = cfg.get("selection_round")
    epochs = prov.get("epochs_run") or 0
    row["seconds_per_epoch"] = (round(prov["run_seconds"] / epochs, 4)
                                if epochs and prov.get("run_seconds") is not None else None)
    for key, value in flatten(c).items():
        row.setdefault(key, _cell(value))
    row["probes"] = ",".join(sorted(c.get("probes", {})))
    if len(metrics):
        plain = metrics[metrics["param_group"].isna()]
        best = prov.get("best_epoch")
        at_best = plain[plain["epoch"] == best] if best is not None else plain.iloc[0:0]
        rest = plain[~plain.set_index(["metric", "split"]).index.isin(
            at_best.set_index(["metric", "split"]).index)]
        last = pd.concat([at_best.groupby(["metric", "split"]).tail(1),
                          rest.groupby(["metric", "split"]).tail(1)])
        levels = prov.get("levels")
        for _, r in last.sort_values(["metric", "split"]).iterrows():
            row[f"final_{r['metric']}_{r['split']}"] = float(r["value"])
            if r["metric"] in BPD_METRICS and levels not in (None, ""):
                row[f"final_{r['metric']}_bpd_{r['split']}"] = _bpd(float(r["value"]),
                                                                   prov["data_dim"], levels)
        row["last_epoch"] = int(metrics["epoch"].max())
    return row


def aggregate(
    exp_dir: str | os.PathLike,
    run_ids: list[str] | None = None,
    *,
    extra: dict[str, pd.DataFrame] | None = None,
) -> dict[str, Any]:
    """Rebuild an experiment's CSVs from its run folders (``run_ids`` in grid order, or every
    folder), plus ``extra`` tables computed from them (e.g. ``selected``). Raises
    ``AggregateError`` listing each unusable folder; writes nothing then.

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
    for name, frame in (extra or {}).items():
        outputs[name] = frame
    # first mark the folder as being rewritten: an interruption between the CSVs below leaves a
    # manifest that says so, rather than new CSVs beside an old manifest (or none)
    atomic_write(exp_dir / "manifest.json", json.dumps(
        {"experiment": exp_dir.name, "complete": False, "files": {}}, indent=2) + "\n")
    manifest = {"experiment": exp_dir.name, "complete": True, "runs": len(parts), "files": {}}
    written = []
    for name, frame in outputs.items():
        manifest["files"][f"{name}.csv"] = _write_csv(exp_dir / f"{name}.csv", frame)
        written.append(exp_dir / f"{name}.csv")
    for old in sorted(exp_dir.glob("*.csv")):  # tables of an earlier grid would mislead
        if old.stem not in outputs:
            old.unlink()
    atomic_write(exp_dir / "manifest.json", json.dumps(manifest, indent=2, sort_keys=True)
                 + "\n")
    return {"runs": runs, "written": written, "stale": stale}


# ------------------------------------------------------------------------------------ check


def _interrupted(manifest: dict) -> bool:
    """Whether a manifest marks an aggregation that never finished (``complete`` false;
    manifests written before the flag existed are complete)."""
    return manifest.get("complete", True) is False


_INTERRUPTED = ("the aggregation that was rewriting these CSVs was interrupted; rerun the "
                "experiment to finish it")


def add_to_manifest(exp_dir: str | os.PathLike, paths: list[Path]) -> None:
    """Record tables derived from an experiment's CSVs (e.g. by a figure's table writer) in its
    manifest, so ``check`` verifies them like the aggregated ones. Without a manifest there is
    nothing to extend (``check`` reports the missing manifest itself)."""
    exp_dir = Path(exp_dir)
    manifest, _ = _read_json(exp_dir / "manifest.json")
    if manifest is None:
        return
    for path in paths:
        path = Path(path)
        if path.suffix == ".csv" and path.parent == exp_dir:
            raw = path.read_bytes()
            rows = max(0, raw.count(b"\n") - 1)
            manifest.setdefault("files", {})[path.name] = {"sha256": _digest(raw), "rows": rows,
                                                           "derived": True}
    atomic_write(exp_dir / "manifest.json", json.dumps(manifest, indent=2, sort_keys=True)
                 + "\n")


def verify_manifest_file(path: Path) -> str:
    """"" if ``path`` matches the checksum its experiment's manifest records, else why not."""
    path = Path(path)
    manifest, why = _read_json(path.parent / "manifest.json")
    if manifest is None:
        return f"{path}: cannot be verified ({why})"
    if _interrupted(manifest):
        return f"{path}: cannot be verified ({_INTERRUPTED})"
    record = manifest.get("files", {}).get(path.name)
    if record is None:
        return f"{path}: not listed in {path.parent / 'manifest.json'}"
    if not path.is_file():
        return f"{path}: missing"
    if _digest(path.read_bytes()) != record.get("sha256"):
        return (f"{path}: does not match the checksum in manifest.json (truncated or edited "
                f"after aggregation)")
    return ""


def check_results(results: str | os.PathLike,
                  experiments: list[str] | None = None,
                  progress: Callable[[Path], None] | None = None) -> tuple[int, list[str]]:
    """Validate everything under ``results`` (or the named experiments' folders): the schema of
    every CSV, the columns of known tables, every experiment's CSVs against ``manifest.json``
    (a missing manifest is a problem), every run folder against its recorded checksums
    (unfinished runs and finished runs without a readable checkpoint are problems), and that an
    experiment's metrics.csv and runs.csv come together and name the same runs. Returns
    (files checked, problems)."""
    results = Path(results)
    roots = [results / e for e in experiments] if experiments else [results]
    problems: list[str] = []
    checked = 0
    for root in roots:
        if not root.exists():
            problems.append(f"{root}: no such folder")
            continue
        for path in sorted(root.rglob("*.csv")):
            if path.name.startswith(".") or "runs" in path.relative_to(results).parts:
                continue
            checked += 1
            if progress is not None:
                progress(path)
            problems += _check_csv(path)
        exp_dirs = sorted({p.parent for p in root.rglob("*.csv")
                           if "runs" not in p.relative_to(results).parts
                           and p.parent != results} | {m.parent for m in
                                                        root.rglob("manifest.json")})
        for exp_dir in exp_dirs:
            problems += _check_experiment(exp_dir)
        for run_dir in sorted({p.parent for p in root.rglob("config.json")
                               if p.parent.parent.name == "runs"}):
            checked += 1
            problems += [f"{run_dir}: {p}" for p in _check_run(run_dir)]
    return checked, problems


def _check_run(run_dir: Path) -> list[str]:
    bad, _ = verify_run(run_dir)
    if bad:
        return bad
    return _check_checkpoint(run_dir / "checkpoint.pt")


def _check_checkpoint(path: Path) -> list[str]:
    """A finished run's checkpoint must be a readable zip archive (torch's format) that names
    the run; reading it fully would need torch, which ``check`` does without."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (OSError, zipfile.BadZipFile) as err:
        return [f"checkpoint.pt unreadable ({type(err).__name__}: {err})"]
    if bad is not None:
        return [f"checkpoint.pt is corrupt (first bad entry {bad})"]
    return []


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
            need = TABLE_COLUMNS.get(path.stem)
            missing = [c for c in need or () if c not in frame.columns]
            if missing:
                return [f"{path}: missing column(s) {', '.join(missing)}"]
    except SchemaError as err:
        return str(err).splitlines()
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        return [f"{path}: not a readable CSV ({err})"]
    return []


def _check_experiment(exp_dir: Path) -> list[str]:
    problems = []
    csvs = sorted(p for p in exp_dir.glob("*.csv") if not p.name.startswith("."))
    manifest = exp_dir / "manifest.json"
    if csvs and not manifest.is_file():
        problems.append(f"{manifest}: missing (the CSVs beside it cannot be verified; rerun "
                        f"the experiment to rebuild them)")
    if manifest.is_file():
        record, why = _read_json(manifest)
        if record is None:
            problems.append(f"{manifest}: {why}")
        elif _interrupted(record):
            problems.append(f"{manifest}: {_INTERRUPTED}")
        else:
            listed = set(record.get("files", {}))
            for name in sorted(listed):
                problem = verify_manifest_file(exp_dir / name)
                if problem:
                    problems.append(problem)
            for path in csvs:
                if path.name not in listed:
                    problems.append(f"{path}: not listed in manifest.json (left over or added "
                                    f"by hand)")
            from experiments.selection import missing_choice

            unfinished = missing_choice(exp_dir, listed)  # a selection without its choice
            if unfinished:
                problems.append(unfinished)
    metrics, runs = exp_dir / "metrics.csv", exp_dir / "runs.csv"
    if metrics.is_file() != runs.is_file():
        have, lack = (metrics, runs) if metrics.is_file() else (runs, metrics)
        problems.append(f"{have}: has no {lack.name} beside it (the two are written together; "
                        f"rerun the experiment to rebuild both)")
    elif metrics.is_file():
        try:
            m = pd.read_csv(metrics, usecols=["run_id"], dtype={"run_id": str})
            r = pd.read_csv(runs, usecols=["run_id"], dtype={"run_id": str})
        except (ValueError, pd.errors.ParserError, pd.errors.EmptyDataError):
            return problems  # reported by the schema checks
        orphans = sorted(set(m["run_id"].dropna()) - set(r["run_id"].dropna()))
        if orphans:
            problems.append(f"{metrics}: run_id(s) {orphans[:3]} have no row in runs.csv")
    return problems
