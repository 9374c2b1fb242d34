"""The run configuration: nested plain values, each default stated once (docs/results.md).

A run is a ``RunConfig`` and nothing else::

    RunConfig(
        data=DataConfig(name="digits", seed=None, test_fraction=0.2, validation_fraction=0.1),
        model=ModelConfig(latent_dim=5, hidden=(64,)),
        method=MethodSettings(name="vem", estimator="score", baseline="loo", n_mc=4, ...),
        training=TrainingConfig(max_epochs=400, batch_size=100, stopping=StoppingConfig()),
        probes={"gaps": {"iwae_k": 1000}},
        seed=0,
    )

``RunConfig.from_dict`` builds it from nested dicts (parsed JSON), rejecting unknown keys, wrong
types, non-finite numbers and values out of range with a message naming the field; ``to_dict``
gives the nested dict back (JSON round trip). Probe options are validated by ``vi.probes``
(which owns their defaults); here they are plain dicts.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import struct
import sys
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from vi.inference import STEP_SIZE_FIELDS, MethodSettings, StoppingRule

__all__ = [
    "DTYPES",
    "FLOAT_MAX",
    "LIMITS",
    "DataConfig",
    "ModelConfig",
    "RunConfig",
    "StoppingConfig",
    "TrainingConfig",
    "ensemble_key",
]

DTYPES = ("float32", "float64")
#: upper bounds on sizes, checked before anything is allocated (a typo such as 1e9 epochs or a
#: width of 10^7 is an error, not a run that never ends or exhausts memory)
LIMITS = {"latent_dim": 4096, "width": 65536, "n_mc": 100_000, "epochs": 1_000_000,
          "batch_size": 10_000_000, "steps": 1_000_000, "draws": 100_000, "seed": 2**32 - 1}


@dataclass(frozen=True)
class DataConfig:
    """Which data, and how it is split. ``seed`` None: the split is drawn from the run's seed
    (so seeds vary the split too); an integer fixes it across seeds."""

    name: str = "digits"
    options: dict = field(default_factory=dict)
    path: str | None = None
    seed: int | None = None
    test_fraction: float = 0.2
    validation_fraction: float = 0.1

    def validate(self) -> None:
        for name in ("test_fraction", "validation_fraction"):
            value = getattr(self, name)
            if not (math.isfinite(value) and 0.0 <= value < 1.0):
                raise ValueError(f"data.{name} must lie in [0, 1); got {value}")
        if self.test_fraction + self.validation_fraction >= 1.0:
            raise ValueError("data.test_fraction + data.validation_fraction must be < 1")
        if self.seed is not None:
            _in_range("data.seed", self.seed, 0, LIMITS["seed"])


@dataclass(frozen=True)
class ModelConfig:
    """The decoder p_θ(x | z) (docs/model.md). ``var_floor`` None: chosen from the data's
    quantization (``vi.data.variance_floor``). ``init_from_data``: start at the no-latent
    Gaussian of the training data (output bias = its mean, learned σ² = its variance; else
    σ² = ``init_var``)."""

    latent_dim: int = 5
    decoder_mean: str = "mlp"
    decoder_variance: str = "learned"
    isotropic: bool = False
    hidden: tuple[int, ...] = (256,)
    activation: str = "tanh"
    var_floor: float | None = None
    fixed_var: float = 1.0
    init_var: float = 1.0
    init_from_data: bool = True

    def validate(self) -> None:
        _in_range("model.latent_dim", self.latent_dim, 1, LIMITS["latent_dim"])
        for w in self.hidden:
            _in_range("model.hidden width", w, 1, LIMITS["width"])
        for name in ("fixed_var", "init_var"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"model.{name} must be a finite positive number; got {value}")
        if self.var_floor is not None and not (math.isfinite(self.var_floor)
                                               and 0 <= self.var_floor < self.init_var):
            raise ValueError(f"model.var_floor must be null or in [0, init_var); got "
                             f"{self.var_floor}")


@dataclass(frozen=True)
class StoppingConfig:
    """The plateau rule on the validation ELBO, with step-size decays (``vi.training``).

    Checks: the validation ELBO is evaluated every ``check_every`` epochs up to epoch
    2 · ``check_span``, then every ``check_every`` · 2^⌊log2(e / check_span)⌋ epochs (every 10
    from epoch 400, 20 from 800, 40 from 1,600 at the defaults), and at ``max_epochs``: the
    checks of a long run thin out geometrically (``check_span`` = 0: a fixed interval), since
    each check costs vem a held-out fit of the validation split.

    Phases: a check *gains* when it beats the best check of its phase by more than
    ``min_delta`` nats. A phase begun at epoch s (0, or its last decay) is at its plateau at a
    check at epoch e when its last gain g is far enough back:

        e − g ≥ max(patience · interval(e), window_fraction · (e − s)),

    i.e. neither ``patience`` checks nor the last ``window_fraction`` of the phase gained
    ``min_delta``: the rule stops what gains less than about min_delta / (window_fraction ·
    (e − s)) nats per epoch, a threshold that falls as the phase goes on, so a slow but
    steady climb (vem on digits: ~7 · 10⁻⁴ nat per epoch from epoch 1,000 to 2,000) is not
    taken for a plateau; and never before epoch ``min_epochs`` (a decoder started at the
    no-latent Gaussian can dip below it for a few epochs before its latent variables pay off),
    nor before a phase begun by a decay at s has lasted ``phase_fraction`` · s epochs. At a
    plateau every training step size of the run (decoder θ, encoder φ, vem's local table λ:
    the optimisers' step sizes) is multiplied by ``decay`` and a new phase begins, up to
    ``decays`` times; training stops at the last phase's plateau (``plateau``) or at
    ``max_epochs``; the state with the highest validation ELBO of any check is restored.
    (Decaying the step size on a plateau lowers the noise floor of a constant step: Robbins and
    Monro's remedy; Keras' and PyTorch's ``ReduceLROnPlateau``.) ``decays = 0``,
    ``window_fraction = 0``, ``phase_fraction = 0`` and ``check_span = 0`` is the plain plateau
    rule. With the defaults, digits H = 5 reparam runs end within 0.3 nat of a 3,000-epoch
    cosine schedule (``benchmarks/long_schedule.py``).

    The run's outcome (``vi.contract.OUTCOMES``) is judged with the margins below, in nats per
    point of the validation ELBO: ``stuck`` when its best is less than ``stuck_margin`` above
    the no-latent Gaussian fitted to the training split, ``collapsed`` when its last check is
    more than ``collapse_margin`` below its best and its training ELBO fell by as much (a
    validation ELBO that falls alone is overfitting, undone by restoring the best state);
    otherwise ``converged`` when the rule stopped it and ``cap`` when ``max_epochs`` did."""

    check_every: int = 5
    patience: int = 6
    min_delta: float = 0.1
    min_epochs: int = 50
    decays: int = 2
    decay: float = 0.3
    window_fraction: float = 0.3
    phase_fraction: float = 0.25
    check_span: int = 200
    stuck_margin: float = 0.5
    collapse_margin: float = 1.0

    def interval(self, epoch: int) -> int:
        """Epochs between checks around ``epoch``: ``check_every`` × 2^⌊log2(epoch /
        check_span)⌋ from epoch 2 · ``check_span`` on (``check_every`` before, and always when
        ``check_span`` = 0): the checks of a long run thin out geometrically."""
        if not self.check_span or epoch < 2 * self.check_span:
            return self.check_every
        return self.check_every * 2 ** (int(epoch // self.check_span).bit_length() - 1)

    def due(self, epoch: int) -> bool:
        """Whether the rule checks at the end of ``epoch``."""
        return epoch % self.interval(epoch) == 0

    def validate(self) -> None:
        _in_range("training.stopping.check_every", self.check_every, 1, LIMITS["epochs"])
        _in_range("training.stopping.patience", self.patience, 1, LIMITS["epochs"])
        _in_range("training.stopping.min_epochs", self.min_epochs, 0, LIMITS["epochs"])
        _in_range("training.stopping.decays", self.decays, 0, 100)
        _in_range("training.stopping.check_span", self.check_span, 0, LIMITS["epochs"])
        if not (math.isfinite(self.min_delta) and self.min_delta >= 0):
            raise ValueError(f"training.stopping.min_delta must be finite and >= 0; got "
                             f"{self.min_delta}")
        if not (math.isfinite(self.window_fraction) and 0 <= self.window_fraction < 1):
            raise ValueError(f"training.stopping.window_fraction must lie in [0, 1); got "
                             f"{self.window_fraction}")
        if not (math.isfinite(self.phase_fraction) and 0 <= self.phase_fraction <= 10):
            raise ValueError(f"training.stopping.phase_fraction must lie in [0, 10]; got "
                             f"{self.phase_fraction}")
        if not (math.isfinite(self.decay) and 0 < self.decay < 1):
            raise ValueError(f"training.stopping.decay must lie in (0, 1); got {self.decay}")
        for name in ("stuck_margin", "collapse_margin"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"training.stopping.{name} must be finite and >= 0; got "
                                 f"{value}")


@dataclass(frozen=True)
class TrainingConfig:
    """The training loop. Evaluations (ELBO of every split in ``eval_splits``, ``eval_n_mc``
    samples a point, over the first ``eval_points`` points of each split when set: the splits
    are random permutations, so that is a random subset, the same at every evaluation) happen
    at epoch 0, at ``eval_per_decade`` log-spaced epochs per factor of
    ten (dense early, sparse late), every ``eval_every`` epochs if set, and at the restored
    best epoch. ``stopping`` None trains exactly ``max_epochs`` epochs."""

    max_epochs: int = 400
    batch_size: int = 100
    stopping: StoppingConfig | None = field(default_factory=StoppingConfig)
    eval_splits: tuple[str, ...] = ("train", "validation", "test")
    eval_n_mc: int = 10
    eval_points: int | None = None
    eval_per_decade: int = 8
    eval_every: int | None = None

    def validate(self) -> None:
        _in_range("training.max_epochs", self.max_epochs, 1, LIMITS["epochs"])
        _in_range("training.batch_size", self.batch_size, 1, LIMITS["batch_size"])
        _in_range("training.eval_n_mc", self.eval_n_mc, 1, LIMITS["n_mc"])
        _in_range("training.eval_per_decade", self.eval_per_decade, 0, 1000)
        if self.eval_every is not None:
            _in_range("training.eval_every", self.eval_every, 1, LIMITS["epochs"])
        if self.eval_points is not None:
            _in_range("training.eval_points", self.eval_points, 1, LIMITS["batch_size"])
        bad = sorted(set(self.eval_splits) - {"train", "validation", "test"})
        if bad or not self.eval_splits:
            raise ValueError(f"training.eval_splits must name train, validation and/or test; "
                             f"got {list(self.eval_splits)}")
        if self.stopping is not None:
            self.stopping.validate()

    def evaluation_epochs(self) -> list[int]:
        """Epochs with a full evaluation: 0, log-spaced, every ``eval_every``, the last."""
        n = self.max_epochs
        epochs = {0, n}
        if self.eval_per_decade:
            decades = math.log10(n) if n > 1 else 0.0
            count = math.ceil(decades * self.eval_per_decade)
            epochs |= {min(n, round(10 ** (i / self.eval_per_decade)))
                       for i in range(count + 1)}
        if self.eval_every:
            epochs |= set(range(self.eval_every, n + 1, self.eval_every))
        return sorted(epochs)


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines a run (see the module docstring)."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodSettings = field(default_factory=MethodSettings)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    probes: dict = field(default_factory=dict)
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"

    @property
    def data_seed(self) -> int:
        return self.seed if self.data.seed is None else self.data.seed

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RunConfig:
        """Build and validate a configuration from nested plain values."""
        config = _build(cls, values, "")
        config.validate()
        return config

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))

    def replace(self, **sections: Any) -> RunConfig:
        """A copy with top-level fields or whole sections replaced (then validated)."""
        out = dataclasses.replace(self, **sections)
        out.validate()
        return out

    def parameter_count(self, data_dim: int) -> int:
        """An upper bound on the parameters of one member: the decoder's (an MLP's weights and
        biases, or a linear map, and a variance per coordinate) and an encoder's."""
        m, h = self.model, self.model.latent_dim
        sizes = [h, *m.hidden, 2 * data_dim] if m.decoder_mean == "mlp" else [h, data_dim]
        decoder = sum((a + 1) * b for a, b in itertools.pairwise(sizes)) + data_dim
        enc = [data_dim, *self.method.encoder_hidden, self.lambda_dim()]
        encoder = sum((a + 1) * b for a, b in itertools.pairwise(enc))
        return decoder + encoder

    def lambda_dim(self) -> int:
        """P, the length of one point's variational parameters λ in the method's family
        (``vi.families``): 2H diagonal, H + H(H+1)/2 full covariance, 2H + S(2H + 1) flow."""
        from vi.families import get_family

        return get_family(self.method.family).param_dim(self.model.latent_dim)

    def memory_bytes(self, data_dim: int, n_train: int, n_eval: int, members: int = 1) -> int:
        """A rough upper estimate of the memory a run needs (bytes), to refuse impossible sizes
        before anything is allocated: parameters with their gradients, optimiser moments and
        best-state snapshot, a local table of P = ``lambda_dim()`` numbers per point with its
        per-row state, and the activations of a training step and of a held-out fit over
        ``n_eval`` points."""
        m, p = self.model, self.lambda_dim()
        width = max(data_dim, p, *m.hidden, *self.method.encoder_hidden)
        params = 4 * 6 * self.parameter_count(data_dim)
        table = n_train * p * (3 * 4 + 8)
        n_mc = self.method.n_mc
        step = 4 * 8 * n_mc * self.training.batch_size * width
        heldout = 4 * 8 * n_mc * max(n_eval, 1) * width
        return int(members * (params + table + step + heldout))

    def validate(self) -> None:
        from vi.data import DATASETS
        from vi.decoders import MEANS, VARIANCES
        from vi.nets import ACTIVATIONS

        if self.data.name not in DATASETS:
            raise ValueError(f"unknown dataset {self.data.name!r}; valid: {', '.join(DATASETS)}")
        self.data.validate()
        self.model.validate()
        m = self.model
        for kind, value, valid in (("decoder_mean", m.decoder_mean, MEANS),
                                   ("decoder_variance", m.decoder_variance, VARIANCES),
                                   ("activation", m.activation, tuple(ACTIVATIONS))):
            if value not in valid:
                raise ValueError(f"unknown model.{kind} {value!r}; valid: {', '.join(valid)}")
        if m.decoder_mean == "linear" and m.decoder_variance == "heteroscedastic":
            raise ValueError("a linear decoder has no heteroscedastic variant; use fixed/learned")
        # sizes and step sizes first, by their configuration names; then the method's own rules
        _in_range("method.n_mc", self.method.n_mc, 1, LIMITS["n_mc"])
        for name in ("e_steps", "m_steps", "refine_steps"):
            _in_range(f"method.{name}", getattr(self.method, name), 0, LIMITS["steps"])
        _in_range("method.heldout.max_steps", self.method.heldout.max_steps, 1, LIMITS["steps"])
        for w in self.method.encoder_hidden:
            _in_range("method.encoder_hidden width", w, 1, LIMITS["width"])
        for name in STEP_SIZE_FIELDS:
            value = getattr(self.method, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(f"method.{name} must be a finite positive number; got {value}")
        self.method.validate()
        self.training.validate()
        if self.training.stopping is not None and self.data.validation_fraction <= 0:
            raise ValueError("the plateau rule (training.stopping) watches the validation "
                             "split: set data.validation_fraction > 0, or stopping to null")
        _in_range("seed", self.seed, 0, LIMITS["seed"])
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; valid: {', '.join(DTYPES)}")
        if not isinstance(self.probes, dict) or not all(
                isinstance(k, str) and isinstance(v, dict) for k, v in self.probes.items()):
            raise ValueError("probes must be an object {probe name: {options}}")
        _check_numbers(self)
        _check_device(self.device)


def ensemble_key(config: RunConfig) -> str:
    """What members of one ensemble share: the configuration without its seed and step sizes
    (and without the data seed when that follows the run seed)."""
    import json

    values = config.to_dict()
    values.pop("seed")
    for name in STEP_SIZE_FIELDS:
        values["method"].pop(name)
    return json.dumps(values, sort_keys=True)


#: the largest finite number of each dtype (IEEE 754 binary32 and binary64)
FLOAT_MAX = {"float32": 3.4028234663852886e38, "float64": sys.float_info.max}


def _numbers(value: Any, where: str) -> Iterator[tuple[str, float | int]]:
    """(dotted name, number) for every number in a nested configuration."""
    if isinstance(value, dict):
        for key, inner in value.items():
            yield from _numbers(inner, f"{where}.{key}" if where else str(key))
    elif isinstance(value, list | tuple):
        for inner in value:
            yield from _numbers(inner, where)
    elif isinstance(value, int | float) and not isinstance(value, bool):
        yield where, value


def _check_numbers(config: RunConfig) -> None:
    """Every number of the configuration (probe and data-set options included) must be finite
    in the run's dtype: 1e308 is a float64 but overflows to inf as a float32, which would make
    the run's first step non-finite rather than its configuration an error. A positive step
    size must also stay positive in it (1e-50 is 0 as a float32)."""
    top = FLOAT_MAX[config.dtype]
    for name, value in _numbers(config.to_dict(), ""):
        if abs(value) > top:
            raise ValueError(f"{name} = {value!r} is not finite as a {config.dtype} (the run's "
                             f"dtype; its largest number is {top:.6g})")
    if config.dtype == "float32":
        for name in STEP_SIZE_FIELDS:
            value = getattr(config.method, name)
            if value is not None and struct.unpack("f", struct.pack("f", value))[0] == 0:
                raise ValueError(f"method.{name} = {value!r} is 0 as a float32 (the run's dtype)")


def _check_device(device: str) -> None:
    """A device this machine has: cpu, cuda[:N] with CUDA and that many devices, or mps where
    PyTorch's MPS backend is available."""
    if not device.startswith(("cpu", "cuda", "mps")):
        raise ValueError(f"unknown device {device!r}; use cpu, cuda or cuda:N")
    if device == "cpu":
        return
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but CUDA is not available")
        count = torch.cuda.device_count()
        if parsed.index is not None and parsed.index >= count:
            raise ValueError(f"device {device!r} requested but this machine has {count} CUDA "
                             f"device(s) (cuda:0 to cuda:{count - 1})")
    elif parsed.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ValueError(f"device {device!r} requested but MPS (Apple's GPU backend) is "
                             f"not available on this machine")


# --------------------------------------------------------------------------- from plain values


def _in_range(name: str, value: Any, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name} must be an integer in [{low}, {high}]; got {value!r}")


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _build(cls: type, values: Any, where: str) -> Any:
    if not isinstance(values, dict):
        raise ValueError(f"{where.rstrip('.') or 'a configuration'} must be an object; got "
                         f"{type(values).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown configuration key(s) {', '.join(where + k for k in unknown)}; "
                         f"valid in {where.rstrip('.') or 'the top level'}: "
                         f"{', '.join(sorted(known))}")
    kwargs = {key: _convert(hints[key], value, where + key) for key, value in values.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where.rstrip('.') or 'configuration'}: {err}") from err


def _convert(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            raise ValueError(f"configuration key {where!r} may not be null")
        inner = [a for a in args if a is not type(None)]
        return _convert(inner[0], value, where)
    if value is None:
        raise ValueError(f"configuration key {where!r} may not be null")
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where + ".")
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ValueError(f"configuration key {where!r} must be a list; got {value!r}")
        return tuple(_convert(args[0], v, where) for v in value)
    if hint is dict or origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"configuration key {where!r} must be an object; got {value!r}")
        return dict(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ValueError(f"configuration key {where!r} must be true or false; got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"configuration key {where!r} must be an integer; got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"configuration key {where!r} must be a number; got {value!r}")
        if not math.isfinite(value):
            raise ValueError(f"configuration key {where!r} must be finite; got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ValueError(f"configuration key {where!r} must be a string; got {value!r}")
        return value
    raise TypeError(f"unsupported configuration type {hint!r} for {where!r}")


# StoppingRule is nested inside MethodSettings (method.heldout); keep the name importable here
__all__ += ["StoppingRule"]
