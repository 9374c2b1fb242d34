"""Evaluation of a trained decoder: log p(x), the inference gaps, test-time inference (SPEC §5).

An ELBO alone mixes two losses: the variational family's (no diagonal Gaussian is the true
posterior) and the inference method's (the encoder, or the refinement, does not find the best
member of the family). Cremer, Li & Duvenaud (2018) separate them per data point:

    log p(x) − L[q_φ] = (log p(x) − L[q*])  +  (L[q*] − L[q_φ])
                      =  approximation gap  +  amortization gap

q_φ is the method's own posterior (``InferenceMethod.infer``: encoder output, refined encoder
output, or vem's table rows for training points and rows fitted by E-steps for held-out ones);
q* is the best diagonal Gaussian for the point, fitted by Adam with the decoder frozen
(``fit_optimal_posterior``). log p(x) is the IWAE bound with proposal q* (Burda et al., 2016)
and, for linear decoders, exact (``vi.linear_gaussian.exact_log_marginal``), in which case the
exact value is the one the approximation gap uses. ELBOs are exact for linear decoders
(``vi.linear_gaussian.elbo_closed_form``) and otherwise analytic-KL Monte Carlo estimates with
``gap_n_mc`` samples, reported with their standard errors in the per-point frame.

Metric rows (SPEC §7 schema, one measurement a row; values are means over the split's points):

====================  =====================================================================
``iwae``              IWAE_k(x) with proposal q*, k = ``config.iwae_k``
``log_px_exact``      exact log p(x) (linear decoders only)
``elbo_qstar``        L[q*]
``elbo_qphi``         L[q_φ], the method's own posterior, evaluated like L[q*]
``approximation_gap`` log p(x) − L[q*] (log p(x) exact when available, else ``iwae``)
``amortization_gap``  L[q*] − L[q_φ]
``qstar_steps``       Adam steps the q* fit took (window-and-patience rule)
``test_curve_elbo``   held-out ELBO after ``step`` E-steps (the ``step`` column holds the E-step
                      count, not the training step); ``param_group`` names the initialisation
                      (``prior``: λ = 0, vem's fixed start; ``encoder``: f_φ(x), amortized and
                      semi-amortized); ``wall_s`` is wall-clock seconds *per test point* for the
                      E-steps (3 significant digits). Step 0 from ``encoder`` is the one-pass
                      amortized ELBO.
====================  =====================================================================

Gap rows carry in ``wall_s`` the seconds the split's decomposition took. Per-point values (with
Monte Carlo standard errors) come back as a frame, one row per data point
(``GapDecomposition.per_point``; ``final_rows`` leaves it in ``trainer.tables["gaps"]``).

All randomness comes from one evaluation generator derived from the run's seed (child 4 of its
``SeedSequence``; training uses children 0–3), so evaluating a saved model again with the same
seed gives the same numbers, and never perturbs the training streams.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from vi import linear_gaussian
from vi.decoders import GaussianDecoder
from vi.estimators import draw_noise
from vi.inference import Divergence, InferenceMethod, MethodSettings, StoppingRule, fit_local
from vi.objectives import elbo, log_weights

__all__ = [
    "CURVE_INITS",
    "ELBOValue",
    "Evaluation",
    "GapDecomposition",
    "LogMarginal",
    "elbo_value",
    "evaluate_checkpoint",
    "evaluation_generator",
    "final_rows",
    "fit_optimal_posterior",
    "gap_decomposition",
    "log_marginal",
    "test_time_curve",
]

CURVE_INITS = ("prior", "encoder")
_EVAL_STREAM = 4  # SeedSequence child index of the evaluation stream (training uses 0–3)


# ------------------------------------------------------------------------------- utilities


@contextlib.contextmanager
def _frozen(module: torch.nn.Module):
    """The module's parameters do not require grad inside (θ fixed during E-steps)."""
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def _chunks(n: int, size: int | None):
    size = n if size is None else max(1, int(size))
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def evaluation_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The evaluation stream of ``seed``: independent of training's four streams."""
    child = np.random.SeedSequence(int(seed)).spawn(_EVAL_STREAM + 1)[_EVAL_STREAM]
    return torch.Generator(device).manual_seed(int(child.generate_state(1)[0]))


def _is_linear(decoder: GaussianDecoder) -> bool:
    return decoder.mean_kind == "linear"


# ------------------------------------------------------------------------------------ q*


