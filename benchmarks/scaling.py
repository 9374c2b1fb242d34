"""Scaling of training with the number of points N and the latent dimension H: time and memory.

For ``vem`` and ``amortized`` on synthetic PPCA data (``vi.data`` ``ppca``, D = 20, generated
with 4 latent dimensions, every point in the training split), MLP decoder and encoder of width
64, batch 128, Adam, reparam with M = 1; a single model (an ensemble of K = 1; ``--members``
sets K). The rest as ``vi.config.RunConfig``'s defaults. Two sweeps:

* N = 10³ … 10⁶ at H = 4: seconds per epoch (``vi.training.Trainer._train_epoch``, training
  only) and the log-log slope of time against N, which is 1 when an epoch costs the same per
  point;
* H = 2 … 128 at N = 10⁵: seconds per epoch and memory.

Memory. torch's CPU tensors are invisible to ``tracemalloc``, so memory is measured twice: the
bytes of the trainer's own tensors (``tensor.nbytes``: vem's local table ``local`` [K, N, 2H], its
per-row Adam moments and int64 step counts, the networks' flat leaves, their gradients and Adam
moments, the best-state snapshot the trainer keeps for its plateau rule, and the trainer's
stacked copy of the training split), and the process's resident set: its size before the trainer
is built (the data set is loaded before), and its peak from then until after the timed epochs
(the kernel's high-water mark VmHWM, reset with ``/proc/self/clear_refs``). The expected
footprint is

    vem:        N·2H·4 B x 4 (table, two Adam moments, snapshot) + N·8 B (row step counts)
    both:       + N·D·4 B (the training split) + 5 x model bytes (parameters, gradients, two Adam
                moments, snapshot)

per member, and the goal is a peak resident-set growth within 2x of it. Each configuration
runs in a fresh process (``--quick`` runs in-process: faster, but memory freed by earlier
configurations may be reused without showing as growth, so the memory goal is not judged).
Times: CPU time (``time.process_time``) and wall time (``time.perf_counter``) per epoch, the
median over the timed epochs; the slope goal is judged on CPU time.

Usage::

    python benchmarks/scaling.py            # full sweeps, one process per configuration
    python benchmarks/scaling.py --quick    # N = 10³ … 10⁴, H = 2, 8 at N = 10³ (seconds)

Prints a human table, then, as the last line, one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from vi.config import DataConfig, ModelConfig, RunConfig, TrainingConfig
from vi.inference import METHODS as TRAITS
from vi.inference import MethodSettings
from vi.training import Trainer

sys.path.insert(0, str(Path(__file__).resolve().parent))  # common.py, however this script is run
from common import env_line, environment, loadavg

D, DATA_LATENT, HIDDEN, BATCH = 20, 4, 64, 128
METHODS = ("amortized", "vem")
PAGE = os.sysconf("SC_PAGE_SIZE")
SLOPE_RANGE = (0.85, 1.15)


def rss_bytes() -> int:
    """Current resident set size of this process."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux ``clear_refs`` 5)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """Peak resident set size since the last ``reset_peak`` (VmHWM; else ru_maxrss)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def nbytes(tensors) -> int:
    return sum(t.nbytes for t in tensors if isinstance(t, torch.Tensor))


def state_bytes(trainer: Trainer) -> dict:
    """Bytes of the trainer's tensors: local table and its optimiser, the networks (flat
    leaves and gradients) and their optimiser, the best-state snapshot, the data."""
    m = trainer.method
    params = list(m.parameters())
    model = nbytes(params)
    grads = nbytes(p.grad for p in params)
    local = local_opt = model_opt = 0
    for opt in m.optimizers().values():
        state = [opt.steps, getattr(opt, "exp_avg", None), getattr(opt, "exp_avg_sq", None)]
        if m.has_local_table and opt is m.local_opt:
            local = m.local.nbytes
            local_opt = nbytes(state)
        else:
            flat = [t for s in state for t in (s if isinstance(s, list) else [s])]
            model_opt += nbytes(flat)
    return {"local": local, "local_opt": local_opt, "model": model, "grads": grads,
            "model_opt": model_opt, "snapshot": nbytes(trainer.best_state.values()),
            "data": nbytes(trainer.x.values())}


