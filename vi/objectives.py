"""The ELBO and the IWAE bound of the Gaussian-decoder model (SPEC §3, §5).

    L(λ, θ; x) = E_q[log p_θ(x, z) − log q(z; λ)]                  (``kl="mc"``)
               = E_q[log p_θ(x | z)] − KL(q(z; λ) ‖ p(z))           (``kl="analytic"``)

    IWAE_k(x) = E[log (1/k) Σ_i p_θ(x, z_i) / q(z_i; λ)],  z_i ~ q   (Burda et al., 2016)

Both ELBO forms are built on the generic estimator layer (``vi.estimators``); with
``kl="analytic"`` the estimator covers the reconstruction term only and the KL gradient is exact.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from vi import families
from vi.decoders import GaussianDecoder, log_joint
from vi.estimators import Estimate, draw_noise, estimate

__all__ = ["KL_MODES", "elbo", "iwae_bound", "log_weights"]

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
        x: data [B, D].
        lam: variational parameters [B, 2H] (table rows or encoder outputs).
        eps: noise [M, B, H].
        estimator, baseline: see ``vi.estimators``.
        kl: ``"analytic"`` (closed-form KL) or ``"mc"`` (everything by Monte Carlo).
        baseline_value: the running mean for ``baseline="mean"``.

    Returns:
        ``Estimate(surrogate [B], samples [M, B])``; ``samples`` are per-sample ELBO integrands.
    """
    if kl not in KL_MODES:
        raise ValueError(f"unknown kl mode {kl!r}; valid: {', '.join(KL_MODES)}")
    if x.dim() != 2 or lam.dim() != 2 or x.shape[0] != lam.shape[0]:
        raise ValueError(
            f"elbo expects x [B, D] and lam [B, 2H] with the same B; got x {tuple(x.shape)}, "
            f"lam {tuple(lam.shape)}"
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


def log_weights(decoder: GaussianDecoder, x: Tensor, lam: Tensor, eps: Tensor) -> Tensor:
    """Importance log-weights log p_θ(x, z_i) − log q(z_i; λ), z_i = μ + σ ε_i: [k, B]."""
    z = families.sample(lam, eps)
    return log_joint(decoder, x, z) - families.log_prob(lam, z)


def iwae_bound(
    decoder: GaussianDecoder,
    x: Tensor,
    lam: Tensor,
    k: int,
    *,
    generator: torch.Generator | None = None,
    chunk_size: int = 256,
) -> Tensor:
    """IWAE_k = log (1/k) Σ_i w_i per data point [B], in chunks of ``chunk_size`` samples.

    Chunks are combined with ``logsumexp`` of the chunks' ``logsumexp``s, so memory is
    O(chunk_size · B · D) whatever k is (k = 5000 fits for a batch). k = 1 is the ELBO with
    ``kl="mc"`` and M = 1; the bound is non-decreasing in k and tends to log p(x) (Burda et al.).
    """
    if int(k) < 1 or int(chunk_size) < 1:
        raise ValueError(f"k and chunk_size must be positive; got k={k}, chunk_size={chunk_size}")
    h = families.latent_dim_of(lam)
    partial = []
    for start in range(0, int(k), int(chunk_size)):
        n = min(int(chunk_size), int(k) - start)
        eps = draw_noise(n, lam.shape[:-1], h, generator=generator, device=lam.device,
                         dtype=lam.dtype)
        partial.append(torch.logsumexp(log_weights(decoder, x, lam, eps), dim=0))
    return torch.logsumexp(torch.stack(partial), dim=0) - math.log(int(k))
