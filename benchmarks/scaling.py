"""Scaling of training with the number of points N and the latent dimension H (issue 8).

For ``vem`` and ``amortized`` on synthetic PPCA data (``vi.data`` ``ppca``, D = 20, all points in
the training split), MLP decoder and encoder of width 64, batch 128, Adam; the rest as
``vi.training.TrainConfig``'s defaults. Two sweeps:

* N = 10³ … 10⁶ at H = 4: seconds per epoch (``Trainer.run_epoch``, evaluation off) and the
  log-log slope of time against N, which is 1 when an epoch costs the same per point;
* H = 2 … 128 at N = 10⁵: seconds per epoch and memory.

Memory. torch's CPU tensors are invisible to ``tracemalloc``, so memory is measured twice: the
bytes of the method's own state (``tensor.nbytes`` of vem's N x 2H table ``local``, its per-row
Adam moments and int64 step counts, the networks and their Adam moments), and the process's
resident set: its size before the trainer is built, and its peak from then until after the timed
epochs (the kernel's high-water mark VmHWM, reset with ``/proc/self/clear_refs``). vem's
expected footprint is

    N·2H·4 B x 3 (table + two Adam moments) + N·8 B (row step counts) + 3 x model bytes,

and the goal is a peak resident-set growth within 2x of it. Each configuration runs in a fresh
process (``--quick`` runs in-process: faster, but memory freed by earlier configurations may be
reused without showing as growth).

Usage::

    python benchmarks/scaling.py            # full sweeps (~2-4 min on 2 busy cores)
    python benchmarks/scaling.py --quick    # N = 10³ … 10⁴, H = 2, 8 at N = 10³ (seconds)

Prints a human table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import numpy as np
import torch

from vi.data import load_dataset
from vi.training import TrainConfig, Trainer

D, HIDDEN, BATCH = 20, 64, 128
METHODS = ("amortized", "vem")
PAGE = os.sysconf("SC_PAGE_SIZE")


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


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def nbytes(tensors) -> int:
    return sum(t.nbytes for t in tensors if isinstance(t, torch.Tensor))


def state_bytes(trainer: Trainer) -> dict:
    """Bytes of the method's state: local table (+ its optimiser), networks, their optimisers."""
    m = trainer.method
    model = nbytes(m.parameters())
    if trainer.config.method == "vem":
        opt = m.local_opt
        local = m.local.nbytes
        local_opt = nbytes([opt.steps, getattr(opt, "exp_avg", None),
                            getattr(opt, "exp_avg_sq", None)])
        global_opt = m.decoder_opt
    else:
        local = local_opt = 0
        global_opt = m.opt
    opt_state = nbytes(v for s in global_opt.state.values() for v in s.values())
    return {"local": local, "local_opt": local_opt, "model": model, "model_opt": opt_state}


def expected_bytes(method: str, n: int, h: int, model: int) -> int:
    """N·2H·4 B x (table + 2 moments) + N·8 B step counts (vem only) + model x (1 + 2 moments)."""
    table = n * 2 * h * 4 * 3 + n * 8 if method == "vem" else 0
    return table + 3 * model


def epochs_for(n: int) -> tuple[int, int]:
    """(warm-up, timed) epochs: more repetitions where epochs are short."""
    if n <= 10_000:
        return 1, 5
    if n <= 100_000:
        return 1, 2
    return 0, 1


def config_for(method: str, n: int, h: int, seed: int = 0) -> TrainConfig:
    return TrainConfig(
        dataset="ppca", latent_dim=h, hidden=[HIDDEN], encoder_hidden=[HIDDEN], method=method,
        batch_size=min(BATCH, n), epochs=10**9, eval_every=10**9, eval_splits=["train"],
        test_fraction=0.0, seed=seed,
    )


def dataset_for(n: int, seed: int = 0):
    return load_dataset("ppca", seed=seed, test_fraction=0.0, n=n, data_dim=D, latent_dim=4)


def measure(method: str, n: int, h: int, seed: int = 0) -> dict:
    """One configuration: build, time epochs, and read the memory counters (run in a child)."""
    # A small run first: torch's one-time allocations (autograd, optimiser kernels) are then not
    # counted as this configuration's memory.
    Trainer(config_for(method, 256, h, seed), dataset_for(256, seed)).run_epoch()
    dataset = dataset_for(n, seed)
    rss0, peak_reset = rss_bytes(), reset_peak()
    trainer = Trainer(config_for(method, n, h, seed), dataset)
    rss_built = rss_bytes()
    warmup, timed = epochs_for(n)
    for _ in range(warmup):
        trainer.run_epoch()
    cpu, wall = [], []
    for _ in range(timed):
        w0, c0 = time.perf_counter(), time.process_time()
        trainer.run_epoch()
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - w0)
    state = state_bytes(trainer)
    expected = expected_bytes(method, n, h, state["model"])
    peak = peak_rss_bytes()
    return {
        "method": method, "n": n, "latent_dim": h, "epochs_timed": timed, "warmup": warmup,
        "cpu_s": statistics.median(cpu), "wall_s": statistics.median(wall),
        "state_bytes": state, "state_total": sum(state.values()), "expected_bytes": expected,
        "rss_before": rss0, "rss_built": rss_built, "rss_growth": rss_built - rss0,
        "peak_growth": peak - rss0, "peak_rss": peak, "peak_reset": peak_reset,
    }


