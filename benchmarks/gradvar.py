"""Per-draw gradients for gradient-variance logging: batched path against a loop (issue 4).

Setting: the digits model at initialisation (D = 64, MLP decoder and encoder of width 256,
learned per-dimension variance; the ``TrainConfig`` defaults), amortized method, ``reparam``,
analytic KL, M = 1, the trainer's fixed evaluation minibatch of B = 64 points, K = 256 draws,
latent dimension H ∈ {2, 8, 32}. Per parameter group, three ways to get the K x P matrix of
per-draw gradients from the same noise:

``batched``  ``vi.gradstats.per_sample_grads`` (one backward over K copies of λ for
             ``variational``; vmap over the encoder's vjp of those for ``encoder``;
             ``vmap(grad)`` for ``decoder``).
``vmap``     plain ``vmap(grad(...))`` over the noise of the whole objective, w.r.t. λ or φ
             (for ``decoder`` this is what ``batched`` does).
``loop``     ``vi.gradstats.per_sample_grads_loop``: K ordinary autograd calls.

Contenders alternate within each repeat (the order rotates), and each reports its best time;
the ratio is loop / batched. The machine is shared, so expect noise: ``torch`` threads and the
load average are printed with the results.

Usage::

    python benchmarks/gradvar.py            # full run
    python benchmarks/gradvar.py --quick    # smoke run (a few seconds)
    python benchmarks/gradvar.py --threads 1

Prints a human table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch
from torch.func import functional_call, grad, vmap

from vi import gradstats
from vi.objectives import elbo
from vi.training import TrainConfig, Trainer


@torch.no_grad()  # torch.func.grad still differentiates; no_grad only stops tracking θ
def plain_vmap(method, x, group: str, noise: torch.Tensor) -> torch.Tensor:
    """vmap(grad) over the noise of the whole objective, w.r.t. λ (sum) or φ (mean)."""
    s, decoder = method.settings, method.decoder

    def surrogate(lam, eps):
        return elbo(decoder, x, lam, eps, estimator=s.estimator, baseline=s.baseline,
                    kl=s.kl).surrogate

    if group == "variational":
        lam = method.encoder(x).detach()
        out = vmap(grad(lambda lam_, e: surrogate(lam_, e).sum()), in_dims=(None, 0))(lam, noise)
        return out.reshape(noise.shape[0], -1)
    params = {n: p.detach() for n, p in method.encoder.named_parameters()}

    def loss(p, e):
        return surrogate(functional_call(method.encoder, p, (x,)), e).mean()

    out = vmap(grad(loss), in_dims=(None, 0))(params, noise)
    return torch.cat([out[n].reshape(noise.shape[0], -1) for n in params], dim=1)


def bench_cell(latent_dim: int, draws: int, repeats: int, batch: int = 64) -> list[dict]:
    trainer = Trainer(TrainConfig(latent_dim=latent_dim, method="amortized", epochs=1,
                                  gradvar_batch=batch))
    method = trainer.method
    idx = gradstats.evaluation_batch(trainer)
    x = trainer.x["train"][idx]
    noise = torch.randn((draws, 1, x.shape[0], latent_dim),
                        generator=torch.Generator().manual_seed(latent_dim))
    rows = []
    for group in gradstats.groups_of(method):
        contenders = {
            "batched": lambda g=group: gradstats.per_sample_grads(
                method, x, idx, noise=noise, groups=[g])[g],
            "loop": lambda g=group: gradstats.per_sample_grads_loop(
                method, x, idx, noise, groups=[g])[g],
        }
        if group != "decoder":
            contenders["vmap"] = lambda g=group: plain_vmap(method, x, g, noise)
        names = list(contenders)
        out = {n: contenders[n]() for n in names}  # warm-up, and the agreement check
        diff = max(float((out[n] - out["loop"]).abs().max()) for n in names)
        scale = float(out["loop"].abs().max())
        best = dict.fromkeys(names, float("inf"))
        for r in range(repeats):
            for n in names[r % len(names):] + names[:r % len(names)]:
                start = time.perf_counter()
                contenders[n]()
                best[n] = min(best[n], time.perf_counter() - start)
        rows.append({
            "latent_dim": latent_dim, "group": group, "P": out["loop"].shape[1],
            "batched_s": best["batched"], "vmap_s": best.get("vmap", best["batched"]),
            "loop_s": best["loop"], "ratio": best["loop"] / best["batched"],
            "ratio_vmap": best["loop"] / best.get("vmap", best["batched"]),
            "max_abs_diff": diff, "max_abs_grad": scale,
        })
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: K=32, H=2, 1 repeat")
    parser.add_argument("--draws", type=int, default=None, help="K (default 256; quick 32)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (default 5)")
    parser.add_argument("--dims", type=int, nargs="+", default=None, help="latent dims")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--batch", type=int, default=64, help="evaluation minibatch B")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    draws = args.draws or (32 if args.quick else 256)
    repeats = args.repeats or (1 if args.quick else 5)
    dims = args.dims or ([2] if args.quick else [2, 8, 32])
    rows = [r for h in dims for r in bench_cell(h, draws, repeats, args.batch)]

    print(f"per-draw gradients, digits amortized at init, reparam, M=1, B={args.batch}, K={draws}, "
          f"threads={torch.get_num_threads()}, load={os.getloadavg()[0]:.1f}")
    print(f"{'H':>3} {'group':<12} {'P':>7} {'batched ms':>11} {'vmap ms':>9} {'loop ms':>9} "
          f"{'loop/batched':>13} {'loop/vmap':>10}")
    for r in rows:
        print(f"{r['latent_dim']:>3} {r['group']:<12} {r['P']:>7} {1e3 * r['batched_s']:>11.1f} "
              f"{1e3 * r['vmap_s']:>9.1f} {1e3 * r['loop_s']:>9.1f} {r['ratio']:>12.1f}x "
              f"{r['ratio_vmap']:>9.1f}x")
    result = {
        "benchmark": "gradvar", "draws": draws, "batch": args.batch, "n_mc": 1, "repeats": repeats,
        "threads": torch.get_num_threads(), "loadavg_1m": round(os.getloadavg()[0], 2),
        "torch": torch.__version__, "machine": platform.machine(),
        "min_ratio": min(r["ratio"] for r in rows), "cells": rows,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
