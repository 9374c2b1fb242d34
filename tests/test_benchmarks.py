"""Smoke checks of the benchmark scripts: each runs with ``--quick`` in a subprocess.

No timing is asserted (timings belong in benchmarks/README.md): a script passes when it exits 0
and its last stdout line is its one JSON object, naming the benchmark, with ``settings``,
``results`` and a well-formed ``goals`` list of {goal, value, met}. ``ensemble.py`` runs with
``--profile --reproduce`` so that its profile and its tiny grid comparison are exercised too.
Together they take 1-2 minutes on 2 busy cores, so they are marked slow
(``pytest -m slow tests/test_benchmarks.py``).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
HAVE_PYRO = importlib.util.find_spec("pyro") is not None

pytestmark = pytest.mark.slow


def run_script(args: list[str], *, block_pyro: bool = False) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(BENCH.parent))
    if block_pyro:  # as if the optional `bench` extra were not installed
        code = ("import runpy, sys; sys.modules['pyro'] = None; sys.argv = sys.argv[1:]; "
                "runpy.run_path(sys.argv[0], run_name='__main__')")
        cmd = [sys.executable, "-c", code, *args]
    else:
        cmd = [sys.executable, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env,
                          cwd=BENCH.parent, check=False)


def last_json(out: subprocess.CompletedProcess, name: str) -> dict:
    """The contract: exit 0, one JSON object, on the last line, with the common keys."""
    assert out.returncode == 0, f"exit {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    lines = [line for line in out.stdout.splitlines() if line.strip()]
    assert lines, "no output"
    objects = []
    for line in lines:
        if line.lstrip().startswith("{"):
            try:
                objects.append((line, json.loads(line)))
            except json.JSONDecodeError:
                continue
    assert len(objects) == 1, f"expected one JSON line, got {len(objects)}"
    assert objects[0][0] == lines[-1], "the JSON line must be the last line"
    result = objects[0][1]
    assert isinstance(result, dict)
    assert result["benchmark"] == name
    assert isinstance(result["settings"], dict) and result["settings"]
    assert result["results"]
    goals = result["goals"]
    assert isinstance(goals, list) and goals
    for g in goals:
        assert isinstance(g["goal"], str) and g["goal"]
        assert isinstance(g["value"], int | float) and not isinstance(g["value"], bool)
        assert not math.isnan(g["value"])
        assert g["met"] in (True, False, None)
    return result


@pytest.mark.parametrize(("name", "extra"), [
    ("scaling", []),
    ("gradvar", []),
    ("ais", []),
    ("long_schedule", []),
    ("families", []),
    ("ensemble", ["--profile", "--profile-top", "5", "--reproduce"]),
])
def test_quick_run_prints_one_json_line(name: str, extra: list[str]) -> None:
    result = last_json(run_script([str(BENCH / f"{name}.py"), "--quick", *extra]), name)
    if name == "ensemble":
        assert set(result["profile"]) == {"amortized", "vem"}
        assert result["reproduce"]["all_exit_0"]
        assert any(g["goal"].startswith("grids") for g in result["goals"])


@pytest.mark.skipif(not HAVE_PYRO, reason="pyro-ppl not installed: the Pyro-missing test below "
                                          "covers the script")
def test_train_throughput_quick_with_pyro() -> None:
    result = last_json(run_script([str(BENCH / "train_throughput.py"), "--quick"]),
                       "train_throughput")
    assert result["settings"]["pyro"] is True
    assert {r["contender"] for r in result["results"]} == {"ours", "hand", "pyro", "pyro-nv"}


def test_train_throughput_skips_pyro_when_missing() -> None:
    out = run_script([str(BENCH / "train_throughput.py"), "--quick"], block_pyro=True)
    result = last_json(out, "train_throughput")
    assert result["settings"]["pyro"] is False
    assert "Pyro contender skipped" in out.stderr
    assert {r["contender"] for r in result["results"]} == {"ours", "hand"}
