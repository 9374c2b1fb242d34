"""Gradient-variance instrumentation: per-draw gradients, their variance and SNR
(docs/evaluation.md, "Gradient variance").

At a fixed model state and a fixed minibatch, K independent single-estimate gradients
g_1..g_K (each from its own M-sample noise) are computed for each parameter group and
summarised (``gradient_statistics``) by

    ĝ = (1/K) Σ_k g_k,   v_i = (1/(K−1)) Σ_k (g_ki − ĝ_i)²,   tr Σ = Σ_i v_i,
    relative variance tr Σ / ‖ĝ‖²,   SNR_i = |ĝ_i| / √v_i   (Rainforth et al., 2018).

Both ratios are biased for few draws (``gradient_statistics``): the relative variance low, the
SNR of a weak coordinate high (a zero-mean coordinate reads about √(2/(π K)), 0.08 at K = 100).

(K here counts draws; the ensemble's members are a separate axis, and every statistic is per
member.) Parameter groups, the gradient of the training objective (the ELBO, or the IWAE bound
L_k with ``objective="iwae"``; ``k_sweep`` measures it against k):

``variational``  ∇_λ Σ_n L_n for the minibatch's λ [B, 2H]: each λ_n gets its own ∇_{λ_n} L_n.
                 λ are vem's table rows, or the encoder output λ⁽⁰⁾ = f_φ(x), so this group is
                 comparable across methods.
``local``        methods with a local table: the rows as parameters (the same numbers).
``encoder``      methods with an encoder: ∇_φ (1/B) Σ_n L_n(f_φ(x_n)).
``decoder``      ∇_θ (1/B) Σ_n L_n at λ (refined once for a method that refines in training).

(For ``sa_vae``, whose encoder and decoder are trained through the refinement, ``encoder`` is
still measured at λ⁽⁰⁾ and ``decoder`` as the partial derivative at the detached λ⁽ᴷ⁾, the
gradients ``semi_amortized`` uses: the study measures variances of the three first-order
methods.)

These follow each method's training step: the sum over the minibatch for λ, the mean for θ
and φ, the estimator, baseline, KL mode and M. Nothing of the method is mutated.

Batching (no Python loop over draws): ``variational`` is one backward pass over copies of λ
(copy (d, n) touches only its own loss term); ``encoder`` applies the chain rule
∇_φ = J_φᵀ ∇_λ / B to all draws at once by ``vmap`` over the encoder's ``vjp``; ``decoder`` is
``vmap(grad(...))`` over the noise with ``functional_call``. Members need no special care: a
member's parameters reach only its own loss, so one gradient of the summed member losses holds
every member's gradient. ``per_sample_grads_loop`` computes the same numbers with a loop of
ordinary autograd calls (the reference in tests and benchmarks).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vjp, vmap

from vi.contract import GRADIENT_METRICS
from vi.estimators import ESTIMATORS, validate_estimator
from vi.inference import InferenceMethod, MethodSettings, frozen, settings_estimate
from vi.nets import member_mean
from vi.objectives import elbo
from vi.streams import MemberRandom

__all__ = [
    "IWAE_SWEEP_ESTIMATORS",
    "METRICS",
    "SWEEP_ESTIMATORS",
    "bias_statistics",
    "gradient_statistics",
    "k_sweep",
    "per_sample_grads",
    "per_sample_grads_loop",
    "variance_sweep",
]

#: the statistics ``gradient_statistics`` returns, by their metric names (``vi.contract``)
METRICS = GRADIENT_METRICS
#: the default sweep: (estimator, baseline, KL mode). STL differs from reparam only when the
#: KL term is estimated too (with an analytic KL the two are identical), so both appear with
#: ``kl="mc"`` beside reparam with the analytic KL.
SWEEP_ESTIMATORS = (
    ("reparam", "none", "analytic"), ("reparam", "none", "mc"), ("stl", "none", "mc"),
    ("score", "none", "analytic"), ("score", "mean", "analytic"),
    ("score", "loo", "analytic"), ("score", "cv", "analytic"),
)
#: the default sweep of the IWAE gradient against k: (estimator, baseline); score with ``loo`` is
#: VIMCO. An entry an estimator does not support at some k (``Estimator.support``) is skipped.
IWAE_SWEEP_ESTIMATORS = (("reparam", "none"), ("stl", "none"), ("dreg", "none"),
                         ("score", "none"), ("score", "loo"))
#: a chunk of draws keeps its widest activation (draws x M x B x width, all members) about this
#: size on the CPU, which measured faster than one large chunk
CACHE_BUDGET = 2**20
#: a coordinate whose standard deviation is below this many ulps of its largest |g| is treated
#: as deterministic (its variance is rounding noise) and left out of the SNR
_ZERO_VAR_ULPS = 16
_PARAMS = "net.params.flat"


class _DecoderObjective(nn.Module):
    """Σ_members (1/B) Σ_n surrogate_n at fixed λ: a module so ``functional_call`` can swap θ."""

    def __init__(self, decoder: nn.Module, settings: MethodSettings, baseline_value) -> None:
        super().__init__()
        self.decoder = decoder
        self.settings, self.baseline_value = settings, baseline_value

    def forward(self, x: Tensor, lam: Tensor, eps: Tensor) -> Tensor:
        return settings_estimate(self.decoder, x, lam, eps, self.settings,
                                 baseline_value=self.baseline_value).surrogate.mean(-1).sum()


def _wanted(method: InferenceMethod, groups: Iterable[str] | None) -> tuple[str, ...]:
    have = method.groups
    if groups is None:
        return have
    groups = tuple(groups)
    bad = [g for g in groups if g not in have]
    if bad:
        raise ValueError(f"{method.name} has no parameter group(s) {bad}; valid: {have}")
    return groups


def _refined(method: InferenceMethod, x: Tensor, lam0: Tensor, random: MemberRandom) -> Tensor:
    """λ⁽ᴷ⁾ by the method's own refinement (its estimator and M), θ fixed."""
    with torch.enable_grad(), frozen(method.decoder):
        lam = method.local_ascent(x, lam0.detach(), random, method.settings.refine_steps)
    return lam.detach()


