"""Reliability: resumable runs, divergence and write failures as results, validation before
anything runs, one results folder at a time, resumable ``--force``, and results that can be
checked.

Resuming is tested in-process (an interruption raised right after a checkpoint is saved) and,
in the slow suite, with a real SIGKILL of ``python -m experiments run --jobs 2``; either way the
rerun's ``metrics.csv`` must equal an uninterrupted run's field by field as text (``wall_s``
aside).
"""

from __future__ import annotations

import fcntl
import json
import os
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from experiment_tools import (
    alive,
    children,
    csv_rows,
    env,
    files_under,
    grid_dict,
    kill,
    provenance,
    read_only,
    refused,
    run_dirs,
    set_status,
    start,
    tiny_grid,
    wait_for,
)

from experiments import aggregate as agg
from experiments import checks, runner
from experiments.cli import main
from experiments.grids import load_grid
from experiments.schema import read_runs


def interrupt_after(monkeypatch, name: str, calls: int) -> None:
    """Make ``experiments.runner.<name>`` raise KeyboardInterrupt right after its ``calls``-th
    call returns (as a Ctrl-C, or a kill, at that moment would)."""
    real = getattr(runner, name)
    count = [0]

    def wrapped(*args, **kwargs):
        out = real(*args, **kwargs)
        count[0] += 1
        if count[0] == calls:
            raise KeyboardInterrupt
        return out

    monkeypatch.setattr(runner, name, wrapped)


# ------------------------------------------------------------------------------- resuming

RESUME = {"base": {"training.max_epochs": 4, "training.eval_every": 2},
          "axes": {"method.name": ["vem", "amortized"], "seed": [0, 1]}}


def test_interrupted_ensemble_resumes_to_the_uninterrupted_result(tmp_path: Path,
                                                                  monkeypatch) -> None:
    """Interrupted mid-ensemble, with its members checkpointed at different epochs, the rerun
    resumes every member from its own checkpoint and ends with the uninterrupted rows."""
    grid = tiny_grid(tmp_path, **RESUME)
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    assert main(["run", str(grid), "--results", str(reference)]) == 0
    with monkeypatch.context() as m:
        interrupt_after(m, "_save_checkpoint", 3)  # epoch 1: both members; epoch 2: one
        argv = ["run", str(grid), "--results", str(resumed), "--checkpoint-seconds", "0"]
        assert main(argv) == 130
    statuses = [provenance(d)["status"] for d in run_dirs(resumed)]
    assert statuses == ["running"] * 2  # the first ensemble; the second had not started
    assert not (resumed / "g" / "metrics.csv").exists()
    assert main(argv) == 0
    ran = [d for d in run_dirs(resumed) if provenance(d)["resumed"]]
    assert len(ran) == 2
    assert sorted(provenance(d)["resumed_from_epoch"] for d in ran) == [1, 2]
    for run_dir in run_dirs(resumed):
        assert provenance(run_dir)["status"] == "ok"
        assert csv_rows(run_dir / "metrics.csv") == csv_rows(
            reference / "g" / "runs" / run_dir.name / "metrics.csv"), run_dir.name
    assert csv_rows(resumed / "g" / "metrics.csv") == csv_rows(reference / "g" / "metrics.csv")


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads the process table in /proc")
def test_sigkill_mid_ensemble_with_two_workers(tmp_path: Path, capsys) -> None:
    """kill -9 of ``run --jobs 2`` while both ensembles train (one per worker): the workers die
    with it; while it ran, a second run on the same folder was refused at once; the rerun
    resumes each member and equals an uninterrupted run (vem's local table and
    semi_amortized's refinement here; amortized in the in-process test above)."""
    grid = tiny_grid(tmp_path, base={"training.max_epochs": 40, "training.eval_every": 4},
                     axes={"method.name": ["vem", "semi_amortized"], "seed": [0, 1]})
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    assert main(["run", str(grid), "--results", str(reference)]) == 0
    proc = start(["run", str(grid), "--results", str(resumed), "--jobs", "2",
                  "--checkpoint-seconds", "0"], tmp_path)
    try:
        wait_for(lambda: len(list(resumed.glob("g/runs/*/checkpoint.pt"))) >= 4, 300,
                 "checkpoints of both workers", proc)
        t0 = time.perf_counter()
        capsys.readouterr()
        assert main(["run", str(grid), "--results", str(resumed)]) == 2
        assert time.perf_counter() - t0 < 10
        assert "in use by pid" in capsys.readouterr().err
        workers = children(proc.pid)
        assert len(workers) >= 2
    finally:
        kill(proc)
    wait_for(lambda: not any(alive(pid) for pid in workers), 10,
             "end of the workers after their parent was killed")
    running = [d for d in run_dirs(resumed) if provenance(d)["status"] == "running"]
    assert running, "every run had finished before the kill"
    assert main(["run", str(grid), "--results", str(resumed)]) == 0
    assert any(provenance(d)["resumed"] for d in running)
    for run_dir in run_dirs(resumed):
        assert csv_rows(run_dir / "metrics.csv") == csv_rows(
            reference / "g" / "runs" / run_dir.name / "metrics.csv"), run_dir.name
    assert csv_rows(resumed / "g" / "metrics.csv") == csv_rows(reference / "g" / "metrics.csv")


