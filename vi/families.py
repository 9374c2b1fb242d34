"""The variational families (docs/model.md, docs/estimators.md). The default, and the module's
plain functions, is a diagonal Gaussian in the ``(μ, log σ²)`` parameterization; the registry
``FAMILIES`` (``MethodSettings.family``) adds a full-covariance Gaussian through a Cholesky factor
(``FullCovariance``) and a diagonal Gaussian followed by planar flows (``PlanarFlow``), each a
``Family`` with the same interface (``sample`` from explicit noise, ``log_prob``, ``kl_to_prior``
where it has a closed form, ``init`` at the prior).

    q(z; λ) = N(z; μ, diag σ²),   λ = (μ, log σ²) ∈ R^{2H}

λ is a plain tensor whose last axis has length 2H (first H entries μ, last H entries log σ²),
so the same functions serve a per-datapoint table (N x 2H), an encoder's output (B x 2H) and
K stacked copies (K x B x 2H). Sampling takes explicit noise ε ~ N(0, I), so every quantity
here is a deterministic function of (λ, ε) (Kingma & Welling, 2014; Rezende et al., 2014).
Densities, entropies and the KL come from ``torch.distributions``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.distributions import Independent, Normal, kl_divergence

__all__ = [
    "FAMILIES",
    "Diagonal",
    "Family",
    "FullCovariance",
    "PlanarFlow",
    "diag_gaussian",
    "diag_normal",
    "entropy",
    "get_family",
    "join_params",
    "kl_to_standard_normal",
    "latent_dim_of",
    "log_prob",
    "sample",
    "score",
    "split_params",
    "standard_log_prob",
    "standard_normal",
]


def latent_dim_of(lam: Tensor) -> int:
    """H for λ of shape [..., 2H]; raises on an odd or empty last axis."""
    if lam.dim() < 1 or lam.shape[-1] == 0 or lam.shape[-1] % 2:
        raise ValueError(
            f"variational parameters must have an even, non-zero last axis (μ, log σ²) of "
            f"length 2H; got shape {tuple(lam.shape)}"
        )
    return lam.shape[-1] // 2


def split_params(lam: Tensor) -> tuple[Tensor, Tensor]:
    """λ = (μ, log σ²) → (μ, log σ²), each [..., H]."""
    latent_dim_of(lam)
    return lam.chunk(2, dim=-1)  # one split node: its backward is one cat, not two scatters


def join_params(mu: Tensor, logvar: Tensor) -> Tensor:
    """(μ, log σ²) → λ of shape [..., 2H]."""
    if mu.shape != logvar.shape:
        raise ValueError(f"μ and log σ² shapes differ: {tuple(mu.shape)} vs {tuple(logvar.shape)}")
    return torch.cat([mu, logvar], dim=-1)


def diag_normal(loc: Tensor, scale: Tensor) -> Independent:
    """N(loc, diag scale²) with event shape [loc.shape[-1]].

    Argument validation is off: a non-finite parameter must flow on to the trainer's
    divergence check (a recorded outcome) instead of raising inside ``torch.distributions``,
    and validation would cost time in the hot path.
    """
    return Independent(Normal(loc, scale, validate_args=False), 1, validate_args=False)


def diag_gaussian(lam: Tensor) -> Independent:
    """q(z; λ) = N(μ, diag exp(log σ²)) as a ``torch.distributions`` object, event shape [H]."""
    mu, logvar = split_params(lam)
    return diag_normal(mu, torch.exp(0.5 * logvar))


def standard_normal(latent_dim: int, like: Tensor) -> Independent:
    """The prior p(z) = N(0, I_H) on ``like``'s device and dtype."""
    zeros = like.new_zeros(latent_dim)
    return diag_normal(zeros, torch.ones_like(zeros))


