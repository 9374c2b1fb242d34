"""Measurements taken while training or at its end: the probes (docs/results.md, "Probes").

A probe is one measurement with one options dataclass, the single source of its defaults. It
declares when it is due (``due``), whether a non-finite value means the run diverged
(``fatal``), and returns rows (one value per ensemble member) and optional per-run tables
(``vi.training.ProbeResult``). A grid names probes with their options
(``"probes": {"gaps": {"iwae_k": 1000}}``); ``build_probes`` validates them against the run's
configuration, and against the results contract (``vi.contract``: every metric and table it
writes declared), before anything is trained. Adding a measurement means adding one class, here
or in any module (subclassing ``ProbeBase`` registers it).

==================  =========================================================================
``gradvar``         gradient variance and SNR per parameter group (``vi.gradstats``) on a fixed
                    training minibatch, at log-spaced epochs and at the end
``gaps``            log p(x) by AIS (IWAE beside it), L[q*], L[q_φ], approximation and
                    amortization gaps (``vi.evaluation.gap_decomposition``), at the end;
                    tables ``gaps`` and (with a BDMC check) ``bdmc``
``test_curve``      held-out ELBO against E-steps from each of the method's starts, at the end
``exact``           closed forms of a linear decoder at each evaluation: exact log p(x) and
                    approximation gap; at the end also the PPCA maximum-likelihood target
``activity``        active units and KL per latent dimension at each evaluation; table
                    ``activity`` at the end
``images``          test images, reconstructions, decoder samples, the 2-D manifold; table
``latents``         the encoded test set with its labels; table
``variance_sweep``  gradient variance against estimator, KL mode and M at the end; table
``k_sweep``         variance, SNR and bias of the IWAE gradient against k per estimator, at
                    chosen epochs and the end; table
``iwae_bounds``     the IWAE bounds L_k of the method's own posterior for several k, at the
                    end; table
==================  =========================================================================

Every probe draws from its own streams keyed by its name and the epoch
(``ProbeContext.random``), so probes never perturb training or each other, and a probe of a saved
state is repeatable.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from vi import contract, gradstats, linear_gaussian
from vi.config import LIMITS, RunConfig, _build
from vi.evaluation import bdmc_check, gap_decomposition, latent_activity, test_time_curve
from vi.inference import StoppingRule
from vi.streams import generator
from vi.training import ProbeContext, ProbeResult

__all__ = ["PROBES", "ProbeBase", "build_probes", "probe_metrics"]

PROBES: dict[str, type[ProbeBase]] = {}


class ProbeBase:
    """A probe: ``name``, ``Options`` (a frozen dataclass subclassing ``ProbeBase.Options``),
    ``fatal``, the ``metrics`` and ``tables`` it writes; ``due(ctx)`` and ``__call__(ctx)``.

    What a probe writes is part of the results contract (``vi.contract``). The study's probes
    are declared there; a probe class may instead give its metrics as ``{name: description}``
    and its tables as ``{name: columns}``, which declares them when the class is created. On
    the class, ``metrics`` and ``tables`` then hold the names."""

    name: ClassVar[str] = ""
    fatal: ClassVar[bool] = False
    metrics: ClassVar[tuple[str, ...]] = ()
    tables: ClassVar[tuple[str, ...]] = ()
    #: the declared tables it writes only under some options (the others it always writes)
    optional_tables: ClassVar[tuple[str, ...]] = ()

    @dataclass(frozen=True)
    class Options:
        def validate(self, config: RunConfig) -> None:
            return None

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if not cls.__dict__.get("name"):  # names no probe of its own: replaces no entry
            return
        own = {k: cls.__dict__[k] for k in ("metrics", "tables") if k in cls.__dict__}
        if own:
            declared = contract.declare_probe(cls.name, own.get("metrics", ()),
                                              own.get("tables", ()))
        else:
            declared = contract.PROBES.get(cls.name, contract.ProbeContract())
        cls.metrics, cls.tables = declared.metrics, declared.tables
        PROBES[cls.name] = cls

    def __init__(self, options: Any) -> None:
        self.options = options

    def due(self, ctx: ProbeContext) -> bool:
        return ctx.final

    def __call__(self, ctx: ProbeContext) -> ProbeResult:
        raise NotImplementedError


def _check_options(name: str, cls: type[ProbeBase]) -> None:
    options = getattr(cls, "Options", None)
    if not (isinstance(options, type) and issubclass(options, ProbeBase.Options)
            and dataclasses.is_dataclass(options)):
        raise contract.ContractError(
            f"probe {name!r}: its Options must be a dataclass subclassing ProbeBase.Options "
            f"(@dataclass(frozen=True) class Options(ProbeBase.Options): ...); got {options!r}")


def build_probes(spec: dict[str, dict], config: RunConfig) -> list[ProbeBase]:
    """The probes a configuration names, checked against the results contract
    (``vi.contract.check_probe``) and their options validated: a ``ValueError`` naming the
    probe and the problem, before anything is trained."""
    probes = []
    for name, values in spec.items():
        if name not in PROBES:
            raise ValueError(f"unknown probe {name!r}; valid: {', '.join(PROBES)}")
        cls = PROBES[name]
        _check_options(name, cls)
        contract.check_probe(name)
        try:
            options = _build(cls.Options, values, f"probes.{name}.")
            options.validate(config)
        except ValueError as err:
            raise ValueError(f"probe {name!r}: {err}") from err
        probes.append(cls(options))
    return probes


def probe_metrics() -> dict[str, str]:
    """Every metric name a probe may write, with what it measures."""
    return {m: contract.METRICS[m] for cls in PROBES.values() for m in cls.metrics
            if m in contract.METRICS}


def _positive(where: str, value: int, high: int = LIMITS["steps"]) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= high:
        raise ValueError(f"{where} must be an integer in [1, {high}]; got {value!r}")


def _points(x: Tensor, points: int | None) -> Tensor:
    return x if points is None else x[:, :min(int(points), x.shape[1])]


def _per_member(values: Tensor | Sequence[float]) -> list[float]:
    return [float(v) for v in (values.tolist() if isinstance(values, Tensor) else values)]


# ------------------------------------------------------------------------- gradient variance


def _evaluation_batch(ctx: ProbeContext, size: int) -> Tensor:
    """Per member a fixed training minibatch (sorted indices [K, B]) that depends only on the
    member's seed and N: every epoch, method and estimator of a seed measures the same points."""
    n = ctx.x["train"].shape[1]
    rows = []
    for seed in ctx.seeds:
        g = generator(seed, "probe", "gradient batch")
        rows.append(torch.randperm(n, generator=g)[:min(size, n)].sort().values)
    return torch.stack(rows).to(ctx.x["train"].device)


