"""The study's amortized VAE on the 8x8 digits in one page of plain PyTorch.

    python examples/plain_vae.py [--epochs 50] [--latent-dim 5] [--seed 0]

What one run of ``vi.train`` with method ``amortized``, the reparameterization gradient, one
Monte Carlo sample and the closed-form KL does, written with ``torch.nn``, ``torch.distributions``
and ``torch.optim.Adam`` (Kingma & Welling, 2014). Only the data come from the library
(``vi.load_dataset``: the split and the dequantization x = (v + u) / 17), so both see one data
set. Per minibatch of B points, with noise ε_m ~ N(0, I),

    (μ, log σ²) = f_φ(x),   z_m = μ + σ ⊙ ε_m,
    L(x) = (1/M) Σ_m log N(x; g_θ(z_m), σ²_min + exp(ρ)) − KL(N(μ, σ²) ‖ N(0, I)),

and one Adam step on −(1/B) Σ_x L(x) over (θ, ρ, φ). The initialisation is the library's: every
layer as ``nn.Linear`` (U(−1/√fan_in, 1/√fan_in)), drawn in the library's order from one
generator; the encoder's log σ² head scaled by 0.1 with zero bias; the decoder's last layer scaled
by 0.01, its bias at the data mean and σ² at the data variance. ``tests/test_examples.py`` trains
this page and ``vi.train`` from the same seed's streams and finds the same parameters to rounding.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn
from torch.distributions import Normal, kl_divergence

import vi


class VAE(nn.Module):
    def __init__(self, data_dim: int, latent_dim: int, hidden: int, var_floor: float) -> None:
        super().__init__()
        self.latent_dim, self.var_floor = latent_dim, var_floor
        self.decoder = nn.Sequential(nn.Linear(latent_dim, hidden), nn.Tanh(),
                                     nn.Linear(hidden, data_dim))
        self.raw_var = nn.Parameter(torch.zeros(data_dim))  # σ² = σ²_min + exp(ρ) per pixel
        self.encoder = nn.Sequential(nn.Linear(data_dim, hidden), nn.Tanh(),
                                     nn.Linear(hidden, 2 * latent_dim))

    @torch.no_grad()
    def reset(self, generator: torch.Generator) -> None:
        """Every layer as ``nn.Linear``, the decoder's then the encoder's, w then b, from
        ``generator`` (the library's order); the encoder's log σ² head scaled by 0.1."""
        for net in (self.decoder, self.encoder):
            for layer in net[::2]:
                bound = layer.in_features ** -0.5
                for p in (layer.weight.T, layer.bias):  # the library stores W as [in, out]
                    p.copy_((2 * torch.rand(p.shape, generator=generator, dtype=p.dtype) - 1)
                            * bound)
        self.encoder[2].weight[self.latent_dim:] *= 0.1
        self.encoder[2].bias.zero_()

    @torch.no_grad()
    def init_from_data(self, x: torch.Tensor) -> None:
        """Start at the no-latent Gaussian of training data x [N, D]: the decoder's last layer
        scaled by 0.01, its bias at the data mean, σ² at the data variance."""
        self.decoder[2].weight *= 0.01
        self.decoder[2].bias.copy_(x.mean(0))
        floor = self.var_floor
        self.raw_var.copy_(torch.log((x.var(0, correction=0) - floor).clamp_min(floor)))

    def elbo(self, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """L(x) per point [B] for x [B, D] and noise ε [M, B, H]."""
        mu, logvar = self.encoder(x).chunk(2, dim=-1)
        q = Normal(mu, torch.exp(0.5 * logvar))
        z = mu + q.scale * eps
        p_x = Normal(self.decoder(z), (self.var_floor + torch.exp(self.raw_var)).sqrt())
        reconstruction = p_x.log_prob(x).sum(-1).mean(0)
        return reconstruction - kl_divergence(q, Normal(0.0, 1.0)).sum(-1)


def train(model: VAE, x: torch.Tensor, *, epochs: int, lr: float = 3e-3, batch_size: int = 100,
          n_mc: int = 1, order: torch.Generator | None = None,
          noise: torch.Generator | None = None) -> list[float]:
    """Adam on minibatches in a fresh random order each epoch (drawn from ``order``), noise
    from ``noise``; returns each epoch's mean minibatch ELBO estimate (nats per point)."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    n, history = x.shape[0], []
    for _ in range(epochs):
        total = torch.zeros((), dtype=torch.float64)
        for idx in torch.randperm(n, generator=order).split(batch_size):
            eps = torch.randn((n_mc, len(idx), model.latent_dim), generator=noise, dtype=x.dtype)
            elbo = model.elbo(x[idx], eps)
            opt.zero_grad()
            (-elbo.mean()).backward()
            opt.step()
            total += elbo.detach().double().sum()
        history.append(float(total) / n)
    return history


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--latent-dim", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)  # the networks are tiny: one thread is fastest
    data = vi.load_dataset("digits", seed=args.seed, test_fraction=0.2, validation_fraction=0.1)
    x = data.split("train")
    model = VAE(x.shape[1], args.latent_dim, 64, vi.variance_floor(data.levels))
    model.reset(torch.Generator().manual_seed(args.seed))
    model.init_from_data(x)
    history = train(model, x, epochs=args.epochs,
                    order=torch.Generator().manual_seed(args.seed + 1),
                    noise=torch.Generator().manual_seed(args.seed + 2))
    with torch.no_grad():
        x_test = data.split("test")
        eps = torch.randn((100, *x_test.shape[:1], args.latent_dim),
                          generator=torch.Generator().manual_seed(args.seed + 3))
        test = float(model.elbo(x_test, eps).mean())
    print(f"digits, H = {args.latent_dim}: training ELBO {history[-1]:.2f} after {args.epochs} "
          f"epochs, test ELBO {test:.2f} nats per image (100 samples)")


if __name__ == "__main__":
    main()
