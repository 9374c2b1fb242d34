"""Ensembles: per-model epoch time of K members trained as one batched model, against training
the same models one after another (the library's single-model path and a hand-written loop).

Setting, as the study's digits experiments: digits (the default split: 70 % train), latent
dimension H = 5, MLP decoder (and, for amortized, encoder) of width 64 with tanh, learned
per-dimension variance, batch 100, Adam, the reparameterization gradient with M = 1 and the
analytic KL; methods ``amortized`` and ``vem`` (one E-step, then one M-step per minibatch). An
ensemble of K members has seeds 0 … K−1 and step sizes that differ between members (the base
step sizes x 1, 3, 1/3 in turn), as the study's ensembles do.

Contenders per method, all in one process, one torch thread:

``K=1, 5, 10, 20``  one epoch of ``vi.training.Trainer(configs)._train_epoch()`` with K member
                    configurations (training only, no evaluation); its per-model epoch time is
                    the epoch's time divided by K. K = 1 is the **sequential path**: a study run
                    trained on its own (``python -m experiments run --no-ensemble``), so K
                    models one after another cost K times its epoch.
``hand``            a plain sequential PyTorch loop of the same model and algorithm
                    (``nn.Linear``, ``torch.distributions``, ``torch.optim.Adam``, per-row Adam
                    for vem's table), loaded with member 0's initial weights (copied from the
                    views of the K = 1 trainer's flat leaves) and fed the same data order and
                    noise; one model per epoch.

Epochs alternate between every contender of both methods in one process, the order rotating
every round, so machine drift cancels in the paired ratios; CPU time (``time.process_time``)
and wall time (``time.perf_counter``) of every epoch are recorded. Ratios are medians over rounds
of per-model times measured in the same round; goals are judged on CPU time: per-model epoch at
K = 1 at most 1.0x the hand loop, at K = 10 at most 0.25x, at K = 20 at most 0.2x (each method).

``--profile`` adds the top of a ``cProfile`` of one ensemble epoch at K = 20 (after one warm-up
epoch), per method, sorted by own time: what limits the batched step.

``--reproduce`` adds the measurement of whole experiment grids: each grid of a representative
subset (default ``lr_selection`` and ``elbo_curves``, the two largest grids, 500 of the study's
runs, ensembles of 15 and 5 members) is copied to a temporary file with ``max_epochs`` reduced
(default 20; a step-size selection without extension rounds, so both variants run the same
cells) and run by ``python -m experiments run GRID.json --jobs 2`` into a fresh temporary results
folder, once as is (ensembles) and once with ``--no-ensemble`` (member by member), in a rotating
order. The goal is member-by-member / ensembles at least 3 in wall time (the clock a user
waits on; the CPU time of the child processes is recorded beside). With ``--quick`` the grid
runs in a tiny form that only checks the machinery: ``lr_selection``'s quick scale, every axis
but the seed cut to its first entry (one ensemble of its 5 step-size candidates), seed 0, one
epoch, held-out fits capped at 20 steps, ``--jobs 1``.

Usage::

    python benchmarks/ensemble.py                     # K sweep, 20 timed rounds
    python benchmarks/ensemble.py --profile           # ... and what limits K = 20
    python benchmarks/ensemble.py --reproduce         # ... and the grid ratio (minutes)
    python benchmarks/ensemble.py --quick             # smoke run (seconds)

Prints a human table, then, as the last line, one JSON object.
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import io
import itertools
import json
import pstats
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from vi.config import DataConfig, ModelConfig, RunConfig, TrainingConfig
from vi.inference import MethodSettings
from vi.training import Trainer

sys.path.insert(0, str(Path(__file__).resolve().parent))  # common.py, however this script is run
from common import (
    CLOCKS,
    alternate,
    env_line,
    environment,
    hand_loop,
    loadavg,
    paired_ratio,
    quantiles,
)

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("amortized", "vem")
MEMBERS = (1, 5, 10, 20)
LATENT, HIDDEN, BATCH = 5, 64, 100
LR, LOCAL_LR = 1e-3, 1e-2
STEP_FACTORS = (1.0, 3.0, 1 / 3)  # member k's step sizes: the base x STEP_FACTORS[k % 3]
#: per-model epoch time / hand loop, at most (K: limit)
GOALS = {1: 1.0, 10: 0.25, 20: 0.2}
GRIDS = ("lr_selection", "elbo_curves")
REPRODUCE_GOAL = 3.0


# -- the ensemble ---------------------------------------------------------------------------------
def config_for(method: str, seed: int, factor: float = 1.0) -> RunConfig:
    """One member: the study's digits setting with a fixed budget (training only is timed)."""
    return RunConfig(
        data=DataConfig(name="digits"),
        model=ModelConfig(latent_dim=LATENT, hidden=(HIDDEN,)),
        method=MethodSettings(name=method, estimator="reparam", baseline="none", n_mc=1,
                              optimizer="adam", lr=LR * factor, local_optimizer="adam",
                              local_lr=LOCAL_LR * factor, encoder_hidden=(HIDDEN,)),
        training=TrainingConfig(max_epochs=10**6, batch_size=BATCH, stopping=None,
                                eval_splits=("train",)),
        seed=seed,
    )


