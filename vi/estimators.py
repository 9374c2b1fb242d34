"""Gradient estimators of ∇_λ E_{q(z;λ)}[f(z; λ)] as surrogate objectives
(docs/estimators.md).

Every estimator has one signature (after DeepMind's ``mc_gradients``)::

    estimator(f, lam, eps, baseline=..., baseline_value=...) -> Estimate

* ``f(z, lam_f) -> [M, ...]`` is any integrand. It receives the samples z [M, ..., H] and the
  variational parameters it may depend on directly (the ELBO's − log q(z; λ) term does), and may
  close over other parameters θ, whose gradient is always the plain ∇_θ f at the sampled z.
* ``lam`` [..., 2H] parameterizes the diagonal Gaussian q (``vi.families``).
* ``eps`` [M, ..., H] is explicit standard-normal noise, z = μ + σ ⊙ ε. Noise is an argument, not
  hidden state, so an estimate is a deterministic function of (parameters, data, noise):
  ``torch.func.vmap`` over draws and common random numbers across estimators just work.

The returned ``Estimate.surrogate`` [...] has the Monte Carlo estimate (1/M) Σ_m f(z_m) as its
value, and its autograd gradient is the estimator. The score-function term is attached with a
zero-valued "magic box", (log q − stop(log q)) · stop(f − b), so value and gradient are both exact.

Which zero-mean terms each estimator drops (all are unbiased for the ELBO; tested):

``reparam``  (Kingma & Welling 2014; Rezende et al. 2014)
    ∇ (1/M) Σ_m f(z_m(λ); λ). Drops nothing; unbiased for any differentiable f.
``stl``      ("sticking the landing", Roeder, Wu & Duvenaud 2017)
    As ``reparam`` but f sees stop(λ): drops the direct term E_q[∇_λ f(z; λ)|_z]. For the ELBO
    integrand that term is −E_q[∇_λ log q(z; λ)] = 0, so STL is unbiased there (and for any f
    with no direct λ-dependence it equals ``reparam``); for other f it is biased.
``score``    (REINFORCE / BBVI, Williams 1992; Ranganath, Gerrish & Blei 2014)
    (1/M) Σ_m [f(z_m) − b_m] ∇_λ log q(z_m; λ) with z_m held fixed, f evaluated at stop(λ). Like
    ``stl`` it drops the direct term E_q[∇_λ f|_z] (zero for the ELBO: this is the plain
    REINFORCE form, not the variant with an extra −∇ log q), and the baseline term
    E_q[b ∇_λ log q] = 0, which holds because each b_m is independent of z_m:

    - ``none``: b = 0.
    - ``mean``: b = a running average of f supplied by the caller (``RunningMean``), a constant
      with respect to the current draw.
    - ``loo``: b_m = mean of f over the other M − 1 samples of the same data point (M ≥ 2).
    - ``cv``: the optimal scalar control variate a* = Σ_i Cov(f h_i, h_i) / Σ_i Var(h_i) for
      h = ∇_λ log q (Ranganath et al. 2014). Since E[h] = 0 exactly, a* = E[f ‖h‖²] / E[‖h‖²];
      it is estimated leave-one-out from the other M − 1 samples (M ≥ 2), so b_m stays
      independent of z_m and the estimator stays unbiased.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from vi import families
from vi.nets import member_mean
from vi.optim import IntegerTable

__all__ = [
    "BASELINES",
    "ESTIMATORS",
    "Estimate",
    "Integrand",
    "RunningMean",
    "draw_noise",
    "estimate",
    "get_estimator",
    "reparam",
    "score",
    "stl",
    "validate_estimator",
]

Integrand = Callable[[Tensor, Tensor], Tensor]
BASELINES = ("none", "mean", "loo", "cv")


class Estimate(NamedTuple):
    """A surrogate whose value is the MC estimate (per data point) and whose gradient is the
    estimator; ``samples`` are the detached integrand values f(z_m), shape [M, ...]."""

    surrogate: Tensor
    samples: Tensor


def _check_noise(lam: Tensor, eps: Tensor) -> None:
    h = families.latent_dim_of(lam)
    if eps.dim() != lam.dim() + 1 or eps.shape[-1] != h or eps.shape[1:-1] != lam.shape[:-1]:
        raise ValueError(
            f"noise must have shape [M, {', '.join(map(str, lam.shape[:-1]))}, {h}] for "
            f"variational parameters of shape {tuple(lam.shape)}; got {tuple(eps.shape)}"
        )


def _check_no_baseline(name: str, baseline: str) -> None:
    # A pathwise estimator called straight from the registry must not silently ignore a baseline.
    if baseline != "none":
        raise ValueError(
            f"baselines apply to the score estimator only; {name!r} needs baseline 'none'"
        )


def _values(f: Integrand, z: Tensor, lam_f: Tensor) -> Tensor:
    values = f(z, lam_f)
    if values.shape != z.shape[:-1]:
        raise ValueError(
            f"integrand must return one value per sample, shape {tuple(z.shape[:-1])}; "
            f"got {tuple(values.shape)}"
        )
    return values


def reparam(
    f: Integrand, lam: Tensor, eps: Tensor, baseline: str = "none", baseline_value=None
) -> Estimate:
    """Pathwise estimator: ∇_λ (1/M) Σ_m f(μ + σ ⊙ ε_m; λ). Drops nothing."""
    _check_no_baseline("reparam", baseline)
    _check_noise(lam, eps)
    values = _values(f, families.sample(lam, eps), lam)
    return Estimate(values.mean(0), values.detach())


def stl(
    f: Integrand, lam: Tensor, eps: Tensor, baseline: str = "none", baseline_value=None
) -> Estimate:
    """Sticking-the-landing: pathwise through z, f sees stop(λ) (Roeder et al., 2017)."""
    _check_no_baseline("stl", baseline)
    _check_noise(lam, eps)
    values = _values(f, families.sample(lam, eps), lam.detach())
    return Estimate(values.mean(0), values.detach())


def _baseline(
    kind: str, values: Tensor, lam: Tensor, eps: Tensor, baseline_value: Tensor | float | None
) -> Tensor:
    m = values.shape[0]
    if kind == "none":
        return torch.zeros_like(values)
    if kind == "mean":
        b = 0.0 if baseline_value is None else baseline_value
        return torch.zeros_like(values) + torch.as_tensor(b, dtype=values.dtype,
                                                          device=values.device)
    if kind == "loo":
        return (values.sum(0, keepdim=True) - values) / (m - 1)
    # cv: a_m = Σ_{j≠m} f_j ‖h_j‖² / Σ_{j≠m} ‖h_j‖²
    h2 = families.score(lam.detach(), eps).pow(2).sum(-1)
    num = (values * h2).sum(0, keepdim=True) - values * h2
    den = h2.sum(0, keepdim=True) - h2
    return num / den.clamp_min(torch.finfo(den.dtype).tiny)


def score(
    f: Integrand,
    lam: Tensor,
    eps: Tensor,
    baseline: str = "none",
    baseline_value: Tensor | float | None = None,
) -> Estimate:
    """Score-function estimator (1/M) Σ_m [f(z_m) − b_m] ∇_λ log q(z_m; λ), z_m held fixed."""
    _check_noise(lam, eps)
    if baseline not in BASELINES:
        raise ValueError(f"unknown baseline {baseline!r}; valid: {', '.join(BASELINES)}")
    if baseline in ("loo", "cv") and eps.shape[0] < 2:
        raise ValueError(f"baseline {baseline!r} needs n_mc >= 2 samples; got {eps.shape[0]}")
    z = families.sample(lam.detach(), eps)
    values = _values(f, z, lam.detach())
    weight = (values - _baseline(baseline, values.detach(), lam, eps, baseline_value)).detach()
    log_q = families.log_prob(lam, z)
    magic_box = (log_q - log_q.detach()) * weight
    return Estimate((values + magic_box).mean(0), values.detach())


ESTIMATORS: dict[str, Callable[..., Estimate]] = {"reparam": reparam, "stl": stl, "score": score}


def validate_estimator(estimator: str, baseline: str = "none", n_mc: int | None = None) -> None:
    """Raise ``ValueError`` with the valid choices for an impossible estimator configuration."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; valid: {', '.join(ESTIMATORS)}")
    if baseline not in BASELINES:
        raise ValueError(f"unknown baseline {baseline!r}; valid: {', '.join(BASELINES)}")
    if estimator != "score" and baseline != "none":
        raise ValueError(
            f"baselines apply to the score estimator only; {estimator!r} needs baseline 'none'"
        )
    if n_mc is not None:
        if int(n_mc) < 1:
            raise ValueError(f"n_mc must be a positive number of samples; got {n_mc}")
        if baseline in ("loo", "cv") and n_mc < 2:
            raise ValueError(f"baseline {baseline!r} needs n_mc >= 2 samples; got {n_mc}")