@pytest.fixture(scope="module")
def _finished_once(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("finished")
    grid = tiny_grid(tmp, axes={"method.name": ["amortized", "vem"], "seed": [0]},
                     probes={"activity": {}})
    results = tmp / "r"
    assert main(["run", str(grid), "--results", str(results)]) == 0
    return results


@pytest.fixture
def finished(_finished_once: Path, tmp_path: Path) -> Path:
    """A finished two-run sweep (results/g, grid g.json beside it), copied afresh for each test
    (tests damage it)."""
    shutil.copy(_finished_once.parent / "g.json", tmp_path / "g.json")
    return Path(shutil.copytree(_finished_once, tmp_path / "r"))


@pytest.mark.parametrize("damage", ["garbage", "random_bytes", "empty", "other_cell"])
def test_a_checkpoint_that_is_not_this_runs_restarts_it(finished: Path, damage: str) -> None:
    """An unfinished run whose checkpoint is unreadable, or was copied from another cell,
    restarts from scratch with a note (never torch's weights_only advice) and ends as an
    uninterrupted run."""
    run_dir, other = run_dirs(finished)
    before = csv_rows(run_dir / "metrics.csv")
    set_status(run_dir, "running")  # as if killed
    ckpt = run_dir / "checkpoint.pt"
    if damage == "garbage":
        ckpt.write_bytes(b"not a checkpoint")
    elif damage == "random_bytes":
        ckpt.write_bytes(os.urandom(4096))
    elif damage == "empty":
        ckpt.write_bytes(b"")
    else:
        shutil.copy(other / "checkpoint.pt", ckpt)
    assert main(["run", str(finished.parent / "g.json"), "--results", str(finished)]) == 0
    prov = provenance(run_dir)
    assert prov["status"] == "ok" and prov["resumed"] == 0
    expected = "another configuration" if damage == "other_cell" else "checkpoint unreadable"
    assert expected in prov["note"]
    assert "weights_only" not in prov["note"] and "\n" not in prov["note"]
    assert len(prov["note"]) < 300
    assert csv_rows(run_dir / "metrics.csv") == before


# ----------------------------------------------------------------------------- divergence


def test_divergence_is_recorded_and_the_sweep_goes_on(tmp_path: Path, capsys) -> None:
    grid = tiny_grid(tmp_path, base={"training.max_epochs": 3}, axes={
        "method.name": ["amortized", "semi_amortized"],
        "estimator": [{"method.estimator": "reparam"},
                      {"method.estimator": "score", "method.lr": 1e6}],
        "seed": [0]})
    results = tmp_path / "r"
    assert main(["run", str(grid), "--results", str(results)]) == 0  # diverged is a result
    assert "2 diverged, 2 ok" in capsys.readouterr().out
    runs = read_runs(results / "g" / "runs.csv")
    status = dict(zip(runs["estimator"] + "/" + runs["method"], runs["status"], strict=True))
    assert status == {"reparam/amortized": "ok", "reparam/semi_amortized": "ok",
                      "score/amortized": "diverged", "score/semi_amortized": "diverged"}
    diverged = runs[runs["status"] == "diverged"]
    assert diverged["message"].str.contains("non-finite").all()
    assert (diverged["last_epoch"] < 3).all()  # the rows up to the last finite epoch survive
    metrics = pd.read_csv(results / "g" / "metrics.csv")
    assert set(metrics["run_id"]) == set(runs["run_id"])
    assert checks.check_results(results)[1] == []
    capsys.readouterr()
    assert main(["run", str(grid), "--results", str(results)]) == 0  # finished: not rerun
    assert "4 skipped" in capsys.readouterr().out


# ------------------------------------------------------------------------- write failures


def test_an_unwritable_run_folder_fails_that_cell_alone(tmp_path: Path, capsys) -> None:
    grid = tiny_grid(tmp_path)
    results = tmp_path / "r"
    (cell, *_) = runner.prepare(load_grid(grid), results)
    locked = Path(cell.run_dir)
    locked.mkdir(parents=True)
    with read_only(locked):
        assert main(["run", str(grid), "--results", str(results)]) == 1
        out = capsys.readouterr().out
    assert "3 ok" in out and f"failed: {cell.run_id}: preparing the run folder failed" in out
    others = [d for d in run_dirs(results) if d != locked]
    assert [provenance(d)["status"] for d in others] == ["ok"] * 3
    assert not (locked / "provenance.json").exists()
    assert main(["run", str(grid), "--results", str(results)]) == 0  # writable again: it runs
    assert "1 ran, 0 resumed, 3 skipped" in capsys.readouterr().out


@pytest.mark.slow
def test_a_file_size_limit_fails_each_cell_with_the_os_error(tmp_path: Path) -> None:
    """Under RLIMIT_FSIZE (and SIGXFSZ ignored, so a write gets EFBIG) a run cannot write its
    checkpoints or metrics.csv: every cell ends ``failed`` naming the file and the error, the
    sweep goes through every cell, nothing is left ``running``, and the exit status is 1."""
    grid = tiny_grid(tmp_path, base={"training.max_epochs": 8, "training.eval_every": 1},
                     probes={"activity": {}})
    results = tmp_path / "r"
    limit = 4096  # config.json and provenance.json fit; metrics.csv and checkpoints do not

    def limited() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    out = subprocess.run([sys.executable, "-m", "experiments", "run", str(grid), "--results",
                          str(results), "--checkpoint-seconds", "0"], cwd=tmp_path, env=env(),
                         capture_output=True, text=True, timeout=600, preexec_fn=limited)
    assert out.returncode == 1, out.stderr
    assert "Traceback" not in out.stderr and "4 failed" in out.stdout
    for run_dir in run_dirs(results):
        prov = provenance(run_dir)
        assert prov["status"] == "failed"
        assert prov["message"].startswith("writing metrics.csv failed: OSError")
        assert "File too large" in prov["message"] and "File too large" in prov["note"]
    assert "cannot aggregate" in out.stderr


# ----------------------------------------------------------------------- trustworthy files


def test_truncated_run_metrics_detected_by_aggregation_and_check(finished: Path,
                                                                 capsys) -> None:
    run_dir = run_dirs(finished)[0]
    text = (run_dir / "metrics.csv").read_text()
    (run_dir / "metrics.csv").write_text(text[: len(text) - 7])  # cut inside the last row
    with pytest.raises(agg.AggregateError, match="checksum"):
        agg.aggregate(finished / "g")
    _, problems = checks.check_results(finished)
    assert any(run_dir.name in p and "metrics.csv" in p for p in problems)
    capsys.readouterr()
    assert main(["check", "--results", str(finished)]) == 1
    assert run_dir.name in capsys.readouterr().err
    # a whole-row truncation that still parses is caught by the checksum too
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
    run_dir = run_dirs(finished)[0]
    if damage == "run_id":
        run_dir.rename(run_dir.with_name(run_dir.name[:-8] + "00000000"))
        expected = "run_id mismatch"
    elif damage == "config":
        cfg = json.loads((run_dir / "config.json").read_text())
        cfg["config"]["method"]["lr"] = 0.5
        (run_dir / "config.json").write_text(json.dumps(cfg))
        expected = "config hash mismatch"
    elif damage == "status":
        set_status(run_dir, "running")
        expected = "unfinished run"
    else:
        (run_dir / "metrics.csv").unlink()
        expected = "metrics.csv missing"
    with pytest.raises(agg.AggregateError, match=expected):
        agg.aggregate(finished / "g")


def _edit_value(path: Path) -> None:
    frame = pd.read_csv(path)
    frame.loc[0, "value"] = frame.loc[0, "value"] + 1.0
    path.write_text(frame.to_csv(index=False, lineterminator="\n"))


def _interrupt_aggregation(results: Path) -> None:
    """A first aggregation of the experiment stopped right after it wrote metrics.csv."""
    for path in (results / "g").glob("*.*"):
        path.unlink()
    real = agg._write_csv

    def then_stop(path: Path, frame: pd.DataFrame) -> dict:
        real(path, frame)
        raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as m:
        m.setattr(agg, "_write_csv", then_stop)
        with pytest.raises(KeyboardInterrupt):
            agg.aggregate(results / "g")
    assert sorted(p.name for p in (results / "g").glob("*.*")) == ["manifest.json",
                                                                   "metrics.csv"]


CHECK_DAMAGE = {
    # damage: (what to do to a finished results folder, what check must say)
    "manifest_deleted": (lambda r: ((r / "g" / "manifest.json").unlink(),
                                    _edit_value(r / "g" / "metrics.csv")),
                         "manifest.json: missing"),
    "runs_csv_deleted": (lambda r: (r / "g" / "runs.csv").unlink(),
                         "metrics.csv: has no runs.csv beside it"),
    "run_interrupted": (lambda r: set_status(run_dirs(r)[0], "running"),
                        "unfinished run (status 'running')"),
    "checkpoint_unreadable": (lambda r: (run_dirs(r)[0] / "checkpoint.pt").write_bytes(
        b"\0" * 100), "checkpoint.pt unreadable"),
    "csv_added_by_hand": (lambda r: (r / "g" / "extra.csv").write_text("a,b\n1,2\n"),
                          "extra.csv: not listed in manifest.json"),
    "aggregation_interrupted": (_interrupt_aggregation, "aggregation that was rewriting these "
                                                        "CSVs was interrupted"),
}


@pytest.mark.parametrize("damage", sorted(CHECK_DAMAGE))
def test_check_names_each_kind_of_damage(finished: Path, capsys, damage: str) -> None:
    do, expected = CHECK_DAMAGE[damage]
    assert main(["check", "--results", str(finished)]) == 0
    do(finished)
    capsys.readouterr()
    assert main(["check", "--results", str(finished)]) == 1
    err = capsys.readouterr().err
    assert expected in err, err
    assert "Traceback" not in err


def test_check_messages_are_distinct(finished: Path, tmp_path: Path, capsys) -> None:
    """Each kind of damage gets a message no other kind gets, so the report says what
    happened."""
    seen = {}
    for damage, (do, _) in CHECK_DAMAGE.items():
        copy = Path(shutil.copytree(finished, tmp_path / damage))
        do(copy)
        capsys.readouterr()
        assert main(["check", "--results", str(copy)]) == 1
        lines = capsys.readouterr().err.splitlines()[1:]
        seen[damage] = frozenset(line.replace(str(copy), "R").strip() for line in lines)
    for damage, messages in seen.items():
        others = set().union(*(m for d, m in seen.items() if d != damage))
        assert messages - others, (damage, messages)


# ------------------------------------------------------------------- one run at a time


def test_a_locked_results_folder_is_refused_until_its_holder_dies(tmp_path: Path,
                                                                   capsys) -> None:
    """While another process holds the results folder's lock a ``run`` stops at once (exit 2,
    one message naming the holder); a holder killed with SIGKILL leaves no stale lock."""
    grid, results = tiny_grid(tmp_path), tmp_path / "r"
    results.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import fcntl, sys, time\n"
         f"f = open({str(results / '.lock')!r}, 'a+')\n"
         "fcntl.flock(f, fcntl.LOCK_EX)\n"
         "f.write('pid 4242 (python -m experiments run)\\n'); f.flush()\n"
         "print('locked', flush=True)\n"
         "time.sleep(120)\n"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        t0 = time.perf_counter()
        line = refused(capsys, ["run", str(grid), "--results", str(results)],
                       "in use by pid 4242", tmp_path)
        assert time.perf_counter() - t0 < 10 and "another --results folder" in line
    finally:
        kill(holder)
    assert main(["run", str(grid), "--results", str(results)]) == 0
    with open(results / ".lock") as f:  # released: anyone can take it now
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)


