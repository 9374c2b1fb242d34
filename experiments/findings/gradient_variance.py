"""Gradient variance: score function vs reparameterization at equal M, the ratio against the
latent dimension, the score function's baselines, and sticking the landing near an optimum."""

from __future__ import annotations

import numpy as np
import pandas as pd

from experiments import summary as S
from experiments.findings.core import (
    INCONCLUSIVE,
    NOT_MEASURED,
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
    _md_table,
    _num,
    _overall,
    _paired,
    _ratio_of,
    _with_display,
    register,
)
from experiments.findings.study import _left_out, _Study


def _sweep(st: _Study, exp: str, final: bool) -> pd.DataFrame | None:
    """variance_sweep.csv, grad_var_total rows of finished runs at their last measurement,
    with ``est`` = estimator+baseline+kl; vem's ``local`` group (the same numbers as
    ``variational``) dropped."""
    sw = st.csv(exp, "variance_sweep")
    need = {"run_id", "param_group", "grad_estimator", "grad_n_mc", "metric", "value"}
    if sw is None or sw.empty or not need <= set(sw.columns):
        return None
    sw = sw[sw["metric"] == "grad_var_total"].copy()
    sw["grad_baseline"] = (sw["grad_baseline"].astype(object).where(sw["grad_baseline"].notna(),
                                                                    "none")
                           if "grad_baseline" in sw else "none")
    sw["grad_kl"] = (sw["grad_kl"].astype(object).where(sw["grad_kl"].notna(), "analytic")
                     if "grad_kl" in sw else "analytic")
    runs, _ = st.finished(exp, final)
    if runs is not None:
        sw = sw[sw["run_id"].isin(runs["run_id"])]
    if "epoch" in sw and len(sw):
        sw = sw[sw["epoch"] == sw.groupby("run_id")["epoch"].transform("max")]
    has_var = set(sw.loc[sw["param_group"] == "variational", "run_id"])
    sw = sw[~((sw["param_group"] == "local") & sw["run_id"].isin(has_var))]
    sw["est"] = sw["grad_estimator"].astype(str) + "+" + sw["grad_baseline"].astype(str) + "+" \
        + sw["grad_kl"].astype(str)
    for c in ("method", "latent_dim", "seed"):
        if c not in sw:
            sw[c] = np.nan
    return sw if len(sw) else None


def _training_sweep(st: _Study, f: Finding) -> pd.DataFrame | None:
    """gradient_variance's sweep (``_sweep`` of every finished run); None, with ``f`` not
    measured, when there is none."""
    sw = _sweep(st, "gradient_variance", final=False)
    if sw is None:
        f.evidence = "not measured: no variance sweep in gradient_variance."
    return sw


@register
def f_score_vs_reparam_variance(st: _Study) -> Finding:
    f = Finding(
        "score_vs_reparam_variance",
        "Score-function vs reparameterization gradient variance at equal M",
        "Without a baseline, the score-function (REINFORCE) estimator of the ELBO gradient has a "
        "larger total variance tr Σ than the reparameterization estimator at the same number of "
        "samples M, for the variational parameters of every method (λ, the local table, the "
        "encoder), at every latent dimension H and M measured.",
        "Kingma & Welling 2014, §2.3 and the comparison with the likelihood-ratio estimator; "
        "Mohamed et al. 2020, score-function vs pathwise estimator properties",
        "effect per run and cell (parameter group × H × M, methods pooled) = log10(tr Σ_score+none"
        " / tr Σ_reparam), both with the analytic KL, measured on the same model, minibatch and "
        "noise; threshold 0 (ratio 1). The decoder group is not a test (both estimators use the "
        "pathwise ∇_θ log p(x | z) there) and is reported only as a check. " + RULE_TAIL,
        ("gradient_variance/variance_sweep.csv", "gradient_variance/runs.csv",
         "gradient_variance/metrics.csv"))
    sw = _training_sweep(st, f)
    if sw is None:
        return f
    unit = ["method", "seed", "run_id"]
    by = ["param_group", "latent_dim", "grad_n_mc"]
    d = _paired(sw, by, unit, "est", "score+none+analytic", "reparam+none+analytic", log=True)
    dec = d[d["param_group"] == "decoder"]
    cells = _judge(_cells(d[d["param_group"] != "decoder"], by))
    f.table = cells
    f.verdict = _overall(cells["judgement"])
    if cells.empty:
        f.verdict = NOT_MEASURED
        f.evidence = "not measured: the sweep lacks score+none or reparam (analytic KL) rows."
        return f
    f.contradicts = f.verdict == NOT_SUPPORTED
    n_runs = d["run_id"].nunique()
    f.evidence = (f"Over {n_runs} models (methods × H × seeds), the geometric-mean variance "
                  f"ratio score+none / reparam runs " + _extremes(cells, by, _ratio_of) + ".")
    if len(dec):
        f.evidence += (f" Decoder check: mean |log10 ratio| = {_num(dec['d'].abs().mean(), 3)} "
                       f"over {len(dec)} measurements (0 = identical, as expected).")
    _with_display(f, _judged_display(cells, {"param_group": "group", "latent_dim": "H",
                                             "grad_n_mc": "M"},
                                     "tr Σ ratio score+none / reparam [95 % CI]", fmt="ratio"))
    trained = _trained_variance(st)
    if trained is not None and len(trained):
        f.notes.append("On the models each estimator trained (seed-paired runs, gradient probe "
                       "at the final state, M = the probe's M for both; not the same model, so "
                       "not used by the verdict): ratio score+none-trained / reparam-trained "
                       "per group and H:\n\n" + _md_table(_judged_display(
                           trained, {"param_group": "group", "latent_dim": "H"},
                           "tr Σ ratio [95 % CI]", fmt="ratio")))
    return f


