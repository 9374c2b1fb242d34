"""Reliability (issue 7): resumable runs, divergence as a result, validation before anything
runs, and results that can be checked.

The SIGKILL tests start a real ``python -m experiments run`` subprocess, kill it at a random
moment after its first checkpoint, run the same command again and compare the run's
``metrics.csv`` with an uninterrupted run's, field by field as text (``wall_s`` aside).
"""

from __future__ import annotations

import csv
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from experiments import aggregate as agg
from experiments.cli import main
from experiments.schema import read_runs

ROOT = Path(__file__).resolve().parents[1]


def write_grid(tmp: Path, name: str = "g", **changes) -> Path:
    grid = {
        "name": name, "description": "test grid", "cost": "1 s", "lr": "grid",
        "base": {"dataset": "digits", "hidden": [8], "encoder_hidden": [8], "batch_size": 256,
                 "epochs": 2, "latent_dim": 2, "eval_splits": ["train", "test"],
                 "heldout_max_steps": 10, "heldout_window": 5, "heldout_patience": 1},
        "axes": {"method": ["amortized"], "seed": [0]},
    }
    for key, value in changes.items():
        if key == "base_update":
            grid["base"].update(value)
        else:
            grid[key] = value
    path = tmp / f"{name}.json"
    path.write_text(json.dumps(grid))
    return path


def rows_without_wall(path: Path) -> list[list[str]]:
    """The CSV's fields as written (text, no float parsing), the wall_s column removed."""
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    drop = rows[0].index("wall_s")
    return [r[:drop] + r[drop + 1:] for r in rows]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


# ------------------------------------------------------------------------------- resuming