def expected_bytes(method: str, n: int, h: int, model: int, members: int) -> int:
    """vem: N·2H·4 B x 4 + N·8 B; both: + N·D·4 B + 5 x model bytes (per member)."""
    table = members * (n * 2 * h * 4 * 4 + n * 8) if TRAITS[method].has_local_table else 0
    return table + members * n * D * 4 + 5 * model


def epochs_for(n: int) -> tuple[int, int]:
    """(warm-up, timed) epochs: more repetitions where epochs are short."""
    if n <= 10_000:
        return 1, 5
    if n <= 100_000:
        return 1, 2
    return 0, 1


def config_for(method: str, n: int, h: int, seed: int = 0) -> RunConfig:
    return RunConfig(
        data=DataConfig(name="ppca", seed=0, test_fraction=0.0, validation_fraction=0.0,
                        options={"n": n, "data_dim": D, "latent_dim": DATA_LATENT}),
        model=ModelConfig(latent_dim=h, hidden=(HIDDEN,)),
        method=MethodSettings(name=method, estimator="reparam", baseline="none", n_mc=1,
                              encoder_hidden=(HIDDEN,)),
        training=TrainingConfig(max_epochs=10**6, batch_size=min(BATCH, n), stopping=None,
                                eval_splits=("train",)),
        seed=seed,
    )


def trainer_for(method: str, n: int, h: int, members: int, datasets: dict) -> Trainer:
    return Trainer([config_for(method, n, h, seed) for seed in range(members)],
                   datasets=datasets)


def measure(method: str, n: int, h: int, members: int = 1) -> dict:
    """One configuration: build, time epochs, and read the memory counters (run in a child)."""
    # A small run first: torch's one-time allocations (autograd, optimiser kernels) are then not
    # counted as this configuration's memory.
    trainer_for(method, 256, h, 1, {})._train_epoch()
    datasets: dict = {}
    for seed in range(members):  # the data set is loaded before the baseline is read
        Trainer._dataset(config_for(method, n, h, seed), datasets)
    rss0, peak_reset = rss_bytes(), reset_peak()
    trainer = trainer_for(method, n, h, members, datasets)
    rss_built = rss_bytes()
    warmup, timed = epochs_for(n)
    for _ in range(warmup):
        trainer._train_epoch()
    cpu, wall = [], []
    for _ in range(timed):
        w0, c0 = time.perf_counter(), time.process_time()
        trainer._train_epoch()
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - w0)
    state = state_bytes(trainer)
    expected = expected_bytes(method, n, h, state["model"], members)
    peak = peak_rss_bytes()
    return {
        "method": method, "n": n, "latent_dim": h, "members": members, "epochs_timed": timed,
        "warmup": warmup, "cpu_s": statistics.median(cpu), "wall_s": statistics.median(wall),
        "state_bytes": state, "state_total": sum(state.values()), "expected_bytes": expected,
        "rss_before": rss0, "rss_built": rss_built, "rss_growth": rss_built - rss0,
        "peak_growth": peak - rss0, "peak_rss": peak, "peak_reset": peak_reset,
    }