def ensemble(method: str, members: int, datasets: dict) -> Trainer:
    configs = [config_for(method, k, STEP_FACTORS[k % len(STEP_FACTORS)])
               for k in range(members)]
    return Trainer(configs, datasets=datasets)


def hand_checked(trainer: Trainer, method: str) -> tuple[Callable[[], None], Callable[[], float]]:
    """A plain PyTorch loop of member 0 of ``trainer`` (same weights, data order and noise;
    reparameterization gradient, M = 1, analytic KL): (one epoch, the largest |difference|
    between its decoder and member 0's, a check that both do the same arithmetic)."""
    model, epoch, _ = hand_loop(trainer, method, latent=LATENT, batch=BATCH, lr=LR,
                                local_lr=LOCAL_LR)
    decoder = trainer.decoder

    @torch.no_grad()
    def difference() -> float:
        views = decoder.params.views()
        linears = [m for m in model.dec if isinstance(m, nn.Linear)]
        diffs = [(model.raw_var - views["raw_var"][0]).abs().max()]
        for i, linear in enumerate(linears):
            diffs += [(linear.weight.T - views[f"w{i}"][0]).abs().max(),
                      (linear.bias - views[f"b{i}"][0]).abs().max()]
        return float(max(diffs))

    return epoch, difference


# -- measurement -----------------------------------------------------------------------------------
@dataclass
class Contender:
    method: str
    name: str  # "K=5" or "hand"
    members: int  # models trained per epoch
    run_epoch: Callable[[], None]
    wall: list[float] = field(default_factory=list)  # per-model seconds per timed epoch
    cpu: list[float] = field(default_factory=list)


def sweep(methods: tuple[str, ...], members: tuple[int, ...], epochs: int, warmup: int,
          datasets: dict) -> tuple[list[dict], list[dict], dict]:
    """The K sweep: (rows per contender, paired ratios, settings)."""
    contenders: list[Contender] = []
    n_train, differences = {}, {}
    for method in methods:
        for k in members:
            trainer = ensemble(method, k, datasets)
            contenders.append(Contender(method, f"K={k}", k, trainer._train_epoch))
            if k == 1:
                n_train[method] = trainer.x["train"].shape[1]
                epoch, differences[method] = hand_checked(trainer, method)
                contenders.append(Contender(method, "hand", 1, epoch))
    alternate(contenders, epochs, warmup)
    by = {(c.method, c.name): c for c in contenders}
    rows, ratios = [], []
    for c in contenders:
        row = {"method": c.method, "contender": c.name, "members": c.members,
               "epochs_timed": epochs}
        if c.name == "hand":  # same model and algorithm as K=1's member 0: equal up to rounding
            row["max_abs_diff_to_member0"] = differences[c.method]()
        for clock in CLOCKS:
            lo, med, hi = quantiles(getattr(c, clock))
            row |= {f"{clock}_per_model_s": med, f"{clock}_q25_s": lo, f"{clock}_q75_s": hi}
        rows.append(row)
        if c.name == "hand":
            continue
        hand = by[(c.method, "hand")]
        seq = by.get((c.method, "K=1"))
        ratios.append({"method": c.method, "members": c.members,
                       "vs_hand": {clock: paired_ratio(c, hand, clock) for clock in CLOCKS},
                       "vs_sequential": None if seq is None else
                       {clock: paired_ratio(c, seq, clock) for clock in CLOCKS}})
    return rows, ratios, {"n_train": n_train}


