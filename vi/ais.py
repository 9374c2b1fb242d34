"""log p(x) by annealed importance sampling with Hamiltonian Monte Carlo transitions, and its
check by bidirectional Monte Carlo (docs/evaluation.md).

Annealed importance sampling (AIS; Neal, 2001) moves C chains per data point through the
geometric path from an initial distribution q₀ (a diagonal Gaussian q(z; λ): q* or a method's
own posterior; or the prior) to the unnormalised posterior p_θ(x, z),

    π_t(z) ∝ q₀(z)^{1 − β_t} p_θ(x, z)^{β_t},   0 = β_0 < β_1 < … < β_T = 1,

and weights each chain by

    log w = Σ_{t=1}^{T} (β_t − β_{t−1}) [log p_θ(x, z_{t−1}) − log q₀(z_{t−1})],

where z_0 ~ q₀ and z_t is z_{t−1} moved by a Markov transition that leaves π_t invariant. E[w]
= p(x), so log p̂(x) = log (1/C) Σ_c w_c is a stochastic lower bound (Jensen) that tends to
log p(x) as T grows (Wu, Burda, Salakhutdinov & Grosse, 2017, on decoder-based models).

The schedule is sigmoidal (Grosse, Ghahramani & Adams, 2015; Wu et al., 2017):
β̃_t = s(δ (2t/T − 1)) with the logistic s and δ = 4, rescaled to β̃_0 = 0 and β̃_T = 1, so the
steps are small at both ends, where the log-weight increments are largest.

Transitions are HMC (Neal, 2011) with ``leapfrog`` steps, in whitened coordinates
u = (z − μ₀)/σ₀ of q₀ (the mass matrix is q₀'s precision: for q* it matches the posterior's
scales, for the prior it is the identity). The defaults, T = 1000 distributions of one
leapfrog step each (HMC with L = 1, i.e. a Metropolis-adjusted Langevin move) and C = 16
chains, were chosen by measurement: at the same number of gradient evaluations, more
distributions beat longer trajectories (standard deviation of a chain's log-weight 0.04 at
T = 1000, L = 1 against 0.13 at T = 200, L = 5 on linear-Gaussian models whose diagonal family
loses 0.2-0.3 nat; BDMC sandwiches 0.007 ± 0.003 against 0.009 ± 0.013 nat on an mnist5k
decoder with H = 10; docs/evaluation.md). Step sizes are chosen per point and per intermediate
distribution towards a target acceptance rate (0.65 by default: HMC's asymptotic optimum is
0.651, Beskos et al., 2013, a Langevin move's 0.574, Roberts & Rosenthal, 1998) by a *pilot*
run: a few chains of their own, whose step size after each transition moves by log ε ← log ε + γ
(ā − a*), ā the Metropolis acceptance probability averaged over the point's pilot chains. The C
chains of the estimate then run with the pilot's step sizes, fixed: a step size adapted online
on a chain's own past makes its transitions depend on its state and biases the weights (measured
on a linear-Gaussian model: by −0.02 to −0.04 nat from q* and by +0.1 to +0.2 nat, *above* log
p(x), from the prior, at T = 50), whereas kernels chosen independently of the chains leave E[w]
= p(x) exact and the chains independent, so the standard error over chains is an honest one. The
same step sizes, in reverse order, serve reverse AIS.

Bidirectional Monte Carlo (BDMC; Grosse, Ghahramani & Adams, 2015; Wu et al., 2017) checks AIS
where the truth is unknown: for data simulated from the model (z ~ p(z), x ~ p_θ(x | z)), the
simulated z is an exact posterior sample, so AIS run backwards from it (β from 1 to 0) gives a
stochastic *upper* bound, −log (1/C) Σ_c w̃_c with

    log w̃ = Σ_{t=1}^{T} (β_{t−1} − β_t) [log p_θ(x, z_t) − log q₀(z_t)],   E[w̃] = 1/p(x);

forward AIS on the same points gives a lower bound, and the gap between the two bounds AIS's
error on data like the model's.

Everything is batched over chains, points and ensemble members (tensors [C, K, N, H]); the only
Python loop is over the T steps of the path (and over chunks of points, to bound memory).
Randomness comes from a ``vi.streams.MemberRandom`` (one generator per member), whose device
is the one the computation runs on; the dynamics run in x's dtype, weights accumulate in
float64.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from vi import families
from vi.decoders import GaussianDecoder, log_joint
from vi.streams import MemberRandom

__all__ = [
    "SCHEDULES",
    "AISResult",
    "BDMCResult",
    "ais",
    "bdmc",
    "reverse_ais",
    "schedule",
    "simulate",
]

SCHEDULES = ("sigmoid", "linear")

#: chain-point elements x widths per chunk when the points are processed in chunks
_CHUNK_ELEMENTS = 2**22


def schedule(steps: int, kind: str = "sigmoid", *, sharpness: float = 4.0) -> Tensor:
    """β_0 = 0 < β_1 < … < β_T = 1 (float64, [T + 1]).

    ``sigmoid``: β̃_t = s(δ (2t/T − 1)), s the logistic function, δ = ``sharpness``, rescaled
    to [0, 1] (Grosse et al., 2015); ``linear``: β_t = t/T."""
    steps = _positive_int("steps", steps)
    if kind not in SCHEDULES:
        raise ValueError(f"unknown schedule {kind!r}; valid: {', '.join(SCHEDULES)}")
    t = torch.arange(steps + 1, dtype=torch.float64) / steps
    if kind == "linear":
        return t
    if not (math.isfinite(sharpness) and sharpness > 0):
        raise ValueError(f"sharpness must be a positive number; got {sharpness}")
    b = torch.sigmoid(sharpness * (2 * t - 1))
    b = (b - b[0]) / (b[-1] - b[0])
    b[0], b[-1] = 0.0, 1.0
    return b


@dataclass
class AISResult:
    """One AIS run (forward: ``bound="lower"``; reverse: ``bound="upper"``).

    ``log_px`` [K, N]: the estimate of log p(x) (float64): log (1/C) Σ_c w_c forward,
    −log (1/C) Σ_c w̃_c reverse. ``se`` [K, N]: its delta-method standard error over the C
    chains, √((C/ESS − 1)/(C − 1)) = sd(w)/(√C mean(w)) (NaN for C = 1; for reverse chains
    started at one shared sample the chains are correlated and the SE optimistic).
    ``log_w`` [C, K, N]: each chain's log-weight (log w̃ for reverse runs). ``ess`` [K, N]:
    (Σ w)²/Σ w² over the chains, between 1 and C. ``acceptance`` [K, N]: the mean Metropolis
    acceptance probability over the chains and transitions. ``acceptance_path`` [T − 1, K]: per
    transition, the mean acceptance over chains and points. ``step_sizes`` [T − 1, K, N]: the
    transitions' step sizes in whitened coordinates (the pilot's, or those given; pass them to
    ``reverse_ais`` to run the same kernels backwards). ``settings``: the run's settings;
    ``seconds``: its wall time."""

    log_px: Tensor
    se: Tensor
    log_w: Tensor
    ess: Tensor
    acceptance: Tensor
    acceptance_path: Tensor
    step_sizes: Tensor
    bound: str
    settings: dict = field(default_factory=dict)
    seconds: float = 0.0


# ------------------------------------------------------------------------------ validation


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or int(value) < 1:
        raise ValueError(f"{name} must be a positive integer; got {value!r}")
    return int(value)


def _check_inputs(decoder: GaussianDecoder, x: Tensor, lam: Tensor | None,
                  random: MemberRandom) -> Tensor:
    """λ₀ [K, N, 2H] (zeros, i.e. the prior, when ``lam`` is None), after checking shapes,
    dtypes and devices."""
    k, d, h = decoder.members, decoder.data_dim, decoder.latent_dim
    if x.dim() != 3 or x.shape[0] != k or x.shape[-1] != d:
        raise ValueError(f"AIS expects x [K={k}, N, D={d}]; got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor; got {x.dtype}")
    flat = decoder.params.flat
    if flat.dtype != x.dtype or flat.device != x.device:
        raise ValueError(f"the decoder ({flat.dtype}, {flat.device}) and x ({x.dtype}, "
                         f"{x.device}) must share dtype and device")
    if not isinstance(random, MemberRandom) or len(random) != k:
        raise ValueError(f"random must be a MemberRandom with one generator per member ({k})")
    if random.device.type != x.device.type:
        raise ValueError(f"the generators are on {random.device}, the data on {x.device}")
    if lam is None:
        return x.new_zeros(k, x.shape[1], 2 * h)
    if tuple(lam.shape) != (k, x.shape[1], 2 * h):
        raise ValueError(f"the initial distribution λ must be [K={k}, N={x.shape[1]}, "
                         f"2H={2 * h}]; got {tuple(lam.shape)}")
    if lam.dtype != x.dtype or lam.device != x.device:
        raise ValueError(f"λ ({lam.dtype}, {lam.device}) and x ({x.dtype}, {x.device}) must "
                         f"share dtype and device")
    if not bool(torch.isfinite(lam).all()):
        raise ValueError("the initial distribution λ has non-finite entries")
    return lam.detach()


def _check_settings(steps, chains, leapfrog, target_accept, step_size, adapt_rate
                    ) -> tuple[int, int, int]:
    steps = _positive_int("steps", steps)
    chains = _positive_int("chains", chains)
    leapfrog = _positive_int("leapfrog", leapfrog)
    if not 0.0 < float(target_accept) < 1.0:
        raise ValueError(f"target_accept must be in (0, 1); got {target_accept}")
    if not (math.isfinite(step_size) and step_size > 0):
        raise ValueError(f"step_size must be a positive number; got {step_size}")
    if not (math.isfinite(adapt_rate) and adapt_rate >= 0):
        raise ValueError(f"adapt_rate must be a number >= 0; got {adapt_rate}")
    return steps, chains, leapfrog


# ------------------------------------------------------------------------------ the sampler


class _Path:
    """The geometric path of one chunk of points, in whitened coordinates u = (z − μ₀)/σ₀:

        log π_β(u) = −½ (1 − β) |u|² + β ℓ(u) + const,   ℓ(u) = log p_θ(x, μ₀ + σ₀ u),

    and the log-weight integrand g(u) = log p_θ(x, z) − log q₀(z) = ℓ(u) + ½ |u|² + Σ log σ₀
    + (H/2) log 2π."""

    def __init__(self, decoder: GaussianDecoder, x: Tensor, lam: Tensor) -> None:
        self.decoder, self.x = decoder, x
        self.views = {k: v.detach() for k, v in decoder.params.views().items()}
        mu, logvar = families.split_params(lam)
        self.mu, self.sigma = mu, torch.exp(0.5 * logvar)
        h, d = mu.shape[-1], x.shape[-1]
        self.log_norm = (0.5 * logvar.double()).sum(-1) + 0.5 * h * math.log(2 * math.pi)
        self.precision = None
        if decoder.variance_kind != "heteroscedastic":
            # σ² does not depend on z: log p(x, z) = −½ Σ_d (x_d − μ_d(z))²/σ²_d − ½ |z|²
            # + c, with c = −½ Σ_d log 2πσ²_d − (H/2) log 2π computed once (the same number
            # as ``log_joint``, without a log per evaluation)
            _, var = decoder.mean_and_variance(x.new_zeros(x.shape[0], 1, h), self.views)
            var = var.expand(x.shape[0], 1, d)
            self.precision = 1.0 / var
            self.const = (-0.5 * torch.log(2 * math.pi * var).sum(-1)
                          - 0.5 * h * math.log(2 * math.pi))

    def log_joint(self, z: Tensor) -> Tensor:
        """log p_θ(x, z) [C, K, n] for z [C, K, n, H]."""
        if self.precision is None:
            return log_joint(self.decoder, self.x, z, self.views)
        mean, _ = self.decoder.mean_and_variance(z, self.views)
        return (-0.5 * ((self.x - mean).pow(2) * self.precision).sum(-1)
                - 0.5 * z.pow(2).sum(-1) + self.const)

    def value_and_grad(self, u: Tensor) -> tuple[Tensor, Tensor]:
        """(ℓ(u) [C, K, n], ∇_u ℓ(u) [C, K, n, H])."""
        with torch.enable_grad():
            u = u.detach().requires_grad_(True)
            lp = self.log_joint(self.mu + self.sigma * u)
            (g,) = torch.autograd.grad(lp.sum(), u)
        return lp.detach(), g

    def integrand(self, lp: Tensor, u: Tensor) -> Tensor:
        """g(u) in float64, [C, K, n]."""
        return lp.double() + 0.5 * u.double().pow(2).sum(-1) + self.log_norm


def _hmc(path: _Path, beta: float, u: Tensor, lp: Tensor, g: Tensor, log_eps: Tensor,
         leapfrog: int, random: MemberRandom) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One HMC transition leaving π_β invariant, per chain: momentum p ~ N(0, I), ``leapfrog``
    leapfrog steps of size ε = exp(log_eps) [C, K, n, 1], Metropolis accept/reject. Returns
    (u, ℓ(u), ∇ℓ(u), acceptance probability [C, K, n])."""
    c, _, n, h = u.shape

    def log_target(lp_: Tensor, u_: Tensor) -> Tensor:
        return beta * lp_.double() - 0.5 * (1.0 - beta) * u_.double().pow(2).sum(-1)

    def force(g_: Tensor, u_: Tensor) -> Tensor:
        return beta * g_ - (1.0 - beta) * u_

    eps = torch.exp(log_eps)
    p0 = random.randn((c, n, h), 1, dtype=u.dtype)
    p = p0 + 0.5 * eps * force(g, u)
    u1, lp1, g1 = u, lp, g
    for step in range(leapfrog):
        u1 = u1 + eps * p
        lp1, g1 = path.value_and_grad(u1)
        if step < leapfrog - 1:
            p = p + eps * force(g1, u1)
    p = p + 0.5 * eps * force(g1, u1)
    h0 = -log_target(lp, u) + 0.5 * p0.double().pow(2).sum(-1)
    h1 = -log_target(lp1, u1) + 0.5 * p.double().pow(2).sum(-1)
    log_a = (h0 - h1).clamp(max=0.0)
    log_a = torch.where(torch.isnan(log_a), torch.full_like(log_a, -math.inf), log_a)
    uniform = random.rand((c, n), 1, dtype=torch.float64)
    accept = torch.log(uniform) < log_a
    keep = accept.unsqueeze(-1)
    return (torch.where(keep, u1, u), torch.where(accept, lp1, lp), torch.where(keep, g1, g),
            torch.exp(log_a))


