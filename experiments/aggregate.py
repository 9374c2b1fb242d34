"""Aggregation of run folders into an experiment's published CSVs, and their verification.

``aggregate(exp_dir, run_ids)`` rebuilds ``results/<experiment>/``:

``metrics.csv``   every run's rows, concatenated in grid order (``experiments.schema``); the
                  ``wall_s`` of the trainer's rows (``TRAINING_TIMED``) on the run-alone clock,
                  epoch × ``seconds_per_epoch_alone``, where the run recorded a calibration
``runs.csv``      one row per run: identity, ``status``/``message``, how training stopped
                  (``stop_reason``, ``converged``, ``epochs_run``, ``best_epoch``, and
                  ``vi.contract.OUTCOME_COLUMNS``: ``outcome``, ``decays``, …),
                  ``lr_source``, provenance (code and package versions), every configuration
                  field under its dotted name (``method.lr``, ``model.hidden``; lists as JSON
                  text), the training cost (``seconds_per_epoch_alone``: the K = 1
                  calibration of the run's ensemble, ``experiments.runner``;
                  ``seconds_per_epoch``: that, else the ensemble share;
                  ``seconds_per_epoch_ensemble``: ``run_seconds`` / epochs, the run's share
                  of its ensemble's epoch time; ``run_seconds_alone``: epochs × the
                  calibration), and ``final_<metric>_<split>``: each metric
                  without a parameter group at the run's best (restored) epoch, with
                  ``final_<metric>_bpd_<split>`` in bits per dimension for image data
``<table>.csv``   each per-run ``tables/<table>.csv`` concatenated (``gaps``, ``images``, …)

Every table but ``runs.csv``, ``selected.csv`` and ``candidates.csv`` whose text exceeds
``experiments.schema.GZIP_ABOVE`` bytes (1 MB) is stored gzipped as ``<table>.csv.gz``
(``metrics.csv.gz``, ``gaps.csv.gz``): pandas reads it directly, and every reader here finds it
by its CSV name (``experiments.schema.stored``); the manifest records the gzipped bytes.
``selected.csv``  (``lr_selection``) the chosen step sizes, and ``candidates.csv`` every
                  candidate's score (``experiments.selection``)
``contract.json`` the declarations of every metric and table the runs wrote and the baselines of
                  each estimator they knew (``vi.contract.record``, gathered from each run's
                  provenance), so a process that never imported a probe's or an estimator's
                  module reads them (``experiments.schema.read_contract``)
``manifest.json`` SHA-256 and row count of each CSV above, which ``check`` verifies; while
                  the CSVs are being rewritten it says ``"complete": false``, so an
                  interrupted aggregation is reported as such

It refuses, listing every bad folder, a run folder that is incomplete or inconsistent: no or
unreadable ``config.json``/``provenance.json``, a ``run_id`` that differs from the folder's name
or from the hash of its configuration, a run still ``running`` (interrupted: rerun the
experiment to resume it), a ``metrics.csv`` or table missing or not matching the checksum the run
recorded when it finished (truncated or edited), or rows that break the schema.

``experiments.checks`` verifies what this module writes (``check``).

Pure Python + pandas: importing this module never imports torch, so ``check`` and ``figures``
stay light.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import math
import os
from pathlib import Path
from typing import Any

import pandas as pd

from experiments.grids import config_hash, flatten, run_id_for
from experiments.schema import (
    BPD_METRICS,
    CONTRACT_FILE,
    GZIP_ABOVE,
    PLAIN_TABLES,
    SchemaError,
    validate_metrics,
    validate_runs,
)
from vi import contract
from vi.contract import OUTCOME_COLUMNS
from vi.files import atomic_write

__all__ = ["AggregateError", "aggregate", "verify_run"]

_PROVENANCE_COLUMNS = (
    "lr_source", "stop_reason", "converged", "epochs_run", "best_epoch", "git_commit",
    "git_dirty", "python_version", "torch_version", "numpy_version", "pandas_version",
    "scipy_version", "scikit_learn_version", "mlxtend_version", "device", "hostname", "command",
    "started", "finished", "resumed", "run_seconds", "n_train", "n_validation", "n_test",
    "data_dim", "levels", "ensemble", "ensemble_size")
_RESERVED = {"metrics", "runs", "manifest"}
CHECKPOINT = "checkpoint.pt"
#: the results folder's own files, derived from every experiment's CSVs; verified against the
#: results folder's manifest.json
ROOT_FILES = ("references.csv", "summary.csv", "FINDINGS.md")


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


def _publish_table(exp_dir: Path, name: str, frame: pd.DataFrame) -> tuple[str, dict, Path]:
    """Write one published table: ``<name>.csv``, or ``<name>.csv.gz`` when its text exceeds
    ``GZIP_ABOVE`` bytes (not runs.csv nor the selection's tables; gzip level 9 with no name
    and no time stamp, so equal tables give equal bytes). Returns (file name, its manifest
    record: SHA-256 of the bytes on disk and the row count, path)."""
    text = _csv_text(frame)
    if name in PLAIN_TABLES or len(text) <= GZIP_ABOVE:
        path = exp_dir / f"{name}.csv"
        return path.name, _write_csv(path, frame), path
    path = exp_dir / f"{name}.csv.gz"
    data = gzip.compress(text.encode(), compresslevel=9, mtime=0)
    atomic_write(path, data)
    return path.name, {"sha256": _digest(data), "rows": len(frame)}, path


def _read_json(path: Path) -> tuple[dict | None, str]:
    if not path.is_file():
        return None, f"{path.name} missing"
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError, RecursionError) as err:
        return None, f"{path.name} unreadable ({type(err).__name__}: {err})"
    if not isinstance(value, dict):
        return None, f"{path.name} is not a JSON object"
    return value, ""


def _read_manifest(path: Path) -> tuple[dict | None, str]:
    """A manifest whose ``files`` maps each name to {"sha256": text, "rows": …}, or (None, why):
    a malformed manifest is reported, never trusted or half-read."""
    manifest, why = _read_json(path)
    if manifest is None:
        return None, why
    files = manifest.get("files", {})
    if not isinstance(files, dict):
        return None, f"{path.name}: 'files' is not an object (edited or damaged)"
    bad = sorted(str(name) for name, record in files.items()
                 if not isinstance(record, dict) or not isinstance(record.get("sha256"), str))
    if bad:
        return None, (f"{path.name}: the record of {', '.join(bad[:3])} is not an object with "
                      f"a sha256 (edited or damaged)")
    return manifest, ""


def _csv_rows(raw: bytes) -> int | None:
    """The data rows of a CSV (plain or gzipped) as pandas reads them (None: not a readable
    CSV)."""
    try:
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
        return len(pd.read_csv(io.BytesIO(raw), dtype=str, skip_blank_lines=False))
    except pd.errors.EmptyDataError:
        return 0
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError, OSError, EOFError):
        return None


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
    finished = status in ("ok", "diverged")
    if any(not isinstance(r, dict) for r in files.values()):
        return [*problems, "provenance.json: a file record is not an object (edited or "
                           "damaged)"], None
    frames: dict[str, pd.DataFrame] = {}
    for name, record in files.items():
        path = run_dir / name
        if name == CHECKPOINT:
            continue  # verified below, with its own messages
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
    try:  # what a probe or estimator of a module this process never imported declared
        declared = contract.adopt(prov.get("contract", {}), "provenance.json")
    except contract.ContractError as err:
        return [*problems, str(err)], None
    metrics = frames.get("metrics.csv")
    if metrics is not None:
        try:
            validate_metrics(metrics, str(run_dir / "metrics.csv"))
        except SchemaError as err:
            problems.append(str(err))
        ids = set(metrics["run_id"].dropna().astype(str)) if "run_id" in metrics else set()
        if ids - {cfg["run_id"]}:
            problems.append(f"metrics.csv holds rows of other run(s) {sorted(ids)[:3]}")
    if finished:
        problems += _check_checkpoint(run_dir / CHECKPOINT, files.get(CHECKPOINT))
    if problems:
        return problems, None
    tables = {Path(n).stem: f for n, f in frames.items() if n.startswith("tables/")}
    return [], {"config": cfg, "provenance": prov, "metrics": metrics, "tables": tables,
                "contract": declared}


def _check_checkpoint(path: Path, record: Any) -> list[str]:
    """A finished run's ``checkpoint.pt`` must be the file the run saved: its SHA-256 is
    recorded in provenance.json beside the CSVs' (a checkpoint copied from another run, or
    edited, is reported; reading it would need torch, which ``check`` does without)."""
    import zipfile

    if not path.is_file():
        return ["checkpoint.pt missing (the finished model cannot be evaluated again)"]
    if record is None:
        return ["checkpoint.pt has no checksum in provenance.json, so it cannot be verified "
                "(written by an older version; rerun with --force)"]
    try:
        with path.open("rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
    except OSError as err:
        return [f"checkpoint.pt unreadable ({type(err).__name__}: {err})"]
    if digest == record.get("sha256"):
        return []
    if not zipfile.is_zipfile(path):
        return ["checkpoint.pt unreadable (not a torch archive)"]
    return ["checkpoint.pt is not the one this run saved (its checksum differs: replaced by "
            "another run's or edited; rerun with --force)"]


def _cell(value: Any) -> Any:
    if isinstance(value, list | dict):
        return json.dumps(value, sort_keys=True)
    return value


def _bpd(nats: float, data_dim: Any, levels: Any) -> float:
    """Bits per dimension of the discrete data: −(L − D ln K) / (D ln 2) (``vi.data``)."""
    return -(nats - int(data_dim) * math.log(int(levels))) / (int(data_dim) * math.log(2))


#: the metrics whose ``wall_s`` is the trainer's cumulative training time (``vi.training``)
TRAINING_TIMED = ("elbo", "elbo_running", "e_steps")


def _alone_time(parts: dict) -> pd.DataFrame:
    """A run's metric rows with the ``wall_s`` of its training-timed rows (``TRAINING_TIMED``)
    put on the run-alone clock: epoch × ``seconds_per_epoch_alone`` (the K = 1 calibration of
    its ensemble, ``experiments.runner``) instead of its share of the ensemble's epoch time;
    unchanged where the run has no calibration. Probe rows keep their own measured seconds."""
    metrics, alone = parts["metrics"], parts["provenance"].get("seconds_per_epoch_alone")
    if alone is None or not len(metrics):
        return metrics
    timed = metrics["metric"].isin(TRAINING_TIMED)
    out = metrics.copy()
    out.loc[timed, "wall_s"] = (out.loc[timed, "epoch"].astype(float) * float(alone)).round(3)
    return out


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
    row.update({k: _cell(prov.get(k, "")) for k in OUTCOME_COLUMNS})  # how training went
    row["selection_round"] = cfg.get("selection_round")
    epochs = prov.get("epochs_run") or 0
    share = (round(prov["run_seconds"] / epochs, 4)
             if epochs and prov.get("run_seconds") is not None else None)
    alone = prov.get("seconds_per_epoch_alone")
    row["seconds_per_epoch_ensemble"] = share
    row["seconds_per_epoch_alone"] = alone
    row["seconds_per_epoch"] = alone if alone is not None else share
    row["run_seconds_alone"] = round(alone * epochs, 3) if alone is not None else None
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
    metrics = pd.concat([_alone_time(p) for p in parts], ignore_index=True)[metric_cols]
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
    try:
        declared = contract.record(
            metrics["metric"].dropna(), names,
            {e: b for p in parts for e, b in p["contract"]["estimators"].items()})
    except contract.ContractError as err:  # a table of a probe nobody declared here
        raise AggregateError(f"cannot aggregate {exp_dir}: {err}; rerun its runs with the "
                             f"module that declares it (--plugin)") from err
    for name, frame in (extra or {}).items():
        outputs[name] = frame
    try:
        written = _publish(exp_dir, outputs, len(parts), declared)
    except OSError as err:  # a read-only folder, a full disk: one message, no traceback
        raise AggregateError(
            f"cannot write the CSVs of {exp_dir} ({type(err).__name__}: {err}); the run "
            f"folders are intact: make room or make the folder writable, then rerun the "
            f"experiment (finished runs are not retrained)") from err
    return {"runs": runs, "written": written, "stale": stale}


def _publish(exp_dir: Path, outputs: dict[str, pd.DataFrame], runs: int,
             declared: dict) -> list[Path]:
    """Write the CSVs, the contract they use and then their manifest, which lists all of them.
    First the manifest is marked as being rewritten:
    an interruption (or a failing write) between the CSVs below leaves a manifest that says so,
    rather than new CSVs beside an old manifest (or none)."""
    atomic_write(exp_dir / "manifest.json", json.dumps(
        {"experiment": exp_dir.name, "complete": False, "files": {}}, indent=2) + "\n")
    manifest = {"experiment": exp_dir.name, "complete": True, "runs": runs, "files": {}}
    written = []
    for name, frame in outputs.items():
        filename, record, path = _publish_table(exp_dir, name, frame)
        manifest["files"][filename] = record
        written.append(path)
    for old in sorted([*exp_dir.glob("*.csv"), *exp_dir.glob("*.csv.gz")]):
        if old.name not in manifest["files"]:  # an earlier grid's table, or its other form
            old.unlink()
    text = json.dumps(declared, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    atomic_write(exp_dir / CONTRACT_FILE, text)
    manifest["files"][CONTRACT_FILE] = {"sha256": _digest(text)}
    atomic_write(exp_dir / "manifest.json", json.dumps(manifest, indent=2, sort_keys=True)
                 + "\n")
    return written
