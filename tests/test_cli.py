"""The command line's other commands: list, data, evaluate, check, figures, reproduce; and that
``list``, ``check`` and ``figures`` never import torch or the training code."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from experiment_tools import (
    NO_TORCH,
    NO_TORCH_AFTER,
    env,
    read_only,
    run_dirs,
    tiny_grid,
)

from experiments.cli import main
from experiments.grids import available, load_grid
from experiments.runner import prepare
from experiments.schema import read_metrics
from vi.data import load_dataset, load_npz
from vi.probes import PROBES


def test_list_names_every_experiment_with_its_cost(capsys) -> None:
    assert main(["list"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in out] == list(available())
    for line, name in zip(out, available(), strict=True):
        g = load_grid(name)
        assert g.cost in line and g.description[:30] in line


def test_data_writes_the_exact_dataset_a_run_uses(tmp_path: Path, capsys) -> None:
    out = tmp_path / "sub" / "ppca.npz"
    old = os.umask(0o027)
    try:
        assert main(["data", "ppca", "--seed", "3", "--option", "n=300", "--option",
                     "noise_std=0.2", "--out", str(out)]) == 0
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o640  # as any new file under that umask
    assert [p.name for p in out.parent.iterdir()] == ["ppca.npz"]  # no temporary left
    back = load_npz(out)
    same = load_dataset("ppca", seed=3, test_fraction=0.2, validation_fraction=0.1, n=300,
                        noise_std=0.2)
    for split in ("train", "validation", "test"):
        assert torch.equal(back.split(split), same.split(split))
    for key, value in same.ground_truth.items():
        assert torch.equal(back.ground_truth[key], value)
    assert str(out) in capsys.readouterr().out


def test_evaluate_prints_the_checkpoint_elbo(tmp_path: Path, capsys) -> None:
    grid = tiny_grid(tmp_path, axes={"method.name": ["amortized"], "seed": [0]},
                     base={"training.max_epochs": 1})
    results = tmp_path / "r"
    assert main(["run", str(grid), "--results", str(results)]) == 0
    (run_dir,) = run_dirs(results)
    capsys.readouterr()
    out_csv = tmp_path / "e.csv"
    assert main(["evaluate", str(run_dir / "checkpoint.pt"), "--out", str(out_csv)]) == 0
    out = capsys.readouterr().out
    assert "elbo" in out and "test" in out and run_dir.name in out
    rows = pd.read_csv(out_csv)
    assert rows[["split", "metric"]].values.tolist() == [["train", "elbo"], ["test", "elbo"]]
    # the run's own final evaluation, measured again from its checkpoint
    own = pd.read_csv(run_dir / "metrics.csv")
    own = own[(own["metric"] == "elbo") & (own["epoch"] == own["epoch"].max())]
    assert rows["value"].tolist() == pytest.approx(own["value"].tolist(), rel=1e-6)


def test_check_reports_clean_results_and_problems(tmp_path: Path, capsys) -> None:
    results = tmp_path / "r"
    results.mkdir()
    assert main(["check", "--results", str(results)]) == 0
    assert "no problems" in capsys.readouterr().out
    (results / "x").mkdir()
    (results / "x" / "metrics.csv").write_text("run_id,value\nabc,1\n")
    assert main(["check", "--results", str(results)]) == 1
    assert "missing column(s)" in capsys.readouterr().err


def test_list_check_and_figures_never_import_torch(tmp_path: Path) -> None:
    """In a fresh interpreter where importing torch (or the library beyond ``vi.files``)
    raises: ``list`` works, ``check`` validates finished runs, and ``figures`` refuses a
    missing experiment with a usage error, not an ImportError."""
    results = tmp_path / "r"
    assert main(["run", str(tiny_grid(tmp_path)), "--results", str(results)]) == 0
    code = (NO_TORCH
            + "assert main(['list']) == 0\n"
            + f"assert main(['check', '--results', {str(results)!r}]) == 0\n"
            + f"assert main(['figures', '--results', {str(results)!r}, 'elbo_curves']) == 2\n"
            + NO_TORCH_AFTER)
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env(),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "no problems" in out.stdout and "no results for elbo_curves" in out.stderr


@pytest.mark.slow
def test_figures_draw_without_torch_and_fail_loudly(tmp_path: Path) -> None:
    """``figures`` draws a (tiny) elbo_curves from its CSVs alone with torch unimportable, and
    exits 1, naming the failure, when a figure cannot be written (read-only folder)."""
    pytest.importorskip("experiments.figures")
    results = tmp_path / "r"
    grid = tiny_grid(tmp_path, "elbo_curves")
    assert main(["run", str(grid), "--results", str(results)]) == 0
    figures = results / "elbo_curves" / "figures"
    figures.mkdir()
    code = (NO_TORCH + "import sys\n"
            + f"rc = main(['figures', '--results', {str(results)!r}, 'elbo_curves'])\n"
            + NO_TORCH_AFTER + "sys.exit(rc)\n")

    def figures_command() -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env(),
                              capture_output=True, text=True, timeout=600)

    with read_only(figures):
        failed = figures_command()
    assert failed.returncode == 1, failed.stderr
    assert "could not be drawn" in failed.stderr  # (the figure module logs the traceback)
    drawn = figures_command()
    assert drawn.returncode == 0, drawn.stderr
    assert list(figures.glob("*.png"))


@pytest.mark.slow
def test_reproduce_quick_regenerates_everything(tmp_path: Path, capsys) -> None:
    """The main job at --quick scale: every experiment, the references, the figures, the
    summary; a figure that cannot be written (a read-only folder) makes it exit 1 after doing
    everything else; the results check clean, every file has the umask's mode, and the
    recorded command is the one given."""
    pytest.importorskip("experiments.figures")
    results = tmp_path / "r"
    figures = results / "elbo_curves" / "figures"
    figures.mkdir(parents=True)
    with read_only(figures):
        assert main(["reproduce", "--quick", "--results", str(results)]) == 1
    err = capsys.readouterr().err
    assert "could not be drawn" in err and "elbo_curves" in err
    for name in available():
        assert (results / name / "metrics.csv").is_file()
        assert (results / name / "runs.csv").is_file()
    assert (results / "summary.csv").is_file() and (results / "references.csv").is_file()
    assert list((results / "ppca_exact" / "figures").glob("*.png"))
    for name in available():  # each probe's tables, and the selection's
        cells = prepare(load_grid(name), results, scale="quick")
        tables = {t for c in cells for p in c.config["probes"] for t in PROBES[p].tables
                  if t not in PROBES[p].optional_tables}
        tables |= {"selected", "candidates"} if name == "lr_selection" else set()
        present = {p.stem for p in (results / name).glob("*.csv")}
        assert tables <= present, (name, tables - present)
    metrics = read_metrics(results / "ppca_exact" / "metrics.csv")
    assert {"log_px_exact", "approximation_gap"} <= set(metrics["metric"])
    assert main(["check", "--results", str(results)]) == 0
    modes = {p.relative_to(results): oct(p.stat().st_mode & 0o777)
             for p in results.rglob("*") if p.is_file()}
    assert set(modes.values()) == {oct(0o666 & ~_umask())}, modes
    command = pd.read_csv(results / "elbo_curves" / "runs.csv")["command"].iloc[0]
    assert shlex.split(command) == ["python", "-m", "experiments", "reproduce", "--quick",
                                    "--results", str(results)]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask



def test_figures_that_fail_are_one_line_each(tmp_path: Path) -> None:
    """Figures that raise are reported in one line each (no traceback), the others are still
    drawn, and the exit status is 1."""
    results = tmp_path / "r"
    assert main(["run", str(tiny_grid(tmp_path)), "--results", str(results)]) == 0
    code = ("import sys\n"
            "import experiments.figures.make as make\n"
            "def broken(res):\n"
            "    raise RuntimeError('cannot draw\\nsecond line of the message')\n"
            "    yield\n"
            "fns = []\n"
            "for i in range(5):\n"
            "    def f(res, broken=broken):\n"
            "        return broken(res)\n"
            "    f.__name__ = f'fig_{i}'\n"
            "    fns.append(f)\n"
            "make.figure_makers = lambda name: fns\n"
            "from experiments.cli import main\n"
            f"sys.exit(main(['figures', '--results', {str(results)!r}]))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env(),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 1, out.stderr
    assert "Traceback" not in out.stderr and "second line" not in out.stderr, out.stderr
    lines = out.stderr.strip().splitlines()
    assert lines[0] == "error: 5 figure(s) could not be drawn (the others were):", out.stderr
    assert lines[1:] == [f"  g: fig_{i}: RuntimeError: cannot draw" for i in range(5)]
