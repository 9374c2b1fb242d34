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

    from experiments.cells import SELECTION, prepare
    from experiments.checks import add_to_manifest

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


# ---------------------------------------------------------------------- one place per extension
# Each toy is added the way a newcomer would, through the public registry of its kind only (an
# estimator in vi.estimators.ESTIMATORS, a method by subclassing vi.inference.InferenceMethod,
# a probe by subclassing vi.probes.ProbeBase, which declares its metric in vi.contract), then run
# through a custom grid with --quick, figures, summary and findings: nothing else is edited.


@pytest.fixture
def registries():
    """Remove whatever a test registered in the public registries afterwards."""
    from vi import contract, estimators, inference, probes

    saved = [(r, dict(r)) for r in (estimators.ESTIMATORS, inference.METHODS, probes.PROBES,
                                     contract.PROBES, contract.METRICS, contract.TABLES,
                                     contract.ESTIMATORS)]
    yield
    for registry, before in saved:
        registry.clear()
        registry.update(before)


def _extension_run(tmp_path: Path, axes: dict, probes: dict | None = None) -> Path:
    """A custom grid without scales or figure module, run with --quick, then figures (which
    writes the summary and the findings too) and findings again; every command succeeds."""
    from experiments.cli import main

    grid = _write(tmp_path, {
        "name": "ext", "description": "an extension", "cost": "1 s", "lr": "grid",
        "base": {"data": {"name": "digits", "validation_fraction": 0.1},
                 "model": {"latent_dim": 2}, "training": {"batch_size": 256},
                 "method": {"refine_steps": 2}},
        "axes": {**axes, "seed": [0, 1]}, "probes": probes or {}})
    results = tmp_path / "r"
    assert main(["run", str(grid), "--quick", "--results", str(results)]) == 0
    assert main(["figures", "--results", str(results)]) == 0
    assert main(["findings", "--results", str(results)]) == 0
    assert main(["check", "--results", str(results)]) == 0
    figures = sorted(p.name for p in (results / "ext" / "figures").glob("*.png"))
    assert {"elbo_vs_epoch.png", "final_elbo.png"} <= set(figures), figures
    assert (results / "FINDINGS.md").is_file()
    return results


@pytest.mark.slow
def test_a_toy_estimator_is_one_registry_entry(tmp_path: Path, registries) -> None:
    """An estimator registered in ``vi.estimators.ESTIMATORS`` (here the pathwise gradient
    scaled by 1/2 through a stop-gradient: same value, half the gradient) trains, is drawn,
    summarised and reported."""
    import pandas as pd

    from vi import estimators

    def half(f, lam, eps, baseline="none", baseline_value=None):
        full = estimators.reparam(f, lam, eps, baseline, baseline_value)
        surrogate = 0.5 * full.surrogate + 0.5 * full.surrogate.detach()
        return estimators.Estimate(surrogate, full.samples)

    estimators.ESTIMATORS["half"] = estimators.Estimator(
        half, {"none": 1}, drops_direct=False, higher_order=False, biased=True)
    results = _extension_run(tmp_path, {
        "method.name": ["amortized"],
        "estimator": [{"method.estimator": "reparam"}, {"method.estimator": "half"}]})
    runs = pd.read_csv(results / "ext" / "runs.csv")
    assert sorted(runs["estimator"]) == ["half", "reparam"] and (runs["status"] == "ok").all()
    summary = pd.read_csv(results / "summary.csv")
    assert set(summary.loc[summary["experiment"] == "ext", "estimator"]) == {"half", "reparam"}


