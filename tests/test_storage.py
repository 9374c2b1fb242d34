"""Large published tables are stored gzipped (``<name>.csv.gz``): aggregation writes them with a
manifest of the bytes on disk, every reader finds them by their CSV name, ``check`` verifies
them, and a later aggregation that writes the plain form removes the other."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pandas as pd
import pytest
from experiment_tools import tiny_grid

from experiments import aggregate as agg
from experiments import checks
from experiments.cli import main
from experiments.schema import read_metrics, read_runs, stored
from experiments.summary import load_runs, read_csv


@pytest.fixture
def packed(tmp_path: Path, monkeypatch) -> Path:
    """A tiny experiment aggregated with a threshold that gzips its metrics.csv."""
    monkeypatch.setattr(agg, "GZIP_ABOVE", 2_000)
    grid, results = tiny_grid(tmp_path), tmp_path / "results"
    assert main(["run", str(grid), "--results", str(results)]) == 0
    return results / "g"


def test_a_large_table_is_gzipped_and_read_by_its_csv_name(packed: Path) -> None:
    assert (packed / "metrics.csv.gz").is_file() and not (packed / "metrics.csv").exists()
    assert (packed / "runs.csv").is_file()  # never gzipped
    assert stored(packed / "metrics.csv") == packed / "metrics.csv.gz"
    manifest = json.loads((packed / "manifest.json").read_text())["files"]
    assert "metrics.csv.gz" in manifest and "metrics.csv" not in manifest
    plain = pd.concat([pd.read_csv(p / "metrics.csv") for p in sorted((packed / "runs").iterdir())
                       if p.is_dir()])
    metrics = read_metrics(packed / "metrics.csv")
    assert manifest["metrics.csv.gz"]["rows"] == len(metrics) == len(plain)
    assert read_csv(packed / "metrics.csv").shape == metrics.shape
    runs = load_runs(packed.parent, "g")
    assert runs["final_elbo_test"].notna().all()
    assert len(read_runs(packed / "runs.csv")) == 4
    assert checks.check_results(packed.parent)[1] == []
    # deterministic bytes: no time stamp or file name in the gzip header
    raw = (packed / "metrics.csv.gz").read_bytes()
    assert raw[4:8] == b"\0\0\0\0" and not raw[3] & 0x08


def test_check_reports_a_damaged_gzipped_table(packed: Path) -> None:
    path = packed / "metrics.csv.gz"
    text = gzip.decompress(path.read_bytes()).decode()
    path.write_bytes(gzip.compress(text.replace("elbo", "elbo", 1)[:-200].encode(), mtime=0))
    problems = checks.check_results(packed.parent)[1]
    assert any("metrics.csv.gz" in p and "checksum" in p for p in problems), problems


def test_the_plain_form_replaces_the_gzipped_one(packed: Path, monkeypatch) -> None:
    monkeypatch.setattr(agg, "GZIP_ABOVE", 10**9)
    agg.aggregate(packed)
    assert (packed / "metrics.csv").is_file() and not (packed / "metrics.csv.gz").exists()
    assert checks.check_results(packed.parent)[1] == []