# ------------------------------------------------------------------------- resumable force


def test_force_is_resumable_and_blocks_plain_runs_until_done(tmp_path: Path, monkeypatch,
                                                             capsys) -> None:
    grid, results = tiny_grid(tmp_path), tmp_path / "r"
    assert main(["run", str(grid), "--results", str(results)]) == 0
    forced = ["run", str(grid), "--results", str(results), "--force", "--no-ensemble"]
    with monkeypatch.context() as m:
        interrupt_after(m, "_write_member", 2)  # two cells finish, then the run is stopped
        assert main(forced) == 130
    token = json.loads((results / "g" / ".force.json").read_text())["token"]
    done = {d.name: (d / "provenance.json").stat().st_mtime_ns for d in run_dirs(results)
            if provenance(d).get("force_token") == token and provenance(d)["status"] == "ok"}
    assert len(done) == 2
    refused(capsys, ["run", str(grid), "--results", str(results)],
            "an interrupted `--force` run is unfinished", tmp_path)
    capsys.readouterr()
    assert main(forced) == 0
    assert "2 ran, 0 resumed, 2 skipped" in capsys.readouterr().out
    assert {n: (results / "g" / "runs" / n / "provenance.json").stat().st_mtime_ns
            for n in done} == done  # the forced cells that had finished were not rerun
    assert {provenance(d)["force_token"] for d in run_dirs(results)} == {token}
    assert not (results / "g" / ".force.json").exists()
    assert main(["run", str(grid), "--results", str(results)]) == 0
    assert "4 skipped" in capsys.readouterr().out


