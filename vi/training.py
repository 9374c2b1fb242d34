"""Training: configurations in, tidy metric rows out (docs/algorithms.md, docs/results.md).

A ``Trainer`` trains an *ensemble*: K runs of one configuration that differ only in their seed
and step sizes, as one batched model (``vi.nets``). Each member stays a run of its own: its own
random streams (``vi.streams``: initialisation, data order, training noise, and every
measurement keyed by its name and epoch), its own rows, its own stopping decision, its own
checkpoint (``member_state``). A member's numbers do not depend on which other members it is
trained with.

Per epoch: one pass over the training data in the member's own order; the running ELBO; the
full evaluation (ELBO of each split under the method's own posterior) at the epochs of
``TrainingConfig.evaluation_epochs``; the plateau rule on the validation ELBO at the check
epochs (``StoppingConfig.due``: every ``check_every`` epochs, thinning out after
``check_span``); and the probes (``vi.probes``) that are due. When a member's validation ELBO
has not beaten its phase's best by ``min_delta`` for ``patience`` checks and for the last
``window_fraction`` of the phase (and a phase begun by a decay has lasted ``phase_fraction``
of the epochs before it), its phase has reached a plateau: its training step sizes (every
optimiser's: decoder, encoder, vem's local table) are multiplied by ``decay`` and a new phase
begins, up to ``decays`` times (``vi.config.StoppingConfig``); it stops at the plateau of its
last phase (``plateau``) or at ``max_epochs``. Its best state (the highest validation ELBO of
any check) is restored, evaluated on every split at the best epoch, and handed to the final
probes; the run's ``outcome``
(``vi.contract.OUTCOMES``: converged, cap, collapsed, stuck, diverged) is judged from its own
validation curve and the no-latent Gaussian of its own training split (``MemberResult``). A
member whose loss, gradient or parameters become non-finite is ``diverged``: it keeps its rows
up to its last finished epoch and the others go on. Finished members leave the batch, so the
ensemble shrinks as members stop. Every decision is a member's own, from its own numbers: a
member's step sizes are its configured ones times ``decay`` to the power of its own decays,
so it stays bit for bit what it is alone.

The semi-amortized refinement's step size ``refine_lr`` does not decay: it fixes the K-step
inner procedure that defines the method's posterior at training and at evaluation alike, and a
held-out fit starts from the configured ``local_lr`` whatever the decays (its own rule decays
it), so every run's held-out numbers come from one procedure.

Rows follow the results contract (``ROW_COLUMNS``). ``wall_s`` is the training time attributed
to the run: each epoch's seconds divided among the members trained in it.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import pandas as pd
import torch
from torch import Tensor
from tqdm.auto import tqdm

from vi.config import RunConfig, StoppingConfig, ensemble_key
from vi.contract import IDENTITY_COLUMNS, METRIC_COLUMNS, ContractError
from vi.data import Dataset, load_dataset, variance_floor
from vi.decoders import GaussianDecoder
from vi.evaluation import split_elbo
from vi.inference import InferenceMethod, build_method
from vi.optim import FlatOptimizer
from vi.references import no_latent_gaussian, no_latent_log_likelihood
from vi.streams import MemberRandom, generator

__all__ = [
    "IDENTITY_COLUMNS",
    "ROW_COLUMNS",
    "MemberResult",
    "Probe",
    "ProbeContext",
    "ProbeResult",
    "Trainer",
    "load_checkpoint",
    "member_config",
    "train",
]

#: the results contract's columns (``vi.contract``)
ROW_COLUMNS = METRIC_COLUMNS
CHECKPOINT_FORMAT = 2
#: ``late_gain``: the rise of the best validation ELBO over this last fraction of the run's last
#: phase (the epochs since its last step-size decay)
LATE_TAIL = 0.2
_DTYPES = {"float32": torch.float32, "float64": torch.float64}


# ------------------------------------------------------------------------------------ probes


@dataclass
class ProbeContext:
    """What a probe sees: the ensemble's method (every member, at the state to measure), the
    data per member ([K, N, D] per split; digit labels [K, N] where the data has them), the
    members' seeds and configurations, and when (``epoch``; ``final``: the restored best state
    at the end of training; ``evaluating``: a full-evaluation epoch)."""

    method: InferenceMethod
    x: dict[str, Tensor]
    labels: dict[str, Tensor]
    seeds: list[int]
    configs: list[RunConfig]
    epoch: int
    final: bool
    evaluating: bool
    levels: int | None
    image_shape: tuple[int, int] | None = None
    pixels: list[int] | None = None

    def random(self, *key: str | int) -> MemberRandom:
        """The members' streams for ``key`` at this epoch (fresh, repeatable from the seeds)."""
        return MemberRandom.from_seeds(self.seeds, "probe", *key, self.epoch,
                                       device=self.x["train"].device)


@dataclass
class ProbeResult:
    """Rows {split, metric, value: one number per member (NaN: none), param_group?, step?,
    wall_s? (per member)}, per-run tables (DataFrames with a ``member`` column), and the
    members for which a table held non-finite values (``failed``)."""

    rows: list[dict] = field(default_factory=list)
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    failed: set[int] = field(default_factory=set)


class Probe(Protocol):
    """A measurement the trainer calls when it is due (``vi.probes`` holds the study's)."""

    name: str
    fatal: bool  # a non-finite value marks the member diverged (else: the row is left out)

    def due(self, ctx: ProbeContext) -> bool: ...

    def __call__(self, ctx: ProbeContext) -> ProbeResult: ...