def sweep_goals(ratios: list[dict]) -> list[dict]:
    out = []
    for r in ratios:
        limit = GOALS.get(r["members"])
        if limit is None:
            continue
        v = r["vs_hand"]["cpu"]["median"]
        out.append({"goal": f"{r['method']}: per-model epoch at K={r['members']} <= {limit}x "
                            f"the hand loop", "value": v,
                    "wall_value": r["vs_hand"]["wall"]["median"], "met": v <= limit})
    return out


def profile(methods: tuple[str, ...], members: int, top: int, datasets: dict) -> dict:
    """cProfile of one ensemble epoch at K = ``members`` per method (after one warm-up epoch):
    the printed top functions by own time, and the same as rows."""
    out = {}
    for method in methods:
        trainer = ensemble(method, members, datasets)
        trainer._train_epoch()
        prof = cProfile.Profile()
        prof.enable()
        trainer._train_epoch()
        prof.disable()
        buf = io.StringIO()
        stats = pstats.Stats(prof, stream=buf).strip_dirs().sort_stats("tottime")
        stats.print_stats(top)
        entries = sorted(stats.stats.items(), key=lambda kv: kv[1][2], reverse=True)[:top]
        out[method] = {
            "members": members, "total_s": stats.total_tt, "text": buf.getvalue().rstrip(),
            "top": [{"function": f"{file}:{line}({func})", "ncalls": nc, "tottime_s": tt,
                     "cumtime_s": ct} for (file, line, func), (_, nc, tt, ct, _) in entries],
        }
    return out


# -- whole grids: ensembles against member by member ----------------------------------------------
def grid_file(name: str, epochs: int, tiny: bool, folder: Path) -> Path:
    """A copy of grid ``name`` with ``max_epochs`` = ``epochs`` and no selection extension
    rounds. Tiny: the grid's quick scale, every axis but the seed cut to one entry (the first
    combination the grid does not exclude), seed 0 only, held-out E-step fits capped at 20 steps."""
    from experiments.grids import deep_merge, load_grid

    g = load_grid(name).scaled("quick" if tiny else None)
    axes = dict(g.axes)
    if tiny:  # the first combination of the axes that the grid does not exclude
        names = [k for k in axes if k != "seed"]
        for combo in itertools.product(*(range(len(axes[k])) for k in names)):
            cut = {k: axes[k][i:i + 1] for k, i in zip(names, combo, strict=True)}
            if dataclasses.replace(g, axes=cut | {"seed": [0]}).cells():
                break
        axes = cut | {"seed": [0]}
    budget: dict = {"training": {"max_epochs": epochs}}
    if tiny:
        budget["method"] = {"heldout": {"max_steps": 20}}
    raw = {"name": g.name, "description": g.description, "cost": g.cost, "order": g.order,
           "lr": g.lr, "base": deep_merge(g.base, budget),
           "method_base": {m: deep_merge(v, budget) for m, v in g.method_base.items()},
           "axes": axes, "exclude": g.exclude, "probes": g.probes}
    if g.select is not None:
        raw["select"] = {**g.select, "max_extensions": 0}
    path = folder / f"{name}.json"
    path.write_text(json.dumps(raw, indent=1))
    return path


def children_cpu() -> float:
    use = resource.getrusage(resource.RUSAGE_CHILDREN)
    return use.ru_utime + use.ru_stime


def run_grid(path: Path, results: Path, jobs: int, separate: bool) -> dict:
    """``python -m experiments run`` of one grid file: wall and child CPU seconds, exit code."""
    cmd = [sys.executable, "-m", "experiments", "run", str(path), "--results", str(results),
           "--jobs", str(jobs), *(["--no-ensemble"] if separate else [])]
    c0, w0 = children_cpu(), time.perf_counter()
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    wall, cpu = time.perf_counter() - w0, children_cpu() - c0
    # the first "N runs (...)" line is the grid's training (a selection prints a second one
    # when it aggregates its choice, with every run skipped)
    summary = [line for line in out.stdout.splitlines() if " runs (" in line]
    return {"wall_s": wall, "cpu_s": cpu, "exit": out.returncode,
            "summary": summary[0].strip() if summary else "",
            "stderr_tail": out.stderr[-2000:] if out.returncode else ""}