# ------------------------------------------------------------------- files and provenance


def test_every_file_honours_the_umask_and_the_command_is_quoted(tmp_path: Path) -> None:
    folder = tmp_path / "a b'c"
    folder.mkdir()
    grid = tiny_grid(folder, probes={"activity": {}})
    results = folder / "r s"
    argv = ["run", str(grid), "--results", str(results), "--checkpoint-seconds", "0"]
    old = os.umask(0o027)
    try:
        assert main(argv) == 0
        assert main([*argv, "--force"]) == 0
        ckpt = next(iter(results.glob("g/runs/*-amortized-*/checkpoint.pt")))
        assert main(["evaluate", str(ckpt), "--out", str(results / "e.csv")]) == 0
    finally:
        os.umask(old)
    files = [p for p in results.rglob("*") if p.is_file()]
    names = {p.name for p in files}
    assert {"checkpoint.pt", "metrics.csv", "runs.csv", "manifest.json", "config.json",
            "provenance.json", "activity.csv", "e.csv", ".lock"} <= names
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in files} == {
        p.name: oct(0o640) for p in files}
    for run_dir in run_dirs(results):
        command = provenance(run_dir)["command"]
        assert command == shlex.join(["python", "-m", "experiments", *argv, "--force"])
        assert shlex.split(command)[4] == str(grid)


# ------------------------------------------------------------------------------ bad inputs


def _bad(base: dict | None = None, **top) -> dict:
    """A tiny grid with ``base`` merged in and the top-level keys ``top`` set (None deletes)."""
    grid = grid_dict("g", base=base)
    for key, value in top.items():
        if value is None:
            grid.pop(key)
        else:
            grid[key] = value
    return grid


INF, NAN = float("inf"), float("nan")
BAD_GRIDS = {
    # grid structure
    "unknown_grid_key": (_bad(colour="red"), "unknown grid key(s) colour"),
    "missing_axes": (_bad(axes=None), "missing grid key(s) axes"),
    "empty_name": (_bad(name=" "), "'name' must be a non-empty string"),
    "name_with_slash": (_bad(name="a/b"), "may hold only letters"),
    "bad_lr_mode": (_bad(lr="best"), "'lr' must be 'selected' or 'grid'"),
    "base_not_object": (_bad(base=None) | {"base": [1]}, "'base' must be an object"),
    "axes_empty": (_bad(axes={}), "must be a non-empty object"),
    "axis_empty": (_bad(axes={"seed": []}), "must be a non-empty list"),
    "axis_entry_list": (_bad(axes={"seed": [[0, 1]]}), "an entry is a list"),
    "unknown_probe": (_bad(probes={"accuracy": {}}), "unknown probe 'accuracy'"),
    "probe_options_not_object": (_bad(probes={"activity": 3}), "must be an object"),
    "probe_when_not_object": (_bad(probes={"activity": {"when": 1}}), "'when' of probe"),
    "exclude_not_list": (_bad(exclude={"seed": 0}), "must be a list of non-empty objects"),
    "everything_excluded": (_bad(exclude=[{"training.batch_size": 256}]), "has no cells"),
    "scale_unknown_key": (_bad(scales={"quick": {"epochs": 1}}), "unknown key(s) epochs"),
    "order_not_int": (_bad(order="first"), "'order' must be an integer"),
    "select_malformed": (_bad(select={"candidates": []}), "'select.candidates' must be"),
    "method_base_not_object": (_bad(method_base={"vem": 1}), "must be an object"),
    "duplicate_cells": (_bad(axes={"seed": [0, 0]}), "duplicates an earlier cell"),
    "dotted_into_scalar": (_bad({"training.max_epochs.x": 1}), "must be an integer"),
    # configuration keys and types
    "unknown_config_key": (_bad({"method.learning_rate": 0.1}), "method.learning_rate"),
    "unknown_section": (_bad({"optimizer": {"lr": 1}}), "unknown configuration key(s) optim"),
    "latent_dim_string": (_bad({"model.latent_dim": "two"}), "must be an integer"),
    "latent_dim_zero": (_bad({"model.latent_dim": 0}), "latent_dim must be an integer in"),
    "latent_dim_float_huge": (_bad({"model.latent_dim": 1e30}), "must be an integer"),
    "latent_dim_million": (_bad({"model.latent_dim": 10**6}), "latent_dim must be an integer"),
    "hidden_ten_million": (_bad({"model.hidden": [10**7]}), "hidden width must be an integer"),
    "encoder_hidden_negative": (_bad({"method.encoder_hidden": [-4]}),
                                "method.encoder_hidden width must be an integer in [1"),
    "lr_infinity": (_bad({"method.lr": INF}), "'method.lr' must be finite"),
    "grad_clip_infinity": (_bad({"method.grad_clip": INF}), "'method.grad_clip' must be finite"),
    "rm_delay_nan": (_bad({"method.rm_delay": NAN}), "'method.rm_delay' must be finite"),
    "rm_power_nan": (_bad({"method.rm_power": NAN}), "'method.rm_power' must be finite"),
    "lr_negative": (_bad({"method.lr": -1.0}), "method.lr must be a finite positive number"),
    "seed_string": (_bad({"seed": "0"}, axes={"method.name": ["vem"]}),
                    "'seed' must be an integer"),
    "null_batch_size": (_bad({"training.batch_size": None}), "may not be null"),
    "hidden_not_list": (_bad({"model.hidden": 8}), "must be a list"),
    # values and combinations
    "batch_too_large": (_bad({"training.batch_size": 100000}), "exceeds the"),
    "loo_with_one_sample": (_bad({"method.estimator": "score", "method.baseline": "loo",
                                  "method.n_mc": 1}), "loo"),
    "refinement_without_steps": (_bad({"method.refine_steps": 0},
                                      axes={"method.name": ["semi_amortized"]}),
                                 "refine_steps >= 1"),
    "unknown_method": (_bad(axes={"method.name": ["vae"]}), "unknown method 'vae'; valid: "),
    "unknown_estimator": (_bad({"method.estimator": "reinforce"}), "reinforce"),
    "unknown_dataset": (_bad({"data.name": "cifar"}), "unknown dataset 'cifar'"),
    "missing_data_file": (_bad({"data.name": "mnist", "data.path": "/nonexistent/mnist"}),
                          "mnist"),
    "unknown_data_option": (_bad({"data.options": {"rows": 5}}), "unknown option(s) ['rows']"),
    "max_epochs_float": (_bad({"training.max_epochs": 1e9}), "must be an integer"),
    "max_epochs_billion": (_bad({"training.max_epochs": 10**9}), "max_epochs must be"),
    "data_seed_negative": (_bad({"data.seed": -1}), "data.seed must be an integer in"),
    "test_fraction_too_big": (_bad({"data.test_fraction": 1.5}), "test_fraction"),
    "stopping_without_validation": (_bad({"training.stopping": {},
                                          "data.validation_fraction": 0.0}),
                                    "validation_fraction > 0"),
    "eval_split_unknown": (_bad({"training.eval_splits": ["dev"]}), "eval_splits"),
    "unknown_activation": (_bad({"model.activation": "relu6"}), "unknown model.activation"),
    "unknown_dtype": (_bad({"dtype": "float16"}), "unknown dtype"),
    "unknown_device": (_bad({"device": "tpu"}), "unknown device 'tpu'"),
    "heldout_zero_steps": (_bad({"method.heldout.max_steps": 0}), "max_steps"),
    "test_curve_billion_steps": (_bad(probes={"test_curve": {"steps": [1e9]}}),
                                 "must be an integer"),
    "gradvar_negative_epoch": (_bad(probes={"gradvar": {"epochs": [-5]}}),
                               "epochs must be integers >= 0"),
    "exact_needs_linear": (_bad(probes={"exact": {}}), "needs a linear decoder"),
    "latents_need_labels": (_bad({"data.name": "ppca"}, probes={"latents": {}}),
                            "needs labelled data"),
    "ppca_billion_points": (_bad({"data.name": "ppca", "data.options": {"n": 10**9}}),
                            "the limit is"),
}


