"""What the benchmark scripts share: the machine they ran on, the alternating timing of
contenders and the statistics of their paired ratios, and the hand-written PyTorch training loop
that the library's trainer is measured against.

The scripts import it as ``common`` after putting this folder on ``sys.path``, so that it is
found however a script is run (``python benchmarks/x.py``, or ``runpy.run_path`` from elsewhere).
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributions import Normal, kl_divergence

from vi.inference import METHODS
from vi.training import Trainer

CLOCKS = ("cpu", "wall")


# -- environment ----------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def loadavg() -> list[float]:
    """The 1, 5 and 15 minute load averages, rounded to 0.01."""
    return [round(v, 2) for v in os.getloadavg()]


def environment(**extra: Any) -> dict:
    """The machine and versions for a script's JSON ``env``; ``extra`` entries (e.g. another
    library's version) follow torch's."""
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, **extra, "python": platform.python_version(),
            "loadavg_start": loadavg()}


def env_line(env: dict) -> str:
    """The report's ``env:`` line of an ``environment()`` with ``loadavg_end`` added."""
    pyro = f", pyro {env['pyro']}" if "pyro" in env else ""
    return (f"env: {env['cpu']}, {env['cores']} cores, torch {env['torch']} "
            f"({env['torch_threads']} threads){pyro}, load avg {env['loadavg_start'][0]} -> "
            f"{env['loadavg_end'][0]}")


# -- measurement ----------------------------------------------------------------------------------
def alternate(contenders: list, epochs: int, warmup: int) -> None:
    """``warmup`` + ``epochs`` rounds of one epoch (``run_epoch()``) of every contender, the order
    rotating every round; each timed epoch's CPU and wall seconds per model (divided by the
    contender's ``members``) are appended to its ``cpu`` and ``wall`` lists."""
    n = len(contenders)
    for e in range(warmup + epochs):
        for j in range(n):  # every contender once per round; the order rotates every round
            c = contenders[(j + e) % n]
            w0, c0 = time.perf_counter(), time.process_time()
            c.run_epoch()
            c1, w1 = time.process_time(), time.perf_counter()
            if e >= warmup:
                c.wall.append((w1 - w0) / c.members)
                c.cpu.append((c1 - c0) / c.members)


def quantiles(values: list[float]) -> tuple[float, float, float]:
    """(25 %, 50 %, 75 %) quantiles."""
    if len(values) == 1:
        return values[0], values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[1], q[2]


def paired_ratio(a, b, clock: str) -> dict:
    """Median (and IQR) over rounds of a's / b's time on ``clock``, the two timed in the same
    round."""
    r = [ta / tb for ta, tb in zip(getattr(a, clock), getattr(b, clock), strict=True)]
    lo, med, hi = quantiles(r)
    return {"median": med, "q25": lo, "q75": hi}


# -- the hand-written loop ------------------------------------------------------------------------
STD_NORMAL = Normal(torch.zeros(()), torch.ones(()), validate_args=False)


def mlp_like(stacked, member: int = 0) -> nn.Sequential:
    """A ``nn.Sequential`` of ``nn.Linear`` + tanh with one member's weights of a ``StackedMLP``
    (whose layer i has w{i} [d_in, d_out] and b{i} [d_out] in its flat leaf)."""
    sizes = stacked.sizes
    layers: list[nn.Module] = []
    views = stacked.params.views()
    for i in range(len(sizes) - 1):
        linear = nn.Linear(sizes[i], sizes[i + 1])
        with torch.no_grad():
            linear.weight.copy_(views[f"w{i}"][member].T)
            linear.bias.copy_(views[f"b{i}"][member])
        layers.append(linear)
        if i < len(sizes) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


class HandModel(nn.Module):
    """The trainer's decoder (and encoder) as plain modules, loaded with member 0's initial
    weights."""

    def __init__(self, trainer: Trainer, amortized: bool) -> None:
        super().__init__()
        decoder = trainer.decoder
        self.var_floor = decoder.var_floor
        self.dec = mlp_like(decoder.net)
        self.raw_var = nn.Parameter(decoder.params.views()["raw_var"][0].detach().clone())
        if amortized:
            self.enc = mlp_like(trainer.method.encoder.net)

    def decode(self, z: Tensor) -> tuple[Tensor, Tensor]:
        return self.dec(z), self.var_floor + torch.exp(self.raw_var)

    def log_lik(self, x: Tensor, z: Tensor) -> Tensor:
        mean, var = self.decode(z)
        return Normal(mean, var.sqrt(), validate_args=False).log_prob(x).sum(-1)


