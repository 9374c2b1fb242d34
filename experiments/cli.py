"""``python -m experiments``: the study's command line.

    list                                   the experiments, what each shows, its default cost
    run EXPERIMENT [--quick | --scale S] [--seeds S ...] [--jobs N] [--no-ensemble]
        [--launcher local|slurm] [--partition P --time MIN --gpus-per-node G]
        [--results DIR] [--force] [--device D] [--default-lr] [--plugin MODULE ...]
    reproduce [--quick | --scale S] [--jobs N] [--results DIR] [--force] [--device D]
        [--default-lr] [--plugin MODULE ...]
    figures [--results DIR] [EXPERIMENT ...]
    references [--results DIR]
    findings [--results DIR]
    readme [--results DIR] [--readme FILE] [--check]
    data NAME [--seed S] [--test-fraction F] [--validation-fraction F] [--option K=V ...]
        [--path P] --out FILE.npz
    check [--results DIR] [EXPERIMENT ...]
    evaluate CHECKPOINT [--gaps] [--test-curve] [--iwae-k K] [--device D] [--out F]
        [--plugin MODULE ...]

``--plugin MODULE`` (or ``VI_PLUGINS``) imports a module defining a probe, estimator or method
first, here and in every worker process (``experiments.plugins``).

Exit status: 0 success; 1 something ran but a result is bad (a failed run, a check problem, a
figure that could not be drawn); 2 the request itself is wrong or cannot run now (unknown name,
bad option or configuration, missing data file, results folder in use) — reported in one
message before any file or folder is created; 130 interrupted.

``list``, ``figures``, ``findings`` and ``check`` never import torch or the training code.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

from experiments.study import (
    DEFAULT_RESULTS,
    QUICK_RESULTS,
    UsageError,
    figures,
    findings,
    load,
    locked,
    prepare_cells,
    print_error,
    published_runs,
    reference_inputs,
    references,
    refusal,
    report_modules,
    results_dir,
    run_grid,
    verify_inputs,
    writable_folder,
)

__all__ = ["main"]







class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one readable line, exit 2 (argparse's convention)
        self.print_usage(sys.stderr)
        raise UsageError(message)


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}"
                                             ) from None
        if value < low or value >= 2**32:
            raise argparse.ArgumentTypeError(f"expected an integer in [{low}, 2^32), got "
                                             f"{text!r}")
        return value

    return parse


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"expected a finite number of seconds >= 0, got "
                                         f"{text!r}")
    return value


def _path(text: str) -> Path:
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a path, got an empty string")
    return Path(text)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m experiments", description="The study: experiments, results "
                "CSVs, figures. See README 'Running the study'.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    sub.add_parser("list", help="the experiments, what each shows and its default cost")

    r = sub.add_parser("run", help="run one experiment's grid into RESULTS/EXPERIMENT/")
    r.add_argument("experiment", help="an experiment name (see `list`) or a grid .json file")
    _run_options(r)
    r.add_argument("--seeds", nargs="+", type=_int_at_least(0), metavar="S",
                   help="run these seeds instead of the grid's seed axis; their runs are added "
                        "to the published CSVs (other seeds' rows stay)")
    r.add_argument("--launcher", choices=("local", "slurm"), default="local")
    r.add_argument("--partition", help="SLURM partition (with --launcher slurm)")
    r.add_argument("--time", type=_int_at_least(1), metavar="MIN",
                   help="SLURM time limit per job in minutes (with --launcher slurm)")
    r.add_argument("--gpus-per-node", type=_int_at_least(0), metavar="G",
                   help="GPUs per SLURM job (with --launcher slurm)")

    rp = sub.add_parser("reproduce", help="every experiment, the references, every figure, the "
                                          "summary and the findings")
    _run_options(rp, jobs_default=2)

    f = sub.add_parser("figures", help="regenerate figures from the CSVs alone")
    f.add_argument("experiments", nargs="*", metavar="EXPERIMENT")
    f.add_argument("--results", type=_path, default=DEFAULT_RESULTS, metavar="DIR")

    rf = sub.add_parser("references", help="the reference models (no-latent Gaussian, factor "
                                           "analysis, PPCA) of every data split in RESULTS")
    rf.add_argument("--results", type=_path, default=DEFAULT_RESULTS, metavar="DIR")

    fi = sub.add_parser("findings", help="write RESULTS/FINDINGS.md from the CSVs")
    fi.add_argument("--results", type=_path, default=DEFAULT_RESULTS, metavar="DIR")

    rd = sub.add_parser("readme", help="rewrite the README's generated statements (findings, "
                                       "digits table) from the CSVs in RESULTS")
    rd.add_argument("--results", type=_path, default=DEFAULT_RESULTS, metavar="DIR")
    rd.add_argument("--readme", type=_path, default=None, metavar="FILE",
                    help="the README to rewrite (default: the repository's README.md)")
    rd.add_argument("--check", action="store_true",
                    help="write nothing; exit 1 if the generated blocks differ from the CSVs")

    d = sub.add_parser("data", help="write the exact data set a run uses to an .npz")
    d.add_argument("name", help="digits, mnist5k, ppca, nonlinear, mnist or frey")
    d.add_argument("--seed", type=_int_at_least(0), default=0, help="data seed (default 0)")
    d.add_argument("--test-fraction", type=float, default=0.2)
    d.add_argument("--validation-fraction", type=float, default=0.1)
    d.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="a data-set option, e.g. --option n=500 (repeatable)")
    d.add_argument("--path", help="data file or folder (mnist, frey)")
    d.add_argument("--out", required=True, type=_path, metavar="FILE.npz")

    c = sub.add_parser("check", help="validate every CSV and run folder under RESULTS")
    c.add_argument("experiments", nargs="*", metavar="EXPERIMENT")
    c.add_argument("--results", type=_path, default=DEFAULT_RESULTS, metavar="DIR")

    e = sub.add_parser("evaluate", help="evaluate a saved run (ELBO; gaps; test-time curve)")
    e.add_argument("checkpoint", type=_path)
    e.add_argument("--gaps", action="store_true", help="the gap decomposition (probe gaps)")
    e.add_argument("--test-curve", action="store_true", help="held-out ELBO against E-steps")
    e.add_argument("--iwae-k", type=_int_at_least(1), metavar="K",
                   help="importance samples of the gaps' log p(x) (implies --gaps)")
    e.add_argument("--device")
    e.add_argument("--out", type=_path, metavar="FILE.csv", help="also write the rows here")
    _plugin_option(e)
    return p


def _plugin_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                   help="import this module first, here and in every worker process: a probe, "
                        "estimator or method defined in it (repeatable; also $VI_PLUGINS, "
                        "comma-separated)")


def _run_options(p: argparse.ArgumentParser, jobs_default: int = 1) -> None:
    p.add_argument("--quick", action="store_true",
                   help="the seconds-scale version of the same grid(s) (scale 'quick'); default "
                        f"results folder {QUICK_RESULTS}/")
    p.add_argument("--scale", metavar="S", help="another scale a grid defines (e.g. 'paper')")
    p.add_argument("--jobs", type=_int_at_least(1), default=jobs_default, metavar="N",
                   help=f"worker processes (default {jobs_default})")
    p.add_argument("--results", type=_path, default=None, metavar="DIR",
                   help=f"results folder (default {DEFAULT_RESULTS}/, or {QUICK_RESULTS}/ with "
                        f"--quick)")
    p.add_argument("--force", action="store_true",
                   help="rerun completed cells (an interrupted --force resumes when repeated)")
    p.add_argument("--device", help="run every cell on this device (cpu, cuda, cuda:N)")
    p.add_argument("--no-ensemble", action="store_true",
                   help="train every cell on its own instead of batching seeds and step sizes")
    p.add_argument("--checkpoint-seconds", type=_seconds, default=30.0, metavar="S",
                   help="checkpoint running cells at most every S seconds (default 30)")
    p.add_argument("--default-lr", action="store_true",
                   help="train cells that lr_selection has no step sizes for with the grid's "
                        "own (recorded in lr_source); without it such a run is refused")
    _plugin_option(p)


# ------------------------------------------------------------------------------- helpers






















# ------------------------------------------------------------------------------ commands


def cmd_list(args) -> int:
    from experiments.grids import available, load_grid

    for name, path in available().items():
        g = load_grid(path)
        print(f"{name:<22} {g.cost:>8}  {g.description}")
    return 0


def cmd_run(args) -> int:
    slurm_only = {"--partition": args.partition, "--time": args.time,
                  "--gpus-per-node": args.gpus_per_node}
    given = [k for k, v in slurm_only.items() if v is not None]
    if args.launcher != "slurm" and given:
        raise UsageError(f"{', '.join(given)} apply only with --launcher slurm")
    if args.launcher == "slurm":  # before anything is created
        from experiments.launch import slurm_unavailable

        why = slurm_unavailable()
        if why:
            raise UsageError(why)
    results = results_dir(args)
    grid = load(args.experiment)
    prepare_cells(grid, results, args, seeds=args.seeds)  # every error before the lock is taken
    published_runs(grid, results, args, args.seeds)  # --seeds adds to verified published CSVs
    slurm = {"partition": args.partition, "time": args.time,
             "gpus_per_node": args.gpus_per_node}
    with locked(results):
        failed = run_grid(grid, results, args, seeds=args.seeds, launcher=args.launcher,
                           slurm=slurm)
    return 1 if failed else 0


def cmd_reproduce(args) -> int:
    from experiments.grids import available

    results = results_dir(args)
    grids = [load(name) for name in available()]
    for g in grids:  # validate everything before the first run starts
        # (lr_selection runs first: the step sizes it selects are validated when it is done)
        prepare_cells(g, results, args, selection_pending=True)
        pending = results / g.name / ".force.json"
        if pending.is_file() and not args.force:
            raise UsageError(f"{g.name}: an interrupted `--force` run is unfinished; repeat "
                             f"`reproduce --force` to finish it (or delete {pending})")
    report_modules()
    from experiments.launch import worker_pool

    failed = 0
    t0 = time.perf_counter()
    with locked(results):
        pool = worker_pool(args.jobs) if args.jobs > 1 else None
        try:
            for g in grids:
                failed += run_grid(g, results, args, pool=pool)
        finally:
            if pool is not None:
                pool.shutdown(cancel_futures=True)
        print(f"all experiments: {time.perf_counter() - t0:.0f} s")
        status = references(results)
        status |= figures(results, None)
        if results.resolve() == DEFAULT_RESULTS.resolve():  # the README's statements follow
            from experiments.readme import refresh

            status |= refresh(results)
    return 1 if failed or status else 0








def cmd_figures(args) -> int:
    from experiments.grids import GRID_DIR

    if not args.results.is_dir():
        raise UsageError(f"no results folder {args.results}")
    valid = sorted(p.stem for p in GRID_DIR.glob("*.json"))
    custom = sorted(p.parent.name for p in args.results.glob("*/runs.csv")
                    if p.parent.name not in valid)  # custom grids: generic figures
    unknown = [e for e in args.experiments if e not in valid and e not in custom]
    if unknown:
        raise UsageError(f"unknown experiment(s) {', '.join(unknown)}; valid: "
                         f"{', '.join(valid + custom)}")
    missing = [e for e in args.experiments if not (args.results / e).is_dir()]
    if missing:
        raise UsageError(f"no results for {', '.join(missing)} under {args.results}; run them "
                         f"first (python -m experiments run NAME)")
    writable_folder(args.results, "--results")
    with locked(args.results):  # it writes figures, tables, the summary and the findings
        return figures(args.results, args.experiments or None)


def cmd_references(args) -> int:
    if not args.results.is_dir():
        raise UsageError(f"no results folder {args.results}")
    writable_folder(args.results, "--results")
    reference_inputs(args.results)  # verified inputs, or a refusal before anything is written
    with locked(args.results):
        return references(args.results)


def cmd_findings(args) -> int:
    if not args.results.is_dir():
        raise UsageError(f"no results folder {args.results}")
    writable_folder(args.results, "--results")
    report_modules()
    problems = verify_inputs(args.results, writing=("FINDINGS.md",))
    if problems:  # the check `figures` runs: never a report from unverified CSVs
        raise UsageError(refusal(args.results, problems, "FINDINGS.md"))
    with locked(args.results):
        return findings(args.results)


def cmd_readme(args) -> int:
    from experiments import readme

    args.readme = readme.README if args.readme is None else args.readme
    return readme.command(args)


def cmd_check(args) -> int:
    from experiments.checks import check_results

    if not args.results.is_dir():
        raise UsageError(f"no results folder {args.results}")
    odd = [e for e in args.experiments if Path(e).name != e or e.startswith(".")]
    if odd:  # a path or "..": not an experiment of this results folder
        raise UsageError(f"{', '.join(map(repr, odd))}: expected the name of an experiment "
                         f"folder under {args.results}, not a path")
    missing = [e for e in args.experiments if not (args.results / e).is_dir()]
    if missing:
        raise UsageError(f"no results for {', '.join(missing)} under {args.results}")
    checked, problems = check_results(args.results, args.experiments or None)
    if problems:
        print(f"{len(problems)} problem(s) in {checked} file(s) under {args.results}:",
              file=sys.stderr)
        for p in problems:
            print(f"  {p}", file=sys.stderr)
        return 1
    print(f"{checked} file(s) under {args.results}: no problems")
    return 0


def _option(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise UsageError(f"--option expects KEY=VALUE; got {text!r}")
    key, raw = text.split("=", 1)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip(), value


def cmd_data(args) -> int:
    if args.out.suffix != ".npz":
        raise UsageError(f"--out must name an .npz file; got {args.out}")
    if args.out.is_dir():
        raise UsageError(f"--out {args.out} is a folder")
    writable_folder(args.out.parent, "--out folder")
    options = dict(_option(o) for o in args.option)
    from vi.data import DataError, load_dataset, save_dataset

    try:
        dataset = load_dataset(args.name, seed=args.seed, test_fraction=args.test_fraction,
                               validation_fraction=args.validation_fraction, path=args.path,
                               **options)
    except (DataError, ValueError, TypeError) as err:
        raise UsageError(str(err)) from err
    path = save_dataset(dataset, args.out)
    print(f"{dataset!r} → {path}")
    return 0


def cmd_evaluate(args) -> int:
    if not args.checkpoint.is_file():
        raise UsageError(f"no checkpoint file {args.checkpoint}")
    if args.out is not None:
        if args.out.suffix != ".csv":
            raise UsageError(f"--out must name a .csv file; got {args.out}")
        writable_folder(args.out.parent, "--out folder")
    from experiments.evaluate import CheckpointError, EvaluationError, evaluate

    try:
        frame = evaluate(args.checkpoint, gaps=args.gaps or args.iwae_k is not None,
                         test_curve=args.test_curve, iwae_k=args.iwae_k, device=args.device)
    except CheckpointError as err:
        raise UsageError(str(err)) from err
    except EvaluationError as err:  # it ran, and the result is unusable: say so, write nothing
        print_error(str(err))
        return 1
    cols = [c for c in ("run_id", "epoch", "split", "param_group", "step", "metric", "value")
            if c in frame.columns]
    print(frame[cols].to_string(index=False))
    if args.out is not None:
        from vi.files import atomic_write

        atomic_write(args.out, frame.to_csv(index=False, lineterminator="\n"))
    return 0


COMMANDS = {"list": cmd_list, "run": cmd_run, "reproduce": cmd_reproduce,
            "figures": cmd_figures, "references": cmd_references, "findings": cmd_findings,
            "data": cmd_data, "check": cmd_check, "readme": cmd_readme, "evaluate": cmd_evaluate}


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
        # the command line recorded in every run's provenance: this call's, not the host's
        args.argv = None if argv is None else ["python", "-m", "experiments", *argv]
        if not hasattr(args, "plugin"):  # commands that read results need none
            return COMMANDS[args.command](args)
        from experiments import plugins

        try:
            modules = plugins.load(args.plugin)
        except plugins.PluginError as err:
            raise UsageError(str(err)) from err
        with plugins.exported(modules):  # worker processes import them too
            return COMMANDS[args.command](args)
    except UsageError as err:
        print_error(str(err))
        return 2
    except KeyboardInterrupt:
        print_error("interrupted; run the same command again to resume")
        return 130
    except BrokenPipeError:  # the reader went away (e.g. `| head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except RuntimeError as err:  # a worker process died: one message, rerun to resume
        from experiments.launch import WorkerDied

        if not isinstance(err, WorkerDied):
            raise
        print_error(str(err))
        return 1