def _groups_in(noise: Tensor, k: int) -> int:
    """The number M of groups of k samples in noise [draws, M·k, K, B, H]."""
    if noise.dim() < 2 or noise.shape[1] % k:
        raise ValueError(f"noise must have shape [draws, M·k, K, B, H] with k = {k}; got "
                         f"{tuple(noise.shape)}")
    return noise.shape[1] // k


def _chunk(x: Tensor, n_mc: int, width: int, chunk_size: int | None) -> int:
    if chunk_size is not None:
        if int(chunk_size) < 1:
            raise ValueError(f"chunk_size must be positive; got {chunk_size}")
        return int(chunk_size)
    activation = n_mc * x.shape[0] * x.shape[1] * width
    return max(1, CACHE_BUDGET // max(activation, 1))


def _variational_grads(decoder, x: Tensor, lam: Tensor, eps: Tensor, s: MethodSettings,
                       bval) -> Tensor:
    """[d, K, B·2H]: one backward over d copies of λ, laid out [K, d·B, 2H]."""
    d, m, k, b, h = eps.shape
    lam_d = lam.detach().unsqueeze(1).expand(k, d, b, lam.shape[-1]).reshape(k, d * b, -1)
    lam_d = lam_d.clone().requires_grad_()
    x_d = x.unsqueeze(1).expand(k, d, b, x.shape[-1]).reshape(k, d * b, -1)
    eps_d = eps.permute(1, 2, 0, 3, 4).reshape(m, k, d * b, h)
    with torch.enable_grad():
        est = settings_estimate(decoder, x_d, lam_d, eps_d, s, baseline_value=bval)
        (g,) = torch.autograd.grad(est.surrogate.sum(), lam_d)
    return g.reshape(k, d, -1).transpose(0, 1)


def _encoder_grads(encoder: nn.Module, x: Tensor, g_lam: Tensor) -> Tensor:
    """[d, K, P_φ]: J_φᵀ (g_λ / B) for d cotangents at once (vmap over the encoder's vjp)."""
    flat = encoder.params.flat.detach()
    d, k = g_lam.shape[:2]
    b = x.shape[1]
    with torch.enable_grad():
        _, pullback = vjp(lambda p: functional_call(encoder, {_PARAMS: p}, (x,)), flat)
        (out,) = vmap(pullback)(g_lam.reshape(d, k, b, -1) / b)
    return out


def _decoder_grads(decoder, x: Tensor, lam: Tensor, eps: Tensor, s: MethodSettings,
                   bval) -> Tensor:
    """[d, K, P_θ]: vmap(grad) of Σ_members (1/B) Σ_n surrogate_n over the d noise draws."""
    objective = _DecoderObjective(decoder, s, bval)

    def loss(flat: Tensor, e: Tensor) -> Tensor:
        return functional_call(objective, {f"decoder.{_PARAMS}": flat}, (x, lam.detach(), e))

    with torch.enable_grad():
        return vmap(grad(loss), in_dims=(None, 0))(decoder.params.flat.detach(), eps)


def per_sample_grads(
    method: InferenceMethod,
    x: Tensor,
    idx: Tensor,
    *,
    draws: int | None = None,
    random: MemberRandom | None = None,
    settings: MethodSettings | None = None,
    groups: Iterable[str] | None = None,
    noise: Tensor | None = None,
    baseline_value: Tensor | None = None,
    refined: Tensor | None = None,
    chunk_size: int | None = None,
) -> dict[str, Tensor]:
    """Independent single-estimate gradients per parameter group: {group: [draws, K, P]}.

    Args:
        method: the model state (not modified); x [K, B, D] the minibatch and idx [K, B] its
            training indices (a local table's rows).
        draws, random: the number of draws and the member streams the noise
            [draws, M·k, K, B, H] (k: the settings' samples per IWAE group, 1 for the ELBO)
            comes from (after a refining method's refinement, which draws first).
        settings: estimator settings to measure instead of the method's own (same model).
        groups: a subset of ``method.groups``.
        noise: explicit noise [draws, M·k, K, B, H] (common random numbers across
            estimators).
        baseline_value: the ``mean`` baseline's value [K, 1] (default: the method's).
        refined: λ⁽ᴷ⁾ of a refining method (default: refine once with ``random``).
    """
    wanted = _wanted(method, groups)
    s = settings if settings is not None else method.settings
    if noise is not None:
        s = dataclasses.replace(s, n_mc=_groups_in(noise, s.k))
    validate_estimator(s.estimator, s.baseline, s.n_mc, objective=s.objective, k=s.k)
    bval = None
    if s.baseline == "mean":
        bval = method.baseline_value() if baseline_value is None else baseline_value
        if bval is None:
            bval = method.running_mean.value.to(x)
    lam0 = method.training_lambda(x, idx)
    lam_dec = lam0
    if method.refines_in_training and "decoder" in wanted:
        lam_dec = refined.detach() if refined is not None else _refined(method, x, lam0, random)
    h = method.decoder.latent_dim
    k, b = x.shape[:2]
    if noise is None:
        if draws is None or int(draws) < 1 or random is None:
            raise ValueError(f"give noise, or draws >= 1 and random; got draws={draws}")
        noise = random.randn((int(draws), s.n_mc * s.k, b, h), 2, dtype=x.dtype)
    if noise.dim() != 5 or noise.shape[2:] != (k, b, h):
        raise ValueError(f"noise must have shape [draws, M, {k}, {b}, {h}]; got "
                         f"{tuple(noise.shape)}")
    width = max(x.shape[-1], lam0.shape[-1], *method.decoder.net.sizes)  # λ's length P
    step = _chunk(x, s.n_mc * s.k, width, chunk_size)
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
    idx: Tensor,
    noise: Tensor,
    *,
    settings: MethodSettings | None = None,
    groups: Iterable[str] | None = None,
    baseline_value: Tensor | None = None,
    refined: Tensor | None = None,
) -> dict[str, Tensor]:
    """The reference for ``per_sample_grads``: one ordinary autograd call per draw and group
    (no ``functional_call``, no vmap, no chain rule)."""
    wanted = _wanted(method, groups)
    s = settings or method.settings
    s = dataclasses.replace(s, n_mc=_groups_in(noise, s.k))
    bval = None
    if s.baseline == "mean":
        bval = method.baseline_value() if baseline_value is None else baseline_value
        if bval is None:
            bval = method.running_mean.value.to(x)
    lam0 = method.training_lambda(x, idx)
    lam_dec = refined if refined is not None else lam0
    dec = method.decoder.params.flat
    enc = method.encoder.params.flat if method.has_encoder else None

    def surrogate(lam: Tensor, eps: Tensor) -> Tensor:
        return settings_estimate(method.decoder, x, lam, eps, s, baseline_value=bval).surrogate

    out: dict[str, list[Tensor]] = {g: [] for g in wanted}
    with torch.enable_grad():
        for eps in noise:
            for group in wanted:
                if group in ("variational", "local"):
                    lam = lam0.clone().requires_grad_()
                    (g,) = torch.autograd.grad(surrogate(lam, eps).sum(), lam)
                    g = g.reshape(g.shape[0], -1)
                elif group == "encoder":
                    (g,) = torch.autograd.grad(surrogate(method.encoder(x), eps).mean(-1).sum(),
                                               enc)
                else:
                    (g,) = torch.autograd.grad(
                        surrogate(lam_dec.detach(), eps).mean(-1).sum(), dec)
                out[group].append(g)
    return {g: torch.stack(v) for g, v in out.items()}