class GradVar(ProbeBase):
    """Gradient variance and SNR per parameter group (``vi.gradstats``) with ``draws``
    single-estimate gradients of M = ``n_mc`` samples (None: the run's own M; set it to compare
    estimators at equal M) on a fixed training minibatch of ``batch`` points, at ``epochs``
    (None: 0, 1, 2, 4, 8, … and the restored best state at the end)."""

    name = "gradvar"

    @dataclass(frozen=True)
    class Options(ProbeBase.Options):
        draws: int = 100
        batch: int = 64
        n_mc: int | None = None
        epochs: tuple[int, ...] | None = None

        def validate(self, config: RunConfig) -> None:
            _positive("draws", self.draws, LIMITS["draws"])
            if self.draws < 2:
                raise ValueError("draws must be >= 2 (a variance needs two draws)")
            _positive("batch", self.batch, LIMITS["batch_size"])
            if self.n_mc is not None:
                _positive("n_mc", self.n_mc, LIMITS["n_mc"])
                from vi.estimators import validate_estimator

                validate_estimator(config.method.estimator, config.method.baseline, self.n_mc)
            for e in self.epochs or ():
                if isinstance(e, bool) or not 0 <= e <= LIMITS["epochs"]:
                    raise ValueError(f"epochs must be integers >= 0; got {e!r}")

    def due(self, ctx: ProbeContext) -> bool:
        if ctx.final:
            return True
        e = ctx.epoch
        if self.options.epochs is not None:
            return e in self.options.epochs
        return e == 0 or (e & (e - 1)) == 0

    def __call__(self, ctx: ProbeContext) -> ProbeResult:
        o = self.options
        idx = _evaluation_batch(ctx, o.batch)
        members = torch.arange(idx.shape[0], device=idx.device).unsqueeze(1)
        x = ctx.x["train"][members, idx]
        settings = ctx.method.settings
        if o.n_mc is not None:
            settings = dataclasses.replace(settings, n_mc=o.n_mc)
        grads = gradstats.per_sample_grads(ctx.method, x, idx, draws=o.draws,
                                           random=ctx.random(self.name), settings=settings)
        rows = []
        for group, g in grads.items():
            stats = gradstats.gradient_statistics(g)
            for metric in gradstats.METRICS:
                rows.append({"split": "train", "metric": metric, "param_group": group,
                             "value": _per_member(stats[metric])})
        return ProbeResult(rows)


# ------------------------------------------------------------------------------------- gaps


