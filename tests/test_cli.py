"""The command line's other commands: list, data, evaluate, check, figures, reproduce."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from experiments.cli import main
from experiments.grids import available, load_grid
from vi.data import load_dataset, load_npz


def test_list_names_every_experiment_with_its_cost(capsys) -> None:
    assert main(["list"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in out] == list(available())
    for line, name in zip(out, available(), strict=True):
        g = load_grid(name)
        assert g.cost in line and g.description[:30] in line


def test_data_writes_the_exact_dataset_a_run_uses(tmp_path: Path, capsys) -> None:
    out = tmp_path / "sub" / "ppca.npz"
    assert main(["data", "ppca", "--seed", "3", "--option", "n=300", "--option",
                 "noise_std=0.2", "--out", str(out)]) == 0
    back = load_npz(out)
    same = load_dataset("ppca", seed=3, n=300, noise_std=0.2)
    for split in ("train", "validation", "test"):
        assert torch.equal(back.split(split), same.split(split))
    for key, value in same.ground_truth.items():
        assert torch.equal(back.ground_truth[key], value)
    assert str(out) in capsys.readouterr().out


def test_evaluate_prints_the_checkpoint_elbo(tmp_path: Path, capsys) -> None:
    grid = {"name": "g", "description": "d", "cost": "1 s", "lr": "grid",
            "base": {"dataset": "digits", "hidden": [8], "encoder_hidden": [8],
                     "batch_size": 256, "epochs": 1, "latent_dim": 2},
            "axes": {"method": ["amortized"], "seed": [0]}}
    (tmp_path / "g.json").write_text(json.dumps(grid))
    results = tmp_path / "r"
    assert main(["run", str(tmp_path / "g.json"), "--results", str(results)]) == 0
    (ckpt,) = results.glob("g/runs/*/checkpoint.pt")
    capsys.readouterr()
    assert main(["evaluate", str(ckpt), "--out", str(tmp_path / "e.csv")]) == 0
    out = capsys.readouterr().out
    assert "elbo" in out and "test" in out
    rows = (tmp_path / "e.csv").read_text().splitlines()
    assert len(rows) == 3  # header, train, test


def test_check_reports_clean_results(tmp_path: Path, capsys) -> None:
    results = tmp_path / "r"
    results.mkdir()
    assert main(["check", "--results", str(results)]) == 0
    assert "no problems" in capsys.readouterr().out
    (results / "x").mkdir()
    (results / "x" / "metrics.csv").write_text("run_id,value\nabc,1\n")
    assert main(["check", "--results", str(results)]) == 1
    assert "missing column(s)" in capsys.readouterr().err


@pytest.mark.slow
def test_reproduce_quick_regenerates_everything(tmp_path: Path) -> None:
    """The main job at --quick scale: every experiment, then figures and the summary."""
    pytest.importorskip("experiments.figures")
    results = tmp_path / "r"
    assert main(["reproduce", "--quick", "--results", str(results)]) == 0
    for name in available():
        assert (results / name / "metrics.csv").is_file()
        assert (results / name / "runs.csv").is_file()
    assert (results / "summary.csv").is_file()
    assert main(["check", "--results", str(results)]) == 0