@pytest.mark.slow
def test_a_toy_method_that_refines_only_at_test_time(tmp_path: Path, registries) -> None:
    """A method subclassing the VAE whose own posterior for new points is the encoder's output
    refined by ``refine_steps`` gradient steps, while training is the plain VAE's: it describes
    itself by its traits (``refines_at_inference`` only), its step sizes follow from them, and
    it runs, is drawn, summarised and reported. Trained on the same streams as ``amortized``,
    its training ELBOs are the VAE's bit for bit and only its held-out numbers differ."""
    import pandas as pd
    import torch

    from vi.inference import Amortized, frozen

    class TestTimeRefined(Amortized):
        name = "test_time_refined"
        refines_at_inference = True

        def infer(self, x, random):
            with torch.no_grad():
                lam0 = self.encoder(x)
            with frozen(self.decoder):
                lam = self.local_ascent(x, lam0, random, self.settings.refine_steps)
            return lam.detach(), None

    assert TestTimeRefined.step_sizes == ("lr", "encoder_lr", "refine_lr")
    results = _extension_run(tmp_path, {"method.name": ["amortized", "test_time_refined"]})
    runs = pd.read_csv(results / "ext" / "runs.csv").set_index(["method", "seed"])
    assert (runs["status"] == "ok").all()
    metrics = pd.read_csv(results / "ext" / "metrics.csv")
    running = metrics[metrics["metric"] == "elbo_running"].pivot_table(
        index=["seed", "epoch"], columns="method", values="value")
    assert (running["amortized"] == running["test_time_refined"]).all()  # same training
    final = runs["final_elbo_test"]
    assert (final.loc["test_time_refined"] != final.loc["amortized"]).all()  # refined q


@pytest.mark.slow
def test_a_toy_probe_is_one_class(tmp_path: Path, registries) -> None:
    _toy_probe_run(tmp_path)


def _toy_probe_run(tmp_path: Path) -> Path:
    """A probe subclassing ``vi.probes.ProbeBase`` with its metric described in the class (the
    mean of the posterior's log-variances over a split) is declared in the results contract,
    validated before training, recorded, and readable by figures, summary and findings."""
    from dataclasses import dataclass

    import pandas as pd
    import torch

    from vi import probes
    from vi.training import ProbeResult

    class MeanLogVar(probes.ProbeBase):
        name = "mean_logvar"
        metrics = {"mean_logvar": "mean over points and dimensions of log σ² of the "  # noqa: RUF012
                                  "method's own posterior (nats)"}

        @dataclass(frozen=True)
        class Options(probes.ProbeBase.Options):
            split: str = "test"

        def __call__(self, ctx):
            with torch.no_grad():
                lam, _ = ctx.method.infer(ctx.x[self.options.split], ctx.random(self.name))
            h = lam.shape[-1] // 2
            value = lam[..., h:].mean(dim=(1, 2))
            return ProbeResult([{"split": self.options.split, "metric": "mean_logvar",
                                 "value": [float(v) for v in value]}])

    results = _extension_run(tmp_path, {"method.name": ["vem", "amortized"]},
                             probes={"mean_logvar": {"split": "test"}})
    metrics = pd.read_csv(results / "ext" / "metrics.csv")
    mine = metrics[metrics["metric"] == "mean_logvar"]
    assert len(mine) == 2 and mine["value"].notna().all()  # 2 methods x the quick seed, final
    return results


@pytest.mark.slow
def test_a_toy_probes_results_are_read_by_a_fresh_process(tmp_path: Path, registries) -> None:
    """The contract travels with the results: a process that never imported the probe's
    module checks them, draws them and reports them (the metric's declaration is in the
    experiment's contract.json and in each run's provenance)."""
    import subprocess
    import sys

    from experiment_tools import env

    results = _toy_probe_run(tmp_path)
    recorded = json.loads((results / "ext" / "contract.json").read_text())
    assert recorded["metrics"]["mean_logvar"].startswith("mean over points and dimensions")
    assert "contract.json" in json.loads((results / "ext" / "manifest.json").read_text())["files"]
    for command in ("check", "figures", "findings"):
        out = subprocess.run([sys.executable, "-m", "experiments", command, "--results",
                              str(results)], env=env(), capture_output=True, text=True,
                             timeout=300)
        assert out.returncode == 0, (command, out.stdout, out.stderr)
        assert "unknown metric" not in out.stdout + out.stderr, command


# ------------------------------------------------------------------------ plugin modules