def test_the_bad_grid_table_is_large() -> None:
    assert len(BAD_GRIDS) >= 50


@pytest.mark.parametrize("case", sorted(BAD_GRIDS))
def test_bad_grid_exits_2_with_one_message_and_writes_nothing(tmp_path: Path, capsys,
                                                             case: str) -> None:
    grid, expected = BAD_GRIDS[case]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(grid))  # NaN and Infinity as JSON's NaN and Infinity
    line = refused(capsys, ["run", str(path), "--results", str(tmp_path / "r")], expected,
                   tmp_path)
    assert len(line) < 1000


def test_a_grid_that_is_not_json_is_refused(tmp_path: Path, capsys) -> None:
    for text, expected in (("{", "not valid JSON"), ("[1, 2]", "must be a JSON object"),
                           (b"\xff\xfe", "not valid JSON")):
        path = tmp_path / "bad.json"
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        refused(capsys, ["run", str(path)], expected, tmp_path)


def _write_files(folder: Path) -> None:
    (folder / "afile").write_text("")
    (folder / "x.csv").write_text("run_id,value\nabc,1\n")
    (folder / "empty.pt").write_bytes(b"")
    (folder / "random.pt").write_bytes(os.urandom(4096))
    torch.save(torch.ones(3), folder / "tensor.pt")
    torch.save([1, 2, 3], folder / "list.pt")
    (folder / "ro").mkdir()


BAD_COMMANDS = {
    "unknown_experiment": (["run", "elbo_curve"], "unknown experiment 'elbo_curve'; valid:"),
    "unknown_command": (["train"], "invalid choice: 'train'"),
    "jobs_zero": (["run", "elbo_curves", "--jobs", "0"], "expected an integer in [1"),
    "negative_seed": (["run", "elbo_curves", "--seeds", "-1"], "expected an integer in [0"),
    "bad_launcher": (["run", "elbo_curves", "--launcher", "pbs"], "invalid choice: 'pbs'"),
    "slurm_option_without_slurm": (["run", "elbo_curves", "--partition", "gpu"],
                                   "apply only with --launcher slurm"),
    "two_scales": (["run", "elbo_curves", "--quick", "--scale", "paper"], "give one"),
    "unknown_scale": (["run", "elbo_curves", "--scale", "huge"], "has no scale 'huge'"),
    "checkpoint_seconds_nan": (["run", "elbo_curves", "--checkpoint-seconds", "nan"],
                               "finite number of seconds"),
    "no_cuda": (["run", "elbo_curves", "--quick", "--device", "cuda:7"], "cuda"),
    "results_is_a_file": (["run", "elbo_curves", "--results", "afile"], "not a folder"),
    "results_under_a_file": (["run", "elbo_curves", "--results", "afile/r"], "is a file"),
    "results_read_only": (["run", "elbo_curves", "--results", "ro/r"], "cannot write under"),
    "results_empty": (["run", "elbo_curves", "--results", ""], "empty string"),
    "reproduce_results_empty": (["reproduce", "--results", ""], "empty string"),
    "figures_unknown": (["figures", "--results", ".", "pictures"], "unknown experiment"),
    "check_missing_dir": (["check", "--results", "nowhere"], "no results folder"),
    "check_results_empty": (["check", "--results", ""], "empty string"),
    "data_unknown_name": (["data", "cifar", "--out", "x.npz"], "unknown dataset 'cifar'"),
    "data_bad_suffix": (["data", "digits", "--out", "x.txt"], ".npz"),
    "data_bad_option": (["data", "ppca", "--option", "rows=5", "--out", "x.npz"], "rows"),
    "data_bad_fraction": (["data", "digits", "--test-fraction", "1.5", "--out", "x.npz"],
                          "test_fraction"),
    "data_out_under_a_file": (["data", "digits", "--out", "afile/x.npz"], "not a folder"),
    "data_out_read_only": (["data", "digits", "--out", "ro/x.npz"], "cannot write under"),
    "evaluate_missing": (["evaluate", "none.pt"], "no checkpoint file"),
    "evaluate_csv": (["evaluate", "x.csv"], "x.csv is not a run checkpoint"),
    "evaluate_empty": (["evaluate", "empty.pt"], "(an empty file)"),
    "evaluate_random_bytes": (["evaluate", "random.pt"], "random.pt is not a run checkpoint"),
    "evaluate_tensor": (["evaluate", "tensor.pt"], "it holds a Tensor"),
    "evaluate_list": (["evaluate", "list.pt"], "it holds a list"),
    "evaluate_out_csv_suffix": (["evaluate", "tensor.pt", "--out", "e.txt"], ".csv file"),
    "evaluate_out_under_a_file": (["evaluate", "tensor.pt", "--out", "afile/e.csv"],
                                  "not a folder"),
    "evaluate_out_read_only": (["evaluate", "tensor.pt", "--out", "ro/e.csv"],
                               "cannot write under"),
}


