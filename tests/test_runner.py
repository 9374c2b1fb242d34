"""The experiment runner end to end: grids → cells → ensembles → run folders → aggregated CSVs.

Most tests use a tiny grid (``experiment_tools.TINY_BASE``: 8-unit networks, 2 epochs on
digits) run in-process, so a sweep takes about a second. Every real experiment runs at
``--quick`` scale in the slow suite (``test_cli``'s reproduce test).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from experiment_tools import (
    RUN_TIMING,
    TIMING,
    csv_rows,
    grid_dict,
    provenance,
    refused,
    run_dirs,
    tiny_grid,
)

from experiments import aggregate as agg
from experiments import checks
from experiments.cells import DEFAULT_NO_ROW, DEFAULT_NO_SELECTION
from experiments.cli import main
from experiments.grids import GRID_DIR, available, load_grid, run_id_for
from experiments.runner import group_ensembles, prepare
from experiments.schema import read_metrics, read_runs


def without(frame: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    return frame.drop(columns=[c for c in columns if c in frame.columns])


# ------------------------------------------------------------------------------------ grids


def test_every_grid_loads_with_seeds_and_a_smaller_quick_scale() -> None:
    grids = available()
    assert next(iter(grids)) == "lr_selection"  # reproduce runs the selection first
    for name in grids:
        g = load_grid(name)
        assert g.name == name and g.description and g.cost
        if name != "mnist_curves":  # one seed: a single expensive reproduction of a figure
            assert len(g.axes["seed"]) >= 3, name
        assert "quick" in g.scales, name
        assert 0 < len(g.scaled("quick").cells()) <= len(g.cells()), name


@pytest.mark.slow
def test_every_grid_prepares_at_every_scale(tmp_path: Path) -> None:
    """Every cell of every grid passes validation (configuration, probes, data, sizes) at the
    default scale and at each scale it defines, without writing anything (the step sizes of
    lr_selection pending, as when ``reproduce`` validates every grid before it runs)."""
    for name in available():
        g = load_grid(name)
        for scale in ["default", *g.scales]:
            cells = prepare(g, tmp_path / "r", scale=scale, selection_pending=True)
            assert len({c.run_id for c in cells}) == len(cells), (name, scale)
    assert not (tmp_path / "r").exists()


def test_run_id_is_readable_stable_and_hashes_the_config(tmp_path: Path) -> None:
    (cell,) = prepare(load_grid(tiny_grid(tmp_path, axes={"method.name": ["vem"],
                                                           "seed": [2]})), tmp_path)
    config = cell.config
    assert cell.run_id.startswith("digits-vem-reparam-none-h2-m1-s2-")
    assert len(cell.run_id.split("-")[-1]) == 8
    assert run_id_for("g", json.loads(json.dumps(config))) == cell.run_id
    changed = json.loads(json.dumps(config))
    changed["method"]["lr"] = 2e-3
    assert run_id_for("g", changed) != cell.run_id
    assert run_id_for("other", config) != cell.run_id
    probed = {**config, "probes": {"activity": {}}}
    assert run_id_for("g", probed) != cell.run_id


def test_cells_differing_in_seed_and_step_sizes_share_an_ensemble(tmp_path: Path) -> None:
    grid = tiny_grid(tmp_path, axes={"method.name": ["vem", "amortized"],
                                     "method.lr": [1e-3, 3e-3], "seed": [0, 1]})
    cells = prepare(load_grid(grid), tmp_path)
    groups = group_ensembles(cells)
    assert sorted(len(g) for g in groups) == [4, 4]
    for group in groups:
        assert len({c.config["method"]["name"] for c in group}) == 1
    assert [len(g) for g in group_ensembles(cells, max_members=1)] == [1] * 8


# ------------------------------------------------------------------------------ end to end


def test_tiny_sweep_writes_run_folders_and_aggregates(tmp_path: Path) -> None:
    results = tmp_path / "results"
    grid = tiny_grid(tmp_path, axes={"method.name": ["vem", "amortized", "semi_amortized"],
                                     "seed": [0, 1]})
    assert main(["run", str(grid), "--results", str(results)]) == 0
    exp = results / "g"
    folders = run_dirs(results)
    assert len(folders) == 6
    for folder in folders:
        names = {p.name for p in folder.iterdir()}
        assert {"config.json", "provenance.json", "metrics.csv", "checkpoint.pt"} <= names
        prov = provenance(folder)
        assert prov["status"] == "ok" and prov["lr_source"] == "grid", prov["message"]
        for key in ("git_commit", "git_dirty", "python_version", "torch_version", "device",
                    "command", "started", "finished", "stop_reason", "files", "ensemble"):
            assert key in prov
        cfg = json.loads((folder / "config.json").read_text())
        assert cfg["run_id"] == folder.name and cfg["experiment"] == "g"
    metrics = read_metrics(exp / "metrics.csv")
    runs = read_runs(exp / "runs.csv")
    assert len(runs) == 6 and set(runs["status"]) == {"ok"}
    assert set(metrics["run_id"]) == set(runs["run_id"])
    assert runs["final_elbo_test"].notna().all() and runs["method.lr"].notna().all()
    assert (runs["stop_reason"] == "budget").all() and (runs["epochs_run"] == 2).all()
    # rows are the runs' own, in grid order, and their floats survive the CSV round trip
    first = pd.read_csv(folders[0] / "metrics.csv")
    assert first["value"].tolist() == metrics[metrics["run_id"] == folders[0].name][
        "value"].tolist()
    assert list(dict.fromkeys(metrics["run_id"])) == runs["run_id"].tolist()
    assert json.loads((exp / "manifest.json").read_text())["runs"] == 6
    assert checks.check_results(results)[1] == []


def test_rerun_skips_completed_cells_and_force_reruns_identically(tmp_path: Path,
                                                                   capsys) -> None:
    grid, results = tiny_grid(tmp_path), tmp_path / "results"
    assert main(["run", str(grid), "--results", str(results)]) == 0
    exp = results / "g"
    before = csv_rows(exp / "metrics.csv")
    stamps = {p: p.stat().st_mtime_ns for p in (exp / "runs").rglob("*.*")}
    capsys.readouterr()
    assert main(["run", str(grid), "--results", str(results)]) == 0
    assert "0 ran, 0 resumed, 4 skipped" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # nothing rewritten
    assert csv_rows(exp / "metrics.csv") == before
    assert main(["run", str(grid), "--results", str(results), "--force"]) == 0
    assert "4 ran" in capsys.readouterr().out
    assert all(p.stat().st_mtime_ns != t for p, t in stamps.items()
               if p.name == "metrics.csv")
    assert csv_rows(exp / "metrics.csv") == before
    assert not (exp / ".force.json").exists()  # the forced session finished


def test_ensembles_do_not_change_a_members_results(tmp_path: Path) -> None:
    """Members trained together as one batched model give the results each gets alone
    (``--no-ensemble``): same rows, values within float32 rounding of a batched product."""
    members = [{"seed": 0, "method.lr": 1e-3}, {"seed": 1, "method.lr": 3e-3}]
    grid = tiny_grid(tmp_path, axes={"method.name": ["vem", "amortized", "semi_amortized"],
                                     "member": members})
    a, b = tmp_path / "ensemble", tmp_path / "alone"
    assert main(["run", str(grid), "--results", str(a)]) == 0
    assert main(["run", str(grid), "--results", str(b), "--no-ensemble"]) == 0
    ra, rb = read_runs(a / "g" / "runs.csv"), read_runs(b / "g" / "runs.csv")
    assert set(ra["ensemble_size"]) == {2} and set(rb["ensemble_size"]) == {1}
    ma, mb = pd.read_csv(a / "g" / "metrics.csv"), pd.read_csv(b / "g" / "metrics.csv")
    pd.testing.assert_frame_equal(without(ma, [*TIMING, "value"]),
                                  without(mb, [*TIMING, "value"]))
    np.testing.assert_allclose(ma["value"], mb["value"], rtol=1e-5, atol=1e-5)


def test_each_run_records_its_cost_alone_and_its_curves_use_it(tmp_path: Path) -> None:
    """Every member records the K = 1 calibration of its ensemble's epoch time; runs.csv's
    seconds_per_epoch is that calibration (the ensemble share beside it), and metrics.csv puts
    the trainer's rows on the run-alone clock (epoch x calibration) while the run folders keep
    the share they measured."""
    grid = tiny_grid(tmp_path, base={"training": {"max_epochs": 4}},
                     axes={"method.name": ["vem", "amortized"], "seed": [0, 1, 2]})
    results = tmp_path / "results"
    assert main(["run", str(grid), "--results", str(results)]) == 0
    runs = read_runs(results / "g" / "runs.csv")
    assert set(runs["ensemble_size"]) == {3}
    alone = runs.set_index("run_id")["seconds_per_epoch_alone"].astype(float)
    assert (alone > 0).all()
    assert runs.groupby("method")["seconds_per_epoch_alone"].nunique().eq(1).all()  # per cell
    np.testing.assert_array_equal(runs["seconds_per_epoch"], runs["seconds_per_epoch_alone"])
    np.testing.assert_allclose(runs["seconds_per_epoch_ensemble"],
                               runs["run_seconds"] / runs["epochs_run"], atol=1e-4)
    np.testing.assert_allclose(runs["run_seconds_alone"], alone.to_numpy() * 4, atol=1e-3)
    metrics = read_metrics(results / "g" / "metrics.csv")
    timed = metrics[metrics["metric"].isin(agg.TRAINING_TIMED)]
    np.testing.assert_allclose(timed["wall_s"],
                               (timed["epoch"] * timed["run_id"].map(alone)).round(3),
                               atol=1e-9)
    for folder in run_dirs(results):  # the folders keep the measured share
        own = pd.read_csv(folder / "metrics.csv")
        mine = metrics[metrics["run_id"] == folder.name]
        assert own["value"].tolist() == mine["value"].tolist()
        last = own[own["metric"] == "elbo_running"]["wall_s"].iloc[-1]
        assert last == pytest.approx(provenance(folder)["run_seconds"], abs=2e-3)


@pytest.mark.slow
def test_jobs_2_gives_the_same_csvs_as_jobs_1(tmp_path: Path) -> None:
    grid = tiny_grid(tmp_path, axes={"method.name": ["vem", "amortized", "semi_amortized"],
                                     "seed": [0]})
    for jobs, out in (("1", "a"), ("2", "b")):
        assert main(["run", str(grid), "--results", str(tmp_path / out), "--jobs", jobs]) == 0
    a, b = tmp_path / "a" / "g", tmp_path / "b" / "g"
    assert csv_rows(a / "metrics.csv") == csv_rows(b / "metrics.csv")
    pd.testing.assert_frame_equal(without(pd.read_csv(a / "runs.csv"), RUN_TIMING),
                                  without(pd.read_csv(b / "runs.csv"), RUN_TIMING))


def test_seeds_option_replaces_the_seed_axis(tmp_path: Path) -> None:
    results = tmp_path / "r"
    assert main(["run", str(tiny_grid(tmp_path)), "--results", str(results),
                 "--seeds", "7"]) == 0
    runs = read_runs(results / "g" / "runs.csv")
    assert runs["seed"].tolist() == [7, 7]
    assert all("-s7-" in rid for rid in runs["run_id"])


def test_scale_merges_base_and_replaces_axes_and_probes(tmp_path: Path) -> None:
    grid = tiny_grid(tmp_path, probes={"activity": {}}, scales={"small": {
        "base": {"training.max_epochs": 1}, "axes": {"seed": [5]}, "probes": {}}})
    g = load_grid(grid)
    cells = prepare(g, tmp_path, scale="small")
    assert len(cells) == 2 and {c.config["seed"] for c in cells} == {5}
    assert {c.config["training"]["max_epochs"] for c in cells} == {1}
    assert all(c.config["probes"] == {"activity": {}} for c in cells)
    assert all(c.config["probes"] == {"activity": {}} for c in prepare(g, tmp_path))


def test_exact_probe_rows_and_the_ml_bound(tmp_path: Path) -> None:
    """A linear decoder with the exact probe: closed-form rows at each evaluation, and at the
    end the PPCA maximum-likelihood fit, whose log p(x) on train bounds the trained model's."""
    grid = tiny_grid(tmp_path, probes={"exact": {}}, axes={"method.name": ["vem", "amortized"]},
                     base={"data.name": "ppca", "model.decoder_mean": "linear",
                           "model.isotropic": True, "model.latent_dim": 4,
                           "training.batch_size": 50, "seed": 0})
    results = tmp_path / "r"
    assert main(["run", str(grid), "--results", str(results)]) == 0
    metrics = read_metrics(results / "g" / "metrics.csv")
    assert {"log_px_exact", "approximation_gap"} <= set(metrics["metric"])
    train = metrics[metrics["split"] == "train"]
    for _, run in train.groupby("run_id"):
        mle = run[run["metric"] == "log_px_mle"]["value"]
        assert len(mle) == 1
        assert run[run["metric"] == "log_px_exact"]["value"].max() <= mle.iloc[0] + 1e-4


