"""Reference models (no-latent Gaussian, factor analysis, PPCA) checked against independent
routes: a direct numpy Gaussian log-density, scikit-learn's own FactorAnalysis scores, scipy's
multivariate normal, and the nesting of the three maximum-likelihood fits."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from scipy import stats
from sklearn.decomposition import FactorAnalysis

from vi import references as ref
from vi.data import Dataset, load_dataset


@pytest.fixture(scope="module")
def ppca_data() -> Dataset:
    """Data from a PPCA model: D = 20, H = 4, 500 points; a validation split too."""
    return load_dataset("ppca", seed=0, n=500, validation_fraction=0.1)


def _numpy_no_latent(x_train: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Per-dimension MLE mean and (1/N) variance of x_train, Gaussian log-density of x summed."""
    m = x_train.mean(0)
    v = ((x_train - m) ** 2).mean(0)
    return (-0.5 * np.log(2 * np.pi * v) - (x - m) ** 2 / (2 * v)).sum(1)


def _sklearn_fa(x_train: np.ndarray, h: int) -> FactorAnalysis:
    return FactorAnalysis(n_components=h, random_state=0).fit(x_train.astype(np.float64))


def _scipy_ppca(x_train: np.ndarray, x: np.ndarray, h: int) -> np.ndarray:
    """PPCA by Tipping & Bishop's closed form written in numpy, scored by scipy."""
    m = x_train.mean(0)
    S = np.cov(x_train.T, bias=True)
    evals, evecs = np.linalg.eigh(S)
    evals, evecs = evals[::-1], evecs[:, ::-1]
    s2 = evals[h:].mean()
    W = evecs[:, :h] * np.sqrt(evals[:h] - s2)
    return stats.multivariate_normal(m, W @ W.T + s2 * np.eye(len(m))).logpdf(x)


def _mean_se(values: np.ndarray) -> tuple[float, float]:
    return float(values.mean()), float(values.std(ddof=1) / math.sqrt(len(values)))


# ---------------------------------------------------------------------------------- no latent


def test_no_latent_matches_numpy():
    rng = np.random.default_rng(0)
    x_train = rng.normal(size=(300, 6)) * rng.uniform(0.1, 3.0, size=6) + rng.normal(size=6)
    x_test = rng.normal(size=(50, 6)) * 2.0
    mean, var = ref.no_latent_gaussian(torch.from_numpy(x_train))
    assert mean.dtype == var.dtype == torch.float64 and mean.shape == var.shape == (6,)
    np.testing.assert_allclose(mean.numpy(), x_train.mean(0), rtol=0, atol=1e-12)
    np.testing.assert_allclose(var.numpy(), x_train.var(0), rtol=1e-12)
    for x in (x_train, x_test):
        got = ref.log_likelihood(torch.from_numpy(x), (mean, var))
        assert got.dtype == torch.float64 and got.shape == (len(x),)
        np.testing.assert_allclose(got.numpy(), _numpy_no_latent(x_train, x), rtol=0, atol=1e-10)
    # float32 input is promoted: the fit is the float64 fit of the float32 values
    mean32, var32 = ref.no_latent_gaussian(torch.from_numpy(x_train).float())
    assert mean32.dtype == torch.float64
    x32 = torch.from_numpy(x_train).float().double().numpy()
    np.testing.assert_allclose(var32.numpy(), x32.var(0), rtol=1e-12)


def test_no_latent_var_floor():
    x = torch.tensor([[0.0, 1.0], [2.0, 1.0], [4.0, 1.0]], dtype=torch.float64)
    mean, var = ref.no_latent_gaussian(x)  # default: unconstrained, the constant column has v = 0
    assert var.tolist() == [8.0 / 3.0, 0.0]
    with pytest.raises(ValueError, match="var_floor"):
        ref.log_likelihood(x, (mean, var))
    _, floored = ref.no_latent_gaussian(x, var_floor=1e-3)
    assert floored.tolist() == [8.0 / 3.0, 1e-3]
    assert torch.isfinite(ref.log_likelihood(x, (mean, floored))).all()
    with pytest.raises(ValueError, match="var_floor"):
        ref.no_latent_gaussian(x, var_floor=-1.0)


# ----------------------------------------------------------------------------- factor analysis


