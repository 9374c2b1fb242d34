"""samples: pictures of what each method learned (one seed per method and estimator).

Figures ``images[_H]`` (data, reconstructions, decoder samples), ``manifold`` (decoder means over
a grid of 2-D latents) and ``latent_scatter`` (the encoded test set coloured by digit).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import matplotlib
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from experiments.figures.drawing import empty_panel, panel_grid, suptitle
from experiments.figures.loading import ExperimentResults, SkipFigure, dim_suffix, latent_dims
from experiments.figures.registry import register
from experiments.figures.style import LABEL_ORDER, METHOD_ORDER, method_name, ordered

__all__ = ["INPUTS", "fig_samples"]

log = logging.getLogger(__name__)

#: the extra tables the figures read, with the columns they need (after ``loading._normalise``)
INPUTS = {
    "images.csv": ("run_id", "method", "estimator", "baseline", "seed", "kind", "item", "pixel",
                   "value"),
    "latents.csv": ("run_id", "method", "estimator", "baseline", "seed", "label", "z1", "z2"),
}


def _image_shape(img: pd.DataFrame) -> tuple[int, int]:
    """(height, width) from the table's columns, else the square root of the pixel count."""
    n = int(img["pixel"].max()) + 1
    if {"height", "width"} <= set(img.columns) and img["height"].notna().any():
        shape = int(img["height"].dropna().iloc[0]), int(img["width"].dropna().iloc[0])
    else:
        side = round(np.sqrt(n))
        shape = side, side
    if shape[0] * shape[1] != n:
        raise SkipFigure(f"{n} pixels per image do not make a {shape[0]}×{shape[1]} image")
    return shape


