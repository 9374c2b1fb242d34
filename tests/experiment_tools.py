"""Helpers shared by the experiment-layer tests (test_runner, test_cli, test_reliability).

Tiny grids: 8-unit networks, 2 epochs, 256-point batches on digits, so that a sweep of a few
cells takes about a second in-process. Subprocesses (``python -m experiments``) are for what
needs a real process: SIGKILL, resource limits, an import guard.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from experiments.cli import main
from experiments.grids import deep_merge

ROOT = Path(__file__).resolve().parents[1]

#: a partial run configuration that trains in well under a second per ensemble
TINY_BASE: dict[str, Any] = {
    "data": {"name": "digits"},
    "model": {"hidden": [8], "latent_dim": 2},
    "method": {"encoder_hidden": [8], "heldout": {"max_steps": 10, "window": 5, "patience": 1}},
    "training": {"max_epochs": 2, "batch_size": 256, "stopping": None,
                 "eval_splits": ["train", "test"]},
}
TINY_AXES: dict[str, list] = {"method.name": ["vem", "amortized"], "seed": [0, 1]}

#: columns that hold times, hosts or commands: they differ between two identical runs
TIMING = ["wall_s"]
RUN_TIMING = ["started", "finished", "run_seconds", "seconds_per_epoch", "hostname",
              "seconds_per_epoch_alone", "seconds_per_epoch_ensemble", "run_seconds_alone",
              "git_commit", "git_dirty", "command", "ensemble", "ensemble_size",
              "ensemble_cpu_seconds", "ensemble_wall_seconds", "resumed"]


def grid_dict(name: str = "g", *, base: dict | None = None, axes: dict | None = None,
              **top: Any) -> dict[str, Any]:
    """A tiny grid as a dict: ``base`` is merged into ``TINY_BASE`` (nested or dotted keys),
    ``axes`` replaces ``TINY_AXES``, any other key is set at the top level."""
    grid = {"name": name, "description": "test grid", "cost": "1 s", "lr": "grid",
            "base": deep_merge(TINY_BASE, base or {}), "axes": axes or dict(TINY_AXES)}
    grid.update(top)
    return grid


def tiny_grid(folder: Path, name: str = "g", **changes: Any) -> Path:
    """Write ``grid_dict(name, **changes)`` to ``folder/<name>.json``; return its path."""
    path = Path(folder) / f"{name}.json"
    path.write_text(json.dumps(grid_dict(name, **changes)))
    return path


def csv_rows(path: Path, drop: tuple[str, ...] = ("wall_s",)) -> list[list[str]]:
    """A CSV's fields as written (text, no float parsing), the ``drop`` columns removed."""
    with Path(path).open(newline="") as f:
        rows = list(csv.reader(f))
    keep = [i for i, c in enumerate(rows[0]) if c not in drop]
    return [[r[i] for i in keep] for r in rows]


def run_dirs(results: Path, experiment: str = "g") -> list[Path]:
    return sorted((Path(results) / experiment / "runs").iterdir())


def provenance(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "provenance.json").read_text())


def set_status(run_dir: Path, status: str) -> None:
    """Edit a run's provenance as if it had ended otherwise (e.g. ``running``: killed)."""
    prov = provenance(run_dir)
    prov["status"] = status
    (Path(run_dir) / "provenance.json").write_text(json.dumps(prov))


def env() -> dict[str, str]:
    """The environment of a ``python -m experiments`` subprocess (this checkout first)."""
    out = dict(os.environ)
    out["PYTHONPATH"] = str(ROOT) + os.pathsep + out.get("PYTHONPATH", "")
    out["MPLBACKEND"] = "Agg"
    return out


def start(argv: list[str], cwd: Path, **kwargs: Any) -> subprocess.Popen:
    """``python -m experiments ARGV`` in the background."""
    return subprocess.Popen([sys.executable, "-m", "experiments", *argv], cwd=cwd, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            **kwargs)


def wait_for(condition, timeout: float, what: str, proc: subprocess.Popen | None = None
             ) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"the process ended before {what}:\n{out}\n{err}")
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.02)


def kill(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()


def _stat(pid: int | str) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (state first), or None."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie (Linux /proc)."""
    fields = _stat(pid)
    return fields is not None and fields[0] not in ("Z", "X")


def children(pid: int) -> list[int]:
    """The live child processes of ``pid`` (Linux /proc)."""
    out = []
    for entry in Path("/proc").iterdir():
        fields = _stat(entry.name) if entry.name.isdigit() else None
        if fields is not None and int(fields[1]) == pid and fields[0] not in ("Z", "X"):
            out.append(int(entry.name))
    return out


def files_under(folder: Path) -> list[Path]:
    return sorted(p.relative_to(folder) for p in Path(folder).rglob("*"))


def refused(capsys, argv: list[str], expected: str, cwd: Path) -> str:
    """Run ``main(argv)`` in ``cwd`` and assert the contract of a wrong request: exit status 2,
    one ``error:`` line that holds ``expected`` and ends the output, no traceback, and no file
    or folder created or removed under ``cwd``. Returns the error line."""
    before = files_under(cwd)
    here = Path.cwd()
    os.chdir(cwd)
    try:
        capsys.readouterr()
        code = main(argv)
    finally:
        os.chdir(here)
    out, err = capsys.readouterr()
    assert code == 2, f"exit {code}\n{out}\n{err}"
    lines = err.rstrip("\n").splitlines()
    assert lines and lines[-1].startswith("error: "), err
    assert err.count("error:") == 1 and "Traceback" not in err + out, err
    assert expected in lines[-1], err
    assert files_under(cwd) == before, "a refused request created or removed files"
    return lines[-1]


@contextlib.contextmanager
def read_only(folder: Path) -> Iterator[None]:
    """Make ``folder`` unwritable for this process: mode 0555, and for root (whom modes do
    not stop) the immutable attribute; skip the test where neither works."""
    folder = Path(folder)
    mode = folder.stat().st_mode
    folder.chmod(0o555)
    immutable = False
    if os.access(folder, os.W_OK):
        immutable = shutil.which("chattr") is not None and subprocess.run(
            ["chattr", "+i", str(folder)], capture_output=True).returncode == 0
        if not immutable:
            folder.chmod(mode)
            pytest.skip("cannot make a folder read-only for this user here")
    try:
        yield
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
        folder.chmod(mode)


#: code run in a fresh interpreter before ``main``: importing torch, or any part of the library
#: but its standard-library modules ``vi.files`` and ``vi.contract``, raises
NO_TORCH = ("import sys\n"
            "class _NoTorch:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] == 'torch' or (name.startswith('vi.')\n"
            "                and name not in ('vi.files', 'vi.contract')):\n"
            "            raise ImportError('imported ' + name)\n"
            "sys.meta_path.insert(0, _NoTorch())\n"
            "from experiments.cli import main\n")
#: code run after ``main`` under ``NO_TORCH``: fails if anything heavy got imported after all
NO_TORCH_AFTER = ("heavy = [m for m in sys.modules if m.split('.')[0] == 'torch'\n"
                  "         or (m.startswith('vi.') and m not in ('vi.files', 'vi.contract'))]\n"
                  "assert not heavy, heavy\n")
