"""Reference lines on ELBO and log p(x) figures, and the bits-per-dimension axis.

``results/references.csv`` (``python -m experiments references``) holds, per data set, data seed
and split, the exact per-point log-likelihood of models without a learned encoder: the
no-latent Gaussian, factor analysis and PPCA at each latent dimension H. A panel showing runs
of one data set, latent dimension H and split gets horizontal lines at the no-latent Gaussian
and at factor analysis with the same H, each the mean over the data seeds those runs used (the
run's ``data.seed``, else its ``seed``). A linear-decoder (PPCA) panel instead gets the target
of ``ppca_exact``: the maximum-likelihood log p(x) minus the closed-form approximation gap.
"""

from __future__ import annotations

import logging

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from experiments.figures.loading import ExperimentResults
from experiments.figures.style import REFERENCES

__all__ = ["DEFAULT_MODELS", "LINEAR_DATASETS", "bpd_axis", "data_seeds", "draw_references",
           "reference_value"]

log = logging.getLogger(__name__)

#: the reference models drawn on every ELBO figure of a non-linear model
DEFAULT_MODELS = ("no_latent", "factor_analysis")
#: data sets drawn from a linear-Gaussian model: their reference is the PPCA fit itself
LINEAR_DATASETS = {"ppca": ("ppca",)}


def data_seeds(runs: pd.DataFrame) -> set[int]:
    """The data seeds used by ``runs`` (``data.seed``, else the run's ``seed``)."""
    if runs is None or runs.empty or "seed" not in runs.columns:
        return set()
    seed = runs["data.seed"] if "data.seed" in runs.columns else pd.Series(np.nan,
                                                                          index=runs.index)
    return {int(s) for s in pd.to_numeric(seed, errors="coerce").fillna(runs["seed"]).dropna()}


def _matching(res: ExperimentResults, runs: pd.DataFrame, split: str) -> pd.DataFrame:
    ref = res.references
    if ref is None or runs is None or runs.empty:
        return pd.DataFrame()
    ref = ref[ref["dataset"].isin(set(runs["dataset"])) & (ref["split"] == split)
              & ref["data_seed"].isin(data_seeds(runs))]
    for col in ("test_fraction", "validation_fraction"):
        if col in ref.columns and f"data.{col}" in runs.columns:
            used = pd.to_numeric(runs[f"data.{col}"], errors="coerce").dropna().unique()
            if len(used):
                ref = ref[np.isclose(ref[col].to_numpy(float)[:, None], used[None, :]).any(1)]
    return ref


def reference_value(res: ExperimentResults, runs: pd.DataFrame, split: str, model: str,
                    h: object = None) -> tuple[float, int]:
    """(mean log p(x) over the matching data seeds, how many) of one reference ``model`` for
    the data of ``runs`` on ``split``; ``h`` is the latent dimension (ignored for no_latent).
    (NaN, 0) when references.csv has no such row."""
    ref = _matching(res, runs, split)
    if ref.empty:
        return np.nan, 0
    ref = ref[ref["model"] == model]
    if model != "no_latent":
        ref = ref[np.isclose(pd.to_numeric(ref["latent_dim"], errors="coerce"), float(h))] \
            if h is not None and pd.notna(h) else ref.iloc[:0]
    v = pd.to_numeric(ref["log_px"], errors="coerce").dropna()
    return (float(v.mean()), int(ref["data_seed"].nunique())) if len(v) else (np.nan, 0)


def draw_references(ax: plt.Axes, res: ExperimentResults, runs: pd.DataFrame, split: str,
                    h: object, models: tuple[str, ...] = DEFAULT_MODELS
                    ) -> tuple[list[float], dict[str, str]]:
    """Horizontal lines at the reference models of the panel's data, H and split (for the
    linear-Gaussian data sets of ``LINEAR_DATASETS``, their maximum-likelihood PPCA instead of
    the default models).

    Returns (the values drawn, so that the axis keeps them in view; legend notes by label:
    how many data seeds each line averages)."""
    values, notes = [], {}
    if models == DEFAULT_MODELS and runs is not None and len(runs):
        datasets = set(runs["dataset"])
        if len(datasets) == 1 and next(iter(datasets)) in LINEAR_DATASETS:
            models = LINEAR_DATASETS[next(iter(datasets))]
    for model in models:
        v, n = reference_value(res, runs, split, model, h)
        if not np.isfinite(v):
            continue
        label, colour, ls = REFERENCES[model]
        ax.axhline(v, color=colour, ls=ls, lw=1.3, label=label, zorder=1.5)
        values.append(v)
        notes[label] = f"mean over {n} data seed{'s' * (n != 1)}"
    return values, notes


def bpd_axis(ax: plt.Axes, data_dim: float, levels: float) -> None:
    """A right-hand axis in bits per dimension of the discrete data, −(L − D ln K)/(D ln 2)
    (the dequantization bound, ``vi.data.bits_per_dim``)."""
    d, k = float(data_dim), float(levels)
    if not (np.isfinite(d) and np.isfinite(k) and d > 0 and k > 1):
        return

    def to_bpd(elbo: np.ndarray) -> np.ndarray:
        return -(np.asarray(elbo, float) - d * np.log(k)) / (d * np.log(2))

    def from_bpd(bpd: np.ndarray) -> np.ndarray:
        return d * np.log(k) - np.asarray(bpd, float) * d * np.log(2)

    sec = ax.secondary_yaxis("right", functions=(to_bpd, from_bpd))
    sec.set_ylabel("bits / dim", fontsize=8)
    sec.tick_params(labelsize=7)
