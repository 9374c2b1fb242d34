"""Evaluation of a trained model: ELBOs, log p(x), the inference gaps, test-time inference and
latent activity (docs/evaluation.md).

An ELBO alone mixes two losses: the variational family's (no diagonal Gaussian is the true
posterior) and the inference method's (the encoder, or the refinement, does not find the best
member of the family). Cremer, Li & Duvenaud (2018) separate them per data point:

    log p(x) − L[q_φ] = (log p(x) − L[q*])  +  (L[q*] − L[q_φ])
                      =  approximation gap  +  amortization gap

q_φ is the method's own posterior (``InferenceMethod.infer``); q* is the best diagonal Gaussian
for the point, fitted by E-steps with the decoder frozen (``fit_optimal_posterior``). log p(x) is
estimated by annealed importance sampling from q* (``vi.ais``; Neal 2001, as Cremer et al. and
Wu et al. 2017 do), exact for linear decoders; the IWAE estimate with a defensive proposal built
on q* (a mixture of q*, a widened q* and the prior, ``vi.objectives.iwae_bound``) stays beside
it, so how far that lower bound sits below AIS is a measured number. ``bdmc_check`` bounds
AIS's error on points simulated from the model (bidirectional Monte Carlo, Grosse et al. 2015).

Every function here works on a whole ensemble (member axis first) and takes its randomness as a
``vi.streams.MemberRandom``; settings come as plain arguments (their defaults live in the probe
options of ``vi.probes``). Nothing here imports the trainer.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from vi import families, linear_gaussian
from vi.ais import ais, bdmc, simulate
from vi.decoders import GaussianDecoder
from vi.inference import InferenceMethod, LocalFit, MethodSettings, StoppingRule, fit_local
from vi.objectives import ImportanceEstimate, elbo, iwae_bound
from vi.streams import MemberRandom

__all__ = [
    "Activity",
    "BDMCCheck",
    "ELBOValue",
    "GapDecomposition",
    "bdmc_check",
    "diagonal_start",
    "elbo_value",
    "exact_log_marginal",
    "fit_optimal_posterior",
    "gap_decomposition",
    "latent_activity",
    "log_marginal",
    "moments",
    "split_elbo",
    "test_time_curve",
]

#: points per chunk when a whole split is evaluated at once (bounds activation memory)
POINT_CHUNK = 4096


def _is_linear(decoder: GaussianDecoder) -> bool:
    return decoder.mean_kind == "linear"


# ---------------------------------------------------------------------------------- ELBOs


@dataclass
class ELBOValue:
    """Per-point ELBO [K, N] and its Monte Carlo standard error (0 when ``exact``)."""

    value: Tensor
    se: Tensor
    exact: bool


@torch.no_grad()
def elbo_value(decoder: GaussianDecoder, x: Tensor, lam: Tensor, *, n_mc: int,
               random: MemberRandom, chunk_size: int | None = None,
               family: str | families.Family = "diagonal") -> ELBOValue:
    """L(λ; x) per point for reporting: in closed form for linear decoders and Gaussian families
    (exact, ``vi.linear_gaussian.elbo_closed_form``); otherwise E_q[log p(x | z)] − KL(q ‖ p)
    with the KL in closed form (where the ``family`` has one, else in the Monte Carlo average)
    and the expectation averaged over ``n_mc`` samples (in chunks), SE = sd/√n_mc.
    """
    fam = families.get_family(family)
    if _is_linear(decoder) and fam.gaussian:
        W, b, psi = (t.double() for t in decoder.linear_parameters())
        value = linear_gaussian.elbo_closed_form(x.double(), lam.double(), W, b.unsqueeze(1),
                                                 psi.unsqueeze(1), family=fam)
        return ELBOValue(value.to(lam.dtype), torch.zeros_like(lam[..., 0]), True)
    n_mc, h = int(n_mc), decoder.latent_dim
    if chunk_size is None:  # samples per chunk: activations stay about 2^23 numbers
        width = max(x.shape[-1], *decoder.net.sizes)
        chunk_size = max(1, min(n_mc, 2**23 // max(1, x.shape[:-1].numel() * width)))
    total = torch.zeros(lam.shape[:-1], dtype=torch.float64, device=lam.device)
    total_sq = torch.zeros_like(total)
    for start in range(0, n_mc, int(chunk_size)):
        n = min(int(chunk_size), n_mc - start)
        eps = random.randn((n, lam.shape[1], h), 1, dtype=lam.dtype)
        samples = elbo(decoder, x, lam, eps, kl="analytic", family=fam).samples.double()
        total += samples.sum(0)
        total_sq += samples.pow(2).sum(0)
    mean = total / n_mc
    var = ((total_sq - n_mc * mean**2) / max(n_mc - 1, 1)).clamp_min(0.0)
    return ELBOValue(mean.to(lam.dtype), torch.sqrt(var / n_mc).to(lam.dtype), False)


def split_elbo(method: InferenceMethod, x: Tensor, *, n_mc: int, random: MemberRandom,
               start: Tensor | None = None) -> tuple[Tensor, Tensor | None, Tensor]:
    """Mean ELBO per member [K] of the method's own posterior for the points x [K, N, D], the
    E-steps its inference took ([K], or None), and the posterior λ [K, N, 2H]. Every method is
    measured the same way on every split: ``infer`` (vem: E-steps from the prior, or from
    ``start`` for a method with ``warm_validation``, until the held-out rule fires) then
    ``elbo_value``."""
    if start is not None and not method.warm_validation:
        raise ValueError(f"{method.name} does not start its inference from a given λ")
    lam, steps = (method.infer(x, random) if start is None
                  else method.infer(x, random, start=start))
    value = elbo_value(method.decoder, x, lam, n_mc=n_mc, random=random,
                       family=method.settings.family).value
    return value.double().mean(1), steps, lam


# --------------------------------------------------------------------------------- log p(x)


@torch.no_grad()
def exact_log_marginal(decoder: GaussianDecoder, x: Tensor) -> Tensor | None:
    """log N(x; b, W Wᵀ + Ψ) per point [K, N] for a linear decoder, else None."""
    if not _is_linear(decoder):
        return None
    W, b, psi = (t.double() for t in decoder.linear_parameters())
    cov = W @ W.transpose(-1, -2) + torch.diag_embed(psi)
    dist = torch.distributions.MultivariateNormal(b.unsqueeze(1), cov.unsqueeze(1))
    return dist.log_prob(x.double()).to(x.dtype)


def log_marginal(decoder: GaussianDecoder, x: Tensor, proposal: Tensor, *, k: int,
                 defensive: float, random: MemberRandom,
                 family: str | families.Family = "diagonal"
                 ) -> tuple[ImportanceEstimate, Tensor | None]:
    """(IWAE estimate of log p(x) with the given proposal λ of ``family``, exact log p(x) or
    None)."""
    estimate = iwae_bound(decoder, x, proposal, k, random, defensive=defensive, family=family)
    return estimate, exact_log_marginal(decoder, x)


# ---------------------------------------------------------------------------------------- q*


def fit_optimal_posterior(
    decoder: GaussianDecoder,
    x: Tensor,
    init: Tensor,
    *,
    n_mc: int,
    lr: float,
    rule: StoppingRule,
    random: MemberRandom,
    family: str = "diagonal",
) -> LocalFit:
    """q* = argmax_λ L(λ; x) per data point over the variational ``family``
    (``vi.families.FAMILIES``), θ frozen (Cremer et al., 2018, §5).

    The held-out procedure (``vi.inference.fit_local``) with more samples: per-row Adam from
    ``init`` on the analytic-KL ELBO with the reparameterization gradient, M = ``n_mc``,
    batched over points and members, step size ``lr`` decayed on each plateau of ``rule``
    until its last phase's plateau or its cap (the KL in closed form where the family has one,
    else by Monte Carlo). Returns the ``LocalFit`` (λ* [K, N, P] detached, steps, decays,
    whether the cap bound, each [K])."""
    settings = MethodSettings(estimator="reparam", baseline="none", kl="analytic",
                              n_mc=int(n_mc), local_optimizer="adam", local_lr=float(lr),
                              family=family)
    fit = fit_local(decoder, x, init, settings=settings, lr=[float(lr)] * x.shape[0],
                    rule=rule, random=random)
    return LocalFit(fit.lam.detach(), fit.steps, fit.decays, fit.capped)


def moments(family: str | families.Family, lam: Tensor, random: MemberRandom,
            n_mc: int = 256) -> tuple[Tensor, Tensor]:
    """(E_q[z], Var_q[z_h]) per point, each [K, N, H]: exact for a Gaussian family (μ and
    diag(L Lᵀ)), else the mean and variance of ``n_mc`` samples from ``random``."""
    fam = families.get_family(family)
    if fam.name == "diagonal":
        mu, logvar = families.split_params(lam)
        return mu, logvar.exp()
    if fam.gaussian:
        mu, tril = fam.mean_and_scale_tril(lam)
        return mu, tril.pow(2).sum(-1)
    h = fam.latent_dim(lam)
    z = fam.sample(lam, random.randn((int(n_mc), lam.shape[1], h), 1, dtype=lam.dtype))
    return z.mean(0), z.var(0, correction=1)


def diagonal_start(family: str | families.Family, lam: Tensor, random: MemberRandom
                   ) -> Tensor:
    """The diagonal Gaussian λ [K, N, 2H] with q's per-coordinate means and variances
    (``moments``): AIS's initial distribution for a q* of any family (the diagonal family's λ
    itself)."""
    if families.get_family(family).name == "diagonal":
        return lam
    mu, var = moments(family, lam, random)
    return families.join_params(mu, torch.log(var))


# ------------------------------------------------------------------------------------ gaps


@dataclass
class GapDecomposition:
    """Per-member means {metric: [K]} and the per-point frame (a ``member`` column, one row per
    member and data point)."""

    means: dict[str, Tensor]
    per_point: pd.DataFrame


def gap_decomposition(
    method: InferenceMethod,
    x: Tensor,
    *,
    qstar_init: str,
    qstar_n_mc: int,
    qstar_lr: float,
    qstar_rule: StoppingRule,
    iwae_k: int,
    defensive: float,
    gap_n_mc: int,
    low_ess: float,
    random: MemberRandom,
    ais_steps: int = 0,
    ais_chains: int = 16,
    ais_leapfrog: int = 1,
) -> GapDecomposition:
    """log p(x), L[q*], L[q_φ] and the two gaps (Cremer et al., 2018) for the points x.

    q* is fitted from q_φ (``qstar_init="posterior"``, so the fit starts where the method
    stopped) or from the prior. log p(x) is exact for linear decoders; otherwise, with
    ``ais_steps`` = T > 0, forward AIS from q* (``vi.ais.ais``: T distributions, ``ais_chains``
    chains, ``ais_leapfrog`` leapfrog steps per HMC move), else the defensive IWAE with q* as
    proposal. The IWAE estimate is always computed beside it (points whose effective sample size
    is below ``low_ess`` · k flagged ``iwae_low_ess``), and AIS also where log p(x) is exact
    (its error is then measured). ELBOs are exact for linear decoders, else ``gap_n_mc``-sample
    estimates with standard errors. The approximation gap is log p̂(x) − L[q*], the amortization
    gap L[q*] − L[q_φ], per point.

    Per-point columns (nats rounded to 1e-4, far below every standard error): ``family`` (of
    q* and q_φ: the method's own, ``MethodSettings.family``), ``log_px_ais``,
    ``log_px_ais_se`` (over the chains), ``ais_ess`` (of C), ``ais_acceptance``,
    ``log_px_iwae``…, ``log_px_kind`` (exact, AIS or IWAE: what the approximation gap used).
    Means per member: ``ais``, ``ais_se``, ``ais_ess_min``, ``ais_acceptance``, ``iwae``, …,
    ``qstar_steps``, ``qstar_decays``, ``qstar_capped`` (0 or 1)."""
    decoder = method.decoder
    start = time.perf_counter()
    family = families.get_family(method.settings.family)
    lam_phi = method.infer(x, random)[0].detach()
    init = (lam_phi if qstar_init == "posterior"
            else family.init(decoder.latent_dim, lam_phi).expand_as(lam_phi))
    qstar = fit_optimal_posterior(decoder, x, init, n_mc=qstar_n_mc, lr=qstar_lr,
                                  rule=qstar_rule, random=random, family=family.name)
    lam_star, steps = qstar.lam, qstar.steps
    iw, exact = log_marginal(decoder, x, lam_star, k=iwae_k, defensive=defensive,
                             random=random, family=family)
    annealed = (ais(decoder, x, diagonal_start(family, lam_star, random), random=random,
                    steps=int(ais_steps),
                    chains=int(ais_chains), leapfrog=int(ais_leapfrog))
                if ais_steps else None)
    l_star = elbo_value(decoder, x, lam_star, n_mc=gap_n_mc, random=random, family=family)
    l_phi = elbo_value(decoder, x, lam_phi, n_mc=gap_n_mc, random=random, family=family)
    seconds = time.perf_counter() - start
    if exact is not None:
        best, best_se, kind = exact, torch.zeros_like(exact), "exact"
    elif annealed is not None:
        best, best_se, kind = annealed.log_px, annealed.se.nan_to_num(0.0), "AIS"
    else:
        best, best_se, kind = iw.value, iw.se, "IWAE"
    approx, amort = best - l_star.value, l_star.value - l_phi.value
    low = iw.ess < low_ess * iw.k
    k_members, n = x.shape[:2]

    def col(t: Tensor | None, digits: int | None = 4) -> np.ndarray:
        if t is None:
            return np.full(k_members * n, np.nan)
        v = t.detach().double().cpu().numpy().reshape(-1)
        return v if digits is None else np.round(v, digits)

    def ais_col(field: str, digits: int = 4) -> np.ndarray:
        return col(None if annealed is None else getattr(annealed, field), digits)

    frame = pd.DataFrame({
        "member": np.repeat(np.arange(k_members), n), "point": np.tile(np.arange(n), k_members),
        "family": family.name, "log_px_ais": ais_col("log_px"), "log_px_ais_se": ais_col("se"),
        "ais_ess": ais_col("ess", 2), "ais_acceptance": ais_col("acceptance", 3),
        "log_px_iwae": col(iw.value), "log_px_iwae_se": col(iw.se), "iwae_k": iw.k,
        "iwae_ess": col(iw.ess, 1), "iwae_low_ess": col(low, None).astype(bool),
        "log_px_exact": col(exact), "log_px_kind": kind, "elbo_qstar": col(l_star.value),
        "elbo_qstar_se": col(l_star.se), "elbo_qphi": col(l_phi.value),
        "elbo_qphi_se": col(l_phi.se), "approximation_gap": col(approx),
        "approximation_gap_se": col(torch.sqrt(best_se**2 + l_star.se**2)),
        "amortization_gap": col(amort),
        "amortization_gap_se": col(torch.sqrt(l_star.se**2 + l_phi.se**2)),
        "qstar_steps": np.repeat(steps.cpu().numpy(), n),
        "qstar_decays": np.repeat(qstar.decays.cpu().numpy(), n),
        "qstar_capped": np.repeat(qstar.capped.cpu().numpy(), n),
    })
    means = {"iwae": iw.value, "log_px_exact": exact, "elbo_qstar": l_star.value,
             "elbo_qphi": l_phi.value, "approximation_gap": approx,
             "amortization_gap": amort}
    if annealed is not None:
        means |= {"ais": annealed.log_px, "ais_se": annealed.se,
                  "ais_acceptance": annealed.acceptance}
    out = {k: v.double().mean(1) for k, v in means.items() if v is not None}
    if annealed is not None:
        out["ais_ess_min"] = annealed.ess.double().amin(1)
    out["qstar_steps"] = steps.double()
    out["qstar_decays"] = qstar.decays.double()
    out["qstar_capped"] = qstar.capped.double()
    out["iwae_ess_min"] = iw.ess.double().amin(1)
    out["iwae_low_ess_points"] = low.double().sum(1)
    out["seconds"] = torch.full((k_members,), seconds / k_members, dtype=torch.float64)
    return GapDecomposition(out, frame)


@dataclass
class BDMCCheck:
    """A BDMC check of a trained decoder: ``summary`` {statistic: [K]} (``vi.ais.BDMCResult.
    summary``) and the per-point ``frame`` (``BDMCResult.frame``)."""

    summary: dict[str, Tensor]
    frame: pd.DataFrame


def bdmc_check(method: InferenceMethod, n: int, *, qstar_n_mc: int, qstar_lr: float,
               qstar_rule: StoppingRule, random: MemberRandom, **ais_settings) -> BDMCCheck:
    """Bidirectional Monte Carlo (Grosse, Ghahramani & Adams 2015; Wu et al. 2017) on ``n``
    points per member simulated from the trained decoder (z ~ p(z), x ~ p_θ(x | z)): q* fitted
    on the simulated x as in ``gap_decomposition`` (from the method's own posterior), then
    forward AIS from q* (a stochastic lower bound on log p(x)) and reverse AIS from the
    simulated z (a stochastic upper bound) with the same kernels (``vi.ais.bdmc``). The width,
    upper − lower, bounds forward AIS's error on data like the model's own, at the settings
    ``ais_settings`` (those of ``vi.ais.ais``)."""
    decoder = method.decoder
    x, z = simulate(decoder, n, random)
    lam_phi = method.infer(x, random)[0].detach()
    family = families.get_family(method.settings.family)
    lam = fit_optimal_posterior(decoder, x, lam_phi, n_mc=qstar_n_mc, lr=qstar_lr,
                                rule=qstar_rule, random=random, family=family.name).lam
    result = bdmc(decoder, x, z, diagonal_start(family, lam, random), random=random,
                  **ais_settings)
    return BDMCCheck(result.summary(), result.frame())


# ------------------------------------------------------------------------ test-time inference


def test_time_curve(
    method: InferenceMethod,
    x: Tensor,
    steps: list[int],
    *,
    n_mc: int,
    random: MemberRandom,
) -> list[tuple[str, int, Tensor, float]]:
    """Held-out ELBO after s E-steps for each s in ``steps``, θ fixed, from each of the
    method's ``curve_inits`` (``prior``: λ = 0; ``encoder``: f_φ(x), where s = 0 is the one-pass
    amortized ELBO).

    The fit is the held-out procedure (``MethodSettings.heldout_settings``: the
    reparameterization gradient, M = 1, the method's local optimiser from ``local_lr``, its step
    size decayed on each plateau of the rule ``heldout``; the same for every start and method,
    so curves are comparable) cut at s steps: s is a budget, and where the rule stops earlier
    the curve shows where it stopped. Each s is a separate fit from the start, timed on its
    own. Returns (init, s, mean ELBO per member [K],
    seconds per point) tuples; ELBOs as in ``elbo_value`` with ``n_mc`` samples.
    """
    decoder = method.decoder
    if not steps or min(steps) < 0:
        raise ValueError(f"steps must be counts >= 0; got {steps}")
    k_members, n = x.shape[:2]
    rule = method.settings.heldout
    out = []
    for init in method.curve_inits:
        t0 = time.perf_counter()
        if init == "encoder":
            with torch.no_grad():
                lam0 = method.encoder(x)
        else:
            family = families.get_family(method.settings.family)
            lam0 = family.init(decoder.latent_dim, x).expand(k_members, n, -1)
        t_init = time.perf_counter() - t0
        for s in sorted(set(int(v) for v in steps)):
            t0 = time.perf_counter()
            lam = lam0
            if s > 0:
                lam = fit_local(decoder, x, lam0, settings=method.settings.heldout_settings(),
                                lr=method.local_lr, rule=dataclasses.replace(rule, max_steps=s),
                                random=random).lam
            per_point = (t_init + time.perf_counter() - t0) / (n * k_members)
            value = elbo_value(decoder, x, lam.detach(), n_mc=n_mc, random=random,
                               family=method.settings.family).value
            out.append((init, s, value.double().mean(1), per_point))
    return out


test_time_curve.__test__ = False  # a "test_" name, not a test: keep pytest from collecting it


# --------------------------------------------------------------------------- latent activity


@dataclass
class Activity:
    """Posterior collapse diagnostics per member: KL(q(z_h | x) ‖ N(0, 1)) averaged over the
    points [K, H], active units [K] (Burda et al., 2016: Cov_x(E_q[z_h]) > threshold), and
    the per-dimension activity Cov_x(E_q[z_h]) [K, H]."""

    kl_per_dim: Tensor
    active_units: Tensor
    activity: Tensor


@torch.no_grad()
def latent_activity(method: InferenceMethod, x: Tensor, *, threshold: float,
                    random: MemberRandom) -> Activity:
    """Active units and KL per latent dimension of the method's own posterior on x [K, N, D]."""
    lam, _ = method.infer(x, random)
    if method.settings.family == "diagonal":
        h = method.decoder.latent_dim
        mu, logvar = lam[..., :h].double(), lam[..., h:].double()
    else:  # q(z_h | x)'s mean and variance (moment-matched for a non-Gaussian family)
        mu, var = moments(method.settings.family, lam, random)
        mu, logvar = mu.double(), var.double().log()
    kl = 0.5 * (logvar.exp() + mu.pow(2) - 1.0 - logvar)
    activity = mu.var(dim=1, correction=1) if x.shape[1] > 1 else torch.zeros_like(mu[:, 0])
    return Activity(kl.mean(1), (activity > threshold).sum(1).double(), activity)
