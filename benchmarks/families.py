"""What a richer variational family costs: one training epoch and one q* fit per family.

Setting: digits (D = 64, 80 % of the images for training, no validation split), H = 5, MLP
decoder and encoder of width 64 (the ``families`` grid's digits cells), batch 100, reparam
(M = 1), analytic KL where the family has one (``vi.families``: ``diagonal`` 2H = 10 numbers per
point, ``full`` H + H(H+1)/2 = 20, ``flow`` 2H + 4(2H + 1) = 54 with its KL by Monte Carlo).

Contenders, per family:

``epoch/<method>``  one epoch of ``vi.training.Trainer([config])._train_epoch()`` of ``amortized``
                    and of ``vem`` (training only);
``qstar``           ``vi.evaluation.fit_optimal_posterior`` on the first 300 training points from
                    the prior, exactly ``--qstar-steps`` steps (``StoppingRule`` with one window
                    of the cap and no decays), M = 10 samples: the gap probe's q* fit per step.

Rounds alternate between every contender (the order rotates every round), so machine drift
cancels in the paired ratios; goals are judged on the median over rounds of the CPU-time ratio
of a richer family to the diagonal Gaussian timed in the same round.

Usage::

    python benchmarks/families.py            # 20 timed rounds
    python benchmarks/families.py --quick    # smoke run (seconds)

Prints a human table, then, as the last line, one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vi.config import DataConfig, ModelConfig, RunConfig, TrainingConfig
from vi.evaluation import fit_optimal_posterior
from vi.families import FAMILIES
from vi.inference import MethodSettings, StoppingRule
from vi.streams import MemberRandom
from vi.training import Trainer

sys.path.insert(0, str(Path(__file__).resolve().parent))  # common.py, however this script is run
from common import alternate, env_line, environment, loadavg, paired_ratio, quantiles

LATENT, HIDDEN, BATCH, POINTS = 5, 64, 100, 300
#: goals: the most a richer family's step may cost, × the diagonal Gaussian's (CPU time)
GOALS = {("full", "epoch/amortized"): 2.0, ("flow", "epoch/amortized"): 4.0,
         ("full", "epoch/vem"): 2.0, ("flow", "epoch/vem"): 4.0,
         ("full", "qstar"): 3.0, ("flow", "qstar"): 10.0}


@dataclass
class Contender:
    family: str
    what: str
    run_epoch: Callable[[], None]
    members: int = 1
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)


def config_for(method: str, family: str) -> RunConfig:
    return RunConfig(
        data=DataConfig(name="digits", test_fraction=0.2, validation_fraction=0.0),
        model=ModelConfig(latent_dim=LATENT, hidden=(HIDDEN,)),
        method=MethodSettings(name=method, estimator="reparam", baseline="none", n_mc=1,
                              family=family, encoder_hidden=(HIDDEN,)),
        training=TrainingConfig(max_epochs=10**6, batch_size=BATCH, stopping=None,
                                eval_splits=("train",)),
        seed=0)


def contenders(qstar_steps: int) -> list[Contender]:
    datasets: dict = {}
    out = []
    for family in FAMILIES:
        trainer = None
        for method in ("amortized", "vem"):
            trainer = Trainer([config_for(method, family)], datasets=datasets)
            out.append(Contender(family, f"epoch/{method}", trainer._train_epoch))
        x = trainer.x["train"][:, :POINTS]
        fam = FAMILIES[family]
        init = fam.init(LATENT, x).expand(1, x.shape[1], -1)
        rule = StoppingRule(window=qstar_steps, patience=1, max_steps=qstar_steps, decays=0)
        random = MemberRandom.from_seeds([0], "benchmark", "qstar")

        def fit(decoder=trainer.decoder, x=x, init=init, rule=rule, random=random,
                family=family) -> None:
            fit_optimal_posterior(decoder, x, init, n_mc=10, lr=0.03, rule=rule,
                                  random=random, family=family)

        out.append(Contender(family, "qstar", fit))
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run (seconds)")
    p.add_argument("--rounds", type=int, default=20, help="timed rounds per contender")
    p.add_argument("--qstar-steps", type=int, default=100, help="q* steps per timed fit")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.qstar_steps < 1 or args.threads < 1:
        print("--rounds, --qstar-steps and --threads must be >= 1", file=sys.stderr)
        sys.exit(2)
    rounds, steps = (2, 5) if args.quick else (args.rounds, args.qstar_steps)
    torch.set_num_threads(args.threads)
    env = environment()
    cs = contenders(steps)
    alternate(cs, rounds, warmup=1)
    env["loadavg_end"] = loadavg()
    results = []
    for c in cs:
        q = quantiles(c.cpu)
        per = steps * POINTS if c.what == "qstar" else 1
        results.append({"family": c.family, "contender": c.what,
                        "cpu_s_median": q[1], "cpu_s_q25": q[0], "cpu_s_q75": q[2],
                        "wall_s_median": quantiles(c.wall)[1],
                        "unit": "per point per q* step" if c.what == "qstar" else "per epoch",
                        "cpu_s_per_unit": q[1] / per})
    base = {c.what: c for c in cs if c.family == "diagonal"}
    goals = []
    for c in cs:
        if (c.family, c.what) not in GOALS:
            continue
        limit = GOALS[(c.family, c.what)]
        r = paired_ratio(c, base[c.what], "cpu")["median"]
        w = paired_ratio(c, base[c.what], "wall")["median"]
        goals.append({"goal": f"{c.family} {c.what} <= {limit:g}x diagonal (CPU)",
                      "value": round(r, 3), "wall": round(w, 3), "met": r <= limit})
    print(f"families: {rounds} rounds, q* {steps} steps on {POINTS} points, H = {LATENT}")
    print(env_line(env))
    print(f"{'family':10s} {'contender':18s} {'CPU s (median)':>15s} {'per unit':>12s}")
    for r in results:
        print(f"{r['family']:10s} {r['contender']:18s} {r['cpu_s_median']:15.4f} "
              f"{r['cpu_s_per_unit']:12.3g}  {r['unit']}")
    for g in goals:
        print(f"goal {g['goal']}: {g['value']}x (wall {g['wall']}x) "
              f"{'met' if g['met'] else 'not met'}")
    print(json.dumps({"benchmark": "families", "settings": {
        "rounds": rounds, "qstar_steps": steps, "points": POINTS, "latent_dim": LATENT,
        "hidden": HIDDEN, "batch": BATCH, "threads": args.threads, "quick": args.quick},
        "env": env, "results": results, "goals": goals}))


if __name__ == "__main__":
    main()