def reproduce(grids: tuple[str, ...], epochs: int, jobs: int, repeats: int, tiny: bool) -> dict:
    """Each grid run with ensembles and member by member, in a rotating order, ``repeats``
    times; the ratio member-by-member / ensembles of the summed times."""
    variants = ("ensemble", "member_by_member")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-ensemble-") as tmp:
        folder = Path(tmp)
        files = {name: grid_file(name, epochs, tiny, folder) for name in grids}
        for r in range(repeats):
            order = variants[r % 2:] + variants[:r % 2]
            for name in grids:
                for variant in order:
                    results = folder / f"results-{variant}-{r}"
                    out = run_grid(files[name], results, jobs, variant == "member_by_member")
                    rows.append({"grid": name, "variant": variant, "repeat": r, **out})
    totals = {v: {clock: sum(x[f"{clock}_s"] for x in rows if x["variant"] == v)
                  for clock in CLOCKS} for v in variants}
    per_grid = {}
    for name in grids:
        t = {v: {clock: sum(x[f"{clock}_s"] for x in rows if x["variant"] == v
                            and x["grid"] == name) for clock in CLOCKS} for v in variants}
        per_grid[name] = {clock: t["member_by_member"][clock] / t["ensemble"][clock]
                          for clock in CLOCKS}
    ratio = {clock: totals["member_by_member"][clock] / totals["ensemble"][clock]
             for clock in CLOCKS}
    ok = all(x["exit"] == 0 for x in rows)
    return {"grids": list(grids), "max_epochs": epochs, "jobs": jobs, "repeats": repeats,
            "tiny": tiny, "runs": rows, "totals": totals, "per_grid": per_grid,
            "ratio": ratio, "all_exit_0": ok}


def reproduce_goal(rep: dict) -> dict:
    v = rep["ratio"]["wall"]
    return {"goal": f"grids ({', '.join(rep['grids'])}) member by member / ensembles >= "
                    f"{REPRODUCE_GOAL} (wall)", "value": v, "cpu_value": rep["ratio"]["cpu"],
            "met": bool(v >= REPRODUCE_GOAL and rep["all_exit_0"])}