def _trained_variance(st: _Study) -> pd.DataFrame | None:
    m = st.csv("gradient_variance", "metrics")
    runs, _ = st.finished("gradient_variance", final=False)
    if m is None or runs is None or "estimator_label" not in m:
        return None
    m = m[(m["metric"] == "grad_var_total") & m["param_group"].notna()
          & m["run_id"].isin(runs["run_id"])]
    if m.empty:
        return None
    m = m[m["epoch"] == m.groupby("run_id")["epoch"].transform("max")]
    m = m.groupby(["run_id", "method", "latent_dim", "seed", "estimator_label",
                   "param_group"], dropna=False).tail(1)
    has_var = set(m.loc[m["param_group"] == "variational", "run_id"])
    m = m[~((m["param_group"] == "local") & m["run_id"].isin(has_var))]
    m = m[m["param_group"] != "decoder"]
    d = _paired(m, ["param_group", "latent_dim"], ["method", "seed"], "estimator_label",
                "score+none", "reparam", log=True)
    return _cells(d, ["param_group", "latent_dim"])


@register
def f_variance_ratio_vs_h(st: _Study) -> Finding:
    f = Finding(
        "variance_ratio_vs_latent_dim",
        "The score function's disadvantage grows with the latent dimension",
        "The variance ratio score+none / reparam (equal M) increases with the latent dimension "
        "H: the score function's variance scales with the dimension of the sampling space, the "
        "pathwise estimator's with the smoothness of the integrand.",
        "Mohamed et al. 2020, score-function estimator: variance and dimensionality; Kingma & "
        "Welling 2014",
        "effect per unit (method × seed: models of one seed at every H) and cell (parameter "
        "group × M) = least-squares slope of log10(tr Σ_score+none / tr Σ_reparam) against "
        "log10 H (an elasticity: ratio ∝ H^slope); threshold 0. " + RULE_TAIL,
        ("gradient_variance/variance_sweep.csv", "gradient_variance/runs.csv"))
    sw = _training_sweep(st, f)
    if sw is None:
        return f
    d = _paired(sw, ["param_group", "latent_dim", "grad_n_mc"], ["method", "seed", "run_id"],
                "est", "score+none+analytic", "reparam+none+analytic", log=True)
    d = d[d["param_group"] != "decoder"]
    rows = []
    for key, g in d.groupby(["param_group", "grad_n_mc", "method", "seed"]):
        h = pd.to_numeric(g["latent_dim"], errors="coerce").astype(float)
        if h.nunique() < 2:
            continue
        slope = np.polyfit(np.log10(h.to_numpy()), g["d"].to_numpy(dtype=float), 1)[0]
        rows.append([*key, slope])
    units = pd.DataFrame(rows, columns=["param_group", "grad_n_mc", "method", "seed", "d"])
    cells = _judge(_cells(units, ["param_group", "grad_n_mc"]))
    f.table = cells
    if cells.empty:
        f.evidence = "not measured: fewer than two latent dimensions in the sweep."
        return f
    f.verdict = _overall(cells["judgement"])
    f.contradicts = f.verdict == NOT_SUPPORTED
    hs = sorted(pd.to_numeric(d["latent_dim"], errors="coerce").dropna().unique())
    f.evidence = (f"H ∈ {{{', '.join(_key_text(h) for h in hs)}}}; slope of log10 ratio on "
                  f"log10 H " + _extremes(cells, ["param_group", "grad_n_mc"], _iv_of) + ".")
    _with_display(f, _judged_display(cells, {"param_group": "group", "grad_n_mc": "M"},
                                     "slope d log10 ratio / d log10 H [95 % CI]"))
    return f


