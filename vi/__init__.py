"""Amortized inference versus per-datapoint variational EM on one Gaussian-decoder model.

The library, bottom up (docs/): the diagonal-Gaussian variational family (``vi.families``),
gradient estimators as surrogates (``vi.estimators``), stacked networks (``vi.nets``), the
decoder (``vi.decoders``), the ELBO and the IWAE bound (``vi.objectives``), the closed forms of
the linear-Gaussian model (``vi.linear_gaussian``), data sets (``vi.data``), reference models
(``vi.references``), optimisers (``vi.optim``), the inference methods
``vem``/``amortized``/``semi_amortized`` (``vi.inference``), log p(x) by annealed importance
sampling with its BDMC check (``vi.ais``), evaluation and gradient statistics
(``vi.evaluation``, ``vi.gradstats``), the run configuration and the trainer (``vi.config``,
``vi.training``) and the measurements taken during training (``vi.probes``).

Names are imported lazily: ``import vi`` is cheap, and ``vi.files`` and ``vi.streams`` can be
used without the rest.
"""

from __future__ import annotations

import importlib

__version__ = "0.2.0"

_EXPORTS = {
    "families": None, "linear_gaussian": None, "ais": None,
    "DATASETS": "data", "DataError": "data", "Dataset": "data", "load_dataset": "data",
    "load_npz": "data", "save_dataset": "data", "variance_floor": "data",
    "bits_per_dim": "data",
    "GaussianDecoder": "decoders", "log_joint": "decoders",
    "BASELINES": "estimators", "ESTIMATORS": "estimators", "Estimate": "estimators",
    "RunningMean": "estimators", "draw_noise": "estimators", "estimate": "estimators",
    "get_estimator": "estimators", "reparam": "estimators", "score": "estimators",
    "stl": "estimators", "validate_estimator": "estimators", "dreg": "estimators",
    "OBJECTIVES": "estimators",
    "KL_MODES": "objectives", "elbo": "objectives", "iwae_bound": "objectives",
    "log_weights": "objectives", "iwae": "objectives",
    "METHODS": "inference", "Amortized": "inference", "Encoder": "inference",
    "InferenceMethod": "inference", "MethodSettings": "inference",
    "SemiAmortized": "inference", "StoppingRule": "inference", "VariationalEM": "inference",
    "build_method": "inference", "fit_local": "inference",
    "approximation_gap": "linear_gaussian", "elbo_closed_form": "linear_gaussian",
    "exact_log_marginal": "linear_gaussian", "exact_posterior": "linear_gaussian",
    "optimal_diagonal_posterior": "linear_gaussian", "ppca_mle": "linear_gaussian",
    "AISResult": "ais", "BDMCResult": "ais", "bdmc": "ais",
    "fit_optimal_posterior": "evaluation", "gap_decomposition": "evaluation",
    "test_time_curve": "evaluation", "latent_activity": "evaluation",
    "gradient_statistics": "gradstats", "per_sample_grads": "gradstats",
    "variance_sweep": "gradstats", "k_sweep": "gradstats",
    "RunConfig": "config", "DataConfig": "config", "ModelConfig": "config",
    "TrainingConfig": "config", "StoppingConfig": "config",
    "Trainer": "training", "MemberResult": "training", "load_checkpoint": "training",
    "train": "training",
    "PROBES": "probes", "build_probes": "probes",
    "MemberRandom": "streams", "generator": "streams",
    "atomic_write": "files",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'vi' has no attribute {name!r}")
    module = importlib.import_module(f"vi.{_EXPORTS[name] or name}")
    value = module if _EXPORTS[name] is None else getattr(module, name)
    globals()[name] = value
    return value