def test_factor_analysis_is_at_its_maximum(ppca_data):
    """The fit is a maximum: at least scikit-learn's FactorAnalysis (whose randomized SVD and
    tolerance 1e-2 stop early), and 5,000 further EM iterations gain less than 1e-7 nat per
    point; its log-likelihood is scikit-learn's score of the same parameters."""
    x_train = ppca_data.train.double().numpy()
    x_test = ppca_data.test.double().numpy()
    d = x_train.shape[1]
    for h in (1, 3):
        W, b, psi = ref.factor_analysis(ppca_data.train, h, seed=0)
        assert (W.shape, b.shape, psi.shape) == ((d, h), (d,), (d,))
        assert W.dtype == b.dtype == psi.dtype == torch.float64
        ours = float(ref.log_likelihood(ppca_data.train, (W, b, psi)).mean())
        fa = _sklearn_fa(x_train, h)
        assert ours >= fa.score(x_train) - 1e-9
        longer = ref.factor_analysis(ppca_data.train, h, tol=-1.0, max_iter=5000)
        assert float(ref.log_likelihood(ppca_data.train, longer).mean()) - ours < 1e-7
        # the same parameters scored by scikit-learn
        fa.components_, fa.noise_variance_, fa.mean_ = W.numpy().T, psi.numpy(), b.numpy()
        for x in (x_train, x_test):
            got = ref.log_likelihood(torch.from_numpy(x), (W, b, psi)).numpy()
            np.testing.assert_allclose(got, fa.score_samples(x), rtol=1e-9)


def test_factor_analysis_em_is_monotone_and_beats_sklearn_on_digits():
    """On digits (H = 5) the converged fit is above scikit-learn's default fit and every EM
    iteration raises the likelihood."""
    from vi.data import load_dataset

    x = load_dataset("digits").train.double()
    lls = [float(ref.log_likelihood(x, ref.factor_analysis(x, 5, max_iter=n, tol=-1.0)).mean())
           for n in (0, 1, 5, 25)]
    assert all(b >= a - 1e-12 for a, b in itertools.pairwise(lls)), lls
    best = float(ref.log_likelihood(x, ref.factor_analysis(x, 5)).mean())
    assert best >= lls[-1] - 1e-9
    assert best >= _sklearn_fa(x.numpy(), 5).score(x.numpy()) - 1e-9


def test_latent_models_reject_bad_latent_dims(ppca_data):
    for fit in (ref.factor_analysis, ref.ppca):
        for h in (0, 20, 25, 2.5):
            with pytest.raises(ValueError, match="latent_dim"):
                fit(ppca_data.train, h)


# ------------------------------------------------------------------------------------------ PPCA


def test_ppca_matches_closed_form_in_numpy(ppca_data):
    x_train = ppca_data.train.double().numpy()
    W, b, psi = ref.ppca(ppca_data.train, 4)
    assert (W.shape, b.shape, psi.shape) == ((20, 4), (20,), (20,))
    assert W.dtype == torch.float64 and bool((psi == psi[0]).all())
    for x in (x_train, ppca_data.test.double().numpy()):
        got = ref.log_likelihood(torch.from_numpy(x), (W, b, psi)).numpy()
        np.testing.assert_allclose(got, _scipy_ppca(x_train, x, 4), rtol=1e-9)


def test_fits_nest_on_ppca_data(ppca_data):
    """FA nests PPCA (ψ isotropic) and the no-latent Gaussian (W = 0), so its maximised training
    log-likelihood is the largest (it starts from the PPCA maximum and EM only climbs). PPCA
    does not nest the diagonal Gaussian, but on strongly correlated PPCA data it must beat it
    too."""
    x = ppca_data.train
    none = float(ref.log_likelihood(x, ref.no_latent_gaussian(x)).mean())
    for h in (1, 2, 4, 6):
        fa = float(ref.log_likelihood(x, ref.factor_analysis(x, h)).mean())
        pp = float(ref.log_likelihood(x, ref.ppca(x, h)).mean())
        assert fa >= pp - 1e-9 * abs(pp), (h, fa, pp)
        assert fa > none and pp > none, (h, fa, pp, none)


def test_log_likelihood_rejects_unknown_parameters():
    with pytest.raises(ValueError, match="model_params"):
        ref.log_likelihood(torch.zeros(2, 3), (torch.zeros(3),))


# ------------------------------------------------------------------------------------------ rows


def _direct(model: str, h: int | None, x_train: np.ndarray, x: np.ndarray) -> np.ndarray:
    if model == "no_latent":
        return _numpy_no_latent(x_train, x)
    if model == "factor_analysis":  # the converged fit, scored by scikit-learn
        W, b, psi = ref.factor_analysis(x_train, h)
        fa = _sklearn_fa(x_train, h)
        fa.components_, fa.noise_variance_, fa.mean_ = W.numpy().T, psi.numpy(), b.numpy()
        return fa.score_samples(x)
    return _scipy_ppca(x_train, x, h)


