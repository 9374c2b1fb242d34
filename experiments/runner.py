"""Running the cells of an ensemble into their run folders: train (resuming), record
(docs/results.md). ``experiments.cells`` prepares and groups the cells.

A run folder ``results/<experiment>/runs/<run_id>/`` holds

``config.json``      {run_id, experiment, config (the nested run configuration), lr_source,
                     selection_round}
``provenance.json``  code version (git commit, dirty flag), package versions, device, host,
                     command line, start/end time, ``status`` (running, ok, diverged, failed),
                     ``message``, how training stopped, the SHA-256 of every file
                     written (with the row count of each CSV), checkpoint included, and the
                     ``contract``: the declarations of the metrics and tables it wrote and
                     the baselines of every registered estimator (``vi.contract.record``)
``metrics.csv``      the run's tidy rows (``vi.training.ROW_COLUMNS``)
``checkpoint.pt``    the run's full state (model, optimisers, local table, random streams, rows)
``tables/*.csv``     the run's probe tables (``gaps``, ``images``, ``variance_sweep``, …)

Cells that share everything but their seed and step sizes train together as one batched
ensemble (``vi.training.Trainer``); each member still writes its own folder, as soon as it
finishes. Every file is written atomically (``vi.files.atomic_write``); ``provenance.json`` is
written last, so ``status`` ok/diverged means every other file is complete and its checksum
recorded.

Resuming: running members are checkpointed every ``checkpoint_seconds``; running the cell
again loads each member's checkpoint (after checking that it belongs to this cell: same run_id
and configuration) and continues. Because the rows, the random streams and every optimiser state
are in it, the final ``metrics.csv`` equals an uninterrupted run's on CPU, ``wall_s`` aside.

Cost alone: a member's ``run_seconds`` is its share of its ensemble's epoch time, which depends
on how many members happened to batch with it. So before an ensemble trains, one member's
configuration is trained alone (K = 1) for ``CALIBRATION_EPOCHS`` timed epochs after one
warm-up epoch, in the same process and thread setting, and every member records
``seconds_per_epoch_alone``: the training seconds per epoch that run would take on its own
(``experiments.aggregate`` derives the published cost columns from it).

Divergence is a result: a non-finite loss, gradient or parameter ends a member ``diverged``;
the others go on. A write that fails (disk full, a file-size limit, a read-only folder) makes
that member ``failed`` with the OS error in its message: a run folder that cannot be prepared
fails before training, results that cannot be written fail when the member finishes, and a
periodic checkpoint that cannot be saved is noted in provenance while training goes on. Any
other exception ends the unfinished members of its ensemble ``failed`` (message and traceback
in provenance). Failed cells are rerun next time.
"""

from __future__ import annotations

import json
import platform
import shlex
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd

from experiments.cells import (
    MAX_MEMBERS,
    SELECTION,
    Cell,
    Outcome,
    PrepareError,
    cell_payload,
    group_ensembles,
    prepare,
    read_selection,
)
from experiments.schema import SchemaError
from vi.files import atomic_write

__all__ = [  # the preparation side is re-exported: callers need one import for a sweep
    "COMPLETE",
    "MAX_MEMBERS",
    "SELECTION",
    "Cell",
    "Outcome",
    "PrepareError",
    "base_provenance",
    "cell_payload",
    "complete",
    "group_ensembles",
    "prepare",
    "read_provenance",
    "read_selection",
    "run_ensemble",
    "write_csv",
]

COMPLETE = ("ok", "diverged")
ROOT = Path(__file__).resolve().parents[1]








# ------------------------------------------------------------------------------- preparing




















# ------------------------------------------------------------------------------ provenance


def _git(*args: str) -> str:
    try:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                             timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip()


def base_provenance(command: list[str] | None = None) -> dict[str, Any]:
    """What is the same for every run of one invocation: code version, environment, command."""
    import importlib.metadata as md

    commit = _git("rev-parse", "HEAD")
    # the code's state: the results a run writes are outputs, not a change to the code
    dirty = _git("status", "--porcelain", "--untracked-files=no", "--", ".",
                 ":(exclude)results", ":(exclude)results-quick") if commit else ""
    versions = {}
    for package in ("torch", "numpy", "pandas", "scipy", "scikit-learn", "mlxtend"):
        try:
            versions[f"{package.replace('-', '_')}_version"] = md.version(package)
        except md.PackageNotFoundError:
            versions[f"{package.replace('-', '_')}_version"] = ""
    return {
        "git_commit": commit,
        "git_dirty": bool(dirty) if commit else "",
        "python_version": platform.python_version(),
        **versions,
        "hostname": socket.gethostname(),
        "command": _command_line(command),
    }