def sample(lam: Tensor, eps: Tensor) -> Tensor:
    """z = μ + σ ⊙ ε (the reparameterization r(λ, ε)); ε has shape [M, ..., H] → z [M, ..., H]."""
    mu, logvar = split_params(lam)
    if eps.shape[-1] != mu.shape[-1]:
        raise ValueError(
            f"noise has last axis {eps.shape[-1]} but the latent dimension is {mu.shape[-1]}"
        )
    return mu + torch.exp(0.5 * logvar) * eps


def log_prob(lam: Tensor, z: Tensor) -> Tensor:
    """log q(z; λ), summed over the H latent coordinates; broadcasts z [M, ..., H] against λ.

    (The hot paths sum a ``Normal``'s log-densities over the last axis: the same number as
    ``diag_gaussian(lam).log_prob(z)`` without building an ``Independent`` each step.)"""
    mu, logvar = split_params(lam)
    return Normal(mu, torch.exp(0.5 * logvar), validate_args=False).log_prob(z).sum(-1)


def standard_log_prob(z: Tensor) -> Tensor:
    """log N(z; 0, I), summed over the last axis."""
    return _standard_like(z).log_prob(z).sum(-1)


def entropy(lam: Tensor) -> Tensor:
    """H[q] = ½ Σ_h (1 + log 2π + log σ²_h)."""
    return diag_gaussian(lam).entropy()


def kl_to_standard_normal(lam: Tensor) -> Tensor:
    """KL(q(z; λ) ‖ N(0, I)) = ½ Σ_h (σ²_h + μ²_h − 1 − log σ²_h), closed form."""
    mu, logvar = split_params(lam)
    q = Normal(mu, torch.exp(0.5 * logvar), validate_args=False)
    return kl_divergence(q, _standard_like(mu)).sum(-1)


#: N(0, 1) with 0-d parameters (broadcasts against any shape)
_STANDARD = Normal(torch.tensor(0.0), torch.tensor(1.0), validate_args=False)


def _standard_like(t: Tensor) -> Normal:
    if t.dtype == torch.float32 and t.device.type == "cpu":
        return _STANDARD
    return Normal(t.new_zeros(()), t.new_ones(()), validate_args=False)


def score(lam: Tensor, eps: Tensor) -> Tensor:
    """∇_λ log q(z; λ) at z = μ + σ ε, in closed form: (ε/σ, (ε² − 1)/2), shape [M, ..., 2H].

    Used by the control-variate baseline, which needs the score's coordinates, not only the
    surrogate whose gradient it is.
    """
    _, logvar = split_params(lam)
    return torch.cat([eps * torch.exp(-0.5 * logvar), 0.5 * (eps * eps - 1.0)], dim=-1)


# ------------------------------------------------------------------------- the family registry


