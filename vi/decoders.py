"""The shared Gaussian decoder p_θ(x | z) = N(x; μ_θ(z), diag σ²_θ(z)) and its prior (SPEC §1).

One class covers every variant of the study:

==============  =====================  ==================================================
``mean``        μ_θ(z)                 ``variance``
==============  =====================  ==================================================
``mlp``         MLP(z)                 ``fixed`` | ``learned`` (per dim) | ``heteroscedastic``
``linear``      W z + b                ``fixed`` | ``learned`` isotropic s² (PPCA) or
                                       per-dimension Ψ (factor analysis)
==============  =====================  ==================================================

A variance floor keeps the likelihood bounded: σ² = σ²_min + exp(ρ) for learned variances, with
ρ unconstrained. Every variant computes log p(x | z) through one path, ``torch.distributions``'
``Independent(Normal(μ, σ), 1)``, batched over Monte Carlo samples and data points: z of shape
[M, B, H] and x of shape [B, D] give [M, B].
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.distributions import Independent

from vi.families import diag_normal, standard_normal

__all__ = ["ACTIVATIONS", "MEANS", "VARIANCES", "GaussianDecoder", "log_joint"]

MEANS = ("mlp", "linear")
VARIANCES = ("fixed", "learned", "heteroscedastic")
ACTIVATIONS: dict[str, type[nn.Module]] = {
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "elu": nn.ELU,
    "softplus": nn.Softplus,
}


def _choice(kind: str, value: str, valid: Sequence[str]) -> str:
    if value not in valid:
        raise ValueError(f"unknown {kind} {value!r}; valid: {', '.join(valid)}")
    return value


def _mlp(sizes: Sequence[int], activation: str) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(sizes) - 2:
            layers.append(ACTIVATIONS[activation]())
    return nn.Sequential(*layers)


class GaussianDecoder(nn.Module):
    """p_θ(x | z) = N(x; μ_θ(z), diag σ²_θ(z)) with prior p(z) = N(0, I_H) (SPEC §1).

    Args:
        data_dim: D.
        latent_dim: H.
        mean: ``"mlp"`` or ``"linear"`` (μ = W z + b).
        variance: ``"fixed"`` (σ² = ``fixed_var``), ``"learned"`` (free parameter) or
            ``"heteroscedastic"`` (second MLP head gives log σ²(z); ``mlp`` only).
        isotropic: with ``learned`` variance, one shared s² (PPCA) instead of per-dimension Ψ.
        hidden: hidden widths of the MLP(s).
        activation: one of ``ACTIVATIONS``.
        var_floor: σ²_min ≥ 0 added to every learned variance.
        fixed_var: the constant σ² of the ``fixed`` variant.
        init_var: initial σ² of the ``learned`` variants.
    """

    def __init__(
        self,
        data_dim: int,
        latent_dim: int,
        *,
        mean: str = "mlp",
        variance: str = "learned",
        isotropic: bool = False,
        hidden: Sequence[int] = (256,),
        activation: str = "tanh",
        var_floor: float = 1e-4,
        fixed_var: float = 1.0,
        init_var: float = 1.0,
    ) -> None:
        super().__init__()
        if int(data_dim) < 1 or int(latent_dim) < 1:
            raise ValueError(
                f"data_dim and latent_dim must be positive; got D={data_dim}, H={latent_dim}"
            )
        if not var_floor >= 0 or not math.isfinite(var_floor):
            raise ValueError(f"var_floor must be a finite number >= 0; got {var_floor}")
        if not fixed_var > 0 or not init_var > var_floor:
            raise ValueError(
                f"fixed_var must be > 0 and init_var > var_floor; got fixed_var={fixed_var}, "
                f"init_var={init_var}, var_floor={var_floor}"
            )
        if any(int(w) < 1 for w in hidden):
            raise ValueError(f"hidden widths must be positive; got {list(hidden)}")
        self.mean_kind = _choice("decoder mean", mean, MEANS)
        self.variance_kind = _choice("decoder variance", variance, VARIANCES)
        _choice("activation", activation, tuple(ACTIVATIONS))
        if mean == "linear" and variance == "heteroscedastic":
            raise ValueError("a linear decoder has no heteroscedastic variant; use fixed/learned")
        self.data_dim, self.latent_dim = int(data_dim), int(latent_dim)
        self.isotropic = bool(isotropic)
        self.var_floor, self.fixed_var = float(var_floor), float(fixed_var)

        out = 2 * data_dim if variance == "heteroscedastic" else data_dim
        if mean == "linear":
            self.net = nn.Linear(latent_dim, data_dim)
        else:
            self.net = _mlp([latent_dim, *map(int, hidden), out], activation)
        if variance == "learned":
            n = 1 if isotropic else data_dim
            self.raw_var = nn.Parameter(torch.full((n,), math.log(init_var - var_floor)))

    def mean_and_variance(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """(μ_θ(z), σ²_θ(z)), each [..., D] (σ² broadcastable for non-heteroscedastic variants)."""
        out = self.net(z)
        if self.variance_kind == "heteroscedastic":
            mean, raw = out.chunk(2, dim=-1)
            return mean, self.var_floor + torch.exp(raw)
        if self.variance_kind == "learned":
            var = self.var_floor + torch.exp(self.raw_var)
            return out, var.expand(self.data_dim)
        return out, out.new_full((self.data_dim,), self.fixed_var)

    def distribution(self, z: Tensor) -> Independent:
        """p_θ(x | z) as ``Independent(Normal(μ, σ), 1)`` with batch shape z.shape[:-1]."""
        mean, var = self.mean_and_variance(z)
        return diag_normal(mean, var.sqrt().expand_as(mean))

    def log_likelihood(self, x: Tensor, z: Tensor) -> Tensor:
        """log p_θ(x | z): x [B, D], z [M, B, H] → [M, B] (any leading shape broadcasts)."""
        if x.shape[-1] != self.data_dim or z.shape[-1] != self.latent_dim:
            raise ValueError(
                f"decoder expects x [..., {self.data_dim}] and z [..., {self.latent_dim}]; got "
                f"x {tuple(x.shape)}, z {tuple(z.shape)}"
            )
        return self.distribution(z).log_prob(x)

    def prior(self, like: Tensor) -> Independent:
        """p(z) = N(0, I_H)."""
        return standard_normal(self.latent_dim, like)

    def linear_parameters(self) -> tuple[Tensor, Tensor, Tensor]:
        """(W [D, H], b [D], Ψ [D]) of a linear decoder (for the closed forms)."""
        if self.mean_kind != "linear":
            raise ValueError("linear_parameters() needs a decoder with mean='linear'")
        _, var = self.mean_and_variance(self.net.weight.new_zeros(self.latent_dim))
        return self.net.weight, self.net.bias, var

    @torch.no_grad()
    def set_linear_parameters(self, W: Tensor, b: Tensor, psi: Tensor | float) -> None:
        """Load (W, b, Ψ) into a linear decoder with learned variance (e.g. a PPCA fit)."""
        if self.mean_kind != "linear" or self.variance_kind != "learned":
            raise ValueError("set_linear_parameters() needs mean='linear', variance='learned'")
        self.net.weight.copy_(W)
        self.net.bias.copy_(b)
        psi = torch.as_tensor(psi, dtype=self.raw_var.dtype).expand_as(self.raw_var)
        if bool((psi <= self.var_floor).any()):
            raise ValueError(f"noise variance must exceed the floor {self.var_floor}")
        self.raw_var.copy_(torch.log(psi - self.var_floor))


def log_joint(decoder: GaussianDecoder, x: Tensor, z: Tensor) -> Tensor:
    """log p_θ(x, z) = log p_θ(x | z) + log p(z): x [B, D], z [M, B, H] → [M, B]."""
    return decoder.log_likelihood(x, z) + decoder.prior(z).log_prob(z)