def _command_line(command: list[str] | None) -> str:
    argv = list(command if command is not None else sys.argv)
    if argv and argv[0].endswith(("experiments/__main__.py", "experiments\\__main__.py")):
        argv[0:1] = ["python", "-m", "experiments"]
    return shlex.join(argv)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def read_provenance(run_dir: Path) -> dict | None:
    try:
        value = json.loads((Path(run_dir) / "provenance.json").read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return value if isinstance(value, dict) else None


def _write_json(path: Path, value: dict) -> None:
    atomic_write(path, json.dumps(value, indent=2, sort_keys=True, allow_nan=False) + "\n")


def write_csv(path: Path, frame: pd.DataFrame) -> dict[str, Any]:
    """Atomically write ``frame`` (floats as shortest round-trip repr); return its checksum."""
    import hashlib

    text = frame.to_csv(index=False, lineterminator="\n")
    atomic_write(path, text)
    return {"sha256": hashlib.sha256(text.encode()).hexdigest(), "rows": len(frame)}


# ------------------------------------------------------------------------------ one ensemble


def complete(cell: Cell) -> dict | None:
    """The provenance of a finished run of this cell (in the current ``--force`` session, if
    any), else None."""
    run_dir = Path(cell.run_dir)
    prov = read_provenance(run_dir)
    if not prov or prov.get("status") not in COMPLETE or not (run_dir / "metrics.csv").is_file():
        return None
    if cell.force_token is not None and prov.get("force_token") != cell.force_token:
        return None
    return prov


def _no_links(run_dir: Path) -> None:
    """Refuse (``OSError``, which fails the cell) a run folder, or its ``tables``, that is a
    symbolic link: files are never written or deleted through one (it may lead out of the
    results folder)."""
    for link in (run_dir, run_dir / "tables"):
        if link.is_symlink():
            raise OSError(f"{link} is a symbolic link; nothing is written or deleted through "
                          f"it (replace it with a real folder)")


def _clear(run_dir: Path) -> None:
    """Remove a run folder's results before it is run afresh (never through a symbolic link)."""
    _no_links(run_dir)
    tables = run_dir / "tables"
    for name in ("provenance.json", "metrics.csv", "checkpoint.pt"):
        (run_dir / name).unlink(missing_ok=True)
    if tables.is_dir():
        for f in tables.glob("*.csv"):
            f.unlink()


def _resume_state(cell: Cell) -> tuple[dict | None, str]:
    """The member state of an unfinished run of this cell, if a valid checkpoint is there."""
    from experiments.evaluate import CheckpointError, load_checkpoint_file

    run_dir = Path(cell.run_dir)
    ckpt = run_dir / "checkpoint.pt"
    if not ckpt.is_file():
        return None, ""
    prov = read_provenance(run_dir) or {}
    if cell.force_token is not None and prov.get("force_token") != cell.force_token:
        return None, "restarted: --force"
    try:
        state = load_checkpoint_file(ckpt)
    except (CheckpointError, OSError) as err:  # not worth losing the sweep: start afresh
        return None, f"restarted: checkpoint unreadable: {err}"
    if state.get("run_id") != cell.run_id or state.get("config") != cell.config:
        return None, "restarted: the checkpoint belongs to another configuration"
    if state.get("status") != "running":
        return None, "restarted: the checkpoint held a finished state without its results"
    return state, ""


#: timed epochs of the K = 1 calibration of an ensemble's epoch time (after one warm-up epoch)
CALIBRATION_EPOCHS = 3


def seconds_per_epoch_alone(config, datasets: dict | None = None,
                            epochs: int = CALIBRATION_EPOCHS) -> float | None:
    """Training seconds per epoch of ``config`` trained alone (an ensemble of one member), the
    mean over ``epochs`` timed epochs after one warm-up epoch (capped at the run's own
    ``max_epochs``), timed like the trainer times epochs (``wall_s``): the training steps only,
    no evaluation. None when no epoch can be timed (a run of at most one epoch)."""
    from vi.training import Trainer

    timed = min(int(epochs), int(config.training.max_epochs) - 1)
    if timed < 1:
        return None
    trainer = Trainer([config], datasets=datasets)
    trainer._train_epoch()  # warm-up: allocations, first-call dispatch
    before = trainer.elapsed[0]
    for _ in range(timed):
        trainer._train_epoch()
    return (trainer.elapsed[0] - before) / timed


def run_ensemble(cells: Sequence[Cell | dict], threads: int | None = 1,
                 checkpoint_seconds: float = 30.0) -> list[Outcome]:
    """Run (or resume, or skip) the cells of one ensemble group into their folders; never raises
    for a run's own failure. A cell with a ``force_token`` reruns unless it finished in that
    ``--force`` session. ``threads``: torch intra-op threads (1: results do not depend on how
    many workers share the machine)."""
    import torch

    cells = [Cell(**c) if isinstance(c, dict) else c for c in cells]
    outcomes: dict[str, Outcome] = {}
    pending = []
    for cell in cells:
        prov = complete(cell)
        if prov is not None:
            outcomes[cell.run_id] = Outcome(cell.run_id, prov["status"], prov.get("message", ""),
                                            "skipped", 0.0)
        else:
            pending.append(cell)
    if pending:
        previous = torch.get_num_threads()
        if threads is not None:
            torch.set_num_threads(threads)
        try:
            for o in _train(pending, checkpoint_seconds):
                outcomes[o.run_id] = o
        finally:
            torch.set_num_threads(previous)
    return [outcomes[c.run_id] for c in cells]


def _provenance(cell: Cell, old: dict, action: str, epoch: int | None) -> dict:
    return {**cell.provenance, "run_id": cell.run_id, "experiment": cell.experiment,
            "lr_source": cell.lr_source, "device": cell.config.get("device", ""),
            "started": old.get("started") if action == "resumed" else _now(),
            "finished": "", "status": "running", "message": "",
            "force_token": cell.force_token,
            "resumed": int(old.get("resumed", 0)) + (action == "resumed"),
            "resumed_from_epoch": epoch if action == "resumed" else None}


def _train(cells: list[Cell], checkpoint_seconds: float) -> list[Outcome]:
    import hashlib

    from vi.config import RunConfig
    from vi.probes import build_probes
    from vi.training import Trainer

    by_id = {c.run_id: c for c in cells}
    ensemble = hashlib.sha256(" ".join(sorted(by_id)).encode()).hexdigest()[:8]
    provs: dict[str, dict] = {}
    cpu0, t0 = time.process_time(), time.perf_counter()
    outcomes: dict[str, Outcome] = {}
    fresh, resumed = [], []
    for cell in cells:
        run_dir = Path(cell.run_dir)
        try:
            _no_links(run_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            old = read_provenance(run_dir) or {}
            state, note = _resume_state(cell)
            if state is None:
                _clear(run_dir)
            _write_json(run_dir / "config.json", {
                "run_id": cell.run_id, "experiment": cell.experiment, "config": cell.config,
                "lr_source": cell.lr_source, "selection_round": cell.selection_round})
            prov = _provenance(cell, old, "resumed" if state else "ran",
                               state["epoch"] if state else None)
            prov |= {"ensemble": ensemble, "ensemble_size": len(cells)}
            if note:
                prov["note"] = note
            _write_json(run_dir / "provenance.json", prov)
            provs[cell.run_id] = prov
        except OSError as err:  # this folder cannot be written: this cell fails, the rest run
            message = f"preparing the run folder failed: {type(err).__name__}: {err}"
            _failed_all([cell], provs, message, "")
            outcomes[cell.run_id] = Outcome(cell.run_id, "failed", message, "ran",
                                            time.perf_counter() - t0)
            continue
        (resumed if state else fresh).append((cell, state))
    groups: list[list[tuple[Cell, dict | None]]] = []
    if fresh:
        groups.append(fresh)
    by_epoch: dict[tuple, list] = {}
    for cell, state in resumed:
        by_epoch.setdefault((state["epoch"], state["step"]), []).append((cell, state))
    groups += list(by_epoch.values())
    datasets: dict = {}
    for group in groups:
        group_cells = [c for c, _ in group]
        action = "resumed" if group[0][1] is not None else "ran"
        last_save = [time.perf_counter()]

        def on_epoch(trainer: Trainer, last_save=last_save) -> None:
            if time.perf_counter() - last_save[0] < checkpoint_seconds:
                return
            for k in range(trainer.members):
                cell = by_id[trainer.run_ids[k]]
                try:
                    _save_checkpoint(Path(cell.run_dir) / "checkpoint.pt",
                                     trainer.member_state(k))
                except OSError as err:  # a checkpoint only saves time: train on, note it
                    provs[cell.run_id].setdefault(
                        "note", f"checkpoint not saved at epoch {trainer.epoch}: "
                                f"{type(err).__name__}: {err}")
            last_save[0] = time.perf_counter()

        def on_done(results, action=action) -> None:
            for result in results:
                cell = by_id[result.run_id]
                outcomes[cell.run_id] = _write_member(cell, provs[cell.run_id], result, action,
                                                      cpu0, t0)

        try:
            configs = [RunConfig.from_dict(c.config) for c in group_cells]
            alone = seconds_per_epoch_alone(configs[0], datasets)
            for c in group_cells:
                provs[c.run_id]["seconds_per_epoch_alone"] = (
                    None if alone is None else round(alone, 5))
            if action == "resumed":
                trainer = Trainer.from_states([s for _, s in group], datasets=datasets)
            else:
                trainer = Trainer(configs, run_ids=[c.run_id for c in group_cells],
                                  experiment=group_cells[0].experiment, datasets=datasets)
            probes = build_probes(configs[0].probes, configs[0])
            trainer.fit(probes, on_epoch=on_epoch, on_done=on_done, progress=False)
        except Exception as err:  # a bug or a resource problem: record it, keep the sweep going
            left = [c for c in group_cells if c.run_id not in outcomes]
            outcome = _failed_all(left, provs, f"{type(err).__name__}: {err}",
                                  traceback.format_exc())
            for c in left:
                outcomes[c.run_id] = Outcome(c.run_id, "failed", outcome.message, action,
                                             time.perf_counter() - t0)
    return [outcomes[c.run_id] for c in cells if c.run_id in outcomes]


def _save_checkpoint(path: Path, state: dict) -> dict[str, Any]:
    """Serialise in memory, then write the bytes atomically: a failing write then raises the
    ``OSError`` itself (torch's zip writer turns ENOSPC or EFBIG into a ``RuntimeError``).
    Returns the file's record for provenance ``files``: its SHA-256 and size."""
    import hashlib
    import io

    import torch

    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    atomic_write(path, data)
    return {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def _failed_all(cells: Sequence[Cell], provs: dict, message: str, tb: str) -> Outcome:
    for cell in cells:
        prov = provs.get(cell.run_id, {"run_id": cell.run_id, "experiment": cell.experiment})
        prov.update({"status": "failed", "outcome": "failed", "message": message,
                     "finished": _now()})
        if tb:
            prov["traceback"] = tb
        try:
            _write_json(Path(cell.run_dir) / "provenance.json", prov)
        except OSError:
            pass  # the folder itself is unwritable: the outcome still reports the failure
    first = cells[0].run_id if cells else ""
    return Outcome(first, "failed", message, "ran", 0.0)


def _write_member(cell: Cell, prov: dict, result, action: str, cpu0: float, t0: float
                  ) -> Outcome:
    """Write one finished member's folder; a write that fails makes the run ``failed``."""
    from vi import contract
    from vi.estimators import ESTIMATORS
    from vi.training import ROW_COLUMNS

    run_dir = Path(cell.run_dir)
    writing = "metrics.csv"  # the file being written, named if the write fails
    try:
        rows = pd.DataFrame(result.rows, columns=list(ROW_COLUMNS))
        files = {"metrics.csv": write_csv(run_dir / "metrics.csv", rows)}
        for name, frame in result.tables.items():
            writing = f"tables/{name}.csv"
            ident = pd.DataFrame([result.identity] * len(frame))
            table = pd.concat([ident, frame.reset_index(drop=True)], axis=1)
            files[writing] = write_csv(run_dir / writing, table)
        writing = "checkpoint.pt"
        files["checkpoint.pt"] = _save_checkpoint(run_dir / "checkpoint.pt", result.state)
        writing = "provenance.json"
        prov.update({"status": result.status, "message": result.message, "finished": _now(),
                     "stop_reason": result.stop_reason, "converged": result.converged,
                     **result.record(),
                     "epochs_run": result.epochs_run, "best_epoch": result.best_epoch,
                     "run_seconds": round(result.elapsed, 3), **result.data_info,
                     "ensemble_cpu_seconds": round(time.process_time() - cpu0, 3),
                     "ensemble_wall_seconds": round(time.perf_counter() - t0, 3),
                     "files": files,
                     # what a reader that never imports this run's extensions must know
                     "contract": contract.record(
                         rows["metric"].dropna(), result.tables,
                         {name: e.baselines for name, e in ESTIMATORS.items()})})
        _write_json(run_dir / "provenance.json", prov)
    except (OSError, SchemaError) as err:
        message = f"writing {writing} failed: {type(err).__name__}: {err}"
        prov.update({"status": "failed", "outcome": "failed", "message": message,
                     "finished": _now()})
        try:
            _write_json(run_dir / "provenance.json", prov)
        except OSError:
            pass
        return Outcome(cell.run_id, "failed", message, action, time.perf_counter() - t0)
    return Outcome(cell.run_id, result.status, result.message, action, time.perf_counter() - t0)


