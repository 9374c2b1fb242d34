"""Log-likelihoods by annealed importance sampling: the methods' decoders compared by test log p(x)
(a worse generative model, or only worse inference?), and how far the IWAE estimate from q* sits
below AIS.

log p(x) is the AIS estimate from q* of the ``gaps`` probe (``vi.ais``; Neal 2001, Wu, Burda,
Salakhutdinov & Grosse 2017), on the same points as L[q_φ] and L[q*] (``gaps.csv``, column
``points``). Both findings read the ``amortization_gap`` experiment.
"""

from __future__ import annotations

import pandas as pd

from experiments import summary as S
from experiments.findings.core import (
    NOT_MEASURED,
    NOT_SUPPORTED,
    RULE_TAIL,
    Finding,
    _cells,
    _extremes,
    _iv,
    _iv_of,
    _judge,
    _overall,
    _with_display,
    register,
)
from experiments.findings.study import _left_out, _Study, _vs_amortized

_EXP = "amortization_gap"
_CSV = (f"{_EXP}/gaps.csv", f"{_EXP}/runs.csv")


@register
def f_decoders_by_ais(st: _Study) -> Finding:
    f = Finding(
        "decoders_by_log_likelihood",
        "Decoders compared by test log p(x) (AIS): a worse generative model or only worse "
        "inference?",
        "Training with an amortized encoder gives a worse generative model: the decoder of "
        "variational EM (per-datapoint q, no encoder) has a higher test log p(x), measured by "
        "AIS independently of any encoder, than the decoder of the amortized VAE trained on the "
        "same data split.",
        "Cremer, Li & Duvenaud 2018 (§6: the encoder's gap shapes the decoder); Wu et al. 2017 "
        "(AIS for decoder-based models)",
        "effect per seed pair (same data split and initialisation) = test log p(x) by AIS of the "
        "method's decoder − that of the amortized VAE's decoder (every number on the same test "
        "points, gaps.csv); cells = data set × estimator × method; threshold 0. Beside it the "
        "same pair's difference of L[q_φ] (each method's own inference): where the ELBO "
        "difference exceeds the log p(x) difference, the rest is inference, not the model. "
        + RULE_TAIL, _CSV)
    w, left = st.final_values(_EXP, ["test_ais", "test_elbo_qphi", "test_elbo_qstar"])
    if w.empty or "test_ais" not in w:
        f.evidence = "not measured: no test log p(x) by AIS." + _left_out(left)
        return f
    by = ["dataset", "estimator_label"]
    others = [m for m in ("vem", "semi_amortized", "sa_vae") if m in set(w["method"])]
    d = _vs_amortized(w, "test_ais", by, others)
    cells = _judge(_cells(d, [*by, "method"]))
    if cells.empty:
        f.evidence = "not measured: no seed pairs with the amortized VAE." + _left_out(left)
        return f
    main = cells[cells["method"] == "vem"]
    f.verdict = _overall(main["judgement"]) if len(main) else NOT_MEASURED
    f.contradicts = f.verdict == NOT_SUPPORTED
    f.table = main  # the tested cells (the verdict's and the tally's); the display shows all
    rows = []
    for _, c in cells.iterrows():
        key = (c["dataset"], c["estimator_label"], c["method"])
        row = {"data set": key[0], "estimator": key[1], "method": key[2]}
        for col, name in (("test_ais", "test log p(x), AIS"),
                          ("test_elbo_qphi", "test L[q_φ]")):
            for m, label in ((key[2], ""), ("amortized", " (VAE)")):
                g = w[(w["dataset"] == key[0]) & (w["estimator_label"] == key[1])
                      & (w["method"] == m)]
                if col in g and g[col].notna().any():
                    iv = S.t_interval(g[col])
                    row[name + label] = _iv(iv.mean, iv.lo, iv.hi, iv.n)
        row["Δ log p(x)"] = _iv_of(c)
        e = _vs_amortized(w, "test_elbo_qphi", by, [key[2]]) if "test_elbo_qphi" in w else None
        if e is not None and len(e):
            e = e[(e["dataset"] == key[0]) & (e["estimator_label"] == key[1])]
            iv = S.t_interval(e["d"])
            row["Δ L[q_φ]"] = _iv(iv.mean, iv.lo, iv.hi, iv.n)
        row["judgement"] = c["judgement"] if key[2] == "vem" else "(not tested)"
        rows.append(row)
    _with_display(f, pd.DataFrame(rows).fillna("—"))
    f.evidence = ("Test log p(x) by AIS of variational EM's decoder minus the amortized VAE's, "
                  "per seed pair (nats, mean [95 % CI]): "
                  + (_extremes(main, by, _iv_of) if len(main) else "no vem pairs")
                  + ". The table also gives the semi-amortized methods' decoders against the "
                  "VAE's, and each pair's difference of L[q_φ], which adds the inference "
                  "methods' difference to the models'." + _left_out(left))
    return f


@register
def f_iwae_below_ais(st: _Study) -> Finding:
    f = Finding(
        "iwae_below_ais",
        "How far the IWAE estimate from q* sits below AIS",
        "The IWAE estimate of log p(x) with the defensive proposal built on q* is a looser "
        "stochastic lower bound than AIS from q*: it sits below the AIS estimate on the same "
        "points.",
        "Burda, Grosse & Salakhutdinov 2016; Wu et al. 2017",
        "effect per run = test log p(x) by AIS − test IWAE estimate (same model, same points, "
        "gaps.csv); cells = data set × estimator × method; threshold 0; the effect's size is "
        "the looseness IWAE would add to the approximation gap. " + RULE_TAIL, _CSV)
    w, left = st.final_values(_EXP, ["test_ais", "test_iwae", "test_log_px_exact"])
    if w.empty or not {"test_ais", "test_iwae"} <= set(w.columns):
        f.evidence = "not measured: no test AIS and IWAE estimates." + _left_out(left)
        return f
    w = w.assign(d=w["test_ais"] - w["test_iwae"])
    by = ["dataset", "estimator_label", "method"]
    cells = _judge(_cells(w, by))
    if cells.empty:
        f.evidence = "not measured: no run with both estimates." + _left_out(left)
        return f
    f.verdict = _overall(cells["judgement"])
    f.contradicts = f.verdict == NOT_SUPPORTED
    f.table = cells
    rows = []
    for _, c in cells.iterrows():
        g = w[(w["dataset"] == c["dataset"]) & (w["estimator_label"] == c["estimator_label"])
              & (w["method"] == c["method"])]
        row = {"data set": c["dataset"], "estimator": c["estimator_label"],
               "method": c["method"], "n": int(c["n"]),
               "AIS − IWAE": _iv(c["mean"], c["lo"], c["hi"], int(c["n"]), 3)}
        if "test_log_px_exact" in g and g["test_log_px_exact"].notna().any():
            iv = S.t_interval(g["test_ais"] - g["test_log_px_exact"])
            row["AIS − exact"] = _iv(iv.mean, iv.lo, iv.hi, iv.n, 3)
        row["judgement"] = c["judgement"]
        rows.append(row)
    disp = pd.DataFrame(rows)
    order = ["data set", "estimator", "method", "n", "AIS − IWAE", "AIS − exact", "judgement"]
    _with_display(f, disp[[c for c in order if c in disp]].fillna("—"))
    f.evidence = ("Test AIS − IWAE per run (nats, mean [95 % CI]) "
                  + _extremes(cells, by, lambda r: _iv_of(r, 3))
                  + ". Where log p(x) is exact (linear decoders) the table gives AIS − exact, "
                  "AIS's own error." + _left_out(left))
    return f
