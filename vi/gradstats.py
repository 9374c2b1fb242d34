"""Gradient-variance instrumentation: per-draw gradients, their variance and SNR (SPEC §6).

At a fixed model state and a fixed minibatch, K independent single-estimate gradients
g_1..g_K (each from its own M-sample noise ε_k ~ N(0, I), shape [M, B, H]) are computed for
each parameter group, and summarised (``gradient_statistics``) by

    ĝ = (1/K) Σ_k g_k,   v_i = (1/(K−1)) Σ_k (g_ki − ĝ_i)²,   tr Σ = Σ_i v_i,
    relative variance tr Σ / ‖ĝ‖²,   SNR_i = |ĝ_i| / √v_i   (Rainforth et al., 2018).

Parameter groups (the gradient of the ELBO, the ascent direction; variances do not care):

``variational``  ∇_λ Σ_n L_n for the minibatch's λ [B, 2H], flattened to B·2H coordinates:
                 each λ_n gets its own ∇_{λ_n} L_n. For ``vem`` λ are the table rows; for the
                 encoder methods, λ = f_φ(x) (λ⁽⁰⁾ for ``semi_amortized``), so this group is
                 comparable across methods.
``local``        ``vem`` only: the rows as parameters (the same numbers as ``variational``).
``encoder``      ∇_φ (1/B) Σ_n L_n(f_φ(x_n)) (``amortized`` / ``semi_amortized``).
``decoder``      ∇_θ (1/B) Σ_n L_n at λ: the rows (``vem``), the encoder output (``amortized``)
                 or the refined λ⁽ᴷ⁾ (``semi_amortized``, refined once with ``generator``).

These follow each method's ``train_step``: the sum over the minibatch for λ, the mean for
θ and φ, the method's estimator, baseline, KL mode and M. The ``mean`` baseline is the method's
current running mean, held constant (nothing of the method is mutated: no state, no optimiser,
no ``.grad``, no generator other than the one passed in).

How the K draws are batched (no Python loop over draws; chunks over K bound memory):

* ``variational`` / ``local``: one forward and one backward pass over K independent copies of
  the minibatch's λ ([K·B, 2H], noise [M, K·B, H]). Copy (k, n) only touches its own loss term
  (baselines act within a point's M samples), so the gradient of the summed surrogate w.r.t.
  the copies *is* the K per-draw gradients.
* ``encoder``: the chain rule ∇_φ = J_φᵀ ∇_λ / B (exact when φ reaches the ELBO only through
  λ = f_φ(x)), applied to the K ``variational`` gradients at once by ``vmap`` over the encoder's
  ``torch.func.vjp``: the decoder is never differentiated again.
* ``decoder``: ``vmap(grad(...))`` over the noise with ``functional_call`` (θ is shared by the
  draws, so its per-draw gradients are batched matrix products [k, out, M·B] @ [k, M·B, in]).

What limits the batched paths (``benchmarks/gradvar.py``, digits model, 1 CPU thread): not
vmap. At a chunk of 64 draws the single backward over copies, a vmapped forward with one
backward, and plain ``vmap(grad)`` all run within ~15% of each other, at the arithmetic floor of
the K·M·B-row decoder forward and backward (tanh over K·M·B x 256 and the two 256-wide GEMMs
are ~60% of a profile). A loop does the same arithmetic plus ~1 ms of Python and dispatch per
draw, so loop/batched ≈ (overhead + compute) / compute: ~4-6x at B = 64, >10x at B = 16.
Chunks are therefore sized to keep activations cache-sized on CPU (``CACHE_BUDGET``): one chunk
of 256 draws measured 20-40% slower than chunks of 32-64.

``per_sample_grads_loop`` is the reference: the same numbers from a Python loop of ordinary
autograd calls, one per draw (tests and ``benchmarks/gradvar.py``).

Caveat: with ``refine_through=True`` a semi-amortized encoder is trained through the refinement;
the ``variational`` and ``encoder`` groups here are still measured at λ⁽⁰⁾ without that path.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vjp, vmap

from vi.estimators import validate_estimator
from vi.inference import Divergence, InferenceMethod, MethodSettings, replace_settings
from vi.objectives import elbo

__all__ = [
    "DEFAULT_SWEEP_ESTIMATORS",
    "GROUPS",
    "METRICS",
    "evaluation_batch",
    "gradient_statistics",
    "groups_of",
    "per_sample_grads",
    "per_sample_grads_loop",
    "scheduled",
    "training_rows",
    "variance_sweep",
]

GROUPS = ("variational", "local", "encoder", "decoder")
METRICS = ("grad_var_total", "grad_var_relative", "grad_snr_mean", "grad_snr_median",
           "grad_mean_norm")
DEFAULT_SWEEP_ESTIMATORS = (
    ("reparam", "none"), ("stl", "none"), ("score", "none"), ("score", "mean"),
    ("score", "loo"), ("score", "cv"),
)
#: auto chunking on CPU: a chunk's widest activation (draws x M x B x width) stays about
#: cache-sized, which measured 20-40% faster than one chunk of 256 draws on the digits model
CACHE_BUDGET = 2**20
#: auto chunking everywhere: a chunk's per-draw gradient block (draws x P) stays below this
MEMORY_BUDGET = 2**25
#: child index of SeedSequence(config.seed) for the fixed evaluation minibatch (the trainer's
#: four streams are children 0..3)
_BATCH_STREAM = 4
#: a coordinate whose standard deviation is below this many ulps of its largest |g| is treated
#: as deterministic (its variance is rounding noise) and left out of the SNR
_ZERO_VAR_ULPS = 16


# -- parameter groups and the objective ----------------------------------------------------------
def groups_of(method: InferenceMethod) -> tuple[str, ...]:
    """The parameter groups a method has: vem → variational, local, decoder; else encoder."""
    if hasattr(method, "encoder"):
        return ("variational", "encoder", "decoder")
    return ("variational", "local", "decoder")


class _DecoderObjective(nn.Module):
    """(1/B) Σ_n surrogate_n at fixed λ: a module so ``functional_call`` can swap θ."""

    def __init__(self, decoder: nn.Module, settings: MethodSettings, baseline_value) -> None:
        super().__init__()
        self.decoder = decoder
        self.settings, self.baseline_value = settings, baseline_value

    def forward(self, x: Tensor, lam: Tensor, eps: Tensor) -> Tensor:
        s = self.settings
        return elbo(self.decoder, x, lam, eps, estimator=s.estimator, baseline=s.baseline,
                    kl=s.kl, baseline_value=self.baseline_value).surrogate.mean()


def _settings(method: InferenceMethod, settings: MethodSettings | None, n_mc) -> MethodSettings:
    s = settings if settings is not None else method.settings
    if n_mc is not None and int(n_mc) != s.n_mc:
        s = replace_settings(s, n_mc=int(n_mc))
    validate_estimator(s.estimator, s.baseline, s.n_mc)
    return s


def _baseline_value(method: InferenceMethod, s: MethodSettings, baseline_value):
    if s.baseline != "mean":
        return None
    return float(method.running_mean.value if baseline_value is None else baseline_value)


def _wanted(method: InferenceMethod, groups: Iterable[str] | None) -> tuple[str, ...]:
    have = groups_of(method)
    if groups is None:
        return have
    groups = tuple(groups)
    bad = [g for g in groups if g not in have]
    if bad:
        raise ValueError(f"{method.name} has no parameter group(s) {bad}; valid: {have}")
    return groups


@torch.no_grad()
def _lambda0(method: InferenceMethod, x: Tensor, idx: Tensor | None) -> Tensor:
    """The minibatch's λ: vem table rows, or the encoder output λ⁽⁰⁾ = f_φ(x)."""
    if hasattr(method, "encoder"):
        return method.encoder(x)
    if idx is None:
        raise ValueError("vem needs the minibatch's row indices idx")
    return method.local[idx].clone()


