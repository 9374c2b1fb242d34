"""The variational family: a diagonal Gaussian in the ``(μ, log σ²)`` parameterization
(docs/model.md).

    q(z; λ) = N(z; μ, diag σ²),   λ = (μ, log σ²) ∈ R^{2H}

λ is a plain tensor whose last axis has length 2H (first H entries μ, last H entries log σ²),
so the same functions serve a per-datapoint table (N x 2H), an encoder's output (B x 2H) and
K stacked copies (K x B x 2H). Sampling takes explicit noise ε ~ N(0, I), so every quantity
here is a deterministic function of (λ, ε) (Kingma & Welling, 2014; Rezende et al., 2014).
Densities, entropies and the KL come from ``torch.distributions``.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.distributions import Independent, Normal, kl_divergence

__all__ = [
    "diag_gaussian",
    "diag_normal",
    "entropy",
    "join_params",
    "kl_to_standard_normal",
    "latent_dim_of",
    "log_prob",
    "sample",
    "score",
    "split_params",
    "standard_log_prob",
    "standard_normal",
]


def latent_dim_of(lam: Tensor) -> int:
    """H for λ of shape [..., 2H]; raises on an odd or empty last axis."""
    if lam.dim() < 1 or lam.shape[-1] == 0 or lam.shape[-1] % 2:
        raise ValueError(
            f"variational parameters must have an even, non-zero last axis (μ, log σ²) of "
            f"length 2H; got shape {tuple(lam.shape)}"
        )
    return lam.shape[-1] // 2


def split_params(lam: Tensor) -> tuple[Tensor, Tensor]:
    """λ = (μ, log σ²) → (μ, log σ²), each [..., H]."""
    latent_dim_of(lam)
    return lam.chunk(2, dim=-1)  # one split node: its backward is one cat, not two scatters


def join_params(mu: Tensor, logvar: Tensor) -> Tensor:
    """(μ, log σ²) → λ of shape [..., 2H]."""
    if mu.shape != logvar.shape:
        raise ValueError(f"μ and log σ² shapes differ: {tuple(mu.shape)} vs {tuple(logvar.shape)}")
    return torch.cat([mu, logvar], dim=-1)


def diag_normal(loc: Tensor, scale: Tensor) -> Independent:
    """N(loc, diag scale²) with event shape [loc.shape[-1]].

    Argument validation is off: a non-finite parameter must flow on to the trainer's
    divergence check (a recorded outcome) instead of raising inside ``torch.distributions``,
    and validation would cost time in the hot path.
    """
    return Independent(Normal(loc, scale, validate_args=False), 1, validate_args=False)


def diag_gaussian(lam: Tensor) -> Independent:
    """q(z; λ) = N(μ, diag exp(log σ²)) as a ``torch.distributions`` object, event shape [H]."""
    mu, logvar = split_params(lam)
    return diag_normal(mu, torch.exp(0.5 * logvar))


def standard_normal(latent_dim: int, like: Tensor) -> Independent:
    """The prior p(z) = N(0, I_H) on ``like``'s device and dtype."""
    zeros = like.new_zeros(latent_dim)
    return diag_normal(zeros, torch.ones_like(zeros))


def sample(lam: Tensor, eps: Tensor) -> Tensor:
    """z = μ + σ ⊙ ε (the reparameterization r(λ, ε)); ε has shape [M, ..., H] → z [M, ..., H]."""
    mu, logvar = split_params(lam)
    if eps.shape[-1] != mu.shape[-1]:
        raise ValueError(
            f"noise has last axis {eps.shape[-1]} but the latent dimension is {mu.shape[-1]}"
        )
    return mu + torch.exp(0.5 * logvar) * eps


def log_prob(lam: Tensor, z: Tensor) -> Tensor:
    """log q(z; λ), summed over the H latent coordinates; broadcasts z [M, ..., H] against λ.

    (The hot paths sum a ``Normal``'s log-densities over the last axis: the same number as
    ``diag_gaussian(lam).log_prob(z)`` without building an ``Independent`` each step.)"""
    mu, logvar = split_params(lam)
    return Normal(mu, torch.exp(0.5 * logvar), validate_args=False).log_prob(z).sum(-1)


def standard_log_prob(z: Tensor) -> Tensor:
    """log N(z; 0, I), summed over the last axis."""
    return _standard_like(z).log_prob(z).sum(-1)


def entropy(lam: Tensor) -> Tensor:
    """H[q] = ½ Σ_h (1 + log 2π + log σ²_h)."""
    return diag_gaussian(lam).entropy()


def kl_to_standard_normal(lam: Tensor) -> Tensor:
    """KL(q(z; λ) ‖ N(0, I)) = ½ Σ_h (σ²_h + μ²_h − 1 − log σ²_h), closed form."""
    mu, logvar = split_params(lam)
    q = Normal(mu, torch.exp(0.5 * logvar), validate_args=False)
    return kl_divergence(q, _standard_like(mu)).sum(-1)


#: N(0, 1) with 0-d parameters (broadcasts against any shape)
_STANDARD = Normal(torch.tensor(0.0), torch.tensor(1.0), validate_args=False)


def _standard_like(t: Tensor) -> Normal:
    if t.dtype == torch.float32 and t.device.type == "cpu":
        return _STANDARD
    return Normal(t.new_zeros(()), t.new_ones(()), validate_args=False)


def score(lam: Tensor, eps: Tensor) -> Tensor:
    """∇_λ log q(z; λ) at z = μ + σ ε, in closed form: (ε/σ, (ε² − 1)/2), shape [M, ..., 2H].

    Used by the control-variate baseline, which needs the score's coordinates, not only the
    surrogate whose gradient it is.
    """
    _, logvar = split_params(lam)
    return torch.cat([eps * torch.exp(-0.5 * logvar), 0.5 * (eps * eps - 1.0)], dim=-1)
