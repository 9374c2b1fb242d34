"""Stacked networks: K independent copies of one architecture trained as one batched model.

An ensemble of K members (seeds, step sizes) of one configuration is cheaper to train as one
model than one after another: the study's networks are small (batch 100, widths 64–500), so a
step is bound by the per-operation overhead of ~hundreds of small kernels, which a batched
matrix product pays once for all members. Every parameter tensor therefore carries a leading
member axis, and a layer maps [K, N, d_in] → [K, N, d_out] by ``torch.baddbmm``.

All parameters of a network live in one leaf tensor ``flat`` [K, P]; ``views()`` cuts it into
named views (one ``split``, whose backward is one ``cat``), so the gradient arrives as one
[K, P] tensor: an optimiser updates every parameter of every member with a handful of
element-wise operations and a per-member step size, and per-member gradient norms, clipping and
finiteness checks are reductions over ``dim=1``. K = 1 is the ordinary single model.

Initialisation is per member, from the member's own generator, with ``torch.nn.Linear``'s rule
(weights and biases U(−1/√fan_in, 1/√fan_in)), so a member's starting point does not depend on
which other members share its ensemble.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ACTIVATIONS", "FlatParameters", "StackedMLP", "member_mean", "member_sum",
           "mlp_shapes"]

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "tanh": torch.tanh,
    "relu": F.relu,
    "elu": F.elu,
    "softplus": F.softplus,
}


class FlatParameters(nn.Module):
    """Named parameter tensors [K, *shape] stored in one leaf ``flat`` [K, P]."""

    def __init__(self, members: int, shapes: dict[str, tuple[int, ...]]) -> None:
        super().__init__()
        if int(members) < 1:
            raise ValueError(f"an ensemble needs at least one member; got {members}")
        self.shapes = {name: tuple(int(d) for d in shape) for name, shape in shapes.items()}
        self.sizes = [math.prod(s) for s in self.shapes.values()]
        self.flat = nn.Parameter(torch.zeros(int(members), sum(self.sizes)))

    @property
    def members(self) -> int:
        return self.flat.shape[0]

    def views(self, flat: Tensor | None = None) -> dict[str, Tensor]:
        """{name: [K, *shape]} views of ``flat`` (default: the module's own)."""
        flat = self.flat if flat is None else flat
        parts = flat.split(self.sizes, dim=-1)
        lead = flat.shape[:-1]
        return {name: p.view(*lead, *shape)
                for (name, shape), p in zip(self.shapes.items(), parts, strict=True)}

    @torch.no_grad()
    def fill(self, member: int, name: str, value: Tensor) -> None:
        """Write ``value`` (shape ``shapes[name]``) into one member's parameter."""
        self.views()[name][member].copy_(value)


def mlp_shapes(sizes: Sequence[int], prefix: str = "") -> dict[str, tuple[int, ...]]:
    """Weights [d_in, d_out] and biases [d_out] of an MLP with layer widths ``sizes``."""
    shapes: dict[str, tuple[int, ...]] = {}
    for i in range(len(sizes) - 1):
        shapes[f"{prefix}w{i}"] = (int(sizes[i]), int(sizes[i + 1]))
        shapes[f"{prefix}b{i}"] = (int(sizes[i + 1]),)
    return shapes


class StackedMLP(nn.Module):
    """K MLPs of widths ``sizes`` (activation between layers, none after the last).

    ``forward(x [K, N, d_0]) -> [K, N, d_L]``. Parameters are named ``w{i}`` [d_i, d_{i+1}] and
    ``b{i}`` [d_{i+1}] in ``params`` (a ``FlatParameters``), possibly shared with other named
    tensors of the owning module (``extra`` shapes).
    """

    def __init__(self, members: int, sizes: Sequence[int], activation: str = "tanh",
                 extra: dict[str, tuple[int, ...]] | None = None) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; valid: {', '.join(ACTIVATIONS)}")
        if len(sizes) < 2 or any(int(s) < 1 for s in sizes):
            raise ValueError(f"layer widths must be positive; got {list(sizes)}")
        self.sizes = [int(s) for s in sizes]
        self.activation = activation
        self.params = FlatParameters(members, {**mlp_shapes(self.sizes), **(extra or {})})

    @property
    def members(self) -> int:
        return self.params.members

    def forward(self, x: Tensor, views: dict[str, Tensor] | None = None) -> Tensor:
        p = self.params.views() if views is None else views
        act = ACTIVATIONS[self.activation]
        h = x
        last = len(self.sizes) - 2
        for i in range(last + 1):
            h = torch.baddbmm(p[f"b{i}"].unsqueeze(-2), h, p[f"w{i}"])
            if i < last:
                h = act(h)
        return h

    @torch.no_grad()
    def reset_member(self, member: int, generator: torch.Generator) -> None:
        """``nn.Linear``'s initialisation for one member, from its own generator."""
        views = self.params.views()
        for i in range(len(self.sizes) - 1):
            bound = 1.0 / math.sqrt(self.sizes[i])
            for name in (f"w{i}", f"b{i}"):
                target = views[name][member]
                u = torch.rand(target.shape, generator=generator, device=target.device,
                               dtype=target.dtype)
                target.copy_((2 * u - 1) * bound)


def member_sum(t: Tensor, member_dim: int = 0) -> Tensor:
    """Σ over every axis but the member axis: [K] in float64, summed in one fixed sequential
    order per member.

    A plain ``sum`` picks its reduction strategy (and so its summation order and rounding) from
    the tensor's shape: a [1, P] tensor is reduced as one contiguous vector, a [K, P] one row by
    row. A member's sum would then depend on how many members share its tensor. Here each
    member's values are laid out contiguously and accumulated by a sequential ``cumsum`` in
    float64, so its sum is the same bits alone or in any ensemble (used for per-member norms,
    baselines and stopping decisions)."""
    flat = t.detach().movedim(member_dim, 0).reshape(t.shape[member_dim], -1).double()
    return flat.cumsum(dim=1)[:, -1] if flat.shape[1] else flat.new_zeros(flat.shape[0])


def member_mean(t: Tensor, member_dim: int = 0) -> Tensor:
    """Mean over every axis but the member axis, [K] in float64 (see ``member_sum``)."""
    return member_sum(t, member_dim) / max(1, t.numel() // max(1, t.shape[member_dim]))

