"""Reference models: exact log p(x) of simple fitted densities, the yardsticks beside every number.

Every ELBO or log p(x) the study reports (nats per data point) is read against three models whose
maximum-likelihood fit and exact marginal likelihood are available in closed form (or to a
solver's tolerance), all fitted on the TRAIN split only:

``no_latent``
    x ~ N(m, diag v): the model with no latent variable. Its maximum-likelihood fit is the
    per-dimension sample mean and (biased, 1/N) sample variance, and
    log p(x) = Σ_d [−½ log 2π v_d − (x_d − m_d)² / (2 v_d)].
    A latent-variable model that does not beat it has learned nothing about correlations.
``factor_analysis``
    z ~ N(0, I_H), x | z ~ N(W z + b, diag ψ) ⇒ x ~ N(b, W Wᵀ + diag ψ) (e.g. Bishop, 2006,
    §12.2.4; Bartholomew, Knott & Moustaki, 2011). Fitted by EM on the sample covariance from
    the PPCA maximum until an iteration gains less than 1e-10 nats per point (the maximum
    within 1e-8 nat; scikit-learn's defaults stop up to 0.3 nat below it). It is the
    linear-Gaussian decoder of the study with free per-dimension noise, so its training
    log p(x) is the best a Gaussian decoder with a linear mean and H latent dimensions can reach.
``ppca``
    The same model with isotropic noise ψ = s² 1 (probabilistic PCA; Tipping & Bishop, 1999),
    whose maximum-likelihood fit is the eigen-decomposition of the sample covariance
    (:func:`vi.linear_gaussian.ppca_mle`).

For the two latent models log p(x) = log N(x; b, W Wᵀ + diag ψ) is computed by
:func:`vi.linear_gaussian.exact_log_marginal`. The models nest: the no-latent Gaussian is FA with
W = 0, and PPCA is FA with ψ constrained to be isotropic, so on the training split the maximised
log-likelihoods satisfy FA ≥ PPCA and FA ≥ no-latent (up to FA's solver tolerance).

Everything is computed in float64; the functions are pure (no state, no training loop) and
deterministic: the same inputs give bit-identical outputs.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.distributions import Normal

from vi.data import SPLITS, Dataset
from vi.linear_gaussian import exact_log_marginal, ppca_mle

__all__ = [
    "REFERENCE_MODELS",
    "REFERENCE_MODEL_DESCRIPTIONS",
    "ROW_KEYS",
    "factor_analysis",
    "fit_reference",
    "linear_gaussian_log_likelihood",
    "log_likelihood",
    "no_latent_gaussian",
    "no_latent_log_likelihood",
    "ppca",
    "reference_rows",
]

DTYPE = torch.float64

REFERENCE_MODELS: tuple[str, ...] = ("no_latent", "factor_analysis", "ppca")

REFERENCE_MODEL_DESCRIPTIONS: dict[str, str] = {
    "no_latent": "maximum-likelihood diagonal Gaussian N(m, diag v): no latent variable",
    "factor_analysis": "maximum-likelihood factor analysis N(b, W Wᵀ + diag ψ) "
    "(EM from the PPCA maximum to convergence)",
    "ppca": "maximum-likelihood probabilistic PCA N(b, W Wᵀ + s² I) (Tipping & Bishop, 1999)",
}

# The keys of every row of :func:`reference_rows`, in order.
ROW_KEYS: tuple[str, ...] = (
    "dataset",
    "data_seed",
    "model",
    "latent_dim",
    "split",
    "n_points",
    "log_px",
    "log_px_se",
)


def _as_data(x: Tensor | np.ndarray, what: str = "x") -> Tensor:
    """x as a float64 CPU tensor [N, D] (never modified in place here)."""
    x = torch.as_tensor(x).detach().to(device="cpu", dtype=DTYPE)
    if x.dim() != 2:
        raise ValueError(f"{what} must be a matrix [N, D]; got shape {tuple(x.shape)}")
    return x


def _check_latent_dim(latent_dim: int, d: int) -> int:
    if isinstance(latent_dim, bool) or int(latent_dim) != latent_dim:
        raise ValueError(f"latent_dim must be an integer; got {latent_dim!r}")
    if not 1 <= int(latent_dim) < d:
        raise ValueError(f"a latent model needs 1 <= latent_dim < D = {d}; got {latent_dim}")
    return int(latent_dim)


# ------------------------------------------------------------------------------------- fitting


def no_latent_gaussian(
    x_train: Tensor | np.ndarray, *, var_floor: float = 0.0
) -> tuple[Tensor, Tensor]:
    """Maximum-likelihood diagonal Gaussian N(m, diag v) of x_train [N, D], in float64.

    m_d = (1/N) Σ_n x_nd and v_d = max((1/N) Σ_n (x_nd − m_d)², var_floor): the closed-form
    maximiser of Σ_n log N(x_n; m, diag v) (the biased, 1/N variance).

    Args:
        x_train: training data [N, D], N ≥ 1.
        var_floor: lower bound on each variance. The default 0.0 leaves the maximum-likelihood
            fit unconstrained; a constant training column then gets v_d = 0 and an unbounded
            likelihood, which :func:`no_latent_log_likelihood` rejects — pass var_floor > 0 to
            regularise such data. (Dequantized pixels are never constant.)

    Returns:
        (mean [D], var [D]), float64.
    """
    x = _as_data(x_train, "x_train")
    if x.shape[0] < 1:
        raise ValueError("x_train has no rows")
    floor = float(var_floor)
    if not (math.isfinite(floor) and floor >= 0):
        raise ValueError(f"var_floor must be a finite number >= 0; got {var_floor!r}")
    mean = x.mean(0)
    var = (x - mean).pow(2).mean(0).clamp_min(floor)
    return mean, var


#: factor analysis stops when an EM iteration gains less than this (nats per training point)
FA_TOL = 1e-10
#: and after this many EM iterations at most (its fit records whether it converged)
FA_MAX_ITER = 100_000
#: sklearn's floor on ψ (``FactorAnalysis``'s SMALL)
_FA_PSI_FLOOR = 1e-12


def _fa_log_likelihood(S: Tensor, W: Tensor, psi: Tensor) -> Tensor:
    """Mean training log-likelihood of centred data with covariance S under N(0, W Wᵀ + diag ψ):
    −½ [D log 2π + log|C| + tr(C⁻¹ S)], by the determinant lemma and Woodbury (O(D² H))."""
    d, h = W.shape
    wp = W / psi.unsqueeze(1)                                   # Ψ⁻¹ W [D, H]
    m = torch.eye(h, dtype=W.dtype) + W.T @ wp                  # I + Wᵀ Ψ⁻¹ W
    chol = torch.linalg.cholesky(m)
    logdet = torch.log(psi).sum() + 2 * torch.log(torch.diagonal(chol)).sum()
    a = torch.cholesky_solve(wp.T @ S @ wp, chol)               # G Wᵀ Ψ⁻¹ S Ψ⁻¹ W
    trace = (torch.diagonal(S) / psi).sum() - torch.trace(a)
    return -0.5 * (d * math.log(2 * math.pi) + logdet + trace)


def factor_analysis(
    x_train: Tensor | np.ndarray, latent_dim: int, *, seed: int = 0, tol: float = FA_TOL,
    max_iter: int = FA_MAX_ITER,
) -> tuple[Tensor, Tensor, Tensor]:
    """Maximum-likelihood factor analysis with H = latent_dim factors, run to convergence.

    EM on the sample covariance S (Rubin & Thayer, 1982; Bishop, 2006, eqs. 12.66-12.70),
    started from the PPCA maximum (:func:`ppca`) and run until an iteration gains less than
    ``tol`` nats per point: with G = (I + Wᵀ Ψ⁻¹ W)⁻¹ and β = G Wᵀ Ψ⁻¹,

        W ← S βᵀ (G + β S βᵀ)⁻¹,   ψ ← diag(S − W β S)  (floored at 1e-12),

    each step O(D² H) and monotone in the likelihood. (scikit-learn's ``FactorAnalysis`` with
    its defaults, a randomized SVD and tolerance 1e-2, stops after a handful of iterations when
    a noisy step lowers the likelihood: up to 0.3 nat below this maximum on mnist5k.) Returns
    the parameters of x ~ N(b, W Wᵀ + diag ψ) in the layout of :mod:`vi.linear_gaussian`:
    W [D, H], b = the sample mean [D], ψ [D], float64; deterministic (``seed`` is unused and
    kept for callers that pass one).
    """
    x = _as_data(x_train, "x_train")
    h = _check_latent_dim(latent_dim, x.shape[1])
    W, b, psi = ppca(x, h)
    psi = psi.clone()
    xc = x - b
    S = xc.T @ xc / x.shape[0]
    eye = torch.eye(h, dtype=DTYPE)
    ll = _fa_log_likelihood(S, W, psi)
    for _ in range(int(max_iter)):
        wp = W / psi.unsqueeze(1)
        G = torch.linalg.inv(eye + W.T @ wp)
        beta = G @ wp.T                                          # [H, D]
        sb = S @ beta.T                                          # [D, H]
        W = torch.linalg.solve(G + beta @ sb, sb.T).T            # S βᵀ (G + β S βᵀ)⁻¹
        psi = (torch.diagonal(S) - (W * sb).sum(1)).clamp_min(_FA_PSI_FLOOR)
        new = _fa_log_likelihood(S, W, psi)
        if float(new - ll) < tol:
            break
        ll = new
    return W, b, psi


def ppca(x_train: Tensor | np.ndarray, latent_dim: int) -> tuple[Tensor, Tensor, Tensor]:
    """Maximum-likelihood probabilistic PCA (Tipping & Bishop, 1999, eq. 7–8), in float64.

    :func:`vi.linear_gaussian.ppca_mle` on x_train [N, D]: b = sample mean; with the (1/N)
    sample covariance S = U Λ Uᵀ, s² = mean of the D − H smallest eigenvalues and
    W = U_H (Λ_H − s² I)^{1/2}. Returns (W [D, H], b [D], ψ [D]) with ψ = s² 1_D, so that the
    result has the layout of :func:`factor_analysis`.
    """
    x = _as_data(x_train, "x_train")
    h = _check_latent_dim(latent_dim, x.shape[1])
    W, b, s2 = ppca_mle(x, h)
    return W, b, s2.expand(x.shape[1]).clone()


def fit_reference(
    model: str, x_train: Tensor | np.ndarray, latent_dim: int | None = None, *, seed: int = 0
) -> tuple[Tensor, ...]:
    """The parameters of reference ``model`` (one of ``REFERENCE_MODELS``) fitted on x_train.

    ``no_latent`` ignores ``latent_dim`` and returns (mean, var); the latent models need it and
    return (W, b, ψ). ``seed`` is passed to :func:`factor_analysis` only.
    """
    if model == "no_latent":
        return no_latent_gaussian(x_train)
    if latent_dim is None:
        raise ValueError(f"reference model {model!r} needs a latent_dim")
    if model == "factor_analysis":
        return factor_analysis(x_train, latent_dim, seed=seed)
    if model == "ppca":
        return ppca(x_train, latent_dim)
    raise ValueError(f"unknown reference model {model!r}; valid: {', '.join(REFERENCE_MODELS)}")


# ------------------------------------------------------------------------------ log-likelihood


def no_latent_log_likelihood(x: Tensor | np.ndarray, mean: Tensor, var: Tensor) -> Tensor:
    """log N(x; m, diag v) = Σ_d log N(x_d; m_d, v_d) per point, in nats: x [N, D] → [N] float64.

    Summed from ``torch.distributions.Normal(m, √v).log_prob``. Every v_d must be positive.
    """
    x = _as_data(x)
    mean = torch.as_tensor(mean, dtype=DTYPE)
    var = torch.as_tensor(var, dtype=DTYPE)
    if mean.shape != (x.shape[1],) or var.shape != (x.shape[1],):
        raise ValueError(
            f"expected mean and var of shape [{x.shape[1]}]; got {tuple(mean.shape)}, "
            f"{tuple(var.shape)}"
        )
    if not bool((var > 0).all()):
        raise ValueError(
            "every variance must be positive (a constant training column has maximum-likelihood "
            "variance 0: fit with var_floor > 0)"
        )
    return Normal(mean, var.sqrt()).log_prob(x).sum(-1)


def linear_gaussian_log_likelihood(
    x: Tensor | np.ndarray, W: Tensor, b: Tensor, psi: Tensor
) -> Tensor:
    """log N(x; b, W Wᵀ + diag ψ) per point, in nats: x [N, D] → [N] float64.

    :func:`vi.linear_gaussian.exact_log_marginal` in float64 (factor analysis and PPCA).
    """
    x = _as_data(x)
    W, b, psi = (torch.as_tensor(t, dtype=DTYPE) for t in (W, b, psi))
    return exact_log_marginal(x, W, b, psi)


def log_likelihood(x: Tensor | np.ndarray, model_params: Sequence[Tensor]) -> Tensor:
    """Exact per-point log p(x) in nats of a fitted reference: x [N, D] → [N] float64.

    ``model_params`` is what a fitting function returned: (mean, var) of
    :func:`no_latent_gaussian` → :func:`no_latent_log_likelihood`; (W, b, ψ) of
    :func:`factor_analysis` or :func:`ppca` → :func:`linear_gaussian_log_likelihood`.
    """
    params = tuple(model_params)
    if len(params) == 2:
        return no_latent_log_likelihood(x, *params)
    if len(params) == 3:
        return linear_gaussian_log_likelihood(x, *params)
    raise ValueError(
        f"model_params must be (mean, var) or (W, b, psi); got a sequence of {len(params)}"
    )


# ------------------------------------------------------------------------------------------ rows


def _summary(log_px: Tensor) -> tuple[float, float]:
    """Mean and its standard error s / √n (s: sample standard deviation, n − 1 denominator;
    NaN for a single point)."""
    n = log_px.shape[0]
    mean = float(log_px.mean())
    se = float(log_px.std(unbiased=True) / math.sqrt(n)) if n > 1 else float("nan")
    return mean, se


def reference_rows(
    dataset: Dataset,
    latent_dims: Iterable[int],
    *,
    splits: Sequence[str] = SPLITS,
    models: Sequence[str] = REFERENCE_MODELS,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """One row per (model, latent_dim, split): each reference fitted on ``dataset.train`` only.

    For every model in ``models`` (order kept), every latent dimension H in ``latent_dims``
    (order kept, duplicates dropped) and every non-empty split in ``splits``, a dict with keys
    ``ROW_KEYS``:

    ``dataset`` (``dataset.name``), ``data_seed`` (``dataset.info.get("seed")``), ``model``,
    ``latent_dim`` (None for ``no_latent``, which does not depend on H and is emitted once),
    ``split``, ``n_points``, ``log_px`` (mean exact log p(x) over the split, nats per point) and
    ``log_px_se`` (its standard error s / √n, s the sample standard deviation; NaN when n = 1).

    Latent dimensions H ≥ D give no row for ``factor_analysis`` and ``ppca`` (the models are
    then no longer low-rank); H < 1 is an error. ``seed`` seeds :func:`factor_analysis`.
    Deterministic: the same dataset gives identical rows.
    """
    unknown = [m for m in models if m not in REFERENCE_MODELS]
    if unknown:
        raise ValueError(
            f"unknown reference model(s) {unknown}; valid: {', '.join(REFERENCE_MODELS)}"
        )
    bad_splits = [s for s in splits if s not in SPLITS]
    if bad_splits:
        raise ValueError(f"unknown split(s) {bad_splits}; valid: {', '.join(SPLITS)}")
    dims: list[int] = []
    for h in latent_dims:
        if isinstance(h, bool) or int(h) != h or h < 1:
            raise ValueError(f"latent dimensions must be integers >= 1; got {h!r}")
        if int(h) not in dims:
            dims.append(int(h))

    x_train = _as_data(dataset.train, "dataset.train")
    d = x_train.shape[1]
    data = {s: _as_data(dataset.split(s), s) for s in dict.fromkeys(splits)}
    base = {"dataset": dataset.name, "data_seed": dataset.info.get("seed")}

    rows: list[dict[str, Any]] = []
    for model in dict.fromkeys(models):
        settings: list[int | None] = [None] if model == "no_latent" else [h for h in dims if h < d]
        for h in settings:
            params = fit_reference(model, x_train, h, seed=seed)
            for split, x in data.items():
                if x.shape[0] == 0:
                    continue
                log_px, log_px_se = _summary(log_likelihood(x, params))
                row = {
                    **base,
                    "model": model,
                    "latent_dim": h,
                    "split": split,
                    "n_points": int(x.shape[0]),
                    "log_px": log_px,
                    "log_px_se": log_px_se,
                }
                rows.append({k: row[k] for k in ROW_KEYS})
    return rows
