"""Inference steps per training step: variational EM with more E-steps, SA-VAE vs
semi-amortized refinement, and more refinement steps."""

from __future__ import annotations

import numpy as np
import pandas as pd

from experiments.findings.core import (
    NOT_SUPPORTED,
    RULE_TAIL,
    Finding,
    _cells,
    _extremes,
    _iv,
    _iv_of,
    _judge,
    _judged_display,
    _key_text,
    _num,
    _overall,
    _paired,
    _ratio,
    _with_display,
    register,
    register_each,
)
from experiments.findings.study import _budget_pairs, _curves, _left_out, _Study


def _e_steps_setting(runs: pd.DataFrame) -> tuple[pd.Series, pd.Series]:
    """Each run's E-step setting as text, and a rank (E-steps, + 0.5 with a tolerance)."""
    steps = pd.to_numeric(runs.get("method.e_steps", pd.Series(np.nan, index=runs.index)),
                          errors="coerce")
    tol = pd.to_numeric(runs.get("method.e_tol", pd.Series(np.nan, index=runs.index)),
                        errors="coerce")
    return pd.Series([f"{int(s)} E-steps" + (f" (tol {t:g})" if np.isfinite(t) else "")
                      if np.isfinite(s) else "?" for s, t in zip(steps, tol, strict=True)],
                     index=runs.index), steps + np.where(np.isfinite(tol), 0.5, 0.0)


@register_each("f_vem_e_steps", "epochs", "seconds")
def _vem_e_steps(st: _Study, budget: str) -> Finding:
    word = "epochs" if budget == "epochs" else "wall-clock time"
    claim = ("More E-steps per minibatch give a higher test ELBO after the same number of "
             "epochs: each M-step then follows a fuller E-step, a tighter bound."
             if budget == "epochs" else
             "More E-steps per minibatch still give a higher test ELBO at equal training "
             "wall-clock time, although each epoch costs more.")
    f = Finding(
        f"vem_e_steps_{budget}",
        f"Variational EM with more E-steps, at equal {word}",
        claim,
        "Neal & Hinton 1998 (partial E-steps); Hoffman et al. 2013 (local steps to convergence); "
        + ("the study's choice of vem's E-steps" if budget != "epochs" else "Cremer et al. 2018"),
        f"effect per seed pair = test ELBO(k E-steps) − test ELBO(fewest E-steps), each at its "
        f"last evaluation within the pair's common "
        f"{'epochs' if budget == 'epochs' else 'training seconds'}; cells = setting k; "
        f"threshold 0. " + RULE_TAIL,
        ("vem_e_steps/metrics.csv", "vem_e_steps/runs.csv"))
    runs, _ = st.finished("vem_e_steps", final=False)
    c, left = _curves(st, "vem_e_steps")
    if c is None or runs is None or "method.e_steps" not in runs:
        f.evidence = "not measured: no vem_e_steps results."
        return f
    name, rank = _e_steps_setting(runs)
    lab = pd.DataFrame({"run_id": runs["run_id"], "k": name, "rank": rank})
    c = c.merge(lab, on="run_id", how="left")
    order = lab.drop_duplicates("k").sort_values("rank")["k"].tolist()
    if len(order) < 2:
        f.evidence = "not measured: fewer than two E-step settings."
        return f
    base = order[0]
    p = pd.concat([_budget_pairs(c.assign(_all="all"), ["_all"], "k", k, [base], budget
                                 ).assign(k=k) for k in order[1:]], ignore_index=True)
    cells = _judge(_cells(p, ["k"]))
    cells = cells.set_index("k").reindex([k for k in order[1:] if k in set(cells["k"])]
                                         ).reset_index()
    f.table = cells
    if cells.empty:
        f.evidence = "not measured: no seed pairs across E-step settings."
        return f
    f.verdict = _overall(cells["judgement"])
    f.contradicts = False  # a design question more than a literature claim
    spe = runs.assign(k=name).groupby("k")["seconds_per_epoch"].median() \
        if "seconds_per_epoch" in runs else pd.Series(dtype=float)
    disp = _judged_display(cells, {"k": "setting"},
                           f"ELBO − ELBO({base}), nats [95 % CI]")
    disp.insert(1, "s / epoch (median)", [_num(spe.get(k, np.nan), 3) for k in cells["k"]])
    _with_display(f, disp)
    unit = "epochs" if budget == "epochs" else "s"
    f.evidence = (f"Baseline {base} ({_num(spe.get(base, np.nan), 3)} s / epoch); common "
                  f"budget per pair: median {_num(p['budget'].median(), 1)} {unit}. Gain (nats) "
                  + _extremes(cells, ["k"], _iv_of) + "." + _left_out(left))
    return f


# ---------------------------------------------------------------------------- refinement


def _refinement(st: _Study, other: str) -> tuple[pd.DataFrame, int]:
    """The converged refinement runs' test ELBO and ``other`` (wide), with ``K`` = each run's
    refinement steps, and the count left out; empty without finished runs with a test ELBO."""
    w, left = st.final_values("refinement", ["test_elbo", other])
    runs = st.runs("refinement")
    if w.empty or runs is None or "test_elbo" not in w:
        return pd.DataFrame(), left
    steps = pd.to_numeric(runs.get("method.refine_steps", pd.Series(np.nan, index=runs.index)),
                          errors="coerce")
    return w.merge(runs[["run_id"]].assign(K=steps), on="run_id", how="left"), left


