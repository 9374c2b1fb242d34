"""Requests that used to pass validation and fail later (after training, after allocating
gigabytes, with a traceback): each is now refused up front with one message, exit status 2,
and nothing written; and a run whose worker process dies stops with one message and resumes."""

from __future__ import annotations

import json
import os
import resource
import signal
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from experiment_tools import (
    csv_rows,
    files_under,
    grid_dict,
    provenance,
    refused,
    run_dirs,
    tiny_grid,
)

from experiments import cells
from experiments.cli import main
from experiments.grids import MAX_CELLS, MAX_DEPTH, load_grid
from experiments.launch import WorkerDied, run_cells, worker_pool
from experiments.runner import prepare


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _write(folder: Path, grid: dict, name: str = "bad.json") -> Path:
    path = folder / name
    path.write_text(json.dumps(grid))
    return path


# --------------------------------------------------------------------- numbers and devices


def test_a_step_size_that_overflows_the_runs_dtype_is_refused(tmp_path: Path, capsys) -> None:
    """1e308 is finite in float64 but inf in float32, the run's dtype: refused, naming the
    field; the same value is accepted for a float64 run (where it is finite)."""
    grid = _write(tmp_path, grid_dict(base={"method.lr": 1e308}))
    refused(capsys, ["run", str(grid), "--results", "r"],
            "method.lr = 1e+308 is not finite as a float32", tmp_path)
    grid = _write(tmp_path, grid_dict(base={"method.lr": 1e-50}))
    refused(capsys, ["run", str(grid), "--results", "r"], "method.lr = 1e-50 is 0 as a float32",
            tmp_path)
    grid = _write(tmp_path, grid_dict(base={"data.name": "ppca",
                                            "data.options": {"noise_std": 1e39}}))
    refused(capsys, ["run", str(grid), "--results", "r"],
            "data.options.noise_std = 1e+39 is not finite as a float32", tmp_path)
    ok = load_grid(_write(tmp_path, grid_dict(base={"method.lr": 1e308, "dtype": "float64"})))
    assert prepare(ok, tmp_path / "r")[0].config["method"]["lr"] == 1e308


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has MPS")
def test_a_device_this_machine_lacks_is_refused(tmp_path: Path, capsys) -> None:
    grid = tiny_grid(tmp_path)
    refused(capsys, ["run", str(grid), "--results", "r", "--device", "mps"],
            "device 'mps' requested but MPS", tmp_path)
    refused(capsys, ["run", str(grid), "--results", "r", "--device", "cuda:x"],
            "unknown device 'cuda:x'", tmp_path)
    if not torch.cuda.is_available():
        refused(capsys, ["run", str(grid), "--results", "r", "--device", "cuda"],
                "CUDA is not available", tmp_path)
    else:
        n = torch.cuda.device_count()
        refused(capsys, ["run", str(grid), "--results", "r", "--device", f"cuda:{n}"],
                f"this machine has {n} CUDA device(s)", tmp_path)


# ------------------------------------------------------------------------- sizes


def test_a_probe_too_big_for_memory_is_refused_before_training(tmp_path: Path,
                                                               capsys) -> None:
    """A variance_sweep with n_mc, draws and batch of 1e5 would need terabytes after training;
    it is refused at once, without allocating. The study's own probes fit easily."""
    grid = _write(tmp_path, grid_dict(probes={"variance_sweep": {
        "n_mc": [100000], "draws": 100000, "batch": 100000}}))
    rss, t0 = _peak_rss(), time.perf_counter()
    line = refused(capsys, ["run", str(grid), "--results", "r"],
                   "probe 'variance_sweep' needs about", tmp_path)
    assert "lower its draws, n_mc or batch" in line
    assert time.perf_counter() - t0 < 10 and _peak_rss() - rss < 2**30
    # gradvar likewise; its default options are small
    grid = _write(tmp_path, grid_dict(probes={"gradvar": {"n_mc": 100000, "draws": 100000}}))
    refused(capsys, ["run", str(grid), "--results", "r"], "probe 'gradvar' needs about",
            tmp_path)
    fine = load_grid(_write(tmp_path, grid_dict(probes={"variance_sweep": {}, "gradvar": {}})))
    assert prepare(fine, tmp_path / "r")


def test_the_probe_memory_estimate_covers_the_noise_tensor() -> None:
    """The estimate is at least the noise tensor draws x M x B x H that the sweep allocates
    (float32: 4 bytes), and grows with each of them."""
    from vi.config import RunConfig
    from vi.probes import build_probes

    config = RunConfig.from_dict({"model": {"latent_dim": 5}})
    (probe,) = build_probes({"variance_sweep": {"n_mc": [16], "draws": 100, "batch": 64}},
                            config)
    est = cells.probe_memory_bytes(probe.name, probe.options, config, 64, 1000)
    assert est >= 4 * 100 * 16 * 64 * 5
    (bigger,) = build_probes({"variance_sweep": {"n_mc": [16], "draws": 1000, "batch": 64}},
                             config)
    assert cells.probe_memory_bytes(bigger.name, bigger.options, config, 64, 1000) > est
    assert cells.probe_memory_bytes("gaps", None, config, 64, 1000) == 0