@dataclass
class MemberResult:
    """A finished run: its rows and tables, how it ended, and its final checkpoint state."""

    run_id: str
    config: RunConfig
    identity: dict[str, Any]
    rows: list[dict]
    tables: dict[str, pd.DataFrame]
    status: str  # ok | diverged
    message: str
    stop_reason: str  # plateau | max_epochs | budget | diverged
    epochs_run: int
    best_epoch: int
    elapsed: float
    state: dict
    data_info: dict[str, Any] = field(default_factory=dict)
    outcome: str = ""  # vi.contract.OUTCOMES
    decays: int = 0
    decay_epochs: list[int] = field(default_factory=list)
    best_validation: float = math.nan
    last_validation: float = math.nan
    late_gain: float = math.nan
    no_latent_validation: float = math.nan

    @property
    def converged(self) -> bool | None:
        """True when the outcome is ``converged`` (the plateau rule stopped it at its last
        phase, neither stuck nor collapsed), None for a fixed budget (no rule: ``outcome`` says
        whether it got stuck or collapsed), else False."""
        if self.stop_reason == "budget":
            return None
        return self.outcome == "converged"

    def record(self) -> dict[str, Any]:
        """How training went, for ``runs.csv`` (``vi.contract.OUTCOME_COLUMNS``)."""
        def number(v: float) -> float | None:
            return round(v, 6) if math.isfinite(v) else None

        return {"outcome": self.outcome, "decays": self.decays,
                "decay_epochs": list(self.decay_epochs),
                "best_validation": number(self.best_validation),
                "last_validation": number(self.last_validation),
                "late_gain": number(self.late_gain),
                "no_latent_validation": number(self.no_latent_validation)}


def judge_outcome(validation: dict[int, float], *, stop_reason: str, diverged: bool,
                  reference: float, rule: StoppingConfig | None,
                  train: dict[int, float] | None = None,
                  decay_epochs: Sequence[int] = ()) -> dict[str, Any]:
    """A run's outcome (``vi.contract.OUTCOMES``) from its validation curve ``{epoch: ELBO}``
    (the checks, in nats per point), how it stopped, and the no-latent Gaussian's validation
    log-likelihood ``reference``, with the margins of ``rule`` (defaults when None); ``train``
    is the training ELBO per epoch (the running mean of its minibatches). Returns the outcome
    and the numbers it was judged on (best, last, late gain).

    In order: ``diverged``; ``stuck`` when max_e v_e < reference + stuck_margin; ``collapsed``
    when v_last < max_e v_e − collapse_margin and the training ELBO fell too, t_last <
    t_best − collapse_margin (a validation ELBO that falls while the training ELBO holds is
    overfitting, which the restored best state undoes: early stopping; unknown t_best counts
    as a fall); ``converged`` when the plateau rule stopped it, ``cap`` when ``max_epochs``
    did, ``budget`` without a rule. ``late_gain`` = max_e v_e − max_{e ≤ c} v_e with
    c = d + (1 − LATE_TAIL)(E − d), over the E epochs run, d the last step-size decay
    (``decay_epochs``; 0 without one): how much the run still rose over the last 20 % of its
    last phase. A decay's jump is not a rise of the phase it starts (a run stopped soon after
    its last decay would otherwise read as still rising); without decays it is the rise over the
    last 20 % of all epochs."""
    margins = rule or StoppingConfig()
    epochs = sorted(validation)
    best = max(validation.values()) if validation else math.nan
    last = validation[epochs[-1]] if epochs else math.nan
    gain = math.nan
    if epochs:
        start = max((d for d in decay_epochs if d <= epochs[-1]), default=0)
        cut = start + (1.0 - LATE_TAIL) * (epochs[-1] - start)
        early = [validation[e] for e in epochs if e <= cut]
        gain = best - max(early) if early else math.nan
    if diverged:
        outcome = "diverged"
    elif math.isfinite(best) and math.isfinite(reference) \
            and best < reference + margins.stuck_margin:
        outcome = "stuck"
    elif math.isfinite(best) and last < best - margins.collapse_margin \
            and _training_fell(train, max(validation, key=validation.get), epochs[-1],
                               margins.collapse_margin):
        outcome = "collapsed"
    else:
        outcome = {"plateau": "converged", "max_epochs": "cap"}.get(stop_reason, "budget")
    return {"outcome": outcome, "best_validation": best, "last_validation": last,
            "late_gain": gain}


def _training_fell(train: dict[int, float] | None, best_epoch: int, last_epoch: int,
                   margin: float) -> bool:
    """Whether the training ELBO at ``last_epoch`` is more than ``margin`` below its value at
    ``best_epoch`` (True when either is unknown: no training curve to tell a collapse from
    overfitting)."""
    if not train or best_epoch not in train or last_epoch not in train:
        return True
    return train[last_epoch] < train[best_epoch] - margin


# ----------------------------------------------------------------------------------- trainer


def member_config(config: RunConfig | dict) -> RunConfig:
    return config if isinstance(config, RunConfig) else RunConfig.from_dict(config)


