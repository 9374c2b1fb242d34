"""How far the study's stopping rule gets: test ELBO under the rule against a long reference
schedule, per cell.

Cells (``--cells``): digits, H = 5, reparam (M = 1, analytic KL), the ``elbo_curves`` grid's
architecture (decoder and encoder MLPs of width 64, tanh, learned per-dimension variance, batch
100) at the step sizes ``lr_selection`` chose (amortized: θ 1e-3, φ 3e-3; vem: θ 1e-3, λ 0.1),
seeds ``--seeds`` (each its own data split), each cell's seeds trained as one ensemble (members
are bit for bit what they are alone). Two schedules per cell, from the same initial weights:

``rule``   the study's: the plateau rule on the validation ELBO with its step-size decays
           (``vi.config.StoppingConfig`` defaults, or ``--stopping``: checks every 5 epochs,
           thinning out after epoch 400; a phase's plateau when neither its last 6 checks nor
           its last 30 % gained 0.1 nat; a phase after a decay lasts at least a quarter of the
           epochs before it; two decays x0.3), capped at ``--max-epochs`` (the grids' caps:
           2500; vem 3000); the best state restored.
``long``   ``--long-epochs`` (1800; vem 3000: three times the caps the study had before its
           rule grew with the phase) epochs, no stopping rule, every step size on a cosine decay
           α_e = α · (1 + cos(π e / E)) / 2 over the E epochs (Loshchilov & Hutter 2017), the
           last state.

Both report the test ELBO of the method's own posterior on the whole test split (vem: the
held-out fit to its tolerance, ``MethodSettings.heldout``), ``eval_n_mc`` = 10 samples a point,
common random numbers. The distance of a cell is the mean over seeds of (long − rule), paired
by seed, with its standard error; the goal is a distance of at most ``--goal`` (0.3) nat in
every cell. The epochs the rule used, how often the cap bound, and the CPU seconds of each
schedule are reported beside.

Usage::

    python benchmarks/long_schedule.py                       # 5 seeds, both cells (long)
    python benchmarks/long_schedule.py --seeds 0 1 --cells amortized
    python benchmarks/long_schedule.py --quick               # smoke run (seconds)

Prints a human table, then, as the last line, one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from vi.config import RunConfig
from vi.training import MemberResult, Trainer

sys.path.insert(0, str(Path(__file__).resolve().parent))  # common.py, however this script is run
from common import env_line, environment, loadavg

#: the elbo_curves grid's digits cells at lr_selection's step sizes (results/lr_selection)
CELLS = {
    "amortized": {"method": {"name": "amortized", "lr": 1e-3, "encoder_lr": 3e-3},
                  "max_epochs": 2500, "long_epochs": 1800},
    "vem": {"method": {"name": "vem", "lr": 1e-3, "local_lr": 0.1}, "max_epochs": 3000,
            "long_epochs": 3000},
}


def config(cell: str, seed: int, *, schedule: str, epochs: int, quick: bool,
           stopping: dict | None = None) -> RunConfig:
    spec = CELLS[cell]
    width = [16] if quick else [64]
    training: dict = {"max_epochs": epochs, "batch_size": 100, "eval_per_decade": 0}
    if schedule == "rule":
        training["eval_splits"] = ["validation", "test"]
        training["stopping"] = dict(stopping or {})
        if quick:
            training["stopping"] |= {"check_every": 1, "patience": 1, "min_epochs": 0}
    else:
        training |= {"eval_splits": ["test"], "stopping": None}
    method = {**spec["method"], "estimator": "reparam", "baseline": "none", "n_mc": 1,
              "encoder_hidden": width}
    if quick:
        method["heldout"] = {"max_steps": 30, "window": 5, "patience": 2}
    return RunConfig.from_dict({
        "data": {"name": "digits"}, "model": {"latent_dim": 5, "hidden": width},
        "method": method, "training": training, "seed": seed})


def test_elbo(result: MemberResult) -> float:
    rows = [r for r in result.rows if r["metric"] == "elbo" and r["split"] == "test"
            and r["epoch"] == result.best_epoch]
    return rows[-1]["value"] if rows else math.nan


def train_rule(cell: str, seeds: list[int], epochs: int, quick: bool,
               stopping: dict | None = None) -> tuple[dict, float]:
    configs = [config(cell, s, schedule="rule", epochs=epochs, quick=quick, stopping=stopping)
               for s in seeds]
    cpu = time.process_time()
    results = Trainer(configs, run_ids=[str(s) for s in seeds]).fit()
    cpu = time.process_time() - cpu
    out = {}
    for r in results:
        out[int(r.run_id)] = {"test_elbo": test_elbo(r), "epochs": r.epochs_run,
                              "best_epoch": r.best_epoch, "decay_epochs": r.decay_epochs,
                              "stop_reason": r.stop_reason, "outcome": r.outcome,
                              "best_validation": r.best_validation}
    return out, cpu


def train_long(cell: str, seeds: list[int], epochs: int, quick: bool) -> tuple[dict, float]:
    configs = [config(cell, s, schedule="long", epochs=epochs, quick=quick) for s in seeds]
    trainer = Trainer(configs, run_ids=[str(s) for s in seeds])

    def cosine(t: Trainer) -> None:  # the step sizes of the next epoch (index t.epoch)
        t.scale_step_sizes([0.5 * (1.0 + math.cos(math.pi * t.epoch / epochs))] * t.members)

    cpu = time.process_time()
    results = trainer.fit(on_epoch=cosine)
    cpu = time.process_time() - cpu
    return {int(r.run_id): {"test_elbo": test_elbo(r), "epochs": r.epochs_run,
                            "status": r.status} for r in results}, cpu


def mean_se(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else math.nan
    return mean, sd / math.sqrt(n) if n > 1 else math.nan


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cells", nargs="+", choices=sorted(CELLS), default=sorted(CELLS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    ap.add_argument("--max-epochs", type=int, default=None,
                    help="the rule's cap (default: the grid's, 2500; vem 3000)")
    ap.add_argument("--long-epochs", type=int, default=None,
                    help="the long schedule's epochs (default: the cell's, 1800; vem 3000)")
    ap.add_argument("--stopping", type=json.loads, default=None,
                    help="StoppingConfig fields (JSON) that replace the study's defaults")
    ap.add_argument("--lr", type=json.loads, default=None,
                    help="step sizes that replace the cells' (JSON {cell: {field: value}}, "
                         "e.g. '{\"vem\": {\"lr\": 3.33e-4}}': lr_selection's current choice)")
    ap.add_argument("--goal", type=float, default=0.3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: width 16, seed 0, cap 4 epochs (long: 12), check every "
                         "epoch")
    args = ap.parse_args(argv)
    if args.goal <= 0 or any(n is not None and n < 1 for n in (args.max_epochs,
                                                                args.long_epochs)):
        print("error: --goal must be > 0, --max-epochs and --long-epochs >= 1", file=sys.stderr)
        return 2
    if args.stopping is not None:
        try:
            config(args.cells[0], 0, schedule="rule", epochs=1, quick=False,
                   stopping=args.stopping)
        except (TypeError, ValueError) as err:
            print(f"error: --stopping: {err}", file=sys.stderr)
            return 2
    fields = {"lr", "encoder_lr", "local_lr"}
    if args.lr is not None and (not isinstance(args.lr, dict) or any(
            c not in CELLS or not isinstance(v, dict) or set(v) - fields
            or not all(isinstance(x, (int, float)) and x > 0 for x in v.values())
            for c, v in args.lr.items())):
        print(f"error: --lr must be {{cell: {{field: step size > 0}}}} with cells of "
              f"{', '.join(sorted(CELLS))} and fields of {', '.join(sorted(fields))}",
              file=sys.stderr)
        return 2
    for cell, steps in (args.lr or {}).items():
        CELLS[cell]["method"].update(steps)
    if args.quick:
        args.seeds, args.max_epochs, args.long_epochs = [0], 4, 12
    torch.set_num_threads(args.threads)
    env = environment()
    results, goals = {}, []
    print(f"{'cell':<10} {'seed':>4} {'rule':>8} {'epochs':>6} {'decays at':<14} {'outcome':<9} "
          f"{'long':>8} {'long - rule':>11}")
    for cell in args.cells:
        cap = args.max_epochs or CELLS[cell]["max_epochs"]
        long_epochs = args.long_epochs or CELLS[cell]["long_epochs"]
        rule, rule_cpu = train_rule(cell, args.seeds, cap, args.quick, args.stopping)
        long, long_cpu = train_long(cell, args.seeds, long_epochs, args.quick)
        diffs = []
        for s in args.seeds:
            d = long[s]["test_elbo"] - rule[s]["test_elbo"]
            diffs.append(d)
            r = rule[s]
            print(f"{cell:<10} {s:>4} {r['test_elbo']:>8.3f} {r['epochs']:>6} "
                  f"{r['decay_epochs']!s:<14} {r['outcome']:<9} "
                  f"{long[s]['test_elbo']:>8.3f} {d:>11.3f}")
        dist, se = mean_se(diffs)
        rule_mean, _ = mean_se([rule[s]["test_elbo"] for s in args.seeds])
        long_mean, _ = mean_se([long[s]["test_elbo"] for s in args.seeds])
        epochs = [rule[s]["epochs"] for s in args.seeds]
        capped = sum(rule[s]["stop_reason"] == "max_epochs" for s in args.seeds)
        print(f"{cell:<10} mean {rule_mean:>8.3f} {sum(epochs) / len(epochs):>6.0f} {'':<14} "
              f"{'':<9} {long_mean:>8.3f} {dist:>11.3f} (se {se:.3f}); rule epochs "
              f"{min(epochs)}-{max(epochs)} of a cap of {cap} (bound {capped} of {len(epochs)}); "
              f"CPU s: rule {rule_cpu:.1f}, long {long_cpu:.1f} ({long_epochs} epochs)")
        results[cell] = {"rule": {str(s): v for s, v in rule.items()},
                         "long": {str(s): v for s, v in long.items()},
                         "rule_mean": rule_mean, "long_mean": long_mean, "distance": dist,
                         "distance_se": se, "rule_cap": cap, "long_epochs": long_epochs,
                         "rule_epochs_mean": sum(epochs) / len(epochs), "rule_capped": capped,
                         "rule_cpu_s": round(rule_cpu, 1), "long_cpu_s": round(long_cpu, 1)}
        goals.append({"goal": f"{cell}: long - rule <= {args.goal} nat (mean over seeds)",
                      "value": round(dist, 4) if math.isfinite(dist) else -1.0,
                      "met": bool(dist <= args.goal) if math.isfinite(dist) else None})
    env["loadavg_end"] = loadavg()
    print(env_line(env))
    print(json.dumps({"benchmark": "long_schedule", "env": env,
                      "settings": {"cells": args.cells, "seeds": args.seeds,
                                   "max_epochs": args.max_epochs,
                                   "long_epochs": args.long_epochs, "stopping": args.stopping,
                                   "lr": args.lr, "goal": args.goal, "quick": args.quick,
                                   "threads": args.threads},
                      "results": results, "goals": goals}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
