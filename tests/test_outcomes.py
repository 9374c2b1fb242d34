"""A run's outcome from the trainer to the published tables: ``runs.csv`` records it with its
decays and the numbers it was judged on, the schema refuses an unknown one, and the summary
counts the finished runs that did not converge by outcome."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from experiment_tools import tiny_grid

from experiments import schema
from experiments.cli import main
from experiments.summary import summary_table
from vi.contract import OUTCOME_COLUMNS, OUTCOMES


def test_runs_csv_records_outcomes_and_the_summary_counts_them(tmp_path):
    """A tiny grid trained 3 epochs with the plateau rule checked every epoch: every run gets
    an outcome with its decay record and numbers; a cell's n_cap + n_collapsed + n_stuck is its
    n_not_converged, and each finished run sits in the row of its outcome."""
    grid = tiny_grid(tmp_path, base={"training.max_epochs": 3, "training.stopping": {
        "check_every": 1, "patience": 1, "min_epochs": 0, "min_delta": 1e9, "decays": 1}})
    results = tmp_path / "results"
    assert main(["run", str(grid), "--results", str(results)]) == 0
    runs = schema.read_runs(results / "g" / "runs.csv")
    assert set(OUTCOME_COLUMNS) <= set(runs.columns)
    assert set(runs["outcome"]) <= set(OUTCOMES) and runs["outcome"].notna().all()
    ok = runs[runs["status"] == "ok"]
    # every check is a plateau (min_delta 1e9): a decay at epoch 1, the stop at epoch 2
    assert ok["stop_reason"].eq("plateau").all() and ok["decays"].eq(1).all()
    assert all(json.loads(v) == [1] for v in ok["decay_epochs"])
    assert (ok["converged"].astype(str) == (ok["outcome"] == "converged").astype(str)).all()
    assert (ok["best_validation"] >= ok["last_validation"]).all()
    table = summary_table(results)
    parts = table[["n_cap", "n_collapsed", "n_stuck"]].sum(axis=1)
    assert (parts == table["n_not_converged"]).all()
    for _, run in ok.iterrows():
        expected = "converged" if run["outcome"] == "converged" else run["outcome"]
        cell = table[(table["method"] == run["method"]) & (table["convergence"] == expected)]
        assert len(cell) == 1, (run["method"], expected)


def test_schema_refuses_an_unknown_outcome():
    runs = pd.DataFrame([{c: "x" for c in schema.RUN_COLUMNS} | {"status": "ok",
                                                                  "outcome": "fine"}])
    with pytest.raises(schema.SchemaError, match="unknown outcome"):
        schema.validate_runs(runs)
    schema.validate_runs(runs.assign(outcome="stuck"))