class Trainer:
    """An ensemble of runs trained as one batched model (see the module docstring).

    Args:
        configs: one ``RunConfig`` per member; they must agree on everything but the seed and
            the step sizes (``vi.config.ensemble_key``).
        run_ids: one name per member (rows' ``run_id``); default ``""``.
        experiment: the rows' ``experiment``.
        datasets: loaded data sets by data seed, to share between trainers (optional).
    """

    def __init__(self, configs: Sequence[RunConfig | dict], *, run_ids: Sequence[str] | None = None,
                 experiment: str = "", datasets: dict[int, Dataset] | None = None) -> None:
        self.configs = [member_config(c) for c in configs]
        if not self.configs:
            raise ValueError("a Trainer needs at least one configuration")
        keys = {ensemble_key(c) for c in self.configs}
        if len(keys) > 1:
            raise ValueError("ensemble members must share everything but the seed and the step "
                             "sizes")
        c = self.configs[0]
        k = len(self.configs)
        self.run_ids = list(run_ids) if run_ids is not None else [""] * k
        self.experiment = experiment
        self.device = torch.device(c.device)
        self.dtype = _DTYPES[c.dtype]
        cache = datasets if datasets is not None else {}
        data = [self._dataset(cfg, cache) for cfg in self.configs]
        self.levels = data[0].levels
        self.image_shape, self.pixels = data[0].image_shape, data[0].pixels
        self.x = {s: torch.stack([d.split(s) for d in data]).to(self.device, self.dtype)
                  for s in ("train", "validation", "test")}
        self.labels = {s: torch.stack([d.ground_truth[f"{s}_labels"] for d in data])
                       for s in ("train", "validation", "test")
                       if all(f"{s}_labels" in d.ground_truth for d in data)}
        n_train = self.x["train"].shape[1]
        if c.training.batch_size > n_train:
            raise ValueError(f"training.batch_size {c.training.batch_size} exceeds the {n_train} "
                             f"training points")
        splits = set(c.training.eval_splits) | ({"validation"} if c.training.stopping else set())
        for s in sorted(splits):
            if self.x[s].shape[1] == 0:
                raise ValueError(f"split {s!r} is empty for this data configuration")
        self.var_floor = (c.model.var_floor if c.model.var_floor is not None
                          else variance_floor(self.levels))
        self.method = self._build(self.configs, init=True)
        seeds = [cfg.seed for cfg in self.configs]
        self.data_random = MemberRandom.from_seeds(seeds, "data")
        self.noise = MemberRandom.from_seeds(seeds, "noise", device=self.device)
        self.epoch, self.step = 0, 0
        self.elapsed = [0.0] * k
        self.rows: list[list[dict]] = [[] for _ in range(k)]
        self.evaluated: list[set[tuple[int, str]]] = [set() for _ in range(k)]
        self.probed: list[set[tuple[int, str]]] = [set() for _ in range(k)]
        self.status = ["running"] * k
        self.message = [""] * k
        self.best = [-math.inf] * k
        self.best_epoch = [0] * k
        self.best_step = [0] * k
        self.best_elapsed = [0.0] * k
        self.bad = [0] * k
        self.gain_epoch = [0] * k
        self.phase_best = [-math.inf] * k
        self.decays = [0] * k
        self.decay_epochs: list[list[int]] = [[] for _ in range(k)]
        self.best_state = self._module_state()
        # the last validation check's held-out λ [K, N, 2H] (warm_validation methods)
        self.warm: Tensor | None = None
        self.results: list[MemberResult] = []
        self._base_step_sizes = _optimizer_step_sizes(self.method)

    # -- construction ----------------------------------------------------------------------
    @staticmethod
    def _dataset(config: RunConfig, cache: dict) -> Dataset:
        d = config.data
        key = (d.name, config.data_seed, d.test_fraction, d.validation_fraction, d.path,
               repr(sorted(d.options.items())))
        if key not in cache:
            cache[key] = load_dataset(d.name, seed=config.data_seed,
                                      test_fraction=d.test_fraction,
                                      validation_fraction=d.validation_fraction, path=d.path,
                                      **d.options)
        return cache[key]

    def _build(self, configs: Sequence[RunConfig], *, init: bool) -> InferenceMethod:
        c = configs[0]
        m = c.model
        gens = [generator(cfg.seed, "init") for cfg in configs] if init else \
            [torch.Generator() for _ in configs]
        decoder = GaussianDecoder(
            self.x["train"].shape[-1], m.latent_dim, members=len(configs), mean=m.decoder_mean,
            variance=m.decoder_variance, isotropic=m.isotropic, hidden=m.hidden,
            activation=m.activation, var_floor=self.var_floor, fixed_var=m.fixed_var,
            init_var=m.init_var, generators=gens,
        ).to(self.device, self.dtype)
        if m.init_from_data and init:
            decoder.init_from_data(self.x["train"])
        return build_method(decoder, [cfg.method for cfg in configs], self.x["train"].shape[1],
                            gens)

    @property
    def decoder(self) -> GaussianDecoder:
        return self.method.decoder

    @property
    def members(self) -> int:
        return len(self.configs)

    @property
    def seeds(self) -> list[int]:
        return [c.seed for c in self.configs]

    def _module_state(self) -> dict[str, Tensor]:
        return {k: v.detach().clone() for k, v in self.method.state_dict().items()}

    # -- rows --------------------------------------------------------------------------------
    def identity(self, k: int) -> dict[str, Any]:
        c = self.configs[k]
        return {"run_id": self.run_ids[k], "experiment": self.experiment,
                "dataset": c.data.name, "method": c.method.name,
                "estimator": c.method.estimator, "baseline": c.method.baseline,
                "kl": c.method.kl, "latent_dim": c.model.latent_dim, "n_mc": c.method.n_mc,
                "seed": c.seed}

    def _row(self, k: int, split: str, metric: str, value: float, *, param_group: str = "",
             epoch: int | None = None, step: int | None = None,
             wall_s: float | None = None, measured: float | None = None) -> dict:
        # training time to the millisecond; a measurement's own time (``measured``, e.g. seconds
        # per point of test-time inference, ~1e-5 s) to three significant figures
        if measured is not None:
            wall = float(f"{measured:.3g}")
        else:
            wall = round(self.elapsed[k] if wall_s is None else wall_s, 3)
        return {**self.identity(k), "epoch": self.epoch if epoch is None else epoch,
                "step": self.step if step is None else step, "wall_s": wall,
                "split": split, "param_group": param_group, "metric": metric,
                "value": float(value)}

    def _context(self, *, final: bool, evaluating: bool, epoch: int | None = None
                 ) -> ProbeContext:
        return ProbeContext(self.method, self.x, self.labels, self.seeds, self.configs,
                            self.epoch if epoch is None else epoch, final, evaluating,
                            self.levels, self.image_shape, self.pixels)

    # -- evaluation --------------------------------------------------------------------------
    def evaluate(self, splits: Sequence[str], *, epoch: int | None = None,
                 members: Sequence[int] | None = None
                 ) -> tuple[dict[int, list[dict]], dict[int, str]]:
        """ELBO of the method's own posterior on each split (mean per point), and the E-steps
        of methods that fit held-out points: (rows by member, {member: split} where the value
        was non-finite). Only ``members`` (default: all) get rows."""
        epoch = self.epoch if epoch is None else epoch
        wanted = range(self.members) if members is None else members
        rows: dict[int, list[dict]] = {k: [] for k in wanted}
        bad: dict[int, str] = {}
        for split in splits:
            # the same noise at every evaluation (common random numbers): the curve and the
            # plateau rule see the model change, not Monte Carlo noise
            random = MemberRandom.from_seeds(self.seeds, "elbo", split, device=self.device)
            t = self.configs[0].training
            x = self.x[split] if t.eval_points is None else self.x[split][:, :t.eval_points]
            # a warm-starting method's validation fit starts where the last check's ended
            warm = split == "validation" and self.method.warm_validation
            value, steps, lam = split_elbo(self.method, x, n_mc=t.eval_n_mc, random=random,
                                           start=self.warm if warm else None)
            if warm:
                self.warm = lam.detach()
            values = value.tolist()
            for k in wanted:
                if not math.isfinite(values[k]):
                    bad.setdefault(k, split)
                    continue
                rows[k].append(self._row(k, split, "elbo", values[k], epoch=epoch))
                if steps is not None:
                    rows[k].append(self._row(k, split, "e_steps", float(steps[k]), epoch=epoch))
        return rows, bad

    def _run_probes(self, probes: Sequence[Probe], ctx: ProbeContext
                    ) -> tuple[list[list[dict]], list[dict], set[int]]:
        """Rows and tables per member from the probes that are due, and the members a fatal
        probe found non-finite. Final probes' rows carry the best epoch's step and time."""
        rows: list[list[dict]] = [[] for _ in range(self.members)]
        tables: list[dict] = [{} for _ in range(self.members)]
        bad: set[int] = set()
        for probe in probes:
            if not probe.due(ctx):
                continue
            result = probe(ctx)
            _check_declared(probe, result)
            if probe.fatal:
                bad |= result.failed
            for r in result.rows:
                walls = r.get("wall_s")
                # a row a periodic measurement already wrote for this state is not written again
                key = (ctx.epoch, probe.name, r["metric"], r["split"], r.get("param_group", ""),
                       r.get("step", -1))
                for k, value in enumerate(r["value"]):
                    if key in self.probed[k]:
                        continue
                    self.probed[k].add(key)
                    v = float(value)
                    if not math.isfinite(v):
                        if probe.fatal:
                            bad.add(k)
                        continue
                    own = walls[k] if isinstance(walls, Sequence) else walls
                    step = r.get("step", self.best_step[k] if ctx.final else self.step)
                    rows[k].append(self._row(
                        k, r["split"], r["metric"], v, param_group=r.get("param_group", ""),
                        epoch=ctx.epoch, step=step, measured=own,
                        wall_s=self.best_elapsed[k] if ctx.final else None))
            for name, frame in result.tables.items():
                for k in range(self.members):
                    part = frame[frame["member"] == k].drop(columns="member")
                    tables[k][name] = part.reset_index(drop=True)
        return rows, tables, bad

    # -- training ----------------------------------------------------------------------------
    def _train_epoch(self) -> None:
        c = self.configs[0]
        x = self.x["train"]
        n, batch = x.shape[1], c.training.batch_size
        active = torch.tensor([s == "running" for s in self.status], device=self.device)
        perm = self.data_random.randperm(n).to(self.device)
        offsets = (torch.arange(self.members, device=self.device) * n).unsqueeze(1)
        rows = x.reshape(-1, x.shape[-1])
        sums = []
        start = time.perf_counter()
        self.method.train()
        for b in range(0, n, batch):
            idx = perm[:, b:b + batch]
            xb = rows.index_select(0, (idx + offsets).reshape(-1)).view(*idx.shape, -1)
            sums.append(self.method.train_step(xb, idx, self.noise, active).detach().sum(1))
            self.step += 1
        total = torch.stack(sums).double().sum(0)
        ok = self.method.finite() & torch.isfinite(total)
        for k in torch.nonzero(active & ~ok).flatten().tolist():
            self.status[k] = "diverged"
            self.message[k] = f"epoch {self.epoch + 1}: non-finite loss, gradient or parameter"
        seconds = time.perf_counter() - start
        self.epoch += 1
        share = seconds / max(1, self.members)
        for k in range(self.members):
            self.elapsed[k] += share
            if self.status[k] == "running":
                self.rows[k].append(self._row(k, "train", "elbo_running",
                                              float(total[k]) / n))

    def _check(self, k: int, value: float) -> None:
        """The plateau rule for member k at a check with validation ELBO ``value``: the best
        state is the highest value of any check (snapshotted); the phase's plateau count resets
        when ``value`` beats the phase's best by more than ``min_delta``, else grows."""
        rule = self.configs[k].training.stopping
        if value > self.best[k]:
            self.best[k] = value
            self.best_epoch[k], self.best_step[k] = self.epoch, self.step
            self.best_elapsed[k] = self.elapsed[k]
            for name, tensor in self.method.state_dict().items():
                self.best_state[name][k].copy_(tensor[k])
        if value > self.phase_best[k] + rule.min_delta:
            self.phase_best[k], self.bad[k], self.gain_epoch[k] = value, 0, self.epoch
        else:
            self.bad[k] += 1

    def _plateau(self, k: int) -> bool:
        """Whether member k's phase is at its plateau at epoch e: its last gain of more than
        ``min_delta`` (or its start) at epoch g, the phase begun at epoch s (its last decay,
        else 0), e − g ≥ max(patience · interval(e), window_fraction · (e − s)): no gain over
        ``patience`` checks nor over the last ``window_fraction`` of the phase."""
        rule = self.configs[k].training.stopping
        start = self.decay_epochs[k][-1] if self.decay_epochs[k] else 0
        window = max(rule.patience * rule.interval(self.epoch),
                     rule.window_fraction * (self.epoch - start))
        return (self.epoch >= rule.min_epochs and self.epoch - self.gain_epoch[k] >= window
                and self.epoch - start >= rule.phase_fraction * start)

    def _decay(self, members: Sequence[int]) -> None:
        """A new phase for ``members`` (each at its own plateau): one more decay, the plateau
        count reset, the phase's best = its latest check, the step sizes set."""
        for k in members:
            self.decays[k] += 1
            self.decay_epochs[k].append(self.epoch)
            self.bad[k], self.gain_epoch[k] = 0, self.epoch
            checks = self._validation(k)
            self.phase_best[k] = checks[max(checks)]  # the latest check
        self._apply_decays()

    def _apply_decays(self) -> None:
        """Every optimiser's step sizes: member k's configured ones × decay^(k's decays), one
        correctly rounded product per member (the same bits alone or in an ensemble)."""
        rule = self.configs[0].training.stopping
        factor = rule.decay if rule is not None else 1.0
        _set_optimizer_step_sizes(self.method, self._base_step_sizes,
                                  [factor ** n for n in self.decays])

    def scale_step_sizes(self, scale: Sequence[float]) -> None:
        """Set member k's training step sizes to its configured ones × ``scale[k]`` × its
        decays' factor (a hand-made schedule, e.g. a cosine decay over a fixed budget; the next
        decay, or members leaving the batch, sets them from the decays alone again)."""
        rule = self.configs[0].training.stopping
        factor = rule.decay if rule is not None else 1.0
        _set_optimizer_step_sizes(self.method, self._base_step_sizes,
                                  [float(s) * factor ** n for s, n in zip(scale, self.decays,
                                                                          strict=True)])

    def _validation(self, k: int) -> dict[int, float]:
        """Member k's validation ELBO at each evaluated epoch so far (first value per epoch)."""
        out: dict[int, float] = {}
        for r in self.rows[k]:
            if r["metric"] == "elbo" and r["split"] == "validation":
                out.setdefault(r["epoch"], r["value"])
        return out

    def _running(self, k: int) -> dict[int, float]:
        """Member k's training ELBO per epoch (the running mean of the epoch's minibatches)."""
        return {r["epoch"]: r["value"] for r in self.rows[k]
                if r["metric"] == "elbo_running" and r["split"] == "train"}

    def _no_latent_validation(self, k: int) -> float:
        """Validation log-likelihood per point of the no-latent Gaussian fitted to member k's
        training split (``vi.references``), its variance floored like the decoder's; NaN where
        it is undefined (an empty split, a constant column without a floor)."""
        x_val = self.x["validation"][k]
        t = self.configs[k].training
        if t.eval_points is not None:
            x_val = x_val[:t.eval_points]
        if x_val.shape[0] == 0:
            return math.nan
        try:
            mean, var = no_latent_gaussian(self.x["train"][k], var_floor=self.var_floor)
            return float(no_latent_log_likelihood(x_val, mean, var).mean())
        except ValueError:
            return math.nan

    def _after_epoch(self, probes: Sequence[Probe]) -> list[tuple[int, str]]:
        """Evaluation, stopping and probes at the end of an epoch; returns (member, reason)
        for the members that finish now."""
        c = self.configs[0].training
        running = [k for k in range(self.members) if self.status[k] == "running"]
        evaluating = self.epoch in self._eval_epochs
        checking = c.stopping is not None and (c.stopping.due(self.epoch)
                                               or self.epoch == c.max_epochs)
        splits = list(c.eval_splits) if evaluating else []
        if checking and "validation" not in splits:
            splits.append("validation")
        finishing: list[tuple[int, str]] = []
        if splits and running:
            by_member, nonfinite = self.evaluate(splits, members=running)
            for k, split in nonfinite.items():
                self.status[k] = "diverged"
                self.message[k] = f"epoch {self.epoch}: non-finite elbo on {split}"
            for k, rows in by_member.items():
                if self.status[k] != "running":
                    continue
                self.rows[k] += rows
                self.evaluated[k] |= {(self.epoch, r["split"]) for r in rows}
                if checking:
                    self._check(k, next(r["value"] for r in rows if r["split"] == "validation"
                                        and r["metric"] == "elbo"))
        running = [k for k in range(self.members) if self.status[k] == "running"]
        if probes and running:
            ctx = self._context(final=False, evaluating=evaluating)
            rows, _, bad = self._run_probes(probes, ctx)
            for k in running:
                if k in bad:
                    self.status[k] = "diverged"
                    self.message[k] = f"epoch {self.epoch}: non-finite probe value"
                else:
                    self.rows[k] += rows[k]
        decaying = []
        for k in range(self.members):
            if self.status[k] == "diverged":
                finishing.append((k, "diverged"))
            elif self.status[k] == "running":
                plateau = c.stopping is not None and self._plateau(k)
                if plateau and self.decays[k] >= c.stopping.decays:
                    finishing.append((k, "plateau"))
                elif self.epoch >= c.max_epochs:
                    finishing.append((k, "max_epochs" if c.stopping is not None else "budget"))
                elif plateau:
                    decaying.append(k)
        if decaying:
            self._decay(decaying)
        return finishing

    @property
    def _eval_epochs(self) -> set[int]:
        if not hasattr(self, "_eval_epoch_set"):
            self._eval_epoch_set = set(self.configs[0].training.evaluation_epochs())
        return self._eval_epoch_set

    def _finish(self, finishing: list[tuple[int, str]], probes: Sequence[Probe]) -> None:
        """Final evaluation and probes of the members that stop now (best state restored), their
        results, and the ensemble shrunk to the members still running."""
        done = [k for k, reason in finishing if reason != "diverged"]
        if done:
            if self.configs[0].training.stopping is not None:
                self.method.load_state_dict({n: torch.where(
                    _member_mask(k_all=self.members, keep=done, like=t), self.best_state[n], t)
                    for n, t in self.method.state_dict().items()})
            else:
                for k in done:
                    self.best_epoch[k], self.best_step[k] = self.epoch, self.step
                    self.best_elapsed[k] = self.elapsed[k]
            sub = self._subset(done)
            sub._finalize(probes)
            for i, k in enumerate(done):
                self.rows[k] = sub.rows[i]
                self.status[k], self.message[k] = sub.status[i], sub.message[i]
                self.results.append(self._result(k, dict(finishing)[k], sub.member_state(i),
                                                 sub.tables[i]))
        for k, reason in finishing:
            if reason == "diverged":
                self.results.append(self._result(k, "diverged", self.member_state(k), {}))
        keep = [k for k in range(self.members) if k not in dict(finishing)]
        if len(keep) < self.members:
            self._shrink(keep)

    def _finalize(self, probes: Sequence[Probe]) -> None:
        """(On a subset whose state is each member's best.) Evaluate every split at the best
        epoch where not yet done, then the final probes."""
        self.tables: list[dict] = [{} for _ in range(self.members)]
        c = self.configs[0].training
        for split in c.eval_splits:
            need = [k for k in range(self.members)
                    if (self.best_epoch[k], split) not in self.evaluated[k]]
            epochs = sorted({self.best_epoch[k] for k in need})
            for epoch in epochs:
                members = [k for k in need if self.best_epoch[k] == epoch]
                by_member, nonfinite = self.evaluate([split], epoch=epoch, members=members)
                for k, split_name in nonfinite.items():
                    self.status[k] = "diverged"
                    self.message[k] = f"final evaluation: non-finite elbo on {split_name}"
                for k, rows in by_member.items():
                    if k in nonfinite:
                        continue
                    for r in rows:
                        r["step"], r["wall_s"] = self.best_step[k], round(self.best_elapsed[k], 3)
                    self.rows[k] += rows
        epochs = sorted(set(self.best_epoch))
        for epoch in epochs:
            members = [k for k in range(self.members) if self.best_epoch[k] == epoch]
            ctx = self._context(final=True, evaluating=True, epoch=epoch)
            rows, tables, bad = self._run_probes(probes, ctx)
            for k in members:
                if k in bad:
                    self.status[k] = "diverged"
                    self.message[k] = "final probes: non-finite value"
                    continue
                self.rows[k] += rows[k]
                self.tables[k] = tables[k]
        for k in range(self.members):
            if self.status[k] == "running":
                self.status[k] = "ok"

    def _result(self, k: int, reason: str, state: dict, tables: dict) -> MemberResult:
        diverged = self.status[k] == "diverged"
        stop_reason = "diverged" if diverged else reason
        reference = self._no_latent_validation(k)
        judged = judge_outcome(self._validation(k), stop_reason=stop_reason, diverged=diverged,
                               reference=reference, rule=self.configs[k].training.stopping,
                               train=self._running(k), decay_epochs=self.decay_epochs[k])
        return MemberResult(self.run_ids[k], self.configs[k], self.identity(k), self.rows[k],
                            tables, "diverged" if diverged else "ok", self.message[k],
                            stop_reason, self.epoch, self.best_epoch[k], self.elapsed[k], state,
                            self.data_info, decays=self.decays[k],
                            decay_epochs=list(self.decay_epochs[k]),
                            no_latent_validation=reference, **judged)

    @property
    def data_info(self) -> dict[str, Any]:
        """The data's sizes (the same for every member) and quantization levels."""
        return {"n_train": self.x["train"].shape[1], "n_validation": self.x["validation"].shape[1],
                "n_test": self.x["test"].shape[1], "data_dim": self.x["train"].shape[-1],
                "levels": self.levels}

    def fit(
        self,
        probes: Sequence[Probe] = (),
        *,
        on_epoch: Callable[[Trainer], None] | None = None,
        on_done: Callable[[list[MemberResult]], None] | None = None,
        progress: bool | None = None,
    ) -> list[MemberResult]:
        """Train every member until it stops (from wherever a loaded state left off). Calls
        ``on_epoch(trainer)`` after each epoch (e.g. to checkpoint the members still running)
        and ``on_done(results)`` with the members that finish at that epoch. Returns every
        member's result (in the order they finished)."""
        c = self.configs[0].training
        if progress is None:
            progress = sys.stderr.isatty()
        desc = f"{self.configs[0].method.name}/{self.configs[0].method.estimator} x{self.members}"
        before = len(self.results)
        if self.epoch == 0 and not any(self.rows):
            self._start(probes)
            if on_done is not None and len(self.results) > before:
                on_done(self.results[before:])
        bar = tqdm(total=c.max_epochs, initial=self.epoch, disable=not progress, unit="epoch",
                   desc=desc)
        while self.members and any(s == "running" for s in self.status):
            self._train_epoch()
            before = len(self.results)
            self._finish(self._after_epoch(probes), probes)
            bar.update(1)
            alive = [r[-1]["value"] for r in self.rows if r and r[-1]["metric"] == "elbo_running"]
            if alive:
                bar.set_postfix_str(f"elbo {sum(alive) / len(alive):.2f}, {self.members} running")
            if on_done is not None and len(self.results) > before:
                on_done(self.results[before:])
            if on_epoch is not None and self.members:
                on_epoch(self)
        bar.close()
        return self.results

    def _start(self, probes: Sequence[Probe]) -> None:
        """Epoch 0: the initial model's evaluation and the probes due then."""
        c = self.configs[0].training
        splits = list(c.eval_splits)
        if c.stopping is not None and "validation" not in splits:
            splits.append("validation")
        by_member, nonfinite = self.evaluate(splits)
        finishing = []
        for k, split in nonfinite.items():
            self.status[k] = "diverged"
            self.message[k] = f"epoch 0: non-finite elbo on {split}"
            finishing.append((k, "diverged"))
        for k, rows in by_member.items():
            if k in nonfinite:
                continue
            self.rows[k] += rows
            self.evaluated[k] |= {(0, r["split"]) for r in rows}
            if c.stopping is not None:
                self._check(k, next(r["value"] for r in rows if r["split"] == "validation"
                                    and r["metric"] == "elbo"))
                self.bad[k] = 0
        if probes:
            ctx = self._context(final=False, evaluating=True)
            rows, _, bad = self._run_probes(probes, ctx)
            for k in range(self.members):
                if self.status[k] != "running":
                    continue
                if k in bad:
                    self.status[k], self.message[k] = "diverged", "epoch 0: non-finite probe"
                    finishing.append((k, "diverged"))
                else:
                    self.rows[k] += rows[k]
        if finishing:
            self._finish(finishing, probes)

    def measure(self, probes: Sequence[Probe], *, epoch: int | None = None
                ) -> tuple[list[list[dict]], list[dict]]:
        """The probes on the current state as an end-of-run measurement (e.g. of a loaded
        checkpoint, with ``epoch`` its best epoch): rows and tables per member."""
        ctx = self._context(final=True, evaluating=True, epoch=epoch)
        rows, tables, _ = self._run_probes(probes, ctx)
        return rows, tables

    # -- members: select, checkpoint, resume ----------------------------------------------
    def _subset(self, keep: Sequence[int]) -> Trainer:
        """A trainer holding only the members ``keep`` (their current state)."""
        sub = object.__new__(Trainer)
        sub.__dict__.update(self.__dict__)
        sub._eval_epoch_set = self._eval_epochs
        sub._take(keep)
        return sub

    def _shrink(self, keep: Sequence[int]) -> None:
        self._take(keep)

    def _take(self, keep: Sequence[int]) -> None:
        keep = list(keep)
        index = torch.tensor(keep, dtype=torch.long)
        module = {n: t[index.to(t.device)] for n, t in self.method.state_dict().items()}
        optim = {n: t[index.to(t.device)] for n, t in self.method.optimizer_state().items()}
        best = {n: t[index.to(t.device)] for n, t in self.best_state.items()}
        self.configs = [self.configs[k] for k in keep]
        self.x = {s: t[index.to(t.device)] for s, t in self.x.items()}
        self.labels = {s: t[index] for s, t in self.labels.items()}
        for name in ("run_ids", "elapsed", "rows", "evaluated", "probed", "status", "message",
                     "best", "best_epoch", "best_step", "best_elapsed", "bad", "gain_epoch",
                     "phase_best", "decays", "decay_epochs"):
            values = getattr(self, name)
            setattr(self, name, [values[k] for k in keep])
        if keep:
            self.method = self._build(self.configs, init=False)
            self.method.load_state_dict(module)
            self.method.load_optimizer_state(optim)
            self._base_step_sizes = _optimizer_step_sizes(self.method)
            self._apply_decays()
        self.best_state = best
        if self.warm is not None:
            self.warm = self.warm[index.to(self.warm.device)]
        self.data_random = self.data_random.select(keep) if keep else self.data_random
        self.noise = self.noise.select(keep) if keep else self.noise

    def member_state(self, k: int) -> dict:
        """Everything needed to resume (or evaluate) member k, as plain values and tensors."""
        def one(state: dict[str, Tensor]) -> dict[str, Tensor]:
            return {n: t[k:k + 1].detach().cpu().clone() for n, t in state.items()}

        return {
            "format": CHECKPOINT_FORMAT, "run_id": self.run_ids[k],
            "experiment": self.experiment, "config": self.configs[k].to_dict(),
            "epoch": self.epoch, "step": self.step, "elapsed": self.elapsed[k],
            "rows": list(self.rows[k]), "status": self.status[k], "message": self.message[k],
            "evaluated": sorted(self.evaluated[k]), "probed": sorted(self.probed[k]),
            "stop": {"best": self.best[k], "best_epoch": self.best_epoch[k],
                     "best_step": self.best_step[k], "best_elapsed": self.best_elapsed[k],
                     "bad": self.bad[k], "gain_epoch": self.gain_epoch[k],
                     "phase_best": self.phase_best[k],
                     "decays": self.decays[k], "decay_epochs": list(self.decay_epochs[k])},
            "module": one(self.method.state_dict()), "optim": one(self.method.optimizer_state()),
            "best_module": one(self.best_state),
            "warm": None if self.warm is None else self.warm[k:k + 1].detach().cpu().clone(),
            "streams": {"data": self.data_random.generators[k].get_state(),
                        "noise": self.noise.generators[k].get_state().cpu()},
        }

    @classmethod
    def from_states(cls, states: Sequence[dict], *, datasets: dict | None = None,
                    device: str | None = None) -> Trainer:
        """Rebuild an ensemble from members' states (``member_state``), all at one epoch."""
        states = list(states)
        if not states:
            raise ValueError("from_states needs at least one member state")
        if {s.get("format") for s in states} != {CHECKPOINT_FORMAT}:
            raise ValueError(f"not a checkpoint of this version (format {CHECKPOINT_FORMAT})")
        if len({(s["epoch"], s["step"]) for s in states}) > 1:
            raise ValueError("members resumed together must be at the same epoch")
        configs = []
        for s in states:
            values = dict(s["config"])
            if device is not None:
                values["device"] = device
            configs.append(RunConfig.from_dict(values))
        trainer = cls(configs, run_ids=[s["run_id"] for s in states],
                      experiment=states[0]["experiment"], datasets=datasets)

        def cat(key: str, like: dict[str, Tensor]) -> dict[str, Tensor]:
            return {n: torch.cat([s[key][n] for s in states]).to(like[n].device)
                    for n in like}

        trainer.method.load_state_dict(cat("module", trainer.method.state_dict()))
        trainer.method.load_optimizer_state(cat("optim", trainer.method.optimizer_state()))
        trainer.best_state = cat("best_module", trainer.best_state)
        warm = [s.get("warm") for s in states]
        if any(w is None for w in warm) and not all(w is None for w in warm):
            raise ValueError("members resumed together must all have, or all lack, a "
                             "validation start")
        if warm[0] is not None:
            trainer.warm = torch.cat(warm).to(trainer.device)
        trainer.data_random.set_state([s["streams"]["data"] for s in states])
        trainer.noise.set_state([s["streams"]["noise"] for s in states])
        trainer.epoch, trainer.step = states[0]["epoch"], states[0]["step"]
        trainer.elapsed = [s["elapsed"] for s in states]
        trainer.rows = [list(s["rows"]) for s in states]
        trainer.evaluated = [{tuple(e) for e in s["evaluated"]} for s in states]
        trainer.probed = [{tuple(e) for e in s.get("probed", [])} for s in states]
        trainer.status = [s["status"] for s in states]
        trainer.message = [s["message"] for s in states]
        for name in ("best", "best_epoch", "best_step", "best_elapsed", "bad"):
            setattr(trainer, name, [s["stop"][name] for s in states])
        # a checkpoint written before step-size decays: no decays, the phase's best = the best
        trainer.phase_best = [s["stop"].get("phase_best", s["stop"]["best"]) for s in states]
        trainer.decays = [int(s["stop"].get("decays", 0)) for s in states]
        # a checkpoint written before gain_epoch: the last gain `bad` checks back
        every = configs[0].training.stopping.check_every if configs[0].training.stopping else 1
        trainer.gain_epoch = [int(s["stop"].get("gain_epoch",
                                                s["epoch"] - s["stop"]["bad"] * every))
                              for s in states]
        trainer.decay_epochs = [list(s["stop"].get("decay_epochs", [])) for s in states]
        trainer._apply_decays()
        return trainer


