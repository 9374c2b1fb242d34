"""Verification of a results folder: ``check`` and the manifests of derived files.

``check_results(results)`` reports, without changing anything, every problem of a results folder:
each experiment's published CSVs (plain, or gzipped as ``<name>.csv.gz``) against its
``manifest.json`` (SHA-256 of the bytes on disk and row count), an
aggregation that was interrupted, the schema of its CSVs, each finished run folder
(``experiments.aggregate.verify_run``: configuration, provenance, checksums, checkpoint), and the
results folder's own manifest of derived files (``references.csv``, ``summary.csv``,
``FINDINGS.md``), which their writers record with ``add_to_manifest``.

Pure Python + pandas: importing this module never imports torch.
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import pandas as pd

from experiments.aggregate import (
    ROOT_FILES,
    AggregateError,
    _csv_rows,
    _digest,
    _read_manifest,
    verify_run,
)
from experiments.schema import (
    CONTRACT_FILE,
    TABLE_COLUMNS,
    SchemaError,
    read_contract,
    read_metrics,
    read_runs,
    stored,
    table_name,
)
from vi.files import atomic_write

__all__ = ["add_to_manifest", "check_results", "verify_manifest_file"]


def _interrupted(manifest: dict) -> bool:
    """Whether a manifest marks an aggregation that never finished (``complete`` false;
    manifests written before the flag existed are complete)."""
    return manifest.get("complete", True) is False


_INTERRUPTED = ("the aggregation that was rewriting these CSVs was interrupted; rerun the "
                "experiment to finish it")


def add_to_manifest(folder: str | os.PathLike, paths: list[Path], *,
                    create: bool = False) -> None:
    """Record files derived from the CSVs in the manifest of their folder, so ``check``
    verifies them like the aggregated ones: an experiment's tables written by its figure module
    (``gaps_table.csv``/``.md``), and, in the results folder's own ``manifest.json``
    (``create``: started when missing), ``references.csv``, ``summary.csv`` and
    ``FINDINGS.md``. SHA-256 of each file, and the row count of a CSV. An experiment folder
    without a manifest has nothing to extend (``check`` reports the missing manifest itself);
    a malformed manifest raises ``AggregateError``."""
    folder = Path(folder)
    path = folder / "manifest.json"
    if path.exists() or not create:
        manifest, why = _read_manifest(path)
        if manifest is None:
            if not path.exists():
                return
            raise AggregateError(f"{path}: cannot record {', '.join(p.name for p in paths)} "
                                 f"({why}); rebuild it by rerunning what wrote it")
    else:
        manifest = {"complete": True, "files": {}}
    files = manifest.setdefault("files", {})
    for p in map(Path, paths):
        if p.parent != folder or p.name == "manifest.json":
            raise ValueError(f"{p} is not a file of {folder}")
        raw = p.read_bytes()
        record: dict[str, Any] = {"sha256": _digest(raw), "derived": True}
        if p.suffix == ".csv":
            record["rows"] = _csv_rows(raw)
        files[p.name] = record
    atomic_write(path, json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def verify_manifest_file(path: Path) -> str:
    """"" if ``path`` matches the checksum (and, for a CSV, the row count) its folder's
    manifest records, else why not."""
    path = Path(path)
    manifest, why = _read_manifest(path.parent / "manifest.json")
    if manifest is None:
        return f"{path}: cannot be verified ({why})"
    if _interrupted(manifest):
        return f"{path}: cannot be verified ({_INTERRUPTED})"
    record = manifest.get("files", {}).get(path.name)
    if record is None:
        return f"{path}: not listed in {path.parent / 'manifest.json'}"
    if not path.is_file():
        return f"{path}: missing"
    raw = path.read_bytes()
    if _digest(raw) != record["sha256"]:
        return (f"{path}: does not match the checksum in manifest.json (truncated or edited "
                f"after it was written)")
    if path.name.endswith((".csv", ".csv.gz")) and "rows" in record:
        rows = _csv_rows(raw)
        if rows != record["rows"]:
            return (f"{path}: has {rows} rows; manifest.json records {record['rows']!r} "
                    f"(the manifest was edited)")
    return ""


def check_results(results: str | os.PathLike,
                  experiments: list[str] | None = None,
                  progress: Callable[[Path], None] | None = None, *,
                  ignore: Collection[str | os.PathLike] = ()) -> tuple[int, list[str]]:
    """Validate everything under ``results`` (or the named experiments' folders): the schema of
    every CSV, the columns of known tables, every experiment's CSVs (and derived tables) against
    its ``manifest.json`` and the results folder's own files (``references.csv``,
    ``summary.csv``, ``FINDINGS.md``) against the results folder's ``manifest.json`` (a missing
    manifest, a file it does not list, a checksum or row count that differs are problems), every
    run folder against the checksums its run recorded, checkpoint included (unfinished runs
    are problems), and that an experiment's metrics.csv and runs.csv come together and name the
    same runs. ``ignore``: files left unverified because the caller is about to replace them
    (e.g. ``summary.csv`` before writing the summary). Returns (files checked, problems)."""
    results = Path(results)
    skip = {Path(p) for p in ignore}
    problems: list[str] = []
    bad = [e for e in experiments or () if Path(e).name != e or e.startswith(".")]
    if bad:  # a path, "..": it would check something else than an experiment of `results`
        return 0, [f"{e!r} is not the name of an experiment folder under {results}"
                   for e in bad]
    roots = [results / e for e in experiments] if experiments else [results]
    checked = 0
    for root in roots:
        if not root.is_dir():
            problems.append(f"{root}: no such folder")
            continue
        for path in sorted([*root.rglob("*.csv"), *root.rglob("*.csv.gz")]):
            if (path.name.startswith(".") or "runs" in path.relative_to(results).parts
                    or path in skip):
                continue
            checked += 1
            if progress is not None:
                progress(path)
            problems += _check_csv(path)
        exp_dirs = sorted({p.parent for p in [*root.rglob("*.csv"), *root.rglob("*.csv.gz")]
                           if "runs" not in p.relative_to(results).parts}
                          | {m.parent for m in root.rglob("manifest.json")})
        if root == results and any((results / n).is_file() for n in ROOT_FILES):
            exp_dirs = sorted({*exp_dirs, results})
        for exp_dir in exp_dirs:
            problems += _check_experiment(exp_dir, skip)
        for run_dir in sorted({p.parent for p in root.rglob("config.json")
                               if p.parent.parent.name == "runs"}):
            checked += 1
            problems += [f"{run_dir}: {p}" for p in _check_run(run_dir)]
    return checked, problems


def _check_run(run_dir: Path) -> list[str]:
    bad, _ = verify_run(run_dir)
    return bad


def _check_csv(path: Path) -> list[str]:
    raw = path.read_bytes()
    if path.name.endswith(".gz"):
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as err:
            return [f"{path}: not a readable gzip file ({type(err).__name__}: {err})"]
    if not raw.strip():
        return [f"{path}: empty file"]
    if not raw.endswith(b"\n"):
        return [f"{path}: does not end with a newline (truncated?)"]
    try:
        read_contract(path.parent)  # the names of extensions, recorded beside their results
        name = table_name(path)
        if name == "metrics.csv":
            read_metrics(path)
        elif name == "runs.csv":
            read_runs(path)
        else:
            frame = pd.read_csv(path)
            need = TABLE_COLUMNS.get(name.removesuffix(".csv"))
            missing = [c for c in need or () if c not in frame.columns]
            if missing:
                return [f"{path}: missing column(s) {', '.join(missing)}"]
    except SchemaError as err:
        return str(err).splitlines()
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        return [f"{path}: not a readable CSV ({err})"]
    return []


def _check_experiment(exp_dir: Path, skip: Collection[Path] = ()) -> list[str]:
    problems = []
    # every CSV must be listed, and the results folder's FINDINGS.md; other files (an
    # experiment's Markdown tables) are verified where listed
    csvs = sorted(p for p in [*exp_dir.glob("*.csv"), *exp_dir.glob("*.csv.gz"),
                              *exp_dir.glob("*.md"), exp_dir / CONTRACT_FILE]
                  if not p.name.startswith(".") and p not in skip and p.is_file()
                  and (p.name.endswith((".csv", ".csv.gz"))
                       or p.name in (*ROOT_FILES, CONTRACT_FILE)))
    manifest = exp_dir / "manifest.json"
    if csvs and not manifest.is_file():
        rebuild = ("rerun `python -m experiments references` and `figures` to rebuild them"
                   if any(p.name in ROOT_FILES for p in csvs) else
                   "rerun the experiment to rebuild them")
        problems.append(f"{manifest}: missing (the files beside it cannot be verified; "
                        f"{rebuild})")
    if manifest.is_file():
        record, why = _read_manifest(manifest)
        if record is None:
            problems.append(f"{manifest}: {why}")
        elif _interrupted(record):
            problems.append(f"{manifest}: {_INTERRUPTED}")
        else:
            listed = set(record.get("files", {}))
            for name in sorted(listed):
                if exp_dir / name in skip:
                    continue
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
    metrics, runs = stored(exp_dir / "metrics.csv"), exp_dir / "runs.csv"
    if metrics.is_file() != runs.is_file():
        have, lack = (metrics, runs) if metrics.is_file() else (runs, metrics)
        problems.append(f"{have}: has no {table_name(lack)} beside it (the two are written "
                        f"together; rerun the experiment to rebuild both)")
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
