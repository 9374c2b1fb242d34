"""The ELBO and the IWAE bound of the Gaussian-decoder model (docs/estimators.md,
docs/evaluation.md).

    L(λ, θ; x) = E_q[log p_θ(x, z) − log q(z; λ)]                  (``kl="mc"``)
               = E_q[log p_θ(x | z)] − KL(q(z; λ) ‖ p(z))           (``kl="analytic"``)

    IWAE_k(x) = E[log (1/k) Σ_i p_θ(x, z_i) / q(z_i; λ)],  z_i ~ q   (Burda et al., 2016)

Both ELBO forms are built on the generic estimator layer (``vi.estimators``); with
``kl="analytic"`` the estimator covers the reconstruction term only and the KL gradient is exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from vi import families
from vi.decoders import GaussianDecoder, log_joint
from vi.estimators import Estimate, estimate

__all__ = ["KL_MODES", "ImportanceEstimate", "elbo", "iwae_bound", "log_weights"]

KL_MODES = ("analytic", "mc")


def elbo(
    decoder: GaussianDecoder,
    x: Tensor,
    lam: Tensor,
    eps: Tensor,
    *,
    estimator: str = "reparam",
    baseline: str = "none",
    kl: str = "analytic",
    baseline_value: Tensor | float | None = None,
) -> Estimate:
    """Per-data-point ELBO estimate L_n (value, nats) whose gradient is the chosen estimator.

    Args:
        decoder: p_θ(x | z) and the prior.
        x: data [K, B, D] (K ensemble members; any leading axes work).
        lam: variational parameters [K, B, 2H] (table rows or encoder outputs).
        eps: noise [M, K, B, H].
        estimator, baseline: see ``vi.estimators``.
        kl: ``"analytic"`` (closed-form KL) or ``"mc"`` (everything by Monte Carlo).
        baseline_value: the running mean for ``baseline="mean"``, broadcastable to [K, B].

    Returns:
        ``Estimate(surrogate [K, B], samples [M, K, B])``; ``samples`` are per-sample ELBO
        integrands.
    """
    if kl not in KL_MODES:
        raise ValueError(f"unknown kl mode {kl!r}; valid: {', '.join(KL_MODES)}")
    if x.shape[:-1] != lam.shape[:-1]:
        raise ValueError(
            f"elbo expects x [K, B, D] and lam [K, B, 2H] with the same leading axes; got x "
            f"{tuple(x.shape)}, lam {tuple(lam.shape)}"
        )
    if kl == "mc":

        def integrand(z: Tensor, lam_f: Tensor) -> Tensor:
            return log_joint(decoder, x, z) - families.log_prob(lam_f, z)

        return estimate(
            integrand, lam, eps, estimator=estimator, baseline=baseline,
            baseline_value=baseline_value,
        )

    kl_term = families.kl_to_standard_normal(lam)
    # The baseline acts on the estimated part only, so a running mean of the whole ELBO is
    # shifted back onto the reconstruction scale.
    if baseline_value is not None:
        baseline_value = baseline_value + kl_term.detach()
    rec = estimate(
        lambda z, _: decoder.log_likelihood(x, z), lam, eps, estimator=estimator,
        baseline=baseline, baseline_value=baseline_value,
    )
    return Estimate(rec.surrogate - kl_term, rec.samples - kl_term.detach())


def log_weights(decoder: GaussianDecoder, x: Tensor, lam: Tensor, eps: Tensor, *,
                widen: float = 1.0, defensive: float = 0.0) -> Tensor:
    """Importance log-weights log p_θ(x, z_i) − log r(z_i) for z_i = μ + s σ ⊙ ε_i: [k, K, B].

    r = q(λ) when ``defensive`` is 0; otherwise the mixture r = (1 − α) q(μ, σ) + α q(μ, sσ)
    with α = ``defensive`` and s = ``widen`` (the sample's own component is set by ``widen``).
    """
    mu, logvar = families.split_params(lam)
    z = mu + widen * torch.exp(0.5 * logvar) * eps
    log_r = families.log_prob(lam, z)
    if defensive > 0:
        wide = families.join_params(mu, logvar + 2 * math.log(_WIDEN))
        log_r = torch.logaddexp(log_r + math.log1p(-defensive),
                                families.log_prob(wide, z) + math.log(defensive))
    return log_joint(decoder, x, z) - log_r


_WIDEN = 2.0  # the defensive component's scale, in units of q's standard deviations


@dataclass
class ImportanceEstimate:
    """log p(x) estimates per point [K, B] from k importance samples.

    ``value``: log (1/k) Σ_i w_i (the IWAE bound for r = q, Burda et al. 2016);
    ``ess``: the effective sample size (Σ w)² / Σ w² (Kong 1992), between 1 and k;
    ``se``: the delta-method standard error √(1/ESS − 1/k) of ``value`` (optimistic when the
    weights are heavy-tailed, which a small ESS flags).
    """

    value: Tensor
    ess: Tensor
    se: Tensor
    k: int


@torch.no_grad()
def iwae_bound(
    decoder: GaussianDecoder,
    x: Tensor,
    lam: Tensor,
    k: int,
    random,
    *,
    defensive: float = 0.0,
    chunk_size: int | None = None,
) -> ImportanceEstimate:
    """log p(x) by importance sampling with k samples per point (Burda et al., 2016), the
    project's one IWAE.

    Proposal r = q(λ), or with ``defensive`` = α > 0 the defensive mixture
    (1 − α) q(μ, σ) + α q(μ, 2σ) (Hesterberg, 1995): its weights p(x, z)/r(z) are bounded by
    p(x, z)/(α q(μ, 2σ)), so a proposal narrower than the posterior (as the best diagonal q* is
    for a correlated posterior) cannot give weights of infinite variance. The k samples are
    allocated to the components in proportion to their weights (the first round((1 − α) k)
    from q), with r using the realised proportions, which keeps (1/k) Σ w_i unbiased for p(x)
    (Owen & Zhou, 2000). ``random`` is a ``vi.streams.MemberRandom`` (one stream per member).
    Chunks of samples are combined with ``logsumexp`` (memory stays bounded for any k; the
    chunk is sized from the data by default). k = 1 with α = 0 is the ELBO with ``kl="mc"``
    and M = 1; the bound is non-decreasing in k and tends to log p(x).
    """
    k = int(k)
    if k < 1 or not 0.0 <= float(defensive) < 1.0:
        raise ValueError(f"k must be positive and defensive in [0, 1); got k={k}, "
                         f"defensive={defensive}")
    h = families.latent_dim_of(lam)
    n_wide = round(float(defensive) * k) if defensive > 0 else 0
    n_wide = min(max(n_wide, 1 if defensive > 0 else 0), k - 1 if k > 1 else 0)
    alpha = n_wide / k
    if chunk_size is None:
        per_sample = max(1, x.shape[:-1].numel() * max(x.shape[-1], h))
        chunk_size = max(1, min(k, 2**23 // per_sample))
    if lam.dim() != 3:
        raise ValueError(f"iwae_bound expects lam [K, B, 2H]; got {tuple(lam.shape)}")
    lse1, lse2 = [], []
    for start in range(0, k, int(chunk_size)):
        n = min(int(chunk_size), k - start)
        eps = random.randn((n, lam.shape[1], h), 1, dtype=lam.dtype)
        widen = torch.ones(n, *([1] * (eps.dim() - 1)), dtype=lam.dtype, device=lam.device)
        widen[max(0, k - n_wide - start):] = _WIDEN
        if alpha > 0:
            lw = log_weights(decoder, x, lam, eps, widen=widen, defensive=alpha).double()
        else:
            lw = log_weights(decoder, x, lam, eps).double()
        lse1.append(torch.logsumexp(lw, 0))
        lse2.append(torch.logsumexp(2 * lw, 0))
    l1 = torch.logsumexp(torch.stack(lse1), 0)
    l2 = torch.logsumexp(torch.stack(lse2), 0)
    ess = torch.exp(2 * l1 - l2)
    se = torch.sqrt((1 / ess - 1 / k).clamp_min(0.0))
    dtype = lam.dtype
    return ImportanceEstimate((l1 - math.log(k)).to(dtype), ess.to(dtype), se.to(dtype), k)