def test_a_grid_of_millions_of_cells_is_refused_before_expanding(tmp_path: Path,
                                                                 capsys) -> None:
    """3e6 cells (the product of the axes) are counted, not expanded: refused in well under a
    second without growing the process."""
    seeds = list(range(3000))
    grid = _write(tmp_path, grid_dict(axes={"seed": seeds, "model.latent_dim": list(
        range(1, 1001))}))
    rss, t0 = _peak_rss(), time.perf_counter()
    line = refused(capsys, ["run", str(grid), "--results", "r"], "has 3000000 cells", tmp_path)
    assert f"more than the {MAX_CELLS}" in line
    assert time.perf_counter() - t0 < 5 and _peak_rss() - rss < 2**28
    # --seeds counts too
    small = tiny_grid(tmp_path, axes={"model.latent_dim": list(range(1, 101))})
    refused(capsys, ["run", str(small), "--results", "r", "--seeds",
                     *map(str, range(MAX_CELLS // 100 + 1))], "cells", tmp_path)


def test_a_grid_nested_too_deeply_is_refused(tmp_path: Path, capsys) -> None:
    """100k levels (RecursionError in the JSON parser) and 40 levels (which would recurse in
    the merging of partial configurations) both give one message."""
    deep = tmp_path / "deep.json"
    deep.write_text('{"name": "g", "base": ' + "[" * 100_000 + "]" * 100_000 + "}")
    refused(capsys, ["run", str(deep), "--results", "r"], "nested too deeply", tmp_path)
    nested: dict = {}
    for _ in range(40):
        nested = {"x": nested}
    grid = _write(tmp_path, grid_dict(base={"data.options": nested}))
    refused(capsys, ["run", str(grid), "--results", "r"],
            f"nested 44 levels deep; a grid nests at most {MAX_DEPTH}", tmp_path)


# ------------------------------------------------------------------------------- evaluate


@pytest.fixture(scope="module")
def _runs_once(tmp_path_factory) -> Path:
    """One finished ok run and one diverged run (score function at lr 1e6)."""
    tmp = tmp_path_factory.mktemp("evaluate")
    grid = tiny_grid(tmp, base={"training.max_epochs": 3}, axes={
        "method.name": ["amortized"],
        "estimator": [{"method.estimator": "reparam"},
                      {"method.estimator": "score", "method.lr": 1e6}],
        "seed": [0]})
    assert main(["run", str(grid), "--results", str(tmp / "r")]) == 0
    return tmp / "r"


def _checkpoint(results: Path, status: str) -> Path:
    (run_dir,) = [d for d in run_dirs(results) if provenance(d)["status"] == status]
    return run_dir / "checkpoint.pt"


def test_evaluate_refuses_a_diverged_run(_runs_once: Path, tmp_path: Path, capsys) -> None:
    """A diverged run's checkpoint has nothing finite to evaluate: one message, exit 2, and no
    --out file (before: "Empty DataFrame", exit 0 and a newline-only CSV)."""
    ckpt = _checkpoint(_runs_once, "diverged")
    line = refused(capsys, ["evaluate", str(ckpt), "--out", "e.csv"], "diverged", tmp_path)
    assert "nothing to evaluate" in line and "non-finite" in line


def test_evaluate_reports_a_non_finite_elbo_and_writes_nothing(_runs_once: Path,
                                                               tmp_path: Path,
                                                               capsys) -> None:
    """A checkpoint whose state became non-finite without being marked diverged: exit 1, one
    message naming the split, no --out file."""
    state = torch.load(_checkpoint(_runs_once, "ok"), weights_only=True)
    for key in ("module", "best_module"):
        for name, value in state[key].items():
            if value.is_floating_point():
                state[key][name] = torch.full_like(value, float("nan"))
    torch.save(state, tmp_path / "nan.pt")
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "nan.pt"), "--out", str(tmp_path / "e.csv")]) == 1
    out, err = capsys.readouterr()
    assert err.count("error:") == 1 and "is not finite on its train split" in err, err
    assert "Traceback" not in err and "Empty DataFrame" not in out
    assert not (tmp_path / "e.csv").exists()


def test_evaluate_validates_the_saved_configuration(_runs_once: Path, tmp_path: Path,
                                                    capsys, monkeypatch) -> None:
    """A checkpoint whose configuration was edited is validated as a grid's cell: memory (a
    run too big for this machine), ranges, an overflowing step size, nesting."""
    monkeypatch.setattr(cells, "_memory_limit", lambda: 2**30)
    state = torch.load(_checkpoint(_runs_once, "ok"), weights_only=True)
    edits = {
        "huge.pt": (("model", "hidden"), [20000, 20000], "needs about"),
        "zero.pt": (("model", "latent_dim"), 0, "latent_dim must be an integer"),
        "inf.pt": (("method", "lr"), 1e308, "not finite as a float32"),
    }
    for name, (keys, value, expected) in edits.items():
        edited = json.loads(json.dumps(state["config"]))
        edited[keys[0]][keys[1]] = value
        torch.save({**state, "config": edited}, tmp_path / name)
        rss = _peak_rss()
        line = refused(capsys, ["evaluate", name], expected, tmp_path)
        assert "cannot run here" in line and _peak_rss() - rss < 2**29


def test_evaluate_still_measures_a_finished_run(_runs_once: Path, tmp_path: Path,
                                                capsys) -> None:
    out = tmp_path / "e.csv"
    assert main(["evaluate", str(_checkpoint(_runs_once, "ok")), "--out", str(out)]) == 0
    rows = pd.read_csv(out)
    assert set(rows["split"]) == {"train", "test"} and rows["value"].notna().all()


# --------------------------------------------------------------------------------- slurm


def test_slurm_without_srun_is_refused_before_the_results_folder(tmp_path: Path, capsys,
                                                                 monkeypatch) -> None:
    pytest.importorskip("submitit")
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    grid = tiny_grid(tmp_path)
    refused(capsys, ["run", str(grid), "--results", "r", "--launcher", "slurm"],
            "needs SLURM's srun and sbatch on the PATH", tmp_path)
    assert not (tmp_path / "r").exists()


# ---------------------------------------------------------------------- dead workers


def _tiny_cells(tmp_path: Path, results: Path) -> list:
    return prepare(load_grid(tiny_grid(tmp_path)), results)


def test_a_broken_pool_stops_with_one_error(tmp_path: Path) -> None:
    """A worker of a pool shared across experiments (reproduce) died earlier: the next
    submission raises ``WorkerDied`` (one message), not a BrokenProcessPool traceback, and
    nothing is written."""
    results = tmp_path / "r"
    pool = worker_pool(1)
    try:
        dead = pool.submit(os._exit, 1)
        with pytest.raises(Exception, match="terminated abruptly"):
            dead.result(timeout=120)
        with pytest.raises(WorkerDied, match="run the same command again to resume"):
            run_cells(_tiny_cells(tmp_path, results), pool=pool, progress=False)
    finally:
        pool.shutdown(cancel_futures=True)
    assert not results.exists()


def test_a_worker_killed_while_runs_wait_stops_with_one_error(tmp_path: Path) -> None:
    """The worker is killed while the runs' futures wait for it: ``WorkerDied``."""
    results = tmp_path / "r"
    pool = worker_pool(1)
    busy = pool.submit(time.sleep, 60)
    try:
        deadline = time.monotonic() + 120
        while not busy.running():
            assert time.monotonic() < deadline, "the worker never started"
            time.sleep(0.05)
        (pid,) = list(pool._processes)
        timer = threading.Timer(1.0, os.kill, (pid, signal.SIGKILL))
        timer.start()
        with pytest.raises(WorkerDied, match="a worker process died"):
            run_cells(_tiny_cells(tmp_path, results), pool=pool, progress=False)
        timer.join()
    finally:
        pool.shutdown(cancel_futures=True)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads the process table in /proc")
def test_a_killed_worker_ends_the_run_with_one_message_and_the_rerun_resumes(
        tmp_path: Path) -> None:
    """``run --jobs 2``, one worker killed mid-training: exit 1 with one error line, no
    traceback; the rerun resumes and its CSVs equal an uninterrupted run's."""
    from experiment_tools import children, kill, start, wait_for

    grid = tiny_grid(tmp_path, base={"training.max_epochs": 40, "training.eval_every": 4},
                     axes={"method.name": ["vem", "semi_amortized"], "seed": [0, 1]})
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    assert main(["run", str(grid), "--results", str(reference)]) == 0
    proc = start(["run", str(grid), "--results", str(resumed), "--jobs", "2",
                  "--checkpoint-seconds", "0"], tmp_path)
    try:
        wait_for(lambda: len(list(resumed.glob("g/runs/*/checkpoint.pt"))) >= 2, 300,
                 "checkpoints", proc)
        workers = [pid for pid in children(proc.pid)
                   if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]
        os.kill(workers[0], signal.SIGKILL)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            kill(proc)
    assert proc.returncode == 1, (out, err)
    assert err.count("error:") == 1 and "Traceback" not in err, err
    assert "a worker process died" in err
    assert main(["run", str(grid), "--results", str(resumed)]) == 0
    assert csv_rows(resumed / "g" / "metrics.csv") == csv_rows(reference / "g" / "metrics.csv")
    assert main(["check", "--results", str(resumed)]) == 0
    assert files_under(resumed)