def gradient_statistics(g: Tensor) -> dict[str, Tensor]:
    """The summaries of draws g [draws, K, P] per member (float64, each [K]).

    ``grad_var_total`` tr Σ = Σ_i v_i (unbiased variances), ``grad_var_relative`` tr Σ / ‖ĝ‖²,
    ``grad_snr_mean`` and ``grad_snr_median`` of SNR_i = |ĝ_i| / √v_i (Rainforth et al., 2018),
    ``grad_mean_norm`` ‖ĝ‖, and ``n_deterministic``. A member's value is NaN where undefined:
    coordinates with zero variance (std at most ``_ZERO_VAR_ULPS`` ulps of their largest |g|,
    e.g. always-zero coordinates) are left out of the SNR, which is NaN when every coordinate
    is deterministic; the relative variance is NaN when ĝ = 0. Note that ‖ĝ‖² estimates
    ‖E g‖² + tr Σ / draws, so the relative variance is biased low for few draws.

    Likewise SNR_i is biased high for weak coordinates: |ĝ_i| includes the noise of the mean,
    so a coordinate whose true SNR is 0 reads |t_{n−1}|/√n for n draws (Gaussian draws; t a
    Student t variate), on average E|t_{n−1}|/√n ≈ √(2/(π n)) (0.080 at n = 100) with median
    t_{n−1, 0.75}/√n ≈ 0.674/√n (0.068). Values near that floor mean "indistinguishable from 0";
    the mean and median SNR over coordinates inherit the floor from the weak ones.
    """
    if g.dim() != 3 or g.shape[0] < 2:
        raise ValueError(f"gradient_statistics needs draws [>= 2, K, P]; got {tuple(g.shape)}")
    tiny = _ZERO_VAR_ULPS * torch.finfo(g.dtype).eps
    g64 = g.detach().to(torch.float64)
    mean = g64.mean(0)
    var = g64.var(0, correction=1)
    total = var.sum(1)
    norm2 = mean.pow(2).sum(1)
    random = var.sqrt() > tiny * g64.abs().amax(0)
    snr = torch.where(random, mean.abs() / var.sqrt().clamp_min(1e-300), torch.nan)
    count = random.sum(1)
    nan = torch.full_like(total, torch.nan)
    return {
        "grad_var_total": total,
        "grad_var_relative": torch.where(norm2 > 0, total / norm2.clamp_min(1e-300), nan),
        "grad_snr_mean": torch.where(count > 0, torch.nansum(snr, 1) / count.clamp_min(1), nan),
        "grad_snr_median": torch.where(count > 0, torch.nanquantile(snr, 0.5, dim=1), nan),
        "grad_mean_norm": norm2.sqrt(),
        "n_deterministic": (~random).sum(1).double(),
    }