@pytest.mark.parametrize("case", sorted(BAD_COMMANDS))
def test_bad_command_exits_2_with_one_message_and_writes_nothing(tmp_path: Path, capsys,
                                                                 case: str) -> None:
    argv, expected = BAD_COMMANDS[case]
    _write_files(tmp_path)
    if case == "no_cuda" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    with read_only(tmp_path / "ro"):
        line = refused(capsys, argv, expected, tmp_path)
    assert "weights_only" not in line and "Please file an issue" not in line


SIZES = {
    # an impossible size is refused before anything is allocated
    "vem_latent_dim_1e6": ({"method.name": "vem", "model.latent_dim": 1e6},
                           "must be an integer"),
    "vem_latent_dim_10_6": ({"method.name": "vem", "model.latent_dim": 10**6},
                            "latent_dim must be an integer in"),
    "hidden_1e7": ({"model.hidden": [1e7]}, "must be an integer"),
    "max_epochs_1e9": ({"training.max_epochs": 10**9}, "max_epochs must be an integer in"),
    "data_seed_negative": ({"data.seed": -1}, "data.seed must be an integer in"),
    "ppca_n_1e9": ({"data.name": "ppca", "data.options": {"n": 10**9}}, "the limit is"),
    "test_curve_steps_1e9": ({"probes": {"test_curve": {"steps": [10**9]}}},
                             "steps must be integers in [0"),
    "gradvar_epochs_negative": ({"probes": {"gradvar": {"epochs": [-5]}}},
                                "epochs must be integers >= 0"),
    "data_command_ppca_n_1e9": (["data", "ppca", "--option", "n=1000000000", "--out", "x.npz"],
                                "the limit is"),
    "data_command_seed_negative": (["data", "digits", "--seed", "-1", "--out", "x.npz"],
                                   "expected an integer in [0"),
}


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@pytest.mark.parametrize("case", sorted(SIZES))
def test_impossible_sizes_are_refused_quickly_without_allocating(tmp_path: Path, capsys,
                                                                 case: str) -> None:
    change, expected = SIZES[case]
    if isinstance(change, list):
        argv = change
    else:
        probes = change.pop("probes", None) if "probes" in change else None
        grid = _bad(change, **({"probes": probes} if probes else {}))
        (tmp_path / "big.json").write_text(json.dumps(grid))
        argv = ["run", "big.json", "--results", "r"]
    rss, t0 = _peak_rss(), time.perf_counter()
    refused(capsys, argv, expected, tmp_path)
    assert time.perf_counter() - t0 < 10
    assert _peak_rss() - rss < 2**30  # nothing big was allocated on the way


def test_refused_requests_leave_the_folder_as_it_was(tmp_path: Path, capsys) -> None:
    """A bad request on an existing results folder changes none of its files."""
    results = tmp_path / "r"
    grid = tiny_grid(tmp_path)
    assert main(["run", str(grid), "--results", str(results)]) == 0
    before = {p: p.stat().st_mtime_ns for p in results.rglob("*")}
    bad = tmp_path / "g2.json"
    bad.write_text(json.dumps(_bad({"model.latent_dim": 0})))
    refused(capsys, ["run", str(bad), "--results", str(results)], "latent_dim", tmp_path)
    assert {p: p.stat().st_mtime_ns for p in results.rglob("*")} == before
    assert files_under(results) == sorted(p.relative_to(results) for p in before)


# ------------------------------------------------------- verified inputs and derived files


def _check(results: Path, capsys) -> tuple[int, str]:
    capsys.readouterr()
    code = main(["check", "--results", str(results)])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, err


def test_findings_refuse_csvs_that_fail_the_check(finished: Path, tmp_path: Path,
                                                  capsys) -> None:
    """An edited metrics.csv: ``findings`` runs the check ``figures`` runs and refuses (exit 2,
    one message, FINDINGS.md not written); on verified CSVs it writes FINDINGS.md, which the
    results folder's manifest then covers."""
    _edit_value(finished / "g" / "metrics.csv")
    refused(capsys, ["findings", "--results", str(finished)], "fail validation, so "
            "FINDINGS.md was not written", tmp_path)
    assert not (finished / "FINDINGS.md").exists()


