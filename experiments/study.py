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
    "findings",
    "load",
    "locked",
    "prepare_cells",
    "print_error",
    "published_runs",
    "reference_inputs",
    "references",
    "refusal",
    "report_modules",
    "results_dir",
    "run_grid",
    "scale_of",
    "verify_inputs",
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
    """Hold an exclusive lock on the results folder for the whole command: a second command
    that writes into the same folder stops at once with a message. The OS releases the lock when
    the process ends, however it ends, so a killed run leaves no stale lock.

    The lock file is opened without following a symbolic link (``O_NOFOLLOW``) and must be a
    plain file with no other name, so it can never truncate another file; and a folder holding
    a symbolic link that leads out of it is refused (``links_out``): no command writes or
    deletes through one."""
    import fcntl
    import stat

    try:
        results.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(f"cannot create the results folder {results} "
                         f"({type(err).__name__}: {err})") from None
    path = results / ".lock"
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o666)
    except OSError as err:
        why = ("it is a symbolic link; remove it" if path.is_symlink() else
               f"{type(err).__name__}: {err}")
        raise UsageError(f"cannot take the lock {path} ({why})") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
        os.close(fd)
        raise UsageError(f"cannot take the lock {path}: it is not a plain file of its own "
                         f"(a hard link or a special file); remove it")
    handle = os.fdopen(fd, "r+")  # held (and locked) for the whole command
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            lines = handle.read(400).strip().splitlines()
            holder = lines[-1].strip() if lines else "another process"
            raise UsageError(f"{results} is in use by {holder}; wait for it to finish (or run "
                             f"with another --results folder)") from None
        links = links_out(results)
        if links:
            raise UsageError(f"{results} holds symbolic link(s) leading out of it, through "
                             f"which nothing is written or deleted: "
                             f"{', '.join(str(p) for p in links[:3])}; replace them with real "
                             f"folders or files")
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} ({' '.join(sys.argv[:3])})\n")
        handle.flush()
        yield
    finally:
        handle.close()


def links_out(results: Path) -> list[Path]:
    """The symbolic links under ``results`` (not followed) whose target lies outside it:
    writing into a folder reached through one, or deleting its files, would act outside the
    results folder."""
    root = Path(os.path.realpath(results))
    found = []
    for folder, dirs, files in os.walk(results):
        for name in (*dirs, *files):
            path = Path(folder, name)
            if path.is_symlink():
                target = Path(os.path.realpath(path))
                if not target.is_relative_to(root):
                    found.append(path)
    return sorted(found)


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
             extra_tables=None, quiet=False, keep=()) -> tuple[int, object]:
    """Run the cells, aggregate, report. Returns (failed cells, runs frame or None).

    ``keep``: run_ids published before (``--seeds``) that the aggregation keeps, in their
    order, ahead of this command's cells."""
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
        ids = list(keep) + [c.run_id for c in cells if c.run_id not in set(keep)]
        out = agg.aggregate(exp_dir, ids, extra=extra_tables)
    except agg.AggregateError as err:
        print_error(str(err))
        return max(1, failed), None
    if out["stale"] and not quiet:
        print(f"  note: {len(out['stale'])} run folder(s) in {exp_dir / 'runs'} are not cells "
              f"of this grid and were left out")
    runs = out["runs"]
    if "outcome" in runs and not quiet:
        ok = runs[runs["status"] == "ok"]
        other = ok["outcome"][ok["outcome"].astype(str) != "converged"].value_counts()
        if len(other):
            counts = ", ".join(f"{n} {name}" for name, n in other.items())
            print(f"  note: {len(ok) - int(other.sum())} of {len(ok)} finished runs converged; "
                  f"{counts} (outcome in runs.csv)")
    print(f"  → {', '.join(str(p) for p in out['written'])}", flush=True)
    return failed, runs


def run_grid(grid, results: Path, args, *, seeds=None, launcher="local", slurm=None,
              pool=None) -> int:
    """One experiment, including the extension rounds of a step-size selection. Returns the
    number of failed cells."""
    from experiments import selection as sel

    exp_dir = results / grid.name
    scaled = grid.scaled(scale_of(args))
    keep = published_runs(grid, results, args, seeds)
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
                                 pool=pool, keep=keep)
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