def _mosaic(images: np.ndarray, ncols: int) -> np.ndarray:
    """Tile [n, h, w] images into one array with a 1-pixel NaN gutter (drawn blank)."""
    n, h, w = images.shape
    nrows = -(-n // ncols)
    pad = np.full((nrows * ncols, h + 1, w + 1), np.nan)
    pad[:n, :h, :w] = images
    return (pad.reshape(nrows, ncols, h + 1, w + 1).transpose(0, 2, 1, 3)
            .reshape(nrows * (h + 1), ncols * (w + 1))[:-1, :-1])


def _images(d: pd.DataFrame, shape: tuple[int, int], max_items: int = 10) -> np.ndarray:
    wide = d.pivot_table(index="item", columns="pixel", values="value", aggfunc="mean")
    wide = wide.reindex(columns=range(shape[0] * shape[1])).iloc[:max_items]
    return wide.to_numpy(float).reshape(-1, *shape)


def _first_seed(d: pd.DataFrame) -> pd.DataFrame:
    """The run with the smallest seed per (method, estimator label, latent dim)."""
    keys = [k for k in ("method", "estimator_label", "latent_dim") if k in d.columns]
    first = d.groupby(keys, dropna=False)["seed"].transform("min")
    d = d[d["seed"] == first]
    run = d.groupby(keys, dropna=False)["run_id"].transform("min")
    return d[d["run_id"] == run]


@register("samples", inputs=INPUTS)
def fig_samples(res: ExperimentResults) -> Iterator[tuple[str, Figure]]:
    """Pictures per method: data, reconstructions, decoder samples; 2-D latent manifold; the
    encoded test set coloured by digit (Kingma & Welling 2014, Figs. 4–5). One seed each."""
    cmap = matplotlib.colormaps["gray_r"].with_extremes(bad="white")
    try:
        img = res.table("images.csv", INPUTS["images.csv"])
    except SkipFigure as why:
        log.info("%s: %s; skipping image figures", res.name, why)
        img = None
    if img is not None and not img.empty:
        shape = _image_shape(img)
        orig = img[img["kind"] == "original"]
        vmin, vmax = ((orig["value"].min(), orig["value"].max()) if len(orig)
                      else (img["value"].min(), img["value"].max()))
        if "latent_dim" not in img.columns:
            img = img.assign(latent_dim=np.nan)
        pic = img[img["kind"].isin(["original", "reconstruction", "sample"])]
        dims = latent_dims(pic) or [np.nan]
        for h in dims:
            ph = pic[(pic["latent_dim"] == h) | pd.isna(h)]
            if ph.empty:
                continue
            yield (f"images{dim_suffix(h, dims)}",
                   _image_grid(res, _first_seed(ph), shape, vmin, vmax, cmap, h))
        man = img[img["kind"] == "manifold"]
        if man.empty:
            log.info("%s: no manifold images", res.name)
        elif not {"z1", "z2"} <= set(man.columns):
            log.info("%s: images.csv lacks z1/z2; skipping the manifold", res.name)
        else:
            yield "manifold", _manifold(_first_seed(man), shape, vmin, vmax, cmap)
    try:
        lat = res.table("latents.csv", INPUTS["latents.csv"])
    except SkipFigure as why:
        log.info("%s: %s; skipping the latent scatter", res.name, why)
        return
    if not lat.empty:
        yield "latent_scatter", _latent_scatter(_first_seed(lat))


def _combos(d: pd.DataFrame) -> list[tuple[str, str]]:
    methods = ordered(d["method"], METHOD_ORDER)
    labels = ordered(d["estimator_label"], LABEL_ORDER)
    have = set(zip(d["method"], d["estimator_label"], strict=True))
    return [(m, lab) for m in methods for lab in labels if (m, lab) in have]


def _image_grid(res: ExperimentResults, d: pd.DataFrame, shape: tuple[int, int], vmin: float,
                vmax: float, cmap, h: object) -> Figure:
    kinds = [k for k in ("original", "reconstruction", "sample") if (d["kind"] == k).any()]
    runs = res.runs_where(**({} if pd.isna(h) else {"latent_dim": h}))
    combos = _combos(pd.concat([d[["method", "estimator_label"]],
                                runs[["method", "estimator_label"]]]))
    n_items = int(min(d.groupby(["run_id", "kind"])["item"].nunique().max(), 10))
    ncols = min(n_items, 5)
    aspect = (-(-n_items // ncols) * (shape[0] + 1)) / (ncols * (shape[1] + 1))
    fig, axes = panel_grid(len(combos), len(kinds), sharex=False, sharey=False, w=2.6,
                           h=2.4 * aspect + 0.45)
    for i, (method, lab) in enumerate(combos):
        cell = d[(d["method"] == method) & (d["estimator_label"] == lab)]
        mine = runs[(runs["method"] == method) & (runs["estimator_label"] == lab)] \
            if len(runs) else runs
        for j, kind in enumerate(kinds):
            ax = axes[i, j]
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(f"{kind}s", fontsize=10)
            if j == 0:
                bad = int(mine["status"].ne("ok").sum()) if len(mine) else 0
                note = f"\n{bad}/{len(mine)} diverged" if bad else ""
                seed = cell["seed"].iloc[0] if len(cell) else None
                ax.set_ylabel(f"{method_name(method)}\n{lab}"
                              + (f"\nseed {seed:g}" if seed is not None else "") + note,
                              fontsize=8, rotation=0, ha="right", va="center")
            k = cell[cell["kind"] == kind]
            if k.empty:
                status = ", ".join(sorted(set(mine["status"]))) if len(mine) else "absent"
                empty_panel(ax, f"no images\n(run {status})")
                continue
            ims = _images(k, shape)
            ax.imshow(_mosaic(ims, ncols), cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
            ax.grid(False)
    where = "" if pd.isna(h) else f", H = {h:g}"
    suptitle(fig, f"Data, reconstructions and decoder samples{where}")
    return fig


def _manifold(d: pd.DataFrame, shape: tuple[int, int], vmin: float, vmax: float,
              cmap) -> Figure:
    """Decoder means on a regular grid of z = (z1, z2), placed at their latent coordinates."""
    combos = _combos(d)
    methods = ordered(d["method"], METHOD_ORDER)
    labels = ordered(d["estimator_label"], LABEL_ORDER)
    fig, axes = panel_grid(len(labels), len(methods), sharex=False, sharey=False, w=3.0, h=3.0)
    for i, lab in enumerate(labels):
        for j, method in enumerate(methods):
            ax = axes[i, j]
            ax.set_title(f"{method_name(method)}, {lab}", fontsize=9)
            if (method, lab) not in combos:
                empty_panel(ax)
                continue
            cell = d[(d["method"] == method) & (d["estimator_label"] == lab)]
            coords = cell.groupby("item")[["z1", "z2"]].first()
            z1, z2 = np.sort(coords["z1"].unique()), np.sort(coords["z2"].unique())
            ims = _images(cell, shape, max_items=len(coords))
            items = cell.pivot_table(index="item", columns="pixel", values="value").index
            coords = coords.loc[items]
            col = np.searchsorted(z1, coords["z1"].to_numpy())
            row = len(z2) - 1 - np.searchsorted(z2, coords["z2"].to_numpy())
            grid = np.full((len(z2) * len(z1), *shape), np.nan)
            grid[row * len(z1) + col] = ims
            dz1 = (z1[-1] - z1[0]) / max(len(z1) - 1, 1) or 1.0
            dz2 = (z2[-1] - z2[0]) / max(len(z2) - 1, 1) or 1.0
            ax.imshow(_mosaic(grid, len(z1)), cmap=cmap, vmin=vmin, vmax=vmax,
                      interpolation="nearest", aspect="auto",
                      extent=(z1[0] - dz1 / 2, z1[-1] + dz1 / 2, z2[0] - dz2 / 2,
                              z2[-1] + dz2 / 2))
            ax.grid(False)
            ax.set_xlabel("z₁")
            ax.set_ylabel("z₂")
    suptitle(fig, "Learned 2-D latent manifold: decoder means over a grid of z")
    return fig


def _latent_scatter(d: pd.DataFrame) -> Figure:
    methods = ordered(d["method"], METHOD_ORDER)
    labels = ordered(d["estimator_label"], LABEL_ORDER)
    digits = ordered(d["label"])
    pal = dict(zip(digits, sns.color_palette("tab10", max(len(digits), 1)), strict=False))
    fig, axes = panel_grid(len(labels), len(methods), sharex=False, sharey=False, w=3.2, h=3.0)
    for i, lab in enumerate(labels):
        for j, method in enumerate(methods):
            ax = axes[i, j]
            cell = d[(d["method"] == method) & (d["estimator_label"] == lab)]
            seed = f", seed {cell['seed'].iloc[0]:g}" if len(cell) else ""
            ax.set_title(f"{method_name(method)}, {lab}{seed}", fontsize=9)
            if cell.empty:
                empty_panel(ax)
                continue
            sns.scatterplot(data=cell, x="z1", y="z2", hue="label", hue_order=digits,
                            palette=pal, s=10, linewidth=0, alpha=0.8, ax=ax, legend=False)
            ax.set_xlabel("posterior mean μ₁")
            ax.set_ylabel("posterior mean μ₂")
    handles = [Line2D([], [], ls="none", marker="o", color=c, label=str(k))
               for k, c in pal.items()]
    fig.legend(handles=handles, title="digit", loc="outside right center", frameon=False)
    suptitle(fig, "Encoded test set (posterior means, H = 2)")
    return fig