# -- report ---------------------------------------------------------------------------------------
def report(out: dict) -> str:
    env, st = out["env"], out["settings"]
    lines = [
        f"ensemble: digits H={LATENT}, width {HIDDEN}, batch {BATCH}, Adam, reparam; K in "
        f"{st['members']}; {st['epochs_timed']} timed rounds after {st['warmup']} warm-up, "
        "contenders alternated",
        env_line(env),
        "",
        f"{'method':<10} {'contender':<9} {'cpu ms/model':>12} {'IQR':>17} {'wall ms/model':>13}"
        f" {'/ hand':>7} {'/ K=1':>7}",
    ]
    ratio = {(r["method"], r["members"]): r for r in out["ratios"]}
    for r in out["results"]:
        rr = ratio.get((r["method"], r["members"])) if r["contender"] != "hand" else None
        vs_hand = f"{rr['vs_hand']['cpu']['median']:7.3f}" if rr else f"{1:7.3f}"
        vs_seq = (f"{rr['vs_sequential']['cpu']['median']:7.3f}"
                  if rr and rr["vs_sequential"] else f"{'':>7}")
        lines.append(f"{r['method']:<10} {r['contender']:<9} {1e3 * r['cpu_per_model_s']:12.2f} "
                     f"[{1e3 * r['cpu_q25_s']:7.2f}, {1e3 * r['cpu_q75_s']:7.2f}] "
                     f"{1e3 * r['wall_per_model_s']:13.2f} {vs_hand} {vs_seq}")
    lines.append("(ratios: median over rounds of the paired CPU-time ratio of per-model epochs; "
                 "K=1 is the sequential path)")
    for r in out["results"]:
        if "max_abs_diff_to_member0" in r:
            lines.append(f"{r['method']}: hand decoder vs K=1 member 0 after the same epochs, "
                         f"max |difference| {r['max_abs_diff_to_member0']:.1e}")
    for method, prof in out.get("profile", {}).items():
        lines += ["", f"profile: one {method} epoch at K={prof['members']} "
                      f"({prof['total_s']:.3f} s under cProfile), top by own time", prof["text"]]
    rep = out.get("reproduce")
    if rep:
        lines += ["", f"grids at max_epochs={rep['max_epochs']}, --jobs {rep['jobs']}"
                      f"{' (tiny form)' if rep['tiny'] else ''}:",
                  f"{'grid':<16} {'variant':<17} {'wall s':>8} {'cpu s':>8}  summary"]
        for x in rep["runs"]:
            lines.append(f"{x['grid']:<16} {x['variant']:<17} {x['wall_s']:8.1f} "
                         f"{x['cpu_s']:8.1f}  {x['summary'] or 'exit ' + str(x['exit'])}")
            if x["exit"]:
                lines.append(x["stderr_tail"])
        for name, r in rep["per_grid"].items():
            lines.append(f"  {name}: member by member / ensembles = {r['wall']:.2f} (wall), "
                         f"{r['cpu']:.2f} (cpu)")
        lines.append(f"  all: {rep['ratio']['wall']:.2f} (wall), {rep['ratio']['cpu']:.2f} (cpu)")
    lines += ["", "goals (cpu-time ratio, wall in brackets; the grid ratio on wall time):"]
    for g in out["goals"]:
        other = g.get("wall_value", g.get("cpu_value"))
        lines.append(f"  {g['goal']:<62} {g['value']:7.3f} ({other:6.3f})  "
                     f"{'met' if g['met'] else 'NOT met'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=20, help="timed rounds (epochs per contender)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    p.add_argument("--members", type=int, nargs="+", default=None,
                   help=f"ensemble sizes K (default {' '.join(map(str, MEMBERS))})")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--profile", action="store_true",
                   help="add a cProfile of one ensemble epoch at K = --profile-members")
    p.add_argument("--profile-members", type=int, default=20)
    p.add_argument("--profile-top", type=int, default=25, help="functions shown")
    p.add_argument("--reproduce", action="store_true",
                   help="add the grid ratio: ensembles against member by member")
    p.add_argument("--grids", nargs="+", default=None,
                   help=f"grids for --reproduce (default {' '.join(GRIDS)})")
    p.add_argument("--grid-epochs", type=int, default=None,
                   help="max_epochs of the grid copies (default 20; 1 with --quick)")
    p.add_argument("--grid-jobs", type=int, default=None,
                   help="--jobs of the grid runs (default 2; 1 with --quick)")
    p.add_argument("--grid-repeats", type=int, default=1,
                   help="runs of each variant (the order rotates; default 1)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: K in 1 2 4, 1 timed round after 1 warm-up; tiny grids")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    members = tuple(a.members or ((1, 2, 4) if a.quick else MEMBERS))
    if 1 not in members:
        members = (1, *members)  # the sequential path is always measured
    if a.quick:
        a.epochs, a.warmup = 1, 1
    grids = tuple(a.grids or (GRIDS[:1] if a.quick else GRIDS))
    grid_epochs = a.grid_epochs or (1 if a.quick else 20)
    grid_jobs = a.grid_jobs or (1 if a.quick else 2)
    env = environment()
    datasets: dict = {}
    start = time.perf_counter()
    rows, ratios, info = sweep(tuple(a.methods), members, a.epochs, a.warmup, datasets)
    goals = sweep_goals(ratios)
    out = {"benchmark": "ensemble", "env": env,
           "settings": {"dataset": "digits", "n_train": info["n_train"], "latent_dim": LATENT,
                        "hidden": HIDDEN, "batch_size": BATCH, "estimator": "reparam",
                        "optimizer": "adam", "lr": LR, "local_lr": LOCAL_LR,
                        "step_factors": list(STEP_FACTORS), "members": list(members),
                        "methods": list(a.methods), "epochs_timed": a.epochs,
                        "warmup": a.warmup, "goal_clock": "cpu", "quick": a.quick},
           "results": rows, "ratios": ratios}
    if a.profile:
        out["profile"] = profile(tuple(a.methods), a.profile_members, a.profile_top, datasets)
    if a.reproduce:
        rep = reproduce(grids, grid_epochs, grid_jobs, a.grid_repeats, tiny=a.quick)
        out["reproduce"] = rep
        goals.append(reproduce_goal(rep))
    out["goals"] = goals
    out["wall_s"] = time.perf_counter() - start
    env["loadavg_end"] = loadavg()
    print(report(out))
    for prof in out.get("profile", {}).values():
        del prof["text"]  # printed above; the JSON keeps the top rows
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
