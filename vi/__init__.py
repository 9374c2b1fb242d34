"""Amortized inference versus per-datapoint variational EM on one Gaussian-decoder model.

The core library (SPEC §1–3): the decoder family (``vi.decoders``), the diagonal-Gaussian
variational family (``vi.families``), gradient estimators as surrogates (``vi.estimators``),
the ELBO and IWAE bound (``vi.objectives``), and the closed forms of the linear-Gaussian model
(``vi.linear_gaussian``). On top: data sets (``vi.data``), the inference methods
``vem``/``amortized``/``semi_amortized`` (``vi.inference``) and the trainer (``vi.training``).
"""

from vi import families, linear_gaussian
from vi.data import DATASETS, DataError, Dataset, load_dataset, load_npz, save_dataset
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
from vi.evaluation import (
    evaluate_checkpoint,
    fit_optimal_posterior,
    gap_decomposition,
    log_marginal,
    test_time_curve,
)
from vi.gradstats import gradient_statistics, per_sample_grads, variance_sweep
from vi.inference import (
    METHODS,
    Amortized,
    Divergence,
    Encoder,
    InferenceMethod,
    MethodSettings,
    SemiAmortized,
    StoppingRule,
    VariationalEM,
    build_method,
    fit_local,
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
from vi.training import TrainConfig, Trainer, load_checkpoint, save_checkpoint, train

__version__ = "0.1.0"

__all__ = [
    "BASELINES",
    "DATASETS",
    "ESTIMATORS",
    "KL_MODES",
    "METHODS",
    "Amortized",
    "DataError",
    "Dataset",
    "Divergence",
    "Encoder",
    "Estimate",
    "GaussianDecoder",
    "InferenceMethod",
    "MethodSettings",
    "RunningMean",
    "SemiAmortized",
    "StoppingRule",
    "TrainConfig",
    "Trainer",
    "VariationalEM",
    "approximation_gap",
    "build_method",
    "draw_noise",
    "elbo",
    "elbo_closed_form",
    "estimate",
    "evaluate_checkpoint",
    "exact_log_marginal",
    "exact_posterior",
    "families",
    "fit_local",
    "fit_optimal_posterior",
    "gap_decomposition",
    "get_estimator",
    "gradient_statistics",
    "iwae_bound",
    "linear_gaussian",
    "load_checkpoint",
    "load_dataset",
    "load_npz",
    "log_joint",
    "log_marginal",
    "log_weights",
    "optimal_diagonal_posterior",
    "per_sample_grads",
    "ppca_mle",
    "reparam",
    "save_checkpoint",
    "save_dataset",
    "score",
    "stl",
    "test_time_curve",
    "train",
    "validate_estimator",
    "variance_sweep",
]
