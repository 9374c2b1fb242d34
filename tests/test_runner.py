"""The experiment runner end to end: grids → run folders → aggregated CSVs (issue 6, SPEC §7).

Most tests use a tiny grid (8-unit networks, 2 epochs, 256-point batches on digits) so that a
whole sweep takes seconds; one real experiment runs with ``--quick`` in the default suite and
every one of them in the slow suite.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from experiments import aggregate as agg
from experiments.cli import main
from experiments.grids import available, load_grid, run_id_for
from experiments.schema import read_metrics, read_runs

TIMING = ["wall_s"]
RUN_TIMING = ["started", "finished", "run_seconds", "seconds_per_epoch", "hostname",
              "git_commit", "git_dirty"]


def tiny_grid(tmp: Path, name: str = "tiny", **changes) -> Path:
    """A seconds-scale grid over the three methods and two seeds."""
    grid = {
        "name": name, "description": "test grid", "cost": "1 s", "lr": "grid",
        "base": {"dataset": "digits", "hidden": [8], "encoder_hidden": [8], "batch_size": 256,
                 "epochs": 2, "latent_dim": 2, "eval_splits": ["train", "test"],
                 "heldout_max_steps": 10, "heldout_window": 5, "heldout_patience": 1},
        "axes": {"method": ["vem", "amortized", "semi_amortized"], "seed": [0, 1]},
    }
    for key, value in changes.items():
        grid[key] = value
    path = tmp / f"{name}.json"
    path.write_text(json.dumps(grid))
    return path


def without(frame: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    return frame.drop(columns=[c for c in columns if c in frame.columns])


def test_every_grid_loads_and_has_three_seeds() -> None:
    grids = available()
    assert next(iter(grids)) == "lr_selection"  # reproduce runs the selection first
    for name in ("elbo_curves", "gradient_variance", "amortization_gap", "ppca_exact",
                 "test_time_inference", "samples"):
        g = load_grid(name)
        assert g.name == name and g.description and g.cost
        assert len(g.axes["seed"]) >= 3, name
        assert len(g.scaled(True).cells()) <= len(g.cells())


def test_run_id_is_readable_stable_and_hashes_the_config() -> None:
    config = {"dataset": "digits", "method": "vem", "estimator": "score", "baseline": "loo",
              "latent_dim": 5, "n_mc": 4, "seed": 2, "lr": 1e-3}
    rid = run_id_for("exp", config, {})
    assert rid.startswith("digits-vem-score-loo-h5-m4-s2-") and len(rid.split("-")[-1]) == 8
    assert run_id_for("exp", dict(config), {}) == rid
    assert run_id_for("exp", {**config, "lr": 2e-3}, {}) != rid
    assert run_id_for("other", config, {}) != rid
    assert run_id_for("exp", config, {"images": {}}) != rid


def test_tiny_sweep_writes_run_folders_and_aggregates(tmp_path: Path, capsys) -> None:
    results = tmp_path / "results"
    assert main(["run", str(tiny_grid(tmp_path)), "--results", str(results)]) == 0
    exp = results / "tiny"
    folders = sorted((exp / "runs").iterdir())
    assert len(folders) == 6
    for folder in folders:
        names = {p.name for p in folder.iterdir()}
        assert {"config.json", "provenance.json", "metrics.csv", "checkpoint.pt"} <= names
        prov = json.loads((folder / "provenance.json").read_text())
        assert prov["status"] == "ok" and prov["lr_source"] == "grid"
        for key in ("git_commit", "git_dirty", "python_version", "torch_version", "device",
                    "command", "started", "finished"):
            assert key in prov
    metrics = read_metrics(exp / "metrics.csv")
    runs = read_runs(exp / "runs.csv")
    assert len(runs) == 6 and set(runs["status"]) == {"ok"}
    assert set(metrics["run_id"]) == set(runs["run_id"])
    assert runs["final_elbo_test"].notna().all() and runs["lr"].notna().all()
    # rows are the runs' own, in grid order, and their floats survive the CSV round trip
    first = pd.read_csv(folders[0] / "metrics.csv")
    assert first["value"].tolist() == metrics[metrics["run_id"] == folders[0].name][
        "value"].tolist()
    assert agg.check_results(results)[1] == []


def test_rerun_skips_completed_cells_and_force_reruns_identically(tmp_path: Path,
                                                                   capsys) -> None:
    grid, results = tiny_grid(tmp_path), tmp_path / "results"
    assert main(["run", str(grid), "--results", str(results)]) == 0
    exp = results / "tiny"
    before = (exp / "metrics.csv").read_bytes()
    stamps = {p: p.stat().st_mtime_ns for p in (exp / "runs").rglob("metrics.csv")}
    capsys.readouterr()
    assert main(["run", str(grid), "--results", str(results)]) == 0
    assert "0 ran, 0 resumed, 6 skipped" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert (exp / "metrics.csv").read_bytes() == before
    assert main(["run", str(grid), "--results", str(results), "--force"]) == 0
    assert "6 ran" in capsys.readouterr().out
    assert any(p.stat().st_mtime_ns != t for p, t in stamps.items())
    again = pd.read_csv(exp / "metrics.csv")
    pd.testing.assert_frame_equal(without(again, TIMING),
                                  without(pd.read_csv(pd.io.common.BytesIO(before)), TIMING))


def test_jobs_2_gives_the_same_csvs_as_jobs_1(tmp_path: Path) -> None:
    grid = tiny_grid(tmp_path, axes={"method": ["vem", "amortized", "semi_amortized"],
                                     "seed": [0]})
    for jobs, out in (("1", "a"), ("2", "b")):
        assert main(["run", str(grid), "--results", str(tmp_path / out), "--jobs", jobs]) == 0
    a, b = tmp_path / "a" / "tiny", tmp_path / "b" / "tiny"
    pd.testing.assert_frame_equal(without(pd.read_csv(a / "metrics.csv"), TIMING),
                                  without(pd.read_csv(b / "metrics.csv"), TIMING))
    timing = [*RUN_TIMING, "command", "cpu_seconds", "wall_seconds"]
    pd.testing.assert_frame_equal(without(pd.read_csv(a / "runs.csv"), timing),
                                  without(pd.read_csv(b / "runs.csv"), timing))


def test_seeds_option_replaces_the_seed_axis(tmp_path: Path) -> None:
    results = tmp_path / "r"
    assert main(["run", str(tiny_grid(tmp_path)), "--results", str(results),
                 "--seeds", "7"]) == 0
    runs = read_runs(results / "tiny" / "runs.csv")
    assert runs["seed"].tolist() == [7, 7, 7]


def test_lr_selection_is_recorded_and_used(tmp_path: Path) -> None:
    """The selection runs on the validation split, writes selected.csv, and a later experiment
    takes its step sizes from it (lr_source=selected in runs.csv)."""
    results = tmp_path / "r"
    select = tiny_grid(
        tmp_path, "lr_selection",
        base={"dataset": "digits", "hidden": [8], "encoder_hidden": [8], "batch_size": 256,
              "epochs": 2, "latent_dim": 2, "validation_fraction": 0.1,
              "eval_splits": ["validation"], "heldout_max_steps": 10, "heldout_window": 5,
              "heldout_patience": 1},
        axes={"step_sizes": [{"method": "amortized", "lr": 1e-4},
                             {"method": "amortized", "lr": 3e-3},
                             {"method": "vem", "lr": 3e-3, "local_lr": 0.1}],
              "seed": [0, 1]},
        select={"metric": "elbo", "split": "validation"})
    assert main(["run", str(select), "--results", str(results)]) == 0
    selected = pd.read_csv(results / "lr_selection" / "selected.csv")
    candidates = pd.read_csv(results / "lr_selection" / "candidates.csv")
    assert len(selected) == 2 and len(candidates) == 3
    runs = read_runs(results / "lr_selection" / "runs.csv")
    amort = runs[runs["method"] == "amortized"].groupby("lr")["final_elbo_validation"].mean()
    chosen = selected.set_index("method").loc["amortized"]
    assert chosen["lr"] == amort.idxmax()  # the better validation ELBO wins
    assert pd.isna(chosen["local_lr"]) and pd.isna(chosen["refine_lr"])  # not amortized's
    vem = selected.set_index("method").loc["vem"]
    assert (vem["lr"], vem["local_lr"]) == (3e-3, 0.1)

    consumer = tiny_grid(tmp_path, "consumer", lr="selected")
    assert main(["run", str(consumer), "--results", str(results)]) == 0
    used = read_runs(results / "consumer" / "runs.csv")
    by_method = used.set_index("method")
    assert set(used[used["method"] != "semi_amortized"]["lr_source"]) == {"selected"}
    assert set(used[used["method"] == "semi_amortized"]["lr_source"]) == {"default"}
    assert (by_method.loc["amortized", "lr"] == chosen["lr"]).all()
    assert (by_method.loc["vem", "local_lr"] == 0.1).all()


def test_quick_ppca_exact_end_to_end(tmp_path: Path) -> None:
    """One real experiment in the default suite: --quick, schema-valid, closed-form rows."""
    results = tmp_path / "r"
    assert main(["run", "ppca_exact", "--quick", "--results", str(results)]) == 0
    metrics = read_metrics(results / "ppca_exact" / "metrics.csv")
    assert {"elbo", "log_px_exact", "approximation_gap", "log_px_mle",
            "approximation_gap_mle"} <= set(metrics["metric"])
    final = metrics[metrics["metric"] == "log_px_mle"]
    # the ML fit bounds every trained linear decoder's exact log-likelihood on train
    exact = metrics[(metrics["metric"] == "log_px_exact") & (metrics["split"] == "train")]
    assert exact["value"].max() <= final[final["split"] == "train"]["value"].min() + 1e-6
    assert agg.check_results(results)[1] == []
    _figures_without_torch(results, "ppca_exact")


def _figures_without_torch(results: Path, experiment: str) -> None:
    """``figures`` draws from the CSVs in a fresh process where torch cannot be imported."""
    pytest.importorskip("experiments.figures")
    root = Path(__file__).resolve().parents[1]
    code = ("import sys\n"
            "class _NoTorch:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] in ('torch', 'vi'):\n"
            "            raise ImportError('imported ' + name)\n"
            "sys.meta_path.insert(0, _NoTorch())\n"
            "from experiments.cli import main\n"
            f"rc = main(['figures', '--results', {str(results)!r}, {experiment!r}])"
            "\nassert 'torch' not in sys.modules and 'vi' not in sys.modules\n"
            "sys.exit(rc)")
    env = {**os.environ, "PYTHONPATH": str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "MPLBACKEND": "Agg"}
    out = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert list((results / experiment / "figures").glob("*.png"))


QUICK = ["lr_selection", "elbo_curves", "gradient_variance", "amortization_gap",
         "test_time_inference", "samples"]


@pytest.mark.slow
@pytest.mark.parametrize("experiment", QUICK)
def test_every_experiment_runs_quick_and_satisfies_the_schema(tmp_path: Path,
                                                               experiment: str) -> None:
    results = tmp_path / "r"
    assert main(["run", experiment, "--quick", "--results", str(results), "--jobs", "2"]) == 0
    exp = results / experiment
    read_metrics(exp / "metrics.csv")
    assert set(read_runs(exp / "runs.csv")["status"]) == {"ok"}
    assert agg.check_results(results)[1] == []
    tables = {p.stem for p in exp.glob("*.csv")} - {"metrics", "runs"}
    expected = {"lr_selection": {"selected", "candidates"}, "gradient_variance":
                {"variance_sweep"}, "amortization_gap": {"gaps"},
                "samples": {"images", "latents"}}.get(experiment, set())
    assert expected <= tables
    if experiment == "samples":
        images = pd.read_csv(exp / "images.csv")
        assert set(images["kind"]) == {"data", "reconstruction", "sample", "manifold"}
        assert images[images["kind"] == "data"]["label"].notna().all()
        latents = pd.read_csv(exp / "latents.csv")
        assert latents["label"].between(0, 9).all() and len(latents) % 359 == 0


@pytest.mark.slow
def test_submitit_local_executor_writes_the_same_run_folders(tmp_path: Path) -> None:
    pytest.importorskip("submitit")
    from experiments.launch import run_cells
    from experiments.runner import base_provenance, prepare

    grid = load_grid(tiny_grid(tmp_path))
    local, cluster = tmp_path / "local", tmp_path / "cluster"
    assert main(["run", str(tmp_path / "tiny.json"), "--results", str(local)]) == 0
    cells = prepare(grid, cluster)
    for c in cells:
        c.provenance = base_provenance()
    outcomes = run_cells(cells, launcher="slurm", cluster="local", progress=False)
    assert [o.status for o in outcomes] == ["ok"] * len(cells)
    agg.aggregate(cluster / "tiny", [c.run_id for c in cells])
    ids_local = sorted(p.name for p in (local / "tiny" / "runs").iterdir())
    assert sorted(c.run_id for c in cells) == ids_local
    for rid in ids_local:
        a = pd.read_csv(local / "tiny" / "runs" / rid / "metrics.csv")
        b = pd.read_csv(cluster / "tiny" / "runs" / rid / "metrics.csv")
        pd.testing.assert_frame_equal(without(a, TIMING), without(b, TIMING))
        assert (local / "tiny" / "runs" / rid / "config.json").read_text() == (
            cluster / "tiny" / "runs" / rid / "config.json").read_text()