class Family:
    """A variational family q(z; λ) over z ∈ R^H with λ a plain tensor [..., P], P =
    ``param_dim(H)``: the same functions serve a per-datapoint table [N, P], an encoder's output
    [B, P] and K stacked members [K, B, P]. Every quantity is a deterministic function of λ and
    explicit standard-normal noise ε [M, ..., H] (the reparameterization z = r(λ, ε)).

    Traits: ``name`` (the key in ``FAMILIES`` and in configurations), ``analytic_kl`` (KL(q ‖ p)
    to the prior N(0, I) has a closed form, ``kl_to_prior``; else the ELBO estimates it by Monte
    Carlo), ``gaussian`` (q is a Gaussian N(μ, L Lᵀ): ``mean_and_scale_tril``).
    """

    name: str = ""
    analytic_kl: bool = False
    gaussian: bool = False

    def param_dim(self, h: int) -> int:
        """P, the length of λ's last axis for H latent dimensions."""
        raise NotImplementedError

    def _latent_dim(self, p: int) -> int | None:
        raise NotImplementedError

    def latent_dim(self, lam: Tensor) -> int:
        """H for λ [..., P]; raises when P is no ``param_dim(H)``."""
        p = lam.shape[-1] if lam.dim() >= 1 else 0
        h = self._latent_dim(p) if p > 0 else None
        if h is None or h < 1 or self.param_dim(h) != p:
            raise ValueError(f"the {self.name} family's parameters have a last axis of length "
                             f"{self._layout()}; got shape {tuple(lam.shape)}")
        return h

    def _layout(self) -> str:
        raise NotImplementedError

    def init(self, h: int, like: Tensor) -> Tensor:
        """The λ [P] of q = the prior N(0, I_H) (vem's table starts there), on ``like``'s device
        and dtype."""
        return like.new_zeros(self.param_dim(h))

    def _check_eps(self, lam: Tensor, eps: Tensor) -> int:
        h = self.latent_dim(lam)
        if eps.shape[-1] != h:
            raise ValueError(f"noise has last axis {eps.shape[-1]} but the latent dimension is "
                             f"{h}")
        return h

    def sample(self, lam: Tensor, eps: Tensor) -> Tensor:
        """z = r(λ, ε) [M, ..., H] for ε [M, ..., H]."""
        raise NotImplementedError

    def log_prob(self, lam: Tensor, z: Tensor) -> Tensor:
        """log q(z; λ) [M, ...] at any z [M, ..., H], differentiable in λ and z."""
        raise NotImplementedError

    def sample_and_log_prob(self, lam: Tensor, eps: Tensor) -> tuple[Tensor, Tensor]:
        """(z = r(λ, ε), log q(z; λ)), the density computed along the sampling path."""
        z = self.sample(lam, eps)
        return z, self.log_prob(lam, z)

    def kl_to_prior(self, lam: Tensor) -> Tensor | None:
        """KL(q(z; λ) ‖ N(0, I)) [...] in closed form, or None where there is none."""
        return None

    def score(self, lam: Tensor, eps: Tensor) -> Tensor:
        """∇_λ log q(z; λ) at z = r(λ, ε) held fixed, one per sample: [M, ..., P] (the
        control-variate baseline's coordinates). By ``torch.func``: one gradient per sample,
        vectorised over the samples."""
        z = self.sample(lam.detach(), eps).detach()

        def total(lam_: Tensor, z_: Tensor) -> Tensor:
            return self.log_prob(lam_, z_).sum()

        return torch.func.vmap(torch.func.grad(total), in_dims=(None, 0))(lam.detach(), z)

    def widen(self, lam: Tensor, factor: float) -> Tensor:
        """λ of q widened by ``factor``: z = r(λ, factor · ε) (the defensive proposal's
        second component, ``vi.objectives.log_weights``)."""
        raise NotImplementedError

    def mean_and_scale_tril(self, lam: Tensor) -> tuple[Tensor, Tensor] | None:
        """(μ [..., H], L [..., H, H]) with q = N(μ, L Lᵀ), or None for a non-Gaussian q."""
        return None

    def __repr__(self) -> str:
        return f"<family {self.name}>"


class Diagonal(Family):
    """q(z; λ) = N(μ, diag σ²), λ = (μ, log σ²) ∈ R^{2H}: the module's functions above
    (Kingma & Welling 2014). Sampling H multiplies, log q O(H), KL in closed form."""

    name = "diagonal"
    analytic_kl = True
    gaussian = True

    def param_dim(self, h: int) -> int:
        return 2 * int(h)

    def _latent_dim(self, p: int) -> int | None:
        return p // 2 if p % 2 == 0 else None

    def latent_dim(self, lam: Tensor) -> int:
        return latent_dim_of(lam)

    def _layout(self) -> str:
        return "2H"

    def sample(self, lam: Tensor, eps: Tensor) -> Tensor:
        return sample(lam, eps)

    def log_prob(self, lam: Tensor, z: Tensor) -> Tensor:
        return log_prob(lam, z)

    def kl_to_prior(self, lam: Tensor) -> Tensor:
        return kl_to_standard_normal(lam)

    def score(self, lam: Tensor, eps: Tensor) -> Tensor:
        return score(lam, eps)

    def widen(self, lam: Tensor, factor: float) -> Tensor:
        mu, logvar = split_params(lam)
        return join_params(mu, logvar + 2 * math.log(factor))

    def mean_and_scale_tril(self, lam: Tensor) -> tuple[Tensor, Tensor]:
        mu, logvar = split_params(lam)
        return mu, torch.diag_embed(torch.exp(0.5 * logvar))


