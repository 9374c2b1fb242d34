"""A VAE and variational EM on the 8x8 digits, through the library's public API.

    python examples/vae_vs_vem.py [--epochs 60] [--latent-dim 5]

Both methods train the same Gaussian decoder (an MLP with 64 tanh units) with the
reparameterization gradient; the VAE infers q(z | x) with an encoder, variational EM keeps one
q(z; λ_n) per training point and fits held-out points by gradient steps. Each is trained for
three seeds at once, as one batched ensemble, and stops when its validation ELBO reaches a
plateau. The script prints each run's ELBO on the test split beside two reference models fitted
in closed form on the same data: a Gaussian with no latent variable, and factor analysis.
"""

from __future__ import annotations

import argparse

import torch

import vi


def configs(method: str, args: argparse.Namespace) -> list[vi.RunConfig]:
    """One configuration per seed; everything else is shared, so they train as one ensemble."""
    return [
        vi.RunConfig.from_dict({
            "data": {"name": "digits"},
            "model": {"latent_dim": args.latent_dim, "hidden": [64]},
            "method": {"name": method, "encoder_hidden": [64], "lr": 3e-3,
                       "encoder_lr": 3e-3, "local_lr": 0.1},
            "training": {"max_epochs": args.epochs, "batch_size": 100},
            "seed": seed,
        })
        for seed in range(3)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--latent-dim", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)  # the networks are tiny: one thread is fastest

    print(f"digits, H = {args.latent_dim}, test ELBO in nats per image (higher is better)")
    for method in ("amortized", "vem"):
        results = vi.train(configs(method, args))
        for r in sorted(results, key=lambda r: r.config.seed):
            test = [row["value"] for row in r.rows
                    if row["metric"] == "elbo" and row["split"] == "test"
                    and row["epoch"] == r.best_epoch]
            print(f"  {method:<10} seed {r.config.seed}: {test[0]:7.2f}  "
                  f"(best epoch {r.best_epoch} of {r.epochs_run}, "
                  f"{'converged' if r.converged else 'not converged'})")

    data = vi.load_dataset("digits", seed=0, validation_fraction=0.1)
    from vi.references import reference_rows

    print("  references on seed 0's split:")
    for row in reference_rows(data, [args.latent_dim], splits=("test",)):
        if row["model"] in ("no_latent", "factor_analysis"):
            print(f"  {row['model']:<16} {row['log_px']:7.2f}")


if __name__ == "__main__":
    main()
