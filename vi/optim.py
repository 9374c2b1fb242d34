"""Optimisers for the study: per-row optimisers of a local-parameter table, and the global ones.

Variational EM keeps one λ_n per data point in an N x 2H table and updates only the minibatch's
rows. Momentum must not leak into rows that were not visited (SPEC §4), so the optimiser state
is per row too: Adam moments *and* step counts are indexed by row, so a row's bias correction
counts that row's own updates (``torch.optim.SparseAdam`` shares one step count across rows).
Robbins–Monro SGD uses α_t = α₀ (1 + t/τ)^(−κ) with κ ∈ (0.5, 1], so Σ α_t = ∞ and Σ α_t² < ∞
(Robbins & Monro, 1951; Hoffman et al., 2013).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

__all__ = ["OPTIMIZERS", "RowOptimizer", "make_optimizer", "robbins_monro", "validate_optimizer"]

OPTIMIZERS = ("adam", "sgd")


def validate_optimizer(kind: str, lr: float, rm_power: float = 0.6, rm_delay: float = 100.0):
    """Raise ``ValueError`` for an unknown optimiser or an impossible step-size schedule."""
    if kind not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {kind!r}; valid: {', '.join(OPTIMIZERS)}")
    if not lr > 0:
        raise ValueError(f"learning rates must be positive; got {lr}")
    if kind == "sgd" and not (0.5 < rm_power <= 1.0 and rm_delay > 0):
        raise ValueError(
            "a Robbins–Monro schedule needs 0.5 < rm_power <= 1 and rm_delay > 0; got "
            f"rm_power={rm_power}, rm_delay={rm_delay}"
        )


def robbins_monro(step: Tensor | int, delay: float, power: float) -> Tensor | float:
    """Step-size multiplier (1 + t/τ)^(−κ) after t updates."""
    return (1.0 + step / delay) ** (-power)


class RowOptimizer:
    """Adam or Robbins–Monro SGD over the rows of a table, with per-row state.

    ``step(idx, grad)`` *minimises*: it moves ``table[idx]`` against ``grad`` (shape
    [len(idx), P]) and touches no other row of the table or of the state. ``idx`` must not
    repeat (a minibatch drawn from a permutation never does).
    """

    def __init__(
        self,
        table: Tensor,
        kind: str = "adam",
        lr: float = 1e-2,
        *,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        rm_delay: float = 100.0,
        rm_power: float = 0.6,
    ) -> None:
        validate_optimizer(kind, lr, rm_power, rm_delay)
        self.table, self.kind, self.lr = table, kind, float(lr)
        self.betas, self.eps = betas, float(eps)
        self.rm_delay, self.rm_power = float(rm_delay), float(rm_power)
        self.steps = torch.zeros(table.shape[0], dtype=torch.long, device=table.device)
        if kind == "adam":
            self.exp_avg = torch.zeros_like(table)
            self.exp_avg_sq = torch.zeros_like(table)

    @torch.no_grad()
    def step(self, idx: Tensor, grad: Tensor) -> Tensor:
        """Update the rows ``idx``; return their new values."""
        t = self.steps[idx] + 1
        self.steps[idx] = t
        rows = self.table[idx]
        if self.kind == "sgd":
            # the count in the table's dtype: a long count would give a float32 schedule
            rate = self.lr * robbins_monro((t - 1).to(rows.dtype), self.rm_delay, self.rm_power)
            rows = rows - rate.unsqueeze(-1) * grad
        else:
            b1, b2 = self.betas
            m = b1 * self.exp_avg[idx] + (1 - b1) * grad
            v = b2 * self.exp_avg_sq[idx] + (1 - b2) * grad * grad
            self.exp_avg[idx], self.exp_avg_sq[idx] = m, v
            tf = t.to(rows.dtype).unsqueeze(-1)
            m_hat, v_hat = m / (1 - b1**tf), v / (1 - b2**tf)
            rows = rows - self.lr * m_hat / (v_hat.sqrt() + self.eps)
        self.table[idx] = rows
        return rows

    def state_dict(self) -> dict:
        state = {"steps": self.steps.clone()}
        if self.kind == "adam":
            state |= {"exp_avg": self.exp_avg.clone(), "exp_avg_sq": self.exp_avg_sq.clone()}
        return state

    def load_state_dict(self, state: dict) -> None:
        self.steps.copy_(state["steps"])
        if self.kind == "adam":
            self.exp_avg.copy_(state["exp_avg"])
            self.exp_avg_sq.copy_(state["exp_avg_sq"])


def make_optimizer(
    params: Iterable[torch.nn.Parameter],
    kind: str = "adam",
    lr: float = 1e-3,
    *,
    rm_delay: float = 100.0,
    rm_power: float = 0.6,
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler | None]:
    """Adam, or SGD with a Robbins–Monro schedule (stepped once per update)."""
    validate_optimizer(kind, lr, rm_power, rm_delay)
    params = list(params)
    if kind == "adam":
        return torch.optim.Adam(params, lr=lr), None
    opt = torch.optim.SGD(params, lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: robbins_monro(t, rm_delay, rm_power)
    )
    return opt, sched