class FullCovariance(Family):
    """q(z; λ) = N(μ, L Lᵀ) with L lower triangular with a positive diagonal (the Cholesky
    factor of the covariance): λ = (μ, ℓ) ∈ R^{H + H(H+1)/2}, ℓ the entries of L's lower
    triangle row by row (``torch.tril_indices``), the diagonal ones stored as log L_hh (Titsias &
    Lázaro-Gredilla 2014; Kucukelbir et al. 2017, ADVI's full-rank family).

        z = μ + L ε,   log q(z) = −½ ‖L⁻¹(z − μ)‖² − Σ_h log L_hh − (H/2) log 2π,
        KL(q ‖ N(0, I)) = ½ (‖L‖²_F + ‖μ‖² − H) − Σ_h log L_hh.

    Sampling costs O(H²) per sample, log q one triangular solve O(H²); the table holds
    H(H+3)/2 numbers per point. On a linear-Gaussian model it contains the exact posterior."""

    name = "full"
    analytic_kl = True
    gaussian = True

    def param_dim(self, h: int) -> int:
        h = int(h)
        return h + h * (h + 1) // 2

    def _latent_dim(self, p: int) -> int | None:
        return round((math.sqrt(9 + 8 * p) - 3) / 2)

    def _layout(self) -> str:
        return "H + H(H+1)/2"

    @staticmethod
    def _scatter(h: int, like: Tensor) -> tuple[Tensor, Tensor]:
        """(E [T, H·H], diagonal mask [T]): the tril entries' one-hot positions in L."""
        rows, cols = torch.tril_indices(h, h, device=like.device)
        e = like.new_zeros(rows.numel(), h * h)
        e[torch.arange(rows.numel(), device=like.device), rows * h + cols] = 1.0
        return e, rows == cols

    def mean_and_scale_tril(self, lam: Tensor) -> tuple[Tensor, Tensor]:
        h = self.latent_dim(lam)
        mu, ell = lam[..., :h], lam[..., h:]
        e, diag = self._scatter(h, lam)
        ell = torch.where(diag, torch.exp(ell), ell)
        return mu, (ell @ e).unflatten(-1, (h, h))

    def log_diag(self, lam: Tensor) -> Tensor:
        """log L_hh [..., H]."""
        h = self.latent_dim(lam)
        rows, cols = torch.tril_indices(h, h, device=lam.device)
        return lam[..., h:][..., rows == cols]

    def sample(self, lam: Tensor, eps: Tensor) -> Tensor:
        self._check_eps(lam, eps)
        mu, tril = self.mean_and_scale_tril(lam)
        return mu + (tril @ eps.unsqueeze(-1)).squeeze(-1)

    def log_prob(self, lam: Tensor, z: Tensor) -> Tensor:
        h = self._check_eps(lam, z)
        mu, tril = self.mean_and_scale_tril(lam)
        diff = (z - mu).unsqueeze(-1)
        white = torch.linalg.solve_triangular(tril.expand(*diff.shape[:-2], h, h), diff,
                                              upper=False).squeeze(-1)
        return (-0.5 * white.pow(2).sum(-1) - self.log_diag(lam).sum(-1)
                - 0.5 * h * math.log(2 * math.pi))

    def kl_to_prior(self, lam: Tensor) -> Tensor:
        h = self.latent_dim(lam)
        mu, tril = self.mean_and_scale_tril(lam)
        return (0.5 * (tril.pow(2).sum((-1, -2)) + mu.pow(2).sum(-1) - h)
                - self.log_diag(lam).sum(-1))

    def widen(self, lam: Tensor, factor: float) -> Tensor:
        h = self.latent_dim(lam)
        rows, cols = torch.tril_indices(h, h, device=lam.device)
        shift = torch.cat([lam.new_zeros(h), (rows == cols).to(lam.dtype) * math.log(factor)])
        return lam + shift

    @staticmethod
    def join(mu: Tensor, tril: Tensor) -> Tensor:
        """(μ [..., H], L [..., H, H] lower triangular, positive diagonal) → λ."""
        h = mu.shape[-1]
        rows, cols = torch.tril_indices(h, h, device=mu.device)
        ell = tril[..., rows, cols]
        ell = torch.where(rows == cols, torch.log(ell), ell)
        return torch.cat([mu, ell], dim=-1)