_PLUGIN = '''
from dataclasses import dataclass

import torch

from vi import probes
from vi.training import ProbeResult


class PluginProbe(probes.ProbeBase):
    name = "plugin_probe"
    metrics = {"plugin_mean_mu": "mean over points and dimensions of the posterior mean"}

    @dataclass(frozen=True)
    class Options(probes.ProbeBase.Options):
        split: str = "test"

    def __call__(self, ctx):
        with torch.no_grad():
            lam, _ = ctx.method.infer(ctx.x[self.options.split], ctx.random(self.name))
        value = lam[..., : lam.shape[-1] // 2].mean(dim=(1, 2))
        return ProbeResult([{"split": self.options.split, "metric": "plugin_mean_mu",
                             "value": [float(v) for v in value]}])
'''


@pytest.mark.parametrize("plugin, where, message", [
    ("no_such_plugin_module", "option", "plugin 'no_such_plugin_module' cannot be imported "
                                        "(ModuleNotFoundError"),
    ("not a module", "option", "'not a module' is not a module name"),
    ("no_such_plugin_module", "env", "plugin 'no_such_plugin_module' cannot be imported"),
])
def test_a_plugin_that_cannot_be_imported_is_one_message(tmp_path: Path, capsys, monkeypatch,
                                                          plugin, where, message) -> None:
    from experiments.cli import main

    grid = _write(tmp_path, {"name": "p", "description": "d", "cost": "1 s",
                             "base": {}, "axes": {"seed": [0]}})
    argv = ["run", str(grid), "--quick", "--results", str(tmp_path / "r")]
    if where == "env":
        monkeypatch.setenv("VI_PLUGINS", f" {plugin} ,")
    else:
        argv += ["--plugin", plugin]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()  # nothing written


def test_plugin_names_come_from_the_environment_then_the_options(monkeypatch) -> None:
    import os

    from experiments import plugins

    monkeypatch.setenv(plugins.ENV, "a.b, c")
    assert plugins.names(["c", "d"]) == ["a.b", "c", "d"]
    monkeypatch.delenv(plugins.ENV)
    with plugins.exported(["x", "y.z"]):
        assert os.environ[plugins.ENV] == "x,y.z"
    assert plugins.ENV not in os.environ


@pytest.mark.slow
def test_a_plugin_module_reaches_the_worker_processes(tmp_path: Path, registries,
                                                      monkeypatch) -> None:
    """A probe in a module of its own, named by --plugin, runs in --jobs 2 worker processes
    (fresh interpreters: without the plugin they would not know the probe), and a fresh
    process checks its results without the plugin."""
    import subprocess
    import sys

    import pandas as pd
    from experiment_tools import env

    from experiments.cli import main

    (tmp_path / "vi_toy_plugin.py").write_text(_PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))  # spawned workers inherit sys.path
    monkeypatch.delitem(sys.modules, "vi_toy_plugin", raising=False)
    grid = _write(tmp_path, {
        "name": "plug", "description": "d", "cost": "1 s", "lr": "grid",
        "base": {"data": {"name": "digits", "validation_fraction": 0.1},
                 "model": {"latent_dim": 2}, "training": {"batch_size": 256}},
        "axes": {"method.name": ["vem", "amortized"], "seed": [0]},
        "probes": {"plugin_probe": {}}})
    results = tmp_path / "r"
    assert main(["run", str(grid), "--quick", "--jobs", "2", "--plugin", "vi_toy_plugin",
                 "--results", str(results)]) == 0
    sys.modules.pop("vi_toy_plugin", None)
    runs = pd.read_csv(results / "plug" / "runs.csv")
    assert (runs["status"] == "ok").all() and len(runs) == 2
    assert len(set(runs["ensemble"])) == 2  # two ensembles: each in a worker process
    metrics = pd.read_csv(results / "plug" / "metrics.csv")
    assert metrics["metric"].eq("plugin_mean_mu").sum() == 2
    out = subprocess.run([sys.executable, "-m", "experiments", "check", "--results",
                          str(results)], env=env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
