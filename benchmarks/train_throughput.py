"""Training throughput on ``digits``: the library's trainer, a hand-written loop and Pyro SVI.

Setting (one model for every contender): digits (D = 64; 80 % of the 1797 images for training,
no validation split), latent dimension H = 8, MLP decoder μ_θ(z) = W₂ tanh(W₁ z + b₁) + b₂ of
width 256 with a learned per-dimension variance σ² = σ²_min + exp(ρ) (σ²_min from the data's
quantization), prior N(0, I), an MLP encoder of width 256 for amortized, batch 128, Adam (lr
10⁻³ for θ and φ, 10⁻² for vem's rows). Cells: method ∈ {amortized, vem} x estimator ∈
{reparam (M = 1), score + leave-one-out baseline (M = 4)}, analytic KL.

Contenders of a cell, all started from the same weights:

``ours``  one epoch of ``vi.training.Trainer([config])._train_epoch()``: the library's
          single-model path (an ensemble of K = 1: stacked layers, one flat parameter leaf per
          network, ``vi.optim.FlatOptimizer``, per-member health checks), training only.
``hand``  a minimal hand-written PyTorch loop of the same model, estimator and algorithm
          (``nn.Linear``, ``torch.distributions``, ``torch.optim.Adam``, per-row Adam for vem's
          table), loaded with ``ours``' initial weights (copied from the views of its flat
          leaves) and fed the same data order and noise stream, so it does the same arithmetic.
``pyro``  ``pyro.infer.SVI`` with ``Trace_ELBO`` (if ``pyro-ppl`` is installed, the ``bench``
          extra): an amortized guide, or a local ``pyro.param`` table under ``pyro.plate``
          subsampling for vem; ``pyro-nv`` is the same with Pyro's argument validation off.

Epochs alternate between all contenders of all cells (the order rotates every round), so
machine drift cancels in the paired ratios; each epoch's CPU time (``time.process_time``) and
wall time (``time.perf_counter``) are recorded, and the goals are judged on the median over
rounds of the CPU-time ratio of two contenders timed in the same round. After the same number of
epochs each contender's own q (encoder output or table rows) is scored the same way: the
train-set ELBO per point, analytic KL, 10 samples, common random numbers.

Usage::

    python benchmarks/train_throughput.py            # 30 timed epochs per contender
    python benchmarks/train_throughput.py --quick    # smoke run (seconds)

Prints a human table, then, as the last line, one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.distributions import Normal, kl_divergence

from vi.config import DataConfig, ModelConfig, RunConfig, TrainingConfig
from vi.inference import METHODS, MethodSettings
from vi.training import Trainer

sys.path.insert(0, str(Path(__file__).resolve().parent))  # common.py, however this script is run
from common import (
    CLOCKS,
    HandModel,
    alternate,
    env_line,
    environment,
    hand_loop,
    loadavg,
    paired_ratio,
    quantiles,
    streams,
)

try:  # optional contender: the `bench` extra
    import pyro
    import pyro.distributions as pdist
    from pyro import poutine
    from pyro.infer import SVI, Trace_ELBO
    from pyro.optim import Adam as PyroAdam

    class ScoreNormal(pdist.Normal):
        """A Normal that Pyro treats as not reparameterizable: score-function gradients.

        (``has_rsample_(False)`` on an instance is lost when a plate broadcasts an
        ``Independent`` wrapper around it; a class attribute survives ``expand``.)
        """

        has_rsample = False

except ImportError:  # pragma: no cover - depends on the environment
    pyro = None

LATENT, HIDDEN, BATCH = 8, 256, 128
LR, LOCAL_LR = 1e-3, 1e-2
EVAL_MC = 10
CELLS = (  # (method, estimator, baseline, n_mc)
    ("amortized", "reparam", "none", 1),
    ("amortized", "score", "loo", 4),
    ("vem", "reparam", "none", 1),
    ("vem", "score", "loo", 4),
)
#: goal limits: ours/hand (amortized cells) at most, ours vem/amortized at most, pyro/ours at least
GOALS = {"ours_over_hand_amortized": 1.1, "vem_over_amortized_ours": 1.0, "pyro_over_ours": 1.9}
PYRO_NOTE = 'pyro-ppl is not installed; `pip install -e ".[bench]"` adds it'


# -- one evaluation for every contender ------------------------------------------------------------
Decode = Callable[[Tensor], tuple[Tensor, Tensor]]


@torch.no_grad()
def train_elbo(decode: Decode, lam: Tensor, x: Tensor, seed: int) -> float:
    """Mean over points of E_q[log p(x|z)] − KL(q ‖ N(0, I)), 10 samples, fixed noise."""
    g = torch.Generator().manual_seed(seed)
    mu, logvar = lam.chunk(2, dim=-1)
    std = torch.exp(0.5 * logvar)
    eps = torch.randn((EVAL_MC, *mu.shape), generator=g, dtype=lam.dtype)
    mean, var = decode(mu + std * eps)
    rec = Normal(mean, var.sqrt(), validate_args=False).log_prob(x).sum(-1).mean(0)
    kl = kl_divergence(Normal(mu, std, validate_args=False),
                       Normal(torch.zeros(()), torch.ones(()), validate_args=False)).sum(-1)
    return float((rec - kl).mean())


# -- contenders ------------------------------------------------------------------------------------
@dataclass
class Contender:
    name: str
    method: str
    estimator: str
    run_epoch: Callable[[], None]
    elbo: Callable[[int], float]
    members: int = 1  # models trained per epoch
    wall: list[float] = field(default_factory=list)  # perf_counter seconds per timed epoch
    cpu: list[float] = field(default_factory=list)  # process_time seconds per timed epoch

    @property
    def cell(self) -> str:
        return f"{self.method}/{self.estimator}"


def config_for(method: str, estimator: str, baseline: str, n_mc: int, seed: int) -> RunConfig:
    """The cell as a run configuration: a fixed budget (no plateau rule), no validation split."""
    return RunConfig(
        data=DataConfig(name="digits", test_fraction=0.2, validation_fraction=0.0),
        model=ModelConfig(latent_dim=LATENT, hidden=(HIDDEN,)),
        method=MethodSettings(name=method, estimator=estimator, baseline=baseline, n_mc=n_mc,
                              optimizer="adam", lr=LR, local_optimizer="adam",
                              local_lr=LOCAL_LR, encoder_hidden=(HIDDEN,)),
        training=TrainingConfig(max_epochs=10**6, batch_size=BATCH, stopping=None,
                                eval_splits=("train",)),
        seed=seed,
    )


def ours(method: str, estimator: str, baseline: str, n_mc: int, seed: int,
         datasets: dict) -> tuple[Contender, Trainer]:
    trainer = Trainer([config_for(method, estimator, baseline, n_mc, seed)], datasets=datasets)
    m = trainer.method
    x = trainer.x["train"]  # [1, N, D]

    def decode(z: Tensor) -> tuple[Tensor, Tensor]:  # z [S, N, H] → [S, N, D], σ² broadcastable
        mean, var = trainer.decoder.mean_and_variance(z.unsqueeze(-3))
        return mean.squeeze(-3), var.squeeze(-3)

    def elbo(eval_seed: int) -> float:
        idx = torch.arange(x.shape[1]).unsqueeze(0)
        lam = m.training_lambda(x, idx)[0]  # table rows or encoder output, member 0
        return train_elbo(decode, lam, x[0], eval_seed)

    return Contender("ours", method, estimator, trainer._train_epoch, elbo), trainer


def hand(trainer: Trainer, method: str, estimator: str, n_mc: int) -> Contender:
    """A minimal hand-written loop, same weights, data order and noise stream as ``trainer``."""
    model, epoch, variational = hand_loop(trainer, method, latent=LATENT, batch=BATCH, lr=LR,
                                          local_lr=LOCAL_LR, n_mc=n_mc,
                                          score=estimator == "score")
    x = trainer.x["train"][0]

    def elbo(eval_seed: int) -> float:
        return train_elbo(model.decode, variational(), x, eval_seed)

    return Contender("hand", method, estimator, epoch, elbo)


def pyro_contender(trainer: Trainer, method: str, estimator: str, n_mc: int,
                   validate: bool) -> Contender:
    """Pyro SVI + Trace_ELBO on the same model, initial weights and data order.

    ``validate``: Pyro's argument validation (on by default in Pyro; ``pyro-nv`` turns it off).
    Trace_ELBO estimates the KL by Monte Carlo and has no leave-one-out baseline: the score
    cell uses M = 4 vectorized particles with the plain score function (``has_rsample=False``).
    vem runs the same algorithm as ours: per minibatch an E-step SVI step on the local
    ``pyro.param`` table (decoder sites blocked), then an M-step SVI step on θ (table blocked).
    Pyro's Adam is torch's dense Adam, so an E-step also moves the moments of unvisited rows.
    """
    amortized, score = METHODS[method].has_encoder, estimator == "score"
    x = trainer.x["train"][0]
    model_nn = HandModel(trainer, amortized)
    tag = f"{method}_{estimator}_{'v' if validate else 'nv'}"
    dec_name, local_name = f"dec_{tag}", f"local_{tag}"
    n = x.shape[0]
    g_data, _ = streams(trainer)
    dec_mod = nn.ModuleDict({"dec": model_nn.dec})
    dec_mod.raw_var = model_nn.raw_var

    def model(xb: Tensor, idx: Tensor) -> None:
        pyro.module(dec_name, dec_mod)
        with pyro.plate("data", n, subsample=idx):
            z = pyro.sample("z", pdist.Normal(xb.new_zeros(()), 1.0).expand([LATENT])
                            .to_event(1))
            mean, var = model_nn.decode(z)
            pyro.sample("x", pdist.Normal(mean, var.sqrt()).to_event(1), obs=xb)

    def guide(xb: Tensor, idx: Tensor) -> None:
        if amortized:
            pyro.module(f"enc_{tag}", model_nn.enc)
        else:
            table = pyro.param(local_name, lambda: torch.zeros(n, 2 * LATENT))
        with pyro.plate("data", n, subsample=idx):
            lam = model_nn.enc(xb) if amortized else table[idx]
            mu, logvar = lam.chunk(2, dim=-1)
            family = ScoreNormal if score else pdist.Normal
            pyro.sample("z", family(mu, torch.exp(0.5 * logvar)).to_event(1))

    loss = Trace_ELBO(num_particles=n_mc, vectorize_particles=n_mc > 1, max_plate_nesting=1)

    def hiding(fn, prefix):
        return poutine.block(fn, hide_fn=lambda msg: msg["type"] == "param"
                             and msg["name"].startswith(prefix))

    if amortized:
        steps = [(SVI(model, guide, PyroAdam({"lr": LR}), loss), [])]
    else:  # (E-step, θ's stray gradients to clear), (M-step, the table's)
        steps = [(SVI(hiding(model, dec_name), hiding(guide, dec_name),
                      PyroAdam({"lr": LOCAL_LR}), loss), list(dec_mod.parameters())),
                 (SVI(hiding(model, local_name), hiding(guide, local_name),
                      PyroAdam({"lr": LR}), loss), None)]

    def epoch() -> None:
        pyro.enable_validation(validate)
        perm = torch.randperm(n, generator=g_data)
        for start in range(0, n, BATCH):
            idx = perm[start:start + BATCH]
            for svi, stray in steps:
                svi.step(x[idx], idx)
                for p in stray if stray is not None else [
                        pyro.param(local_name).unconstrained()]:
                    p.grad = None  # blocked sites still accumulate .grad in backward
        pyro.enable_validation(True)  # back to Pyro's default

    def elbo(eval_seed: int) -> float:
        with torch.no_grad():
            lam = model_nn.enc(x) if amortized else pyro.param(local_name).detach()
        return train_elbo(model_nn.decode, lam, x, eval_seed)

    return Contender("pyro" if validate else "pyro-nv", method, estimator, epoch, elbo)


# -- measurement -----------------------------------------------------------------------------------
def run(epochs: int, warmup: int, seed: int, use_pyro: bool) -> dict:
    torch.manual_seed(seed)  # Pyro's noise comes from the global generator
    if pyro is not None:
        pyro.set_rng_seed(seed)
        pyro.clear_param_store()
    env = environment(pyro=None if pyro is None else pyro.__version__)
    datasets: dict = {}
    contenders: list[Contender] = []
    n_train = 0
    for method, estimator, baseline, n_mc in CELLS:
        mine, trainer = ours(method, estimator, baseline, n_mc, seed, datasets)
        n_train = trainer.x["train"].shape[1]
        contenders += [mine, hand(trainer, method, estimator, n_mc)]
        if use_pyro:
            contenders += [pyro_contender(trainer, method, estimator, n_mc, validate)
                           for validate in (True, False)]
    start = time.perf_counter()
    alternate(contenders, epochs, warmup)
    wall = time.perf_counter() - start
    eval_seed = seed + 12345
    results = []
    for c in contenders:
        row = {"method": c.method, "estimator": c.estimator, "contender": c.name,
               "epochs": warmup + epochs}
        for clock in CLOCKS:
            lo, med, hi = quantiles(getattr(c, clock))
            row |= {f"{clock}_s": med, f"{clock}_q25_s": lo, f"{clock}_q75_s": hi}
        row["train_elbo"] = c.elbo(eval_seed)
        results.append(row)
    hand_elbo_of = {(r["method"], r["estimator"]): r["train_elbo"] for r in results
                    if r["contender"] == "hand"}
    for r in results:  # same weights, data and noise: the gap is floating-point drift only
        r["elbo_minus_hand"] = r["train_elbo"] - hand_elbo_of[(r["method"], r["estimator"])]
    by = {(c.method, c.estimator, c.name): c for c in contenders}
    pairs = []
    for method, estimator, _, _ in CELLS:
        mine = by[(method, estimator, "ours")]
        pairs.append(("ours/hand", mine.cell, mine, by[(method, estimator, "hand")]))
        if use_pyro:
            for name in ("pyro", "pyro-nv"):
                pairs.append((f"{name}/ours", mine.cell, by[(method, estimator, name)], mine))
    for estimator in ("reparam", "score"):
        for name in ("ours", "hand"):
            pairs.append((f"vem/amortized ({name})", estimator, by[("vem", estimator, name)],
                          by[("amortized", estimator, name)]))
    ratios = [{"what": what, "cell": cell,
               **{clock: paired_ratio(a, b, clock) for clock in CLOCKS}}
              for what, cell, a, b in pairs]
    env["loadavg_end"] = loadavg()
    return {"benchmark": "train_throughput", "env": env, "wall_s": wall,
            "settings": {"dataset": "digits", "n_train": n_train, "latent_dim": LATENT,
                         "hidden": HIDDEN, "batch_size": BATCH, "lr": LR, "local_lr": LOCAL_LR,
                         "epochs_timed": epochs, "warmup": warmup, "seed": seed,
                         "pyro": use_pyro, "goal_clock": "cpu"},
            "results": results, "ratios": ratios, "goals": goals(ratios)}


def goals(ratios: list[dict]) -> list[dict]:
    """The goals, judged on the CPU-time paired ratios (the wall-time ratio beside)."""
    out = []
    for r in ratios:
        if r["what"] == "ours/hand" and r["cell"].startswith("amortized"):
            limit, upper = GOALS["ours_over_hand_amortized"], True
            goal = f"ours/hand {r['cell']} <= {limit}"
        elif r["what"] == "vem/amortized (ours)":
            limit, upper = GOALS["vem_over_amortized_ours"], True
            goal = f"ours vem/amortized {r['cell']} <= {limit}"
        elif r["what"] in ("pyro/ours", "pyro-nv/ours"):
            limit, upper = GOALS["pyro_over_ours"], False
            goal = f"{r['what']} {r['cell']} >= {limit}"
        else:
            continue
        v = r["cpu"]["median"]
        out.append({"goal": goal, "value": v, "wall_value": r["wall"]["median"],
                    "met": v <= limit if upper else v >= limit})
    return out


def report(out: dict) -> str:
    env, st = out["env"], out["settings"]
    lines = [
        f"train_throughput: digits N={st['n_train']}, H={LATENT}, width {HIDDEN}, batch {BATCH},"
        f" Adam; {st['epochs_timed']} timed epochs per contender after {st['warmup']} warm-up,"
        " contenders alternated",
        env_line(env),
        "",
        f"{'cell':<18} {'contender':<9} {'cpu s/epoch':>11} {'IQR':>17} {'wall s/epoch':>12}"
        f" {'train ELBO':>11} {'- hand':>8}",
    ]
    for r in out["results"]:
        lines.append(f"{r['method'] + '/' + r['estimator']:<18} {r['contender']:<9} "
                     f"{r['cpu_s']:11.4f} [{r['cpu_q25_s']:7.4f}, {r['cpu_q75_s']:7.4f}] "
                     f"{r['wall_s']:12.4f} {r['train_elbo']:11.3f} "
                     f"{r['elbo_minus_hand']:8.1e}")
    lines += ["", f"{'paired ratio (median over rounds)':<40} {'cpu':>6} {'IQR':>16} {'wall':>7}"]
    for r in out["ratios"]:
        c, w = r["cpu"], r["wall"]
        lines.append(f"{r['what'] + '  ' + r['cell']:<40} {c['median']:6.3f} "
                     f"[{c['q25']:6.3f}, {c['q75']:6.3f}] {w['median']:7.3f}")
    lines += ["", "goals (cpu-time ratio; wall in brackets):"]
    for g in out["goals"]:
        lines.append(f"  {g['goal']:<38} {g['value']:6.3f} ({g['wall_value']:5.3f})  "
                     f"{'met' if g['met'] else 'NOT met'}")
    if not st["pyro"]:
        lines.append(f"  Pyro contender skipped: {PYRO_NOTE}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=30, help="timed epochs per contender")
    p.add_argument("--warmup", type=int, default=2, help="untimed epochs first")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default 1; see benchmarks/README.md)")
    p.add_argument("--no-pyro", action="store_true", help="skip the Pyro contender")
    p.add_argument("--quick", action="store_true", help="smoke run: 1 timed epoch, 1 warm-up")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.quick:
        a.epochs, a.warmup = 1, 1
    use_pyro = pyro is not None and not a.no_pyro
    if pyro is None and not a.no_pyro:
        print(f"note: Pyro contender skipped: {PYRO_NOTE}", file=sys.stderr)
    out = run(a.epochs, a.warmup, a.seed, use_pyro)
    print(report(out))
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
