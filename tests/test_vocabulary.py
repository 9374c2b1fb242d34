"""The plot-free vocabulary (``experiments.vocabulary``): names, orders, labels, markers, line
styles and colours with defaults for names it does not know, one experiment order (the grids'),
and a summary and findings that load no plotting library."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from experiments import vocabulary as V
from experiments.grids import available

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("module", ["experiments.summary", "experiments.findings",
                                    "experiments.vocabulary"])
def test_summary_findings_and_vocabulary_load_no_plotting(module: str) -> None:
    code = (f"import sys, json, {module}\n"
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('matplotlib', 'seaborn') or m.startswith('experiments.figures'))))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True)
    assert json.loads(out.stdout) == []


def test_a_method_it_does_not_know_gets_its_own_line_style_and_word() -> None:
    known = {V.method_style(m) for m in V.METHOD_ORDER}
    assert len(known) == len(V.METHOD_ORDER)
    for name in ("fifth", "toy_method", "iterative_amortized"):
        style = V.method_style(name)
        assert style not in known and V.method_style(name) == style  # stable
        assert V.style_word(style) not in ("custom", "None") and style in V.LINE_STYLES
        assert V.method_name(name) == name and V.method_colour(name).startswith("#")
    assert V.style_word("--") == "dashed" and V.style_word(None) == "custom"


def test_an_estimator_label_follows_the_estimators_declared_baselines(monkeypatch) -> None:
    """An estimator that declares a baseline besides none shows its baseline, even none; one
    that declares none, or that no recorded contract declares, only a baseline it was given.
    The declarations are the library registry's, as a run records them."""
    from vi import contract
    from vi.estimators import ESTIMATORS

    recorded = contract.record(estimators={n: e.baselines for n, e in ESTIMATORS.items()})
    for name, baselines in recorded["estimators"].items():
        monkeypatch.setitem(contract.ESTIMATORS, name, tuple(baselines))
        label = V.estimator_label(name, "none")
        assert label == (f"{name}+none" if ESTIMATORS[name].accepts_baseline else name)
    assert V.estimator_label("score", float("nan")) == "score+none"
    assert V.estimator_label("reparam", None) == "reparam"
    monkeypatch.setitem(contract.ESTIMATORS, "mine", ("mean", "none"))
    assert V.estimator_label("mine", "none") == "mine+none"
    assert V.estimator_label("mine", "mean") == "mine+mean"


def test_an_estimator_it_does_not_know_gets_a_marker_and_a_spare_colour() -> None:
    assert V.estimator_label("dreg", "none") == "dreg"
    assert V.estimator_label("vimco", "loo") == "vimco+loo"
    assert V.marker_of("dreg") not in V.LABEL_MARKERS.values()
    assert V.marker_of("reparam, KL MC") == V.LABEL_MARKERS["reparam"]
    colours = V.palette(["dreg", "reparam", "score+none", "vimco+loo"])
    assert list(colours) == ["reparam", "score+none", "dreg", "vimco+loo"]
    assert colours["reparam"] == V.LABEL_COLOURS["reparam"]
    assert colours["dreg"] != colours["vimco+loo"]
    assert not {colours["dreg"], colours["vimco+loo"]} & set(V.LABEL_COLOURS.values())


def test_one_experiment_order_the_grids() -> None:
    from experiments import figures, summary

    grids = list(available())
    assert V.experiment_order() == grids
    assert list(figures.EXPERIMENTS) == [e for e in grids if e in figures.EXPERIMENTS]
    assert [m.__name__.rsplit(".", 1)[1] for m in figures.MODULES] == list(figures.EXPERIMENTS)
    assert V.experiment_order(["zzz", "mnist_curves", "aaa", "elbo_curves"]) == [
        "elbo_curves", "mnist_curves", "aaa", "zzz"]
    assert not hasattr(summary, "EXPERIMENT_ORDER")


def test_figures_of_a_fifth_method_draw_and_name_its_line_style(tmp_path: Path) -> None:
    """refinement (hue = method) and mnist_curves (line style = method) with a method the
    vocabulary does not know: drawn, legend naming its style."""
    import pandas as pd
    from test_figures import curves, gaps, ident, mrow, pictures, run, save

    from experiments.figures import fig_mnist_curves, fig_refinement, load_experiment

    rows, runs, table = [], [], []
    for m, k, s in ((m, k, s) for m in ("semi_amortized", "toy_method") for k in (1, 5)
                    for s in (0, 1)):
        i = ident("refinement", "digits", m, "reparam", 5, s, f"-r{k}")
        runs.append(run(i, **{"method.refine_steps": k, "seconds_per_epoch": 0.1 * k,
                              "final_elbo_test": -100.0 + k - s}))
        rows += curves(i, "reparam", s, 5, False)
        table += gaps(i, "test", 2.0, 1.0 / k, False)
    save(tmp_path, "refinement", rows, runs, gaps=table)
    rows, runs, images = [], [], []
    for m in ("vem", "amortized", "semi_amortized", "sa_vae", "toy_method"):
        i = ident("mnist_curves", "mnist5k", m, "reparam", 5, 0)
        runs.append(run(i, final_elbo_train=-95.0, final_elbo_test=-100.0,
                        final_active_units_test=3, data_dim=784, levels=256))
        rows += [*curves(i, "reparam", 0, 5, False), mrow(i, 4, "active_units", 3)]
        images += pictures(i)
    save(tmp_path, "mnist_curves", rows, runs, images=images)
    pd.DataFrame(columns=["dataset", "data_seed", "model", "latent_dim", "split", "n_points",
                          "log_px", "log_px_se", "test_fraction", "validation_fraction"]
                 ).to_csv(tmp_path / "references.csv", index=False)

    def legend(fig) -> list[str]:
        return [t.get_text() for lg in fig.legends for t in lg.get_texts()]

    ((_, fig),) = list(fig_refinement(load_experiment(tmp_path, "refinement")))
    assert any(t.startswith("toy_method") for t in legend(fig))
    figs = dict(fig_mnist_curves(load_experiment(tmp_path, "mnist_curves")))
    words = [t for t in legend(figs["elbo_vs_examples"]) if t.startswith("toy_method")]
    assert words == [f"toy_method ({V.style_word(V.method_style('toy_method'))})"]
    assert "(None)" not in " ".join(legend(figs["elbo_vs_examples"]))
