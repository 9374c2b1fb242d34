"""Amortized inference versus per-datapoint variational EM on one Gaussian-decoder model.

The core library (SPEC §1–3): the decoder family (``vi.decoders``), the diagonal-Gaussian
variational family (``vi.families``), gradient estimators as surrogates (``vi.estimators``),
the ELBO and IWAE bound (``vi.objectives``), and the closed forms of the linear-Gaussian model
(``vi.linear_gaussian``).
"""

from vi import families, linear_gaussian
from vi.decoders import GaussianDecoder, log_joint
from vi.estimators import (
    BASELINES,
    ESTIMATORS,
    Estimate,
    RunningMean,
    draw_noise,
    estimate,
    get_estimator,
    reparam,
    score,
    stl,
    validate_estimator,
)
from vi.linear_gaussian import (
    approximation_gap,
    elbo_closed_form,
    exact_log_marginal,
    exact_posterior,
    optimal_diagonal_posterior,
    ppca_mle,
)
from vi.objectives import KL_MODES, elbo, iwae_bound, log_weights

__version__ = "0.1.0"

__all__ = [
    "BASELINES",
    "ESTIMATORS",
    "KL_MODES",
    "Estimate",
    "GaussianDecoder",
    "RunningMean",
    "approximation_gap",
    "draw_noise",
    "elbo",
    "elbo_closed_form",
    "estimate",
    "exact_log_marginal",
    "exact_posterior",
    "families",
    "get_estimator",
    "iwae_bound",
    "linear_gaussian",
    "log_joint",
    "log_weights",
    "optimal_diagonal_posterior",
    "ppca_mle",
    "reparam",
    "score",
    "stl",
    "validate_estimator",
]
