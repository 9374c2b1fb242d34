"""Posterior collapse: active units against the latent dimension, and by method."""

from __future__ import annotations

import pandas as pd

from experiments.findings.core import (
    NOT_MEASURED,
    NOT_SUPPORTED,
    RULE_TAIL,
    Finding,
    _cells,
    _extremes,
    _iv_of,
    _judge,
    _judged_display,
    _key_text,
    _num,
    _overall,
    _with_display,
    register,
)
from experiments.findings.study import _left_out, _Study, _vs_amortized


def _units(st: _Study) -> tuple[pd.DataFrame, pd.DataFrame, int, str]:
    """The converged runs' active units (with ``H``, the latent dimension as a number), the
    rows at their experiment's and data set's largest H, the count left out, and a note
    naming each experiment and data set whose largest H has no converged amortized run.

    The largest H is the experiment's (over all its finished runs, converged or not): where
    its runs there did not converge, the claim about the largest H is not measured there,
    rather than judged at a smaller H."""
    parts, lefts, missing = [], 0, []
    for exp in ("elbo_curves", "mnist_curves"):
        w, left = st.final_values(exp, ["test_active_units"])
        lefts += left
        finished, _ = st.finished(exp, final=False)
        if not len(w) or "test_active_units" not in w or finished is None:
            continue
        w["H"] = pd.to_numeric(w["latent_dim"], errors="coerce")
        largest = pd.to_numeric(finished["latent_dim"], errors="coerce").groupby(
            finished["dataset"]).max()
        w = w.assign(H_max=w["dataset"].map(largest))
        parts.append(w)
        for dataset, h in largest.items():
            if not ((w["dataset"] == dataset) & (w["H"] == h)
                    & (w["method"] == "amortized")).any():
                missing.append(f"`{exp}` on {dataset} at H = {h:g}")
    if not parts:
        return pd.DataFrame(), pd.DataFrame(), lefts, ""
    w = pd.concat(parts, ignore_index=True)
    top = w[w["H"] == w["H_max"]]
    note = (f" No amortized run converged at the largest H of {', '.join(missing)}: not "
            "measured there." if missing else "")
    return w, top, lefts, note


@register
def f_posterior_collapse(st: _Study) -> Finding:
    f = Finding(
        "posterior_collapse",
        "Posterior collapse: active units against the latent dimension",
        "In the amortized VAE, active units stop growing with H: at the largest latent "
        "dimension some units are inactive (their posterior mean does not vary with x), i.e. "
        "AU < H.",
        "Burda, Grosse & Salakhutdinov 2016 (active units); Lucas et al. 2019; He et al. 2019",
        "effect per converged run at the experiment's largest H = H − active units (test "
        "split; a unit is active when Cov_x(E_q[z_h]) > 0.01); cells = experiment × data set × "
        "estimator for the amortized method (the other methods are shown, not tested); support "
        "threshold 0, contradiction threshold 0.5 (fewer than half a unit inactive on "
        "average). " + RULE_TAIL,
        ("elbo_curves/runs.csv", "mnist_curves/runs.csv"))
    w, top, left, missing = _units(st)
    if w.empty:
        f.evidence = "not measured: no active-unit counts." + _left_out(left)
        return f
    top = top.assign(d=top["H"] - top["test_active_units"])
    by = ["experiment", "dataset", "method", "estimator_label"]
    cells = _judge(_cells(top, by), support=0.0, contradict=0.5)
    tested = cells[cells["method"] == "amortized"]
    f.table = tested
    f.verdict = _overall(tested["judgement"])
    f.contradicts = f.verdict == NOT_SUPPORTED
    au = w.groupby([*by, "H"])["test_active_units"].mean().unstack("H")
    disp = _judged_display(cells, {"experiment": "experiment", "dataset": "data set",
                                   "method": "method", "estimator_label": "estimator"},
                           "inactive units at largest H [95 % CI]", digits=1)
    au = cells[by].merge(au.reset_index(), on=by, how="left")
    for h in [c for c in au.columns if c not in by]:
        disp.insert(len(disp.columns) - 2, f"AU at H={_key_text(h)}",
                    [_num(v, 1) for v in au[h]])
    disp.loc[cells["method"].to_numpy() != "amortized", "judgement"] = "(not tested)"
    _with_display(f, disp)
    if tested.empty:
        f.verdict = NOT_MEASURED
        f.evidence = ("not measured: no amortized runs with active units." + missing
                      + _left_out(left))
        return f
    f.evidence = ("Inactive units of the amortized VAE at the largest H "
                  + _extremes(tested, by, lambda r: _iv_of(r, 1))
                  + "; the AU columns give the mean active units at each H, for every method."
                  + missing + _left_out(left))
    return f


@register
def f_collapse_by_method(st: _Study) -> Finding:
    f = Finding(
        "active_units_by_method",
        "Does refinement or per-point inference keep more units active?",
        "Methods whose posterior is not the encoder's one-pass output — semi-amortized "
        "refinement and SA-VAE — keep more latent units active than the amortized VAE at the "
        "largest H (the inference network's lag drives collapse).",
        "Kim et al. 2018; He et al. 2019",
        "effect per seed pair at the largest H = active units(method) − active units(amortized) "
        "(converged runs); cells = experiment × data set × estimator × method ∈ "
        "{semi_amortized, sa_vae} (vem shown, not tested); threshold 0. " + RULE_TAIL,
        ("elbo_curves/runs.csv", "mnist_curves/runs.csv"))
    w, top, left, missing = _units(st)
    if w.empty:
        f.evidence = "not measured: no active-unit counts." + _left_out(left)
        return f
    d = _vs_amortized(top, "test_active_units", ["experiment", "dataset", "estimator_label"],
                      ("semi_amortized", "sa_vae", "vem"))
    cells = _judge(_cells(d, ["experiment", "dataset", "estimator_label", "method"]))
    tested = cells[cells["method"] != "vem"]
    f.table = tested
    if tested.empty:
        f.evidence = ("not measured: no seed pairs with the amortized VAE." + missing
                      + _left_out(left))
        return f
    f.verdict = _overall(tested["judgement"])
    f.contradicts = f.verdict == NOT_SUPPORTED
    disp = _judged_display(cells, {"experiment": "experiment", "dataset": "data set",
                                   "estimator_label": "estimator", "method": "method"},
                           "AU(method) − AU(amortized) [95 % CI]", digits=1)
    disp.loc[cells["method"].to_numpy() == "vem", "judgement"] = "(not tested)"
    _with_display(f, disp)
    f.evidence = ("Difference in active units " + _extremes(
        tested, ["experiment", "estimator_label", "method"], lambda r: _iv_of(r, 1))
        + "." + missing + _left_out(left))
    return f
