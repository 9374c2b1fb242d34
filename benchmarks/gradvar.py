"""Per-draw gradients for gradient-variance logging: the batched path against a loop.

Setting: the digits model at initialisation (D = 64, MLP decoder and encoder of width 256 with
tanh, learned per-dimension variance; the ``vi.config.ModelConfig`` and ``MethodSettings``
defaults), method ``amortized``, ``reparam``, analytic KL, M = 1, the fixed training minibatch
of B = 64 points that the ``gradvar`` probe measures (``vi.probes``), S = 256 draws, latent
dimension H ∈ {2, 8, 32}, an ensemble of K = 1 (``--members`` sets K). Per parameter group
(``variational``, ``encoder``, ``decoder``), three ways to get the S x K x P per-draw gradients
from the same noise:

``batched``  ``vi.gradstats.per_sample_grads``: one backward over S copies of λ for
             ``variational``; vmap over the encoder's vjp of those for ``encoder``;
             ``vmap(grad)`` over the decoder's flat leaf for ``decoder``.
``vmap``     plain ``torch.func.vmap(grad(...))`` over the noise of the whole objective, with
             respect to λ or to the encoder's flat leaf (for ``decoder`` this is what
             ``batched`` does, so it is not repeated).
``loop``     ``vi.gradstats.per_sample_grads_loop``: S ordinary autograd calls.

Every contender's output is checked against the loop's (largest absolute difference). Contenders
alternate within each repeat (the order rotates); each repeat records CPU time
(``time.process_time``) and wall time (``time.perf_counter``), and each contender reports its
best repeat. The goal is loop / batched at least 10 at S = 256 for every group (the smallest
ratio over H, CPU time), and agreement with the loop to 10⁻⁴ of the largest gradient entry.

Usage::

    python benchmarks/gradvar.py            # S = 256, H = 2, 8, 32, 5 repeats
    python benchmarks/gradvar.py --quick    # smoke run: S = 32, H = 2, 1 repeat (seconds)

Prints a human table, then, as the last line, one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.func import functional_call, grad, vmap

from vi import gradstats
from vi.config import DataConfig, ModelConfig, RunConfig, TrainingConfig
from vi.inference import MethodSettings
from vi.objectives import elbo
from vi.training import Trainer

sys.path.insert(0, str(Path(__file__).resolve().parent))  # common.py, however this script is run
from common import CLOCKS, environment

GOAL_RATIO = 10.0
GOAL_AGREEMENT = 1e-4
_PARAMS = "net.params.flat"  # the encoder's flat leaf, as functional_call names it


@torch.no_grad()  # torch.func.grad still differentiates; no_grad only stops tracking θ
def plain_vmap(method, x: torch.Tensor, group: str, noise: torch.Tensor) -> torch.Tensor:
    """vmap(grad) over the noise of the whole objective, w.r.t. λ (sum) or φ (per-member
    mean over the minibatch, summed over members): [S, K, P]."""
    s, decoder = method.settings, method.decoder

    def surrogate(lam, eps):
        return elbo(decoder, x, lam, eps, estimator=s.estimator, baseline=s.baseline,
                    kl=s.kl).surrogate

    draws, k = noise.shape[0], x.shape[0]
    if group == "variational":
        lam = method.encoder(x).detach()
        out = vmap(grad(lambda lam_, e: surrogate(lam_, e).sum()), in_dims=(None, 0))(lam, noise)
        return out.reshape(draws, k, -1)
    flat = method.encoder.params.flat.detach()

    def loss(p, e):
        return surrogate(functional_call(method.encoder, {_PARAMS: p}, (x,)), e).mean(-1).sum()

    return vmap(grad(loss), in_dims=(None, 0))(flat, noise)


def evaluation_batch(trainer: Trainer, size: int) -> torch.Tensor:
    """The ``gradvar`` probe's fixed training minibatch per member: [K, B] sorted indices."""
    from vi.probes import _evaluation_batch

    return _evaluation_batch(trainer._context(final=False, evaluating=True), size)