def test_findings_written_from_verified_csvs_are_covered_by_the_manifest(
        finished: Path, capsys) -> None:
    assert main(["findings", "--results", str(finished)]) == 0
    manifest = json.loads((finished / "manifest.json").read_text())
    assert set(manifest["files"]) == {"FINDINGS.md"}
    assert _check(finished, capsys)[0] == 0
    with (finished / "FINDINGS.md").open("a") as f:
        f.write("a line added by hand\n")
    code, err = _check(finished, capsys)
    assert code == 1 and "FINDINGS.md: does not match the checksum" in err


def test_references_and_summary_are_covered_by_the_manifest(finished: Path, capsys) -> None:
    """references.csv and summary.csv are recorded in the results folder's manifest.json:
    100 nats added to factor analysis in references.csv, or an edited summary.csv, is reported
    by ``check``; so are a derived file that is not listed and a missing manifest."""
    from experiments.summary import write_summary

    assert main(["references", "--results", str(finished)]) == 0
    write_summary(finished)
    assert _check(finished, capsys)[0] == 0
    refs = finished / "references.csv"
    table = pd.read_csv(refs)
    fa = table["model"] == "factor_analysis"
    assert fa.any()
    table.loc[fa, "log_px"] += 100.0
    pristine = refs.read_bytes()
    refs.write_text(table.to_csv(index=False, lineterminator="\n"))
    code, err = _check(finished, capsys)
    assert code == 1 and "references.csv: does not match the checksum" in err, err
    summary_before = (finished / "summary.csv").read_bytes()
    for argv in (["figures"], ["figures", "g"]):  # the summary is never made from it either
        assert main([*argv[:1], "--results", str(finished), *argv[1:]]) == 1
        assert "references.csv: does not match the checksum" in capsys.readouterr().err
    assert (finished / "summary.csv").read_bytes() == summary_before
    refs.write_bytes(pristine)
    summary = finished / "summary.csv"
    summary.write_text(summary.read_text().replace(",", ";", 1))
    code, err = _check(finished, capsys)
    assert code == 1 and "summary.csv: does not match the checksum" in err, err
    (finished / "manifest.json").unlink()
    code, err = _check(finished, capsys)
    assert code == 1 and "manifest.json: missing" in err, err


def test_a_row_count_edited_in_a_manifest_alone_is_reported(finished: Path, capsys) -> None:
    path = finished / "g" / "manifest.json"
    manifest = json.loads(path.read_text())
    rows = manifest["files"]["metrics.csv"]["rows"]
    manifest["files"]["metrics.csv"]["rows"] = rows + 1
    path.write_text(json.dumps(manifest))
    code, err = _check(finished, capsys)
    assert code == 1 and f"has {rows} rows; manifest.json records {rows + 1}" in err, err


def test_a_foreign_checkpoint_in_a_finished_run_is_reported(finished: Path, capsys) -> None:
    """Each finished run records its checkpoint's SHA-256: another run's checkpoint.pt (a valid
    torch archive) copied over it is reported by ``check`` and refused by aggregation."""
    run_dir, other = run_dirs(finished)
    assert "checkpoint.pt" in provenance(run_dir)["files"]
    shutil.copy(other / "checkpoint.pt", run_dir / "checkpoint.pt")
    code, err = _check(finished, capsys)
    assert code == 1 and f"{run_dir.name}: checkpoint.pt is not the one this run saved" in err
    with pytest.raises(agg.AggregateError, match=r"checkpoint\.pt is not the one"):
        agg.aggregate(finished / "g")


MALFORMED_MANIFESTS = {"list": [], "text": "x", "number": 3, "record_not_object": {"a.csv": 1}}


@pytest.mark.parametrize("files", sorted(MALFORMED_MANIFESTS))
def test_a_manifest_whose_files_is_malformed_is_a_message(finished: Path, tmp_path: Path,
                                                          capsys, files: str) -> None:
    """``files`` not an object (or a record not one): check reports it, figures refuses, and a
    run that reads selected.csv through it is refused — each with a message, no traceback."""
    path = finished / "g" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["files"] = MALFORMED_MANIFESTS[files]
    path.write_text(json.dumps(manifest))
    code, err = _check(finished, capsys)
    assert code == 1 and f"{path}: manifest.json:" in err, err
    assert main(["figures", "--results", str(finished)]) == 1
    err = capsys.readouterr().err
    assert "no figures drawn" in err and "Traceback" not in err
    selection = finished / "lr_selection"
    selection.mkdir()
    (selection / "selected.csv").write_text("dataset,method,estimator,baseline\n")
    (selection / "manifest.json").write_text(json.dumps({"complete": True, "files": manifest[
        "files"]}))
    consumer = tiny_grid(tmp_path, "consumer", lr="selected")
    refused(capsys, ["run", str(consumer), "--results", str(finished)], "manifest.json",
            tmp_path)


def test_references_refuse_an_empty_results_folder(tmp_path: Path, capsys) -> None:
    (tmp_path / "r").mkdir()
    refused(capsys, ["references", "--results", "r"], "no experiment results", tmp_path)
    assert not (tmp_path / "r" / "references.csv").exists()


def test_findings_refuse_a_read_only_results_folder(finished: Path, tmp_path: Path,
                                                    capsys) -> None:
    with read_only(finished):
        refused(capsys, ["findings", "--results", str(finished)], "cannot write under",
                tmp_path)
    assert not (finished / "FINDINGS.md").exists()


def _hold_lock(results: Path) -> subprocess.Popen:
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import fcntl, sys, time\n"
         f"f = open({str(results / '.lock')!r}, 'a+')\n"
         "fcntl.flock(f, fcntl.LOCK_EX)\n"
         "f.seek(0); f.truncate()\n"
         "f.write('pid 4242 (python -m experiments run)\\n'); f.flush()\n"
         "print('locked', flush=True)\n"
         "time.sleep(120)\n"], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


