"""Training: one serialisable configuration in, tidy metric rows out (SPEC §4, §7).

A run is a ``TrainConfig`` (plain values, JSON round-trip) and nothing else. Randomness flows
through explicit generators derived from ``seed``: one for the data order, one for the training
noise, one for evaluation noise, one for gradient-variance measurements. Evaluation and
measurement therefore never perturb the training stream, and score and reparameterized runs of
one seed share the decoder initialisation and the data order exactly.

Rows follow SPEC §7's schema (``ROW_COLUMNS``). Wall-clock time lives only in ``wall_s``, so
two runs of one configuration agree on every other column bit for bit on CPU.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from vi.data import DATASETS, Dataset, load_dataset
from vi.decoders import GaussianDecoder
from vi.inference import (
    METHODS,
    Divergence,
    InferenceMethod,
    MethodSettings,
    StoppingRule,
    build_method,
)
from vi.objectives import elbo

__all__ = [
    "IDENTITY_COLUMNS",
    "ROW_COLUMNS",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "atomic_write",
    "load_checkpoint",
    "save_checkpoint",
    "split_elbo",
    "train",
]

IDENTITY_COLUMNS = (
    "run_id", "experiment", "dataset", "method", "estimator", "baseline", "kl",
    "latent_dim", "n_mc", "seed",
)
ROW_COLUMNS = (*IDENTITY_COLUMNS, "epoch", "step", "wall_s", "split", "param_group", "metric",
               "value")
DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass
class TrainConfig:
    """Everything that defines a training run. ``from_dict`` rejects unknown keys and bad types."""

    # data
    dataset: str = "digits"
    dataset_options: dict = field(default_factory=dict)
    data_path: str | None = None
    data_seed: int = 0
    test_fraction: float = 0.2
    validation_fraction: float = 0.0
    # model
    latent_dim: int = 2
    decoder_mean: str = "mlp"
    decoder_variance: str = "learned"
    isotropic: bool = False
    hidden: list[int] = field(default_factory=lambda: [256])
    activation: str = "tanh"
    var_floor: float = 1e-4
    fixed_var: float = 1.0
    init_var: float = 1.0
    encoder_hidden: list[int] = field(default_factory=lambda: [256])
    encoder_activation: str = "tanh"
    # inference and estimator
    method: str = "amortized"
    estimator: str = "reparam"
    baseline: str = "none"
    kl: str = "analytic"
    n_mc: int = 1
    baseline_decay: float = 0.9
    # optimisation
    optimizer: str = "adam"
    lr: float = 1e-3
    local_optimizer: str = "adam"
    local_lr: float = 1e-2
    rm_delay: float = 100.0
    rm_power: float = 0.6
    e_steps: int = 1
    m_steps: int = 1
    refine_steps: int = 5
    refine_lr: float = 0.1
    refine_through: bool = False
    grad_clip: float | None = None
    epochs: int = 20
    batch_size: int = 128
    # evaluation
    eval_every: int = 1
    eval_n_mc: int = 10
    eval_splits: list[str] = field(default_factory=lambda: ["train", "test"])
    heldout_window: int = 20
    heldout_patience: int = 3
    heldout_max_steps: int = 500
    # gradient-variance logging (vi.gradstats)
    gradvar: bool = False
    gradvar_epochs: list[int] | None = None
    gradvar_draws: int = 100
    gradvar_batch: int = 64
    # final evaluation (vi.evaluation)
    gaps: bool = False
    test_curve: bool = False
    iwae_k: int = 1000
    iwae_chunk: int = 256
    gap_points: int | None = None
    gap_n_mc: int = 1000
    qstar_init: str = "posterior"
    qstar_n_mc: int = 10
    qstar_lr: float = 1e-2
    qstar_window: int = 100
    qstar_patience: int = 10
    qstar_max_steps: int = 5000
    test_curve_steps: list[int] = field(
        default_factory=lambda: [0, 1, 2, 4, 8, 16, 32, 64, 128, 256]
    )
    test_curve_n_mc: int = 100
    # execution
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Build and validate a config from plain values (e.g. parsed JSON)."""
        if not isinstance(values, dict):
            raise ValueError(f"a configuration must be a mapping; got {type(values).__name__}")
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(
                f"unknown configuration key(s) {', '.join(unknown)}; valid: {', '.join(known)}"
            )
        defaults = cls()
        for key, value in values.items():
            _check_type(key, value, getattr(defaults, key), known[key].type)
        config = cls(**{k: (list(v) if isinstance(v, tuple) else v) for k, v in values.items()})
        config.validate()
        return config

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def method_settings(self) -> MethodSettings:
        """The method's settings: every field the two dataclasses share by name, plus the
        held-out stopping rule built from ``heldout_*`` and the encoder widths as a tuple."""
        shared = {f.name: getattr(self, f.name) for f in dataclasses.fields(MethodSettings)
                  if f.name in self.__dataclass_fields__}
        return MethodSettings(**shared | {
            "heldout": StoppingRule(self.heldout_window, self.heldout_patience,
                                    self.heldout_max_steps),
            "encoder_hidden": tuple(self.encoder_hidden),
        })

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first impossible value (before anything runs)."""
        if self.dataset not in DATASETS:
            raise ValueError(f"unknown dataset {self.dataset!r}; valid: {', '.join(DATASETS)}")
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; valid: {', '.join(METHODS)}")
        for name in ("latent_dim", "n_mc", "epochs", "batch_size", "eval_every", "eval_n_mc",
                     "gradvar_draws", "gradvar_batch", "iwae_k", "iwae_chunk", "gap_n_mc",
                     "qstar_n_mc", "qstar_window", "qstar_patience", "qstar_max_steps",
                     "test_curve_n_mc"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer; got {getattr(self, name)}")
        if self.gap_points is not None and self.gap_points < 1:
            raise ValueError(f"gap_points must be positive or null; got {self.gap_points}")
        if self.qstar_init not in ("posterior", "prior"):
            raise ValueError(f"unknown qstar_init {self.qstar_init!r}; valid: posterior, prior")
        if not self.qstar_lr > 0:
            raise ValueError(f"qstar_lr must be positive; got {self.qstar_lr}")
        if not self.test_curve_steps or any(s < 0 for s in self.test_curve_steps):
            raise ValueError(f"test_curve_steps must be counts >= 0; got {self.test_curve_steps}")
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; valid: {', '.join(DTYPES)}")
        bad = sorted(set(self.eval_splits) - {"train", "validation", "test"})
        if bad:
            raise ValueError(f"unknown eval split(s) {bad}; valid: train, validation, test")
        if not self.device.startswith(("cpu", "cuda", "mps")):
            raise ValueError(f"unknown device {self.device!r}; use cpu, cuda or cuda:N")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device {self.device!r} requested but CUDA is not available")
        GaussianDecoder(1, 1, mean=self.decoder_mean, variance=self.decoder_variance,
                        hidden=self.hidden, activation=self.activation, var_floor=self.var_floor,
                        fixed_var=self.fixed_var, init_var=self.init_var)
        self.method_settings().validate(self.method)


def _check_type(key: str, value: Any, default: Any, annotation: Any) -> None:
    optional = "None" in str(annotation)
    if value is None:
        if not optional:
            raise ValueError(f"configuration key {key!r} may not be null")
        return
    expected: type | tuple[type, ...]
    text = str(annotation)
    if text.startswith(("list", "tuple")):
        expected = (list, tuple)
    elif "dict" in text:
        expected = dict
    elif "bool" in text:
        expected = bool
    elif "int" in text and "float" not in text:
        expected = int
    elif "float" in text:
        expected = (int, float)
    else:
        expected = str
    if isinstance(value, bool) and expected is not bool:
        ok = False
    else:
        ok = isinstance(value, expected)
    if ok and expected == (list, tuple) and ("[int]" in text or "[str]" in text):
        # list entries too: hidden=[2.5] would otherwise be truncated to 2 without a word
        item = int if "[int]" in text else str
        ok = all(isinstance(v, item) and not isinstance(v, bool) for v in value)
    if not ok:
        raise ValueError(
            f"configuration key {key!r} must be {annotation}; got {value!r} "
            f"({type(value).__name__})"
        )


def _seeds(seed: int, n: int) -> list[int]:
    """Independent child seeds of ``seed`` (numpy's SeedSequence), one per random stream."""
    return [int(s.generate_state(1)[0]) for s in np.random.SeedSequence(seed).spawn(n)]


@torch.no_grad()
def split_elbo(
    decoder: GaussianDecoder, x: Tensor, lam: Tensor, n_mc: int,
    generator: torch.Generator | None, chunk: int = 2048,
) -> Tensor:
    """Per-point ELBO estimate (analytic KL, ``n_mc`` samples) of q(λ), in chunks of points."""
    out = []
    for start in range(0, x.shape[0], chunk):
        xs, ls = x[start:start + chunk], lam[start:start + chunk]
        eps = torch.randn((n_mc, *ls.shape[:-1], decoder.latent_dim), generator=generator,
                          device=ls.device, dtype=ls.dtype)
        out.append(elbo(decoder, xs, ls, eps, kl="analytic").samples.mean(0))
    return torch.cat(out)


@dataclass
class TrainResult:
    rows: list[dict]
    status: str
    message: str
    trainer: Trainer


class Trainer:
    """Holds one run's model, optimisers, generators and metric rows; resumable by state."""

    def __init__(
        self,
        config: TrainConfig,
        dataset: Dataset | None = None,
        *,
        run_id: str = "",
        experiment: str = "",
    ) -> None:
        config.validate()
        self.config = c = config
        self.device = torch.device(c.device)
        self.dtype = DTYPES[c.dtype]
        self.dataset = dataset if dataset is not None else load_dataset(
            c.dataset, seed=c.data_seed, test_fraction=c.test_fraction,
            validation_fraction=c.validation_fraction, path=c.data_path, **c.dataset_options,
        )
        self.x = {
            s: self.dataset.split(s).to(self.device, self.dtype)
            for s in ("train", "validation", "test")
        }
        n_train = self.x["train"].shape[0]
        if c.batch_size > n_train:
            raise ValueError(f"batch_size {c.batch_size} exceeds the {n_train} training points")
        for s in c.eval_splits:
            if self.x[s].shape[0] == 0:
                raise ValueError(f"eval split {s!r} is empty for this dataset configuration")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(c.seed)  # module initialisation draws from the global RNG
            decoder = GaussianDecoder(
                self.dataset.data_dim, c.latent_dim, mean=c.decoder_mean,
                variance=c.decoder_variance, isotropic=c.isotropic, hidden=c.hidden,
                activation=c.activation, var_floor=c.var_floor, fixed_var=c.fixed_var,
                init_var=c.init_var,
            ).to(self.device, self.dtype)
            self.method: InferenceMethod = build_method(
                c.method, decoder, c.method_settings(), n_train
            ).to(self.device, self.dtype)
        seeds = _seeds(c.seed, 4)
        self.generators = {
            "data": torch.Generator().manual_seed(seeds[0]),
            "noise": torch.Generator(self.device).manual_seed(seeds[1]),
            "eval": torch.Generator(self.device).manual_seed(seeds[2]),
            "gradvar": torch.Generator(self.device).manual_seed(seeds[3]),
        }
        self.identity = {
            "run_id": run_id, "experiment": experiment, "dataset": c.dataset,
            "method": c.method, "estimator": c.estimator, "baseline": c.baseline, "kl": c.kl,
            "latent_dim": c.latent_dim, "n_mc": c.n_mc, "seed": c.seed,
        }
        self.epoch, self.step, self.elapsed = 0, 0, 0.0
        self.rows: list[dict] = []
        self.status, self.message = "running", ""
        self.last_heldout_steps: dict[str, int] = {}
        self.tables: dict[str, Any] = {}  # per-point frames of the final evaluation, to save

    @property
    def decoder(self) -> GaussianDecoder:
        return self.method.decoder

    # -- rows -------------------------------------------------------------------------------
    def row(self, split: str, metric: str, value: float, *, param_group: str = "",
            step: int | None = None, wall_s: float | None = None) -> dict:
        """One tidy measurement; non-finite values are refused (divergence is a status)."""
        value = float(value)
        if not math.isfinite(value):
            raise Divergence(f"non-finite {metric} on {split}")
        return {
            **self.identity, "epoch": self.epoch, "step": self.step if step is None else step,
            "wall_s": round(self.elapsed if wall_s is None else wall_s, 3), "split": split,
            "param_group": param_group, "metric": metric, "value": value,
        }

    # -- evaluation -------------------------------------------------------------------------
    def posterior(self, split: str) -> Tensor:
        """The method's own q for every point of a split (training rows by index for vem)."""
        x = self.x[split]
        if split == "train":
            idx = torch.arange(x.shape[0], device=self.device)
            return self.method.infer(x, idx, generator=self.generators["eval"])
        self.method.last_infer_steps = None
        lam = self.method.infer(x, None, generator=self.generators["eval"])
        steps = self.method.last_infer_steps
        if steps is not None:
            self.last_heldout_steps[split] = steps
        return lam

    def evaluate(self) -> list[dict]:
        """Full-split ELBO per point (mean), for ``eval_splits``; plus held-out E-steps for vem."""
        rows = []
        for split in self.config.eval_splits:
            lam = self.posterior(split)
            value = split_elbo(self.decoder, self.x[split], lam, self.config.eval_n_mc,
                               self.generators["eval"]).mean()
            rows.append(self.row(split, "elbo", value))
            if split in self.last_heldout_steps:
                rows.append(self.row(split, "e_steps", self.last_heldout_steps.pop(split)))
        return rows

    def measurements(self, final: bool) -> list[dict]:
        """Optional measurements at an epoch's end (gradient variance) and at the end (gaps)."""
        rows: list[dict] = []
        c = self.config
        if c.gradvar:
            from vi import gradstats

            if gradstats.scheduled(c, self.epoch):
                rows += gradstats.training_rows(self)
        if final and (c.gaps or c.test_curve):
            from vi import evaluation

            rows += evaluation.final_rows(self)
        return rows

    # -- training ---------------------------------------------------------------------------
    def run_epoch(self) -> list[dict]:
        """One pass over the training data in a seeded random order; returns its rows."""
        c, x = self.config, self.x["train"]
        perm = torch.randperm(x.shape[0], generator=self.generators["data"]).to(self.device)
        total, count = 0.0, 0
        start = time.perf_counter()
        self.method.train()
        for b in range(0, x.shape[0], c.batch_size):
            idx = perm[b:b + c.batch_size]
            est = self.method.train_step(x[idx], idx, self.generators["noise"])
            total, count = total + float(est.sum()), count + idx.shape[0]
            self.step += 1
        self.epoch += 1
        self.elapsed += time.perf_counter() - start
        rows = [self.row("train", "elbo_running", total / count)]
        if self.epoch % c.eval_every == 0 or self.epoch == c.epochs:
            rows += self.evaluate()
        rows += self.measurements(final=self.epoch == c.epochs)
        return rows

    def fit(
        self,
        *,
        progress: bool | None = None,
        on_epoch: Callable[[Trainer], None] | None = None,
    ) -> TrainResult:
        """Train to ``epochs`` (from wherever a loaded state left off)."""
        c = self.config
        if progress is None:
            progress = sys.stderr.isatty()
        if self.epoch == 0 and not self.rows:
            try:
                self.rows += self.evaluate()  # epoch 0: the initial model
                self.rows += self.measurements(final=False)  # e.g. gradient variance at init
            except Divergence as err:
                self.status, self.message = "diverged", str(err)
        bar = tqdm(total=c.epochs, initial=self.epoch, disable=not progress, unit="epoch",
                   desc=f"{c.method}/{c.estimator}")
        while self.status == "running" and self.epoch < c.epochs:
            try:
                rows = self.run_epoch()
            except Divergence as err:
                self.status, self.message = "diverged", f"epoch {self.epoch + 1}: {err}"
                break
            self.rows += rows
            bar.update(1)
            bar.set_postfix_str(f"elbo {rows[0]['value']:.2f}")
            if on_epoch is not None:
                on_epoch(self)
        bar.close()
        if self.status == "running":
            self.status = "ok"
        return TrainResult(self.rows, self.status, self.message, self)

    # -- checkpoints ------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "config": self.config.to_dict(), "epoch": self.epoch, "step": self.step,
            "elapsed": self.elapsed, "rows": list(self.rows), "status": self.status,
            "message": self.message, "model": self.method.state_dict(),
            "optim": self.method.optimizer_state(),
            "generators": {k: g.get_state() for k, g in self.generators.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        if state["config"] != self.config.to_dict():
            raise ValueError("checkpoint was written by a different configuration")
        self.method.load_state_dict(state["model"])
        self.method.load_optimizer_state(state["optim"])
        for k, g in self.generators.items():
            g.set_state(state["generators"][k].cpu())  # map_location may have moved it
        self.epoch, self.step, self.elapsed = state["epoch"], state["step"], state["elapsed"]
        self.rows = list(state["rows"])
        self.status, self.message = state["status"], state["message"]


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Write through ``write(tmp)`` to a temporary file beside ``path``, then rename over it, so a
    reader never sees a half-written file (an interrupted write leaves the old one intact)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def save_checkpoint(trainer: Trainer, path: str | os.PathLike) -> Path:
    """Atomically save everything needed to resume or evaluate a run (model, optimisers,
    local table, generators, metric rows so far)."""
    state = trainer.state_dict() | {"identity": dict(trainer.identity)}
    return atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(
    path: str | os.PathLike, *, dataset: Dataset | None = None, device: str | None = None
) -> Trainer:
    """Rebuild a ``Trainer`` from ``save_checkpoint``'s file, exactly where it stopped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    state = torch.load(path, map_location=device or "cpu", weights_only=True)
    values = dict(state["config"])
    if device is not None:
        values["device"] = device
        state["config"]["device"] = device
    trainer = Trainer(TrainConfig.from_dict(values), dataset, run_id=state["identity"]["run_id"],
                      experiment=state["identity"]["experiment"])
    trainer.load_state_dict(state)
    return trainer


def train(config: TrainConfig | dict, *, progress: bool | None = None, **kwargs) -> TrainResult:
    """Train one configuration from scratch: ``train({"method": "vem", "estimator": "score",
    "baseline": "loo", "n_mc": 4})``. Returns the rows, the status and the trainer."""
    if isinstance(config, dict):
        config = TrainConfig.from_dict(config)
    return Trainer(config, **kwargs).fit(progress=progress)
