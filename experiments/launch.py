"""Running many ensembles: in this process, in local worker processes, or as a SLURM job array.

The unit of work is an ensemble group (``runner.group_ensembles``): cells that train together
as one batched model. Groups are independent and each writes only its members' run folders,
so the three launchers produce the same folders. ``jobs = 1`` runs in this process;
``jobs > 1`` uses a ``ProcessPoolExecutor`` with the ``spawn`` start method (each worker imports
torch afresh and runs with one intra-op thread, so N jobs use N cores and results do not depend
on N). A worker dies with its parent (Linux: the parent-death signal), so killing the main
process never leaves workers writing beside a rerun. ``launcher="slurm"`` submits one
``submitit`` job array (``pip install -e ".[cluster]"``). Already complete cells are skipped
before anything is launched.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from experiments.runner import Cell, Outcome, cell_payload, complete, group_ensembles, run_ensemble

__all__ = ["SUBMITIT_MISSING", "WorkerDied", "run_cells", "slurm_unavailable",
           "submitit_available", "worker_pool"]

SUBMITIT_MISSING = ("--launcher slurm needs the optional package submitit: "
                    "pip install -e \".[cluster]\"")


class WorkerDied(RuntimeError):
    """A worker process died, so its pool can run nothing more (the message says what to do)."""


def submitit_available() -> bool:
    try:
        import submitit  # noqa: F401
    except ImportError:
        return False
    return True


def slurm_unavailable() -> str:
    """Why ``--launcher slurm`` cannot submit from this machine ("" when it can): submitit
    missing, or SLURM's ``srun`` and ``sbatch`` (which submitit calls) not on the PATH."""
    if not submitit_available():
        return SUBMITIT_MISSING
    missing = [c for c in ("srun", "sbatch") if shutil.which(c) is None]
    if missing:
        return (f"--launcher slurm needs SLURM's {' and '.join(missing)} on the PATH, which "
                f"this machine lacks: run from a SLURM login node, or use --launcher local")
    return ""


def _entry(payloads: list[dict], checkpoint_seconds: float) -> list[Outcome]:
    """What a worker process or cluster job runs (module level, so it pickles by name): the
    plugin modules first (``experiments.plugins``; a fresh interpreter knows only the library's
    own probes, estimators and methods), then the ensemble."""
    from experiments.plugins import load

    load()
    return run_ensemble(payloads, threads=1, checkpoint_seconds=checkpoint_seconds)