def _refined(method: InferenceMethod, x: Tensor, lam0: Tensor, generator) -> Tensor:
    """λ⁽ᴷ⁾ by the method's own refinement (its estimator and M), as in ``train_step``."""
    s = method.settings
    with torch.enable_grad():
        lam = method.local_ascent(x, lam0.detach(), generator, s.refine_steps, s.refine_lr)
    return lam.detach()


def _chunk(method: InferenceMethod, x: Tensor, n_mc: int, chunk_size: int | None) -> int:
    """Draws per chunk: explicit, or the most that keep the widest activation within
    ``CACHE_BUDGET`` (CPU only) and the per-draw gradients within ``MEMORY_BUDGET``."""
    if chunk_size is not None:
        if int(chunk_size) < 1:
            raise ValueError(f"chunk_size must be positive; got {chunk_size}")
        return int(chunk_size)
    width = max([x.shape[-1]] + [max(m.in_features, m.out_features)
                                  for m in method.modules() if isinstance(m, nn.Linear)])
    n_params = sum(p.numel() for p in method.parameters())
    activation = n_mc * x.shape[0] * width
    chunk = MEMORY_BUDGET // max(activation, n_params)
    if x.device.type == "cpu":
        chunk = min(chunk, CACHE_BUDGET // activation)
    return max(1, chunk)


def _flat(grads: dict[str, Tensor], names: Sequence[str], k: int) -> Tensor:
    return torch.cat([grads[n].reshape(k, -1) for n in names], dim=1)


# -- per-draw gradients --------------------------------------------------------------------------
def _variational_grads(decoder, x: Tensor, lam: Tensor, eps: Tensor, s: MethodSettings,
                       bval) -> Tensor:
    """[k, B·2H]: one backward over k independent copies of λ (copy-major [k·B, 2H])."""
    k, m, b, h = eps.shape
    lam_k = lam.detach().expand(k, *lam.shape).reshape(k * b, -1).clone().requires_grad_()
    x_k = x.expand(k, *x.shape).reshape(k * b, -1)
    eps_k = eps.transpose(0, 1).reshape(m, k * b, h)
    with torch.enable_grad():
        est = elbo(decoder, x_k, lam_k, eps_k, estimator=s.estimator, baseline=s.baseline,
                   kl=s.kl, baseline_value=bval)
        (g,) = torch.autograd.grad(est.surrogate.sum(), lam_k)
    return g.reshape(k, -1)


def _encoder_grads(encoder: nn.Module, x: Tensor, g_lam: Tensor) -> Tensor:
    """[k, P_φ]: J_φᵀ (g_λ / B) for k cotangents at once (vmap over the encoder's vjp)."""
    params = {n: p.detach() for n, p in encoder.named_parameters()}
    with torch.enable_grad():
        _, pullback = vjp(lambda p: functional_call(encoder, p, (x,)), params)
        k, b = g_lam.shape[0], x.shape[0]
        (out,) = vmap(pullback)(g_lam.reshape(k, b, -1) / b)
    return _flat(out, list(params), k)


def _decoder_grads(decoder, x: Tensor, lam: Tensor, eps: Tensor, s: MethodSettings,
                   bval) -> Tensor:
    """[k, P_θ]: vmap(grad) of (1/B) Σ_n surrogate_n over the k noise draws."""
    objective = _DecoderObjective(decoder, s, bval)
    params = {n: p.detach() for n, p in objective.named_parameters()}

    def loss(p: dict[str, Tensor], e: Tensor) -> Tensor:
        return functional_call(objective, p, (x, lam.detach(), e))

    with torch.enable_grad():
        out = vmap(grad(loss), in_dims=(None, 0))(params, eps)
    return _flat(out, list(params), eps.shape[0])


def per_sample_grads(
    method: InferenceMethod,
    x: Tensor,
    idx: Tensor | None = None,
    *,
    draws: int | None = None,
    n_mc: int | None = None,
    generator: torch.Generator | None = None,
    chunk_size: int | None = None,
    settings: MethodSettings | None = None,
    groups: Iterable[str] | None = None,
    noise: Tensor | None = None,
    baseline_value: float | None = None,
    refined: Tensor | None = None,
) -> dict[str, Tensor]:
    """K independent single-estimate gradients per parameter group: {group: [K, P_group]}.

    g_k = ∇ of the minibatch objective with noise ε_k [M, B, H] (see the module docstring for
    the groups and how they are batched).

    Args:
        method: the model state (not modified).
        x: the minibatch [B, D]; ``idx`` its training-row indices (needed by ``vem``).
        draws: K. n_mc: M (default: the estimator settings' ``n_mc``).
        generator: draws the noise [K, M, B, H] in one call, after the semi-amortized
            refinement (which draws from it first, exactly as ``method.local_ascent`` would).
        chunk_size: draws per batched call (default: ``CACHE_BUDGET``/``MEMORY_BUDGET``).
        settings: estimator settings to measure instead of the method's own (same model),
            e.g. ``replace_settings(method.settings, estimator="score", baseline="loo")``.
        groups: a subset of ``groups_of(method)``.
        noise: explicit noise [K, M, B, H] instead of ``draws``/``n_mc``/``generator`` (common
            random numbers across estimators; comparison with the loop).
        baseline_value: the ``mean`` baseline's constant (default: the running mean's value).
        refined: λ⁽ᴷ⁾ for ``semi_amortized`` (default: refine once with ``generator``).
    """
    wanted = _wanted(method, groups)
    if noise is not None:
        n_mc = noise.shape[1]
    s = _settings(method, settings, n_mc)
    bval = _baseline_value(method, s, baseline_value)
    lam0 = _lambda0(method, x, idx)
    lam_dec = lam0
    if method.name == "semi_amortized" and "decoder" in wanted:
        lam_dec = refined.detach() if refined is not None else _refined(method, x, lam0,
                                                                        generator)
    h = method.decoder.latent_dim
    if noise is None:
        if draws is None or int(draws) < 1:
            raise ValueError(f"draws must be a positive number of gradients; got {draws}")
        noise = torch.randn((int(draws), s.n_mc, x.shape[0], h), generator=generator,
                            device=x.device, dtype=x.dtype)
    if noise.dim() != 4 or noise.shape[2:] != (x.shape[0], h):
        raise ValueError(f"noise must have shape [K, M, {x.shape[0]}, {h}]; got "
                         f"{tuple(noise.shape)}")
    step = _chunk(method, x, s.n_mc, chunk_size)
    parts: dict[str, list[Tensor]] = {g: [] for g in wanted}
    for start in range(0, noise.shape[0], step):
        eps = noise[start:start + step]
        g_lam = None
        if {"variational", "local", "encoder"} & set(wanted):
            g_lam = _variational_grads(method.decoder, x, lam0, eps, s, bval)
            for g in ("variational", "local"):
                if g in wanted:
                    parts[g].append(g_lam)
        if "encoder" in wanted:
            parts["encoder"].append(_encoder_grads(method.encoder, x, g_lam))
        if "decoder" in wanted:
            parts["decoder"].append(_decoder_grads(method.decoder, x, lam_dec, eps, s, bval))
    out = {g: torch.cat(v) for g, v in parts.items()}
    if "local" in out and "variational" in out:
        out["local"] = out["variational"].clone()  # same numbers, its own tensor
    return out


def per_sample_grads_loop(
    method: InferenceMethod,
    x: Tensor,
    idx: Tensor | None,
    noise: Tensor,
    *,
    settings: MethodSettings | None = None,
    groups: Iterable[str] | None = None,
    generator: torch.Generator | None = None,
    baseline_value: float | None = None,
    refined: Tensor | None = None,
) -> dict[str, Tensor]:
    """The reference for ``per_sample_grads``: one ordinary autograd call per draw and group,
    through the method's own modules (no ``functional_call``, no vmap, no chain rule)."""
    wanted = _wanted(method, groups)
    s = _settings(method, settings, noise.shape[1])
    bval = _baseline_value(method, s, baseline_value)
    enc = hasattr(method, "encoder")
    lam_dec = _lambda0(method, x, idx)
    if method.name == "semi_amortized" and "decoder" in wanted:
        lam_dec = refined if refined is not None else _refined(method, x, lam_dec, generator)
    dec_params = list(method.decoder.parameters())
    enc_params = list(method.encoder.parameters()) if enc else []

    def surrogate(lam: Tensor, eps: Tensor) -> Tensor:
        return elbo(method.decoder, x, lam, eps, estimator=s.estimator, baseline=s.baseline,
                    kl=s.kl, baseline_value=bval).surrogate

    out: dict[str, list[Tensor]] = {g: [] for g in wanted}
    with torch.enable_grad():
        for eps in noise:
            for group in wanted:
                if group in ("variational", "local"):
                    lam = (method.encoder(x).detach() if enc else method.local[idx]).clone()
                    lam.requires_grad_()
                    grads = torch.autograd.grad(surrogate(lam, eps).sum(), lam)
                elif group == "encoder":
                    grads = torch.autograd.grad(surrogate(method.encoder(x), eps).mean(),
                                                enc_params)
                else:
                    grads = torch.autograd.grad(surrogate(lam_dec.detach(), eps).mean(),
                                                dec_params)
                out[group].append(torch.cat([g.reshape(-1) for g in grads]))
    return {g: torch.stack(v) for g, v in out.items()}


# -- statistics ----------------------------------------------------------------------------------
def gradient_statistics(g: Tensor) -> dict:
    """SPEC §6 summaries of K draws g [K, P] (computed in float64).

    Returns ``mean`` ĝ [P], ``variance`` v [P] (unbiased, K − 1), and the row metrics
    ``grad_var_total`` tr Σ = Σ_i v_i, ``grad_var_relative`` tr Σ / ‖ĝ‖², ``grad_snr_mean`` and
    ``grad_snr_median`` of SNR_i = |ĝ_i| / √v_i (Rainforth et al., 2018), ``grad_mean_norm``
    ‖ĝ‖; plus ``draws`` K, ``n_coords`` P and ``n_deterministic``.

    Never NaN or inf: coordinates with zero variance (std at most ``_ZERO_VAR_ULPS`` ulps of
    their largest |g|, i.e. deterministic up to rounding, e.g. always-zero coordinates) are left
    out of the SNR (counted in ``n_deterministic``); the SNR metrics are absent when every
    coordinate is deterministic, and ``grad_var_relative`` is absent when ĝ = 0. Note that
    ‖ĝ‖² estimates ‖E g‖² + tr Σ / K, so the relative variance is biased low for small K.
    """
    if g.dim() != 2 or g.shape[0] < 2:
        raise ValueError(f"gradient_statistics needs draws [K >= 2, P]; got {tuple(g.shape)}")
    tiny = _ZERO_VAR_ULPS * torch.finfo(g.dtype).eps
    g64 = g.detach().to(torch.float64)
    mean = g64.mean(0)
    var = g64.var(0, correction=1)
    norm2 = float(mean.pow(2).sum())
    stats: dict = {"mean": mean, "variance": var, "draws": g.shape[0], "n_coords": g.shape[1],
                   "grad_var_total": float(var.sum()), "grad_mean_norm": math.sqrt(norm2)}
    if norm2 > 0:
        stats["grad_var_relative"] = stats["grad_var_total"] / norm2
    random = var.sqrt() > tiny * g64.abs().amax(0)
    stats["n_deterministic"] = int((~random).sum())
    if bool(random.any()):
        snr = (mean[random].abs() / var[random].sqrt()).cpu().numpy()
        stats["grad_snr_mean"] = float(snr.mean())
        stats["grad_snr_median"] = float(np.median(snr))
    return {k: v for k, v in stats.items() if not isinstance(v, float) or math.isfinite(v)}


# -- logging during training ---------------------------------------------------------------------
def scheduled(config, epoch: int) -> bool:
    """Whether gradient variance is measured at the end of ``epoch`` (0 = the initial model).

    ``config.gradvar_epochs`` lists the epochs; by default (None) epoch 0, the powers of two
    1, 2, 4, 8, ... and the last epoch ``config.epochs``.
    """
    epoch = int(epoch)
    if config.gradvar_epochs is not None:
        return epoch in {int(e) for e in config.gradvar_epochs}
    return epoch == 0 or epoch == config.epochs or (epoch > 0 and epoch & (epoch - 1) == 0)


def evaluation_batch(trainer) -> Tensor:
    """The fixed evaluation minibatch: ``gradvar_batch`` training indices (sorted), chosen by a
    seeded permutation that depends only on ``config.seed`` and N, so every checkpoint, method
    and estimator of a seed measures the same points; no trainer generator is consumed."""
    c, n = trainer.config, trainer.x["train"].shape[0]
    seed = int(np.random.SeedSequence(c.seed, spawn_key=(_BATCH_STREAM,)).generate_state(1)[0])
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[:min(int(c.gradvar_batch), n)].sort().values.to(trainer.device)


def _metric_items(stats: dict) -> list[tuple[str, float]]:
    return [(m, stats[m]) for m in METRICS if m in stats]


def training_rows(trainer) -> list[dict]:
    """Tidy rows (split ``train``, ``param_group`` = group, metrics ``METRICS``) for the current
    model: K = ``gradvar_draws`` draws of M = ``n_mc`` samples on ``evaluation_batch``, noise
    from ``trainer.generators["gradvar"]`` only, so training is unaffected by measuring.

    Measuring never decides a run's fate: a measurement that meets a non-finite value (e.g. a
    semi-amortized refinement that blows up on the measurement's own noise) records no row for
    it, and training's own checks decide whether the run diverged.
    """
    c = trainer.config
    idx = evaluation_batch(trainer)
    try:
        grads = per_sample_grads(trainer.method, trainer.x["train"][idx], idx,
                                 draws=c.gradvar_draws, generator=trainer.generators["gradvar"])
    except Divergence:
        return []
    return [trainer.row("train", metric, value, param_group=group)
            for group, g in grads.items() for metric, value in _metric_items(
                gradient_statistics(g))]


# -- analysis at a fixed model state -------------------------------------------------------------
@torch.no_grad()
def _pilot_mean(method: InferenceMethod, x: Tensor, lam: Tensor, generator) -> float:
    """A stand-in running mean: the minibatch-mean ELBO from 16 fresh samples."""
    eps = torch.randn((16, *lam.shape[:-1], method.decoder.latent_dim), generator=generator,
                      device=lam.device, dtype=lam.dtype)
    return float(elbo(method.decoder, x, lam, eps, kl=method.settings.kl).samples.mean())


def variance_sweep(
    trainer_or_method,
    x: Tensor | None = None,
    idx: Tensor | None = None,
    *,
    estimators: Sequence[tuple[str, str]] = DEFAULT_SWEEP_ESTIMATORS,
    n_mcs: Sequence[int] = (1, 2, 4, 8, 16),
    draws: int = 100,
    generator: torch.Generator | None = None,
    groups: Iterable[str] | None = None,
    chunk_size: int | None = None,
) -> list[dict]:
    """Gradient variance versus estimator and M at one fixed model state (SPEC §6).

    For each M in ``n_mcs`` one noise tensor [K, M, B, H] is drawn and shared by every
    (estimator, baseline) (common random numbers); the estimator is switched on the same model
    by ``replace_settings``. ``loo``/``cv`` are skipped at M = 1. The ``mean`` baseline uses the
    method's running mean, or — for a model not trained with it (no updates yet) — a pilot
    minibatch ELBO from 16 extra samples. A semi-amortized λ⁽ᴷ⁾ is refined once (the method's own
    settings) and shared by every cell. Pass a ``Trainer`` (x, idx default to its
    ``evaluation_batch``) or a method with x (and idx for vem). ``generator`` defaults to a
    fresh one seeded 0.

    Returns rows {method, latent_dim, param_group, estimator, baseline, n_mc, draws, metric,
    value}: plot ``value`` against ``n_mc`` (hue ``estimator``/``baseline``), or collect sweeps
    of models with different ``latent_dim`` for variance versus latent dimension.
    """
    if hasattr(trainer_or_method, "generators") and hasattr(trainer_or_method, "method"):
        trainer = trainer_or_method
        method = trainer.method
        if x is None:
            idx = evaluation_batch(trainer)
            x = trainer.x["train"][idx]
    else:
        method = trainer_or_method
    if x is None:
        raise ValueError("variance_sweep needs the minibatch x (and idx for vem)")
    if generator is None:
        generator = torch.Generator(x.device).manual_seed(0)
    wanted = _wanted(method, groups)
    lam0 = _lambda0(method, x, idx)
    refined = None
    if method.name == "semi_amortized" and "decoder" in wanted:
        refined = _refined(method, x, lam0, generator)
    bval = method.running_mean.value if method.running_mean.steps else None
    if bval is None and any(b == "mean" for _, b in estimators):
        bval = _pilot_mean(method, x, refined if refined is not None else lam0, generator)
    h = method.decoder.latent_dim
    rows = []
    for m in n_mcs:
        noise = torch.randn((int(draws), int(m), x.shape[0], h), generator=generator,
                            device=x.device, dtype=x.dtype)
        for est, base in estimators:
            if base in ("loo", "cv") and int(m) < 2:
                continue
            s = replace_settings(method.settings, estimator=est, baseline=base, n_mc=int(m))
            grads = per_sample_grads(method, x, idx, noise=noise, settings=s, groups=wanted,
                                     chunk_size=chunk_size, baseline_value=bval, refined=refined)
            for group, g in grads.items():
                for metric, value in _metric_items(gradient_statistics(g)):
                    rows.append({"method": method.name, "latent_dim": h, "param_group": group,
                                 "estimator": est, "baseline": base, "n_mc": int(m),
                                 "draws": int(draws), "metric": metric, "value": value})
    return rows
