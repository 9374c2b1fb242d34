"""Closed forms of the linear-Gaussian model, the ground truth every estimator is checked against.

    z ~ N(0, I_H),   x | z ~ N(W z + b, diag ψ)   ⇒   x ~ N(b, C),  C = W Wᵀ + diag ψ

With isotropic ψ = s² 1 this is probabilistic PCA (Tipping & Bishop, 1999); with free ψ, factor
analysis. The posterior is Gaussian with precision P = I + Wᵀ Ψ⁻¹ W and mean
P⁻¹ Wᵀ Ψ⁻¹ (x − b); the best diagonal Gaussian (minimising KL(q ‖ p(z | x))) keeps that mean and
takes variances 1 / P_hh, and its approximation gap KL(q* ‖ p(z | x)) = ½ (Σ_h log P_hh − log det P)
is the same for every x (docs/model.md; Cremer et al., 2018).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.distributions import MultivariateNormal

from vi import families

__all__ = [
    "approximation_gap",
    "elbo_closed_form",
    "exact_log_marginal",
    "exact_posterior",
    "marginal",
    "optimal_diagonal_posterior",
    "optimal_full_posterior",
    "posterior_precision",
    "ppca_mle",
]


def _check(W: Tensor, b: Tensor, psi: Tensor) -> Tensor:
    if W.dim() < 2 or b.dim() < 1 or b.shape[-1] != W.shape[-2]:
        raise ValueError(f"expected W [..., D, H] and b [..., D]; got W {tuple(W.shape)}, "
                         f"b {tuple(b.shape)}")
    psi = torch.as_tensor(psi, dtype=W.dtype, device=W.device)
    if psi.dim() == 0:
        psi = psi.expand(W.shape[-2])
    if bool((psi <= 0).any()):
        raise ValueError("the noise variances ψ must be positive")
    return psi


def marginal(W: Tensor, b: Tensor, psi: Tensor) -> MultivariateNormal:
    """p(x) = N(b, W Wᵀ + diag ψ)."""
    psi = _check(W, b, psi)
    return MultivariateNormal(b, covariance_matrix=W @ W.T + torch.diag(psi))


def exact_log_marginal(x: Tensor, W: Tensor, b: Tensor, psi: Tensor) -> Tensor:
    """log p(x) = log N(x; b, W Wᵀ + diag ψ), per data point: x [..., D] → [...]."""
    return marginal(W, b, psi).log_prob(x)


def posterior_precision(W: Tensor, psi: Tensor) -> Tensor:
    """P = I + Wᵀ diag(ψ)⁻¹ W, [H, H]."""
    psi = torch.as_tensor(psi, dtype=W.dtype, device=W.device).expand(W.shape[0])
    return torch.eye(W.shape[1], dtype=W.dtype, device=W.device) + (W.T / psi) @ W


def exact_posterior(x: Tensor, W: Tensor, b: Tensor, psi: Tensor) -> MultivariateNormal:
    """p(z | x) = N(P⁻¹ Wᵀ Ψ⁻¹ (x − b), P⁻¹), batch shape x.shape[:-1]."""
    psi = _check(W, b, psi)
    cov = torch.linalg.inv(posterior_precision(W, psi))
    mean = ((x - b) / psi) @ W @ cov
    return MultivariateNormal(mean, covariance_matrix=cov)


def optimal_diagonal_posterior(x: Tensor, W: Tensor, b: Tensor, psi: Tensor) -> Tensor:
    """λ* = (posterior mean, −log diag P): the diagonal Gaussian maximising the ELBO, [..., 2H]."""
    post = exact_posterior(x, W, b, psi)
    logvar = -torch.log(torch.diagonal(posterior_precision(W, psi)))
    return families.join_params(post.mean, logvar.expand_as(post.mean))


def optimal_full_posterior(x: Tensor, W: Tensor, b: Tensor, psi: Tensor) -> Tensor:
    """λ* of the full-covariance family (``vi.families.FullCovariance``) equal to the exact
    posterior N(P⁻¹ Wᵀ Ψ⁻¹ (x − b), P⁻¹): its ELBO is log p(x), [..., H + H(H+1)/2]."""
    post = exact_posterior(x, W, b, psi)
    tril = torch.linalg.cholesky(post.covariance_matrix).expand(*post.mean.shape,
                                                                 post.mean.shape[-1])
    return families.FullCovariance.join(post.mean, tril)


def approximation_gap(W: Tensor, psi: Tensor) -> Tensor:
    """log p(x) − L[q*] = KL(q* ‖ p(z | x)) = ½ (Σ_h log P_hh − log det P) ≥ 0, for every x."""
    prec = posterior_precision(W, psi)
    return 0.5 * (torch.log(torch.diagonal(prec)).sum() - torch.logdet(prec))


def elbo_closed_form(x: Tensor, lam: Tensor, W: Tensor, b: Tensor, psi: Tensor,
                     family: str | families.Family = "diagonal") -> Tensor:
    """Exact ELBO of a diagonal Gaussian q(z; λ) under the linear model, per data point.

    L = Σ_d [−½ log 2πψ_d − ((x_d − (Wμ + b)_d)² + Σ_h W²_dh σ²_h) / (2ψ_d)] − KL(q ‖ N(0, I)).
    Differentiable in λ, W, b and ψ: its autograd gradient is the exact gradient every
    estimator must match in expectation. Batched: x [K, N, D], λ [K, N, 2H] with W [K, D, H],
    b and ψ [K, 1, D] give [K, N].

    Any Gaussian ``family`` q = N(μ, L Lᵀ) (``vi.families``, e.g. ``"full"``): the spread
    Σ_h W²_dh σ²_h becomes (W L Lᵀ Wᵀ)_dd = Σ_h (W L)²_dh and the KL the family's closed form.
    """
    psi = _check(W, b, psi)
    fam = families.get_family(family)
    if fam.name != "diagonal":
        if not fam.gaussian:
            raise ValueError(f"the linear model's ELBO has a closed form for Gaussian families "
                             f"only; got {fam.name!r}")
        mu, tril = fam.mean_and_scale_tril(lam)
        resid = x - (mu @ W.transpose(-1, -2) + b)
        wl = (W.unsqueeze(-3) if W.dim() > 2 else W) @ tril  # W [K, D, H] meets L [K, N, H, H]
        spread = wl.pow(2).sum(-1)
        expected_loglik = -0.5 * (
            torch.log(2 * math.pi * psi) + (resid.pow(2) + spread) / psi
        ).sum(-1)
        return expected_loglik - fam.kl_to_prior(lam)
    mu, logvar = families.split_params(lam)
    resid = x - (mu @ W.transpose(-1, -2) + b)
    spread = torch.exp(logvar) @ (W * W).transpose(-1, -2)
    expected_loglik = -0.5 * (
        torch.log(2 * math.pi * psi) + (resid.pow(2) + spread) / psi
    ).sum(-1)
    return expected_loglik - families.kl_to_standard_normal(lam)


def ppca_mle(x: Tensor, latent_dim: int) -> tuple[Tensor, Tensor, Tensor]:
    """Maximum-likelihood PPCA (Tipping & Bishop, 1999, eq. 7–8) of data x [N, D].

    b = sample mean; with the sample covariance S = U Λ Uᵀ (eigenvalues descending),
    s² = mean of the D − H smallest eigenvalues and W = U_H (Λ_H − s² I)^{1/2} (rotation R = I).
    Returns (W [D, H], b [D], s² as a 0-d tensor).
    """
    n, d = x.shape
    if not 1 <= int(latent_dim) < d:
        raise ValueError(f"PPCA needs 1 <= latent_dim < D = {d}; got {latent_dim}")
    b = x.mean(0)
    cov = (x - b).T @ (x - b) / n
    evals, evecs = torch.linalg.eigh(cov)
    evals, evecs = evals.flip(0), evecs.flip(1)
    s2 = evals[latent_dim:].mean()
    W = evecs[:, :latent_dim] * torch.sqrt((evals[:latent_dim] - s2).clamp_min(0.0))
    return W, b, s2
