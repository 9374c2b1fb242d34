"""Inference methods over one shared decoder: the swappable unit of the study
(docs/algorithms.md).

``vem``             Variational EM with stochastic gradients: a table of local λ_n; per minibatch
                    E-steps on its rows (θ fixed), then ``m_steps`` on θ (rows fixed).
``amortized``       The VAE (Kingma & Welling 2014): λ_n = f_φ(x_n), one joint step on (θ, φ).
``semi_amortized``  λ⁽⁰⁾ = f_φ(x) refined by K gradient steps; θ is trained at the refined
                    λ⁽ᴷ⁾, φ on the ELBO at λ⁽⁰⁾: "VAE + SVI" (Hjelm et al., 2016; Krishnan,
                    Liang & Hoffman, 2018), a baseline in Kim et al. (2018).
``sa_vae``          as ``semi_amortized``, but θ and φ are trained on the ELBO at λ⁽ᴷ⁾ with
                    gradients through the refinement (Kim et al.'s SA-VAE, 2018).

Every method is an *ensemble* of K members (``vi.nets``) that share one configuration and differ
in seed and step sizes: data x [K, B, D], posterior parameters λ [K, B, P] (P = 2H for the
diagonal family, ``vi.families``), noise [M, K, B, H]. A member never sees another member's
numbers; a step returns per-member health flags instead of raising, so one diverging member is
set aside while the others go on.

Each method declares its traits as class attributes (``has_encoder``, ``has_local_table``,
``refines_in_training``, ``refines_at_inference``, ``refine_through``, ``groups``,
``curve_inits``; ``step_sizes`` follows from them): code outside this module reads them and never
tests a method's name.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor, nn

from vi import families
from vi.decoders import GaussianDecoder
from vi.estimators import (
    Estimate,
    RunningMean,
    validate_estimator,
    validate_twice_differentiable,
)
from vi.nets import ACTIVATIONS, StackedMLP, member_mean, member_sum
from vi.objectives import KL_MODES, elbo, objective_estimate, validate_training_objective
from vi.optim import FlatOptimizer, RowOptimizer, validate_optimizer
from vi.streams import MemberRandom

__all__ = [
    "METHODS",
    "SAVAE",
    "STEP_SIZE_FIELDS",
    "Amortized",
    "Encoder",
    "InferenceMethod",
    "LocalFit",
    "MethodSettings",
    "SemiAmortized",
    "StoppingRule",
    "VariationalEM",
    "build_method",
    "estimate_elbo",
    "finite_members",
    "fit_local",
    "frozen",
    "settings_estimate",
]

#: the step-size fields of ``MethodSettings``: the settings that may differ between the members
#: of one ensemble (besides the seed), and the axes a step-size selection may search. Which of
#: them a method uses is its ``step_sizes`` trait.
STEP_SIZE_FIELDS = ("lr", "encoder_lr", "local_lr", "refine_lr")


@dataclass(frozen=True)
class StoppingRule:
    """When a fit of local λ by E-steps (``fit_local``) stops: on a plateau, after ``decays``
    step-size decays, or at ``max_steps``.

    Every ``window`` steps the fit measures each member's mean ELBO per point on one fixed draw
    of ``check_n_mc`` noise samples per point (common random numbers: the same draw at every
    check, so two checks differ by what λ gained, not by Monte Carlo noise). A check improves
    when it beats the phase's best by more than ``tol`` nats per point; after ``patience``
    checks without improvement the phase has reached its plateau, the noise floor of its step
    size. The step size is then multiplied by ``decay`` and a new phase begins with its own
    plateau, up to ``decays`` times; the fit stops at the last phase's plateau, or at
    ``max_steps`` steps in all (the cap, recorded when it binds). With ``decays = 0`` and a
    window of ``max_steps`` the fit is exactly ``max_steps`` steps at a constant step size.
    (Plateau rule after Cremer et al., 2018; decaying the step size on a plateau is Robbins and
    Monro's remedy for the noise floor of a constant step.)
    """

    window: int = 10
    patience: int = 3
    max_steps: int = 3000
    decays: int = 4
    decay: float = 0.3
    tol: float = 1e-3
    check_n_mc: int = 4

    def __post_init__(self) -> None:
        for name in ("window", "patience", "max_steps", "check_n_mc"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"stopping rule {name} must be a positive integer; got {value!r}")
        if isinstance(self.decays, bool) or not isinstance(self.decays, int) or self.decays < 0:
            raise ValueError(f"stopping rule decays must be an integer >= 0; got "
                             f"{self.decays!r}")
        if not (isinstance(self.decay, int | float) and 0 < self.decay < 1):
            raise ValueError(f"stopping rule decay must lie in (0, 1); got {self.decay!r}")
        if not (isinstance(self.tol, int | float) and math.isfinite(self.tol)
                and self.tol >= 0):
            raise ValueError(f"stopping rule tol must be a finite number >= 0; got "
                             f"{self.tol!r}")


@dataclass(frozen=True)
class MethodSettings:
    """Everything an inference method needs besides the decoder (plain values, the one source
    of these defaults).

    Step sizes: ``lr`` for the decoder θ; ``encoder_lr`` for the encoder φ (None: ``lr``);
    ``local_lr`` for vem's local λ and every held-out E-step; ``refine_lr`` for the
    semi-amortized refinement, whose per-point gradient norm is clipped at ``refine_clip`` (Kim
    et al. 2018 clip it too: plain gradient steps diverge where σ²_θ is small). ``e_steps``
    E-steps per minibatch, or with ``e_tol`` at most ``e_steps``, stopping (per member) once an
    E-step improves the minibatch's mean ELBO by less than ``e_tol`` nats per point, the gain
    measured on a fresh noise draw shared by λ before and after the step (common random
    numbers: unbiased, ``VariationalEM.step_gain``). ``heldout`` is the rule of every held-out
    fit (``StoppingRule``, ``fit_local``).

    ``objective`` is the bound every training step ascends (vem's local λ and θ, the encoder,
    the refinement): ``"elbo"``, or ``"iwae"`` with ``k`` samples per group (Burda et al. 2016;
    it needs ``kl="mc"``, and k = 1 is the ELBO). ``n_mc`` counts the groups, so a step draws
    ``n_mc · k`` samples per point.

    ``family`` is the variational family of every λ the method handles (its table, its
    encoder's output, its refinement, its held-out fits; ``vi.families.FAMILIES``): λ has
    ``param_dim(H)`` entries per point and starts at the family's ``init`` (q = the prior).
    ``kl="analytic"`` takes the closed-form KL where the family has one, else the Monte Carlo
    form.
    """

    name: str = "amortized"
    estimator: str = "reparam"
    baseline: str = "none"
    kl: str = "analytic"
    n_mc: int = 1
    objective: str = "elbo"
    k: int = 1
    family: str = "diagonal"
    optimizer: str = "adam"
    lr: float = 1e-3
    encoder_lr: float | None = None
    local_optimizer: str = "adam"
    local_lr: float = 1e-2
    rm_delay: float = 100.0
    rm_power: float = 0.6
    e_steps: int = 1
    e_tol: float | None = None
    m_steps: int = 1
    refine_steps: int = 5
    refine_lr: float = 1e-1
    refine_clip: float | None = 5.0
    baseline_decay: float = 0.9
    grad_clip: float | None = None
    heldout: StoppingRule = field(default_factory=StoppingRule)
    encoder_hidden: tuple[int, ...] = (256,)
    encoder_activation: str = "tanh"

    def validate(self) -> None:
        if self.name not in METHODS:
            raise ValueError(f"unknown method {self.name!r}; valid: {', '.join(METHODS)}")
        if self.kl not in KL_MODES:
            raise ValueError(f"unknown kl mode {self.kl!r}; valid: {', '.join(KL_MODES)}")
        validate_training_objective(self.objective, self.k, self.kl)
        families.get_family(self.family)
        validate_estimator(self.estimator, self.baseline, self.n_mc, objective=self.objective,
                           k=self.k)
        validate_optimizer(self.optimizer, self.lr, self.rm_power, self.rm_delay)
        validate_optimizer(self.optimizer, self.encoder_lr or self.lr, self.rm_power,
                           self.rm_delay)
        validate_optimizer(self.local_optimizer, self.local_lr, self.rm_power, self.rm_delay)
        if min(self.e_steps, self.m_steps) < 1:
            raise ValueError(
                f"e_steps and m_steps must be >= 1; got {self.e_steps}, {self.m_steps}"
            )
        if self.e_tol is not None and not (math.isfinite(self.e_tol) and self.e_tol > 0):
            raise ValueError(f"e_tol must be a positive number or null; got {self.e_tol}")
        traits = METHODS[self.name]
        if (traits.refines_in_training or traits.refines_at_inference) and \
                self.refine_steps < 1:
            raise ValueError(f"{self.name} needs refine_steps >= 1 (0 is the plain VAE)")
        if traits.refine_through:
            validate_twice_differentiable(
                self.estimator, self.effective_kl, f"{self.name} differentiates its refinement "
                f"steps' gradients again")
        if not (math.isfinite(self.refine_lr) and self.refine_lr > 0):
            raise ValueError(f"refine_lr must be finite and positive; got {self.refine_lr}")
        if self.refine_clip is not None and not (math.isfinite(self.refine_clip)
                                                 and self.refine_clip > 0):
            raise ValueError(f"refine_clip must be a positive number or null; got "
                             f"{self.refine_clip}")
        if self.grad_clip is not None and not (math.isfinite(self.grad_clip)
                                               and self.grad_clip > 0):
            raise ValueError(f"grad_clip must be a positive number or null; got "
                             f"{self.grad_clip}")
        if not 0.0 <= self.baseline_decay < 1.0:
            raise ValueError(f"baseline_decay must lie in [0, 1); got {self.baseline_decay}")
        if self.encoder_activation not in ACTIVATIONS:
            raise ValueError(
                f"unknown activation {self.encoder_activation!r}; valid: {', '.join(ACTIVATIONS)}"
            )
        if any(int(w) < 1 for w in self.encoder_hidden):
            raise ValueError(f"encoder_hidden widths must be positive; got "
                             f"{list(self.encoder_hidden)}")

    @property
    def effective_kl(self) -> str:
        """The KL mode the ELBO takes: ``kl``, but ``"mc"`` for a family without a closed-form
        KL."""
        return self.kl if families.get_family(self.family).analytic_kl else "mc"

    def heldout_settings(self) -> MethodSettings:
        """The held-out E-step, the same procedure for every method and training estimator:
        the reparameterization gradient with M = 1 and the analytic KL, on the local optimiser
        from ``local_lr``, its step size decayed on each plateau of the rule ``heldout`` until
        the last phase's plateau (``fit_local``). Held-out numbers then compare trained models,
        not the noise of the estimator they were trained with."""
        return dataclasses.replace(self, estimator="reparam", baseline="none", kl="analytic",
                                   n_mc=1, objective="elbo", k=1)

    def shared(self) -> dict:
        """The fields every member of an ensemble must agree on (all but the step sizes)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name not in STEP_SIZE_FIELDS}


# ---------------------------------------------------------------------------------- helpers


def finite_members(*tensors: Tensor | None) -> Tensor:
    """[K] bool: member k is finite in every tensor (member axis first).

    max |t| over a member's entries is non-finite iff some entry is (amax propagates NaN, and a
    max of finite values cannot overflow); one reduction over the concatenation is far cheaper
    on CPU than ``isfinite`` per tensor.
    """
    flat = [t.detach().reshape(t.shape[0], -1) for t in tensors if t is not None and t.numel()]
    if not flat:
        raise ValueError("finite_members needs at least one non-empty tensor")
    joined = flat[0] if len(flat) == 1 else torch.cat(flat, dim=1)
    return torch.isfinite(joined.abs().amax(dim=1))


@contextlib.contextmanager
def frozen(module: nn.Module) -> Iterator[None]:
    """The module's parameters do not require grad inside (θ fixed during E-steps)."""
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def _step_sizes(settings: Sequence[MethodSettings], name: str) -> list[float]:
    values = [getattr(s, name) for s in settings]
    if name == "encoder_lr":
        values = [s.encoder_lr if s.encoder_lr is not None else s.lr for s in settings]
    return [float(v) for v in values]


def _clip(leaves: Sequence[Tensor], max_norm: float | None) -> None:
    """Per-member gradient-norm clipping over every leaf (never across members)."""
    if max_norm is None:
        return
    norm2 = sum(member_sum(p.grad.pow(2)) for p in leaves)  # member-order independent
    scale = (max_norm / (norm2.sqrt() + 1e-6)).clamp(max=1.0).unsqueeze(1).to(leaves[0].dtype)
    for p in leaves:
        p.grad.mul_(scale)


class Encoder(nn.Module):
    """Inference network f_φ: x [K, B, D] → λ [K, B, P], an MLP per member (P = 2H for the
    diagonal family); the heads after μ (log σ², or the family's other parameters) start at a
    tenth of ``nn.Linear``'s scale with the family's prior λ as bias (zero for the diagonal
    family: q starts near N(·, I))."""

    def __init__(self, data_dim: int, latent_dim: int, hidden: Sequence[int] = (256,),
                 activation: str = "tanh", *, members: int = 1,
                 generators: Sequence[torch.Generator] | None = None,
                 family: str = "diagonal") -> None:
        super().__init__()
        self.latent_dim = int(latent_dim)
        fam = families.get_family(family)
        self.net = StackedMLP(members, [data_dim, *map(int, hidden), fam.param_dim(latent_dim)],
                              activation)
        last = len(self.net.sizes) - 2
        for k in range(members):
            g = generators[k] if generators is not None else torch.Generator().manual_seed(k)
            self.net.reset_member(k, g)
            with torch.no_grad():
                views = self.net.params.views()
                views[f"w{last}"][k, :, latent_dim:].mul_(0.1)
                views[f"b{last}"][k].copy_(fam.init(latent_dim, views[f"b{last}"]))

    @property
    def params(self):
        return self.net.params

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


# ----------------------------------------------------------------------------------- methods

METHODS: dict[str, type[InferenceMethod]] = {}


class InferenceMethod(nn.Module):
    """Base class: a decoder, estimator settings, K members, and a training step.

    Traits (class attributes, read by everything outside this module):

    ``name``                  the method's name in configurations
    ``has_encoder``           it has an inference network f_φ (``self.encoder``); inference of
                              a new point starts there (else at the prior, λ = 0)
    ``has_local_table``       it keeps a per-datapoint table of λ (``self.local``)
    ``refines_in_training``   a training step refines λ by ``refine_steps`` gradient steps of
                              size ``refine_lr`` before the decoder's update
    ``refines_at_inference``  ``infer`` refines the encoder's λ the same way (the method's own
                              posterior for new points is the refined one)
    ``refine_through``        its encoder is trained through the refinement
    ``groups``                its parameter groups for gradient statistics
    ``curve_inits``           the starts of its test-time inference curve
    ``warm_validation``       its held-out inference is a fit to tolerance that can start from
                              a given λ (``infer(x, random, start=λ)``): during training each
                              validation check starts from the previous check's λ
    ``step_sizes``            the ``STEP_SIZE_FIELDS`` its training and its own inference use,
                              derived from the traits above unless a class declares it: ``lr``
                              (θ), ``encoder_lr`` (has an encoder), ``local_lr`` (has a local
                              table), ``refine_lr`` (refines in training or at inference). They
                              are the axes of its step-size selection (``local_lr`` of a method
                              without a table moves only the held-out E-steps of the probes,
                              which a grid fixes).
    """

    name: ClassVar[str] = ""
    has_encoder: ClassVar[bool] = False
    has_local_table: ClassVar[bool] = False
    refines_in_training: ClassVar[bool] = False
    refines_at_inference: ClassVar[bool] = False
    refine_through: ClassVar[bool] = False
    groups: ClassVar[tuple[str, ...]] = ("variational", "decoder")
    curve_inits: ClassVar[tuple[str, ...]] = ("prior",)
    warm_validation: ClassVar[bool] = False
    step_sizes: ClassVar[tuple[str, ...]] = ("lr",)

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "step_sizes" not in cls.__dict__:
            used = {"lr": True, "encoder_lr": cls.has_encoder,
                    "local_lr": cls.has_local_table,
                    "refine_lr": cls.refines_in_training or cls.refines_at_inference}
            cls.step_sizes = tuple(f for f in STEP_SIZE_FIELDS if used[f])
        unknown = sorted(set(cls.step_sizes) - set(STEP_SIZE_FIELDS))
        if unknown or "lr" not in cls.step_sizes:
            raise TypeError(f"{cls.__name__}.step_sizes must include 'lr' and name only "
                            f"{', '.join(STEP_SIZE_FIELDS)}; got {cls.step_sizes}")
        if cls.refine_through and not cls.refines_in_training:
            raise TypeError(f"{cls.__name__}: refine_through needs refines_in_training")
        if cls.__dict__.get("name"):  # a subclass that names no method of its own (a test
            METHODS[cls.name] = cls   # double, a variant) must not replace its parent's entry

    def __init__(self, decoder: GaussianDecoder, settings: Sequence[MethodSettings]) -> None:
        super().__init__()
        settings = list(settings)
        if len(settings) != decoder.members:
            raise ValueError(f"{len(settings)} member settings for a decoder of "
                             f"{decoder.members} members")
        for s in settings:
            s.validate()
        first = settings[0].shared()
        for k, s in enumerate(settings[1:], start=1):
            if s.shared() != first:
                diff = sorted(n for n, v in s.shared().items() if first[n] != v)
                raise ValueError(f"ensemble members may differ only in step sizes; member {k} "
                                 f"differs in {', '.join(diff)}")
        self.decoder = decoder
        self.member_settings = settings
        self.settings = settings[0]
        like = decoder.params.flat
        self.running_mean = RunningMean(decoder.members, self.settings.baseline_decay,
                                        like.device)
        self.refine_lr = torch.tensor(_step_sizes(settings, "refine_lr"), dtype=like.dtype,
                                      device=like.device).reshape(-1, 1, 1)
        self.local_lr = _step_sizes(settings, "local_lr")

    @property
    def members(self) -> int:
        return self.decoder.members

    # -- the objective every method shares ---------------------------------------------------
    def baseline_value(self) -> Tensor | None:
        """The ``mean`` baseline's current value [K, 1] (None for other baselines)."""
        if self.settings.baseline != "mean":
            return None
        return self.running_mean.value.to(self.decoder.params.flat)

    def estimate(self, x: Tensor, lam: Tensor, random: MemberRandom, *,
                 active: Tensor | None = None, n_mc: int | None = None) -> Estimate:
        """ELBO ``Estimate`` for λ [K, B, 2H] with fresh noise [M, K, B, H] from ``random``."""
        return estimate_elbo(self.decoder, x, lam, self.settings, random, active=active,
                             n_mc=n_mc, baseline_value=self.baseline_value())

    def _record(self, samples: Tensor, active: Tensor) -> Tensor:
        """Per-point ELBO estimates [K, B]; folds them into the ``mean`` baseline's average."""
        if self.settings.baseline == "mean":
            self.running_mean.update(samples, active)
        return samples.mean(0)

    def _global_step(self, opt: FlatOptimizer, loss: Tensor, active: Tensor) -> None:
        """Backward of the summed member losses, per-member clipping, one update."""
        opt.zero_grad()
        loss.backward()
        _clip(opt.params, self.settings.grad_clip)
        opt.step(active)

    def finite(self) -> Tensor:
        """[K] bool: the members whose state (parameters, local table) is finite. A non-finite
        loss or gradient makes a member's parameters non-finite at its next update (Adam divides
        by √v) and they stay so, while members never touch each other's numbers: one check per
        epoch finds every member that diverged during it."""
        return finite_members(*(t for t in self.state_dict().values()
                                if t.is_floating_point()))

    def local_ascent(self, x: Tensor, lam: Tensor, random: MemberRandom, steps: int, *,
                     active: Tensor | None = None, create_graph: bool = False,
                     settings: MethodSettings | None = None) -> Tensor:
        """K plain gradient-ascent steps λ ← λ + α_k clip(ĝ_λ) (the refinement; α_k per
        member): λ⁽ᴷ⁾. ĝ_λ is the ELBO gradient estimate of ``settings`` (default: the
        method's own estimator, baseline, KL mode and M) on fresh noise at every step; each
        point's gradient, μ and log σ² concatenated, is rescaled to norm at most
        ``refine_clip``. (Kim et al. 2018's refinement uses momentum 0.5 and clips the μ and
        log σ² gradients separately; this one takes plain steps.) With ``create_graph`` the
        steps stay differentiable, so λ⁽ᴷ⁾ is a function of λ⁽⁰⁾ and θ. A non-finite gradient
        makes λ⁽ᴷ⁾ non-finite, and so whatever is computed from it."""
        s = settings or self.settings
        clip = s.refine_clip
        bval = self.baseline_value() if s.baseline == "mean" else None
        with torch.enable_grad():
            for _ in range(steps):
                if not lam.requires_grad:
                    lam = lam.detach().requires_grad_()
                est = estimate_elbo(self.decoder, x, lam, s, random, active=active,
                                    baseline_value=bval)
                (g,) = torch.autograd.grad(est.surrogate.sum(), lam, create_graph=create_graph)
                if clip is not None:
                    norm = g.norm(dim=-1, keepdim=True)
                    g = g * (clip / norm.clamp_min(clip))
                lam = lam + self.refine_lr * g
        return lam

    # -- interface ----------------------------------------------------------------------------
    def train_step(self, x: Tensor, idx: Tensor, random: MemberRandom, active: Tensor
                   ) -> Tensor:
        """One update on a minibatch x [K, B, D] with training indices idx [K, B]; members
        outside ``active`` do not move. Returns the per-point ELBO estimates [K, B] (a member
        that diverged shows it in ``finite``)."""
        raise NotImplementedError

    def training_lambda(self, x: Tensor, idx: Tensor) -> Tensor:
        """The λ [K, B, 2H] a training step starts from (table rows or f_φ(x)), detached."""
        raise NotImplementedError

    def infer(self, x: Tensor, random: MemberRandom) -> tuple[Tensor, Tensor | None]:
        """The method's own posterior λ [K, N, 2H] for points x [K, N, D], θ fixed, and the
        E-steps each member took (None when inference takes no E-steps)."""
        raise NotImplementedError

    def optimizers(self) -> dict[str, FlatOptimizer | RowOptimizer]:
        raise NotImplementedError

    def optimizer_state(self) -> dict[str, Tensor]:
        """Every optimiser tensor and the baseline's running mean (member axis first)."""
        state = {f"running_mean.{k}": v for k, v in self.running_mean.state_dict().items()}
        for name, opt in self.optimizers().items():
            state |= {f"{name}.{k}": v for k, v in opt.state_dict().items()}
        return state

    def load_optimizer_state(self, state: dict[str, Tensor]) -> None:
        def part(prefix: str) -> dict[str, Tensor]:
            return {k[len(prefix) + 1:]: v for k, v in state.items()
                    if k.startswith(prefix + ".")}

        self.running_mean.load_state_dict(part("running_mean"))
        for name, opt in self.optimizers().items():
            opt.load_state_dict(part(name))


def estimate_elbo(decoder: GaussianDecoder, x: Tensor, lam: Tensor, settings: MethodSettings,
                  random: MemberRandom, *, active: Tensor | None = None,
                  n_mc: int | None = None, baseline_value: Tensor | None = None) -> Estimate:
    """The training objective's ``Estimate`` (the ELBO or the IWAE, ``settings.objective``) of
    λ [K, B, 2H] with the settings' estimator, baseline, KL mode, M (or ``n_mc``) and k, noise
    [M·k, K, B, H] drawn from ``random`` (members outside ``active`` draw nothing)."""
    s = settings
    eps = random.randn(((n_mc or s.n_mc) * s.k, lam.shape[1], decoder.latent_dim), 1,
                       active=active, dtype=lam.dtype)
    return settings_estimate(decoder, x, lam, eps, s, baseline_value=baseline_value)


def settings_estimate(decoder: GaussianDecoder, x: Tensor, lam: Tensor, eps: Tensor,
                      settings: MethodSettings, *, baseline_value: Tensor | None = None
                      ) -> Estimate:
    """The training objective's ``Estimate`` on given noise [M·k, K, B, H]
    (``vi.objectives.objective_estimate`` with the settings' objective, k, estimator, baseline
    and KL mode)."""
    s = settings
    return objective_estimate(decoder, x, lam, eps, objective=s.objective, k=s.k,
                              estimator=s.estimator, baseline=s.baseline, kl=s.kl,
                              baseline_value=baseline_value, family=s.family)


def _restart(opt: RowOptimizer, members: Tensor) -> None:
    """Forget the optimiser state (step counts, Adam moments) of ``members`` [K] bool, through
    its public state: a new phase starts afresh, its second moments not inflated by the large
    gradients far from the optimum."""
    state = opt.state_dict()
    for value in state.values():
        value[members] = 0
    opt.load_state_dict(state)


@dataclass
class LocalFit:
    """The result of ``fit_local``, per member: λ [K, N, 2H], the E-steps taken [K], the
    step-size decays taken [K], and whether the cap ended the fit [K] (the member was still
    improving, or had not finished its last phase, at ``max_steps``)."""

    lam: Tensor
    steps: Tensor
    decays: Tensor
    capped: Tensor


def fit_local(
    decoder: GaussianDecoder,
    x: Tensor,
    lam0: Tensor,
    *,
    settings: MethodSettings,
    lr: Sequence[float],
    rule: StoppingRule,
    random: MemberRandom,
    baseline_value: Tensor | None = None,
    active: Tensor | None = None,
) -> LocalFit:
    """Fit λ for the points x [K, N, D] by E-steps with θ frozen, from ``lam0``, batched over
    points and members: the held-out E-step of every method and the q* fit.

    Each step ascends the ELBO with the settings' estimator, baseline, KL mode and M, on the
    local optimiser (per-row Adam or Robbins–Monro SGD on a private table) at step sizes
    ``lr`` [K]. ``rule`` (``StoppingRule``) acts per member: every ``rule.window`` steps the
    mean ELBO of the member's points is measured on one fixed noise draw ε_c (common random
    numbers), L̂_c(λ) = mean_n mean_c [log p(x_n | μ + σ ε_c) − KL(q ‖ p)]; after
    ``rule.patience`` checks that do not beat the phase's best by ``rule.tol`` the step size
    decays by ``rule.decay`` (a new phase), and after ``rule.decays`` decays the member stops.
    A member that stops draws no more noise and keeps its λ; one whose gradient turns
    non-finite stops at its last finite λ. Returns a ``LocalFit``.
    """
    s = settings
    k_members, n = lam0.shape[:2]
    table = lam0.detach().clone()
    rows = torch.arange(n, device=table.device).expand(k_members, -1)
    opt = RowOptimizer(table, lr, s.local_optimizer, rm_delay=s.rm_delay, rm_power=s.rm_power)
    running = (torch.ones(k_members, dtype=torch.bool, device=table.device) if active is None
               else active.clone())
    steps = torch.zeros(k_members, dtype=torch.long, device=table.device)
    decays = torch.zeros_like(steps)
    best = torch.full((k_members,), -math.inf, dtype=torch.float64, device=table.device)
    bad = torch.zeros_like(steps)
    # the checks' noise: drawn once from each member's own stream, reused at every check
    check_eps = random.randn((rule.check_n_mc, n, decoder.latent_dim), 1, active=running,
                             dtype=table.dtype)
    with frozen(decoder), torch.enable_grad():
        for step in range(1, rule.max_steps + 1):
            lam = table.clone().requires_grad_()
            est = estimate_elbo(decoder, x, lam, s, random, active=running,
                                baseline_value=baseline_value)
            (g,) = torch.autograd.grad(-est.surrogate.sum(), lam)
            running = running & finite_members(g)
            opt.step(rows, torch.nan_to_num(g), running)
            steps += running.long()
            if step % rule.window == 0 and step < rule.max_steps:
                with torch.no_grad():
                    check = elbo(decoder, x, table, check_eps, kl=s.kl,
                                 family=s.family).samples
                check = member_mean(check, member_dim=1)  # grouping-independent rounding
                improved = check > best + rule.tol
                best = torch.where(running & improved, check, best)
                bad = torch.where(running, torch.where(improved, 0, bad + 1), bad)
                ended = running & (bad >= rule.patience)
                decay = ended & (decays < rule.decays)
                running = running & ~(ended & ~decay)
                if bool(decay.any()):  # a new phase: a smaller step, its own plateau
                    opt.lr = torch.where(decay.reshape(-1, 1, 1), opt.lr * rule.decay, opt.lr)
                    _restart(opt, decay)
                    decays += decay.long()
                    best = torch.where(decay, check, best)
                    bad = torch.where(decay, 0, bad)
                if not bool(running.any()):
                    break
    return LocalFit(table, steps, decays, running.clone())


class VariationalEM(InferenceMethod):
    """Per-datapoint variational EM: λ table [K, N, 2H] initialised at 0 (q = the prior);
    E-steps on the minibatch's rows, then M-steps on θ."""

    name = "vem"
    has_local_table = True
    groups = ("variational", "local", "decoder")
    curve_inits = ("prior",)
    warm_validation = True

    def __init__(self, decoder: GaussianDecoder, settings: Sequence[MethodSettings],
                 n_train: int, generators: Sequence[torch.Generator] | None = None) -> None:
        super().__init__(decoder, settings)
        s = self.settings
        like = decoder.params.flat
        prior = families.get_family(s.family).init(decoder.latent_dim, like)
        self.register_buffer("local", prior.expand(decoder.members, int(n_train), -1).clone())
        self.local_opt = RowOptimizer(self.local, self.local_lr, s.local_optimizer,
                                      rm_delay=s.rm_delay, rm_power=s.rm_power)
        self.decoder_opt = FlatOptimizer(
            [(decoder.params.flat, _step_sizes(self.member_settings, "lr"))], s.optimizer,
            rm_delay=s.rm_delay, rm_power=s.rm_power)

    def optimizers(self) -> dict[str, FlatOptimizer | RowOptimizer]:
        return {"local_opt": self.local_opt, "decoder_opt": self.decoder_opt}

    def training_lambda(self, x: Tensor, idx: Tensor) -> Tensor:
        return self.local_opt.rows(idx)

    def train_step(self, x, idx, random, active):
        s = self.settings
        e_active = active.clone()
        with frozen(self.decoder):
            for _ in range(s.e_steps):  # E-step: ascent on the minibatch's rows only
                lam = self.local_opt.rows(idx).requires_grad_()
                est = estimate_elbo(self.decoder, x, lam, s, random, active=e_active,
                                    baseline_value=self.baseline_value())
                (g,) = torch.autograd.grad(-est.surrogate.sum(), lam)
                moved = self.local_opt.step(idx, g, e_active)
                if s.e_tol is not None:
                    gain = self.step_gain(x, lam.detach(), moved, random, e_active)
                    e_active = e_active & (gain >= s.e_tol)
                    if not bool(e_active.any()):
                        break
        lam = self.local_opt.rows(idx)
        recorded = None
        for _ in range(s.m_steps):  # M-step: θ only, rows fixed
            est = self.estimate(x, lam, random, active=active)
            if recorded is None:
                recorded = self._record(est.samples, active)
            self._global_step(self.decoder_opt, -est.surrogate.mean(1).sum(), active)
        return recorded

    @torch.no_grad()
    def step_gain(self, x: Tensor, before: Tensor, after: Tensor, random: MemberRandom,
                  active: Tensor) -> Tensor:
        """An E-step's gain in the mean training objective per point [K] (the ELBO, or the
        IWAE with the settings' k): L̂(λ') − L̂(λ) on one fresh draw ε [M·k, K, B, H] shared by
        both sides (common random numbers), the two evaluated in one batch. ε is independent
        of the noise the step was computed from, so the estimate is unbiased for
        L(λ') − L(λ) given the step; the step's own noise is not (the step moved λ to raise
        that very draw: +0.3 nat per point where the true gain was +0.006 on a converged
        digits table). Members outside ``active`` draw nothing."""
        s = self.settings
        b = x.shape[1]
        eps = random.randn((s.n_mc * s.k, b, self.decoder.latent_dim), 1, active=active,
                           dtype=before.dtype)
        samples = objective_estimate(
            self.decoder, torch.cat([x, x], 1), torch.cat([before, after], 1),
            torch.cat([eps, eps], 2), objective=s.objective, k=s.k, kl=s.kl,
            family=s.family).samples
        return member_mean(samples[..., b:] - samples[..., :b], member_dim=1)

    def infer(self, x, random, start: Tensor | None = None):
        fit = self.fit_heldout(x, random, start=start)
        return fit.lam, fit.steps

    def fit_heldout(self, x: Tensor, random: MemberRandom, start: Tensor | None = None
                    ) -> LocalFit:
        """The held-out fit of the points x [K, N, D] from the prior λ = 0 (or from ``start``
        [K, N, 2H], e.g. the previous validation check's λ), θ fixed, with its record (steps,
        decays, whether the cap bound): ``fit_local`` with ``MethodSettings.heldout_settings``
        and the rule ``heldout``, which runs every fit to the same tolerance wherever it
        starts."""
        if start is None:
            prior = families.get_family(self.settings.family).init(self.decoder.latent_dim, x)
            start = prior.expand(*x.shape[:-1], -1)
        return fit_local(self.decoder, x, start, settings=self.settings.heldout_settings(),
                         lr=self.local_lr, rule=self.settings.heldout, random=random)


class Amortized(InferenceMethod):
    """The VAE: λ = f_φ(x); one joint Adam/SGD step on (θ, φ) per minibatch, with separate
    step sizes for θ (``lr``) and φ (``encoder_lr``)."""

    name = "amortized"
    has_encoder = True
    groups = ("variational", "encoder", "decoder")
    curve_inits = ("prior", "encoder")

    def __init__(self, decoder: GaussianDecoder, settings: Sequence[MethodSettings],
                 n_train: int = 0, generators: Sequence[torch.Generator] | None = None) -> None:
        super().__init__(decoder, settings)
        s = self.settings
        self.encoder = Encoder(decoder.data_dim, decoder.latent_dim, s.encoder_hidden,
                               s.encoder_activation, members=decoder.members,
                               generators=generators, family=s.family
                               ).to(decoder.params.flat)
        self.opt = FlatOptimizer(
            [(decoder.params.flat, _step_sizes(self.member_settings, "lr")),
             (self.encoder.params.flat, _step_sizes(self.member_settings, "encoder_lr"))],
            s.optimizer, rm_delay=s.rm_delay, rm_power=s.rm_power)

    def optimizers(self) -> dict[str, FlatOptimizer | RowOptimizer]:
        return {"opt": self.opt}

    def training_lambda(self, x: Tensor, idx: Tensor) -> Tensor:
        with torch.no_grad():
            return self.encoder(x)

    def train_step(self, x, idx, random, active):
        est = self.estimate(x, self.encoder(x), random, active=active)
        recorded = self._record(est.samples, active)
        self._global_step(self.opt, -est.surrogate.mean(1).sum(), active)
        return recorded

    def infer(self, x, random):
        with torch.no_grad():
            return self.encoder(x), None


class SemiAmortized(Amortized):
    """Semi-amortized inference (Kim et al., 2018): the encoder's λ⁽⁰⁾ refined by
    ``refine_steps`` plain gradient-ascent steps of size ``refine_lr`` (``local_ascent``).

    Training ("VAE + SVI": Hjelm et al. 2016, Krishnan, Liang & Hoffman 2018; a baseline in
    Kim et al. 2018, whose code runs it as ``train_n2n=0, train_kl=0``):
    θ takes ∇_θ L(λ⁽ᴷ⁾, θ) at the refined, detached λ⁽ᴷ⁾; φ takes ∇_φ L(f_φ(x), θ), the ELBO at
    its own output λ⁽⁰⁾ (Kim et al.'s default, ``train_kl=1``, trains φ on KL(q_λ⁽⁰⁾ ‖ q_λ⁽ᴷ⁾)
    instead). ``SAVAE`` trains both through the refinement.

    Inference (``infer``) refines with the held-out settings
    (``MethodSettings.heldout_settings``: reparam, M = 1, the analytic KL), whatever the training
    estimator, so every method's held-out ELBO comes from one procedure.
    """

    name = "semi_amortized"
    refines_in_training = True
    refines_at_inference = True
    groups = ("variational", "encoder", "decoder")
    curve_inits = ("prior", "encoder")

    def train_step(self, x, idx, random, active):
        s = self.settings
        dec, enc = self.decoder.params.flat, self.encoder.params.flat
        lam0 = self.encoder(x)
        if self.refine_through:
            # λ⁽ᴷ⁾(θ, φ) stays differentiable; the total derivative of L(λ⁽ᴷ⁾(θ, φ), θ)
            lam_k = self.local_ascent(x, lam0, random, s.refine_steps, active=active,
                                      create_graph=True)
            est = self.estimate(x, lam_k, random, active=active)
            dec_grad, enc_grad = torch.autograd.grad(-est.surrogate.mean(1).sum(), [dec, enc])
        else:
            with frozen(self.decoder):
                lam_k = self.local_ascent(x, lam0.detach(), random, s.refine_steps,
                                          active=active)
            est = self.estimate(x, lam_k.detach(), random, active=active)  # θ at λ⁽ᴷ⁾
            (dec_grad,) = torch.autograd.grad(-est.surrogate.mean(1).sum(), [dec])
            enc_est = self.estimate(x, lam0, random, active=active)  # φ at its own λ⁽⁰⁾
            (enc_grad,) = torch.autograd.grad(-enc_est.surrogate.mean(1).sum(), [enc])
        recorded = self._record(est.samples, active)
        dec.grad, enc.grad = dec_grad, enc_grad
        _clip(self.opt.params, s.grad_clip)
        self.opt.step(active)
        return recorded

    def infer(self, x, random):
        with torch.no_grad():
            lam0 = self.encoder(x)
        with frozen(self.decoder):
            lam = self.local_ascent(x, lam0, random, self.settings.refine_steps,
                                    settings=self.settings.heldout_settings())
        return lam.detach(), None


class SAVAE(SemiAmortized):
    """SA-VAE (Kim et al., 2018, Algorithm 1; their code's ``train_n2n=1`` with
    ``acc_param_grads=1``): the refinement steps stay differentiable, λ⁽ᴷ⁾ = λ⁽ᴷ⁾(θ, φ), and one
    ELBO estimate at λ⁽ᴷ⁾ trains both networks by its total derivatives,

        φ:  (∂λ⁽ᴷ⁾/∂φ)ᵀ ∇_λ L(λ⁽ᴷ⁾, θ)
        θ:  ∇_θ L(λ⁽ᴷ⁾, θ) + (∂λ⁽ᴷ⁾/∂θ)ᵀ ∇_λ L(λ⁽ᴷ⁾, θ),

    where ∂λ⁽ᴷ⁾ involves the Hessian of the refinement's ELBO estimate: its estimator's second
    derivatives must be unbiased (``vi.estimators.twice_differentiable``; checked by
    ``MethodSettings.validate``)."""

    name = "sa_vae"
    refine_through = True


def build_method(
    decoder: GaussianDecoder,
    settings: Sequence[MethodSettings],
    n_train: int,
    generators: Sequence[torch.Generator] | None = None,
) -> InferenceMethod:
    """Construct the method named by the settings (one ``MethodSettings`` per member)."""
    settings = list(settings)
    name = settings[0].name
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; valid: {', '.join(METHODS)}")
    return METHODS[name](decoder, settings, n_train, generators)
