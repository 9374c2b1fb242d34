"""Optimisers of ensembles: flat Adam / Robbins–Monro SGD with a step size per member, and
per-row optimisers of a local-parameter table (docs/algorithms.md).

Global parameters (decoder θ, encoder φ) live in flat leaves [K, P] (``vi.nets``); one update is
a few element-wise operations on the whole leaf, with the step size a [K, 1] tensor, so every
member of an ensemble has its own step size and its own bias-correction count. (CPU
``torch.optim.Adam`` loops in Python over parameter tensors and takes one scalar step size.)

Variational EM keeps one λ_n per data point and member in a [K, N, 2H] table and updates only
the minibatch's rows. Momentum must not leak into rows that were not visited, so the optimiser
state is per row too: Adam moments *and* step counts are indexed by row, so a row's bias
correction counts that row's own updates (``torch.optim.SparseAdam`` shares one step count).
Robbins–Monro SGD uses α_t = α₀ (1 + t/τ)^(−κ) with κ ∈ (0.5, 1], so Σ α_t = ∞ and
Σ α_t² < ∞ (Robbins & Monro, 1951; Hoffman et al., 2013).

Every piece of optimiser state is a tensor whose first axis is the member axis, so an ensemble's
state can be sliced into members and members stacked into an ensemble (``vi.training``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "OPTIMIZERS",
    "FlatOptimizer",
    "IntegerTable",
    "RowOptimizer",
    "adam_update",
    "bias_corrections",
    "robbins_monro",
    "robbins_monro_rate",
    "validate_optimizer",
]

OPTIMIZERS = ("adam", "sgd")
BETAS = (0.9, 0.999)
EPS = 1e-8


def validate_optimizer(kind: str, lr: float, rm_power: float = 0.6, rm_delay: float = 100.0):
    """Raise ``ValueError`` for an unknown optimiser or an impossible step-size schedule."""
    if kind not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {kind!r}; valid: {', '.join(OPTIMIZERS)}")
    if not (isinstance(lr, int | float) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"learning rates must be finite and positive; got {lr}")
    if kind == "sgd" and not (0.5 < rm_power <= 1.0 and 0 < rm_delay < math.inf):
        raise ValueError(
            "a Robbins–Monro schedule needs 0.5 < rm_power <= 1 and 0 < rm_delay < inf; got "
            f"rm_power={rm_power}, rm_delay={rm_delay}"
        )


def robbins_monro(step: Tensor | int, delay: float, power: float) -> Tensor | float:
    """Step-size multiplier (1 + t/τ)^(−κ) after t updates."""
    return (1.0 + step / delay) ** (-power)


def _column(values: Sequence[float] | Tensor, like: Tensor) -> Tensor:
    return torch.as_tensor(values, dtype=like.dtype, device=like.device).reshape(-1, 1)


class IntegerTable:
    """f(t) for integer t ≥ 0, computed once by Python's float64 arithmetic and gathered.

    Bias corrections 1 − βᵗ, Robbins–Monro rates and running-mean corrections are functions of
    an integer step count. Computing them with an element-wise ``pow`` on CPU would make an
    ensemble member's numbers depend on its ensemble-mates: the kernel takes a vectorised or a
    scalar code path depending on where an element lies in its tensor, and the two round
    differently. A gather from one table gives every member and every row the same bits for
    the same t, whatever tensor it sits in."""

    def __init__(self, fn) -> None:
        self.fn = fn
        self.table = torch.zeros(0, dtype=torch.float64)

    def __call__(self, t: Tensor, dtype: torch.dtype) -> Tensor:
        t = t.long()
        top = int(t.max()) if t.numel() else 0
        if top >= self.table.numel():
            size = max(2 * self.table.numel(), top + 1, 1024)
            self.table = torch.tensor([float(self.fn(i)) for i in range(size)],
                                      dtype=torch.float64, device=t.device)
        if self.table.device != t.device:
            self.table = self.table.to(t.device)
        return self.table[t].to(dtype)


_BC1 = IntegerTable(lambda i: 1.0 - BETAS[0] ** i)
_BC2 = IntegerTable(lambda i: 1.0 - BETAS[1] ** i)
_RM: dict[tuple[float, float], IntegerTable] = {}


def robbins_monro_rate(t: Tensor, delay: float, power: float, dtype: torch.dtype) -> Tensor:
    """(1 + t/τ)^(−κ) for integer step counts t (exact gather, see ``IntegerTable``)."""
    key = (float(delay), float(power))
    if key not in _RM:
        _RM[key] = IntegerTable(lambda i: robbins_monro(i, *key))
    return _RM[key](t, dtype)


def bias_corrections(t: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Adam's (1 − β₁ᵗ, 1 − β₂ᵗ) for integer step counts t ≥ 1 (exact gathers)."""
    return _BC1(t, dtype), _BC2(t, dtype)


