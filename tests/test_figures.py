"""Figures and summary from CSVs alone (issue 6 "Results and figures"; issue 7 divergence).

A small synthetic results folder that follows the SPEC §7 contract (every experiment, two seeds,
one diverged run) is drawn once in a subprocess, which also reports the modules it imported:
figure code must never import torch or the training code.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest

from experiments import figures, schema, summary
from experiments.figures import registry

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("vem", "amortized")  # semi_amortized joins in test_time_inference only: fewer panels
LABELS = ("reparam", "score+none")
SEEDS = (0, 1)
EPOCHS = 4
DIVERGED = ("amortized", "score+none", 2, 1)  # method, label, H, seed of the diverged run


def _ident(exp: str, dataset: str, method: str, label: str, h: int, seed: int) -> dict:
    est, base = label.split("+") if "+" in label else (label, "none")
    return {"run_id": f"{exp}-{dataset}-{method}-{label}-H{h}-s{seed}", "experiment": exp,
            "dataset": dataset, "method": method, "estimator": est, "baseline": base,
            "kl": "analytic", "latent_dim": h, "n_mc": 4 if base == "loo" else 1, "seed": seed}


def _row(ident: dict, epoch: int, metric: str, value: float, split: str = "test", *,
         step: float | None = None, wall_s: float | None = None, group: str = "") -> dict:
    return {**ident, "epoch": epoch, "step": 10 * epoch if step is None else step,
            "wall_s": wall_s, "split": split, "param_group": group or None, "metric": metric,
            "value": float(value)}


def _run(ident: dict, status: str = "ok", **config: object) -> dict:
    return {**ident, "status": status, "message": "epoch 3: non-finite elbo on train"
            if status == "diverged" else "", "git_commit": "0" * 40, "git_dirty": False,
            "torch_version": "2.13.0", "python_version": "3.11", "device": "cpu",
            "started": "2025-01-01T00:00:00", "finished": "2025-01-01T00:01:00",
            "lr": 1e-3, "local_lr": 1e-2, "refine_lr": 0.1, "epochs": EPOCHS, "hidden": "[32]",
            **config}


def _elbo(label: str, seed: int, epoch: int, split: str, h: int) -> float:
    """Final (epoch 4) test ELBO of vem/reparam/H=2 is −100 − 2·seed: known mean and sd."""
    final = -100.0 - 2.0 * seed - 5.0 * LABELS.index(label) - 0.5 * (h - 2)
    return final + (3.0 if split == "train" else 0.0) - 50.0 * (np.exp(-epoch) - np.exp(-4))


def _diverged(method: str, label: str, h: int, seed: int) -> bool:
    return (method, label, h, seed) == DIVERGED


def _write(folder: Path, name: str, rows: list[dict], columns: tuple | None = None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    df = pd.DataFrame(rows)
    (df[list(columns)] if columns else df).to_csv(folder / name, index=False)


def _groups(method: str) -> tuple[str, ...]:
    return ("variational", "local" if method == "vem" else "encoder", "decoder")


def write_study(root: Path) -> Path:
    """Synthetic results for every experiment (schema-valid); returns ``root``."""
    rng = np.random.default_rng(0)
    cells = [(m, lab, s) for m in METHODS for lab in LABELS for s in SEEDS]

    # elbo_curves: H ∈ {2, 5}, epochs 0..4, one run diverges after epoch 2
    rows, runs = [], []
    for m, lab, s in cells:
        for h in (2, 5):
            ident = _ident("elbo_curves", "digits", m, lab, h, s)
            bad = _diverged(m, lab, h, s)
            runs.append(_run(ident, "diverged" if bad else "ok"))
            for ep in range(3 if bad else EPOCHS + 1):
                wall = ep * (0.5 if m == "amortized" else 1.0) * (1 + 0.1 * s)
                if ep:
                    rows.append(_row(ident, ep, "elbo_running", _elbo(lab, s, ep, "train", h)
                                     - 1, "train", wall_s=wall))
                for split in ("train", "test"):
                    rows.append(_row(ident, ep, "elbo", _elbo(lab, s, ep, split, h), split,
                                     wall_s=wall))
    _write(root / "elbo_curves", "metrics.csv", rows, schema.METRIC_COLUMNS)
    _write(root / "elbo_curves", "runs.csv", runs)

    # gradient_variance: grad_* per group over epochs 1..3, and the n_mc sweep
    rows, runs, sweep = [], [], []
    for m, lab, s in cells:
        for h in (2, 5):
            ident = _ident("gradient_variance", "digits", m, lab, h, s)
            runs.append(_run(ident))
            scale = (1.0 if lab == "reparam" else 30.0 * h) * (1 + 0.2 * s)
            for ep in (1, 2, 3) if h == 2 else (3,):  # H=5: no over-training figure
                for g in _groups(m):
                    var = scale * 10 ** (-0.3 * ep) * (3.0 if g == "decoder" else 1.0)
                    rows += [_row(ident, ep, "grad_var_total", var, "train", group=g),
                             _row(ident, ep, "grad_var_relative", var / 4, "train", group=g),
                             _row(ident, ep, "grad_snr_mean", 2 / np.sqrt(var), "train",
                                  group=g),
                             _row(ident, ep, "grad_snr_median", 1 / np.sqrt(var), "train",
                                  group=g),
                             _row(ident, ep, "grad_mean_norm", 2.0, "train", group=g)]
            # the runner's sweep: every trained model measured with every estimator
            for lab2 in LABELS:
                est, base = lab2.split("+") if "+" in lab2 else (lab2, "none")
                for n_mc in (2, 8, 32) if h == 2 else (8,):  # H=5: no n_mc figure
                    for g in _groups(m):
                        var = (1.0 if lab2 == "reparam" else 30.0 * h) / n_mc
                        var *= rng.uniform(0.8, 1.25) * (1.0 if lab == "reparam" else 5.0)
                        for metric, value in (("grad_var_total", var),
                                              ("grad_snr_mean", 1 / np.sqrt(var))):
                            sweep.append({**ident, "epoch": 3, "param_group": g,
                                          "grad_estimator": est, "grad_baseline": base,
                                          "grad_n_mc": n_mc, "draws": 100, "metric": metric,
                                          "value": value})
    _write(root / "gradient_variance", "metrics.csv", rows, schema.METRIC_COLUMNS)
    _write(root / "gradient_variance", "runs.csv", runs)
    _write(root / "gradient_variance", "variance_sweep.csv", sweep)

    # amortization_gap: digits (iwae; gaps at epochs 2 and 4), ppca (exact; epoch 4)
    rows, runs = [], []
    for dataset in ("digits", "ppca"):
        for m, lab, s in cells:
            ident = _ident("amortization_gap", dataset, m, lab, 5, s)
            bad = dataset == "digits" and _diverged(m, lab, 2, s)
            runs.append(_run(ident, "diverged" if bad else "ok"))
            for ep in (2, 4) if dataset == "digits" else (4,):  # ppca: final gaps only
                if bad and ep == 4:
                    break
                for split in ("train", "test"):
                    lp = -95.0 - s - (1.0 if split == "test" else 0.0) + (4 - ep)
                    approx = 2.0 + 0.1 * s
                    amort = 0.1 * s if m == "vem" else 1.5 + 0.5 * LABELS.index(lab)
                    lpm = "log_px_exact" if dataset == "ppca" else "iwae"
                    rows += [_row(ident, ep, lpm, lp, split),
                             _row(ident, ep, "elbo_qstar", lp - approx, split),
                             _row(ident, ep, "elbo_qphi", lp - approx - amort, split),
                             _row(ident, ep, "approximation_gap", approx, split),
                             _row(ident, ep, "amortization_gap", amort, split),
                             _row(ident, ep, "elbo", lp - approx - amort - 0.2, split)]
    _write(root / "amortization_gap", "metrics.csv", rows, schema.METRIC_COLUMNS)
    _write(root / "amortization_gap", "runs.csv", runs)

    # ppca_exact: ELBO curves and the closed-form target at the last epoch
    rows, runs = [], []
    for m, lab, s in cells:
        ident = _ident("ppca_exact", "ppca", m, lab, 2, s)
        runs.append(_run(ident))
        for ep in range(EPOCHS + 1):
            for split in ("train", "test"):
                rows.append(_row(ident, ep, "elbo", _elbo(lab, s, ep, split, 2) / 10, split))
        for split in ("train", "test"):
            rows += [_row(ident, EPOCHS, "log_px_exact", -9.0 - 0.2 * s, split),
                     _row(ident, EPOCHS, "approximation_gap", 0.6, split),
                     _row(ident, EPOCHS, "log_px_mle", -9.0, split),
                     _row(ident, EPOCHS, "approximation_gap_mle", 0.7, split)]
    _write(root / "ppca_exact", "metrics.csv", rows, schema.METRIC_COLUMNS)
    _write(root / "ppca_exact", "runs.csv", runs)

    # test_time_inference (runner layout): E-steps from the prior for every method and from
    # the encoder for amortized and semi_amortized; param_group says which
    rows, runs = [], []
    for m, lab, s in [*cells, *((m, lab, s) for (_, lab, s) in cells[:len(cells) // 2]
                                for m in ["semi_amortized"])]:
        ident = _ident("test_time_inference", "digits", m, lab, 5, s)
        runs.append(_run(ident))
        for init in ("prior",) if m == "vem" else ("prior", "encoder"):
            start = -160.0 if init == "prior" else -112.0
            for k in (0, 1, 4, 16, 64):
                value = -105.0 - 3 * LABELS.index(lab) - s + (start + 105.0) * np.exp(-k / 8)
                rows.append(_row(ident, EPOCHS, "test_curve_elbo", value, step=k, group=init,
                                 wall_s=1e-4 * (1 + k) * (1 + 0.1 * s)))
    _write(root / "test_time_inference", "metrics.csv", rows, schema.METRIC_COLUMNS)
    _write(root / "test_time_inference", "runs.csv", runs)

    # samples (runner layout): wide 8x8 images p00..p63, manifold on a 5x5 grid of (z1, z2),
    # the encoded test set as posterior means mu1, mu2
    rows, runs, images, latents = [], [], [], []
    yy, xx = np.mgrid[0:8, 0:8]
    pixels = [f"p{i:02d}" for i in range(64)]
    for m, lab, s in cells:
        ident = _ident("samples", "digits", m, lab, 2, s)
        runs.append(_run(ident))
        rows.append(_row(ident, EPOCHS, "elbo", _elbo(lab, s, EPOCHS, "test", 2)))
        base = {**ident, "epoch": EPOCHS, "height": 8, "width": 8}
        item = np.arange(10)[:, None, None]
        blobs = 16 * np.exp(-((xx - 3.5) ** 2 + (yy - 0.7 * item) ** 2) / 6)  # [10, 8, 8]
        for kind in ("data", "reconstruction", "sample"):
            noisy = blobs + (rng.normal(0, 1.5, blobs.shape) if kind != "data" else 0)
            images.append(pd.DataFrame({**base, "kind": kind, "index": range(10),
                                        "label": range(10), "z1": np.nan, "z2": np.nan}
                                       | dict(zip(pixels, noisy.reshape(10, 64).T,
                                                  strict=True))))
        z1, z2 = (g.ravel()[:, None, None] for g in np.meshgrid(*[np.linspace(-2, 2, 5)] * 2))
        grid = 16 * np.exp(-((xx - 3.5 - z1) ** 2 + (yy - 3.5 - z2) ** 2) / 4)  # [25, 8, 8]
        images.append(pd.DataFrame({**base, "kind": "manifold", "index": range(25),
                                    "label": np.nan, "z1": z1.ravel(), "z2": z2.ravel()}
                                   | dict(zip(pixels, grid.reshape(25, 64).T, strict=True))))
        digit = rng.integers(0, 10, 60)
        z = rng.normal(0, 0.3, (60, 2)) + np.c_[np.cos(digit), np.sin(digit)] * 2
        latents.append(pd.DataFrame({**ident, "epoch": EPOCHS, "point": range(60),
                                     "label": digit, "mu1": z[:, 0], "mu2": z[:, 1],
                                     "logvar1": -2.0, "logvar2": -2.0}))
    _write(root / "samples", "metrics.csv", rows, schema.METRIC_COLUMNS)
    _write(root / "samples", "runs.csv", runs)
    (root / "samples" / "images.csv").write_text(pd.concat(images).to_csv(index=False))
    (root / "samples" / "latents.csv").write_text(pd.concat(latents).to_csv(index=False))

    # lr_selection: three candidate step sizes (vem: lr paired with local_lr = 10 lr);
    # score+none diverges at the largest; selected.csv in the runner's layout
    rows, runs, selected = [], [], []
    for m, lab, s in cells:
        for lr in (1e-4, 1e-3, 1e-2):
            local_lr = 10 * lr if m == "vem" else 1e-2
            ident = _ident("lr_selection", "digits", m, lab, 2, s)
            ident["run_id"] += f"-lr{lr:g}"
            bad = lab == "score+none" and lr == 1e-2
            runs.append(_run(ident, "diverged" if bad else "ok", lr=lr, local_lr=local_lr))
            quality = -abs(np.log10(lr) + 3) * 4
            for ep in range(1 if bad else EPOCHS + 1):
                rows.append(_row(ident, ep, "elbo", _elbo(lab, s, ep, "test", 2) + quality,
                                 "validation"))
    for m in METHODS:
        for lab in LABELS:
            est, base = lab.split("+") if "+" in lab else (lab, "none")
            selected.append({"dataset": "digits", "method": m, "estimator": est,
                             "baseline": base, "lr": 1e-3,
                             "local_lr": 1e-2, "refine_lr": np.nan, "metric": "elbo",
                             "split": "validation",
                             "score_mean": _elbo(lab, 0, EPOCHS, "test", 2) - 1.0,
                             "score_sd": 1.4, "n_seeds": 2, "n_diverged": 0})
    _write(root / "lr_selection", "metrics.csv", rows, schema.METRIC_COLUMNS)
    _write(root / "lr_selection", "runs.csv", runs)
    _write(root / "lr_selection", "selected.csv", selected)
    return root


#: figure stems each experiment must produce from the synthetic study
EXPECTED = {
    "elbo_curves": ["elbo_vs_epoch_train", "elbo_vs_epoch_test", "elbo_vs_seconds_train",
                    "elbo_vs_seconds_test"],
    "gradient_variance": ["grad_variance_vs_epoch_H2", "grad_snr_vs_epoch_H2",
                          "grad_variance_vs_latent_dim", "grad_snr_vs_latent_dim",
                          "grad_variance_vs_n_mc_H2",
                          "variance_ratio_vs_latent_dim"],
    "amortization_gap": ["gaps_digits", "gaps_ppca", "bounds_vs_epoch_digits_train",
                         "bounds_vs_epoch_digits_test"],
    "ppca_exact": ["elbo_vs_target"],
    "test_time_inference": ["test_time_inference"],
    "samples": ["images", "manifold", "latent_scatter"],
    "lr_selection": ["lr_selection"],
}

_DRAW = textwrap.dedent("""
    import json, logging, sys
    from pathlib import Path
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("experiments").setLevel(logging.INFO)
    from experiments.figures import make_figures
    from experiments.summary import summary_markdown, write_summary
    root = Path(sys.argv[1])
    paths = make_figures(root, strict=True)
    write_summary(root)
    summary_markdown(root)
    print(json.dumps({"paths": [str(p) for p in paths], "modules": sorted(sys.modules)}))