def fit_optimal_posterior(
    decoder: GaussianDecoder,
    x: Tensor,
    *,
    init: Tensor,
    n_mc: int = 10,
    lr: float = 1e-2,
    rule: StoppingRule | None = None,
    generator: torch.Generator | None = None,
    estimator: str = "reparam",
    point_chunk: int | None = None,
) -> tuple[Tensor, Tensor]:
    """q* = argmax_λ L(λ; x) per data point, θ frozen (Cremer et al., 2018, §5).

    Per-row Adam on λ from ``init`` with the ``estimator`` gradient of the analytic-KL ELBO
    (M = ``n_mc`` samples a step), batched over points; the loop is ``vi.inference.fit_local``
    run for a bare ``InferenceMethod`` with these settings. The window-and-patience rule
    (default: window 100, patience 10, cap 5000, after Cremer et al.) acts on the mean ELBO
    of a chunk of ``point_chunk`` points (all at once by default), so a chunk stops only when
    its points, together, stop improving.

    Returns:
        (λ* [B, 2H] detached, steps [B]: the steps the point's chunk took).
    """
    rule = rule or StoppingRule(window=100, patience=10, max_steps=5000)
    if init.shape != (x.shape[0], 2 * decoder.latent_dim):
        raise ValueError(
            f"init must be [B, 2H] = [{x.shape[0]}, {2 * decoder.latent_dim}]; "
            f"got {tuple(init.shape)}"
        )
    settings = MethodSettings(estimator=estimator, baseline="none", kl="analytic",
                              n_mc=int(n_mc), local_optimizer="adam", local_lr=float(lr))
    method = InferenceMethod(decoder, settings)
    lams, steps = [], []
    with _frozen(decoder):
        for sl in _chunks(x.shape[0], point_chunk):
            lam, n_steps, _ = fit_local(method, x[sl], init[sl], rule=rule, generator=generator)
            lams.append(lam.detach())
            steps.append(torch.full((lam.shape[0],), n_steps, dtype=torch.long))
    return torch.cat(lams), torch.cat(steps)


# ------------------------------------------------------------------------------ log p(x)


@dataclass
class LogMarginal:
    """Per-point log p(x) estimates [B].

    ``iwae``: IWAE_k = log (1/k) Σ_i w_i, w_i = p(x, z_i) / q(z_i), z_i ~ q (Burda et al., 2016).
    ``iwae_se``: delta-method standard error √((1/ESS − 1/k)), a diagnostic (heavy-tailed
    weights make it optimistic). ``ess``: effective sample size (Σ w)² / Σ w².
    ``exact``: log N(x; b, W Wᵀ + Ψ) for linear decoders, else ``None``.
    """

    iwae: Tensor
    iwae_se: Tensor
    ess: Tensor
    exact: Tensor | None
    k: int


@torch.no_grad()
def log_marginal(
    decoder: GaussianDecoder,
    x: Tensor,
    proposal_lam: Tensor,
    k: int = 1000,
    *,
    generator: torch.Generator | None = None,
    chunk_size: int = 256,
    point_chunk: int | None = 256,
) -> LogMarginal:
    """log p(x) per point: IWAE_k with proposal q(λ) (use q*, the best one available), in chunks
    of ``chunk_size`` samples and ``point_chunk`` points (memory O(chunk_size · point_chunk · D)),
    combined by ``logsumexp``; plus exact log p(x) for linear decoders (SPEC §5).

    With ``point_chunk`` ≥ B the noise stream is that of ``vi.objectives.iwae_bound``.
    """
    k, chunk_size = int(k), int(chunk_size)
    if k < 1 or chunk_size < 1:
        raise ValueError(f"k and chunk_size must be positive; got k={k}, chunk_size={chunk_size}")
    h = decoder.latent_dim
    lse1, lse2 = [], []
    for sl in _chunks(x.shape[0], point_chunk):
        xs, ls = x[sl], proposal_lam[sl]
        s1, s2 = [], []
        for start in range(0, k, chunk_size):
            n = min(chunk_size, k - start)
            eps = draw_noise(n, ls.shape[:-1], h, generator=generator, device=ls.device,
                             dtype=ls.dtype)
            lw = log_weights(decoder, xs, ls, eps).double()
            s1.append(torch.logsumexp(lw, 0))
            s2.append(torch.logsumexp(2 * lw, 0))
        lse1.append(torch.logsumexp(torch.stack(s1), 0))
        lse2.append(torch.logsumexp(torch.stack(s2), 0))
    l1, l2 = torch.cat(lse1), torch.cat(lse2)
    ess = torch.exp(2 * l1 - l2)
    se = torch.sqrt((1 / ess - 1 / k).clamp_min(0.0))
    exact = None
    if _is_linear(decoder):
        W, b, psi = decoder.linear_parameters()
        exact = linear_gaussian.exact_log_marginal(x.double(), W.double(), b.double(),
                                                   psi.double())
    dtype = proposal_lam.dtype
    return LogMarginal((l1 - math.log(k)).to(dtype), se.to(dtype), ess.to(dtype),
                       None if exact is None else exact.to(dtype), k)


