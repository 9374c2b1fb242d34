"""Inference methods over one shared decoder (SPEC §4): the swappable unit of the study.

``vem``             Variational EM with stochastic gradients (seed notes, Algorithms 7–8): a table
                    of local λ_n; per minibatch ``e_steps`` ascent steps on its rows (θ fixed),
                    then ``m_steps`` on θ (rows fixed).
``amortized``       The VAE (Algorithm 9; Kingma & Welling 2014): λ_n = f_φ(x_n), one joint
                    step on (θ, φ).
``semi_amortized``  SA-VAE (Kim et al., 2018): λ⁽⁰⁾ = f_φ(x), refined by K gradient steps; θ is
                    trained at the refined λ⁽ᴷ⁾, φ on the ELBO at λ⁽⁰⁾ (or through the refinement).

Every method uses the same estimator layer, so score and reparameterized runs differ only in
the estimator's name. Each method owns its optimisers (vem's local rows have per-row state), and
``infer`` returns the method's own posterior q_φ for any points: encoder output, refined encoder
output, or — for vem — the table rows of training points and rows fitted by E-steps from the
fixed initialisation λ = 0 (the prior) for held-out points.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from vi.decoders import ACTIVATIONS, GaussianDecoder
from vi.estimators import RunningMean, draw_noise, validate_estimator
from vi.objectives import KL_MODES, elbo
from vi.optim import RowOptimizer, make_optimizer, validate_optimizer

__all__ = [
    "METHODS",
    "Amortized",
    "Divergence",
    "Encoder",
    "InferenceMethod",
    "MethodSettings",
    "SemiAmortized",
    "StoppingRule",
    "VariationalEM",
    "build_method",
    "fit_local",
]

METHODS = ("vem", "amortized", "semi_amortized")


class Divergence(RuntimeError):
    """A non-finite loss, gradient or parameter: training stops and the run is ``diverged``."""


@dataclass(frozen=True)
class StoppingRule:
    """Window-and-patience rule (Cremer et al., 2018): stop when the mean ELBO over a window
    of ``window`` steps has not improved on the best window for ``patience`` windows, or at
    ``max_steps``."""

    window: int = 100
    patience: int = 10
    max_steps: int = 5000

    def __post_init__(self) -> None:
        if min(self.window, self.patience, self.max_steps) < 1:
            raise ValueError(f"stopping rule values must be positive; got {self}")


@dataclass(frozen=True)
class MethodSettings:
    """Everything an inference method needs besides the decoder (all plain values)."""

    estimator: str = "reparam"
    baseline: str = "none"
    kl: str = "analytic"
    n_mc: int = 1
    optimizer: str = "adam"
    lr: float = 1e-3
    local_optimizer: str = "adam"
    local_lr: float = 1e-2
    rm_delay: float = 100.0
    rm_power: float = 0.6
    e_steps: int = 1
    m_steps: int = 1
    refine_steps: int = 5
    refine_lr: float = 1e-1
    refine_through: bool = False
    baseline_decay: float = 0.9
    grad_clip: float | None = None
    heldout: StoppingRule = StoppingRule(window=20, patience=3, max_steps=500)
    encoder_hidden: tuple[int, ...] = (256,)
    encoder_activation: str = "tanh"

    def validate(self, method: str) -> None:
        validate_estimator(self.estimator, self.baseline, self.n_mc)
        if self.kl not in KL_MODES:
            raise ValueError(f"unknown kl mode {self.kl!r}; valid: {', '.join(KL_MODES)}")
        validate_optimizer(self.optimizer, self.lr, self.rm_power, self.rm_delay)
        validate_optimizer(self.local_optimizer, self.local_lr, self.rm_power, self.rm_delay)
        if min(self.e_steps, self.m_steps) < 1:
            raise ValueError(
                f"e_steps and m_steps must be >= 1; got {self.e_steps}, {self.m_steps}"
            )
        if method == "semi_amortized" and self.refine_steps < 1:
            raise ValueError("semi_amortized needs refine_steps >= 1 (0 is the plain VAE)")
        if not self.refine_lr > 0:
            raise ValueError(f"refine_lr must be positive; got {self.refine_lr}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be positive or None; got {self.grad_clip}")
        if self.encoder_activation not in ACTIVATIONS:
            raise ValueError(
                f"unknown activation {self.encoder_activation!r}; valid: {', '.join(ACTIVATIONS)}"
            )


def _finite(what: str, *tensors: Tensor) -> None:
    # max |t| over all entries is non-finite iff some entry is (amax propagates NaN, and a max
    # of finite values cannot overflow). One reduction over the concatenation replaces a
    # per-tensor isfinite/all/bool round: on CPU torch.isfinite costs ~10x an abs-max, and
    # those checks of the gradients and parameters took ~15% of a digits epoch (issue 8).
    with torch.no_grad():
        flat = [t.reshape(-1) for t in tensors if t is not None and t.numel()]
        finite = not flat or math.isfinite(
            float((flat[0] if len(flat) == 1 else torch.cat(flat)).abs().amax())
        )
    if not finite:
        raise Divergence(f"non-finite {what}")


class Encoder(nn.Module):
    """Inference network f_φ: x [B, D] → λ [B, 2H] (an MLP; the log σ² head starts at 0)."""

    def __init__(
        self, data_dim: int, latent_dim: int, hidden: Sequence[int] = (256,), activation="tanh"
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = data_dim
        for h in hidden:
            layers += [nn.Linear(width, int(h)), ACTIVATIONS[activation]()]
            width = int(h)
        out = nn.Linear(width, 2 * latent_dim)
        with torch.no_grad():
            out.weight[latent_dim:].mul_(0.1)
            out.bias.zero_()
        self.net = nn.Sequential(*layers, out)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class InferenceMethod(nn.Module):
    """Base class: a decoder, the estimator settings, and a training step per minibatch."""

    name = "base"
    last_infer_steps: int | None = None  # E-steps the last held-out ``infer`` took, if any

    def __init__(self, decoder: GaussianDecoder, settings: MethodSettings) -> None:
        super().__init__()
        settings.validate(self.name)
        self.decoder, self.settings = decoder, settings
        self.running_mean = RunningMean(settings.baseline_decay)

    # -- the objective every method shares -------------------------------------------------
    def estimate(self, x: Tensor, lam: Tensor, generator: torch.Generator | None, n_mc=None):
        """ELBO ``Estimate`` for λ with fresh noise from ``generator`` (the method's estimator)."""
        s = self.settings
        eps = draw_noise(n_mc or s.n_mc, lam.shape[:-1], self.decoder.latent_dim,
                         generator=generator, device=lam.device, dtype=lam.dtype)
        bval = self.running_mean.value if s.baseline == "mean" else None
        return elbo(self.decoder, x, lam, eps, estimator=s.estimator, baseline=s.baseline,
                    kl=s.kl, baseline_value=bval)

    def _record(self, samples: Tensor) -> Tensor:
        _finite("ELBO estimate", samples)
        if self.settings.baseline == "mean":
            self.running_mean.update(samples)
        return samples.mean(0)

    @staticmethod
    def _stepped(opt: torch.optim.Optimizer) -> list[Tensor]:
        """The tensors ``opt`` updates: its parameter list, built from ``parameters()`` at
        construction (walking the module tree every step cost ~150 Python calls a step)."""
        return [p for group in opt.param_groups for p in group["params"]]

    def _step(self, opt, sched, params: list[Tensor]) -> None:
        grads = [p.grad for p in params]
        _finite("gradient", *grads)
        if self.settings.grad_clip is not None:
            nn.utils.clip_grad_norm_(params, self.settings.grad_clip)
        opt.step()
        if sched is not None:
            sched.step()
        _finite("parameter", *params)

    def local_ascent(
        self, x: Tensor, lam: Tensor, generator, steps: int, lr: float, create_graph=False
    ) -> Tensor:
        """K plain gradient-ascent steps λ ← λ + α ĝ_λ (semi-amortized refinement)."""
        for _ in range(steps):
            if not lam.requires_grad:
                lam = lam.detach().requires_grad_()
            est = self.estimate(x, lam, generator)
            (g,) = torch.autograd.grad(est.surrogate.sum(), lam, create_graph=create_graph)
            _finite("refinement gradient", g)
            lam = lam + lr * g
        return lam

    # -- interface --------------------------------------------------------------------------
    def train_step(self, x: Tensor, idx: Tensor, generator: torch.Generator) -> Tensor:
        """One update on a minibatch; returns the per-point ELBO estimates [B] it recorded."""
        raise NotImplementedError

    def infer(self, x: Tensor, idx: Tensor | None = None, *, generator=None) -> Tensor:
        """The method's own posterior parameters λ [B, 2H] for the points x (detached)."""
        raise NotImplementedError

    def optimizer_state(self) -> dict:
        raise NotImplementedError

    def load_optimizer_state(self, state: dict) -> None:
        raise NotImplementedError


def fit_local(
    method: InferenceMethod,
    x: Tensor,
    lam0: Tensor,
    *,
    rule: StoppingRule,
    generator: torch.Generator | None,
    lr: float | None = None,
    optimizer: str | None = None,
) -> tuple[Tensor, int, list[float]]:
    """Fit λ for the points x by E-steps with θ frozen, from ``lam0``, batched over points.

    Uses the method's estimator and M; per-row Adam (or RM-SGD) on a private table. Returns
    (λ, steps taken, mean ELBO per step). The window-and-patience rule acts on the batch mean.
    """
    s = method.settings
    table = lam0.detach().clone()
    rows = torch.arange(table.shape[0], device=table.device)
    opt = RowOptimizer(table, optimizer or s.local_optimizer, lr or s.local_lr,
                       rm_delay=s.rm_delay, rm_power=s.rm_power)
    trace: list[float] = []
    best, bad = -float("inf"), 0
    for step in range(1, rule.max_steps + 1):
        lam = table.clone().requires_grad_()
        est = method.estimate(x, lam, generator)
        (g,) = torch.autograd.grad(-est.surrogate.sum(), lam)
        _finite("held-out gradient", g)
        opt.step(rows, g)
        trace.append(float(est.samples.mean()))
        if step % rule.window == 0:
            current = sum(trace[-rule.window:]) / rule.window
            best, bad = (current, 0) if current > best else (best, bad + 1)
            if bad >= rule.patience:
                return table, step, trace
    return table, rule.max_steps, trace


class VariationalEM(InferenceMethod):
    """Per-datapoint variational EM: λ table [N, 2H] initialised at 0 (q = the prior).

    Build it on its final device: the row optimiser holds the table and its own state.
    """

    name = "vem"

    def __init__(self, decoder: GaussianDecoder, settings: MethodSettings, n_train: int) -> None:
        super().__init__(decoder, settings)
        s = settings
        like = next(decoder.parameters())  # the table lives where the decoder does
        self.register_buffer("local", like.new_zeros(int(n_train), 2 * decoder.latent_dim))
        self.local_opt = RowOptimizer(self.local, s.local_optimizer, s.local_lr,
                                      rm_delay=s.rm_delay, rm_power=s.rm_power)
        self.decoder_opt, self.decoder_sched = make_optimizer(
            decoder.parameters(), s.optimizer, s.lr, rm_delay=s.rm_delay, rm_power=s.rm_power
        )

    def train_step(self, x: Tensor, idx: Tensor, generator: torch.Generator) -> Tensor:
        s = self.settings
        for _ in range(s.e_steps):  # E-step: ascent on the minibatch's rows only
            lam = self.local[idx].clone().requires_grad_()
            est = self.estimate(x, lam, generator)
            (g,) = torch.autograd.grad(-est.surrogate.sum(), lam)
            _finite("local gradient", g)
            self.local_opt.step(idx, g)
            _finite("local parameter", self.local[idx])
        lam = self.local[idx]
        params = self._stepped(self.decoder_opt)
        recorded = None
        for _ in range(s.m_steps):  # M-step: θ only, rows fixed
            est = self.estimate(x, lam, generator)
            self.decoder_opt.zero_grad(set_to_none=True)
            (-est.surrogate.mean()).backward()
            if recorded is None:
                recorded = self._record(est.samples)
            self._step(self.decoder_opt, self.decoder_sched, params)
        return recorded

    def infer(self, x: Tensor, idx: Tensor | None = None, *, generator=None) -> Tensor:
        if idx is not None:
            return self.local[idx].detach().clone()
        zeros = x.new_zeros(x.shape[0], 2 * self.decoder.latent_dim)
        with _frozen(self.decoder):
            lam, steps, _ = fit_local(self, x, zeros, rule=self.settings.heldout,
                                      generator=generator)
        self.last_infer_steps = steps
        return lam

    def optimizer_state(self) -> dict:
        return {"local": self.local_opt.state_dict(), "decoder": self.decoder_opt.state_dict(),
                "sched": None if self.decoder_sched is None else self.decoder_sched.state_dict(),
                "running_mean": self.running_mean.state_dict()}

    def load_optimizer_state(self, state: dict) -> None:
        self.local_opt.load_state_dict(state["local"])
        self.decoder_opt.load_state_dict(state["decoder"])
        if self.decoder_sched is not None:
            self.decoder_sched.load_state_dict(state["sched"])
        self.running_mean.load_state_dict(state["running_mean"])


class _frozen:
    """Context manager: a module's parameters do not require grad inside."""

    def __init__(self, module: nn.Module) -> None:
        self.params = [p for p in module.parameters() if p.requires_grad]

    def __enter__(self):
        for p in self.params:
            p.requires_grad_(False)

    def __exit__(self, *exc):
        for p in self.params:
            p.requires_grad_(True)


class Amortized(InferenceMethod):
    """The VAE: λ = f_φ(x); one joint Adam/SGD step on (θ, φ) per minibatch."""

    name = "amortized"

    def __init__(self, decoder: GaussianDecoder, settings: MethodSettings) -> None:
        super().__init__(decoder, settings)
        s = settings
        self.encoder = Encoder(decoder.data_dim, decoder.latent_dim, s.encoder_hidden,
                               s.encoder_activation)
        self.opt, self.sched = make_optimizer(
            self.parameters(), s.optimizer, s.lr, rm_delay=s.rm_delay, rm_power=s.rm_power
        )

    def train_step(self, x: Tensor, idx: Tensor, generator: torch.Generator) -> Tensor:
        est = self.estimate(x, self.encoder(x), generator)
        self.opt.zero_grad(set_to_none=True)
        (-est.surrogate.mean()).backward()
        recorded = self._record(est.samples)
        self._step(self.opt, self.sched, self._stepped(self.opt))
        return recorded

    def infer(self, x: Tensor, idx: Tensor | None = None, *, generator=None) -> Tensor:
        with torch.no_grad():
            return self.encoder(x)

    def optimizer_state(self) -> dict:
        return {"opt": self.opt.state_dict(),
                "sched": None if self.sched is None else self.sched.state_dict(),
                "running_mean": self.running_mean.state_dict()}

    def load_optimizer_state(self, state: dict) -> None:
        self.opt.load_state_dict(state["opt"])
        if self.sched is not None:
            self.sched.load_state_dict(state["sched"])
        self.running_mean.load_state_dict(state["running_mean"])


class SemiAmortized(Amortized):
    """SA-VAE: encoder output refined by ``refine_steps`` ascent steps (Kim et al., 2018)."""

    name = "semi_amortized"

    def train_step(self, x: Tensor, idx: Tensor, generator: torch.Generator) -> Tensor:
        s = self.settings
        lam0 = self.encoder(x)
        lam_k = self.local_ascent(x, lam0 if s.refine_through else lam0.detach(), generator,
                                  s.refine_steps, s.refine_lr, create_graph=s.refine_through)
        dec_params = list(self.decoder.parameters())
        enc_params = list(self.encoder.parameters())
        est = self.estimate(x, lam_k.detach(), generator)  # θ at the refined λ
        dec_grads = torch.autograd.grad(-est.surrogate.mean(), dec_params)
        enc_target = lam_k if s.refine_through else lam0
        enc_est = self.estimate(x, enc_target, generator)  # φ at its own output
        enc_grads = torch.autograd.grad(-enc_est.surrogate.mean(), enc_params)
        for p, g in zip(dec_params + enc_params, dec_grads + enc_grads, strict=True):
            p.grad = g
        recorded = self._record(est.samples)
        self._step(self.opt, self.sched, dec_params + enc_params)
        return recorded

    def infer(self, x: Tensor, idx: Tensor | None = None, *, generator=None) -> Tensor:
        s = self.settings
        with torch.no_grad():
            lam0 = self.encoder(x)
        with _frozen(self.decoder):
            lam = self.local_ascent(x, lam0, generator, s.refine_steps, s.refine_lr)
        return lam.detach()


def build_method(
    method: str, decoder: GaussianDecoder, settings: MethodSettings, n_train: int
) -> InferenceMethod:
    """Construct a method by name; an unknown name lists the valid ones."""
    if method == "vem":
        return VariationalEM(decoder, settings, n_train)
    if method == "amortized":
        return Amortized(decoder, settings)
    if method == "semi_amortized":
        return SemiAmortized(decoder, settings)
    raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")


def replace_settings(settings: MethodSettings, **changes) -> MethodSettings:
    """A copy of ``settings`` with some fields changed (e.g. another estimator, same model)."""
    return dataclasses.replace(settings, **changes)
