"""log p(x) by annealed importance sampling: cost per point, and accuracy by bidirectional Monte
Carlo, on a digits-sized decoder.

Setting: digits (D = 64), H = 5, MLP decoder and encoder of width 64 (tanh), learned
per-dimension variance: the amortization-gap grid's digits cell
(``experiments/grids/amortization_gap.json``), trained as a VAE (``amortized``, reparam, M = 1,
Adam) for ``--epochs`` epochs (600 by default, the grid's cap for this cell; about a minute),
one model (K = 1), in ``--dtype`` (float32, the study's). Then, one torch thread:

``cost``   forward AIS (``vi.ais.ais``, pilot included) from q* on the first ``--points`` test
           points at each setting of the sweep: CPU (``time.process_time``) and wall seconds per
           point. q* is fitted beforehand as the gap probe fits it
           (``vi.evaluation.fit_optimal_posterior``: Adam from the encoder's output, 10 samples
           a step, step 0.01, window 50, patience 5, at most 2000 steps) and is not counted.
           Beside it, on the same points: L[q*] (1000 samples) and the IWAE bound with 5000
           samples of the defensive proposal built on q* (α = 0.2), so AIS − IWAE is the
           looseness of the study's current log p(x).
``bdmc``   ``--points`` points simulated from the decoder (``vi.ais.simulate``), q* fitted on
           them the same way; forward AIS from q* and reverse AIS from the simulated latents
           (``vi.ais.bdmc``) at each setting: the sandwich width upper − lower per point (mean,
           its standard error over points, median, 90 % quantile).

The sweep (``--sweep``) holds settings ``path:T:L`` (path ``qstar`` or ``prior``; C =
``--chains``); the first is the default the goals judge: the mean BDMC width at most 0.05 nat,
and the CPU time per point at most ``--goal-seconds`` (0.05 s).

Usage::

    python benchmarks/ais.py              # 600 training epochs, 100 points, the full sweep
    python benchmarks/ais.py --quick      # smoke run (seconds): 3 epochs, 8 points, T = 20

Prints a human table, then, as the last line, one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from vi import ais as vi_ais
from vi.config import DataConfig, ModelConfig, RunConfig, TrainingConfig
from vi.evaluation import elbo_value, fit_optimal_posterior
from vi.inference import MethodSettings, StoppingRule
from vi.objectives import iwae_bound
from vi.streams import MemberRandom
from vi.training import Trainer

sys.path.insert(0, str(Path(__file__).resolve().parent))  # common.py, however this script is run
from common import environment

GOAL_WIDTH = 0.05
DEFAULT_SWEEP = ["qstar:1000:1", "qstar:200:5", "qstar:250:1", "prior:1000:1"]
QUICK_SWEEP = ["qstar:20:1", "prior:20:2"]


def parse_setting(text: str) -> tuple[str, int, int]:
    try:
        path, steps, leapfrog = text.split(":")
        if path not in ("qstar", "prior"):
            raise ValueError
        return path, int(steps), int(leapfrog)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"a setting is path:T:L with path qstar or prior; got {text!r}") from None


def train_decoder(epochs: int, seed: int, dtype: str) -> Trainer:
    config = RunConfig(
        data=DataConfig(name="digits"), model=ModelConfig(latent_dim=5, hidden=(64,)),
        method=MethodSettings(name="amortized", estimator="reparam", baseline="none", n_mc=1,
                              encoder_hidden=(64,)),
        training=TrainingConfig(max_epochs=epochs, batch_size=100, stopping=None,
                                eval_splits=("test",), eval_per_decade=0),
        seed=seed, dtype=dtype)
    trainer = Trainer([config])
    for _ in range(epochs):  # the training epochs only (no evaluations, no stopping)
        trainer._train_epoch()
    return trainer


def fit_qstar(trainer: Trainer, x: torch.Tensor, random: MemberRandom) -> torch.Tensor:
    with torch.no_grad():
        init = trainer.method.encoder(x)
    fit = fit_optimal_posterior(trainer.decoder, x, init, n_mc=10, lr=1e-2,
                                rule=StoppingRule(window=50, patience=5, max_steps=2000),
                                random=random)
    return fit.lam


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run (seconds)")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (600)")
    parser.add_argument("--points", type=int, default=None, help="points per part (100)")
    parser.add_argument("--chains", type=int, default=None, help="C (16; quick 4)")
    parser.add_argument("--sweep", type=parse_setting, nargs="+", default=None,
                        help=f"settings path:T:L, the first the default (default "
                             f"{' '.join(DEFAULT_SWEEP)})")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--goal-seconds", type=float, default=0.05,
                        help="CPU seconds per point the default setting should stay within")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    epochs = args.epochs or (3 if args.quick else 600)
    points = args.points or (8 if args.quick else 100)
    chains = args.chains or (4 if args.quick else 16)
    sweep = args.sweep or [parse_setting(s) for s in (QUICK_SWEEP if args.quick
                                                      else DEFAULT_SWEEP)]
    env = environment()
    start = time.perf_counter()

    t0 = time.perf_counter()
    trainer = train_decoder(epochs, args.seed, args.dtype)
    train_s = time.perf_counter() - t0
    decoder = trainer.decoder
    rand = MemberRandom.from_seeds([args.seed], "ais-benchmark")
    x_test = trainer.x["test"][:, :points]
    lam_test = fit_qstar(trainer, x_test, rand)
    x_sim, z_sim = vi_ais.simulate(decoder, points, rand)
    lam_sim = fit_qstar(trainer, x_sim, rand)
    l_star = float(elbo_value(decoder, x_test, lam_test, n_mc=1000, random=rand).value.mean())
    iw = iwae_bound(decoder, x_test, lam_test, 5000, rand, defensive=0.2)
    iwae = float(iw.value.double().mean())

    rows = []
    for path, steps, leapfrog in sweep:
        settings = {"steps": steps, "chains": chains, "leapfrog": leapfrog}
        lam_t = lam_test if path == "qstar" else None
        lam_s = lam_sim if path == "qstar" else None
        w0, c0 = time.perf_counter(), time.process_time()
        forward = vi_ais.ais(decoder, x_test, lam_t, random=rand, **settings)
        c1, w1 = time.process_time(), time.perf_counter()
        sandwich = vi_ais.bdmc(decoder, x_sim, z_sim, lam_s, random=rand, **settings)
        summary = {k: float(v[0]) for k, v in sandwich.summary().items()}
        rows.append({
            "path": path, **settings,
            "cpu_s_per_point": (c1 - c0) / points, "wall_s_per_point": (w1 - w0) / points,
            "log_px": float(forward.log_px.mean()), "se_mean": float(forward.se.mean()),
            "acceptance": float(forward.acceptance.mean()),
            "ess_mean": float(forward.ess.mean()),
            "ais_minus_iwae": float(forward.log_px.mean()) - iwae,
            **{f"bdmc_{k}": v for k, v in summary.items()},
        })

    print(f"AIS on digits (D = 64, H = 5, width 64, {args.dtype}), a VAE trained {epochs} "
          f"epochs ({train_s:.1f} s); {points} test points and {points} simulated points; "
          f"C = {chains}; threads = {torch.get_num_threads()}")
    print(f"test points: L[q*] = {l_star:.3f}, IWAE-5000(q*, defensive) = {iwae:.3f}")
    print(f"{'path':<6} {'T':>5} {'L':>2} {'cpu s/pt':>9} {'wall s/pt':>9} {'AIS':>9} "
          f"{'SE':>7} {'acc':>5} {'AIS-IWAE':>9} {'BDMC width':>11} {'(se)':>7} {'median':>7} "
          f"{'q90':>7}")
    for r in rows:
        print(f"{r['path']:<6} {r['steps']:>5} {r['leapfrog']:>2} {r['cpu_s_per_point']:>9.4f} "
              f"{r['wall_s_per_point']:>9.4f} {r['log_px']:>9.3f} {r['se_mean']:>7.4f} "
              f"{r['acceptance']:>5.2f} {r['ais_minus_iwae']:>+9.4f} {r['bdmc_width']:>11.4f} "
              f"{r['bdmc_width_se']:>7.4f} {r['bdmc_width_median']:>7.4f} "
              f"{r['bdmc_width_q90']:>7.4f}")
    default = rows[0]
    goals = [
        {"goal": f"BDMC width (mean over simulated points) <= {GOAL_WIDTH} nat at the default "
                 f"({default['path']}, T={default['steps']}, L={default['leapfrog']}, "
                 f"C={chains})", "value": default["bdmc_width"],
         "met": default["bdmc_width"] <= GOAL_WIDTH},
        {"goal": f"forward AIS CPU seconds per point <= {args.goal_seconds} at the default",
         "value": default["cpu_s_per_point"], "wall_value": default["wall_s_per_point"],
         "met": default["cpu_s_per_point"] <= args.goal_seconds},
    ]
    print("goals:")
    for g in goals:
        print(f"  {g['goal']:<90} {g['value']:8.4f}  {'met' if g['met'] else 'NOT met'}")
    env["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    result = {
        "benchmark": "ais", "env": env,
        "settings": {"dataset": "digits", "latent_dim": 5, "hidden": [64], "epochs": epochs,
                     "points": points, "chains": chains, "dtype": args.dtype,
                     "sweep": [f"{p}:{t}:{n}" for p, t, n in sweep], "quick": args.quick,
                     "threads": torch.get_num_threads()},
        "results": rows, "reference": {"elbo_qstar": l_star, "iwae_5000": iwae},
        "goals": goals, "wall_s": time.perf_counter() - start,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