def run_isolated(method: str, n: int, h: int, threads: int) -> dict:
    """``measure`` in a fresh interpreter, so that its peak resident set is its own."""
    cmd = [sys.executable, __file__, "--one", method, str(n), str(h), "--threads", str(threads)]
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
    p.add_argument("--ns", type=str, default=None, help="comma-separated N for the N sweep")
    p.add_argument("--hs", type=str, default=None, help="comma-separated H for the H sweep")
    p.add_argument("--h-sweep-n", type=int, default=None, help="N of the H sweep")
    p.add_argument("--one", nargs=3, metavar=("METHOD", "N", "H"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.one:
        print(json.dumps(measure(a.one[0], int(a.one[1]), int(a.one[2]))))
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
    load0 = os.getloadavg()

    def one(method, n, h):
        return run_isolated(method, n, h, a.threads) if isolate else measure(method, n, h)

    n_rows = [one(m, n, h_fixed) for n in ns for m in METHODS]
    h_rows = [one(m, h_n, h) for h in hs for m in METHODS]
    slopes = {}
    for m in METHODS:
        rows = [r for r in n_rows if r["method"] == m]
        if len(rows) >= 2:
            ns_m = [r["n"] for r in rows]
            slopes[m] = {clock: loglog_slope(ns_m, [r[f"{clock}_s"] for r in rows])
                         for clock in ("cpu", "wall")}
    vem_big = max((r for r in n_rows + h_rows if r["method"] == "vem"),
                  key=lambda r: r["expected_bytes"])
    goals = [
        *({"goal": f"{m}: log-log slope of time/epoch on N ~ 1", "value": s["cpu"],
           "met": 0.85 <= s["cpu"] <= 1.15} for m, s in slopes.items()),
        {"goal": f"vem peak RSS growth <= 2x expected (N={vem_big['n']}, "
                 f"H={vem_big['latent_dim']})",
         "value": vem_big["peak_growth"] / vem_big["expected_bytes"],
         # in-process, freed memory is reused without growth: the ratio is then not judged
         "met": vem_big["peak_growth"] <= 2 * vem_big["expected_bytes"] if isolate else None},
    ]
    out = {
        "benchmark": "scaling",
        "env": {"cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": a.threads,
                "torch": torch.__version__, "python": platform.python_version(),
                "loadavg_start": [round(v, 2) for v in load0],
                "loadavg_end": [round(v, 2) for v in os.getloadavg()]},
        "settings": {"data": f"ppca D={D}", "hidden": HIDDEN, "batch_size": BATCH,
                     "h_for_n_sweep": h_fixed, "n_for_h_sweep": h_n, "isolated": isolate},
        "n_sweep": n_rows, "h_sweep": h_rows, "slopes": slopes, "goals": goals,
        "wall_s": time.perf_counter() - start,
    }
    print(report(out))
    print(json.dumps(out))
    return 0


def mib(b: float) -> str:
    return f"{b / 2**20:9.2f}"


def report(out: dict) -> str:
    env, st = out["env"], out["settings"]
    lines = [
        f"scaling: {st['data']}, width {st['hidden']}, batch {st['batch_size']}, Adam; "
        f"{'each configuration in its own process' if st['isolated'] else 'in-process'}",
        f"env: {env['cpu']}, {env['cores']} cores, torch {env['torch']} "
        f"({env['torch_threads']} threads), load avg {env['loadavg_start'][0]} -> "
        f"{env['loadavg_end'][0]}",
        "",
        f"{'method':<10} {'N':>9} {'H':>4} {'cpu s/ep':>9} {'wall s/ep':>9} {'us/point':>9} "
        f"{'table MiB':>9} {'state MiB':>9} {'expect MiB':>10} {'RSS+ MiB':>9} {'peak+ MiB':>9}"
        f" {'peak/exp':>8}",
    ]
    for title, rows in (("N sweep", out["n_sweep"]), ("H sweep", out["h_sweep"])):
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
    for m, s in out["slopes"].items():
        lines.append(f"  {m:<10} cpu {s['cpu']:.3f}   wall {s['wall']:.3f}")
    lines += ["", "goals:"]
    for g in out["goals"]:
        verdict = {True: "met", False: "NOT met", None: "not judged (in-process)"}[g["met"]]
        lines.append(f"  {g['goal']:<62} {g['value']:6.3f}  {verdict}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