class Gaps(ProbeBase):
    """The gap decomposition (Cremer et al., 2018) of the final model on each of ``splits``, on
    the first ``points`` points of each split (None: all; a split with fewer points is used
    whole), and every quantity on the same points; the table's ``points`` column names them
    (``all N`` or ``first N of M``).

    q* is fitted from ``qstar_init`` by Adam (``qstar_n_mc`` samples, step ``qstar_lr``) under
    the held-out stopping rule (``vi.inference.StoppingRule``): checks every ``qstar_window``
    steps on ``qstar_check_n_mc`` common noise samples, a plateau after ``qstar_patience``
    checks without a gain above ``qstar_tol``, then the step size × ``qstar_decay``, up to
    ``qstar_decays`` times; stop at the last plateau or at ``qstar_max_steps`` (the steps,
    decays and whether the cap bound are recorded). log p(x) by AIS from q* (``vi.ais``:
    ``ais_steps`` distributions, ``ais_chains`` chains, ``ais_leapfrog`` leapfrog steps; 0
    steps: no AIS), exact for linear decoders; beside it the IWAE estimate with ``iwae_k``
    samples from the defensive proposal (mixture weight ``defensive`` on a widened copy of q*
    and the prior, ``vi.objectives.iwae_bound``), points with ESS < ``low_ess`` · k flagged;
    ELBOs with ``gap_n_mc`` samples. With ``bdmc_points`` > 0, a BDMC check of the decoder on
    that many points per member simulated from it, at the same AIS settings
    (``vi.evaluation.bdmc_check``): the per-point bounds and sandwich in table ``bdmc`` (the
    points belong to no split, so there are no metric rows)."""

    name = "gaps"
    optional_tables = ("bdmc",)  # with bdmc_points > 0 only

    @dataclass(frozen=True)
    class Options(ProbeBase.Options):
        splits: tuple[str, ...] = ("train", "test")
        points: int | None = None
        qstar_init: str = "posterior"
        qstar_n_mc: int = 10
        qstar_lr: float = 0.03
        qstar_window: int = 10
        qstar_patience: int = 3
        qstar_max_steps: int = 3000
        qstar_decays: int = 4
        qstar_decay: float = 0.3
        qstar_tol: float = 1e-3
        qstar_check_n_mc: int = 4
        iwae_k: int = 1000
        defensive: float = 0.2
        gap_n_mc: int = 1000
        low_ess: float = 0.01
        ais_steps: int = 1000
        ais_chains: int = 16
        ais_leapfrog: int = 1
        bdmc_points: int = 0

        def validate(self, config: RunConfig) -> None:
            if not self.splits or set(self.splits) - {"train", "validation", "test"}:
                raise ValueError(f"splits must name train/validation/test; got {self.splits}")
            if self.points is not None:
                _positive("points", self.points, 10_000_000)
            if self.qstar_init not in ("posterior", "prior"):
                raise ValueError(f"qstar_init must be posterior or prior; got "
                                 f"{self.qstar_init!r}")
            for name in ("qstar_n_mc", "iwae_k", "gap_n_mc", "ais_chains", "qstar_check_n_mc"):
                _positive(name, getattr(self, name), LIMITS["n_mc"])
            for name in ("qstar_window", "qstar_patience", "qstar_max_steps", "ais_leapfrog"):
                _positive(name, getattr(self, name))
            for name in ("ais_steps", "bdmc_points", "qstar_decays"):
                value = getattr(self, name)
                if not 0 <= value <= LIMITS["steps"]:
                    raise ValueError(f"{name} must be an integer in [0, {LIMITS['steps']}]; "
                                     f"got {value!r}")
            if self.bdmc_points and not self.ais_steps:
                raise ValueError("bdmc_points needs AIS (ais_steps > 0)")
            if not self.qstar_lr > 0:
                raise ValueError(f"qstar_lr must be positive; got {self.qstar_lr}")
            if not 0 <= self.defensive < 1 or not 0 <= self.low_ess <= 1:
                raise ValueError("defensive must lie in [0, 1) and low_ess in [0, 1]")
            self.rule()

        def rule(self) -> StoppingRule:
            """The q* fit's stopping rule (a ``ValueError`` for bad settings)."""
            return StoppingRule(self.qstar_window, self.qstar_patience, self.qstar_max_steps,
                                decays=self.qstar_decays, decay=self.qstar_decay,
                                tol=self.qstar_tol, check_n_mc=self.qstar_check_n_mc)

    def __call__(self, ctx: ProbeContext) -> ProbeResult:
        o = self.options
        rows, frames, tables = [], [], {}
        ais_settings = {"steps": o.ais_steps, "chains": o.ais_chains,
                        "leapfrog": o.ais_leapfrog}
        for split in o.splits:
            x = _points(ctx.x[split], o.points)
            if x.shape[1] == 0:
                continue
            total = ctx.x[split].shape[1]
            label = f"all {total}" if x.shape[1] == total else f"first {x.shape[1]} of {total}"
            result = gap_decomposition(
                ctx.method, x, qstar_init=o.qstar_init, qstar_n_mc=o.qstar_n_mc,
                qstar_lr=o.qstar_lr, qstar_rule=o.rule(), iwae_k=o.iwae_k,
                defensive=o.defensive, gap_n_mc=o.gap_n_mc, low_ess=o.low_ess,
                random=ctx.random(self.name, split), ais_steps=o.ais_steps,
                ais_chains=o.ais_chains, ais_leapfrog=o.ais_leapfrog)
            seconds = _per_member(result.means.pop("seconds"))
            for metric, values in result.means.items():
                rows.append({"split": split, "metric": metric, "value": _per_member(values),
                             "wall_s": seconds})
            frames.append(result.per_point.assign(split=split, epoch=ctx.epoch, points=label))
        if frames:
            tables["gaps"] = pd.concat(frames, ignore_index=True)
        if o.bdmc_points:
            start = time.perf_counter()
            check = bdmc_check(ctx.method, o.bdmc_points, qstar_n_mc=o.qstar_n_mc,
                               qstar_lr=o.qstar_lr, qstar_rule=o.rule(),
                               random=ctx.random(self.name, "bdmc"), **ais_settings)
            seconds = (time.perf_counter() - start) / len(ctx.seeds)
            tables["bdmc"] = check.frame.assign(epoch=ctx.epoch, ais_steps=o.ais_steps,
                                                ais_chains=o.ais_chains, wall_s=seconds)
        return ProbeResult(rows, tables)