def bias_statistics(g: Tensor, g_ref: Tensor) -> dict[str, Tensor]:
    """How far the mean of draws g [draws, K, P] lies from the mean of a reference estimator's
    draws g_ref on the same noise (common random numbers), per member (float64, each [K]).

    With d = g − g_ref, d̄ its mean over the n draws and v_i its unbiased variances,
    E‖d̄‖² = ‖b‖² + Σ_i v_i / n for the bias b = E g − E g_ref, so

        excess = ‖d̄‖² − Σ_i v_i / n

    is unbiased for ‖b‖². ``grad_bias_relative`` = excess / ‖ḡ_ref‖²; ``grad_bias_z`` =
    excess / √(2 Σ_i (v_i / n)²), its null standard deviation for independent Gaussian
    coordinates (about N(0, 1) for an unbiased estimator; correlated coordinates widen it).
    Used to show STL's bias on the IWAE for k >= 2 (Tucker, Lawson, Gu & Maddison 2019)."""
    if g.shape != g_ref.shape or g.dim() != 3 or g.shape[0] < 2:
        raise ValueError(f"bias_statistics needs two draws tensors [>= 2, K, P] of one shape; "
                         f"got {tuple(g.shape)} and {tuple(g_ref.shape)}")
    d = g.detach().to(torch.float64) - g_ref.detach().to(torch.float64)
    n = d.shape[0]
    var_mean = d.var(0, correction=1) / n
    excess = d.mean(0).pow(2).sum(1) - var_mean.sum(1)
    ref2 = g_ref.detach().to(torch.float64).mean(0).pow(2).sum(1)
    null_sd = (2 * var_mean.pow(2).sum(1)).sqrt()
    nan = torch.full_like(excess, torch.nan)
    return {"grad_bias_relative": torch.where(ref2 > 0, excess / ref2.clamp_min(1e-300), nan),
            "grad_bias_z": torch.where(null_sd > 0, excess / null_sd.clamp_min(1e-300), nan)}