# ------------------------------------------------------------------------------- selection


def selection_grid(folder: Path) -> Path:
    """A tiny lr_selection: the real grid's selection rule and share rules, with the step-size
    candidates of amortized only, on tiny networks over two seeds."""
    real = json.loads((GRID_DIR / "lr_selection.json").read_text())
    select = dict(real["select"])
    select["candidates"] = {"amortized": real["select"]["candidates"]["amortized"]}
    select["max_extensions"] = 1
    grid = grid_dict("lr_selection", select=select,
                     base={"data.validation_fraction": 0.2,
                           "training.eval_splits": ["validation"]},
                     axes={"method.name": ["amortized"], "seed": [0, 1]})
    path = folder / "lr_selection.json"
    path.write_text(json.dumps(grid))
    return path


@pytest.fixture(scope="module")
def _selected_once(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("selection")
    results = tmp / "r"
    assert main(["run", str(selection_grid(tmp)), "--results", str(results)]) == 0
    return results


@pytest.fixture
def selected_results(_selected_once: Path, tmp_path: Path) -> Path:
    """Results holding a finished tiny lr_selection, copied afresh for each test."""
    return Path(shutil.copytree(_selected_once, tmp_path / "r"))


def test_lr_selection_is_recorded_and_used(selected_results: Path, tmp_path: Path,
                                           capsys) -> None:
    """The selection scores candidates on the validation split, writes selected.csv and
    candidates.csv, and a later experiment takes its step sizes from it (lr_source in
    runs.csv: selected, or shared by a share rule). A cell it has no row for is refused, unless
    --default-lr asks for the grid's own step sizes (lr_source says so)."""
    exp = selected_results / "lr_selection"
    selected = pd.read_csv(exp / "selected.csv", dtype={"baseline": str})
    candidates = pd.read_csv(exp / "candidates.csv", dtype={"baseline": str})
    runs = read_runs(exp / "runs.csv")
    own = selected[selected["shared_from"].isna()]
    assert own[["dataset", "method", "estimator"]].values.tolist() == [
        ["digits", "amortized", "reparam"]]
    assert (selected["shared_from"].notna() & (selected["estimator"] == "stl")).any()
    chosen = own.iloc[0]
    best = candidates[candidates["rank"] == 1].iloc[0]
    assert (chosen["method.lr"], chosen["method.encoder_lr"]) == (
        best["method.lr"], best["method.encoder_lr"])
    # the better median validation ELBO wins among candidates flagged alike
    alike = candidates[(candidates["unstable"] == best["unstable"])
                       & (candidates["unconverged"] == best["unconverged"])]
    assert best["score"] == alike["score"].max()
    scores = runs.groupby(["method.lr", "method.encoder_lr"])["final_elbo_validation"].median()
    assert scores[(best["method.lr"], best["method.encoder_lr"])] == pytest.approx(best["score"])
    assert len(runs) == 2 * len(candidates)

    consumer = tiny_grid(tmp_path, "consumer", lr="selected",
                         axes={"method.name": ["vem", "amortized"],
                               "estimator": [{"method.estimator": "reparam"},
                                             {"method.estimator": "stl", "method.kl": "mc"}],
                               "seed": [0]})
    refused(capsys, ["run", str(consumer), "--results", str(selected_results)],
            "has no row for 2 (dataset/method/estimator/baseline) group(s) of its cells: "
            "digits/vem/reparam/none, digits/vem/stl/none", tmp_path)
    assert main(["run", str(consumer), "--results", str(selected_results),
                 "--default-lr"]) == 0
    used = read_runs(selected_results / "consumer" / "runs.csv").set_index(
        ["method", "estimator"])
    assert used.loc[("amortized", "reparam"), "lr_source"] == "selected"
    assert used.loc[("amortized", "stl"), "lr_source"] == "shared"
    assert set(used.loc["vem", "lr_source"]) == {DEFAULT_NO_ROW}
    for estimator in ("reparam", "stl"):
        assert used.loc[("amortized", estimator), "method.lr"] == chosen["method.lr"]
        assert used.loc[("amortized", estimator), "method.encoder_lr"] == chosen[
            "method.encoder_lr"]


def test_run_refuses_a_damaged_selection(selected_results: Path, tmp_path: Path,
                                         capsys) -> None:
    """selected.csv cut inside a row: ``run`` names the file, exits 2, and trains nothing."""
    path = selected_results / "lr_selection" / "selected.csv"
    text = path.read_text()
    path.write_text(text[: len(text) - len(text.splitlines()[-1]) // 2 - 1])
    grid = tiny_grid(tmp_path, "elbo_curves", lr="selected")
    capsys.readouterr()
    assert main(["run", str(grid), "--results", str(selected_results)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "manifest" in err and err.count("\n") == 1
    assert not (selected_results / "elbo_curves").exists()


def _consumer(folder: Path) -> Path:
    return tiny_grid(folder, "consumer", lr="selected", scales={"quick": {}},
                     axes={"method.name": ["amortized"], "seed": [0]})


def test_a_missing_selection_is_refused_unless_defaults_are_asked_for(
        selected_results: Path, tmp_path: Path, capsys) -> None:
    """No selected.csv (deleted, or never made): a grid that takes its step sizes from it is
    refused with one message naming the file and the command that makes it; --default-lr
    trains it with the grid's own step sizes and records that in lr_source."""
    exp = selected_results / "lr_selection"
    (exp / "selected.csv").unlink()
    grid = _consumer(tmp_path)
    line = refused(capsys, ["run", str(grid), "--results", str(selected_results)],
                   f"{exp / 'selected.csv'} is missing", tmp_path)
    assert "python -m experiments run lr_selection" in line and "--default-lr" in line
    assert f"(deleted: {exp / 'manifest.json'} lists it)" in line
    fresh = tmp_path / "fresh"
    line = refused(capsys, ["run", str(grid), "--results", str(fresh), "--quick"],
                   "does not exist", tmp_path)
    assert f"run lr_selection --quick --results {fresh}" in line
    assert main(["run", str(grid), "--results", str(selected_results), "--default-lr"]) == 0
    (source,) = read_runs(selected_results / "consumer" / "runs.csv")["lr_source"]
    assert source == DEFAULT_NO_SELECTION


def test_a_selection_interrupted_before_its_choice_is_reported(
        selected_results: Path, tmp_path: Path, capsys) -> None:
    """The selection's runs aggregated (manifest complete) but selected.csv and candidates.csv
    never written, as when the command stops between the two: ``check`` reports it, and a grid
    that needs the choice is refused, saying the selection was interrupted."""
    exp = selected_results / "lr_selection"
    manifest = json.loads((exp / "manifest.json").read_text())
    for name in ("selected.csv", "candidates.csv"):
        del manifest["files"][name]
        (exp / name).unlink()
    (exp / "manifest.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    assert main(["check", "--results", str(selected_results)]) == 1
    err = capsys.readouterr().err
    assert "candidates.csv and selected.csv were never written" in err, err
    refused(capsys, ["run", str(_consumer(tmp_path)), "--results", str(selected_results)],
            "its choice was never written (interrupted", tmp_path)


def test_a_forced_selection_reruns_each_cell_once(selected_results: Path, tmp_path: Path,
                                                 capsys) -> None:
    """``--force`` on a selection with extension rounds: every round belongs to one forced
    session, so the cells of the first round are not rerun in the second."""
    grid = selection_grid(tmp_path)
    n_cells = len(read_runs(selected_results / "lr_selection" / "runs.csv"))
    capsys.readouterr()
    assert main(["run", str(grid), "--results", str(selected_results), "--force"]) == 0
    tallies = [line for line in capsys.readouterr().out.splitlines() if " runs (" in line]
    ran = [int(line.split("(")[1].split(" ran")[0]) for line in tallies]
    assert len(tallies) >= 3 and sum(ran) == n_cells, tallies
    assert ran[-1] == 0
    assert not (selected_results / "lr_selection" / ".force.json").exists()


@pytest.mark.slow
def test_submitit_local_executor_writes_the_same_run_folders(tmp_path: Path) -> None:
    pytest.importorskip("submitit")
    from experiments.launch import run_cells
    from experiments.runner import base_provenance

    grid = tiny_grid(tmp_path, axes={"method.name": ["vem", "amortized"], "seed": [0]})
    local, cluster = tmp_path / "local", tmp_path / "cluster"
    assert main(["run", str(grid), "--results", str(local)]) == 0
    cells = prepare(load_grid(grid), cluster)
    for c in cells:
        c.provenance = base_provenance()
    outcomes = run_cells(cells, launcher="slurm", cluster="local", progress=False)
    assert [o.status for o in outcomes] == ["ok"] * len(cells)
    agg.aggregate(cluster / "g", [c.run_id for c in cells])
    ids_local = [p.name for p in run_dirs(local)]
    assert sorted(c.run_id for c in cells) == ids_local
    for rid in ids_local:
        a, b = local / "g" / "runs" / rid, cluster / "g" / "runs" / rid
        assert csv_rows(a / "metrics.csv") == csv_rows(b / "metrics.csv")
        assert (a / "config.json").read_text() == (b / "config.json").read_text()
    assert csv_rows(local / "g" / "metrics.csv") == csv_rows(cluster / "g" / "metrics.csv")


def test_every_quick_cell_is_seconds_scale() -> None:
    """The quick scale bounds every cell, method overrides included (CI runs all of them)."""
    from experiments.grids import deep_merge
    from vi.config import RunConfig

    defaults = RunConfig().to_dict()
    for name in available():
        for partial in load_grid(name).scaled("quick").cells():
            full = deep_merge(defaults, partial)
            assert full["training"]["max_epochs"] <= 5, (name, full["method"]["name"])


def test_seeds_of_a_selection_are_refused_beside_other_published_seeds(
        selected_results: Path, tmp_path: Path, capsys) -> None:
    """A step-size selection is chosen over all its seeds at once: ``--seeds`` would publish a
    selection of some seeds beside the rows of others, so it is refused (exit 2, nothing
    run) where other seeds are published."""
    before = (selected_results / "lr_selection" / "selected.csv").read_bytes()
    refused(capsys, ["run", str(selection_grid(tmp_path)), "--results", str(selected_results),
                     "--seeds", "5"], "a selection is chosen over all its seeds", tmp_path)
    assert (selected_results / "lr_selection" / "selected.csv").read_bytes() == before