@dataclass
class ELBOValue:
    """Per-point ELBO [B] and its Monte Carlo standard error (0 when ``exact``)."""

    value: Tensor
    se: Tensor
    exact: bool


@torch.no_grad()
def elbo_value(
    decoder: GaussianDecoder,
    x: Tensor,
    lam: Tensor,
    *,
    n_mc: int = 1000,
    generator: torch.Generator | None = None,
    chunk_size: int = 256,
    point_chunk: int | None = 256,
    closed_form: bool = True,
) -> ELBOValue:
    """L(λ; x) per point for reporting: closed form for linear decoders (exact,
    ``vi.linear_gaussian.elbo_closed_form``); otherwise E_q[log p(x | z)] − KL(q ‖ p) with the KL
    in closed form and the expectation averaged over ``n_mc`` samples (in chunks), with
    SE = sd / √n_mc. ``closed_form=False`` forces the Monte Carlo path (to check it)."""
    if closed_form and _is_linear(decoder):
        W, b, psi = decoder.linear_parameters()
        value = linear_gaussian.elbo_closed_form(x.double(), lam.double(), W.double(),
                                                 b.double(), psi.double()).to(lam.dtype)
        return ELBOValue(value, torch.zeros_like(value), True)
    n_mc, h = int(n_mc), decoder.latent_dim
    means, ses = [], []
    for sl in _chunks(x.shape[0], point_chunk):
        xs, ls = x[sl], lam[sl]
        total = torch.zeros(ls.shape[0], dtype=torch.float64, device=ls.device)
        total_sq = torch.zeros_like(total)
        for start in range(0, n_mc, int(chunk_size)):
            n = min(int(chunk_size), n_mc - start)
            eps = draw_noise(n, ls.shape[:-1], h, generator=generator, device=ls.device,
                             dtype=ls.dtype)
            samples = elbo(decoder, xs, ls, eps, kl="analytic").samples.double()
            total += samples.sum(0)
            total_sq += samples.pow(2).sum(0)
        mean = total / n_mc
        var = ((total_sq - n_mc * mean**2) / max(n_mc - 1, 1)).clamp_min(0.0)
        means.append(mean)
        ses.append(torch.sqrt(var / n_mc))
    return ELBOValue(torch.cat(means).to(lam.dtype), torch.cat(ses).to(lam.dtype), False)


# ---------------------------------------------------------------------------- trainer side


def _points(trainer, split: str, points: int | None) -> tuple[Tensor, Tensor]:
    x = trainer.x[split]
    n = x.shape[0] if points is None else min(int(points), x.shape[0])
    return x[:n], torch.arange(n, device=x.device)


def _own_posterior(method: InferenceMethod, split: str, x: Tensor, idx: Tensor, generator):
    """q_φ: ``infer`` with the training rows' indices for ``train``, fitted otherwise."""
    return method.infer(x, idx if split == "train" else None, generator=generator)


def _generator(trainer, generator):
    if generator is not None:
        return generator
    return evaluation_generator(trainer.config.seed, trainer.device)


@dataclass
class GapDecomposition:
    """The split's metric rows (means) and its per-point frame (one row per data point)."""

    rows: list[dict]
    per_point: pd.DataFrame