def _die_with_parent(parent: int) -> None:
    """Worker initialiser: ask the kernel to kill this process when its parent dies (Linux
    ``prctl(PR_SET_PDEATHSIG)``); elsewhere, at least exit if the parent is already gone."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:
        os._exit(1)


def worker_pool(jobs: int) -> ProcessPoolExecutor:
    """``jobs`` spawned worker processes that die with this process."""
    return ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn"),
                               initializer=_die_with_parent, initargs=(os.getpid(),))


def run_cells(
    cells: list[Cell],
    *,
    jobs: int = 1,
    launcher: str = "local",
    progress: bool | None = None,
    slurm: dict[str, Any] | None = None,
    cluster: str = "slurm",
    log_dir: Path | None = None,
    pool: ProcessPoolExecutor | None = None,
    checkpoint_seconds: float = 30.0,
    max_members: int | None = None,
) -> list[Outcome]:
    """Run every cell (grouped into ensembles); returns one ``Outcome`` per cell, in order.

    ``slurm``: ``partition``, ``time`` (minutes), ``gpus_per_node``; ``cluster="local"`` runs
    the same submitit job array with submitit's local executor (used by the tests). ``pool``: an
    open ``worker_pool`` to reuse (``reproduce`` keeps one for every experiment).
    ``max_members`` caps an ensemble's size (1: every run on its own).
    """
    if progress is None:
        progress = sys.stderr.isatty()
    outcomes: dict[str, Outcome] = {}
    pending = []
    for cell in cells:
        prov = complete(cell)
        if prov is not None:
            outcomes[cell.run_id] = Outcome(cell.run_id, prov["status"],
                                            prov.get("message", ""), "skipped", 0.0)
        else:
            pending.append(cell)
    groups = group_ensembles(pending, **({} if max_members is None
                                         else {"max_members": max_members}))
    name = cells[0].experiment if cells else ""
    bar = tqdm(total=len(cells), initial=len(cells) - len(pending), disable=not progress,
               unit="run", desc=name)
    try:
        if launcher == "slurm":
            done = _submitit(groups, jobs, slurm or {}, cluster, log_dir, bar,
                             checkpoint_seconds)
        elif pool is not None and groups:
            done = _in_pool(pool, groups, bar, checkpoint_seconds)
        elif jobs <= 1 or len(groups) <= 1:
            done = []
            for group in groups:
                result = run_ensemble(group, threads=1, checkpoint_seconds=checkpoint_seconds)
                done += result
                bar.update(len(result))
        else:
            with worker_pool(min(jobs, len(groups))) as own:
                done = _in_pool(own, groups, bar, checkpoint_seconds)
    finally:
        bar.close()
    for outcome in done:
        outcomes[outcome.run_id] = outcome
    return [outcomes[c.run_id] for c in cells]


def _in_pool(pool: ProcessPoolExecutor, groups: list[list[Cell]], bar,
             checkpoint_seconds: float) -> list[Outcome]:
    """Run the groups on the pool. A worker that dies (killed, out of memory) breaks the whole
    pool (``concurrent.futures`` ends its other workers too): ``WorkerDied`` then stops the
    command, whose unfinished runs keep their folders and checkpoints for a rerun to resume."""
    done = []
    name = groups[0][0].experiment if groups and groups[0] else ""
    futures: set = set()
    try:
        owner = {}
        for g in groups:
            owner[pool.submit(_entry, [cell_payload(c) for c in g], checkpoint_seconds)] = g
            futures = set(owner)
        while futures:
            finished, futures = wait(futures, return_when=FIRST_COMPLETED)
            for f in finished:
                try:
                    result = f.result()
                except BrokenProcessPool:
                    raise
                except Exception as err:  # the ensemble's own code raised in the worker
                    result = [Outcome(c.run_id, "failed",
                                      f"worker process: {type(err).__name__}: {err}", "ran", 0.0)
                              for c in owner[f]]
                done += result
                bar.update(len(result))
    except BrokenProcessPool:
        for f in futures:
            f.cancel()
        raise WorkerDied(f"a worker process died (killed, or out of memory) while {name} ran; "
                         f"the runs not finished by then were stopped and keep their "
                         f"checkpoints: run the same command again to resume them") from None
    except BaseException:
        for f in futures:
            f.cancel()
        raise
    return done


def _submitit(groups: list[list[Cell]], jobs: int, slurm: dict, cluster: str,
              log_dir: Path | None, bar, checkpoint_seconds: float) -> list[Outcome]:
    if not groups:
        return []
    try:
        import submitit
    except ImportError as err:
        raise RuntimeError(SUBMITIT_MISSING) from err
    first = groups[0][0]
    folder = log_dir or Path(first.run_dir).parents[1] / "submitit"
    executor = submitit.AutoExecutor(folder=str(folder), cluster=cluster)
    params: dict[str, Any] = {"timeout_min": int(slurm.get("time") or 60), "cpus_per_task": 1,
                              "name": first.experiment}
    if cluster == "slurm":
        params["slurm_array_parallelism"] = max(1, int(jobs))
        if slurm.get("partition"):
            params["slurm_partition"] = slurm["partition"]
        if slurm.get("gpus_per_node") is not None:
            params["gpus_per_node"] = int(slurm["gpus_per_node"])
    executor.update_parameters(**params)
    payloads = [[cell_payload(c) for c in g] for g in groups]
    job_list = executor.map_array(_entry, payloads, [checkpoint_seconds] * len(payloads))
    done = []
    for group, job in zip(groups, job_list, strict=True):
        try:
            result = job.result()
        except Exception as err:  # the job itself died (killed, out of time, node failure)
            result = [Outcome(c.run_id, "failed", f"cluster job {job.job_id}: {err}", "ran", 0.0)
                      for c in group]
        done += result
        bar.update(len(result))
    return done