""")


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The synthetic study, written once per module."""
    return write_study(tmp_path_factory.mktemp("template"))


@pytest.fixture
def study(template: Path, tmp_path: Path) -> Path:
    """A private copy of the synthetic study, for tests that damage it."""
    return Path(shutil.copytree(template, tmp_path / "results"))


@pytest.fixture(scope="module")
def drawn(template: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The synthetic study drawn once, in a fresh interpreter (so sys.modules is honest)."""
    root = Path(shutil.copytree(template, tmp_path_factory.mktemp("drawn") / "results"))
    proc = subprocess.run([sys.executable, "-c", _DRAW, str(root)], cwd=ROOT, text=True,
                          capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"root": root, "paths": [Path(p) for p in out["paths"]], "modules": out["modules"],
            "log": proc.stderr}


def test_every_experiment_gets_its_figures_as_png_and_pdf(drawn: dict) -> None:
    root, paths = drawn["root"], set(drawn["paths"])
    for exp, stems in EXPECTED.items():
        for stem in stems:
            for ext in ("png", "pdf"):
                path = root / exp / "figures" / f"{stem}.{ext}"
                assert path in paths and path.stat().st_size > 1000, f"missing {path}"
    made = {p.relative_to(root) for p in paths if p.parent.name == "figures"}
    expected = {Path(e) / "figures" / f"{s}.{x}" for e, ss in EXPECTED.items() for s in ss
                for x in ("png", "pdf")}
    assert made == expected, f"unexpected figures: {sorted(map(str, made - expected))}"
    assert not list(root.rglob(".*.tmp*")), "temporary files left behind"


def test_figures_never_import_torch_or_training_code(drawn: dict) -> None:
    banned = [m for m in drawn["modules"]
              if m == "torch" or m.startswith("torch.") or m == "vi" or m.startswith("vi.")]
    assert banned == [], f"figure code imported {banned[:10]}"


def test_variance_ratio_table(drawn: dict) -> None:
    """score/reparam ratio per H: the synthetic sweep has ratio 30·H times noise in [0.64, 1.57]."""
    ratio = pd.read_csv(drawn["root"] / "gradient_variance" / "variance_ratio.csv")
    assert (drawn["root"] / "gradient_variance" / "variance_ratio.md").is_file()
    assert set(ratio["estimator"]) == {"score+none"}
    assert set(ratio["latent_dim"]) == {2, 5} and (ratio["n_seeds"] == 2).all()
    assert set(ratio.loc[ratio["latent_dim"] == 5, "n_mc"]) == {8}
    assert (ratio["source"] == "variance_sweep.csv").all()
    assert set(ratio["trained_with"]) == {"reparam", "score+none"}
    ratio = ratio[ratio["trained_with"] == "reparam"]
    expected = 30.0 * ratio["latent_dim"]
    assert ((ratio["ratio_mean"] > 0.64 * expected) & (ratio["ratio_mean"] < 1.57 * expected)).all()


def test_invalid_metrics_raise_schema_error_naming_the_file(study: Path) -> None:
    root = study
    bad = root / "ppca_exact" / "metrics.csv"
    df = pd.read_csv(bad)
    df.loc[3, "metric"] = "elbo_typo"
    df.loc[5, "value"] = np.nan
    df.to_csv(bad, index=False)
    runs = root / "samples" / "runs.csv"
    r = pd.read_csv(runs)
    r.loc[0, "status"] = "exploded"
    r.to_csv(runs, index=False)
    with pytest.raises(schema.SchemaError) as err:
        figures.make_figures(root)
    msg = str(err.value)
    assert str(bad) in msg and "elbo_typo" in msg and "non-finite" in msg
    assert str(runs) in msg and "exploded" in msg
    assert not list(root.rglob("figures")), "figures drawn before validation finished"


def test_an_experiment_with_a_grid_but_no_figure_module_is_an_error(
        study: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every experiment with a grid registers a figure module; one that does not is named, and
    nothing is drawn."""
    figures.check_registry()
    assert set(figures.EXPERIMENTS) == set(registry.grid_names())
    monkeypatch.setattr(registry, "REGISTRY",
                        {k: v for k, v in registry.REGISTRY.items() if k != "ppca_exact"})
    with pytest.raises(figures.RegistryError, match=r"experiment\(s\) ppca_exact:"):
        figures.make_figures(study, ["elbo_curves"])
    assert not list(study.rglob("figures")), "figures drawn before the registry was checked"
    with pytest.raises(figures.RegistryError, match=r"experiment\(s\) a_new_experiment:"):
        figures.check_registry(["elbo_curves", "a_new_experiment"])


def test_missing_column_or_table_is_skipped_with_a_note(study: Path,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    root = study
    (root / "samples" / "images.csv").unlink()
    lat = pd.read_csv(root / "samples" / "latents.csv").drop(columns="mu2")
    lat.to_csv(root / "samples" / "latents.csv", index=False)
    stale = root / "samples" / "figures" / "from_an_old_grid.png"
    stale.parent.mkdir()
    stale.write_bytes(b"old")
    with caplog.at_level("INFO", logger="experiments.figures"):
        paths = figures.make_figures(root, ["samples"], strict=True)
    assert paths == [] and not stale.exists()
    assert "images.csv not found" in caplog.text and "lacks column(s) z2 (mu2)" in caplog.text


def test_diverged_runs_are_marked_and_counted(study: Path) -> None:
    """Legend entries count diverged runs, and the diverged curve ends in an × marker."""
    root = study
    res = figures.load_experiment(root, "elbo_curves")
    _, fig = next(iter(figures.fig_elbo_curves(res)))
    legend = [t.get_text() for lg in fig.legends for t in lg.get_texts()]
    assert "score+none — 1/8 runs diverged" in legend, legend
    titles = [ax.get_title() for ax in fig.axes]
    assert any("score+none: 1/2 runs diverged" in t for t in titles), titles
    crosses = [ln for ax in fig.axes for ln in ax.get_lines() if ln.get_marker() == "x"]
    assert len(crosses) == 1 and float(crosses[0].get_xdata()[0]) == 2.0  # last finite epoch
    plt.close(fig)


def test_summary_mean_sd_and_diverged_counts(drawn: dict) -> None:
    root = drawn["root"]
    table = pd.read_csv(root / "summary.csv")
    key = {"dataset": "digits", "method": "vem", "estimator_label": "reparam", "latent_dim": 2}
    row = table.loc[np.logical_and.reduce([table[k] == v for k, v in key.items()])]
    assert len(row) == 1
    row = row.iloc[0]
    # final test ELBO −100 − 2·seed over seeds {0, 1}: mean −101, sd √2 (ddof 1)
    assert row["test_elbo_mean"] == pytest.approx(-101.0)
    assert row["test_elbo_sd"] == pytest.approx(np.sqrt(2.0), rel=1e-5)
    # wall_s = epoch·(1 + 0.1·seed) for vem: seconds per epoch 1.0 and 1.1
    assert row["seconds_per_epoch_mean"] == pytest.approx(1.05)
    assert row["seconds_per_epoch_sd"] == pytest.approx(np.sqrt(0.005), rel=1e-4)
    bad = table[(table["method"] == "amortized") & (table["estimator_label"] == "score+none")
                & (table["latent_dim"] == 2)].iloc[0]
    assert (bad["n_runs"], bad["n_diverged"], bad["test_elbo_n"]) == (2, 1, 1)
    gap = table[(table["dataset"] == "ppca") & (table["method"] == "amortized")
                & (table["estimator_label"] == "score+none")].iloc[0]
    # amortization gap 1.5 + 0.5·1 for every seed; approximation gap 2 + 0.1·seed
    assert gap["test_amortization_gap_mean"] == pytest.approx(2.0)
    assert gap["test_amortization_gap_sd"] == pytest.approx(0.0)
    assert gap["test_approximation_gap_mean"] == pytest.approx(2.05)
    assert gap["test_log_px_exact_n"] == 2 and np.isnan(gap["test_iwae_mean"])
    md = summary.summary_markdown(root)
    assert "| digits | vem | reparam | 2 | −101.00 ± 1.41 |" in md
    assert "| digits | amortized | score+none | 2 | −105.00 (1 seed) |" in md
    assert "| 2 | 1/2 |" in md  # runs, diverged columns of that row


def test_long_and_wide_image_tables_normalise_alike(template: Path) -> None:
    """The runner's wide images.csv (p00..p63) and the long layout (item, pixel, value) give
    the same pictures; the runner's sweep names the measured estimator grad_estimator."""
    wide = pd.read_csv(template / "samples" / "images.csv")
    a = figures._normalise("images.csv", wide)
    long = a[["run_id", "kind", "item", "pixel", "value"]].sample(frac=1.0, random_state=0)
    b = figures._normalise("images.csv", long)
    key = ["run_id", "kind", "item", "pixel"]
    pd.testing.assert_frame_equal(a.sort_values(key)[[*key, "value"]].reset_index(drop=True),
                                  b.sort_values(key)[[*key, "value"]].reset_index(drop=True))
    assert set(a["kind"]) == {"original", "reconstruction", "sample", "manifold"}
    sweep = figures._normalise("variance_sweep.csv",
                               pd.read_csv(template / "gradient_variance" / "variance_sweep.csv"))
    assert {"estimator", "baseline", "n_mc", "trained_with"} <= set(sweep.columns)
    assert set(sweep["n_mc"]) == {2, 8, 32}