def variance_sweep(
    method: InferenceMethod,
    x: Tensor,
    idx: Tensor,
    *,
    estimators: Sequence[tuple[str, str, str]] = SWEEP_ESTIMATORS,
    n_mcs: Sequence[int],
    draws: int,
    random: MemberRandom,
    groups: Iterable[str] | None = None,
) -> list[dict]:
    """Gradient variance against estimator, KL mode and M at one fixed model state.

    For each M one noise tensor [draws, M, K, B, H] is drawn and shared by every
    (estimator, baseline, kl) (common random numbers); the estimator is switched on the same
    model. ``loo``/``cv`` are skipped at M = 1. The ``mean`` baseline uses the method's running
    mean, or, for a model not trained with it, the minibatch-mean ELBO of 16 pilot samples. A
    refining method's λ⁽ᴷ⁾ is refined once and shared by every cell. Returns rows {member,
    param_group, estimator, baseline, kl, n_mc, draws, metric, value}.
    """
    wanted = _wanted(method, groups)
    lam0 = method.training_lambda(x, idx)
    refined = (_refined(method, x, lam0, random)
               if method.refines_in_training and "decoder" in wanted else None)
    bval = method.running_mean.value.to(x)
    if not bool((method.running_mean.steps > 0).all()) and any(b == "mean"
                                                                for _, b, _ in estimators):
        with torch.no_grad():
            eps = random.randn((16, x.shape[1], method.decoder.latent_dim), 1, dtype=x.dtype)
            pilot = elbo(method.decoder, x, refined if refined is not None else lam0, eps,
                         kl=method.settings.kl).samples
            pilot = member_mean(pilot, member_dim=1).to(x.dtype)
        bval = pilot.unsqueeze(-1)
    h = method.decoder.latent_dim
    rows = []
    for m in n_mcs:
        noise = random.randn((int(draws), int(m), x.shape[1], h), 2, dtype=x.dtype)
        for est, base, kl in estimators:
            if base in ("loo", "cv") and int(m) < 2:
                continue
            s = dataclasses.replace(method.settings, estimator=est, baseline=base, kl=kl,
                                    n_mc=int(m), objective="elbo", k=1)
            grads = per_sample_grads(method, x, idx, noise=noise, settings=s, groups=wanted,
                                     baseline_value=bval, refined=refined)
            for group, g in grads.items():
                stats = gradient_statistics(g)
                for metric in METRICS:
                    for member, value in enumerate(stats[metric].tolist()):
                        if value == value:  # NaN: undefined for this member
                            rows.append({"member": member, "param_group": group,
                                         "estimator": est, "baseline": base, "kl": kl,
                                         "n_mc": int(m), "draws": int(draws),
                                         "metric": metric, "value": value})
    return rows