# ---------------------------------------------------------------------- test-time inference


class TestCurve(ProbeBase):
    """Held-out ELBO after s E-steps for s in ``steps`` from each of the method's starts, on
    the first ``points`` points of ``split``, ELBOs with ``n_mc`` samples; ``wall_s`` holds
    seconds per point (the ``step`` column holds s)."""

    __test__ = False
    name = "test_curve"

    @dataclass(frozen=True)
    class Options(ProbeBase.Options):
        steps: tuple[int, ...] = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256)
        points: int | None = 100
        n_mc: int = 100
        split: str = "test"

        def validate(self, config: RunConfig) -> None:
            if not self.steps:
                raise ValueError("steps must list at least one count")
            for s in self.steps:
                if isinstance(s, bool) or not 0 <= s <= LIMITS["steps"]:
                    raise ValueError(f"steps must be integers in [0, {LIMITS['steps']}]; "
                                     f"got {s!r}")
            if self.points is not None:
                _positive("points", self.points, 10_000_000)
            _positive("n_mc", self.n_mc, LIMITS["n_mc"])
            if self.split not in ("train", "validation", "test"):
                raise ValueError(f"unknown split {self.split!r}")

    def __call__(self, ctx: ProbeContext) -> ProbeResult:
        o = self.options
        x = _points(ctx.x[o.split], o.points)
        rows = []
        for init, s, value, per_point in test_time_curve(ctx.method, x, list(o.steps),
                                                         n_mc=o.n_mc,
                                                         random=ctx.random(self.name)):
            rows.append({"split": o.split, "metric": "test_curve_elbo", "param_group": init,
                         "step": s, "value": _per_member(value),
                         "wall_s": per_point})
        return ProbeResult(rows)


# --------------------------------------------------------------------------- closed forms


class Exact(ProbeBase):
    """Closed forms of a linear decoder (docs/model.md): exact log p(x) and the approximation
    gap of the trained decoder on every evaluated split at each evaluation; at the end also the
    PPCA maximum-likelihood fit of the training split, the target the ELBO should reach."""

    name = "exact"
    fatal = True

    @dataclass(frozen=True)
    class Options(ProbeBase.Options):
        def validate(self, config: RunConfig) -> None:
            m = config.model
            if m.decoder_mean != "linear":
                raise ValueError("needs a linear decoder (model.decoder_mean = 'linear')")
            if m.decoder_variance != "learned" or not m.isotropic:
                raise ValueError("compares with the PPCA maximum-likelihood fit: use "
                                 "model.decoder_variance = 'learned' and model.isotropic = true")

    def due(self, ctx: ProbeContext) -> bool:
        return ctx.evaluating or ctx.final

    def __call__(self, ctx: ProbeContext) -> ProbeResult:
        decoder = ctx.method.decoder
        rows = []
        splits = [s for s in ctx.configs[0].training.eval_splits if ctx.x[s].shape[1]]
        with torch.no_grad():
            W, b, psi = (t.double() for t in decoder.linear_parameters())
            gaps = [float(linear_gaussian.approximation_gap(W[k], psi[k]))
                    for k in range(W.shape[0])]
            for split in splits:
                x = ctx.x[split].double()
                cov = W @ W.transpose(-1, -2) + torch.diag_embed(psi)
                lp = torch.distributions.MultivariateNormal(b.unsqueeze(1), cov.unsqueeze(1))
                rows.append({"split": split, "metric": "log_px_exact",
                             "value": _per_member(lp.log_prob(x).mean(1))})
                rows.append({"split": split, "metric": "approximation_gap", "value": gaps})
            if ctx.final:
                mle = [linear_gaussian.ppca_mle(ctx.x["train"][k].double(), W.shape[-1])
                       for k in range(W.shape[0])]
                gap_m = [float(linear_gaussian.approximation_gap(Wm, s2.expand(Wm.shape[0])))
                         for Wm, _, s2 in mle]
                for split in splits:
                    values = [float(linear_gaussian.exact_log_marginal(
                        ctx.x[split][k].double(), Wm, bm, s2.expand(Wm.shape[0])).mean())
                        for k, (Wm, bm, s2) in enumerate(mle)]
                    rows.append({"split": split, "metric": "log_px_mle", "value": values})
                    rows.append({"split": split, "metric": "approximation_gap_mle",
                                 "value": gap_m})
        return ProbeResult(rows)


