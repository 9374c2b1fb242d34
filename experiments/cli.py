"""``python -m experiments``: the study's command line (issue 6, issue 7).

    list                                   the experiments, what each shows, its default cost
    run EXPERIMENT [--quick] [--seeds S ...] [--jobs N] [--launcher local|slurm]
        [--partition P --time MIN --gpus-per-node G] [--results DIR] [--force] [--device D]
    reproduce [--quick] [--jobs N] [--results DIR] [--force]
    figures [--results DIR] [EXPERIMENT ...]
    data NAME [--seed S] [--test-fraction F] [--validation-fraction F] [--option K=V ...]
        [--path P] --out FILE.npz
    check [--results DIR] [EXPERIMENT ...]
    evaluate CHECKPOINT [--gaps] [--test-curve] [--iwae-k K] [--seed S] [--device D] [--out F]

Exit status: 0 success; 1 something ran but a result is bad (a failed run, a check problem);
2 the request itself is wrong (unknown name, bad option or configuration, missing data file) —
reported in one message before any file or folder is created.

``list``, ``figures`` and ``check`` never import torch or the training code.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

__all__ = ["main"]

DEFAULT_RESULTS = Path("results")
QUICK_RESULTS = Path("results-quick")


class UsageError(Exception):
    """A wrong request: printed as one line, exit status 2, nothing written."""


def _err(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one readable line, exit 2 (argparse's convention)
        self.print_usage(sys.stderr)
        raise UsageError(message)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m experiments", description="The study: experiments, results "
                "CSVs, figures. See README 'Running the study'.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    sub.add_parser("list", help="the experiments, what each shows and its default cost")

    r = sub.add_parser("run", help="run one experiment's grid into RESULTS/EXPERIMENT/")
    r.add_argument("experiment", help="an experiment name (see `list`) or a grid .json file")
    _run_options(r)
    r.add_argument("--seeds", nargs="+", type=_non_negative, metavar="S",
                   help="replace the grid's seed axis")
    r.add_argument("--launcher", choices=("local", "slurm"), default="local")
    r.add_argument("--partition", help="SLURM partition (with --launcher slurm)")
    r.add_argument("--time", type=_positive, metavar="MIN",
                   help="SLURM time limit per run in minutes (with --launcher slurm)")
    r.add_argument("--gpus-per-node", type=_non_negative, metavar="G",
                   help="GPUs per SLURM job (with --launcher slurm)")
    r.add_argument("--device", help="run every cell on this device (cpu, cuda, cuda:N)")

    rp = sub.add_parser("reproduce", help="every experiment, every figure, the summary table")
    _run_options(rp, jobs_default=2)

    f = sub.add_parser("figures", help="regenerate figures from the CSVs alone")
    f.add_argument("experiments", nargs="*", metavar="EXPERIMENT")
    f.add_argument("--results", type=Path, default=DEFAULT_RESULTS, metavar="DIR")

    d = sub.add_parser("data", help="write the exact data set a run uses to an .npz")
    d.add_argument("name", help="digits, ppca, nonlinear, mnist or frey")
    d.add_argument("--seed", type=_non_negative, default=0, help="data_seed (default 0)")
    d.add_argument("--test-fraction", type=float, default=0.2)
    d.add_argument("--validation-fraction", type=float, default=0.0)
    d.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="a data-set option, e.g. --option n=500 (repeatable)")
    d.add_argument("--path", help="data file or folder (mnist, frey)")
    d.add_argument("--out", required=True, type=Path, metavar="FILE.npz")

    c = sub.add_parser("check", help="validate every CSV under RESULTS against the schema")
    c.add_argument("experiments", nargs="*", metavar="EXPERIMENT")
    c.add_argument("--results", type=Path, default=DEFAULT_RESULTS, metavar="DIR")

    e = sub.add_parser("evaluate", help="evaluate a saved checkpoint (ELBO; gaps; test curve)")
    e.add_argument("checkpoint", type=Path)
    e.add_argument("--gaps", action="store_true", help="the gap decomposition (vi.evaluation)")
    e.add_argument("--test-curve", action="store_true", help="held-out ELBO against E-steps")
    e.add_argument("--iwae-k", type=_positive, metavar="K")
    e.add_argument("--seed", type=_non_negative, help="evaluation seed (default: the run's)")
    e.add_argument("--device")
    e.add_argument("--out", type=Path, metavar="FILE.csv", help="also write the rows here")
    return p


def _run_options(p: argparse.ArgumentParser, jobs_default: int = 1) -> None:
    p.add_argument("--quick", action="store_true",
                   help="the seconds-scale version of the same grid(s); default results folder "
                        f"{QUICK_RESULTS}/")
    p.add_argument("--jobs", type=_positive, default=jobs_default, metavar="N",
                   help=f"worker processes (default {jobs_default})")
    p.add_argument("--results", type=Path, default=None, metavar="DIR",
                   help=f"results folder (default {DEFAULT_RESULTS}/, or {QUICK_RESULTS}/ with "
                        f"--quick)")
    p.add_argument("--force", action="store_true", help="rerun completed cells")


# ------------------------------------------------------------------------------- helpers


def _results_dir(args) -> Path:
    results = args.results or (QUICK_RESULTS if args.quick else DEFAULT_RESULTS)
    if results.exists() and not results.is_dir():
        raise UsageError(f"--results {results} exists and is not a folder")
    parent = next((p for p in [results, *results.parents] if p.exists()), Path("."))
    if not os.access(parent, os.W_OK):
        raise UsageError(f"cannot write under {parent} (for --results {results})")
    return results


def _load(name: str):
    from experiments.grids import GridError, load_grid

    try:
        return load_grid(name)
    except GridError as err:
        raise UsageError(str(err)) from err


def _prepare(grid, results: Path, args, seeds=None, device=None):
    from experiments.runner import PrepareError, prepare

    try:
        return prepare(grid, results, quick=args.quick, seeds=seeds, device=device)
    except PrepareError as err:
        raise UsageError(str(err)) from err


def _execute(grid, cells, results: Path, args, launcher="local", slurm=None, pool=None) -> int:
    """Run the cells, aggregate, report. Returns the number of failed cells."""
    from experiments import aggregate as agg
    from experiments.launch import run_cells
    from experiments.runner import base_provenance

    prov = base_provenance()
    for cell in cells:
        cell.provenance = prov
    n_sel = sum(c.lr_source == "selected" for c in cells)
    if grid.lr == "selected" and n_sel < len(cells):
        print(f"{grid.name}: {len(cells) - n_sel} of {len(cells)} runs use the base step sizes "
              f"(lr_source=default): no lr_selection result for them in {results}",
              file=sys.stderr)
    t0 = time.perf_counter()
    outcomes = run_cells(cells, jobs=args.jobs, launcher=launcher, force=args.force,
                         slurm=slurm, pool=pool)
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
        if o.status != "ok":
            print(f"  {o.status}: {o.run_id}: {o.message}")
    try:
        out = agg.aggregate(exp_dir, [c.run_id for c in cells], select=grid.scaled(
            args.quick).select)
    except agg.AggregateError as err:
        _err(str(err))
        return max(1, counts.get("failed", 0))
    if out["stale"]:
        print(f"  note: {len(out['stale'])} run folder(s) in {exp_dir / 'runs'} are not cells "
              f"of this grid and were left out")
    print(f"  → {', '.join(str(p) for p in out['written'])}", flush=True)
    return counts.get("failed", 0)


# ------------------------------------------------------------------------------ commands


def cmd_list(args) -> int:
    from experiments.grids import available, load_grid

    for name, path in available().items():
        g = load_grid(path)
        print(f"{name:<20} {g.cost:>8}  {g.description}")
    return 0


def cmd_run(args) -> int:
    slurm_only = {"--partition": args.partition, "--time": args.time,
                  "--gpus-per-node": args.gpus_per_node}
    given = [k for k, v in slurm_only.items() if v is not None]
    if args.launcher != "slurm" and given:
        raise UsageError(f"{', '.join(given)} apply only with --launcher slurm")
    if args.launcher == "slurm":
        from experiments.launch import SUBMITIT_MISSING, submitit_available

        if not submitit_available():
            raise UsageError(SUBMITIT_MISSING)
    results = _results_dir(args)
    grid = _load(args.experiment)
    cells = _prepare(grid, results, args, seeds=args.seeds, device=args.device)
    slurm = {"partition": args.partition, "time": args.time,
             "gpus_per_node": args.gpus_per_node}
    failed = _execute(grid, cells, results, args, launcher=args.launcher, slurm=slurm)
    return 1 if failed else 0


def cmd_reproduce(args) -> int:
    from experiments.grids import available

    results = _results_dir(args)
    grids = [_load(name) for name in available()]
    for g in grids:  # validate everything before the first run starts
        _prepare(g, results, args)
    _figure_modules()
    from experiments.launch import worker_pool

    failed = 0
    t0 = time.perf_counter()
    pool = worker_pool(args.jobs) if args.jobs > 1 else None
    try:
        for g in grids:
            cells = _prepare(g, results, args)  # after lr_selection: the chosen step sizes
            failed += _execute(g, cells, results, args, pool=pool)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    print(f"all experiments: {time.perf_counter() - t0:.0f} s")
    status = _figures(results, None)
    return 1 if failed or status else 0


def _figure_modules():
    try:
        from experiments import figures, summary
    except ImportError as err:
        raise UsageError(f"figures need experiments.figures and experiments.summary, which this "
                         f"checkout does not provide ({err})") from err
    for module, name in ((figures, "make_figures"), (summary, "write_summary")):
        if not hasattr(module, name):
            raise UsageError(f"{module.__name__}.{name} is missing in this checkout")
    return figures, summary


def _figures(results: Path, experiments: list[str] | None) -> int:
    from experiments.aggregate import check_results

    figures, summary = _figure_modules()
    _, problems = check_results(results, experiments)
    if problems:
        _err(f"the results under {results} fail validation; no figures drawn:\n  "
             + "\n  ".join(problems))
        return 1
    try:
        paths = figures.make_figures(results, experiments or None)
        for p in paths:
            print(p)
        if not experiments:
            table = summary.write_summary(results)
            print(f"summary → {table}")
    except Exception as err:  # report, do not hide: the CSVs are intact either way
        _err(f"drawing from {results} failed: {type(err).__name__}: {err}")
        return 1
    return 0


def cmd_figures(args) -> int:
    from experiments.grids import GRID_DIR

    if not args.results.is_dir():
        raise UsageError(f"no results folder {args.results}")
    valid = sorted(p.stem for p in GRID_DIR.glob("*.json"))
    unknown = [e for e in args.experiments if e not in valid]
    if unknown:
        raise UsageError(f"unknown experiment(s) {', '.join(unknown)}; valid: {', '.join(valid)}")
    missing = [e for e in args.experiments if not (args.results / e).is_dir()]
    if missing:
        raise UsageError(f"no results for {', '.join(missing)} under {args.results}; run them "
                         f"first (python -m experiments run NAME)")
    return _figures(args.results, args.experiments or None)


def cmd_check(args) -> int:
    from experiments.aggregate import check_results

    if not args.results.is_dir():
        raise UsageError(f"no results folder {args.results}")
    missing = [e for e in args.experiments if not (args.results / e).is_dir()]
    if missing:
        raise UsageError(f"no results for {', '.join(missing)} under {args.results}")
    checked, problems = check_results(args.results, args.experiments or None)
    if problems:
        print(f"{len(problems)} problem(s) in {checked} CSV file(s) under {args.results}:",
              file=sys.stderr)
        for p in problems:
            print(f"  {p}", file=sys.stderr)
        return 1
    print(f"{checked} CSV file(s) under {args.results}: no problems")
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
    import pandas as pd

    if not args.checkpoint.is_file():
        raise UsageError(f"no checkpoint file {args.checkpoint}")
    if args.out is not None and args.out.suffix != ".csv":
        raise UsageError(f"--out must name a .csv file; got {args.out}")
    from vi.training import load_checkpoint

    try:
        if args.gaps or args.test_curve:
            try:
                from vi.evaluation import evaluate_checkpoint
            except ImportError as err:
                raise UsageError(f"--gaps/--test-curve need vi.evaluation ({err})") from err
            rows = evaluate_checkpoint(args.checkpoint, gaps=args.gaps,
                                       test_curve=args.test_curve, iwae_k=args.iwae_k,
                                       seed=args.seed, device=args.device).rows
        else:
            trainer = load_checkpoint(args.checkpoint, device=args.device)
            rows = trainer.evaluate()
            if args.iwae_k:
                rows += _iwae_rows(trainer, args.iwae_k, args.seed)
    except UsageError:
        raise
    except (ValueError, KeyError, RuntimeError, OSError) as err:
        raise UsageError(f"cannot evaluate {args.checkpoint}: {err}") from err
    frame = pd.DataFrame(rows)
    cols = [c for c in ("run_id", "epoch", "split", "param_group", "step", "metric", "value")
            if c in frame.columns]
    print(frame[cols].to_string(index=False))
    if args.out is not None:
        from experiments.aggregate import atomic_write_text

        atomic_write_text(args.out, frame.to_csv(index=False, lineterminator="\n"))
    return 0


def _iwae_rows(trainer, k: int, seed: int | None) -> list[dict]:
    import torch

    from vi.objectives import iwae_bound

    gen = torch.Generator(trainer.device).manual_seed(trainer.config.seed if seed is None
                                                      else seed)
    rows = []
    for split in trainer.config.eval_splits:
        lam = trainer.posterior(split)
        with torch.no_grad():
            value = iwae_bound(trainer.decoder, trainer.x[split], lam, k, generator=gen).mean()
        rows.append(trainer.row(split, "iwae", value))
    return rows


COMMANDS = {"list": cmd_list, "run": cmd_run, "reproduce": cmd_reproduce,
            "figures": cmd_figures, "data": cmd_data, "check": cmd_check,
            "evaluate": cmd_evaluate}


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
        return COMMANDS[args.command](args)
    except UsageError as err:
        _err(str(err))
        return 2
    except KeyboardInterrupt:
        _err("interrupted; run the same command again to resume")
        return 130