def test_reference_rows_ppca(ppca_data):
    rows = ref.reference_rows(ppca_data, [2, 4, 20, 25, 2])
    # D = 20: latent dims 20 and 25 give no row; the repeated 2 gives one set of rows
    expected = [("no_latent", None, s) for s in ("train", "validation", "test")] + [
        (m, h, s)
        for m in ("factor_analysis", "ppca")
        for h in (2, 4)
        for s in ("train", "validation", "test")
    ]
    assert [(r["model"], r["latent_dim"], r["split"]) for r in rows] == expected
    assert all(tuple(r) == ref.ROW_KEYS for r in rows)
    assert set(ref.ROW_KEYS) == {
        "dataset", "data_seed", "model", "latent_dim", "split", "n_points", "log_px", "log_px_se"
    }
    x_train = ppca_data.train.double().numpy()
    for r in rows:
        x = ppca_data.split(r["split"]).double().numpy()
        assert r["dataset"] == "ppca" and r["data_seed"] == 0 and r["n_points"] == len(x)
        mean, se = _mean_se(_direct(r["model"], r["latent_dim"], x_train, x))
        assert r["log_px"] == pytest.approx(mean, rel=1e-6)
        assert r["log_px_se"] == pytest.approx(se, rel=1e-4)
        assert isinstance(r["log_px"], float) and isinstance(r["log_px_se"], float)
    # deterministic: the same dataset gives identical rows
    assert ref.reference_rows(ppca_data, [2, 4, 20, 25, 2]) == rows


def test_reference_rows_digits_skip_empty_split_and_large_dims():
    data = load_dataset("digits", seed=0)  # no validation split
    assert data.validation.shape[0] == 0 and data.data_dim == 64
    rows = ref.reference_rows(data, [5, 64, 100], models=("ppca", "no_latent"))
    assert [(r["model"], r["latent_dim"], r["split"]) for r in rows] == [
        ("ppca", 5, "train"), ("ppca", 5, "test"),
        ("no_latent", None, "train"), ("no_latent", None, "test"),
    ]
    x_train = data.train.double().numpy()
    for r in rows:
        assert r["dataset"] == "digits" and r["data_seed"] == 0
        mean, _ = _mean_se(_direct(r["model"], r["latent_dim"], x_train,
                                   data.split(r["split"]).double().numpy()))
        assert r["log_px"] == pytest.approx(mean, rel=1e-9)
    # train only, FA only
    only = ref.reference_rows(data, [5], splits=("train",), models=("factor_analysis",))
    assert [(r["model"], r["latent_dim"], r["split"]) for r in only] == [
        ("factor_analysis", 5, "train")
    ]


def test_reference_rows_single_point_split_and_missing_seed():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(41, 3, generator=g)
    data = Dataset("toy", train=x[:30], validation=x[30:31], test=x[31:])
    rows = ref.reference_rows(data, [1], models=("no_latent",))
    by_split = {r["split"]: r for r in rows}
    single = by_split["validation"]
    assert single["n_points"] == 1 and math.isnan(single["log_px_se"])
    assert by_split["test"]["n_points"] == 10 and by_split["test"]["log_px_se"] > 0
    assert all(r["data_seed"] is None and r["dataset"] == "toy" for r in rows)


def test_reference_rows_rejects_bad_arguments(ppca_data):
    with pytest.raises(ValueError, match="unknown reference model"):
        ref.reference_rows(ppca_data, [2], models=("pca",))
    with pytest.raises(ValueError, match="unknown split"):
        ref.reference_rows(ppca_data, [2], splits=("dev",))
    with pytest.raises(ValueError, match="latent dimensions"):
        ref.reference_rows(ppca_data, [0])


def test_model_names_are_described():
    assert ref.REFERENCE_MODELS == ("no_latent", "factor_analysis", "ppca")
    assert set(ref.REFERENCE_MODEL_DESCRIPTIONS) == set(ref.REFERENCE_MODELS)


def test_references_csv_equals_a_direct_computation(tmp_path) -> None:
    """``results/references.csv`` holds, for every data split named in an experiment's runs.csv,
    the reference models fitted on that split exactly as ``reference_rows`` computes them."""
    import pandas as pd

    from experiments.references import write_references

    exp = tmp_path / "results" / "toy"
    exp.mkdir(parents=True)
    pd.DataFrame([{"run_id": f"r{s}", "dataset": "digits", "seed": s, "latent_dim": h,
                   "data.seed": None, "data.test_fraction": 0.2,
                   "data.validation_fraction": 0.1, "data.options": "{}", "data.path": None}
                  for s in (0, 1) for h in (2, 5)]).to_csv(exp / "runs.csv", index=False)
    table = pd.read_csv(write_references(tmp_path / "results"))
    for seed in (0, 1):
        data = load_dataset("digits", seed=seed, test_fraction=0.2, validation_fraction=0.1)
        for row in ref.reference_rows(data, [2, 5]):
            match = table[(table["data_seed"] == seed) & (table["model"] == row["model"])
                          & (table["split"] == row["split"])]
            if row["latent_dim"] is not None:
                match = match[match["latent_dim"] == row["latent_dim"]]
            assert len(match) == 1, (seed, row["model"], row["latent_dim"], row["split"])
            assert match["log_px"].iloc[0] == pytest.approx(row["log_px"], rel=1e-12)
            bpd = -(row["log_px"] - 64 * np.log(17)) / (64 * np.log(2))
            assert match["log_px_bpd"].iloc[0] == pytest.approx(bpd, rel=1e-12)