def _anneal(path: _Path, u: Tensor, betas: Tensor, *, leapfrog: int, random: MemberRandom,
            log_eps_path: Tensor | None, step_size: float, target_accept: float,
            adapt_rate: float) -> tuple[Tensor, Tensor, Tensor]:
    """Run the chains u [C, K, n, H] along ``betas`` (in the order given: increasing forward,
    decreasing in reverse), the transition at the t-th distribution with step size
    exp(``log_eps_path[t − 1]``) [K, n]; with ``log_eps_path`` None, the step size of each point
    starts at ``step_size`` and adapts after every transition, log ε += γ (ā − a*), ā the
    acceptance probability averaged over the point's chains (the pilot run). Returns
    (log w [C, K, n] float64, acceptance probabilities [T − 1, C, K, n], the log step sizes
    used [T − 1, K, n])."""
    lp, g = path.value_and_grad(u)
    log_w = torch.zeros(lp.shape, dtype=torch.float64, device=u.device)
    log_eps = u.new_full(u.shape[1:-1], math.log(step_size))
    accepts, used = [], []
    b = betas.tolist()
    for t in range(1, len(b)):
        log_w += (b[t] - b[t - 1]) * path.integrand(lp, u)
        if t == len(b) - 1:
            break  # the last state would not enter any weight
        if log_eps_path is not None:
            log_eps = log_eps_path[t - 1]
        used.append(log_eps)
        u, lp, g, a = _hmc(path, b[t], u, lp, g, log_eps.unsqueeze(-1), leapfrog, random)
        if log_eps_path is None:
            log_eps = log_eps + adapt_rate * (a.mean(0).to(u.dtype) - target_accept)
        accepts.append(a)
    shape = (0, *u.shape[:-1])
    acc = (torch.stack(accepts) if accepts
           else torch.zeros(shape, dtype=torch.float64, device=u.device))
    used_t = torch.stack(used) if used else u.new_zeros(shape[:1] + shape[2:])
    return log_w, acc, used_t


