"""Extending the study in one place: a custom grid runs at ``--quick`` without declaring a quick
scale, and is drawn, summarised and reported like the study's own experiments."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from experiments.grids import GridError, load_grid


def _write(folder: Path, grid: dict) -> Path:
    path = folder / f"{grid['name']}.json"
    path.write_text(json.dumps(grid))
    return path


def test_a_grid_without_a_quick_scale_has_an_implicit_one(tmp_path: Path) -> None:
    grid = load_grid(_write(tmp_path, {
        "name": "mine", "description": "d", "cost": "1 s",
        "base": {"model": {"hidden": [256, 256]}, "training": {"max_epochs": 500}},
        "method_base": {"vem": {"training": {"max_epochs": 900}},
                        "amortized": {"method": {"kl": "mc"}}},
        "axes": {"method.name": ["vem", "amortized"], "seed": [3, 4, 5]}}))
    quick = grid.scaled("quick")
    assert quick.scale == "quick" and quick.axes["seed"] == [3]
    cells = quick.cells()
    assert len(cells) == 2
    for cell in cells:
        assert cell["training"]["max_epochs"] == 2, cell["method"]["name"]
        assert cell["model"]["hidden"] == [16] and cell["method"]["encoder_hidden"] == [16]
        assert cell["training"]["stopping"] == {"check_every": 1, "patience": 1}
        assert cell["training"]["eval_points"] == 100
    assert cells[1]["method"]["kl"] == "mc"  # the grid's own settings stay
    assert grid.cells()[0]["training"]["max_epochs"] == 900  # the default scale is untouched
    with pytest.raises(GridError, match="has no scale 'huge'; it has: default, quick"):
        grid.scaled("huge")


def test_the_implicit_quick_scale_keeps_training_without_a_stopping_rule(tmp_path: Path) -> None:
    grid = load_grid(_write(tmp_path, {
        "name": "plain", "description": "d", "cost": "1 s",
        "base": {"training": {"stopping": None}}, "axes": {"model.latent_dim": [2, 3]}}))
    cells = grid.scaled("quick").cells()
    assert [c["training"]["stopping"] for c in cells] == [None, None]
    assert [c["model"]["latent_dim"] for c in cells] == [2, 3]


def test_a_declared_quick_scale_wins_over_the_implicit_one() -> None:
    grid = load_grid("elbo_curves")
    assert grid.scaled("quick").axes["seed"] == grid.scales["quick"]["axes"]["seed"]


@pytest.mark.slow
def test_a_custom_grid_runs_quick_and_gets_generic_figures(tmp_path: Path, capsys) -> None:
    """``run my.json --quick`` without a scales block, then ``figures my`` and ``figures``: the
    generic figures (ELBO curves per split, final ELBO per cell) of an experiment without a
    figure module, beside nothing else."""
    from experiments.cli import main

    grid = _write(tmp_path, {
        "name": "mine", "description": "d", "cost": "1 s", "lr": "grid",
        "base": {"data": {"name": "digits", "validation_fraction": 0.1},
                 "model": {"latent_dim": 2}, "training": {"batch_size": 256}},
        "axes": {"method.name": ["vem", "amortized"], "seed": [0, 1]}})
    results = tmp_path / "r"
    assert main(["run", str(grid), "--quick", "--results", str(results)]) == 0
    assert main(["figures", "mine", "--results", str(results)]) == 0
    drawn = sorted(p.name for p in (results / "mine" / "figures").glob("*.png"))
    assert drawn == ["elbo_vs_epoch.png", "final_elbo.png"]  # no gaps were measured
    (results / "mine" / "figures" / "final_elbo.png").unlink()
    assert main(["figures", "--results", str(results)]) == 0  # every experiment, summary too
    assert (results / "mine" / "figures" / "final_elbo.png").is_file()
    assert "mine" in (results / "summary.csv").read_text()
    capsys.readouterr()
    assert main(["figures", "nothere", "--results", str(results)]) == 2
    assert "mine" in capsys.readouterr().err  # the custom experiment is a valid name


def test_a_selection_lacking_one_of_a_methods_step_sizes_is_recorded(tmp_path: Path) -> None:
    """A selected.csv made before a method used a step size (here semi_amortized's encoder_lr)
    sets the others; that one keeps the grid's value and ``lr_source`` names it."""
    import pandas as pd

    from experiments.aggregate import add_to_manifest
    from experiments.cells import SELECTION, prepare

    folder = tmp_path / "r" / SELECTION.parent
    folder.mkdir(parents=True)
    pd.DataFrame([{"dataset": "digits", "method": "semi_amortized", "estimator": "reparam",
                   "baseline": "none", "method.lr": 0.002, "method.refine_lr": 0.05,
                   "shared_from": ""},
                  {"dataset": "digits", "method": "amortized", "estimator": "reparam",
                   "baseline": "none", "method.lr": 0.002, "method.encoder_lr": 0.004,
                   "shared_from": ""}]).to_csv(folder / "selected.csv", index=False)
    add_to_manifest(folder, [folder / "selected.csv"], create=True)
    grid = load_grid(_write(tmp_path, {
        "name": "sel", "description": "d", "cost": "1 s", "lr": "selected",
        "base": {"data": {"name": "digits"}, "method": {"encoder_lr": 0.007}},
        "axes": {"method.name": ["semi_amortized", "amortized"]}}))
    cells = {c.config["method"]["name"]: c for c in prepare(grid, tmp_path / "r")}
    semi, amortized = cells["semi_amortized"], cells["amortized"]
    assert semi.lr_source == "selected, encoder_lr from the grid"
    assert (semi.config["method"]["lr"], semi.config["method"]["refine_lr"],
            semi.config["method"]["encoder_lr"]) == (0.002, 0.05, 0.007)
    assert amortized.lr_source == "selected"
    assert amortized.config["method"]["encoder_lr"] == 0.004