@register
def f_sa_vae_vs_semi(st: _Study) -> Finding:
    f = Finding(
        "sa_vae_vs_semi_amortized",
        "SA-VAE vs semi-amortized ('VAE + SVI') at equal refinement steps",
        "Training the encoder through the refinement (SA-VAE) gives a higher test ELBO than "
        "training it at its own output while the decoder learns at the refined posterior "
        "(VAE + SVI), at the same number of refinement steps K.",
        "Kim et al. 2018",
        "effect per seed pair = test ELBO(sa_vae) − test ELBO(semi_amortized) at the same K "
        "(whole test split, best epoch, converged runs); cells = K; threshold 0. " + RULE_TAIL,
        ("refinement/runs.csv", "refinement/gaps.csv"))
    w, left = _refinement(st, "test_amortization_gap")
    if w.empty:
        f.evidence = "not measured: no finished refinement runs." + _left_out(left)
        return f
    d = _paired(w, ["K"], ["seed"], "method", "sa_vae", "semi_amortized", value="test_elbo")
    cells = _judge(_cells(d, ["K"]))
    f.table = cells
    if cells.empty:
        f.evidence = "not measured: no seed pairs of sa_vae and semi_amortized." + \
            _left_out(left)
        return f
    f.verdict = _overall(cells["judgement"])
    f.contradicts = f.verdict == NOT_SUPPORTED
    disp = _judged_display(cells, {"K": "K"}, "test ELBO(sa_vae) − ELBO(semi), nats [95 % CI]")
    if "test_amortization_gap" in w:
        g = _cells(_paired(w, ["K"], ["seed"], "method", "sa_vae", "semi_amortized",
                           value="test_amortization_gap"), ["K"])
        g = cells[["K"]].merge(g, on="K", how="left")
        disp.insert(len(disp.columns) - 1, "amort. gap(sa_vae) − gap(semi)",
                    [_iv(m, lo, hi, int(n) if np.isfinite(n) else 0) for m, lo, hi, n in
                     zip(g["mean"], g["lo"], g["hi"], g["n"].astype(float), strict=True)])
    _with_display(f, disp)
    f.evidence = ("SA-VAE − semi-amortized test ELBO (nats) "
                  + _extremes(cells, ["K"], _iv_of) + "." + _left_out(left))
    return f


@register
def f_more_refine_steps(st: _Study) -> Finding:
    f = Finding(
        "more_refinement_steps",
        "More refinement steps: held-out ELBO and cost",
        "More refinement steps K improve the test ELBO of semi-amortized inference (with the "
        "cost of each epoch growing with K).",
        "Kim et al. 2018; Krishnan et al. 2018",
        "effect per seed pair = test ELBO(K_max) − test ELBO(K_min), same method (converged "
        "runs); cells = method; threshold 0. The cost is the ratio of seconds per epoch over "
        "the same pairs. " + RULE_TAIL,
        ("refinement/runs.csv",))
    w, left = _refinement(st, "seconds_per_epoch")
    if w.empty:
        f.evidence = "not measured: no finished refinement runs." + _left_out(left)
        return f
    ks = sorted(w["K"].dropna().unique())
    if len(ks) < 2:
        f.evidence = "not measured: fewer than two refinement step counts." + _left_out(left)
        return f
    lo_k, hi_k = ks[0], ks[-1]
    d = _paired(w, ["method"], ["seed"], "K", hi_k, lo_k, value="test_elbo")
    cells = _judge(_cells(d, ["method"]))
    f.table = cells
    if cells.empty:
        f.evidence = "not measured: no seed pairs across refinement step counts."
        return f
    f.verdict = _overall(cells["judgement"])
    f.contradicts = f.verdict == NOT_SUPPORTED
    disp = _judged_display(cells, {"method": "method"},
                           f"ELBO(K={_key_text(hi_k)}) − ELBO(K={_key_text(lo_k)}) [95 % CI]")
    if "seconds_per_epoch" in w:
        c = _cells(_paired(w, ["method"], ["seed"], "K", hi_k, lo_k, value="seconds_per_epoch",
                           log=True), ["method"])
        c = cells[["method"]].merge(c, on="method", how="left")
        disp.insert(len(disp.columns) - 1, "s / epoch ratio",
                    [_ratio(m, lo, hi, int(n) if np.isfinite(n) else 0) for m, lo, hi, n in
                     zip(c["mean"], c["lo"], c["hi"], c["n"].astype(float), strict=True)])
    _with_display(f, disp)
    f.evidence = (f"K ∈ {{{', '.join(_key_text(k) for k in ks)}}}; gain from K = "
                  f"{_key_text(lo_k)} to {_key_text(hi_k)} (nats) "
                  + _extremes(cells, ["method"], _iv_of) + "." + _left_out(left))
    return f
