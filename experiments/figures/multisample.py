"""multisample: the importance-weighted bound's gradient estimators against K, and training with
tighter bounds.

Figure ``snr_vs_k_<stage>`` (from ``k_sweep.csv``; stage ``epoch<e>`` during training, ``final``
at the end): the mean coordinate SNR (``grad_snr_mean``) of the IWAE gradient against K at a
fixed number M of groups, log-log; rows = parameter group (the inference parameters: the
encoder φ of the VAE or vem's λ; the decoder θ), columns = data set × method, colour = the
measured estimator (score+loo is VIMCO). Dotted lines of slope −1/2 and +1/2 through reparam's
value at the smallest K: Rainforth et al. (2018) predict K^(−1/2) for the inference gradient and
K^(+1/2) for the decoder's with reparam; Tucker et al. (2019) a rising SNR for DReG.

Figure ``training_vs_k_<dataset>``: models trained with K samples (K = 1: the ELBO with reparam,
the first point of every estimator's curve) per training estimator; rows = test ELBO, test
IWAE bound L_k of the method's own posterior at the largest k measured (``iwae_bounds.csv``),
test log p(x) (exact for a linear decoder, else AIS, from ``gaps.csv``) and the test
amortization gap; columns = method; mean and 95 % t-interval over seeds.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from experiments.figures.drawing import (
    bottom_xlabels,
    draw_final,
    empty_panel,
    log_axis,
    panel_grid,
    plain_ticks,
    suptitle,
)
from experiments.figures.loading import ExperimentResults, SkipFigure
from experiments.figures.marks import legend
from experiments.figures.registry import register
from experiments.figures.style import (
    METHOD_ORDER,
    estimator_label,
    label_colour,
    marker_of,
    method_name,
    ordered,
    seeds_text,
)

__all__ = [
    "INFERENCE_GROUPS",
    "INPUTS",
    "fig_snr_vs_k",
    "fig_training_vs_k",
    "k_column",
    "log_px_per_run",
    "sweep_frame",
]

log = logging.getLogger(__name__)

INPUTS = {"k_sweep.csv": ("run_id", "method", "dataset", "seed", "epoch", "param_group",
                          "grad_estimator", "grad_baseline", "grad_k", "metric", "value")}
TRAINING_INPUTS = {"iwae_bounds.csv": ("run_id", "split", "k", "value"),
                   "gaps.csv": ("run_id", "split", "amortization_gap")}
#: the inference parameters of each method's row: the encoder of an amortized method, else λ
INFERENCE_GROUPS = ("encoder", "local")
GROUPS = (("inference", INFERENCE_GROUPS, "inference: encoder φ / local λ"),
          ("decoder", ("decoder",), "decoder θ"))
SWEEP_ORDER = ("reparam", "stl", "dreg", "score+none", "score+loo")


def sweep_frame(sweep: pd.DataFrame, metric: str = "grad_snr_mean") -> pd.DataFrame:
    """The rows of ``metric`` with ``grad_label`` (the measured estimator's label) and
    ``stage`` (``final`` at each run's last epoch, else ``epoch <e>``)."""
    d = sweep[sweep["metric"] == metric].copy()
    if d.empty:
        return d
    last = d.groupby("run_id")["epoch"].transform("max")
    d["stage"] = np.where(d["epoch"] == last, "final",
                          "epoch " + d["epoch"].astype(int).astype(str))
    d["grad_label"] = [estimator_label(e, b) for e, b in
                       zip(d["grad_estimator"], d["grad_baseline"], strict=True)]
    d["grad_k"] = d["grad_k"].astype(float)
    return d


def _reference_slopes(ax, cell: pd.DataFrame) -> None:
    ref = cell[cell["grad_label"] == "reparam"]
    if ref.empty:
        ref = cell
    k0 = float(ref["grad_k"].min())
    at0 = ref.loc[ref["grad_k"] == k0, "value"].astype(float)
    at0 = at0[at0 > 0]
    if at0.empty:
        return
    c = float(10 ** np.log10(at0).mean())
    ks = np.geomspace(k0, float(cell["grad_k"].max()), 20)
    ax.plot(ks, c * (ks / k0) ** -0.5, color="k", ls=":", lw=1.2, label="∝ K^(−1/2)")
    ax.plot(ks, c * (ks / k0) ** 0.5, color="0.5", ls=":", lw=1.2, label="∝ K^(+1/2)")


def _mean_log_curve(ax, d: pd.DataFrame, label: str) -> None:
    v = d[d["value"] > 0]
    if v.empty:
        return
    stats = np.log10(v["value"].astype(float)).groupby(v["grad_k"]).agg(["mean", "std"])
    xs = stats.index.to_numpy(float)
    mid, sd = stats["mean"].to_numpy(), stats["std"].fillna(0.0).to_numpy()
    colour = label_colour(label)
    ax.plot(xs, 10 ** mid, color=colour, marker=marker_of(label), ms=4, lw=1.8, label=label)
    if (sd > 0).any():
        ax.fill_between(xs, 10 ** (mid - sd), 10 ** (mid + sd), color=colour, alpha=0.2, lw=0,
                        label="_band")


@register("multisample", inputs=INPUTS)
def fig_snr_vs_k(res: ExperimentResults) -> Iterator[tuple[str, Figure]]:
    """log SNR against log K per parameter group and estimator, with slopes ±1/2."""
    d = sweep_frame(res.table("k_sweep.csv", INPUTS["k_sweep.csv"]))
    d = d[d["status"] == "ok"] if len(d) else d
    if d.empty:
        raise SkipFigure("no grad_snr_mean rows in k_sweep.csv")
    panels = [(ds, m) for ds in ordered(d["dataset"])
              for m in ordered(d.loc[d["dataset"] == ds, "method"], METHOD_ORDER)]
    m_groups = sorted(d["grad_n_mc"].unique()) if "grad_n_mc" in d else []
    for stage in ordered(d["stage"], ("final",))[::-1]:
        sd = d[d["stage"] == stage]
        fig, axes = panel_grid(len(GROUPS), len(panels), sharex=True, sharey=False,
                               w=3.0, h=2.6)
        for i, (_, groups, row_name) in enumerate(GROUPS):
            for j, (ds, method) in enumerate(panels):
                ax = axes[i, j]
                cell = sd[(sd["dataset"] == ds) & (sd["method"] == method)
                          & sd["param_group"].isin(groups)]
                ax.set_title(f"{ds}, {method_name(method)}", fontsize=9)
                if cell.empty:
                    empty_panel(ax, "no such parameters")
                    continue
                log_axis(ax, "x", base=2)
                log_axis(ax, "y")
                for lab in ordered(cell["grad_label"], SWEEP_ORDER):
                    _mean_log_curve(ax, cell[cell["grad_label"] == lab], lab)
                _reference_slopes(ax, cell)
                plain_ticks(ax, cell["grad_k"])
                ax.set_xlabel("samples per group K (log₂)")
                ax.set_ylabel(f"{row_name}\nmean SNR (log)" if j == 0 else "")
        bottom_xlabels(axes)
        when = ("at the end of training (best epoch)" if stage == "final"
                else f"during training ({stage})")
        m_text = ", ".join(f"{float(m):g}" for m in m_groups) or "?"
        suptitle(fig, f"IWAE gradient SNR (mean over coordinates of |mean| / sd) against K at "
                      f"fixed M = {m_text}, on the models trained with the ELBO (reparam) "
                      f"{when}, every estimator on the same minibatch and noise; score+loo is "
                      f"VIMCO; geometric mean ×/÷ sd over {seeds_text(sd['seed'])}. Rainforth "
                      f"et al. (2018): inference ∝ K^(−1/2), decoder ∝ K^(+1/2) with reparam")
        legend(fig, title="measured estimator (band: ×/÷ sd over seeds)", order=SWEEP_ORDER)
        stem = "final" if stage == "final" else stage.replace(" ", "")
        yield f"snr_vs_k_{stem}", fig


def k_column(res: ExperimentResults) -> pd.Series | None:
    """run_id → the training K (``method.k`` in runs.csv), or None without it."""
    if res.runs is None or "method.k" not in res.runs.columns:
        return None
    return res.runs.drop_duplicates("run_id").set_index("run_id")["method.k"].astype(float)


def log_px_per_run(gaps: pd.DataFrame, split: str = "test") -> pd.DataFrame:
    """Per run: the mean over the gaps probe's points of log p(x) (exact where the decoder has
    a closed form, else AIS, else IWAE) and of the amortization gap."""
    g = gaps[gaps["split"] == split].copy()
    if g.empty:
        return pd.DataFrame(columns=["run_id", "log_px", "amortization_gap"])
    lp = pd.Series(np.nan, index=g.index)
    for col in ("log_px_iwae", "log_px_ais", "log_px_exact"):  # the last present wins
        if col in g:
            lp = g[col].astype(float).where(g[col].notna(), lp)
    g["log_px"] = lp
    return g.groupby("run_id", as_index=False)[["log_px", "amortization_gap"]].mean()


def _training_rows(res: ExperimentResults) -> tuple[pd.DataFrame, str]:
    """Per run: dataset, method, seed, K, training label, status, converged and the four
    quantities (long: ``quantity``, ``value``)."""
    ks = k_column(res)
    if ks is None or res.runs is None:
        raise SkipFigure("runs.csv has no method.k column")
    runs = res.runs.drop_duplicates("run_id").copy()
    runs["K"] = runs["run_id"].map(ks)
    parts = []
    if "final_elbo_test" in runs:
        parts.append(runs[["run_id"]].assign(quantity="test ELBO",
                                             value=runs["final_elbo_test"].astype(float)))
    kmax = np.nan
    if "iwae_bounds.csv" in res.tables:
        b = res.tables["iwae_bounds.csv"]
        b = b[b["split"] == "test"]
        if len(b):
            kmax = float(b["k"].max())
            b = b[b["k"] == kmax].groupby("run_id", as_index=False)["value"].mean()
            parts.append(b.assign(quantity=f"test IWAE L_{kmax:g}"))
    if "gaps.csv" in res.tables:
        g = log_px_per_run(res.tables["gaps.csv"])
        parts.append(g[["run_id"]].assign(quantity="test log p(x)", value=g["log_px"]))
        parts.append(g[["run_id"]].assign(quantity="test amortization gap",
                                          value=g["amortization_gap"]))
    if not parts:
        raise SkipFigure("no test ELBO, IWAE bounds or gaps")
    long = pd.concat(parts, ignore_index=True)
    keep = ["run_id", "dataset", "method", "seed", "K", "estimator_label", "status", "converged"]
    long = long.merge(runs[[c for c in keep if c in runs.columns]], on="run_id")
    return long, f"{kmax:g}"


@register("multisample", inputs=TRAINING_INPUTS)
def fig_training_vs_k(res: ExperimentResults) -> Iterator[tuple[str, Figure]]:
    """Test ELBO, IWAE bound, log p(x) and amortization gap against the training K."""
    long, _ = _training_rows(res)
    base = long[long["K"] == 1]
    labels = [lab for lab in ordered(long.loc[long["K"] > 1, "estimator_label"], SWEEP_ORDER)]
    if not labels:
        raise SkipFigure("no models trained with K > 1")
    quantities = ordered(long["quantity"], ("test ELBO",))
    for ds in ordered(long["dataset"]):
        dd = long[long["dataset"] == ds]
        methods = ordered(dd["method"], METHOD_ORDER)
        fig, axes = panel_grid(len(quantities), len(methods), sharex=True, sharey="row",
                               w=3.3, h=2.4)
        for i, q in enumerate(quantities):
            for j, method in enumerate(methods):
                ax = axes[i, j]
                cell = dd[(dd["quantity"] == q) & (dd["method"] == method)]
                ax.set_title(f"{method_name(method)}", fontsize=9)
                if cell.empty:
                    empty_panel(ax, "not measured")
                    continue
                log_axis(ax, "x")
                ref = base[(base["dataset"] == ds) & (base["quantity"] == q)
                           & (base["method"] == method)]
                for n, lab in enumerate(labels):
                    cur = pd.concat([ref, cell[(cell["estimator_label"] == lab)
                                               & (cell["K"] > 1)]])
                    draw_final(ax, cur, "K", "value", label_colour(lab), marker=marker_of(lab),
                               label=lab, offset=1.0 + 0.06 * (n - 1), seeds=False)
                plain_ticks(ax, dd["K"].dropna())
                ax.set_xlabel("training K (log)")
                ax.set_ylabel(f"{q} (nats)" if j == 0 else "")
        bottom_xlabels(axes)
        suptitle(fig, f"{ds}: models trained with the IWAE bound L_K (K = 1: the ELBO with "
                      f"reparam, the first point of every curve) by training estimator "
                      f"(score+loo = VIMCO), each until its stopping rule; test quantities of "
                      f"the method's own posterior, log p(x) exact for a linear decoder else by "
                      f"AIS; mean and 95 % t-interval over {seeds_text(dd['seed'])}")
        legend(fig, title="training estimator (errorbar: mean and 95 % t-interval)",
               order=SWEEP_ORDER)
        yield f"training_vs_k_{ds}", fig