def _kill_and_resume(tmp_path: Path, method: str) -> None:
    grid = write_grid(tmp_path, axes={"method": [method], "seed": [3]},
                      base_update={"epochs": 40, "eval_every": 4})
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    assert main(["run", str(grid), "--results", str(reference)]) == 0
    proc = subprocess.Popen([sys.executable, "-m", "experiments", "run", str(grid), "--results",
                             str(resumed)], cwd=tmp_path, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    delay = random.Random().uniform(0.0, 0.4)
    try:
        deadline = time.monotonic() + 180
        while not list(resumed.glob("g/runs/*/checkpoint.pt")):
            assert proc.poll() is None, "the run ended before its first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint within 180 s"
            time.sleep(0.01)
        time.sleep(delay)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    (run_dir,) = (resumed / "g" / "runs").iterdir()
    prov = json.loads((run_dir / "provenance.json").read_text())
    assert prov["status"] == "running", f"killed after {delay:.3f} s but the run had finished"
    assert not (resumed / "g" / "metrics.csv").exists()
    assert main(["run", str(grid), "--results", str(resumed)]) == 0
    prov = json.loads((run_dir / "provenance.json").read_text())
    assert prov["status"] == "ok" and prov["resumed"] == 1 and prov["resumed_from_epoch"] >= 1
    ref_dir = reference / "g" / "runs" / run_dir.name
    assert rows_without_wall(run_dir / "metrics.csv") == rows_without_wall(
        ref_dir / "metrics.csv"), f"resumed run differs (killed {delay:.3f} s after checkpoint)"
    assert rows_without_wall(resumed / "g" / "metrics.csv") == rows_without_wall(
        reference / "g" / "metrics.csv")


def test_sigkill_mid_training_then_rerun_equals_uninterrupted_amortized(tmp_path: Path) -> None:
    _kill_and_resume(tmp_path, "amortized")


@pytest.mark.slow
@pytest.mark.parametrize("method", ["vem", "semi_amortized"])
def test_sigkill_mid_training_then_rerun_equals_uninterrupted(tmp_path: Path,
                                                              method: str) -> None:
    _kill_and_resume(tmp_path, method)


def test_unreadable_checkpoint_restarts_the_run(tmp_path: Path) -> None:
    grid = write_grid(tmp_path)
    results = tmp_path / "r"
    assert main(["run", str(grid), "--results", str(results)]) == 0
    (run_dir,) = (results / "g" / "runs").iterdir()
    before = rows_without_wall(run_dir / "metrics.csv")
    prov = json.loads((run_dir / "provenance.json").read_text())
    prov["status"] = "running"  # as if killed
    (run_dir / "provenance.json").write_text(json.dumps(prov))
    (run_dir / "checkpoint.pt").write_bytes(b"not a checkpoint")
    assert main(["run", str(grid), "--results", str(results)]) == 0
    prov = json.loads((run_dir / "provenance.json").read_text())
    assert prov["status"] == "ok" and "checkpoint unreadable" in prov["note"]
    assert rows_without_wall(run_dir / "metrics.csv") == before


# ----------------------------------------------------------------------------- divergence


def test_divergence_is_recorded_and_the_sweep_goes_on(tmp_path: Path, capsys) -> None:
    grid = write_grid(tmp_path, axes={
        "method": ["amortized", "semi_amortized"],
        "estimator": [{"estimator": "reparam", "baseline": "none", "n_mc": 1},
                      {"estimator": "score", "baseline": "none", "n_mc": 1, "lr": 1e6}],
        "seed": [0]}, base_update={"epochs": 3})
    results = tmp_path / "r"
    assert main(["run", str(grid), "--results", str(results)]) == 0  # diverged is a result
    out = capsys.readouterr().out
    assert "2 diverged, 2 ok" in out
    runs = read_runs(results / "g" / "runs.csv")
    status = dict(zip(runs["estimator"] + "/" + runs["method"], runs["status"], strict=True))
    assert status == {"reparam/amortized": "ok", "reparam/semi_amortized": "ok",
                      "score/amortized": "diverged", "score/semi_amortized": "diverged"}
    diverged = runs[runs["status"] == "diverged"]
    assert diverged["message"].str.contains("non-finite").all()
    assert (diverged["last_epoch"] == 0).all()  # the rows up to the last finite epoch survive
    metrics = pd.read_csv(results / "g" / "metrics.csv")
    assert set(metrics["run_id"]) == set(runs["run_id"])
    assert agg.check_results(results)[1] == []
    for run_dir in (results / "g" / "runs").iterdir():  # a finished cell is not rerun
        prov = json.loads((run_dir / "provenance.json").read_text())
        assert prov["status"] in ("ok", "diverged")
    capsys.readouterr()
    assert main(["run", str(grid), "--results", str(results)]) == 0
    assert "4 skipped" in capsys.readouterr().out


# ----------------------------------------------------------------------- trustworthy files


@pytest.fixture(scope="module")
def _finished_once(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("finished")
    grid = write_grid(tmp, axes={"method": ["amortized", "vem"], "seed": [0]})
    results = tmp / "r"
    assert main(["run", str(grid), "--results", str(results)]) == 0
    return results


@pytest.fixture
def finished(_finished_once: Path, tmp_path: Path) -> Path:
    """A finished two-run sweep, copied afresh for each test (tests damage it)."""
    return Path(shutil.copytree(_finished_once, tmp_path / "r"))


def test_truncated_run_metrics_detected_by_aggregation_and_check(finished: Path,
                                                                 capsys) -> None:
    run_dir = sorted((finished / "g" / "runs").iterdir())[0]
    text = (run_dir / "metrics.csv").read_text()
    (run_dir / "metrics.csv").write_text(text[: len(text) - 7])  # cut inside the last row
    with pytest.raises(agg.AggregateError, match="checksum"):
        agg.aggregate(finished / "g")
    _, problems = agg.check_results(finished)
    assert any(run_dir.name in p and "metrics.csv" in p for p in problems)
    capsys.readouterr()
    assert main(["check", "--results", str(finished)]) == 1
    assert run_dir.name in capsys.readouterr().err
    # a whole-row truncation that still parses is caught by the row count and checksum too
    lines = text.splitlines(keepends=True)
    (run_dir / "metrics.csv").write_text("".join(lines[:-2]))
    with pytest.raises(agg.AggregateError, match=run_dir.name):
        agg.aggregate(finished / "g")


def test_truncated_experiment_csv_detected_by_check(finished: Path, capsys) -> None:
    path = finished / "g" / "metrics.csv"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:-1]))  # parses, passes the schema; only the manifest knows
    assert main(["check", "--results", str(finished)]) == 1
    assert "manifest" in capsys.readouterr().err