def bench_cell(latent_dim: int, draws: int, repeats: int, batch: int, members: int) -> list[dict]:
    configs = [RunConfig(data=DataConfig(name="digits"), model=ModelConfig(latent_dim=latent_dim),
                         method=MethodSettings(name="amortized"),
                         training=TrainingConfig(max_epochs=1, stopping=None,
                                                 eval_splits=("train",)), seed=seed)
               for seed in range(members)]
    trainer = Trainer(configs)
    method = trainer.method
    idx = evaluation_batch(trainer, batch)
    rows_k = torch.arange(members).unsqueeze(1)
    x = trainer.x["train"][rows_k, idx]
    noise = torch.randn((draws, 1, members, idx.shape[1], latent_dim),
                        generator=torch.Generator().manual_seed(latent_dim))
    rows = []
    for group in method.groups:
        contenders = {
            "batched": lambda g=group: gradstats.per_sample_grads(
                method, x, idx, noise=noise, groups=[g])[g],
            "loop": lambda g=group: gradstats.per_sample_grads_loop(
                method, x, idx, noise, groups=[g])[g],
        }
        if group != "decoder":
            contenders["vmap"] = lambda g=group: plain_vmap(method, x, g, noise)
        names = list(contenders)
        out = {n: contenders[n]().reshape(draws, members, -1) for n in names}  # warm-up, check
        diff = {n: float((out[n] - out["loop"]).abs().max()) for n in names}
        scale = float(out["loop"].abs().max())
        best = {n: dict.fromkeys(CLOCKS, float("inf")) for n in names}
        for r in range(repeats):
            for n in names[r % len(names):] + names[:r % len(names)]:
                w0, c0 = time.perf_counter(), time.process_time()
                contenders[n]()
                c1, w1 = time.process_time(), time.perf_counter()
                best[n]["cpu"] = min(best[n]["cpu"], c1 - c0)
                best[n]["wall"] = min(best[n]["wall"], w1 - w0)
        vm = best.get("vmap", best["batched"])
        rows.append({
            "latent_dim": latent_dim, "group": group, "P": out["loop"].shape[-1],
            **{f"{n}_{clock}_s": best[n][clock] for n in names for clock in CLOCKS},
            "ratio": best["loop"]["cpu"] / best["batched"]["cpu"],
            "ratio_wall": best["loop"]["wall"] / best["batched"]["wall"],
            "ratio_vmap": best["loop"]["cpu"] / vm["cpu"],
            "max_abs_diff": max(diff.values()), "max_abs_diff_by": diff, "max_abs_grad": scale,
        })
    return rows


def goals(rows: list[dict], draws: int) -> list[dict]:
    out = []
    for group in dict.fromkeys(r["group"] for r in rows):
        cells = [r for r in rows if r["group"] == group]
        worst = min(cells, key=lambda r: r["ratio"])
        out.append({"goal": f"{group}: loop / batched >= {GOAL_RATIO:g} at S={draws} "
                            f"(smallest over H; H={worst['latent_dim']})",
                    "value": worst["ratio"], "wall_value": worst["ratio_wall"],
                    "met": worst["ratio"] >= GOAL_RATIO})
    rel = max(r["max_abs_diff"] / max(r["max_abs_grad"], np.finfo(np.float32).tiny)
              for r in rows)
    out.append({"goal": f"batched and vmap agree with the loop (max |diff| / max |g| <= "
                        f"{GOAL_AGREEMENT:g})", "value": rel, "met": rel <= GOAL_AGREEMENT})
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: S=32, H=2, 1 repeat")
    parser.add_argument("--draws", type=int, default=None, help="S (default 256; quick 32)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (default 5)")
    parser.add_argument("--dims", type=int, nargs="+", default=None, help="latent dims H")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1)")
    parser.add_argument("--batch", type=int, default=64, help="minibatch B (default 64)")
    parser.add_argument("--members", type=int, default=1, help="ensemble size K (default 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    draws = args.draws or (32 if args.quick else 256)
    repeats = args.repeats or (1 if args.quick else 5)
    dims = args.dims or ([2] if args.quick else [2, 8, 32])
    load0 = os.getloadavg()[0]
    start = time.perf_counter()
    rows = [r for h in dims for r in bench_cell(h, draws, repeats, args.batch, args.members)]

    print(f"per-draw gradients, digits amortized at init, reparam, M=1, B={args.batch}, "
          f"S={draws}, K={args.members}, threads={torch.get_num_threads()}, "
          f"load {load0:.1f} -> {os.getloadavg()[0]:.1f}; best of {repeats} (CPU time)")
    print(f"{'H':>3} {'group':<12} {'P':>7} {'batched ms':>11} {'vmap ms':>9} {'loop ms':>9} "
          f"{'loop/batched':>13} {'(wall)':>7} {'loop/vmap':>10} {'max|diff|':>10}")
    for r in rows:
        vmap_ms = 1e3 * r.get("vmap_cpu_s", r["batched_cpu_s"])
        print(f"{r['latent_dim']:>3} {r['group']:<12} {r['P']:>7} "
              f"{1e3 * r['batched_cpu_s']:>11.1f} {vmap_ms:>9.1f} {1e3 * r['loop_cpu_s']:>9.1f} "
              f"{r['ratio']:>12.1f}x {r['ratio_wall']:>6.1f}x {r['ratio_vmap']:>9.1f}x "
              f"{r['max_abs_diff']:>10.1e}")
    result = {
        "benchmark": "gradvar",
        "env": {**environment(), "loadavg_start": round(load0, 2),
                "loadavg_end": round(os.getloadavg()[0], 2)},
        "settings": {"dataset": "digits", "method": "amortized", "estimator": "reparam",
                     "n_mc": 1, "draws": draws, "batch": args.batch, "latent_dims": dims,
                     "members": args.members, "repeats": repeats, "goal_clock": "cpu",
                     "quick": args.quick},
        "results": rows, "goals": goals(rows, draws), "wall_s": time.perf_counter() - start,
    }
    print("goals (cpu-time ratio; wall in brackets):")
    for g in result["goals"]:
        wall = f" ({g['wall_value']:.2f})" if "wall_value" in g else ""
        print(f"  {g['goal']:<66} {g['value']:8.3g}{wall}  {'met' if g['met'] else 'NOT met'}")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
