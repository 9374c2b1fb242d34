"""Gradient estimators of ∇_λ E_{q(z;λ)}[f(z; λ)] as surrogate objectives
(docs/estimators.md).

Every estimator has one signature (after DeepMind's ``mc_gradients``)::

    estimator(f, lam, eps, baseline=..., baseline_value=...) -> Estimate
    estimator(f, lam, eps, baseline=..., baseline_value=..., k=k) -> Estimate   (IWAE, k >= 2)

* ``f(z, lam_f) -> [M, ...]`` is any integrand. It receives the samples z [M, ..., H] and the
  variational parameters it may depend on directly (the ELBO's − log q(z; λ) term does), and may
  close over other parameters θ, whose gradient is always the plain ∇_θ f at the sampled z.
* ``lam`` [..., P] parameterizes the variational family q (``vi.families``; ``family``, the
  diagonal Gaussian by default, P = 2H).
* ``eps`` [M, ..., H] is explicit standard-normal noise, z = r(λ, ε) (μ + σ ⊙ ε for the diagonal
  Gaussian). Every estimator needs only the family's ``sample`` and ``log_prob`` (and ``cv`` its
  ``score``), so each applies unchanged to every family. Noise is an argument, not hidden
  state, so an estimate is a deterministic function of (parameters, data, noise):
  ``torch.func.vmap`` over draws and common random numbers across estimators just work.

The returned ``Estimate.surrogate`` [...] has the Monte Carlo estimate (1/M) Σ_m f(z_m) as its
value, and its autograd gradient is the estimator. The score-function term is attached with
DiCE (Foerster et al. 2018): with τ_m = log q(z_m; λ) − stop(log q(z_m; λ)) (value 0),

    S = (1/M) Σ_m [ f(z_m) · exp(τ_m) + b_m · (1 − exp(τ_m)) ]

(the baseline term in the form of Mao et al. 2019). Its value is the MC mean and its gradient
the score-function estimator. exp(τ) = q(z; λ)/q(z; λ₀) at fixed z, so ∇ᵏ exp(τ) = ∇ᵏ q / q₀
and E_{q₀}[f ∇ᵏ exp(τ)] = ∇ᵏ ∫ q f: derivatives of every order are unbiased for those of
E_q[f] when f does not depend on λ directly, and the baseline term has mean zero at every order
since each b_m is independent of z_m. (The "magic box" τ · stop(f − b) has the same value and
gradient, but its second derivative is f ∇² log q in place of f (∇ log q ∇ log qᵀ + ∇² log q).)

Second derivatives matter where a gradient is differentiated again (SA-VAE differentiates its
refinement steps). An estimator that drops the direct term (``stl``, ``score``: f sees stop(λ))
then estimates the derivatives of E_{q(λ)}[f(z; λ₀)] at λ₀, which differ from those of
E_q[f(z; λ)] from the second order on: for the ELBO's −log q(z; λ) by the Hessian of
KL(q_λ ‖ q_λ₀), the Fisher information of q. Each registry entry declares this
(``Estimator.higher_order``, ``Estimator.drops_direct``; ``twice_differentiable``).

Multi-sample objectives (the importance-weighted bound, Burda, Grosse & Salakhutdinov 2016).
With ``k`` >= 2 the M = S/k groups of k consecutive samples ε_{m,1..k} of the noise [S, ..., H]
each give one estimate of L_k = E[log (1/k) Σ_i exp f(z_i; λ)], f = log w the log-weight
log p(x, z) − log q(z; λ), and the surrogate's value is (1/M) Σ_m L̂_m with
L̂_m = log (1/k) Σ_i exp f_{m,i}; ``Estimate.samples`` holds the L̂_m [M, ...]. With
w̃_i = exp f_i / Σ_j exp f_j the normalized weights of a group:

``reparam``  Σ_i w̃_i ∇_λ f(z_i(λ); λ) (Burda et al.): unbiased for ∇L_k.
``stl``      Σ_i w̃_i ∂f/∂z_i ∂z_i/∂λ with f at stop(λ): it drops Σ_i w̃_i ∇_λ f|_z, which has
             mean zero only at k = 1, so STL is **biased** for k >= 2 (Tucker et al. 2019, §4).
``dreg``     Σ_i w̃_i² ∂f/∂z_i ∂z_i/∂λ with f at stop(λ) (doubly reparameterized, Tucker, Lawson,
             Gu & Maddison 2019, eq. 5): unbiased for ∇_λ L_k when the direct λ-dependence of f
             is −log q(z; λ) (the IWAE log-weight), by the reparameterization identity
             E[g(z) ∇_λ log q(z; λ)] = E[∂g/∂z ∂z/∂λ] applied to g = w̃_i. The parameters θ the
             log-weight closes over get the plain Σ_i w̃_i ∇_θ f (their IWAE gradient). At k = 1
             (w̃ = 1) it is ``stl``.
``score``    Σ_i (L̂ − b_i) ∇_λ log q(z_i; λ) + Σ_i (w̃_i − 1/k) ∇_λ f(z_i; λ)|_z, z held fixed
             (Mnih & Rezende 2016, eq. 4, less the mean-zero (1/k) Σ_i ∇_λ f|_z, the ELBO's
             direct term, so that k = 1 is the ELBO's score estimator), and for θ
             Σ_i w̃_i ∇_θ f. Baselines: ``none``; ``mean`` (a running mean of L̂, constant in
             the draw); ``loo``, VIMCO's leave-one-out b_i = log (1/k) (Σ_{j≠i} exp f_j +
             exp f̄_{−i}), f̄_{−i} = mean_{j≠i} f_j: L̂ with f_i replaced by the mean of the
             others, i.e. w_i by their geometric mean (Mnih & Rezende 2016, eq. 8). Each b_i
             is independent of z_i, so the estimator stays unbiased. (``loo`` of the ELBO is the
             same construction for its arithmetic mean over the M samples.)

At k = 1 every estimator is called exactly as for the ELBO (no ``k`` argument): its ELBO form.
What each supports with k >= 2 is declared per estimator (``Estimator.iwae``).

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

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from vi import families
from vi.nets import member_mean
from vi.optim import IntegerTable

__all__ = [
    "BASELINES",
    "ESTIMATORS",
    "OBJECTIVES",
    "Estimate",
    "Estimator",
    "Integrand",
    "RunningMean",
    "Support",
    "configurations",
    "draw_noise",
    "dreg",
    "estimate",
    "get_estimator",
    "reparam",
    "score",
    "stl",
    "twice_differentiable",
    "validate_estimator",
    "validate_objective",
    "validate_twice_differentiable",
]

Integrand = Callable[[Tensor, Tensor], Tensor]
BASELINES = ("none", "mean", "loo", "cv")
#: the objectives: the ELBO (a plain mean of f over the M samples) and the importance-weighted
#: bound with k samples per group (``k`` = 1 is the ELBO)
OBJECTIVES = ("elbo", "iwae")


class Estimate(NamedTuple):
    """A surrogate whose value is the MC estimate (per data point) and whose gradient is the
    estimator; ``samples`` are the detached integrand values f(z_m), shape [M, ...] (with
    k >= 2 samples per group, the groups' estimates L̂_m)."""

    surrogate: Tensor
    samples: Tensor


def _check_noise(lam: Tensor, eps: Tensor, k: int = 1,
                 family: families.Family = families.FAMILIES["diagonal"]) -> None:
    h = family.latent_dim(lam)
    if eps.dim() != lam.dim() + 1 or eps.shape[-1] != h or eps.shape[1:-1] != lam.shape[:-1]:
        raise ValueError(
            f"noise must have shape [M, {', '.join(map(str, lam.shape[:-1]))}, {h}] for "
            f"variational parameters of shape {tuple(lam.shape)}; got {tuple(eps.shape)}"
        )
    if eps.shape[0] % k:
        raise ValueError(f"the noise's {eps.shape[0]} samples do not form groups of k = {k}")


def _check_baseline(name: str, baseline: str, n_mc: int | None = None, k: int = 1) -> None:
    """The baseline is one the estimator declares, with at least the samples it needs (an
    estimator called straight from the registry must not silently ignore a baseline). With
    k >= 2 (the IWAE) the estimator's ``iwae`` support applies and the count is k."""
    if baseline not in BASELINES:
        raise ValueError(f"unknown baseline {baseline!r}; valid: {', '.join(BASELINES)}")
    if k > 1:
        support = ESTIMATORS[name].iwae
        if support is None:
            raise ValueError(f"{name!r} does not estimate the iwae objective with k >= 2; "
                             f"valid: {', '.join(n for n, e in ESTIMATORS.items() if e.iwae)}")
        if baseline not in support.baselines:
            raise ValueError(f"with the iwae objective (k >= 2) {name!r} accepts the baselines "
                             f"{', '.join(support.baselines)}; got {baseline!r}")
        if k < support.baselines[baseline]:
            raise ValueError(f"baseline {baseline!r} of the iwae objective needs k >= "
                             f"{support.baselines[baseline]} samples per group; got {k}")
        return
    accepted = ESTIMATORS[name].baselines
    if baseline not in accepted:
        if set(accepted) == {"none"}:
            takers = [n for n, e in ESTIMATORS.items() if e.accepts_baseline]
            raise ValueError(f"baselines apply to the {' and '.join(takers)} estimator"
                             f"{'s' if len(takers) > 1 else ''} only; {name!r} needs baseline "
                             f"'none'")
        raise ValueError(f"{name!r} accepts the baselines {', '.join(accepted)}; got "
                         f"{baseline!r}")
    if n_mc is not None and int(n_mc) < accepted[baseline]:
        raise ValueError(f"baseline {baseline!r} needs n_mc >= {accepted[baseline]} samples; "
                         f"got {n_mc}")


def _values(f: Integrand, z: Tensor, lam_f: Tensor) -> Tensor:
    values = f(z, lam_f)
    if values.shape != z.shape[:-1]:
        raise ValueError(
            f"integrand must return one value per sample, shape {tuple(z.shape[:-1])}; "
            f"got {tuple(values.shape)}"
        )
    return values


def _groups(values: Tensor, k: int) -> Tensor:
    """[S, ...] → [S/k, k, ...]: the k consecutive samples of each group."""
    return values.unflatten(0, (values.shape[0] // k, k))


def _log_mean_exp(values: Tensor, k: int) -> Tensor:
    """The groups' estimates L̂_m = log (1/k) Σ_i exp f_{m,i}, [S/k, ...] (k = 1: f itself)."""
    if k == 1:
        return values
    return torch.logsumexp(_groups(values, k), 1) - math.log(k)


def _pathwise(name: str, f: Integrand, lam: Tensor, eps: Tensor, baseline: str, k: int,
              lam_f: Tensor, family: str | families.Family) -> Estimate:
    fam = families.get_family(family)
    _check_noise(lam, eps, k, fam)
    _check_baseline(name, baseline, eps.shape[0] // k, k)
    values = _log_mean_exp(_values(f, fam.sample(lam, eps), lam_f), k)
    return Estimate(values.mean(0), values.detach())


def reparam(
    f: Integrand, lam: Tensor, eps: Tensor, baseline: str = "none", baseline_value=None,
    k: int = 1, family: str | families.Family = "diagonal",
) -> Estimate:
    """Pathwise estimator: ∇_λ (1/M) Σ_m f(μ + σ ⊙ ε_m; λ). Drops nothing; its derivatives of
    every order are the pathwise ones, unbiased for a smooth f. With k >= 2 the gradient of the
    groups' log (1/k) Σ_i exp f(z_i(λ); λ), Σ_i w̃_i ∇_λ f_i (Burda et al. 2016)."""
    return _pathwise("reparam", f, lam, eps, baseline, k, lam, family)


def stl(
    f: Integrand, lam: Tensor, eps: Tensor, baseline: str = "none", baseline_value=None,
    k: int = 1, family: str | families.Family = "diagonal",
) -> Estimate:
    """Sticking-the-landing: pathwise through z, f sees stop(λ) (Roeder et al., 2017).

    Differentiated again it estimates ∇² E_{q(λ)}[f(z; λ₀)] at λ₀; for the MC-KL ELBO that is
    the ELBO's Hessian plus the Fisher information of q (the Hessian of KL(q_λ ‖ q_λ₀)).
    With k >= 2, Σ_i w̃_i ∂f_i/∂z_i ∂z_i/∂λ: biased for the IWAE gradient (the dropped
    Σ_i w̃_i ∇_λ f_i|_z has non-zero mean; Tucker et al. 2019)."""
    return _pathwise("stl", f, lam, eps, baseline, k, lam.detach(), family)


def dreg(
    f: Integrand, lam: Tensor, eps: Tensor, baseline: str = "none", baseline_value=None,
    k: int = 1, family: str | families.Family = "diagonal",
) -> Estimate:
    """Doubly reparameterized gradient of the IWAE (Tucker, Lawson, Gu & Maddison 2019, eq. 5):

        ∇_λ:  Σ_i w̃_i² ∂f(z_i; λ₀)/∂z_i ∂z_i/∂λ,     ∇_θ:  Σ_i w̃_i ∇_θ f(z_i)

    for the log-weight f = log p_θ(x, z) − log q(z; λ). The surrogate evaluates f at
    z̃_i = stop(z_i) + stop(w̃_i) (z_i − stop(z_i)) (value z_i, its λ-path scaled by w̃_i) with
    λ stopped in f: the log-mean-exp gives each f_i the factor w̃_i, so λ gets w̃_i² on the
    path and θ (never on the path) w̃_i. The weights come from a first evaluation of f without
    gradients. At k = 1 (w̃ = 1) it is ``stl``. Its derivatives are first-order only (the
    weights are held constant)."""
    if k == 1:
        return _pathwise("dreg", f, lam, eps, baseline, k, lam.detach(), family)
    fam = families.get_family(family)
    _check_noise(lam, eps, k, fam)
    _check_baseline("dreg", baseline, eps.shape[0] // k, k)
    z = fam.sample(lam, eps)
    z0 = z.detach()
    with torch.no_grad():
        weights = torch.softmax(_groups(_values(f, z0, lam.detach()), k), 1).flatten(0, 1)
    z_tilde = z0 + weights.unsqueeze(-1) * (z - z0)
    values = _log_mean_exp(_values(f, z_tilde, lam.detach()), k)
    return Estimate(values.mean(0), values.detach())


def _baseline(
    kind: str, values: Tensor, lam: Tensor, eps: Tensor, baseline_value: Tensor | float | None,
    family: families.Family,
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
    h2 = family.score(lam.detach(), eps).pow(2).sum(-1)
    num = (values * h2).sum(0, keepdim=True) - values * h2
    den = h2.sum(0, keepdim=True) - h2
    return num / den.clamp_min(torch.finfo(den.dtype).tiny)


def _vimco(values: Tensor) -> Tensor:
    """VIMCO's leave-one-out baselines for groups [M, k, ...] of log-weights f (Mnih & Rezende
    2016, eq. 8): b_i = log (1/k) (Σ_{j≠i} exp f_j + exp f̄_{−i}), f̄_{−i} = mean_{j≠i} f_j.
    Σ_{j≠i} exp f_j is taken as logaddexp of the prefix and suffix log-cumulative sums (no
    cancellation when f_i dominates)."""
    k = values.shape[1]
    others = (values.sum(1, keepdim=True) - values) / (k - 1)
    before = torch.logcumsumexp(values, 1)
    after = torch.logcumsumexp(values.flip(1), 1).flip(1)
    pad = torch.full_like(values[:, :1], -math.inf)
    rest = torch.logaddexp(torch.cat([pad, before[:, :-1]], 1), torch.cat([after[:, 1:], pad], 1))
    return torch.logaddexp(rest, others) - math.log(k)


def _score_iwae(f: Integrand, lam: Tensor, eps: Tensor, baseline: str,
                baseline_value: Tensor | float | None, k: int,
                family: families.Family) -> Estimate:
    """The score estimator of the IWAE (k >= 2) as one surrogate per group m:

        S_m = L̂(f(z, λ)) exp(Σ_i τ_i) − (1/k) Σ_i [f(z_i; λ) − f(z_i; stop(λ))]
              + Σ_i b_i (1 − exp(τ_i)),

    z = μ + σ ε held fixed. Its value is L̂; its gradient Σ_i (L̂ − b_i) ∇ log q_i + Σ_i
    (w̃_i − 1/k) ∇_λ f_i|_z in λ, and Σ_i w̃_i ∇_θ f_i in θ (the two evaluations of f differ
    only in λ's gradient, so their θ-gradients cancel)."""
    z = family.sample(lam.detach(), eps)
    live = _values(f, z, lam)
    fixed = _values(f, z, lam.detach())
    groups = _groups(live, k)
    value = torch.logsumexp(groups, 1) - math.log(k)
    log_q = _groups(family.log_prob(lam, z), k)
    tau = log_q - log_q.detach()
    if baseline == "none":
        b = torch.zeros_like(groups)
    elif baseline == "mean":
        b = torch.zeros_like(groups) + torch.as_tensor(
            0.0 if baseline_value is None else baseline_value, dtype=live.dtype,
            device=live.device)
    else:  # loo: VIMCO
        b = _vimco(groups.detach())
    b = b.detach()
    direct = _groups(live - fixed, k).mean(1)
    surrogate = value * torch.exp(tau.sum(1)) - direct + (b * (1.0 - torch.exp(tau))).sum(1)
    return Estimate(surrogate.mean(0), value.detach())


def score(
    f: Integrand,
    lam: Tensor,
    eps: Tensor,
    baseline: str = "none",
    baseline_value: Tensor | float | None = None,
    k: int = 1,
    family: str | families.Family = "diagonal",
) -> Estimate:
    """Score-function estimator (1/M) Σ_m [f(z_m) − b_m] ∇_λ log q(z_m; λ), z_m held fixed, as
    the DiCE surrogate (1/M) Σ_m [f_m exp(τ_m) + b_m (1 − exp(τ_m))], τ_m = log q(z_m; λ) −
    stop(log q(z_m; λ)) (Foerster et al. 2018; baseline term after Mao et al. 2019), f at
    stop(λ). Its derivatives of every order (in λ and in the parameters f closes over) are
    unbiased when f has no direct λ-dependence. With k >= 2 the IWAE's score estimator with
    the baseline ``none``, ``mean`` or VIMCO's ``loo`` (``_score_iwae``, first order)."""
    fam = families.get_family(family)
    _check_noise(lam, eps, k, fam)
    _check_baseline("score", baseline, eps.shape[0] // k, k)
    if k > 1:
        return _score_iwae(f, lam, eps, baseline, baseline_value, k, fam)
    z = fam.sample(lam.detach(), eps)
    values = _values(f, z, lam.detach())
    b = _baseline(baseline, values.detach(), lam, eps, baseline_value, fam).detach()
    log_q = fam.log_prob(lam, z)
    dice = torch.exp(log_q - log_q.detach())  # value 1, ∇ᵏ dice = ∇ᵏ q / q
    return Estimate((values * dice + b * (1.0 - dice)).mean(0), values.detach())


@dataclass(frozen=True)
class Support:
    """What an estimator supports for the IWAE objective with k >= 2 samples per group:
    ``baselines`` with the fewest k each needs, and whether its gradient is ``biased``."""

    baselines: Mapping[str, int]
    biased: bool = False


@dataclass(frozen=True)
class Estimator:
    """A registered estimator: its function and what it declares about itself (read by the
    validation, the figures and the tests; nothing tests an estimator's name).

    ``baselines``     the baselines it accepts, each with the fewest samples M it needs
    ``drops_direct``  f sees stop(λ): the direct term E_q[∇_λ f(z; λ)|_z] is dropped (zero for
                      the ELBO at first order, not at higher orders)
    ``higher_order``  its surrogate's derivatives of every order are unbiased for those of
                      E_q[f] when f has no direct λ-dependence (see ``twice_differentiable``)
    ``biased``        its gradient of the ELBO is biased (then the unbiasedness tests skip it)
    ``iwae``          its ``Support`` of the IWAE with k >= 2 (None: the ELBO only; its
                      function then takes no ``k``). At k = 1 the IWAE is the ELBO.
    """

    fn: Callable[..., Estimate]
    baselines: Mapping[str, int]
    drops_direct: bool
    higher_order: bool
    biased: bool = False
    iwae: Support | None = None

    def __call__(self, *args, **kwargs) -> Estimate:
        return self.fn(*args, **kwargs)

    @property
    def objectives(self) -> tuple[str, ...]:
        """The objectives it estimates (``OBJECTIVES``)."""
        return ("elbo", "iwae") if self.iwae is not None else ("elbo",)

    def support(self, k: int = 1) -> Support | None:
        """Its baselines and bias with k samples per group (k = 1: the ELBO's)."""
        return Support(self.baselines, self.biased) if int(k) == 1 else self.iwae

    @property
    def accepts_baseline(self) -> bool:
        """It takes a baseline other than ``none`` (its labels name the baseline)."""
        return any(b != "none" for b in self.baselines)


ESTIMATORS: dict[str, Estimator] = {
    "reparam": Estimator(reparam, {"none": 1}, drops_direct=False, higher_order=True,
                         iwae=Support({"none": 2})),
    "stl": Estimator(stl, {"none": 1}, drops_direct=True, higher_order=True,
                     iwae=Support({"none": 2}, biased=True)),
    "score": Estimator(score, {"none": 1, "mean": 1, "loo": 2, "cv": 2}, drops_direct=True,
                       higher_order=True, iwae=Support({"none": 2, "mean": 2, "loo": 2})),
    "dreg": Estimator(dreg, {"none": 1}, drops_direct=True, higher_order=True,
                      iwae=Support({"none": 2})),
}


def configurations(*, unbiased: bool = False, objective: str = "elbo") -> list[tuple[str, str]]:
    """Every (estimator, baseline) pair the registry declares for ``objective`` (``"iwae"``:
    with k >= 2), only the unbiased ones with ``unbiased``, in registry order."""
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; valid: {', '.join(OBJECTIVES)}")
    k = 1 if objective == "elbo" else 2
    supports = {name: e.support(k) for name, e in ESTIMATORS.items()}
    return [(name, b) for name, sup in supports.items()
            if sup is not None and not (unbiased and sup.biased) for b in sup.baselines]


def twice_differentiable(estimator: str, direct: bool) -> bool:
    """The estimator's second derivatives are unbiased for an integrand that depends on λ
    directly (``direct``: the ELBO with ``kl="mc"``) or not (``kl="analytic"``)."""
    e = ESTIMATORS[estimator]
    return e.higher_order and not (direct and e.drops_direct)


def validate_twice_differentiable(estimator: str, kl: str, why: str) -> None:
    """Refuse an estimator whose gradient cannot be differentiated again with the KL mode
    ``kl``, naming the ones that can (``why`` says who differentiates it)."""
    validate_estimator(estimator)
    if twice_differentiable(estimator, kl == "mc"):
        return
    ok = {mode: [n for n in ESTIMATORS if twice_differentiable(n, mode == "mc")]
          for mode in ("analytic", "mc")}
    raise ValueError(
        f"{why}, so its estimator's second derivatives must be unbiased; {estimator!r} with "
        f"kl={kl!r} drops the direct term, whose derivative is not zero. Valid with "
        f"kl='mc': {', '.join(ok['mc'])}; with kl='analytic': {', '.join(ok['analytic'])}")


def validate_objective(objective: str, k: int) -> None:
    """An objective of ``OBJECTIVES`` with k >= 1 samples per group (k = 1 for the ELBO)."""
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; valid: {', '.join(OBJECTIVES)}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer number of samples per group; got {k!r}")
    if objective == "elbo" and k != 1:
        raise ValueError(f"k counts the iwae objective's samples per group; the elbo takes "
                         f"k = 1, got k = {k}")


def validate_estimator(estimator: str, baseline: str = "none", n_mc: int | None = None, *,
                       objective: str = "elbo", k: int = 1) -> None:
    """Raise ``ValueError`` with the valid choices for an impossible estimator configuration:
    ``n_mc`` groups of ``k`` samples of ``objective``."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; valid: {', '.join(ESTIMATORS)}")
    if n_mc is not None and int(n_mc) < 1:
        raise ValueError(f"n_mc must be a positive number of samples; got {n_mc}")
    validate_objective(objective, k)
    _check_baseline(estimator, baseline, n_mc, k)


def get_estimator(name: str) -> Estimator:
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
    objective: str = "elbo",
    k: int = 1,
    family: str | families.Family = "diagonal",
) -> Estimate:
    """Dispatch to a registered estimator by name (see the module docstring). ``objective``
    ``"iwae"`` with ``k`` >= 2 estimates the importance-weighted bound over groups of k
    consecutive samples of ``eps`` [M·k, ..., H]; with k = 1 the estimator is called as for the
    ELBO. ``family`` names the variational family of λ (``vi.families.FAMILIES``); it is passed
    on to the estimator only when it is not the diagonal Gaussian, so an estimator written for
    the diagonal family alone keeps working with it."""
    validate_objective(objective, k)
    if eps.shape[0] % k:
        raise ValueError(f"the noise's {eps.shape[0]} samples do not form groups of k = {k}")
    validate_estimator(estimator, baseline, eps.shape[0] // k, objective=objective, k=k)
    extra = {"k": k} if k > 1 else {}
    fam = families.get_family(family)
    if fam.name != "diagonal":
        extra["family"] = fam
    return ESTIMATORS[estimator](f, lam, eps, baseline=baseline, baseline_value=baseline_value,
                                 **extra)


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
