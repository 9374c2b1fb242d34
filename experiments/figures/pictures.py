"""Pictures of what each model learned, from ``images.csv`` and ``latents.csv`` (one seed per
method and estimator): shared by elbo_curves and mnist_curves.

- ``images[_H]``: data, reconstructions and decoder samples (rows = method × estimator);
- ``manifold``: decoder means over a regular grid of 2-D latents (Kingma & Welling 2014, Fig. 4);
- ``latent_scatter``: the posterior means of the encoded test set coloured by digit (Fig. 5).

``images.csv`` holds one image a row, its pixels in the columns ``p0…`` (row-major, ``height``
× ``width``), ``kind`` (``data``, ``reconstruction``, ``sample``, ``manifold``), ``index`` and,
for the manifold, its latent coordinates ``z1``, ``z2``; ``latents.csv`` one point a row with
``mu1``, ``mu2`` and the digit ``label``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator

import matplotlib
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from experiments.figures.drawing import empty_panel, panel_grid, suptitle
from experiments.figures.loading import ExperimentResults, SkipFigure, dim_suffix, latent_dims
from experiments.figures.marks import legend
from experiments.figures.style import (
    LABEL_ORDER,
    METHOD_ORDER,
    TRAINING_LENGTH,
    method_name,
    ordered,
)

__all__ = ["INPUTS", "pictures"]

log = logging.getLogger(__name__)

#: the extra tables the pictures read, with the columns they need
INPUTS = {
    "images.csv": ("run_id", "method", "estimator", "baseline", "seed", "kind", "index"),
    "latents.csv": ("run_id", "method", "estimator", "baseline", "seed", "label", "mu1", "mu2"),
}
KINDS = {"data": "data", "reconstruction": "reconstructions", "sample": "decoder samples"}


def _pixels(img: pd.DataFrame) -> list[str]:
    cols = [c for c in img.columns if re.fullmatch(r"p\d+", str(c))]
    return sorted(cols, key=lambda c: int(c[1:]))


def _shape(img: pd.DataFrame, pix: list[str]) -> tuple[int, int]:
    """(height, width) from the table's columns, else the square root of the pixel count. The
    pixel columns ``p<j>`` name each value's flat row-major index j in the image; data that keep
    only some pixels (``mnist5k``) have fewer columns than height × width."""
    n, top = len(pix), max(int(c[1:]) for c in pix)
    if {"height", "width"} <= set(img.columns) and img["height"].notna().any():
        shape = int(img["height"].dropna().iloc[0]), int(img["width"].dropna().iloc[0])
    else:
        side = round(np.sqrt(n))
        shape = side, side
    if top >= shape[0] * shape[1] or (n != shape[0] * shape[1] and "height" not in img):
        raise SkipFigure(f"{n} pixels per image do not make a {shape[0]}×{shape[1]} image")
    return shape


def _as_images(rows: pd.DataFrame, pix: list[str], shape: tuple[int, int],
               background: float) -> np.ndarray:
    """[rows, height, width]: each row's pixel values at their indices; pixels the data do not
    keep show ``background`` (they are blank in at least 99 % of the images)."""
    out = np.full((len(rows), shape[0] * shape[1]), background)
    out[:, [int(c[1:]) for c in pix]] = rows[pix].to_numpy(float)
    return out.reshape(-1, *shape)


def _mosaic(images: np.ndarray, ncols: int) -> np.ndarray:
    """Tile [n, h, w] images into one array with a 1-pixel NaN gutter (drawn blank)."""
    n, h, w = images.shape
    nrows = -(-n // ncols)
    pad = np.full((nrows * ncols, h + 1, w + 1), np.nan)
    pad[:n, :h, :w] = images
    return (pad.reshape(nrows, ncols, h + 1, w + 1).transpose(0, 2, 1, 3)
            .reshape(nrows * (h + 1), ncols * (w + 1))[:-1, :-1])


def _first_seed(d: pd.DataFrame) -> pd.DataFrame:
    """The run with the smallest seed per (method, estimator label, latent dim)."""
    keys = [k for k in ("method", "estimator_label", "latent_dim") if k in d.columns]
    d = d[d["seed"] == d.groupby(keys, dropna=False)["seed"].transform("min")]
    return d[d["run_id"] == d.groupby(keys, dropna=False)["run_id"].transform("min")]


def _combos(d: pd.DataFrame) -> list[tuple[str, str]]:
    have = set(zip(d["method"], d["estimator_label"], strict=True))
    return [(m, lab) for m in ordered(d["method"], METHOD_ORDER)
            for lab in ordered(d["estimator_label"], LABEL_ORDER) if (m, lab) in have]


def pictures(res: ExperimentResults) -> Iterator[tuple[str, Figure]]:
    """The picture figures the tables allow (each skipped with a note when its table is
    missing or empty)."""
    cmap = matplotlib.colormaps["gray_r"].with_extremes(bad="white")
    try:
        img = res.table("images.csv", INPUTS["images.csv"])
    except SkipFigure as why:
        log.info("%s: %s; no image figures", res.name, why)
        img = None
    if img is not None and not img.empty and _pixels(img):
        pix = _pixels(img)
        shape = _shape(img, pix)
        data = img[img["kind"] == "data"]
        scale = data if len(data) else img
        vmin, vmax = float(np.nanmin(scale[pix].to_numpy(float))), \
            float(np.nanmax(scale[pix].to_numpy(float)))
        pic = img[img["kind"].isin(list(KINDS))]
        dims = latent_dims(pic) or [np.nan]
        for h in dims:
            ph = pic[(pic["latent_dim"] == h) | pd.isna(h)] if "latent_dim" in pic else pic
            if len(ph):
                yield (f"images{dim_suffix(h, dims)}",
                       _image_grid(res, _first_seed(ph), pix, shape, (vmin, vmax), cmap, h))
        man = img[img["kind"] == "manifold"]
        if len(man) and {"z1", "z2"} <= set(man.columns):
            yield "manifold", _manifold(res, _first_seed(man), pix, shape, (vmin, vmax), cmap)
    try:
        lat = res.table("latents.csv", INPUTS["latents.csv"])
    except SkipFigure as why:
        log.info("%s: %s; no latent scatter", res.name, why)
        return
    if not lat.empty:
        yield "latent_scatter", _latent_scatter(res, _first_seed(lat))


def _image_grid(res: ExperimentResults, d: pd.DataFrame, pix: list[str],
                shape: tuple[int, int], vrange: tuple[float, float], cmap, h: object) -> Figure:
    kinds = [k for k in KINDS if (d["kind"] == k).any()]
    combos = _combos(d)
    n_items = int(min(d.groupby(["run_id", "kind"])["index"].nunique().max(), 16))
    ncols = min(n_items, 8)
    aspect = (-(-n_items // ncols) * (shape[0] + 1)) / (ncols * (shape[1] + 1))
    fig, axes = panel_grid(len(combos), len(kinds), sharex=False, sharey=False, w=2.8,
                           h=2.8 * aspect + 0.2)
    for i, (method, lab) in enumerate(combos):
        cell = d[(d["method"] == method) & (d["estimator_label"] == lab)]
        status = str(res.runs_where(run_id=cell["run_id"].iloc[0])["status"].iloc[0]) \
            if res.runs is not None and len(res.runs_where(run_id=cell["run_id"].iloc[0])) \
            else "ok"
        for j, kind in enumerate(kinds):
            ax = axes[i, j]
            ax.set_xticks([])
            ax.set_yticks([])
            ax.grid(False)
            if i == 0:
                ax.set_title(KINDS[kind], fontsize=10)
            if j == 0:
                ax.set_ylabel(f"{method_name(method)}\n{lab}, seed {cell['seed'].iloc[0]:g}"
                              + ("" if status == "ok" else f"\n(run {status})"),
                              fontsize=8, rotation=0, ha="right", va="center")
            k = cell[cell["kind"] == kind].sort_values("index").iloc[:n_items]
            if k.empty:
                empty_panel(ax, "no images")
                continue
            ims = _as_images(k, pix, shape, vrange[0])
            ax.imshow(_mosaic(ims, ncols), cmap=cmap, vmin=vrange[0], vmax=vrange[1],
                      interpolation="nearest")
    where = "" if pd.isna(h) else f", H = {h:g}"
    suptitle(fig, f"{'/'.join(ordered(d['dataset']))}: data, reconstructions and decoder "
                  f"samples{where} (models {TRAINING_LENGTH}; one seed each)")
    return fig


def _manifold(res: ExperimentResults, d: pd.DataFrame, pix: list[str], shape: tuple[int, int],
              vrange: tuple[float, float], cmap) -> Figure:
    """Decoder means on a regular grid of z = (z1, z2), placed at their latent coordinates."""
    combos = _combos(d)
    fig, axes = panel_grid(1, len(combos), sharex=False, sharey=False, w=3.2, h=3.3)
    for j, (method, lab) in enumerate(combos):
        ax = axes[0, j]
        cell = d[(d["method"] == method) & (d["estimator_label"] == lab)]
        ax.set_title(f"{method_name(method)}\n{lab}, seed {cell['seed'].iloc[0]:g}", fontsize=9)
        z1, z2 = np.sort(cell["z1"].unique()), np.sort(cell["z2"].unique())
        col = np.searchsorted(z1, cell["z1"].to_numpy())
        row = len(z2) - 1 - np.searchsorted(z2, cell["z2"].to_numpy())
        grid = np.full((len(z2) * len(z1), *shape), np.nan)
        grid[row * len(z1) + col] = _as_images(cell, pix, shape, vrange[0])
        dz1 = (z1[-1] - z1[0]) / max(len(z1) - 1, 1) or 1.0
        dz2 = (z2[-1] - z2[0]) / max(len(z2) - 1, 1) or 1.0
        ax.imshow(_mosaic(grid, len(z1)), cmap=cmap, vmin=vrange[0], vmax=vrange[1],
                  interpolation="nearest", aspect="auto",
                  extent=(z1[0] - dz1 / 2, z1[-1] + dz1 / 2, z2[0] - dz2 / 2, z2[-1] + dz2 / 2))
        ax.grid(False)
        ax.set_xlabel("z₁")
        ax.set_ylabel("z₂" if j == 0 else "")
    suptitle(fig, "Learned 2-D latent manifold: decoder means over a grid of z "
                  f"(H = 2, models {TRAINING_LENGTH})")
    return fig


def _latent_scatter(res: ExperimentResults, d: pd.DataFrame) -> Figure:
    combos = _combos(d)
    digits = ordered(d["label"])
    pal = dict(zip(digits, sns.color_palette("tab10", max(len(digits), 1)), strict=False))
    fig, axes = panel_grid(1, len(combos), sharex=False, sharey=False, w=3.2, h=3.2)
    for j, (method, lab) in enumerate(combos):
        ax = axes[0, j]
        cell = d[(d["method"] == method) & (d["estimator_label"] == lab)]
        ax.set_title(f"{method_name(method)}\n{lab}, seed {cell['seed'].iloc[0]:g}", fontsize=9)
        if cell.empty:
            empty_panel(ax)
            continue
        for digit, pts in cell.groupby("label", sort=True):
            ax.scatter(pts["mu1"], pts["mu2"], s=8, color=pal[digit], lw=0, alpha=0.8,
                       label=f"{digit:g}" if isinstance(digit, float) else str(digit))
        ax.set_xlabel("posterior mean μ₁")
        ax.set_ylabel("posterior mean μ₂" if j == 0 else "")
    names = [f"{k:g}" if isinstance(k, float) else str(k) for k in digits]
    legend(fig, title="digit", ncols=min(len(digits), 10), order=names)
    suptitle(fig, f"Encoded test set: posterior means (H = 2, models {TRAINING_LENGTH}, one seed "
                  "each)")
    return fig

