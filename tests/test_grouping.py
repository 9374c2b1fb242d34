"""Whether a run diverges, and every number it reports, never depends on how the runner groups
cells into ensembles: one ensemble, two groups, or every run alone (``--no-ensemble``) give
the same statuses and the same rows, as written, bit for bit.

The cells are the ones where grouping once decided the outcome: SA-VAE trained with the plain
score function at step sizes from stable (0.001) to absurd (1.0), where a difference in the
last bit of one Adam step grows until one grouping diverges and another does not.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from experiment_tools import csv_rows, tiny_grid

from experiments.cli import main

MEMBERS = [{"seed": 0, "method.lr": 0.05}, {"seed": 0, "method.lr": 0.001},
           {"seed": 3, "method.lr": 0.05}, {"seed": 3, "method.lr": 1.0},
           {"seed": 1, "method.lr": 1e4}]
BASE = {"method": {"name": "sa_vae", "estimator": "score", "baseline": "none", "n_mc": 4,
                   "refine_steps": 2},
        "training": {"max_epochs": 8, "batch_size": 128}}
#: runs.csv columns that name the grouping itself, times, hosts or the command line
GROUPING = ["started", "finished", "run_seconds", "seconds_per_epoch", "hostname", "git_commit",
            "seconds_per_epoch_alone", "seconds_per_epoch_ensemble", "run_seconds_alone",
            "git_dirty", "command", "ensemble", "ensemble_size", "ensemble_cpu_seconds",
            "ensemble_wall_seconds", "resumed"]


def _run(tmp_path: Path, out: str, members: list[dict], *flags: str) -> Path:
    folder = tmp_path / f"grid-{out}"
    folder.mkdir()
    grid = tiny_grid(folder, axes={"member": members}, base=BASE)
    results = tmp_path / out
    assert main(["run", str(grid), "--results", str(results), *flags]) == 0
    return results / "g"


def _outcome(exps: list[Path]) -> tuple[pd.DataFrame, dict[str, list[list[str]]]]:
    runs = pd.concat([pd.read_csv(e / "runs.csv", dtype=str) for e in exps]).drop(
        columns=GROUPING, errors="ignore").sort_values("run_id").reset_index(drop=True)
    rows: dict[str, list[list[str]]] = {}
    for e in exps:
        header, *body = csv_rows(e / "metrics.csv")
        for r in body:
            rows.setdefault(r[header.index("run_id")], []).append(r)
    return runs, rows


def test_grouping_never_changes_a_run(tmp_path: Path) -> None:
    one = _outcome([_run(tmp_path, "one", MEMBERS)])
    two = _outcome([_run(tmp_path, "first", MEMBERS[:2]), _run(tmp_path, "rest", MEMBERS[2:])])
    alone = _outcome([_run(tmp_path, "alone", MEMBERS, "--no-ensemble")])
    for other in (two, alone):
        pd.testing.assert_frame_equal(other[0], one[0])
        assert other[1] == one[1]
    assert len(one[0]) == len(MEMBERS)
    assert "diverged" in set(one[0]["status"]) and "ok" in set(one[0]["status"])