def hand_elbo(model: HandModel, x: Tensor, lam: Tensor, eps: Tensor, score: bool) -> Tensor:
    """Per-point surrogate [B]: reparam, or score + leave-one-out baseline; analytic KL."""
    mu, logvar = lam.chunk(2, dim=-1)
    std = torch.exp(0.5 * logvar)
    q = Normal(mu, std, validate_args=False)
    if score:
        z = (mu + std * eps).detach()
        f = model.log_lik(x, z)  # [M, B]; carries ∇θ
        fd = f.detach()
        b = (fd.sum(0, keepdim=True) - fd) / (fd.shape[0] - 1)
        log_q = q.log_prob(z).sum(-1)
        rec = (f + (log_q - log_q.detach()) * (fd - b)).mean(0)
    else:
        rec = model.log_lik(x, mu + std * eps).mean(0)
    return rec - kl_divergence(q, STD_NORMAL).sum(-1)


def streams(trainer: Trainer) -> tuple[torch.Generator, torch.Generator]:
    """Copies of member 0's data-order and training-noise generators (same draws as the
    trainer's)."""
    g_data, g_noise = torch.Generator(), torch.Generator()
    g_data.set_state(trainer.data_random.generators[0].get_state())
    g_noise.set_state(trainer.noise.generators[0].get_state())
    return g_data, g_noise


def hand_loop(trainer: Trainer, method: str, *, latent: int, batch: int, lr: float,
              local_lr: float, n_mc: int = 1,
              score: bool = False) -> tuple[HandModel, Callable[[], None], Callable[[], Tensor]]:
    """A minimal hand-written loop of member 0 of ``trainer``: the same weights, data order and
    noise stream, so it does the same arithmetic (``nn.Linear``, ``torch.distributions``,
    ``torch.optim.Adam``; vem: per minibatch an E-step of per-row Adam on its table's rows, then
    the M-step on θ). Returns (the model, one epoch, q's parameters λ of the training points:
    the encoder's output or the table)."""
    amortized = METHODS[method].has_encoder
    x = trainer.x["train"][0]
    model = HandModel(trainer, amortized)
    g_data, g_noise = streams(trainer)
    n = x.shape[0]
    if amortized:
        opt = torch.optim.Adam(model.parameters(), lr=lr)
    else:
        opt = torch.optim.Adam([*model.dec.parameters(), model.raw_var], lr=lr)
        table = torch.zeros(n, 2 * latent)
        m1, m2 = torch.zeros_like(table), torch.zeros_like(table)
        steps = torch.zeros(n, dtype=torch.long)
    b1, b2 = 0.9, 0.999

    def epoch() -> None:
        perm = torch.randperm(n, generator=g_data)
        total = torch.zeros((), dtype=torch.float64)
        for start in range(0, n, batch):
            idx = perm[start:start + batch]
            xb = x[idx]
            if amortized:
                eps = torch.randn((n_mc, idx.shape[0], latent), generator=g_noise)
                est = hand_elbo(model, xb, model.enc(xb), eps, score)
            else:  # E-step on the rows (per-row Adam), then M-step on θ
                lam = table[idx].clone().requires_grad_()
                eps = torch.randn((n_mc, idx.shape[0], latent), generator=g_noise)
                (g,) = torch.autograd.grad(-hand_elbo(model, xb, lam, eps, score).sum(), lam)
                with torch.no_grad():
                    t = steps[idx] + 1
                    steps[idx] = t
                    mm = b1 * m1[idx] + (1 - b1) * g
                    vv = b2 * m2[idx] + (1 - b2) * g * g
                    m1[idx], m2[idx] = mm, vv
                    tf = t.float().unsqueeze(-1)
                    table[idx] = table[idx] - local_lr * (mm / (1 - b1**tf)) / (
                        (vv / (1 - b2**tf)).sqrt() + 1e-8)
                eps = torch.randn((n_mc, idx.shape[0], latent), generator=g_noise)
                est = hand_elbo(model, xb, table[idx], eps, score)
            opt.zero_grad(set_to_none=True)
            (-est.mean()).backward()
            opt.step()
            total += est.detach().double().sum()  # the running ELBO, as the trainer records

    @torch.no_grad()
    def variational() -> Tensor:
        return model.enc(x) if amortized else table

    return model, epoch, variational
