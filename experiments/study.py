"""Running experiments for the command line: results folders and their lock, ``--force``
sessions, one experiment (with a step-size selection's extension rounds), and the steps after
training (references, figures, summary, findings). ``experiments.cli`` parses the commands and
calls these.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

__all__ = [
    "DEFAULT_RESULTS",
    "QUICK_RESULTS",
    "UsageError",
    "figures",
    "load",
    "locked",
    "prepare_cells",
    "print_error",
    "references",
    "report_modules",
    "results_dir",
    "run_grid",
    "scale_of",
    "writable_folder",
]

DEFAULT_RESULTS = Path("results")
QUICK_RESULTS = Path("results-quick")


class UsageError(Exception):
    """A wrong request: printed as one line, exit status 2, nothing written."""


def print_error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)


def scale_of(args) -> str | None:
    if args.quick and args.scale not in (None, "quick"):
        raise UsageError("--quick and --scale name two scales; give one")
    return "quick" if args.quick else args.scale


def writable_folder(path: Path, what: str) -> None:
    if path.exists() and not path.is_dir():
        raise UsageError(f"{what} {path} exists and is not a folder")
    parent = next((p for p in [path, *path.parents] if p.exists()), Path("."))
    if not parent.is_dir():
        raise UsageError(f"{what} {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write under {parent} (for {what} {path})")


def results_dir(args) -> Path:
    results = args.results or (QUICK_RESULTS if scale_of(args) == "quick" else DEFAULT_RESULTS)
    writable_folder(results, "--results")
    return results


@contextlib.contextmanager
def locked(results: Path) -> Iterator[None]:
    """Hold an exclusive lock on the results folder for the whole command: a second `run` on
    the same folder stops at once with a message. The OS releases the lock when the process
    ends, however it ends, so a killed run leaves no stale lock."""
    import fcntl

    results.mkdir(parents=True, exist_ok=True)
    path = results / ".lock"
    handle = open(path, "a+")  # held (and locked) for the whole command
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise UsageError(f"{results} is in use by {holder}; wait for it to finish (or run "
                             f"with another --results folder)") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} ({' '.join(sys.argv[:3])})\n")
        handle.flush()
        yield
    finally:
        handle.close()


def load(name: str):
    from experiments.grids import GridError, load_grid

    try:
        return load_grid(name)
    except GridError as err:
        raise UsageError(str(err)) from err


def prepare_cells(grid, results: Path, args, seeds=None, candidates=None,
                  selection_pending=False):
    from experiments.grids import GridError
    from experiments.runner import PrepareError, prepare

    try:
        return prepare(grid, results, scale=scale_of(args), seeds=seeds,
                       device=getattr(args, "device", None), candidates=candidates,
                       default_lr=getattr(args, "default_lr", False),
                       selection_pending=selection_pending)
    except (PrepareError, GridError) as err:
        raise UsageError(str(err)) from err


def _force_session(exp_dir: Path, cells, force: bool, session: list[str]) -> Path:
    """Give every cell the token of the current ``--force`` session (resumed when the same
    forced command is repeated); refuse a plain run while a forced one is unfinished.

    ``session``: the run_ids of the command's first round of cells; they name the session, so
    that the extension rounds of a step-size selection (more cells) stay in it."""
    path = exp_dir / ".force.json"
    ids = sorted(session)
    pending = None
    if path.is_file():
        try:
            pending = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            pending = None
    if not force:
        if pending is not None:
            raise UsageError(f"{exp_dir.name}: an interrupted `--force` run is unfinished; "
                             f"repeat it with --force to finish it (or delete {path} to keep "
                             f"the runs as they are)")
        return path
    if pending is not None and pending.get("run_ids") == ids:
        token = pending["token"]
    else:
        from vi.files import atomic_write

        token = uuid.uuid4().hex[:12]
        atomic_write(path, json.dumps({"token": token, "run_ids": ids}) + "\n")
    for cell in cells:
        cell.force_token = token
    return path


def _execute(grid, cells, results: Path, args, *, launcher="local", slurm=None, pool=None,
             extra_tables=None, quiet=False) -> tuple[int, object]:
    """Run the cells, aggregate, report. Returns (failed cells, runs frame or None)."""
    from experiments import aggregate as agg
    from experiments.launch import run_cells
    from experiments.runner import base_provenance

    prov = base_provenance(getattr(args, "argv", None))
    for cell in cells:
        cell.provenance = prov
    n_sel = sum(c.lr_source in ("selected", "shared") for c in cells)
    if grid.lr == "selected" and n_sel < len(cells) and not quiet:
        sources = sorted({c.lr_source for c in cells} - {"selected", "shared"})
        print(f"{grid.name}: {len(cells) - n_sel} of {len(cells)} runs take some or all of "
              f"their step sizes from the grid, not from the lr_selection in {results} "
              f"(lr_source: {'; '.join(sources)})", file=sys.stderr)
    t0 = time.perf_counter()
    outcomes = run_cells(cells, jobs=args.jobs, launcher=launcher, slurm=slurm, pool=pool,
                         max_members=1 if args.no_ensemble else None,
                         checkpoint_seconds=args.checkpoint_seconds)
    seconds = time.perf_counter() - t0
    counts: dict[str, int] = {}
    for o in outcomes:
        counts[o.status] = counts.get(o.status, 0) + 1
    actions = {a: sum(o.action == a for o in outcomes) for a in ("ran", "resumed", "skipped")}
    exp_dir = results / grid.name
    print(f"{grid.name}: {len(cells)} runs ({', '.join(f'{v} {k}' for k, v in actions.items())})"
          f" in {seconds:.0f} s: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())),
          flush=True)
    for o in outcomes:
        if o.status == "failed":
            print(f"  failed: {o.run_id}: {o.message}")
    failed = counts.get("failed", 0)
    try:
        out = agg.aggregate(exp_dir, [c.run_id for c in cells], extra=extra_tables)
    except agg.AggregateError as err:
        print_error(str(err))
        return max(1, failed), None
    if out["stale"] and not quiet:
        print(f"  note: {len(out['stale'])} run folder(s) in {exp_dir / 'runs'} are not cells "
              f"of this grid and were left out")
    runs = out["runs"]
    if "converged" in runs and not quiet:
        ok = runs[runs["status"] == "ok"]
        not_conv = int((ok["converged"].astype(str) == "False").sum())
        if not_conv:
            print(f"  note: {not_conv} of {len(ok)} finished runs hit max_epochs before their "
                  f"validation ELBO reached a plateau (converged = False in runs.csv)")
    print(f"  → {', '.join(str(p) for p in out['written'])}", flush=True)
    return failed, runs


def run_grid(grid, results: Path, args, *, seeds=None, launcher="local", slurm=None,
              pool=None) -> int:
    """One experiment, including the extension rounds of a step-size selection. Returns the
    number of failed cells."""
    from experiments import selection as sel

    exp_dir = results / grid.name
    scaled = grid.scaled(scale_of(args))
    candidates: dict[tuple, list] = {}
    failed = 0
    session: list[str] = []
    while True:
        cells = prepare_cells(grid, results, args, seeds=seeds, candidates=candidates)
        session = session or [c.run_id for c in cells]
        force_file = _force_session(exp_dir, cells, args.force, session)
        table = None
        if scaled.select is None:
            failed, _ = _execute(grid, cells, results, args, launcher=launcher, slurm=slurm,
                                 pool=pool)
            break
        failed, runs = _execute(grid, cells, results, args, launcher=launcher, slurm=slurm,
                                pool=pool, quiet=True)
        if runs is None:
            break
        table = sel.candidate_table(runs, scaled.select)
        grow = sel.extensions(table, scaled.select)
        if not grow:
            selected = sel.choose(table, scaled.select)
            _execute(grid, cells, results, args, launcher=launcher, slurm=slurm, pool=pool,
                     extra_tables={"selected": selected, "candidates": table})
            _report_selection(selected)
            break
        for key, new in grow.items():
            rnd = int(table[(table[sel.GROUP] == list(key)).all(axis=1)]["round"].max()) + 1
            candidates.setdefault(key, []).extend((c, rnd) for c in new)
        print(f"{grid.name}: {sum(len(v) for v in grow.values())} step-size candidates added "
              f"where the best sat at the edge of its grid", flush=True)
    if args.force and not failed:
        force_file.unlink(missing_ok=True)
    return failed


def _report_selection(selected) -> None:
    edge = selected[~selected["interior"].astype(bool)]
    unstable = selected[selected["unstable"].astype(bool)]
    print(f"  selection: {len(selected)} choices, {len(selected) - len(edge)} interior, "
          f"{int(selected['at_cap'].astype(bool).sum())} at the extension cap, "
          f"{len(unstable)} unstable")


def report_modules():
    try:
        from experiments import figures, findings, summary
    except ImportError as err:
        raise UsageError(f"figures need experiments.figures, summary and findings, which this "
                         f"checkout does not provide ({err})") from err
    return figures, summary, findings


def references(results: Path) -> int:
    from experiments.references import write_references

    try:
        path = write_references(results)
    except (OSError, ValueError) as err:
        print_error(f"references: {type(err).__name__}: {err}")
        return 1
    print(f"references → {path}")
    return 0


def figures(results: Path, experiments: list[str] | None) -> int:
    from experiments.aggregate import check_results

    figures, summary, findings = report_modules()
    _, problems = check_results(results, experiments)
    if problems:
        print_error(f"the results under {results} fail validation; no figures drawn:\n  "
             + "\n  ".join(problems))
        return 1
    try:
        paths, failures = figures.make_figures(results, experiments or None)
        for p in paths:
            print(p)
        from experiments.aggregate import add_to_manifest

        for table in (p for p in paths if p.suffix == ".csv"):  # derived tables, checked too
            add_to_manifest(table.parent, [table])
        if not experiments:
            print(f"summary → {summary.write_summary(results)}")
            print(f"findings → {findings.write_findings(results)}")
    except Exception as err:  # report, do not hide: the CSVs are intact either way
        print_error(f"drawing from {results} failed: {type(err).__name__}: {err}")
        return 1
    if failures:
        print_error(f"{len(failures)} figure(s) could not be drawn: " + "; ".join(failures))
        return 1
    return 0