def _chunks(decoder: GaussianDecoder, n_points: int, chains: int, chunk_size: int | None
            ) -> list[slice]:
    if chunk_size is None:
        width = max(decoder.data_dim, *decoder.net.sizes)
        chunk_size = max(1, _CHUNK_ELEMENTS // max(1, chains * decoder.members * width))
    chunk_size = _positive_int("chunk_size", chunk_size)
    return [slice(s, min(s + chunk_size, n_points)) for s in range(0, n_points, chunk_size)]


def _summarise(log_w: Tensor, acc: Tensor, log_eps: Tensor, *, bound: str, settings: dict,
               seconds: float) -> AISResult:
    """Per-point estimate, SE and ESS from the chains' log-weights [C, K, N]."""
    c = log_w.shape[0]
    lse = torch.logsumexp(log_w, 0)
    ess = torch.exp(2 * lse - torch.logsumexp(2 * log_w, 0))
    estimate = lse - math.log(c)
    if bound == "upper":
        estimate = -estimate
    if c > 1:
        se = torch.sqrt(((c / ess - 1.0) / (c - 1)).clamp_min(0.0))
    else:
        se = torch.full_like(estimate, math.nan)
    acceptance = acc.mean((0, 1)) if acc.shape[0] else torch.ones_like(estimate)
    return AISResult(log_px=estimate, se=se, log_w=log_w, ess=ess, acceptance=acceptance,
                     acceptance_path=acc.mean((1, 3)), step_sizes=torch.exp(log_eps),
                     bound=bound, settings=settings, seconds=seconds)


def _run(decoder: GaussianDecoder, x: Tensor, lam: Tensor | None, z: Tensor | None, *,
         random: MemberRandom, steps: int, chains: int, leapfrog: int, schedule_kind: str,
         step_sizes: Tensor | None, pilot_chains: int, target_accept: float, step_size: float,
         adapt_rate: float, chunk_size: int | None) -> AISResult:
    start = time.perf_counter()
    steps, chains, leapfrog = _check_settings(steps, chains, leapfrog, target_accept,
                                              step_size, adapt_rate)
    pilot_chains = _positive_int("pilot_chains", pilot_chains)
    lam0 = _check_inputs(decoder, x, lam, random)
    reverse = z is not None
    k, n_points, h = x.shape[0], x.shape[1], decoder.latent_dim
    if step_sizes is not None:
        if tuple(step_sizes.shape) != (steps - 1, k, n_points):
            raise ValueError(f"step_sizes must be [T - 1 = {steps - 1}, K = {k}, N = "
                             f"{n_points}]; got {tuple(step_sizes.shape)}")
        if not bool((torch.isfinite(step_sizes) & (step_sizes > 0)).all()):
            raise ValueError("step_sizes must be positive and finite")
    if reverse:
        if z.dim() == 3:
            z = z.unsqueeze(0)
        if z.dim() != 4 or tuple(z.shape[1:]) != (k, n_points, h) or z.shape[0] not in (
                1, chains):
            raise ValueError(f"the reverse chains' start z must be [K={k}, N={n_points}, "
                             f"H={h}] or [C={chains}, K, N, H]; got {tuple(z.shape)}")
        if z.dtype != x.dtype or z.device != x.device:
            raise ValueError(f"z ({z.dtype}, {z.device}) and x ({x.dtype}, {x.device}) must "
                             f"share dtype and device")
        if not bool(torch.isfinite(z).all()):
            raise ValueError("the reverse chains' start z has non-finite entries")
    betas = schedule(steps, schedule_kind)
    log_ws, accs, log_eps_all = [], [], []
    for part in _chunks(decoder, n_points, max(chains, pilot_chains), chunk_size):
        path = _Path(decoder, x[:, part], lam0[:, part])
        n = part.stop - part.start
        if step_sizes is None:  # the pilot: forward chains of their own, adapting ε per point
            u = random.randn((pilot_chains, n, h), 1, dtype=x.dtype)
            _, _, log_eps = _anneal(path, u, betas, leapfrog=leapfrog, random=random,
                                    log_eps_path=None, step_size=step_size,
                                    target_accept=target_accept, adapt_rate=adapt_rate)
        else:
            log_eps = torch.log(step_sizes[:, :, part].to(x))
        if reverse:  # β from 1 to 0: the summed increments are Σ (β_{t−1} − β_t) g(z_t) = log w̃
            u = ((z[:, :, part] - path.mu) / path.sigma).expand(chains, k, n, h).contiguous()
            log_w, acc, _ = _anneal(path, u, betas.flip(0), leapfrog=leapfrog, random=random,
                                    log_eps_path=log_eps.flip(0), step_size=step_size,
                                    target_accept=target_accept, adapt_rate=adapt_rate)
            acc = acc.flip(0)
        else:
            u = random.randn((chains, n, h), 1, dtype=x.dtype)
            log_w, acc, _ = _anneal(path, u, betas, leapfrog=leapfrog, random=random,
                                    log_eps_path=log_eps, step_size=step_size,
                                    target_accept=target_accept, adapt_rate=adapt_rate)
        log_ws.append(log_w)
        accs.append(acc)
        log_eps_all.append(log_eps)
    settings = {"steps": steps, "chains": chains, "leapfrog": leapfrog,
                "schedule": schedule_kind, "pilot_chains": pilot_chains if step_sizes is None
                else 0, "target_accept": float(target_accept), "step_size": float(step_size),
                "adapt_rate": float(adapt_rate), "init": "prior" if lam is None else "q",
                "direction": "reverse" if reverse else "forward"}
    return _summarise(torch.cat(log_ws, 2), torch.cat(accs, 3), torch.cat(log_eps_all, 2),
                      bound="upper" if reverse else "lower", settings=settings,
                      seconds=time.perf_counter() - start)


# ------------------------------------------------------------------------------ public API

@torch.no_grad()
def ais(decoder: GaussianDecoder, x: Tensor, lam: Tensor | None = None, *,
        random: MemberRandom, steps: int = 1000, chains: int = 16, leapfrog: int = 1,
        schedule_kind: str = "sigmoid", step_sizes: Tensor | None = None,
        pilot_chains: int = 4, target_accept: float = 0.65, step_size: float = 0.5,
        adapt_rate: float = 0.2, chunk_size: int | None = None) -> AISResult:
    """log p_θ(x) per point by forward AIS from q₀ = q(z; λ) (None: the prior) to p_θ(x, z).

    Args:
        decoder: the model (K members); x: data [K, N, D]; lam: q₀'s λ [K, N, 2H] (q*, or a
            method's own posterior), or None for the prior N(0, I).
        random: one generator per member (``vi.streams.MemberRandom``), on x's device.
        steps: T, the number of intermediate distributions (β_0 = 0 … β_T = 1).
        chains: C independent chains per point.
        leapfrog: L leapfrog steps per HMC transition.
        schedule_kind: ``"sigmoid"`` (default) or ``"linear"`` (``schedule``).
        step_sizes: the transitions' step sizes [T − 1, K, N] (e.g. an earlier run's
            ``step_sizes``); None: chosen by a pilot run of ``pilot_chains`` chains whose step
            size starts at ``step_size`` (whitened coordinates) and moves by
            log ε += ``adapt_rate`` (ā − ``target_accept``) after every transition.
        chunk_size: points per chunk (default: sized to bound the activations' memory).

    Returns an ``AISResult`` whose ``log_px`` [K, N] is a stochastic lower bound on log p(x)
    (its expectation is below log p(x), by less as T grows), with ``se`` over the chains.
    """
    return _run(decoder, x, lam, None, random=random, steps=steps, chains=chains,
                leapfrog=leapfrog, schedule_kind=schedule_kind, step_sizes=step_sizes,
                pilot_chains=pilot_chains, target_accept=target_accept, step_size=step_size,
                adapt_rate=adapt_rate, chunk_size=chunk_size)


@torch.no_grad()
def reverse_ais(decoder: GaussianDecoder, x: Tensor, z: Tensor, lam: Tensor | None = None, *,
                random: MemberRandom, steps: int = 1000, chains: int = 16, leapfrog: int = 1,
                schedule_kind: str = "sigmoid", step_sizes: Tensor | None = None,
                pilot_chains: int = 4, target_accept: float = 0.65, step_size: float = 0.5,
                adapt_rate: float = 0.2, chunk_size: int | None = None) -> AISResult:
    """Reverse AIS: chains start at exact posterior samples z ~ p_θ(z | x) ([K, N, H], shared
    by the C chains, or [C, K, N, H]) and run the path of ``ais`` backwards, from p_θ(x, z)
    to q₀, with the same kernels. log p̂ = −log (1/C) Σ_c w̃_c is a stochastic *upper* bound
    on log p(x) (E[w̃] = 1/p(x); Grosse et al., 2015). Only valid when z really is a posterior
    sample, e.g. the latent that generated a simulated x (``simulate``). The step sizes must not
    depend on z: without ``step_sizes``, the pilot is a forward run from q₀. Arguments as in
    ``ais``."""
    return _run(decoder, x, lam, z, random=random, steps=steps, chains=chains,
                leapfrog=leapfrog, schedule_kind=schedule_kind, step_sizes=step_sizes,
                pilot_chains=pilot_chains, target_accept=target_accept, step_size=step_size,
                adapt_rate=adapt_rate, chunk_size=chunk_size)


@torch.no_grad()
def simulate(decoder: GaussianDecoder, n: int, random: MemberRandom, *,
             dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """n points per member from the model: z ~ N(0, I_H), x ~ p_θ(x | z). Returns
    (x [K, n, D], z [K, n, H]); z is an exact sample of p_θ(z | x) for its x."""
    n = _positive_int("n", n)
    flat = decoder.params.flat
    dtype = flat.dtype if dtype is None else dtype
    if len(random) != decoder.members:
        raise ValueError(f"random must have one generator per member ({decoder.members})")
    z = random.randn((n, decoder.latent_dim), 0, dtype=dtype).to(flat.device)
    mean, var = decoder.mean_and_variance(z)
    e = random.randn((n, decoder.data_dim), 0, dtype=dtype).to(flat.device)
    return mean + var.sqrt() * e, z


@dataclass
class BDMCResult:
    """Forward (``lower``) and reverse (``upper``) AIS on simulated points; ``width`` [K, N] =
    upper − lower bounds the error of forward AIS (in expectation) on such points."""

    lower: AISResult
    upper: AISResult

    @property
    def width(self) -> Tensor:
        return self.upper.log_px - self.lower.log_px

    def summary(self) -> dict[str, Tensor]:
        """Per member [K]: the bounds' means over the points, the width's mean with its standard
        error over the points, median, 90 % quantile and maximum, and the mean acceptance of
        each direction."""
        w = self.width
        n = w.shape[1]
        sd = w.std(1) if n > 1 else torch.full_like(w[:, 0], math.nan)
        return {"lower": self.lower.log_px.mean(1), "upper": self.upper.log_px.mean(1),
                "width": w.mean(1), "width_se": sd / math.sqrt(n),
                "width_median": w.median(1).values, "width_q90": w.quantile(0.9, dim=1),
                "width_max": w.amax(1),
                "acceptance_forward": self.lower.acceptance.mean(1),
                "acceptance_reverse": self.upper.acceptance.mean(1)}

    def frame(self) -> pd.DataFrame:
        """One row per member and point: the bounds with their standard errors, the width, and
        each direction's ESS and acceptance."""
        k, n = self.width.shape

        def col(t: Tensor) -> np.ndarray:
            return t.detach().double().cpu().numpy().reshape(-1)

        return pd.DataFrame({
            "member": np.repeat(np.arange(k), n), "point": np.tile(np.arange(n), k),
            "lower": col(self.lower.log_px), "lower_se": col(self.lower.se),
            "upper": col(self.upper.log_px), "upper_se": col(self.upper.se),
            "width": col(self.width),
            "ess_forward": col(self.lower.ess), "ess_reverse": col(self.upper.ess),
            "acceptance_forward": col(self.lower.acceptance),
            "acceptance_reverse": col(self.upper.acceptance)})


def bdmc(decoder: GaussianDecoder, x: Tensor, z: Tensor, lam: Tensor | None = None, *,
         random: MemberRandom, **settings) -> BDMCResult:
    """Bidirectional Monte Carlo (Grosse et al., 2015; Wu et al., 2017) on points simulated from
    the model (``simulate``): forward AIS from q₀ = q(λ) (None: the prior) and reverse AIS from
    the simulated latents z, with the same ``settings`` (those of ``ais``) and the same
    transition kernels (the reverse run reuses the forward run's step sizes)."""
    lower = ais(decoder, x, lam, random=random, **settings)
    settings["step_sizes"] = lower.step_sizes  # the same kernels, run backwards
    upper = reverse_ais(decoder, x, z, lam, random=random, **settings)
    return BDMCResult(lower, upper)
