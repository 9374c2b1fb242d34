"""Shared fixtures and statistical helpers for the core-library tests.

Every statistical test is seeded and compares a Monte Carlo mean (or variance) with a closed form
through a z-score, mean difference / standard error, against a Bonferroni-corrected two-sided
normal critical value: with P coordinates tested at family-wise level α, each coordinate passes
when |z| <= Φ⁻¹(1 − α / (2P)). α = 1e-3 unless a test says otherwise, so a correct estimator fails
a given seed with probability < 0.1 % and a fixed seed makes the outcome deterministic.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from scipy.stats import norm

# Let a bare `pytest` (not only `python -m pytest`) import the uninstalled package.
_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from vi import linear_gaussian  # noqa: E402
from vi.decoders import GaussianDecoder  # noqa: E402
from vi.streams import MemberRandom  # noqa: E402

DTYPE = torch.float64
ALPHA = 1e-3

# The tensors here are tiny: intra-op threads only add synchronisation, and on a shared 2-core
# machine oversubscribed OpenMP threads made the suite several times slower.
torch.set_num_threads(1)


def bonferroni_crit(n_coords: int, alpha: float = ALPHA) -> float:
    """Two-sided critical value Φ⁻¹(1 − α/(2P)) for P simultaneous z-tests at level α."""
    return float(norm.ppf(1.0 - alpha / (2.0 * max(int(n_coords), 1))))


def zscores(draws: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-coordinate (mean − target) / SE for iid draws [R, ...] of an estimator of ``target``.

    SE = s / √R with the unbiased sample standard deviation s. Coordinates whose draws are all
    equal (zero variance, e.g. a pathwise gradient that is deterministic) get z = 0 when the
    mean equals the target to rounding, ±inf otherwise.
    """
    draws = draws.reshape(draws.shape[0], -1).to(DTYPE)
    target = target.reshape(-1).to(DTYPE)
    mean = draws.mean(0)
    se = draws.std(0, unbiased=True) / draws.shape[0] ** 0.5
    diff = mean - target
    scale = 1.0 + target.abs() + mean.abs()
    exact = se <= 1e-12 * scale
    z = diff / torch.where(exact, torch.ones_like(se), se)
    agrees = diff.abs() <= 1e-9 * scale
    return torch.where(exact, torch.where(agrees, 0.0, torch.inf * diff.sign()), z)


def assert_unbiased(draws: torch.Tensor, target: torch.Tensor, alpha: float = ALPHA) -> None:
    """Fail when any coordinate's mean differs from ``target`` beyond the Bonferroni bound."""
    z = zscores(draws, target)
    crit = bonferroni_crit(z.numel(), alpha)
    worst = int(z.abs().argmax())
    assert bool((z.abs() <= crit).all()), (
        f"biased: max |z| = {float(z.abs().max()):.2f} at coordinate {worst} "
        f"(of {z.numel()}) exceeds the Bonferroni bound {crit:.2f}; z = {z.tolist()}"
    )


def member_random(*seeds: int, key: str = "test") -> MemberRandom:
    """Member streams (one generator per seed) for the stream ``key``: the ``random`` argument
    of the library's functions."""
    return MemberRandom.from_seeds(list(seeds) or [0], key)


@pytest.fixture
def generator() -> torch.Generator:
    """A fresh, seeded CPU generator for each test."""
    return torch.Generator().manual_seed(20240607)


@pytest.fixture
def linear_model() -> SimpleNamespace:
    """A small float64 linear-Gaussian model (D=4, H=2) with 3 data points drawn from it.

    The decoder is a one-member ``GaussianDecoder(mean="linear", variance="learned")`` with
    per-dimension noise ψ (factor analysis) loaded from (W, b, ψ). ``lam`` is the exact diagonal
    optimum λ* moved off by a fixed perturbation, so that every ELBO gradient is non-zero.

    The closed forms take plain tensors (``W`` [D, H], ``x`` [B, D], ``lam`` [B, 2H]); the
    decoder and the objectives take a member axis first: ``x1`` [1, B, D], ``lam1`` [1, B, 2H].
    """
    g = torch.Generator().manual_seed(7)
    d, h, n = 4, 2, 3
    W = torch.randn(d, h, generator=g, dtype=DTYPE)
    b = torch.randn(d, generator=g, dtype=DTYPE)
    psi = 0.3 + 0.5 * torch.rand(d, generator=g, dtype=DTYPE)
    decoder = GaussianDecoder(d, h, mean="linear", variance="learned").to(DTYPE)
    decoder.set_linear_parameters(W, b, psi)
    # Ancestral sampling x = W z + b + √ψ ⊙ e, from the seeded generator.
    z = torch.randn(n, h, generator=g, dtype=DTYPE)
    x = b + z @ W.T + psi.sqrt() * torch.randn(n, d, generator=g, dtype=DTYPE)
    lam_opt = linear_gaussian.optimal_diagonal_posterior(x, W, b, psi)
    lam = lam_opt + 0.4 * torch.randn(n, 2 * h, generator=g, dtype=DTYPE)
    return SimpleNamespace(decoder=decoder, W=W, b=b, psi=psi, x=x, lam=lam, lam_opt=lam_opt,
                           x1=x.unsqueeze(0), lam1=lam.unsqueeze(0), D=d, H=h, B=n)
