"""vem_e_steps: variational EM with 1, 5 or 20 E-steps per minibatch, or E-steps until the
minibatch ELBO changes by less than a tolerance.

Figure ``elbo_vs_epoch_and_seconds``: train (top) and test (bottom) ELBO against epochs (left)
and training wall-clock seconds (right, log), hue = E-step setting (its seconds per epoch in the
legend), with the no-latent Gaussian and factor analysis at the same H; the choice of vem's
setting for the other experiments is made at equal wall-clock time (right column).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from experiments.figures.curves import Cell, elbo_grid
from experiments.figures.drawing import suptitle
from experiments.figures.loading import ExperimentResults, SkipFigure
from experiments.figures.marks import Tally, legend
from experiments.figures.registry import register
from experiments.figures.style import ELBO_UNITS, m_text, ordered, seeds_text

__all__ = ["fig_vem_e_steps", "setting_of"]


def setting_of(runs: pd.DataFrame) -> pd.Series:
    """Each run's E-step setting as words: ``5 E-steps`` or ``until ΔELBO < 0.05 (≤ 50)``."""
    steps = pd.to_numeric(runs.get("method.e_steps", np.nan), errors="coerce")
    tol = pd.to_numeric(runs.get("method.e_tol", np.nan), errors="coerce")
    words = []
    for s, t in zip(steps, tol, strict=True):
        if pd.notna(t):
            words.append(f"until ΔELBO < {t:g} nats (≤ {s:g})")
        elif pd.notna(s):
            words.append(f"{s:g} E-step{'s' * (s != 1)} per minibatch")
        else:
            words.append("default")
    return pd.Series(words, index=runs.index)


def _order(runs: pd.DataFrame) -> list[str]:
    """Settings by fixed E-steps first (ascending), the tolerance rules last."""
    r = runs.assign(_s=pd.to_numeric(runs.get("method.e_steps", np.nan), errors="coerce"),
                    _t=pd.to_numeric(runs.get("method.e_tol", np.nan), errors="coerce").notna())
    r = r.sort_values(["_t", "_s"])
    return list(dict.fromkeys(r["setting"]))


@register("vem_e_steps")
def fig_vem_e_steps(res: ExperimentResults) -> Iterator[tuple[str, Figure]]:
    """Train and test ELBO against epochs and seconds, one curve per E-step setting."""
    if res.runs is None or "method.e_steps" not in res.runs.columns:
        raise SkipFigure("runs.csv without method.e_steps")
    runs = res.runs.assign(setting=setting_of(res.runs))
    d = res.metric("elbo")
    d = d.assign(setting=d["run_id"].map(runs.set_index("run_id")["setting"]))
    if d.empty:
        raise SkipFigure("no elbo rows")
    order = _order(runs)
    colours = sns.color_palette("crest", len(order))
    palette = dict(zip(order, colours, strict=True))
    splits = [s for s in ("train", "test") if (d["split"] == s).any()]
    h = runs["latent_dim"].iloc[0]
    cells = [[Cell(f"{split} split, against {'epochs' if x == 'epoch' else 'seconds'}",
                   d[d["split"] == split], runs, split, h, f"{split} ELBO ({ELBO_UNITS})", x=x)
              for x in ("epoch", "wall_s")] for split in splits]
    fig, _, notes = elbo_grid(res, cells, "epoch", palette, key="setting")
    spe = runs.groupby("setting")["seconds_per_epoch"].mean() \
        if "seconds_per_epoch" in runs.columns else pd.Series(dtype=float)
    tally = Tally(key="setting").add(runs)
    for s in order:
        parts = [f"{spe[s]:.3g} s / epoch"] if s in spe and pd.notna(spe[s]) else []
        if tally.text(s):
            parts.append(tally.text(s))
        notes[s] = ", ".join(parts)
    suptitle(fig, f"{'/'.join(ordered(runs['dataset']))}, H = {h:g}, variational EM "
                  f"({', '.join(ordered(runs['estimator_label']))}): train and test ELBO against "
                  f"epochs and training seconds per E-step setting, each run until its stopping "
                  f"rule; {m_text(runs)}; mean ± sd over {seeds_text(runs['seed'])}")
    legend(fig, title="E-step setting (line, band: mean ± sd over seeds)", notes=notes,
           order=order)
    yield "elbo_vs_epoch_and_seconds", fig