# -------------------------------------------------------------------------- latent activity


class Activity(ProbeBase):
    """Posterior collapse made visible: active units (Burda et al., 2016: a latent dimension is
    active when Cov_x(E_q[z_h]) > ``threshold``) and the KL of each latent dimension, averaged
    over the points of ``split``, under the method's own posterior, at each evaluation; the
    per-dimension values at the end as table ``activity``."""

    name = "activity"

    @dataclass(frozen=True)
    class Options(ProbeBase.Options):
        threshold: float = 0.01
        split: str = "test"

        def validate(self, config: RunConfig) -> None:
            if not self.threshold >= 0:
                raise ValueError(f"threshold must be >= 0; got {self.threshold}")
            if self.split not in ("train", "validation", "test"):
                raise ValueError(f"unknown split {self.split!r}")

    def due(self, ctx: ProbeContext) -> bool:
        return ctx.evaluating or ctx.final

    def __call__(self, ctx: ProbeContext) -> ProbeResult:
        o = self.options
        a = latent_activity(ctx.method, ctx.x[o.split], threshold=o.threshold,
                            random=ctx.random(self.name))
        rows = [{"split": o.split, "metric": "active_units", "value": _per_member(
                    a.active_units)},
                {"split": o.split, "metric": "kl_total", "value": _per_member(
                    a.kl_per_dim.sum(1))}]
        tables = {}
        if ctx.final:
            k, h = a.kl_per_dim.shape
            tables["activity"] = pd.DataFrame({
                "member": np.repeat(np.arange(k), h), "epoch": ctx.epoch, "split": o.split,
                "dim": np.tile(np.arange(1, h + 1), k),
                "kl_per_dim": a.kl_per_dim.cpu().numpy().reshape(-1),
                "activity": a.activity.cpu().numpy().reshape(-1),
                "active": (a.activity > o.threshold).cpu().numpy().reshape(-1)})
        return ProbeResult(rows, tables)


# ------------------------------------------------------------------------------- pictures


class Images(ProbeBase):
    """Test images and their reconstructions μ_θ(E_q[z]) under the method's own q, decoder
    samples μ_θ(z), z ~ N(0, I), and for H = 2 the manifold μ_θ(Φ⁻¹(u)) over a
    ``manifold`` x ``manifold`` grid of u in (0, 1)²; one image a row, pixels as columns."""

    name = "images"

    @dataclass(frozen=True)
    class Options(ProbeBase.Options):
        n_recon: int = 16
        n_samples: int = 16
        manifold: int = 12

        def validate(self, config: RunConfig) -> None:
            for name in ("n_recon", "n_samples", "manifold"):
                _positive(name, getattr(self, name), 1000)

    def __call__(self, ctx: ProbeContext) -> ProbeResult:
        o = self.options
        random = ctx.random(self.name)
        dec, h = ctx.method.decoder, ctx.method.decoder.latent_dim
        x = ctx.x["test"][:, :o.n_recon]
        k_members, d = x.shape[0], dec.data_dim
        labels = ctx.labels.get("test")
        lam, _ = ctx.method.infer(x, random)
        with torch.no_grad():
            recon = dec.mean_and_variance(lam[..., :h].detach())[0]
            z = random.randn((o.n_samples, h), 0, dtype=x.dtype)
            parts = [("data", x, None), ("reconstruction", recon, None),
                     ("sample", dec.mean_and_variance(z)[0], None)]
            if h == 2:
                m = o.manifold
                u = torch.linspace(0.5 / m, 1 - 0.5 / m, m, dtype=x.dtype, device=x.device)
                grid = torch.special.ndtri(u)
                zz = torch.stack(torch.meshgrid(grid, grid.flip(0), indexing="xy"),
                                 -1).reshape(-1, 2)
                zk = zz.expand(k_members, -1, -1).contiguous()
                parts.append(("manifold", dec.mean_and_variance(zk)[0], zz))
        height, width, index = _layout(ctx, d)
        frames = []
        for kind, images, coords in parts:
            n = images.shape[1]
            pixels = images.float().cpu().numpy().reshape(k_members * n, d)
            cols: dict[str, Any] = {"member": np.repeat(np.arange(k_members), n),
                                    "kind": kind, "index": np.tile(np.arange(n), k_members)}
            if kind in ("data", "reconstruction") and labels is not None:
                cols["label"] = labels[:, :n].reshape(-1).numpy()
            else:
                cols["label"] = pd.array([None] * (k_members * n), dtype="Int64")
            zs = (np.tile(coords.cpu().numpy(), (k_members, 1)) if coords is not None
                  else np.full((k_members * n, 2), np.nan))
            cols["z1"], cols["z2"] = zs[:, 0], zs[:, 1]
            cols["height"], cols["width"] = height, width
            frame = pd.DataFrame(cols)
            pix = pd.DataFrame(pixels, columns=index)
            frames.append(pd.concat([frame, pix], axis=1))
        out = pd.concat(frames, ignore_index=True)
        out["label"] = out["label"].astype("Int64")
        out.insert(1, "epoch", ctx.epoch)
        return ProbeResult([], {"images": out})