def adam_update(p: Tensor, g: Tensor, m: Tensor, v: Tensor, lr: Tensor,
                bc: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """One Adam step (Kingma & Ba 2015) for every element, *minimising*, with the bias
    corrections ``bc`` = (1 − β₁ᵗ, 1 − β₂ᵗ) of its step count t (``bias_corrections``, computed
    once per step for every leaf): returns (p', m', v') with

        m' = β₁ m + (1 − β₁) g,   v' = β₂ v + (1 − β₂) g²,
        p' = p − (α / (1 − β₁ᵗ)) m' / (√(v' / (1 − β₂ᵗ)) + ε).

    The one Adam expression of the library (flat leaves and table rows, every member): only
    correctly rounded operations (+, −, ×, ÷, √) and an exact gather of the bias corrections,
    each a separate kernel, so an element's result is the same bits whether its tensor holds
    one member or twenty and whether the element falls in a vectorised block or a tail."""
    b1, b2 = BETAS
    new_m = m * b1 + g * (1 - b1)
    new_v = v * b2 + (g * g) * (1 - b2)
    bc1, bc2 = bc
    step = (lr / bc1) * new_m / ((new_v / bc2).sqrt() + EPS)
    return p - step, new_m, new_v


class FlatOptimizer:
    """Adam or Robbins–Monro SGD over flat leaves [K, P], one step size per (leaf, member).

    ``groups``: [(leaf, step sizes [K])]. ``step()`` *minimises*: it moves each leaf against its
    ``.grad``. Members whose entry of ``active`` is False are left untouched (parameters and
    state), so a stopped or diverged member stays exactly where it was. Every member's update
    is the same arithmetic as it would be alone (``adam_update``), bit for bit.
    """

    def __init__(self, groups: Sequence[tuple[Tensor, Sequence[float] | Tensor]],
                 kind: str = "adam", *, rm_delay: float = 100.0, rm_power: float = 0.6) -> None:
        self.kind = kind
        self.rm_delay, self.rm_power = float(rm_delay), float(rm_power)
        self.params = [p for p, _ in groups]
        self.lrs = [_column(lr, p) for p, lr in groups]
        for p, lr in zip(self.params, self.lrs, strict=True):
            if lr.shape[0] != p.shape[0]:
                raise ValueError(f"{lr.shape[0]} step sizes for a leaf of {p.shape[0]} members")
            validate_optimizer(kind, float(lr.min()), rm_power, rm_delay)
            if not bool(torch.isfinite(lr).all()):
                raise ValueError(f"learning rates must be finite in {p.dtype}; got "
                                 f"{lr.flatten().tolist()}")
        members = self.params[0].shape[0]
        like = self.params[0]
        self.steps = torch.zeros(members, 1, dtype=torch.long, device=like.device)
        if kind == "adam":
            self.exp_avg = [torch.zeros_like(p) for p in self.params]
            self.exp_avg_sq = [torch.zeros_like(p) for p in self.params]

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self, active: Tensor | None = None) -> None:
        mask = None if active is None or bool(active.all()) else active.reshape(-1, 1)
        self.steps += 1 if mask is None else mask.long()
        t = self.steps
        # the schedule's factors of this step, once for every leaf (per dtype)
        factors = {d: (robbins_monro_rate(t - 1, self.rm_delay, self.rm_power, d)
                       if self.kind == "sgd" else bias_corrections(t, d))
                   for d in {p.dtype for p in self.params}}
        for i, (p, lr) in enumerate(zip(self.params, self.lrs, strict=True)):
            if self.kind == "sgd":
                new, state = p - (lr * factors[p.dtype]) * p.grad, ()
            else:
                new, m, v = adam_update(p, p.grad, self.exp_avg[i], self.exp_avg_sq[i], lr,
                                        factors[p.dtype])
                state = ((self.exp_avg[i], m), (self.exp_avg_sq[i], v))
            for buf, val in ((p, new), *state):
                buf.copy_(val if mask is None else torch.where(mask, val, buf))

    def state_dict(self) -> dict[str, Tensor]:
        """Per-member state, member axis first (no step sizes: they come from the settings)."""
        state = {"steps": self.steps.clone()}
        if self.kind == "adam":
            for i in range(len(self.params)):
                state[f"exp_avg{i}"] = self.exp_avg[i].clone()
                state[f"exp_avg_sq{i}"] = self.exp_avg_sq[i].clone()
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.steps.copy_(state["steps"].round().long())
        if self.kind == "adam":
            for i in range(len(self.params)):
                self.exp_avg[i].copy_(state[f"exp_avg{i}"])
                self.exp_avg_sq[i].copy_(state[f"exp_avg_sq{i}"])


