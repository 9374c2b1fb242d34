"""refinement: semi-amortized inference with 1, 5 or 20 refinement steps (Kim et al. 2018),
the encoder trained at its own output (semi_amortized, "VAE + SVI") or through the refinement
(sa_vae).

Figure ``refinement_vs_steps``: test ELBO at convergence (best epoch), test amortization gap
L[q*] − L[q_φ] and training seconds per epoch against the number of refinement steps (log),
one line per method: mean and 95 % t-interval over seeds, one dot per seed (hollow: not
converged); the ELBO panel carries the no-latent Gaussian and factor analysis at the same H.
"""

from __future__ import annotations

from collections.abc import Iterator

import pandas as pd
from matplotlib.figure import Figure

from experiments.figures.amortization_gap import INPUTS as GAP_INPUTS
from experiments.figures.amortization_gap import per_run_gaps
from experiments.figures.drawing import (
    apply_limits,
    draw_final,
    elbo_limits,
    empty_panel,
    log_axis,
    panel_grid,
    plain_ticks,
    suptitle,
)
from experiments.figures.loading import ExperimentResults, SkipFigure
from experiments.figures.marks import Tally, legend
from experiments.figures.refs import draw_references
from experiments.figures.registry import register
from experiments.figures.style import (
    ELBO_UNITS,
    METHOD_ORDER,
    TRAINING_LENGTH,
    method_colour,
    method_name,
    ordered,
    seeds_text,
)

__all__ = ["STEPS", "fig_refinement"]

#: the runs.csv column of the number of refinement steps
STEPS = "method.refine_steps"
MARKERS = {"semi_amortized": "o", "sa_vae": "s"}


@register("refinement", inputs=GAP_INPUTS)
def fig_refinement(res: ExperimentResults) -> Iterator[tuple[str, Figure]]:
    """Test ELBO, amortization gap and seconds per epoch against refinement steps."""
    if res.runs is None or STEPS not in res.runs.columns:
        raise SkipFigure(f"runs.csv without {STEPS}")
    runs = res.runs.assign(steps=pd.to_numeric(res.runs[STEPS], errors="coerce"))
    try:
        gaps = per_run_gaps(res)
        gaps = gaps[gaps["split"] == "test"].set_index("run_id")["amortization_gap"]
    except SkipFigure:
        gaps = pd.Series(dtype=float)
    if gaps.empty and "final_amortization_gap_test" in runs.columns:
        gaps = runs.set_index("run_id")["final_amortization_gap_test"]
    panels = [("final_elbo_test", f"test ELBO at best epoch\n({ELBO_UNITS})", "test ELBO"),
              ("gap", "test amortization gap\nL[q*] − L[q_φ] (nats)", "amortization gap"),
              ("seconds_per_epoch", "training seconds per epoch", "cost")]
    runs = runs.assign(gap=runs["run_id"].map(gaps))
    panels = [p for p in panels if p[0] in runs.columns and runs[p[0]].notna().any()]
    if not panels:
        raise SkipFigure("no test ELBO, gap or timing in runs.csv")
    methods = ordered(runs["method"], METHOD_ORDER)
    fig, axes = panel_grid(1, len(panels), sharex=True, sharey=False, w=3.6, h=3.2)
    notes: dict[str, str] = {}
    for j, (col, ylabel, name) in enumerate(panels):
        ax = axes[0, j]
        log_axis(ax, "x", base=2)
        d = runs.assign(value=pd.to_numeric(runs[col], errors="coerce"))
        for k, method in enumerate(methods):
            draw_final(ax, d[d["method"] == method], "steps", "value", method_colour(method),
                       marker=MARKERS.get(method, "D"), label=method_name(method),
                       offset=float(2 ** (0.05 * (k - (len(methods) - 1) / 2))))
        if d["value"].notna().sum() == 0:
            empty_panel(ax, "no values")
        if col == "final_elbo_test":
            refs, found = draw_references(ax, res, runs, "test", runs["latent_dim"].iloc[0])
            notes |= found
            values = [pd.concat([d["value"].dropna(), pd.Series(refs, dtype=float)])]
            apply_limits([ax], elbo_limits(values, keep=refs), values)
        plain_ticks(ax, runs["steps"])
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("refinement steps (log₂)")
        ax.set_ylabel(ylabel)
    tally = Tally(key="method").add(runs.assign(method=runs["method"].map(method_name)))
    ok = runs[runs["status"] == "ok"]
    est = ", ".join(ordered(runs["estimator_label"]))
    suptitle(fig, f"{'/'.join(ordered(runs['dataset']))}, H = {runs['latent_dim'].iloc[0]:g}, "
                  f"{est}: semi-amortized (encoder trained at its own output) vs SA-VAE "
                  f"(encoder trained through the refinement) {TRAINING_LENGTH}; mean and 95 % "
                  f"t-interval over {seeds_text(ok['seed'])}")
    legend(fig, title="method (mean, 95 % interval)", notes={**tally.notes(), **notes},
           order=[method_name(m) for m in METHOD_ORDER])
    yield "refinement_vs_steps", fig