@register
def f_baselines(st: _Study) -> Finding:
    f = Finding(
        "score_baselines",
        "Baselines reduce the score-function estimator's variance",
        "Each baseline — a running mean of f (mean), the leave-one-out mean of the other M − 1 "
        "samples (loo) and the optimal scalar control variate estimated leave-one-out (cv) — "
        "reduces the variance of the score-function estimator relative to no baseline, for the "
        "same model and samples.",
        "Williams 1992; Ranganath et al. 2014 (control variates); Mnih & Gregor 2014; Kool et "
        "al. 2019 (leave-one-out); Mohamed et al. 2020, variance reduction",
        "effect per run and cell (baseline × parameter group × M; methods and H pooled) = "
        "log10(tr Σ_score+none / tr Σ_score+baseline) on the same model, minibatch and noise "
        "(common random numbers); threshold 0 (no reduction). " + RULE_TAIL,
        ("gradient_variance/variance_sweep.csv", "gradient_variance/runs.csv"))
    sw = _training_sweep(st, f)
    if sw is None:
        return f
    sw = sw[sw["param_group"] != "decoder"]
    parts = []
    for b in ("mean", "loo", "cv"):
        d = _paired(sw, ["param_group", "grad_n_mc"], ["method", "latent_dim", "seed", "run_id"],
                    "est", "score+none+analytic", f"score+{b}+analytic", log=True)
        if len(d):
            parts.append(d.assign(baseline=b))
    if not parts:
        f.evidence = "not measured: the sweep has no score rows with and without a baseline."
        return f
    units = pd.concat(parts, ignore_index=True)
    cells = _judge(_cells(units, ["baseline", "param_group", "grad_n_mc"]))
    f.table = cells
    f.verdict = _overall(cells["judgement"])
    f.contradicts = f.verdict == NOT_SUPPORTED
    per_b = []
    for b, c in cells.groupby("baseline", sort=False):
        v = _overall(c["judgement"])
        per_b.append(f"{b}: {v} (reduction "
                     + _extremes(c, ["param_group", "grad_n_mc"], _ratio_of) + ")")
    f.evidence = "Per baseline — " + "; ".join(per_b) + "."
    _with_display(f, _judged_display(cells, {"baseline": "baseline", "param_group": "group",
                                             "grad_n_mc": "M"},
                                     "variance reduction none / baseline [95 % CI]",
                                     fmt="ratio"))
    return f


@register
def f_stl_near_optimum(st: _Study) -> Finding:
    f = Finding(
        "stl_near_optimum",
        "Sticking the landing near an optimum where the posterior is in the family",
        "At converged models of the ppca data (linear decoder: the exact posterior is Gaussian "
        "and, at the optimum, diagonal), the STL gradient of the variational parameters has a "
        "variance far below — at least ten times smaller than — the reparameterization "
        "gradient's, both with the Monte Carlo KL: STL's variance vanishes as q approaches the "
        "posterior.",
        "Roeder, Wu & Duvenaud 2017",
        "effect per converged reparam-trained run and cell (method × parameter group × M) = "
        "log10(tr Σ_reparam,mc / tr Σ_stl,mc) on the same model, minibatch and noise; support "
        "threshold 1 (a 10× reduction), contradiction threshold 1 (the interval excludes a 10× "
        "reduction). The verdict uses the variational group λ (comparable across methods); the "
        "encoder and local groups are shown, the decoder is unaffected by STL. " + RULE_TAIL,
        ("ppca_exact/variance_sweep.csv", "ppca_exact/runs.csv"))
    sw = _sweep(st, "ppca_exact", final=True)
    _, left = st.finished("ppca_exact", final=True)
    if sw is None:
        f.evidence = "not measured: no variance sweep in ppca_exact" + (
            " from converged runs." if left else ".") + _left_out(left)
        return f
    sw = sw[sw["param_group"] != "decoder"]
    d = _paired(sw, ["method", "param_group", "grad_n_mc"], ["seed", "run_id"], "est",
                "reparam+none+mc", "stl+none+mc", log=True)
    cells = _judge(_cells(d, ["method", "param_group", "grad_n_mc"]), support=1.0)
    f.table = cells
    if cells.empty:
        f.evidence = "not measured: the sweep lacks reparam or stl rows with the MC KL."
        return f
    main = cells[cells["param_group"] == "variational"]
    f.table = main
    f.verdict = _overall(main["judgement"]) if len(main) else INCONCLUSIVE
    f.contradicts = f.verdict == NOT_SUPPORTED
    gap = st.final_values("ppca_exact", ["train_approximation_gap"])[0]
    gtxt = ""
    if len(gap) and "train_approximation_gap" in gap:
        g = S.t_interval(gap["train_approximation_gap"])
        gtxt = (f" The converged models' exact approximation gap (train) is "
                f"{_iv(g.mean, g.lo, g.hi, g.n, 3)} nats, i.e. q is close to the posterior.")
    f.evidence = ("Variance ratio reparam / STL of the variational group "
                  + _extremes(main, ["method", "grad_n_mc"], _ratio_of)
                  + "; the encoder group's are shown, not tested." + gtxt + _left_out(left))
    disp = _judged_display(cells, {"method": "method", "param_group": "group",
                                   "grad_n_mc": "M"},
                           "tr Σ ratio reparam / STL [95 % CI]", fmt="ratio")
    disp.loc[cells["param_group"].to_numpy() != "variational", "judgement"] = "(not tested)"
    _with_display(f, disp)
    return f