class PlanarFlow(Family):
    """A diagonal Gaussian base followed by S planar flows (Rezende & Mohamed 2015, §4.1 and
    appendix A), every parameter per point: λ = (μ, log σ², (u_s, w_s, b_s) for s = 1..S) ∈
    R^{2H + S(2H+1)}.

        z₀ = μ + σ ⊙ ε,   z_s = z_{s−1} + û_s tanh(w_sᵀ z_{s−1} + b_s),
        log q(z_S) = log N(z₀; μ, diag σ²) − Σ_s log(1 + w_sᵀ û_s (1 − tanh²(w_sᵀ z_{s−1} + b_s)))

    with û = u + (m(wᵀu) − wᵀu) w/‖w‖², m(a) = −1 + log(1 + eᵃ), so that wᵀû = m(wᵀu) > −1
    and every step is invertible (their appendix A). log q at a given z (the score-function
    and STL estimators need it) inverts the steps last to first: with α = w_sᵀ z_{s−1},
    α + w_sᵀû_s tanh(α + b_s) = w_sᵀ z_s is strictly increasing in α, its root lies within
    |w_sᵀû_s| of w_sᵀ z_s and is found by bisection on that bracket; two Newton steps from the
    (detached) root then carry the derivatives in λ and z (exact at first and second order:
    Newton's error is quadratic in the distance to the root). ``init`` is q = the prior:
    û_s = 0 (u_s = log(e − 1) w_s) with w_s the s-th unit vector (mod H), b_s = 0.

    Cost per sample: O(S·H) for sampling and log q along the path; log q at a given z adds a
    bisection of ~the dtype's mantissa bits of scalar steps per flow step."""

    name = "flow"
    analytic_kl = False
    gaussian = False

    def __init__(self, steps: int = 4) -> None:
        self.steps = int(steps)

    def param_dim(self, h: int) -> int:
        h = int(h)
        return 2 * h + self.steps * (2 * h + 1)

    def _latent_dim(self, p: int) -> int | None:
        rest = p - self.steps
        return rest // (2 + 2 * self.steps) if rest % (2 + 2 * self.steps) == 0 else None

    def _layout(self) -> str:
        return f"2H + {self.steps}(2H + 1)"

    def init(self, h: int, like: Tensor) -> Tensor:
        h = int(h)
        w = torch.eye(h, dtype=like.dtype, device=like.device)[
            torch.arange(self.steps, device=like.device) % h]
        u = math.log(math.e - 1) * w
        step = torch.cat([u, w, like.new_zeros(self.steps, 1)], dim=-1)
        return torch.cat([like.new_zeros(2 * h), step.reshape(-1)])

    def _split(self, lam: Tensor):
        """(μ, log σ², û [..., S, H], w [..., S, H], b [..., S], wᵀû [..., S])."""
        h = self.latent_dim(lam)
        mu, logvar = lam[..., :h], lam[..., h:2 * h]
        steps = lam[..., 2 * h:].unflatten(-1, (self.steps, 2 * h + 1))
        u, w, b = steps[..., :h], steps[..., h:2 * h], steps[..., 2 * h]
        wu = (w * u).sum(-1)
        w2 = (w * w).sum(-1).clamp_min(torch.finfo(lam.dtype).tiny)
        m = -1.0 + torch.nn.functional.softplus(wu)
        u_hat = u + ((m - wu) / w2).unsqueeze(-1) * w
        return mu, logvar, u_hat, w, b, m  # wᵀû = m(wᵀu)

    def widen(self, lam: Tensor, factor: float) -> Tensor:
        h = self.latent_dim(lam)
        shift = lam.new_zeros(lam.shape[-1])
        shift[h:2 * h] = 2 * math.log(factor)
        return lam + shift

    def sample_and_log_prob(self, lam: Tensor, eps: Tensor) -> tuple[Tensor, Tensor]:
        self._check_eps(lam, eps)
        mu, logvar, u_hat, w, b, wu = self._split(lam)
        z = mu + torch.exp(0.5 * logvar) * eps
        log_q = Normal(mu, torch.exp(0.5 * logvar), validate_args=False).log_prob(z).sum(-1)
        for s in range(self.steps):  # over the S flow steps, not over samples or points
            t = torch.tanh((z * w[..., s, :]).sum(-1) + b[..., s])
            z = z + u_hat[..., s, :] * t.unsqueeze(-1)
            log_q = log_q - torch.log1p(wu[..., s] * (1.0 - t * t))
        return z, log_q

    def sample(self, lam: Tensor, eps: Tensor) -> Tensor:
        return self.sample_and_log_prob(lam, eps)[0]

    def log_prob(self, lam: Tensor, z: Tensor) -> Tensor:
        self._check_eps(lam, z)
        mu, logvar, u_hat, w, b, wu = self._split(lam)
        log_det = torch.zeros_like(z[..., 0])
        iters = round(-math.log2(torch.finfo(z.dtype).eps)) + 8  # below one ulp
        for s in reversed(range(self.steps)):
            target = (z * w[..., s, :]).sum(-1)
            c, bs = wu[..., s], b[..., s]
            # the root α of g(α) = α + c tanh(α + b) − target, bisected on target ∓ |c|
            c0, b0, t0 = c.detach(), bs.detach(), target.detach()
            lo, hi = t0 - c0.abs(), t0 + c0.abs()
            lo, hi = torch.broadcast_tensors(lo, hi)
            for _ in range(iters):
                mid = 0.5 * (lo + hi)
                above = mid + c0 * torch.tanh(mid + b0) > t0
                lo, hi = torch.where(above, lo, mid), torch.where(above, mid, hi)
            alpha = 0.5 * (lo + hi)
            for _ in range(2):  # Newton from the detached root: the derivatives in λ and z
                t = torch.tanh(alpha + bs)
                alpha = alpha - (alpha + c * t - target) / (1.0 + c * (1.0 - t * t))
            t = torch.tanh(alpha + bs)
            z = z - u_hat[..., s, :] * t.unsqueeze(-1)
            log_det = log_det + torch.log1p(c * (1.0 - t * t))
        base = Normal(mu, torch.exp(0.5 * logvar), validate_args=False).log_prob(z).sum(-1)
        return base - log_det


#: the variational families by name (``MethodSettings.family``)
FAMILIES: dict[str, Family] = {f.name: f for f in (Diagonal(), FullCovariance(), PlanarFlow())}


def get_family(family: str | Family) -> Family:
    """A family by name (or the family itself); an unknown name lists the valid ones."""
    if isinstance(family, Family):
        return family
    if family not in FAMILIES:
        raise ValueError(f"unknown variational family {family!r}; valid: "
                         f"{', '.join(FAMILIES)}")
    return FAMILIES[family]