def gap_decomposition(
    trainer, split: str, *, points: int | None = None, generator: torch.Generator | None = None
) -> GapDecomposition:
    """log p(x), L[q*], L[q_φ] and the two gaps (Cremer et al., 2018; SPEC §5) for a split.

    Settings come from ``trainer.config``: q* by ``fit_optimal_posterior`` from
    ``qstar_init`` (``posterior``: q_φ, so the fit starts where the method stopped; ``prior``:
    λ = 0) with ``qstar_n_mc``, ``qstar_lr`` and the rule (``qstar_window``,
    ``qstar_patience``, ``qstar_max_steps``); IWAE with ``iwae_k`` samples in chunks of
    ``iwae_chunk``; ELBOs with ``gap_n_mc`` samples (exact for linear decoders); the first
    ``points`` (default ``gap_points``, None = all) points of the split.
    """
    c = trainer.config
    g = _generator(trainer, generator)
    decoder = trainer.decoder
    x, idx = _points(trainer, split, c.gap_points if points is None else points)
    start = time.perf_counter()
    lam_phi = _own_posterior(trainer.method, split, x, idx, g).detach()
    init = lam_phi if c.qstar_init == "posterior" else torch.zeros_like(lam_phi)
    rule = StoppingRule(c.qstar_window, c.qstar_patience, c.qstar_max_steps)
    lam_star, steps = fit_optimal_posterior(decoder, x, init=init, n_mc=c.qstar_n_mc,
                                            lr=c.qstar_lr, rule=rule, generator=g)
    lpx = log_marginal(decoder, x, lam_star, c.iwae_k, generator=g, chunk_size=c.iwae_chunk)
    l_star = elbo_value(decoder, x, lam_star, n_mc=c.gap_n_mc, generator=g)
    l_phi = elbo_value(decoder, x, lam_phi, n_mc=c.gap_n_mc, generator=g)
    wall = time.perf_counter() - start

    if lpx.exact is not None:
        best, best_se = lpx.exact, torch.zeros_like(lpx.exact)
    else:
        best, best_se = lpx.iwae, lpx.iwae_se
    approx, amort = best - l_star.value, l_star.value - l_phi.value
    frame = pd.DataFrame({
        **{k: v for k, v in trainer.identity.items()},
        "epoch": trainer.epoch, "split": split, "point": idx.cpu().numpy(),
        "log_px_iwae": lpx.iwae.cpu().numpy(), "log_px_iwae_se": lpx.iwae_se.cpu().numpy(),
        "iwae_k": lpx.k, "iwae_ess": lpx.ess.cpu().numpy(),
        "log_px_exact": (np.full(x.shape[0], np.nan) if lpx.exact is None
                         else lpx.exact.cpu().numpy()),
        "elbo_qstar": l_star.value.cpu().numpy(), "elbo_qstar_se": l_star.se.cpu().numpy(),
        "elbo_qphi": l_phi.value.cpu().numpy(), "elbo_qphi_se": l_phi.se.cpu().numpy(),
        "approximation_gap": approx.cpu().numpy(),
        "approximation_gap_se": torch.sqrt(best_se**2 + l_star.se**2).cpu().numpy(),
        "amortization_gap": amort.cpu().numpy(),
        "amortization_gap_se": torch.sqrt(l_star.se**2 + l_phi.se**2).cpu().numpy(),
        "qstar_steps": steps.cpu().numpy(),
    })
    means = [("iwae", lpx.iwae), ("log_px_exact", lpx.exact), ("elbo_qstar", l_star.value),
             ("elbo_qphi", l_phi.value), ("approximation_gap", approx),
             ("amortization_gap", amort), ("qstar_steps", steps.double())]
    rows = [trainer.row(split, name, float(v.double().mean()), wall_s=wall)
            for name, v in means if v is not None]
    return GapDecomposition(rows, frame)


def test_time_curve(
    trainer,
    steps: list[int] | tuple[int, ...] | None = None,
    *,
    split: str = "test",
    points: int | None = None,
    generator: torch.Generator | None = None,
) -> list[dict]:
    """Held-out ELBO after s E-steps, for s in ``steps`` (default ``config.test_curve_steps``),
    θ fixed, from λ = 0 (``prior``: vem's fixed initialisation) and, for methods with an
    encoder, from f_φ(x) (``encoder``; s = 0 is the one-pass amortized ELBO) (SPEC §5).

    An E-step is the method's own held-out E-step: ``vi.inference.fit_local`` with the method's
    estimator, M, local optimiser and ``local_lr`` (the same update for every start, so curves
    are comparable; semi-amortized training refines with plain SGD at ``refine_lr`` instead).
    Each s is a separate run from the start, timed on its own: ``wall_s`` = seconds per point.
    ELBOs as in ``elbo_value`` (``test_curve_n_mc`` samples, exact for linear decoders).
    """
    c = trainer.config
    g = _generator(trainer, generator)
    method, decoder = trainer.method, trainer.decoder
    steps = sorted({int(s) for s in (c.test_curve_steps if steps is None else steps)})
    if not steps or steps[0] < 0:
        raise ValueError(f"steps must be counts >= 0; got {steps}")
    x, _ = _points(trainer, split, c.gap_points if points is None else points)
    n = x.shape[0]
    inits = ["prior"] + (["encoder"] if hasattr(method, "encoder") else [])
    rows = []
    for init in inits:
        t0 = time.perf_counter()
        if init == "encoder":
            with torch.no_grad():
                lam0 = method.encoder(x)
        else:
            lam0 = x.new_zeros(n, 2 * decoder.latent_dim)
        t_init = time.perf_counter() - t0
        for s in steps:
            t0 = time.perf_counter()
            if s == 0:
                lam = lam0
            else:
                with _frozen(decoder):
                    lam, _, _ = fit_local(method, x, lam0, generator=g,
                                          rule=StoppingRule(window=s, patience=1, max_steps=s))
            per_point = (t_init + time.perf_counter() - t0) / n
            value = elbo_value(decoder, x, lam.detach(), n_mc=c.test_curve_n_mc,
                               generator=g).value
            row = trainer.row(split, "test_curve_elbo", float(value.double().mean()),
                              param_group=init, step=s)
            row["wall_s"] = float(f"{per_point:.3g}")
            rows.append(row)
    return rows