def _layout(ctx: ProbeContext, d: int) -> tuple[int, int, list[str]]:
    """(height, width, pixel column names) of the D coordinates: the data's image shape when it
    has one (else a square, else one row), and one column ``p<j>`` per coordinate, j its flat
    row-major index in the image (the kept pixels only, when the data keep some)."""
    if ctx.image_shape is not None:
        height, width = ctx.image_shape
    else:
        side = round(math.sqrt(d))
        height, width = (side, side) if side * side == d else (1, d)
    index = ctx.pixels if ctx.pixels is not None else list(range(d))
    if len(index) != d or max(index) >= height * width:
        height, width, index = 1, d, list(range(d))
    digits = len(str(height * width - 1))
    return height, width, [f"p{j:0{digits}d}" for j in index]


class Latents(ProbeBase):
    """The encoded test set: mean and log-variance of the method's own q per test point, with
    the digit labels."""

    name = "latents"

    @dataclass(frozen=True)
    class Options(ProbeBase.Options):
        def validate(self, config: RunConfig) -> None:
            from vi.data import LABELLED

            if config.data.name not in LABELLED:
                raise ValueError(f"needs labelled data ({', '.join(LABELLED)}); "
                                 f"{config.data.name!r} has none")

    def __call__(self, ctx: ProbeContext) -> ProbeResult:
        x = ctx.x["test"]
        lam, _ = ctx.method.infer(x, ctx.random(self.name))
        lam = lam.detach().float().cpu().numpy()
        k_members, n = x.shape[:2]
        h = ctx.method.decoder.latent_dim
        cols: dict[str, Any] = {"member": np.repeat(np.arange(k_members), n),
                                "epoch": ctx.epoch, "point": np.tile(np.arange(n), k_members),
                                "label": ctx.labels["test"].reshape(-1).numpy()}
        for j in range(h):
            cols[f"mu{j + 1}"] = lam[:, :, j].reshape(-1)
        for j in range(h):
            cols[f"logvar{j + 1}"] = lam[:, :, h + j].reshape(-1)
        return ProbeResult([], {"latents": pd.DataFrame(cols)})


# --------------------------------------------------------------------------- variance sweep


class VarianceSweep(ProbeBase):
    """Gradient variance against estimator, KL mode and M (``n_mc``) at the final state, with
    ``draws`` draws on a fixed training minibatch of ``batch`` points (``vi.gradstats.
    variance_sweep``; common random numbers across estimators). Table ``variance_sweep``:
    the measured estimator in ``grad_estimator``/``grad_baseline``/``grad_kl``/``grad_n_mc``
    (the run's own training estimator stays in ``estimator``)."""

    name = "variance_sweep"
    fatal = True

    @dataclass(frozen=True)
    class Options(ProbeBase.Options):
        n_mc: tuple[int, ...] = (1, 4, 16)
        draws: int = 100
        batch: int = 64
        estimators: tuple[tuple[str, ...], ...] = gradstats.SWEEP_ESTIMATORS

        def validate(self, config: RunConfig) -> None:
            from vi.estimators import validate_estimator
            from vi.objectives import KL_MODES

            if not self.n_mc:
                raise ValueError("n_mc must list at least one sample count")
            for m in self.n_mc:
                _positive("n_mc", m, LIMITS["n_mc"])
            _positive("draws", self.draws, LIMITS["draws"])
            if self.draws < 2:
                raise ValueError("draws must be >= 2")
            _positive("batch", self.batch, LIMITS["batch_size"])
            for entry in self.estimators:
                if len(entry) != 3 or entry[2] not in KL_MODES:
                    raise ValueError(f"estimators entries are [estimator, baseline, kl]; got "
                                     f"{list(entry)}")
                validate_estimator(entry[0], entry[1])

    def __call__(self, ctx: ProbeContext) -> ProbeResult:
        o = self.options
        idx = _evaluation_batch(ctx, o.batch)
        members = torch.arange(idx.shape[0], device=idx.device).unsqueeze(1)
        rows = gradstats.variance_sweep(
            ctx.method, ctx.x["train"][members, idx], idx,
            estimators=[tuple(e) for e in o.estimators], n_mcs=list(o.n_mc), draws=o.draws,
            random=ctx.random(self.name))
        frame = pd.DataFrame(rows).rename(columns={
            "estimator": "grad_estimator", "baseline": "grad_baseline", "kl": "grad_kl",
            "n_mc": "grad_n_mc"})
        frame.insert(1, "epoch", ctx.epoch)
        finite = np.isfinite(frame["value"].to_numpy(dtype=float))
        failed = set(frame.loc[~finite, "member"].astype(int).tolist())
        return ProbeResult([], {"variance_sweep": frame[finite].reset_index(drop=True)},
                           failed)