@pytest.mark.parametrize("command", ["findings", "references", "figures"])
def test_reports_wait_for_a_locked_results_folder(finished: Path, tmp_path: Path, capsys,
                                                  command: str) -> None:
    """``findings``, ``references`` and ``figures`` write into the results folder: while
    another command holds it they are refused, writing nothing."""
    holder = _hold_lock(finished)
    try:
        refused(capsys, [command, "--results", str(finished)], "in use by pid 4242", tmp_path)
    finally:
        kill(holder)
    assert not {"FINDINGS.md", "references.csv", "summary.csv"} & {
        p.name for p in finished.iterdir()}


# ------------------------------------------------------------ aggregation that cannot write


def test_aggregation_into_a_read_only_folder_is_a_message(finished: Path, capsys) -> None:
    with read_only(finished / "g"):
        capsys.readouterr()
        code = main(["run", str(finished.parent / "g.json"), "--results", str(finished)])
        out, err = capsys.readouterr()
    assert code == 1 and "Traceback" not in out + err
    assert err.count("error:") == 1 and "cannot write the CSVs of" in err, err
    assert checks.check_results(finished)[1] == []  # the published CSVs are as they were


@pytest.mark.parametrize("fail_at", [1, 2, 4])
def test_a_full_disk_during_aggregation_is_a_message(finished: Path, monkeypatch, capsys,
                                                     fail_at: int) -> None:
    """ENOSPC at the n-th file aggregation writes: one message, exit 1; the folder is either
    untouched (n = 1) or marked as being rewritten, which ``check`` reports; never new CSVs
    beside an old manifest."""
    import errno

    real, calls = agg.atomic_write, [0]

    def full(path, data):
        calls[0] += 1
        if calls[0] == fail_at:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(path, data)

    monkeypatch.setattr(agg, "atomic_write", full)
    capsys.readouterr()
    code = main(["run", str(finished.parent / "g.json"), "--results", str(finished)])
    out, err = capsys.readouterr()
    assert code == 1 and "Traceback" not in out + err
    assert "No space left on device" in err and "cannot write the CSVs" in err, err
    monkeypatch.undo()
    problems = checks.check_results(finished)[1]
    if fail_at == 1:
        assert problems == []
    else:
        assert any("aggregation that was rewriting these CSVs was interrupted" in p
                   for p in problems), problems


# ---------------------------------------------------------------------- experiment names


@pytest.mark.parametrize("name", ["ABS", "../../../etc", "..", "g/runs", ".hidden"])
def test_check_refuses_a_path_for_an_experiment(finished: Path, tmp_path: Path, capsys,
                                                name: str) -> None:
    name = str(tmp_path) if name == "ABS" else name
    refused(capsys, ["check", "--results", str(finished), name], "not a path", tmp_path)
    assert checks.check_results(finished, [name])[1][0].endswith(
        f"is not the name of an experiment folder under {finished}")


# -------------------------------------------------------------------------------- symlinks


def test_the_lock_never_follows_a_symbolic_link(finished: Path, tmp_path: Path,
                                                capsys) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    (finished / ".lock").unlink(missing_ok=True)
    (finished / ".lock").symlink_to(victim)
    for argv in (["run", str(finished.parent / "g.json")], ["findings"], ["references"]):
        refused(capsys, [*argv, "--results", str(finished)], "is a symbolic link", tmp_path)
    assert victim.read_text() == "precious\n"
    (finished / ".lock").unlink()
    os.link(victim, finished / ".lock")  # a hard link would be truncated just the same
    refused(capsys, ["run", str(finished.parent / "g.json"), "--results", str(finished)],
            "not a plain file of its own", tmp_path)
    assert victim.read_text() == "precious\n"


def test_force_never_deletes_through_a_symbolic_link(finished: Path, tmp_path: Path,
                                                     capsys) -> None:
    """A run folder's ``tables`` linked to a folder outside the results: ``run --force`` is
    refused before anything runs, and even called directly the clearing deletes nothing
    there."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.csv").write_text("a\n1\n")
    run_dir = run_dirs(finished)[0]
    shutil.rmtree(run_dir / "tables")
    (run_dir / "tables").symlink_to(outside, target_is_directory=True)
    refused(capsys, ["run", str(finished.parent / "g.json"), "--results", str(finished),
                     "--force"], "symbolic link(s) leading out of it", tmp_path)
    assert (outside / "keep.csv").is_file()
    with pytest.raises(OSError, match="is a symbolic link"):
        runner._clear(run_dir)
    assert (outside / "keep.csv").is_file() and (run_dir / "metrics.csv").is_file()


# ------------------------------------------------------------------------------------ seeds


def test_seeds_add_to_the_published_csvs(finished: Path, capsys) -> None:
    """``run --seeds 7`` on a folder with published results adds seed 7's runs to metrics.csv
    and runs.csv and keeps the other seeds' rows; ``check`` passes on the merged CSVs."""
    before = read_runs(finished / "g" / "runs.csv")
    grid = str(finished.parent / "g.json")
    assert main(["run", grid, "--results", str(finished), "--seeds", "7"]) == 0
    runs = read_runs(finished / "g" / "runs.csv")
    assert runs["run_id"].tolist()[:len(before)] == before["run_id"].tolist()
    assert sorted(runs["seed"]) == sorted([*before["seed"], 7, 7])
    metrics = pd.read_csv(finished / "g" / "metrics.csv", dtype={"run_id": str})
    assert set(metrics["run_id"]) == set(runs["run_id"])
    assert _check(finished, capsys)[0] == 0
    capsys.readouterr()
    assert main(["run", grid, "--results", str(finished), "--seeds", "7"]) == 0  # idempotent
    assert "2 skipped" in capsys.readouterr().out
    assert read_runs(finished / "g" / "runs.csv")["run_id"].tolist() == runs["run_id"].tolist()


def test_seeds_refuse_published_csvs_that_do_not_verify(finished: Path, tmp_path: Path,
                                                        capsys) -> None:
    runs = finished / "g" / "runs.csv"
    runs.write_text(runs.read_text().replace(",ok,", ",diverged,", 1))
    refused(capsys, ["run", str(finished.parent / "g.json"), "--results", str(finished),
                     "--seeds", "7"], "--seeds adds runs to the published CSVs", tmp_path)