def final_rows(trainer, *, seed: int | None = None) -> list[dict]:
    """The end-of-run evaluation ``Trainer.measurements`` asks for: the gap decomposition of
    ``train`` and ``test`` (``config.gaps``; per-point frame in ``trainer.tables["gaps"]``) and
    the test-time curve (``config.test_curve``), all from one evaluation generator (of
    ``seed``, default the run's).

    A divergence inside the evaluation (e.g. q* fitted with too large a step) drops that part
    with a warning instead of marking the trained run diverged.
    """
    c = trainer.config
    g = evaluation_generator(c.seed if seed is None else seed, trainer.device)
    rows: list[dict] = []
    frames = []
    if c.gaps:
        for split in ("train", "test"):
            if trainer.x[split].shape[0] == 0:
                continue
            try:
                result = gap_decomposition(trainer, split, generator=g)
            except Divergence as err:
                warnings.warn(f"gap decomposition on {split} diverged: {err}", stacklevel=2)
                continue
            rows += result.rows
            frames.append(result.per_point)
        if frames:
            trainer.tables["gaps"] = pd.concat(frames, ignore_index=True)
    if c.test_curve and trainer.x["test"].shape[0] > 0:
        try:
            rows += test_time_curve(trainer, generator=g)
        except Divergence as err:
            warnings.warn(f"test-time curve diverged: {err}", stacklevel=2)
    return rows


@dataclass
class Evaluation:
    """``evaluate_checkpoint``'s result: metric rows and the per-point gap frame (or None)."""

    rows: list[dict]
    per_point: pd.DataFrame | None


def evaluate_checkpoint(
    path: str | os.PathLike,
    *,
    gaps: bool = True,
    test_curve: bool = True,
    iwae_k: int | None = None,
    seed: int | None = None,
    dataset=None,
    device: str | None = None,
    **overrides,
) -> Evaluation:
    """Evaluate a model saved by ``vi.training.save_checkpoint`` without retraining.

    Evaluation settings (``iwae_k``, and any ``qstar_*``, ``gap_*``, ``iwae_chunk``,
    ``test_curve_steps`` given in ``overrides``) replace the saved ones; the model is not
    touched. ``seed`` (default: the run's) seeds the evaluation stream, so the same seed gives
    the same numbers, and the run's own seed reproduces the rows its training ended with.
    """
    from vi.training import TrainConfig, load_checkpoint

    trainer = load_checkpoint(path, dataset=dataset, device=device)
    allowed = {f.name for f in dataclasses.fields(TrainConfig)
               if f.name.startswith(("qstar_", "gap_", "iwae_", "test_curve_"))}
    bad = sorted(set(overrides) - allowed)
    if bad:
        raise ValueError(f"not an evaluation setting: {', '.join(bad)}; valid: "
                         f"{', '.join(sorted(allowed))}")
    changes = dict(overrides, gaps=gaps, test_curve=test_curve)
    if iwae_k is not None:
        changes["iwae_k"] = iwae_k
    trainer.config = TrainConfig.from_dict({**trainer.config.to_dict(), **changes})
    rows = final_rows(trainer, seed=seed)
    return Evaluation(rows, trainer.tables.get("gaps"))


test_time_curve.__test__ = False  # a "test_" name, not a test: keep pytest from collecting it
