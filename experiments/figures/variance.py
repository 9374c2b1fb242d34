"""Gradient-variance helpers shared by gradient_variance and ppca_exact.

- ``probe_m``: the M (Monte Carlo samples per estimate) at which the ``gradvar`` probe measured
  every estimator. runs.csv records the training M (``n_mc``) but not the probe's, so it is
  read from a ``probes.gradvar.n_mc`` column when runs.csv has one, else from the experiment's
  grid when every scale of the grid sets the same value; otherwise each run's own M is used
  (and panels are split by M, so that estimators are still compared at equal M);
- ``sweep_rows``: the ``variance_sweep.csv`` rows of the final state, the measured estimator
  named by ``sweep_label`` (``reparam, KL MC``) from ``grad_estimator``/``grad_baseline``/
  ``grad_kl`` (the run's own training estimator stays in ``estimator``);
- ``sweep_by_latent_dim``: those rows per latent dimension H measured at two or more M;
- ``sweep_figure``: variance (or variance × M, the variance at equal cost) against M;
- ``variance_ratio``: tr Σ(estimator) / tr Σ(reparam, analytic KL) at equal M, per seed, then
  summarised over seeds (the ``variance_ratio.csv``/``.md`` table).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from experiments.figures.drawing import (
    bottom_xlabels,
    draw_curves,
    empty_panel,
    log_axis,
    panel_grid,
    plain_ticks,
    suptitle,
)
from experiments.figures.loading import ExperimentResults, at_best, dim_suffix, latent_dims
from experiments.figures.marks import legend
from experiments.figures.style import (
    KL_STYLES,
    LABEL_ORDER,
    METHOD_ORDER,
    TRAINING_LENGTH,
    estimator_label,
    label_colour,
    method_name,
    ordered,
    seeds_text,
)

__all__ = ["GROUP_ROWS", "REFERENCE", "SWEEP_INPUTS", "group_rows", "probe_m",
           "sweep_by_latent_dim", "sweep_figure", "sweep_label", "sweep_order", "sweep_rows",
           "variance_ratio", "with_probe_m"]

log = logging.getLogger(__name__)

#: gradient-variance rows: the variational parameters λ are comparable across methods; the
#: local table Λ (vem) and the encoder φ (amortized) play the same role, so they share a row.
GROUP_ROWS = (("variational", ("variational",), "variational λ"),
              ("inference", ("local", "encoder"), "local Λ / encoder φ"),
              ("decoder", ("decoder",), "decoder θ"))
#: the columns the sweep figures need
SWEEP_INPUTS = {"variance_sweep.csv": ("run_id", "method", "latent_dim", "seed", "epoch",
                                       "param_group", "grad_estimator", "grad_baseline",
                                       "grad_kl", "grad_n_mc", "metric", "value")}
#: the estimator every variance ratio divides by
REFERENCE = "reparam, KL analytic"


def group_rows(d: pd.DataFrame) -> list[tuple[str, tuple[str, ...], str]]:
    """The ``GROUP_ROWS`` with rows present in ``d``."""
    present = set(d["param_group"].dropna())
    return [g for g in GROUP_ROWS if present & set(g[1])]


def probe_m(res: ExperimentResults, probe: str = "gradvar") -> float | None:
    """The M every estimator was measured at by ``probe`` (see the module docstring), or None
    when it cannot be known from the CSVs and the grid."""
    col = f"probes.{probe}.n_mc"
    if res.runs is not None and col in res.runs.columns:
        values = pd.to_numeric(res.runs[col], errors="coerce").dropna().unique()
        return float(values[0]) if len(values) == 1 else None
    try:
        from experiments.grids import load_grid

        grid = load_grid(res.name)
        values = [(grid.scaled(s).probes.get(probe) or {}).get("n_mc")
                  for s in ("default", *grid.scales)]
    except Exception as err:  # no grid of that name, or one that does not parse
        log.info("%s: no grid to read the %s probe's M from (%s)", res.name, probe, err)
        return None
    if None in values or len(set(values)) != 1:
        return None
    return float(values[0])


def with_probe_m(res: ExperimentResults, d: pd.DataFrame) -> pd.DataFrame:
    """``d`` with ``probe_m``: the probe's M when known, else the run's own ``n_mc``."""
    m = probe_m(res)
    return d.assign(probe_m=float(m) if m is not None else d["n_mc"].astype(float))


def sweep_label(estimator: object, baseline: object, kl: object) -> str:
    """``reparam, KL analytic``: the measured estimator with its KL term."""
    kl = "MC" if str(kl) == "mc" else str(kl)
    return f"{estimator_label(estimator, baseline)}, KL {kl}"


def sweep_rows(sweep: pd.DataFrame, metric: str = "grad_var_total") -> tuple[pd.DataFrame, str]:
    """The final-state rows of ``metric`` with ``grad_label`` (the measured estimator) and
    ``grad_base`` (its estimator label); only models trained with reparam when the table has
    them (the grid's design). Returns (rows, words naming the models)."""
    d = sweep[sweep["metric"] == metric]
    if d.empty:
        return d, ""
    d = d[d["epoch"] == d.groupby("run_id")["epoch"].transform("max")]
    d = d.assign(grad_base=[estimator_label(e, b) for e, b in
                            zip(d["grad_estimator"], d["grad_baseline"], strict=True)],
                 grad_label=[sweep_label(e, b, k) for e, b, k in
                             zip(d["grad_estimator"], d["grad_baseline"], d["grad_kl"],
                                 strict=True)],
                 grad_n_mc=d["grad_n_mc"].astype(float))
    if (d["estimator_label"] == "reparam").any():
        return d[d["estimator_label"] == "reparam"], "models trained with reparam"
    return d, "the trained models"


def sweep_by_latent_dim(res: ExperimentResults
                        ) -> Iterator[tuple[float, str, pd.DataFrame, str]]:
    """The sweep's final-state rows (``sweep_rows`` of ``variance_sweep.csv``) per latent
    dimension H measured at two or more M: (H, the file-stem suffix, its rows, the words naming
    the models); an H measured at one M is skipped with a logged note."""
    d, models = sweep_rows(res.table("variance_sweep.csv", SWEEP_INPUTS["variance_sweep.csv"]))
    dims = latent_dims(d)
    for h in dims:
        cell = d[d["latent_dim"] == h]
        if cell["grad_n_mc"].nunique() < 2:
            log.info("%s: one M at H = %g; no variance-against-M figure", res.name, h)
            continue
        yield h, dim_suffix(h, dims), cell, models


def _sweep_palette(d: pd.DataFrame) -> dict[str, tuple]:
    return {lab: label_colour(lab.split(",")[0]) for lab in d["grad_label"].unique()}


def sweep_order(labels: pd.Series) -> list[str]:
    """Measured-estimator labels: estimator order, analytic KL before MC."""
    order = [f"{lab}, KL {k}" for lab in LABEL_ORDER for k in ("analytic", "MC")]
    return ordered(labels, order)


def sweep_figure(res: ExperimentResults, d: pd.DataFrame, models: str, title: str, *,
                 per_cost: bool = False) -> Figure:
    """Variance against M (log-log; rows = parameter group, columns = method, colour = the
    measured estimator, line style = its KL term), mean ± sd over seeds, with a 1/M reference;
    ``per_cost``: variance × M, flat where the variance falls as 1/M."""
    if per_cost:
        d = d.assign(value=d["value"] * d["grad_n_mc"])
    rows = group_rows(d)
    methods = ordered(d["method"], METHOD_ORDER)
    palette = _sweep_palette(d)
    fig, axes = panel_grid(len(rows), len(methods), sharex=True, sharey="row", w=3.3, h=2.6)
    for i, (_, groups, row_name) in enumerate(rows):
        for j, method in enumerate(methods):
            ax = axes[i, j]
            cell = d[(d["method"] == method) & d["param_group"].isin(groups)]
            group = "/".join(ordered(cell["param_group"])) or "/".join(groups)
            ax.set_title(f"{method_name(method)}: {group}", fontsize=9)
            if cell.empty:
                empty_panel(ax, "no such parameters")
                continue
            log_axis(ax, "x", base=2)
            for kl, sub in cell.groupby("grad_kl", sort=True):
                draw_curves(ax, sub, "grad_n_mc", palette, key="grad_label", logy=True,
                            marker=True, ls=KL_STYLES.get(str(kl), "-."))
            plain_ticks(ax, d["grad_n_mc"])
            _reference(ax, cell[cell["status"] == "ok"], flat=per_cost)
            ax.set_xlabel("samples per estimate M (log₂)")
            ax.set_ylabel(f"{row_name}\n{'tr Σ × M' if per_cost else 'tr Σ'} (log)"
                          if j == 0 else "")
    bottom_xlabels(axes)
    suptitle(fig, f"{title}; each estimator measured on the same {models} {TRAINING_LENGTH} "
                  f"and the same minibatch (common random numbers), so at each M the estimators "
                  f"are compared at equal M; mean ± sd over {seeds_text(d['seed'])}")
    legend(fig, title="measured estimator (line, band: mean ± sd over seeds)",
           order=sweep_order(d["grad_label"]))
    return fig


def _reference(ax, cell: pd.DataFrame, *, flat: bool) -> None:
    """A 1/M line (or, for variance × M, a flat one) through the largest mean at the smallest
    M: the slope an estimator averaging M independent draws would follow."""
    if cell.empty:
        return
    m0 = cell["grad_n_mc"].min()
    at0 = cell[cell["grad_n_mc"] == m0].groupby("grad_label")["value"].mean()
    if at0.empty:
        return
    ms = np.geomspace(float(m0), float(cell["grad_n_mc"].max()), 20)
    c = float(at0.max())
    ax.plot(ms, np.full_like(ms, c) if flat else c * m0 / ms, color="k", ls=":", lw=1.3,
            label="variance ∝ 1/M (independent draws): flat in variance × M" if flat
            else "∝ 1/M (independent draws)")


# -- the variance ratio ---------------------------------------------------------------------------
def variance_ratio(res: ExperimentResults) -> pd.DataFrame | None:
    """tr Σ(estimator) / tr Σ(reparam, analytic KL) per method, parameter group, H and M (equal
    M in numerator and denominator), taken per seed and summarised by mean, sd and the mean of
    log10 over seeds; diverged runs excluded.

    Source: ``variance_sweep.csv`` (every estimator measured on the same trained model at its
    final state; ``trained_with`` names the training estimator of that model), else the final
    ``grad_var_total`` of each run in metrics.csv at the probe's M (``trained_with`` = ``own``:
    numerator and denominator then come from models trained with each estimator).
    """
    if "variance_sweep.csv" in res.tables:
        d, _ = sweep_rows(res.tables["variance_sweep.csv"])
        source = "variance_sweep.csv"
        d = d.assign(trained_with=d["estimator_label"], label=d["grad_label"], m=d["grad_n_mc"])
    else:
        d = at_best(res, res.metric("grad_var_total"), ["run_id", "param_group"])
        d = with_probe_m(res, d)
        source = "metrics.csv"
        d = d.assign(trained_with="own", m=d["probe_m"],
                     label=[sweep_label(e, b, k) for e, b, k in
                            zip(d["estimator"], d["baseline"], d["kl"], strict=True)])
    if d.empty:
        return None
    d = d[d["status"] == "ok"]
    keys = ["dataset", "trained_with", "method", "latent_dim", "seed", "m", "param_group"]
    per = d.groupby([*keys, "label"], dropna=False)["value"].mean().reset_index()
    ref = per[per["label"] == REFERENCE].drop(columns="label")
    if ref.empty:
        log.info("%s: no %s variance to divide by; no variance ratio", res.name, REFERENCE)
        return None
    both = per[per["label"] != REFERENCE].merge(ref, on=keys, suffixes=("", "_ref"))
    both = both[both["value_ref"] > 0]
    both = both.assign(ratio=both["value"] / both["value_ref"])
    both["log10_ratio"] = np.log10(both["ratio"])
    group = [k for k in keys if k != "seed"]
    out = (both.groupby([*group, "label"], dropna=False)
           .agg(ratio_mean=("ratio", "mean"), ratio_sd=("ratio", "std"),
                log10_ratio_mean=("log10_ratio", "mean"), n_seeds=("ratio", "size"))
           .reset_index().rename(columns={"label": "estimator", "m": "n_mc"}))
    out.insert(0, "source", source)
    out["reference"] = REFERENCE
    rank = {v: i for i, v in enumerate(
        [*METHOD_ORDER, *sweep_order(out["estimator"]), *(p for g in GROUP_ROWS for p in g[1])])}
    order = out[["method", "estimator", "param_group"]].apply(
        lambda col: col.map(rank).fillna(len(rank))).rename(columns=lambda c: f"_{c}")
    return (pd.concat([out, order], axis=1)
            .sort_values(["dataset", "trained_with", *order.columns, "n_mc", "latent_dim"])
            .drop(columns=order.columns).reset_index(drop=True))