# ------------------------------------------------------------------- multi-sample objectives


class KSweep(ProbeBase):
    """Gradient variance and SNR of the IWAE bound L_k against k at a fixed number M =
    ``n_mc`` of groups (``vi.gradstats.k_sweep``; Rainforth et al. 2018, Tucker et al. 2019),
    per parameter group and (estimator, baseline) of ``estimators`` (score with ``loo`` is
    VIMCO), with ``draws`` draws on a fixed training minibatch of ``batch`` points and common
    random numbers across estimators at each k; every estimator but ``reference`` also gets its
    bias against the reference's draws (``vi.gradstats.bias_statistics``). Measured at
    ``epochs`` (during training, where the inference gradient still has a signal; none: none)
    and at the final state. Table ``k_sweep``: the measured estimator in ``grad_estimator``/
    ``grad_baseline``/``grad_k``/``grad_n_mc`` (the run's own stays in ``estimator``)."""

    name = "k_sweep"
    fatal = True

    @dataclass(frozen=True)
    class Options(ProbeBase.Options):
        ks: tuple[int, ...] = (1, 4, 16, 64)
        n_mc: int = 1
        draws: int = 100
        batch: int = 64
        estimators: tuple[tuple[str, ...], ...] = gradstats.IWAE_SWEEP_ESTIMATORS
        reference: tuple[str, ...] | None = ("reparam", "none")
        epochs: tuple[int, ...] = ()

        def validate(self, config: RunConfig) -> None:
            from vi.estimators import ESTIMATORS

            if not self.ks:
                raise ValueError("ks must list at least one k")
            for k in self.ks:
                _positive("ks", k, LIMITS["n_mc"])
            _positive("n_mc", self.n_mc, LIMITS["n_mc"])
            _positive("draws", self.draws, LIMITS["draws"])
            if self.draws < 2:
                raise ValueError("draws must be >= 2")
            _positive("batch", self.batch, LIMITS["batch_size"])
            _positive("n_mc x max(ks)", self.n_mc * max(self.ks), LIMITS["n_mc"])
            if not self.estimators:
                raise ValueError("estimators must list at least one [estimator, baseline]")
            for entry in self.estimators:
                if len(entry) != 2 or entry[0] not in ESTIMATORS:
                    raise ValueError(f"estimators entries are [estimator, baseline] with an "
                                     f"estimator of {', '.join(ESTIMATORS)}; got {list(entry)}")
                if not any((s := ESTIMATORS[entry[0]].support(int(k))) is not None
                           and entry[1] in s.baselines for k in self.ks):
                    raise ValueError(f"{list(entry)} is supported at none of ks {list(self.ks)}")
            if self.reference is not None and tuple(self.reference) not in [
                    tuple(e) for e in self.estimators]:
                raise ValueError(f"reference {list(self.reference)} is not one of the "
                                 f"estimators")
            for e in self.epochs:
                if isinstance(e, bool) or not 0 <= e <= LIMITS["epochs"]:
                    raise ValueError(f"epochs must be integers >= 0; got {e!r}")

    def __init__(self, options: Any) -> None:
        super().__init__(options)
        #: the measurements made during training: the trainer keeps a probe's tables only at
        #: the end, so they are held here, per member, and published with every final call
        #: that member takes part in (a run resumed from a checkpoint has those made after it
        #: resumed). Members are keyed by their configuration object (held, so its id is not
        #: reused), which stays the same while an ensemble's members finish at different
        #: epochs and its member indices shift; a final call probes every member of the
        #: finishing subset at each of their best epochs and the trainer keeps, per member,
        #: the table of its own best epoch, so nothing is consumed by a final call.
        self.pending: dict[int, tuple[RunConfig, list[pd.DataFrame]]] = {}

    def due(self, ctx: ProbeContext) -> bool:
        return ctx.final or ctx.epoch in self.options.epochs

    def __call__(self, ctx: ProbeContext) -> ProbeResult:
        o = self.options
        idx = _evaluation_batch(ctx, o.batch)
        members = torch.arange(idx.shape[0], device=idx.device).unsqueeze(1)
        rows = gradstats.k_sweep(
            ctx.method, ctx.x["train"][members, idx], idx, ks=list(o.ks), n_mc=o.n_mc,
            draws=o.draws, random=ctx.random(self.name),
            estimators=[tuple(e) for e in o.estimators],
            reference=tuple(o.reference) if o.reference is not None else None)
        frame = pd.DataFrame(rows, columns=["member", "param_group", "estimator", "baseline",
                                            "objective", "k", "n_mc", "draws", "metric",
                                            "value"])
        frame = frame.drop(columns="objective").rename(columns={
            "estimator": "grad_estimator", "baseline": "grad_baseline", "k": "grad_k",
            "n_mc": "grad_n_mc"})
        frame.insert(1, "epoch", ctx.epoch)
        finite = np.isfinite(frame["value"].to_numpy(dtype=float))
        failed = set(frame.loc[~finite, "member"].astype(int).tolist())
        frame = frame[finite]
        if not ctx.final:
            for k, part in frame.groupby("member"):
                config = ctx.configs[int(k)]
                self.pending.setdefault(id(config), (config, []))[1].append(part)
            return ProbeResult([], {}, failed)
        held = [part.assign(member=k) for k, config in enumerate(ctx.configs)
                for part in self.pending.get(id(config), (config, []))[1]]
        out = pd.concat([*held, frame], ignore_index=True)
        return ProbeResult([], {"k_sweep": out}, failed)


