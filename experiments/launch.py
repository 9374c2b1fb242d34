"""Running many cells: in this process, in local worker processes, or as a SLURM job array.

Cells are independent and each writes only its own run folder, so the three launchers produce
the same folders. ``jobs = 1`` runs in this process; ``jobs > 1`` uses a
``ProcessPoolExecutor`` with the ``spawn`` start method (each worker imports torch afresh and
runs with one intra-op thread, so N jobs use N cores and results do not depend on N);
``launcher="slurm"`` submits one ``submitit`` job array (``pip install -e ".[cluster]"``).
Already complete cells are skipped before anything is launched.
"""

from __future__ import annotations

import sys
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from experiments.runner import Cell, Outcome, _complete, cell_payload, run_cell

__all__ = ["SUBMITIT_MISSING", "run_cells", "submitit_available", "worker_pool"]

SUBMITIT_MISSING = ("--launcher slurm needs the optional package submitit: "
                    "pip install -e \".[cluster]\"")


def submitit_available() -> bool:
    try:
        import submitit  # noqa: F401
    except ImportError:
        return False
    return True


def _entry(payload: dict, force: bool) -> Outcome:
    """What a worker process or cluster job runs (module level, so it pickles by name)."""
    return run_cell(payload, force=force, threads=1)


def run_cells(
    cells: list[Cell],
    *,
    jobs: int = 1,
    launcher: str = "local",
    force: bool = False,
    progress: bool | None = None,
    slurm: dict[str, Any] | None = None,
    cluster: str = "slurm",
    log_dir: Path | None = None,
    pool: ProcessPoolExecutor | None = None,
) -> list[Outcome]:
    """Run every cell; returns one ``Outcome`` per cell, in the cells' order.

    ``slurm``: ``partition``, ``time`` (minutes), ``gpus_per_node``; ``cluster="local"`` runs the
    same submitit job array with submitit's local executor (used by the tests). ``pool``: an
    open ``worker_pool`` to reuse (``reproduce`` keeps one for every experiment, so workers
    import torch once).
    """
    if progress is None:
        progress = sys.stderr.isatty()
    outcomes: dict[str, Outcome] = {}
    pending = []
    for cell in cells:
        prov = None if force else _complete(Path(cell.run_dir))
        if prov is not None:
            outcomes[cell.run_id] = Outcome(cell.run_id, prov["status"],
                                            prov.get("message", ""), "skipped", 0.0)
        else:
            pending.append(cell)
    name = cells[0].experiment if cells else ""
    bar = tqdm(total=len(cells), initial=len(cells) - len(pending), disable=not progress,
               unit="run", desc=name)
    try:
        if launcher == "slurm":
            done = _submitit(pending, force, jobs, slurm or {}, cluster, log_dir, bar)
        elif pool is not None and pending:
            done = _in_pool(pool, pending, force, bar)
        elif jobs <= 1 or len(pending) <= 1:
            done = []
            for cell in pending:
                done.append(run_cell(cell, force=force, threads=1))
                bar.update(1)
        else:
            with worker_pool(min(jobs, len(pending))) as own:
                done = _in_pool(own, pending, force, bar)
    finally:
        bar.close()
    for outcome in done:
        outcomes[outcome.run_id] = outcome
    return [outcomes[c.run_id] for c in cells]


def worker_pool(jobs: int) -> ProcessPoolExecutor:
    """``jobs`` spawned worker processes (fresh interpreters: no state shared with this one)."""
    return ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn"))


def _in_pool(pool: ProcessPoolExecutor, cells: list[Cell], force: bool, bar) -> list[Outcome]:
    done = []
    owner = {pool.submit(_entry, cell_payload(c), force): c for c in cells}
    futures = set(owner)
    try:
        while futures:
            finished, futures = wait(futures, return_when=FIRST_COMPLETED)
            for f in finished:
                try:
                    done.append(f.result())
                except Exception as err:  # the worker died (killed, out of memory): rerun later
                    done.append(Outcome(owner[f].run_id, "failed",
                                        f"worker process: {type(err).__name__}: {err}", "ran",
                                        0.0))
                bar.update(1)
    except BaseException:
        for f in futures:
            f.cancel()
        raise
    return done


def _submitit(cells: list[Cell], force: bool, jobs: int, slurm: dict, cluster: str,
              log_dir: Path | None, bar) -> list[Outcome]:
    if not cells:
        return []
    try:
        import submitit
    except ImportError as err:
        raise RuntimeError(SUBMITIT_MISSING) from err
    folder = log_dir or Path(cells[0].run_dir).parents[1] / "submitit"
    executor = submitit.AutoExecutor(folder=str(folder), cluster=cluster)
    params: dict[str, Any] = {"timeout_min": int(slurm.get("time") or 60), "cpus_per_task": 1,
                              "name": cells[0].experiment}
    if cluster == "slurm":
        params["slurm_array_parallelism"] = max(1, int(jobs))
        if slurm.get("partition"):
            params["slurm_partition"] = slurm["partition"]
        if slurm.get("gpus_per_node") is not None:
            params["gpus_per_node"] = int(slurm["gpus_per_node"])
    executor.update_parameters(**params)
    payloads = [cell_payload(c) for c in cells]
    job_list = executor.map_array(_entry, payloads, [force] * len(payloads))
    done = []
    for cell, job in zip(cells, job_list, strict=True):
        try:
            done.append(job.result())
        except Exception as err:  # the job itself died (killed, out of time, node failure)
            done.append(Outcome(cell.run_id, "failed", f"cluster job {job.job_id}: {err}",
                                "ran", 0.0))
        bar.update(1)
    return done