def get_estimator(name: str) -> Callable[..., Estimate]:
    """Look an estimator up in the registry; an unknown name lists the valid ones."""
    validate_estimator(name)
    return ESTIMATORS[name]


def estimate(
    f: Integrand,
    lam: Tensor,
    eps: Tensor,
    *,
    estimator: str = "reparam",
    baseline: str = "none",
    baseline_value: Tensor | float | None = None,
) -> Estimate:
    """Dispatch to a registered estimator by name (see the module docstring)."""
    validate_estimator(estimator, baseline, eps.shape[0])
    return ESTIMATORS[estimator](f, lam, eps, baseline=baseline, baseline_value=baseline_value)


def draw_noise(
    n_mc: int,
    batch_shape: tuple[int, ...] | torch.Size,
    latent_dim: int,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """ε ~ N(0, I) of shape [M, *batch_shape, H] from an explicit generator."""
    shape = (int(n_mc), *batch_shape, int(latent_dim))
    return torch.randn(shape, generator=generator, device=device, dtype=dtype)


class RunningMean:
    """Bias-corrected exponential running average of f per ensemble member, the ``mean``
    baseline's state: ``avg`` and ``steps`` are [K] tensors.

    ``value`` [K, 1] is 0 before a member's first update (its first step is the plain score
    function), and broadcasts against per-point values [..., K, B].
    """

    def __init__(self, members: int = 1, decay: float = 0.9,
                 device: torch.device | str = "cpu") -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"running-mean decay must lie in [0, 1); got {decay}")
        self.decay = float(decay)
        # 1 − decayᵗ gathered from one table: the same bits for a member alone or in a batch
        self._correction = IntegerTable(lambda i: 1.0 - self.decay ** i)
        self.avg = torch.zeros(int(members), dtype=torch.float64, device=device)
        self.steps = torch.zeros(int(members), dtype=torch.float64, device=device)

    @property
    def value(self) -> Tensor:
        started = self.steps > 0
        corrected = self.avg / torch.where(started, self._correction(self.steps, torch.float64),
                                           1.0)
        return torch.where(started, corrected, 0.0).unsqueeze(-1)

    def update(self, samples: Tensor, active: Tensor | None = None) -> None:
        """Fold in each member's mean of a batch of integrand values [M, K, B]."""
        means = member_mean(samples, member_dim=1).to(self.avg.device)
        keep = (torch.ones_like(means, dtype=torch.bool) if active is None
                else active.to(self.avg.device))
        self.steps += keep.double()
        self.avg = torch.where(keep, self.decay * self.avg + (1.0 - self.decay) * means,
                               self.avg)

    def state_dict(self) -> dict[str, Tensor]:
        return {"avg": self.avg.clone(), "steps": self.steps.clone()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.avg.copy_(state["avg"])
        self.steps.copy_(state["steps"])