def run_isolated(method: str, n: int, h: int, members: int, threads: int) -> dict:
    """``measure`` in a fresh interpreter, so that its peak resident set is its own."""
    cmd = [sys.executable, __file__, "--one", method, str(n), str(h), "--members",
           str(members), "--threads", str(threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def loglog_slope(ns: list[int], ts: list[float]) -> float:
    """Least-squares slope of log t on log N (1 = linear time)."""
    return float(np.polyfit(np.log(ns), np.log(ts), 1)[0])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small sweeps, in-process (seconds)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--members", type=int, default=1, help="ensemble size K (default 1)")
    p.add_argument("--ns", type=str, default=None, help="comma-separated N for the N sweep")
    p.add_argument("--hs", type=str, default=None, help="comma-separated H for the H sweep")
    p.add_argument("--h-sweep-n", type=int, default=None, help="N of the H sweep")
    p.add_argument("--one", nargs=3, metavar=("METHOD", "N", "H"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.one:
        print(json.dumps(measure(a.one[0], int(a.one[1]), int(a.one[2]), a.members)))
        return 0
    if a.quick:
        ns, hs, h_n, h_fixed = [1_000, 3_000, 10_000], [2, 8], 1_000, 4
    else:
        ns, hs, h_n, h_fixed = [1_000, 10_000, 100_000, 1_000_000], [2, 8, 32, 128], 100_000, 4
    ns = [int(v) for v in a.ns.split(",")] if a.ns else ns
    hs = [int(v) for v in a.hs.split(",")] if a.hs else hs
    h_n = a.h_sweep_n or h_n
    isolate = not a.quick
    start = time.perf_counter()
    env = environment()

    def one(method, n, h):
        if isolate:
            return run_isolated(method, n, h, a.members, a.threads)
        return measure(method, n, h, a.members)

    n_rows = [one(m, n, h_fixed) for n in ns for m in METHODS]
    h_rows = [one(m, h_n, h) for h in hs for m in METHODS]
    slopes = {}
    for m in METHODS:
        rows = [r for r in n_rows if r["method"] == m]
        if len(rows) >= 2:
            ns_m = [r["n"] for r in rows]
            slopes[m] = {clock: loglog_slope(ns_m, [r[f"{clock}_s"] for r in rows])
                         for clock in ("cpu", "wall")}
    vem_big = max((r for r in n_rows + h_rows if TRAITS[r["method"]].has_local_table),
                  key=lambda r: r["expected_bytes"])
    lo, hi = SLOPE_RANGE
    goals = [
        *({"goal": f"{m}: log-log slope of time/epoch on N in [{lo}, {hi}]", "value": s["cpu"],
           "wall_value": s["wall"], "met": lo <= s["cpu"] <= hi} for m, s in slopes.items()),
        {"goal": f"vem peak RSS growth <= 2x expected (N={vem_big['n']}, "
                 f"H={vem_big['latent_dim']})",
         "value": vem_big["peak_growth"] / vem_big["expected_bytes"],
         # in-process, freed memory is reused without growth: the ratio is then not judged
         "met": vem_big["peak_growth"] <= 2 * vem_big["expected_bytes"] if isolate else None},
    ]
    out = {
        "benchmark": "scaling",
        "env": {**env, "loadavg_end": loadavg()},
        "settings": {"data": f"ppca D={D}", "hidden": HIDDEN, "batch_size": BATCH,
                     "members": a.members, "h_for_n_sweep": h_fixed, "n_for_h_sweep": h_n,
                     "isolated": isolate, "goal_clock": "cpu", "quick": a.quick},
        "results": {"n_sweep": n_rows, "h_sweep": h_rows, "slopes": slopes},
        "goals": goals, "wall_s": time.perf_counter() - start,
    }
    print(report(out))
    print(json.dumps(out))
    return 0


def mib(b: float) -> str:
    return f"{b / 2**20:9.2f}"


def report(out: dict) -> str:
    env, st, res = out["env"], out["settings"], out["results"]
    lines = [
        f"scaling: {st['data']}, width {st['hidden']}, batch {st['batch_size']}, Adam, "
        f"K={st['members']}; "
        f"{'each configuration in its own process' if st['isolated'] else 'in-process'}",
        env_line(env),
        "",
        f"{'method':<10} {'N':>9} {'H':>4} {'cpu s/ep':>9} {'wall s/ep':>9} {'us/point':>9} "
        f"{'table MiB':>9} {'state MiB':>9} {'expect MiB':>10} {'RSS+ MiB':>9} {'peak+ MiB':>9}"
        f" {'peak/exp':>8}",
    ]
    for title, rows in (("N sweep", res["n_sweep"]), ("H sweep", res["h_sweep"])):
        lines.append(f"-- {title}")
        for r in rows:
            s = r["state_bytes"]
            ratio = r["peak_growth"] / r["expected_bytes"] if r["expected_bytes"] else math.nan
            lines.append(
                f"{r['method']:<10} {r['n']:>9} {r['latent_dim']:>4} {r['cpu_s']:9.3f} "
                f"{r['wall_s']:9.3f} {1e6 * r['cpu_s'] / r['n']:9.2f} "
                f"{mib(s['local'] + s['local_opt'])} {mib(r['state_total'])} "
                f" {mib(r['expected_bytes'])} {mib(r['rss_growth'])} {mib(r['peak_growth'])}"
                f" {ratio:8.2f}")
    lines += ["", "log-log slope of time per epoch on N (1 = linear):"]
    for m, s in res["slopes"].items():
        lines.append(f"  {m:<10} cpu {s['cpu']:.3f}   wall {s['wall']:.3f}")
    lines += ["", "goals:"]
    for g in out["goals"]:
        verdict = {True: "met", False: "NOT met", None: "not judged (in-process)"}[g["met"]]
        lines.append(f"  {g['goal']:<62} {g['value']:6.3f}  {verdict}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