def _check_declared(probe: Probe, result: ProbeResult) -> None:
    """A probe that declares its ``metrics`` and ``tables`` (``vi.probes``) writes no others."""
    metrics, tables = getattr(probe, "metrics", None), getattr(probe, "tables", None)
    extra = []
    if metrics is not None:
        extra += [f"metric {m!r}" for m in dict.fromkeys(r["metric"] for r in result.rows)
                  if m not in metrics]
    if tables is not None:
        extra += [f"table {t!r}" for t in result.tables if t not in tables]
    if extra:
        raise ContractError(f"probe {probe.name!r} wrote {', '.join(extra)}, which it does not "
                            f"declare (metrics {list(metrics or ())}, tables "
                            f"{list(tables or ())})")


def _optimizer_step_sizes(method: InferenceMethod) -> list[Tensor]:
    """Copies of every optimiser's per-member step sizes, in ``optimizers()`` order (flat
    optimisers: one [K, 1] per group; row optimisers: [K, 1, 1])."""
    out = []
    for opt in method.optimizers().values():
        out += [lr.clone() for lr in opt.lrs] if isinstance(opt, FlatOptimizer) \
            else [opt.lr.clone()]
    return out


def _set_optimizer_step_sizes(method: InferenceMethod, base: Sequence[Tensor],
                              scale: Sequence[float]) -> None:
    """Set every optimiser's step sizes to ``base`` × ``scale`` [K] (per member)."""
    it = iter(base)

    def scaled(like: Tensor) -> Tensor:
        b = next(it)
        return b * torch.tensor(scale, dtype=b.dtype, device=b.device).reshape(
            -1, *([1] * (b.dim() - 1)))

    for opt in method.optimizers().values():
        if isinstance(opt, FlatOptimizer):
            opt.lrs = [scaled(lr) for lr in opt.lrs]
        else:
            opt.lr = scaled(opt.lr)


def _member_mask(*, k_all: int, keep: Sequence[int], like: Tensor) -> Tensor:
    mask = torch.zeros(k_all, dtype=torch.bool, device=like.device)
    mask[list(keep)] = True
    return mask.reshape(-1, *([1] * (like.dim() - 1)))


def load_checkpoint(path, *, device: str | None = None, datasets: dict | None = None
                    ) -> Trainer:
    """A one-member ``Trainer`` from a member checkpoint file (``torch.save`` of
    ``member_state``), exactly where it stopped."""
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a run checkpoint of this version")
    return Trainer.from_states([state], device=device, datasets=datasets)


def train(config: RunConfig | dict | Sequence[RunConfig | dict], *, probes: Sequence[Probe] = (),
          progress: bool | None = None, **kwargs) -> list[MemberResult]:
    """Train one configuration (or an ensemble of them) from scratch::

        train({"method": {"name": "vem", "estimator": "score", "baseline": "loo", "n_mc": 4}})
    """
    configs = [config] if isinstance(config, RunConfig | dict) else list(config)
    return Trainer(configs, **kwargs).fit(probes, progress=progress)