class RowOptimizer:
    """Adam or Robbins–Monro SGD over the rows of a table [K, N, P], with per-row state and a
    step size per member.

    ``step(idx, grad, active)`` *minimises*: member k's rows ``idx[k]`` (shape [K, B], no
    repeats within a member) move against ``grad`` [K, B, P]; no other row of the table or of
    the state changes, nor any row of an inactive member.
    """

    def __init__(self, table: Tensor, lr: Sequence[float] | Tensor, kind: str = "adam", *,
                 rm_delay: float = 100.0, rm_power: float = 0.6) -> None:
        self.table, self.kind = table, kind
        self.lr = _column(lr, table).unsqueeze(-1)  # [K, 1, 1]
        if self.lr.shape[0] != table.shape[0]:
            raise ValueError(f"{self.lr.shape[0]} step sizes for a table of {table.shape[0]} "
                             f"members")
        validate_optimizer(kind, float(self.lr.min()), rm_power, rm_delay)
        self.rm_delay, self.rm_power = float(rm_delay), float(rm_power)
        self.steps = torch.zeros(table.shape[:2], dtype=torch.long, device=table.device)
        if kind == "adam":
            self.exp_avg = torch.zeros_like(table)
            self.exp_avg_sq = torch.zeros_like(table)
        # rows are addressed in flat [K·N, P] views: one index instead of (member, row) pairs
        self._offsets = (torch.arange(table.shape[0], device=table.device)
                         * table.shape[1]).unsqueeze(1)

    def flat_index(self, idx: Tensor) -> Tensor:
        """Member k's rows idx[k] as indices of the flat [K·N, P] table: [K·B]."""
        return (idx + self._offsets).reshape(-1)

    def rows(self, idx: Tensor) -> Tensor:
        """The rows idx [K, B] of the table: [K, B, P] (a copy)."""
        flat = self.flat_index(idx)
        return self.table.view(-1, self.table.shape[-1]).index_select(0, flat).view(
            *idx.shape, -1)

    @torch.no_grad()
    def step(self, idx: Tensor, grad: Tensor, active: Tensor | None = None) -> Tensor:
        """Update the rows ``idx`` [K, B]; return their new values [K, B, P]."""
        flat = self.flat_index(idx)
        p = self.table.shape[-1]

        def get(buf: Tensor) -> Tensor:
            return buf.view(-1, p).index_select(0, flat).view_as(grad)

        t = self.steps.view(-1).index_select(0, flat).view(idx.shape) + 1
        rows = get(self.table)
        if self.kind == "sgd":
            rate = self.lr * robbins_monro_rate(t - 1, self.rm_delay, self.rm_power,
                                                rows.dtype).unsqueeze(-1)
            new = rows - rate * grad
            state = ()
        else:
            new, m, v = adam_update(rows, grad, get(self.exp_avg), get(self.exp_avg_sq),
                                    self.lr, bias_corrections(t.unsqueeze(-1), rows.dtype))
            state = ((self.exp_avg, m), (self.exp_avg_sq, v))
        if active is not None and not bool(active.all()):
            keep = active.reshape(-1, 1)
            t = torch.where(keep, t, t - 1)
            new = torch.where(keep.unsqueeze(-1), new, rows)
            state = tuple((buf, torch.where(keep.unsqueeze(-1), val, get(buf)))
                          for buf, val in state)
        self.steps.view(-1).index_copy_(0, flat, t.reshape(-1))
        for buf, val in state:
            buf.view(-1, p).index_copy_(0, flat, val.reshape(-1, p))
        self.table.view(-1, p).index_copy_(0, flat, new.reshape(-1, p))
        return new

    def state_dict(self) -> dict[str, Tensor]:
        state = {"steps": self.steps.clone()}
        if self.kind == "adam":
            state |= {"exp_avg": self.exp_avg.clone(), "exp_avg_sq": self.exp_avg_sq.clone()}
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.steps.copy_(state["steps"])
        if self.kind == "adam":
            self.exp_avg.copy_(state["exp_avg"])
            self.exp_avg_sq.copy_(state["exp_avg_sq"])