@pytest.mark.parametrize("damage", ["run_id", "config", "status", "missing"])
def test_inconsistent_run_folders_are_refused(finished: Path, damage: str) -> None:
    run_dir = sorted((finished / "g" / "runs").iterdir())[0]
    if damage == "run_id":
        run_dir.rename(run_dir.with_name(run_dir.name[:-8] + "00000000"))
        expected = "run_id mismatch"
    elif damage == "config":
        cfg = json.loads((run_dir / "config.json").read_text())
        cfg["config"]["lr"] = 0.5
        (run_dir / "config.json").write_text(json.dumps(cfg))
        expected = "config hash mismatch"
    elif damage == "status":
        prov = json.loads((run_dir / "provenance.json").read_text())
        prov["status"] = "running"
        (run_dir / "provenance.json").write_text(json.dumps(prov))
        expected = "incomplete"
    else:
        (run_dir / "metrics.csv").unlink()
        expected = "metrics.csv missing"
    with pytest.raises(agg.AggregateError, match=expected):
        agg.aggregate(finished / "g")


def test_check_never_imports_torch(finished: Path) -> None:
    """``check`` runs with torch made unimportable (a sys.modules guard), in a fresh process."""
    code = ("import sys\n"
            "class _NoTorch:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] in ('torch', 'vi'):\n"
            "            raise ImportError('imported ' + name)\n"
            "sys.meta_path.insert(0, _NoTorch())\n"
            "from experiments.cli import main\n"
            f"rc = main(['check', '--results', {str(finished)!r}])"
            "\nassert 'torch' not in sys.modules and 'vi' not in sys.modules\n"
            "sys.exit(rc)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "no problems" in out.stdout


def test_figures_never_imports_torch(finished: Path) -> None:
    """``figures`` validates first and never imports torch or the training code."""
    pytest.importorskip("experiments.figures")
    code = ("import sys\n"
            "class _NoTorch:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] in ('torch', 'vi'):\n"
            "            raise ImportError('imported ' + name)\n"
            "sys.meta_path.insert(0, _NoTorch())\n"
            "from experiments.cli import main\n"
            f"rc = main(['figures', '--results', {str(finished)!r}, 'elbo_curves'])"
            "\nassert 'torch' not in sys.modules and 'vi' not in sys.modules\n"
            "sys.exit(rc)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(),
                         capture_output=True, text=True, timeout=120)
    # no elbo_curves results here: a clean usage error, not an ImportError of torch
    assert out.returncode == 2, out.stderr
    assert "no results for elbo_curves" in out.stderr


# -------------------------------------------------------------------------- bad inputs

BAD_GRIDS = {
    "unknown_grid_key": ({"colour": "red"}, "unknown grid key"),
    "unknown_config_key": ({"base_update": {"learning_rate": 0.1}}, "learning_rate"),
    "wrong_type": ({"base_update": {"latent_dim": "two"}}, "latent_dim"),
    "non_positive_dim": ({"base_update": {"latent_dim": 0}}, "latent_dim must be a positive"),
    "batch_too_large": ({"base_update": {"batch_size": 100000}}, "exceeds the"),
    "loo_with_one_sample": ({"base_update": {"estimator": "score", "baseline": "loo",
                                             "n_mc": 1}}, "loo"),
    "semi_zero_refinement": ({"axes": {"method": ["semi_amortized"]},
                              "base_update": {"refine_steps": 0}}, "refine_steps"),
    "unknown_method": ({"axes": {"method": ["vae"]}}, "unknown method 'vae'; valid: vem"),
    "unknown_estimator": ({"base_update": {"estimator": "reinforce"}}, "reinforce"),
    "unknown_dataset": ({"base_update": {"dataset": "cifar"}}, "unknown dataset 'cifar'"),
    "missing_data_file": ({"base_update": {"dataset": "mnist", "data_path": "/nonexistent/mnist"}
                           }, "mnist"),
    "unknown_product": ({"products": {"movies": {}}}, "unknown product 'movies'"),
    "unknown_select_metric": ({"select": {"metric": "accuracy"}}, "unknown metric 'accuracy'"),
    "empty_axis": ({"axes": {"method": []}}, "non-empty list"),
    "exact_needs_linear": ({"products": {"exact": {}}}, "linear decoder"),
}


@pytest.mark.parametrize("case", sorted(BAD_GRIDS))
def test_bad_grid_exits_2_with_a_message_and_writes_nothing(tmp_path: Path, capsys,
                                                           case: str) -> None:
    changes, expected = BAD_GRIDS[case]
    grid = write_grid(tmp_path, **changes)
    _assert_refused(tmp_path, capsys, ["run", str(grid), "--results", str(tmp_path / "r")],
                    expected)


BAD_COMMANDS = {
    "unknown_experiment": (["run", "elbo_curve"], "unknown experiment 'elbo_curve'; valid:"),
    "unknown_command": (["train"], "invalid choice: 'train'"),
    "jobs_zero": (["run", "elbo_curves", "--jobs", "0"], "positive integer"),
    "negative_seed": (["run", "elbo_curves", "--seeds", "-1"], "integer >= 0"),
    "bad_launcher": (["run", "elbo_curves", "--launcher", "pbs"], "invalid choice: 'pbs'"),
    "slurm_option_without_slurm": (["run", "elbo_curves", "--partition", "gpu"],
                                   "apply only with --launcher slurm"),
    "no_cuda": (["run", "elbo_curves", "--quick", "--device", "cuda:7"], "cuda"),
    "results_is_a_file": (["run", "elbo_curves", "--results", "afile"], "not a folder"),
    "figures_unknown": (["figures", "--results", ".", "pictures"], "unknown experiment"),
    "check_missing_dir": (["check", "--results", "nowhere"], "no results folder"),
    "data_unknown_name": (["data", "cifar", "--out", "x.npz"], "unknown dataset 'cifar'"),
    "data_bad_suffix": (["data", "digits", "--out", "x.csv"], ".npz"),
    "data_bad_option": (["data", "ppca", "--option", "rows=5", "--out", "x.npz"], "rows"),
    "data_bad_fraction": (["data", "digits", "--test-fraction", "1.5", "--out", "x.npz"],
                          "test_fraction"),
    "evaluate_missing": (["evaluate", "none.pt"], "no checkpoint file"),
}


@pytest.mark.parametrize("case", sorted(BAD_COMMANDS))
def test_bad_command_exits_2_with_a_message_and_writes_nothing(tmp_path: Path, capsys,
                                                              case: str) -> None:
    argv, expected = BAD_COMMANDS[case]
    (tmp_path / "afile").write_text("")
    if case == "no_cuda":
        pytest.importorskip("torch")
        import torch

        if torch.cuda.device_count() > 7:
            pytest.skip("this machine has a cuda:7")
    _assert_refused(tmp_path, capsys, argv, expected)


def _assert_refused(tmp_path: Path, capsys, argv: list[str], expected: str) -> None:
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    cwd = Path.cwd()
    os.chdir(tmp_path)
    try:
        capsys.readouterr()
        code = main(argv)
    finally:
        os.chdir(cwd)
    err = capsys.readouterr().err
    assert code == 2, err
    assert expected in err, err
    assert err.count("error:") == 1
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