class IwaeBounds(ProbeBase):
    """The importance-weighted bounds L_k (Burda, Grosse & Salakhutdinov 2016) of the method's
    own posterior q (the encoder's output, or vem's held-out fit), for each k of ``ks``, on the
    first ``points`` points of each of ``splits``, at the end:

        L̂_k(x) = (1/R) Σ_r log (1/k) Σ_i p_θ(x, z_{r,i}) / q(z_{r,i}; λ(x)),   z ~ q,

    with R = ``repeats`` groups per point; k = 1 is the ELBO with the Monte Carlo KL. Table
    ``iwae_bounds``: per split and k the mean over the points (``value``) and its standard error
    over the points (``se``), with the points used (``all N`` / ``first N of M``)."""

    name = "iwae_bounds"

    #: samples per chunk of points (points x repeats x k): bounds the memory of one chunk
    CHUNK_SAMPLES = 2**18

    @dataclass(frozen=True)
    class Options(ProbeBase.Options):
        ks: tuple[int, ...] = (1, 5, 50, 500)
        splits: tuple[str, ...] = ("test",)
        points: int | None = 500
        repeats: int = 4

        def validate(self, config: RunConfig) -> None:
            if not self.ks:
                raise ValueError("ks must list at least one k")
            for k in self.ks:
                _positive("ks", k, LIMITS["n_mc"])
            _positive("repeats", self.repeats, LIMITS["n_mc"])
            if not self.splits or set(self.splits) - {"train", "validation", "test"}:
                raise ValueError(f"splits must name train/validation/test; got {self.splits}")
            if self.points is not None:
                _positive("points", self.points, 10_000_000)

    def __call__(self, ctx: ProbeContext) -> ProbeResult:
        from vi.objectives import iwae

        o = self.options
        random = ctx.random(self.name)
        dec = ctx.method.decoder
        family = ctx.method.settings.family
        frames, failed = [], set()
        for split in o.splits:
            x = _points(ctx.x[split], o.points)
            n, total = x.shape[1], ctx.x[split].shape[1]
            if n == 0:
                continue
            label = f"all {total}" if n == total else f"first {n} of {total}"
            lam, _ = ctx.method.infer(x, random)
            lam = lam.detach()
            for k in map(int, o.ks):
                s = o.repeats * k
                step = max(1, self.CHUNK_SAMPLES // s)
                parts = []
                with torch.no_grad():
                    for start in range(0, n, step):  # chunks bound the memory of k samples
                        xb, lb = x[:, start:start + step], lam[:, start:start + step]
                        eps = random.randn((s, xb.shape[1], dec.latent_dim), 1, dtype=x.dtype)
                        parts.append(iwae(dec, xb, lb, eps, k, family=family).samples.mean(0))
                per_point = torch.cat(parts, 1).double()  # [K, N]
                bad = ~torch.isfinite(per_point).all(1)
                failed |= set(torch.nonzero(bad).reshape(-1).tolist())
                se = (per_point.std(1, correction=1) / math.sqrt(n) if n > 1
                      else torch.full_like(per_point[:, 0], torch.nan))
                frames.append(pd.DataFrame({
                    "member": np.arange(per_point.shape[0]), "epoch": ctx.epoch,
                    "split": split, "k": k, "points": label,
                    "value": per_point.mean(1).cpu().numpy(), "se": se.cpu().numpy()}))
        table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(
            columns=["member", "epoch", "split", "k", "points", "value", "se"])
        table = table[~table["member"].isin(failed)].reset_index(drop=True)
        return ProbeResult([], {"iwae_bounds": table}, failed)