def k_sweep(
    method: InferenceMethod,
    x: Tensor,
    idx: Tensor,
    *,
    ks: Sequence[int] = (1, 4, 16, 64),
    n_mc: int = 1,
    draws: int,
    random: MemberRandom,
    estimators: Sequence[tuple[str, str]] = IWAE_SWEEP_ESTIMATORS,
    groups: Iterable[str] | None = None,
    reference: tuple[str, str] | None = None,
) -> list[dict]:
    """Gradient variance and SNR of the IWAE bound L_k against k at a fixed number M =
    ``n_mc`` of groups, per parameter group, at one fixed model state (Rainforth et al. 2018:
    with ``reparam`` the SNR of the inference gradient falls like k^(−1/2) and the decoder's
    grows like k^(1/2) for fixed M; Tucker et al. 2019: DReG's inference SNR grows).

    For each k one noise tensor [draws, M·k, K, B, H] is drawn and shared by every estimator
    (common random numbers); the objective is switched on the same model (``objective="iwae"``,
    ``kl="mc"``; k = 1 is the MC-KL ELBO). An (estimator, baseline) the registry does not
    declare at k, or whose baseline needs more samples (k, or M at k = 1), is skipped; the
    ``mean`` baseline has no value here and is skipped too. A refining method's λ⁽ᴷ⁾ is
    refined once (with its own settings) and shared. Returns rows {member, param_group,
    estimator, baseline, objective, k, n_mc, draws, metric, value} (``gradient_statistics``).
    With ``reference`` (an entry of ``estimators``, e.g. ``("reparam", "none")``, unbiased),
    every other estimator measured at k also gets ``bias_statistics`` against the reference's
    draws on the same noise (metrics ``grad_bias_relative``, ``grad_bias_z``).
    """
    wanted = _wanted(method, groups)
    lam0 = method.training_lambda(x, idx)
    refined = (_refined(method, x, lam0, random)
               if method.refines_in_training and "decoder" in wanted else None)
    h = method.decoder.latent_dim
    m = int(n_mc)
    if m < 1 or int(draws) < 2 or any(int(k) < 1 for k in ks):
        raise ValueError(f"k_sweep needs n_mc >= 1, draws >= 2 and every k >= 1; got n_mc={n_mc}, "
                         f"draws={draws}, ks={list(ks)}")
    if reference is not None and tuple(reference) not in [tuple(e) for e in estimators]:
        raise ValueError(f"reference {list(reference)} is not one of the estimators")
    order = sorted(estimators, key=lambda e: tuple(e) != tuple(reference or ()))
    rows = []
    for k in map(int, ks):
        noise = random.randn((int(draws), m * k, x.shape[1], h), 2, dtype=x.dtype)
        ref_grads = None
        for est, base in order:
            support = ESTIMATORS[est].support(k)
            need = None if support is None or base == "mean" else support.baselines.get(base)
            if need is None or (k if k > 1 else m) < need:
                continue
            s = dataclasses.replace(method.settings, estimator=est, baseline=base, kl="mc",
                                    n_mc=m, objective="iwae", k=k)
            grads = per_sample_grads(method, x, idx, noise=noise, settings=s, groups=wanted,
                                     refined=refined)
            is_ref = reference is not None and (est, base) == tuple(reference)
            if is_ref:
                ref_grads = grads
            for group, g in grads.items():
                stats = gradient_statistics(g)
                if ref_grads is not None and not is_ref:
                    stats |= bias_statistics(g, ref_grads[group])
                for metric in stats:
                    if metric == "n_deterministic":
                        continue
                    for member, value in enumerate(stats[metric].tolist()):
                        if value == value:  # NaN: undefined for this member
                            rows.append({"member": member, "param_group": group,
                                         "estimator": est, "baseline": base,
                                         "objective": "iwae", "k": k, "n_mc": m,
                                         "draws": int(draws), "metric": metric,
                                         "value": value})
    return rows