def published_runs(grid, results: Path, args, seeds) -> list[str]:
    """The run_ids an experiment's published CSVs hold that a ``--seeds`` run keeps: it adds its
    runs to them (the published rows of other seeds stay). The published runs.csv must verify
    against its manifest first. A step-size selection is chosen over all of its seeds at once,
    so a ``--seeds`` run of one is refused where other seeds are published. Without ``seeds``:
    [] (a plain run publishes exactly the grid's cells)."""
    import pandas as pd

    from experiments.checks import verify_manifest_file

    path = results / grid.name / "runs.csv"
    if seeds is None or not path.exists():
        return []
    problem = verify_manifest_file(path)
    if problem:
        raise UsageError(f"{problem}; --seeds adds runs to the published CSVs, which must "
                         f"verify first (rerun without --seeds, or use another --results "
                         f"folder)")
    try:
        runs = pd.read_csv(path, usecols=["run_id", "seed"], dtype={"run_id": str})
    except (ValueError, pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise UsageError(f"{path}: not a readable runs.csv ({err})") from err
    if grid.scaled(scale_of(args)).select is not None:
        others = sorted(set(runs["seed"].dropna().astype(int)) - set(seeds))
        if others:
            raise UsageError(f"{grid.name}: its published selection covers seed(s) "
                             f"{', '.join(map(str, others))}, and a selection is chosen over "
                             f"all its seeds at once: run it with every seed (no --seeds), or "
                             f"use another --results folder")
        return []
    return runs["run_id"].dropna().tolist()


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


def reference_inputs(results: Path) -> None:
    """Refuse (``UsageError``) to compute references without verified inputs: the runs.csv of
    every experiment, each checked against its manifest. No runs.csv at all is refused too
    (references.csv would be empty)."""
    from experiments.checks import verify_manifest_file

    runs = sorted(results.glob("*/runs.csv"))
    if not runs:
        raise UsageError(f"no experiment results (<experiment>/runs.csv) under {results}: run "
                         f"an experiment first; references.csv not written")
    problems = [p for p in map(verify_manifest_file, runs) if p]
    if problems:
        raise UsageError(refusal(results, problems, "references.csv"))


def refusal(results: Path, problems: list[str], what: str) -> str:
    """One line: the results a command would read fail validation, so it wrote nothing."""
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return (f"the results under {results} fail validation, so {what} was not written: "
            f"{problems[0]}{more}; `python -m experiments check --results {results}` lists "
            f"every problem")


def verify_inputs(results: Path, experiments: list[str] | None = None, *,
                  writing: tuple[str, ...] = ()) -> list[str]:
    """Problems with the files a report reads: ``check`` on ``results`` (or on the named
    experiments, and then also ``references.csv``), leaving out the results folder's files in
    ``writing``, which the caller is about to replace."""
    from experiments.checks import check_results, verify_manifest_file

    _, problems = check_results(results, experiments, ignore=[results / n for n in writing])
    refs = results / "references.csv"
    if experiments and refs.exists():
        problems += [p for p in [verify_manifest_file(refs)] if p]
    return problems


def references(results: Path) -> int:
    from experiments.references import write_references

    try:
        reference_inputs(results)
        path = write_references(results)
    except UsageError as err:
        print_error(f"references: {err}")
        return 1
    except (OSError, ValueError) as err:
        print_error(f"references: {type(err).__name__}: {err}")
        return 1
    print(f"references → {path}")
    return 0


def findings(results: Path) -> int:
    """Write FINDINGS.md (its inputs verified by the caller); 1 with a message if it cannot
    be written."""
    _, _, findings = report_modules()
    try:
        path = findings.write_findings(results)
    except (OSError, ValueError) as err:
        print_error(f"writing {results / 'FINDINGS.md'} failed ({type(err).__name__}: {err})")
        return 1
    print(f"findings → {path}")
    return 0


def figures(results: Path, experiments: list[str] | None) -> int:
    figures, summary, findings = report_modules()
    problems = verify_inputs(results, experiments,
                             writing=() if experiments else ("summary.csv", "FINDINGS.md"))
    if problems:
        print_error(f"the results under {results} fail validation; no figures drawn:\n  "
                    + "\n  ".join(problems))
        return 1
    try:
        paths, failures = figures.make_figures(results, experiments or None)
        for p in paths:
            print(p)
        from experiments.checks import add_to_manifest

        for table in (p for p in paths if p.suffix in (".csv", ".md")):  # derived: checked too
            add_to_manifest(table.parent, [table])
        if not experiments:
            print(f"summary → {summary.write_summary(results)}")
            print(f"findings → {findings.write_findings(results)}")
    except Exception as err:  # report, do not hide: the CSVs are intact either way
        print_error(f"drawing from {results} failed: {type(err).__name__}: {err}")
        return 1
    if failures:
        print_error(f"{len(failures)} figure(s) could not be drawn (the others were):")
        for failure in failures:
            print(f"  {failure.splitlines()[0] if failure else failure}", file=sys.stderr)
        return 1
    return 0
