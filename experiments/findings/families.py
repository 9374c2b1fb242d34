"""The variational family: does a richer q (a full-covariance Gaussian, planar flows) close the
approximation gap, does the amortization gap grow, does vem's lead over the VAE change; and the
exact check on the linear-Gaussian model, where the full-covariance family holds the posterior.

Every finding reads the ``families`` experiment (``gaps.csv``: q* fitted per point in the
method's own family; log p(x) exact on ppca, else AIS), pairs runs by seed (same data split)
across families within data set × estimator × method, and compares each model at its own
decoder (each family trains its own; Cremer, Li & Duvenaud 2018, §5.3: the decoder accommodates
the family it is trained with).
"""

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
    _overall,
    _paired,
    _with_display,
    register,
)
from experiments.findings.study import _left_out, _Study

_EXP = "families"
_CSV = (f"{_EXP}/gaps.csv", f"{_EXP}/runs.csv")
#: the richer families, each compared with the diagonal Gaussian
RICHER = ("full", "flow")
#: the exact check's tolerance: the full-covariance approximation gap on ppca, nats per point
EXACT_TOL = 0.01


def _with_family(st: _Study, quantities: list[str]) -> tuple[pd.DataFrame, int]:
    """Per converged run the ``quantities`` with its identity and ``family`` (runs.csv
    ``method.family``; ``diagonal`` where absent)."""
    w, left = st.final_values(_EXP, quantities)
    if w.empty:
        return w, left
    runs = st.runs(_EXP)
    fam = (runs.set_index("run_id")["method.family"] if "method.family" in runs
           else pd.Series("diagonal", index=runs["run_id"]))
    return w.assign(family=w["run_id"].map(fam).fillna("diagonal")), left


def _versus_diagonal(w: pd.DataFrame, col: str, by: list[str], sign: float = 1.0
                     ) -> pd.DataFrame:
    """Per seed pair: d = sign · (col[family] − col[diagonal]) for each richer family."""
    parts = []
    for fam in RICHER:
        d = _paired(w, by, ["seed"], "family", fam, "diagonal", value=col)
        if len(d):
            parts.append(d.assign(family=fam, d=sign * d["d"]))
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(
        columns=[*by, "seed", "d", "family"])


_KEYS = {"dataset": "data set", "estimator_label": "estimator", "method": "method",
         "family": "family"}


def _judge_versus_diagonal(f: Finding, w: pd.DataFrame, left: int, col: str, sign: float,
                           label: str, what: str) -> Finding:
    """Judge ``sign`` · (``col`` with a richer family − with the diagonal Gaussian) per seed
    pair in cells data set × estimator × method × family, and fill ``f`` (verdict, table,
    display, evidence beginning with ``what``)."""
    by = ["dataset", "estimator_label", "method"]
    cells = _judge(_cells(_versus_diagonal(w, col, by, sign), [*by, "family"]))
    if cells.empty:
        f.evidence = "not measured: no seed pairs across families." + _left_out(left)
        return f
    f.verdict = _overall(cells["judgement"])
    f.contradicts = f.verdict == NOT_SUPPORTED
    f.table = cells
    _with_display(f, _judged_display(cells, _KEYS, label))
    f.evidence = (f"{what}, per seed pair (nats, mean [95 % CI]): "
                  + _extremes(cells, [*by, "family"], _iv_of) + "." + _left_out(left))
    return f


@register
def f_richer_family_closes_approximation_gap(st: _Study) -> Finding:
    f = Finding(
        "richer_family_closes_approximation_gap",
        "A richer variational family closes the approximation gap",
        "With a more expressive family than the diagonal Gaussian (a full-covariance Gaussian; "
        "a diagonal Gaussian followed by planar flows), the approximation gap log p(x) − L[q*] "
        "of the trained model is smaller.",
        "Cremer, Li & Duvenaud 2018 (Table 2, §5: auxiliary flows); Rezende & Mohamed 2015",
        "effect per seed pair (same data split) = test approximation gap with the diagonal "
        "Gaussian − with the richer family, each at the decoder trained with its family (q* "
        "fitted per point in that family; gaps.csv, same points); cells = data set × estimator "
        "× method × richer family; threshold 0. " + RULE_TAIL, _CSV)
    w, left = _with_family(st, ["test_approximation_gap"])
    if w.empty or "test_approximation_gap" not in w:
        f.evidence = "not measured: no approximation gaps." + _left_out(left)
        return f
    return _judge_versus_diagonal(
        f, w, left, "test_approximation_gap", -1.0, "diagonal − richer approx. gap, nats",
        "Test approximation gap of the diagonal Gaussian minus that of the richer family")


@register
def f_amortization_gap_grows_with_family(st: _Study) -> Finding:
    f = Finding(
        "amortization_gap_grows_with_family",
        "With a richer family the amortization gap grows",
        "An encoder that outputs a richer family's parameters leaves a larger amortization gap "
        "L[q*] − L[q_φ] than one that outputs a diagonal Gaussian: q* gains more from the "
        "family than the encoder does.",
        "Cremer, Li & Duvenaud 2018 (Table 2, §5.2)",
        "effect per seed pair (same data split) = test amortization gap with the richer family "
        "− with the diagonal Gaussian (gaps.csv, same points); cells = data set × estimator × "
        "method × richer family for the methods with an encoder (amortized, semi-amortized); "
        "threshold 0. " + RULE_TAIL, _CSV)
    w, left = _with_family(st, ["test_amortization_gap"])
    if w.empty or "test_amortization_gap" not in w:
        f.evidence = "not measured: no amortization gaps." + _left_out(left)
        return f
    return _judge_versus_diagonal(
        f, w[w["method"] != "vem"], left, "test_amortization_gap", 1.0,
        "richer − diagonal amort. gap, nats",
        "Test amortization gap with the richer family minus with the diagonal Gaussian")


@register
def f_vem_lead_by_family(st: _Study) -> Finding:
    f = Finding(
        "vem_lead_by_family",
        "Variational EM's lead over the VAE with a richer family",
        "Variational EM's lead over the amortized VAE in test L[q_φ] grows when both use a "
        "richer family than the diagonal Gaussian: the VAE's encoder gains less from the "
        "family than per-point inference does.",
        "the study's design, after Cremer, Li & Duvenaud 2018 (§5.2)",
        "effect per seed (same data split) = (vem − VAE test L[q_φ]) with the richer family − "
        "(vem − VAE test L[q_φ]) with the diagonal Gaussian, each L[q_φ] the method's own "
        "posterior on the same points (gaps.csv); cells = data set × estimator × richer "
        "family; threshold 0. " + RULE_TAIL, _CSV)
    w, left = _with_family(st, ["test_elbo_qphi"])
    if w.empty or "test_elbo_qphi" not in w or not {"vem", "amortized"} <= set(w["method"]):
        f.evidence = "not measured: no vem and amortized runs with L[q_φ]." + _left_out(left)
        return f
    by = ["dataset", "estimator_label"]
    lead = _paired(w, [*by, "family"], ["seed"], "method", "vem", "amortized",
                   value="test_elbo_qphi").rename(columns={"d": "lead"})
    cells = _judge(_cells(_versus_diagonal(lead, "lead", by), [*by, "family"]))
    if cells.empty:
        f.evidence = "not measured: no seed with vem and the VAE in two families." + _left_out(
            left)
        return f
    f.verdict = _overall(cells["judgement"])
    f.table = cells
    base = lead[lead["family"] == "diagonal"]
    keys = {k: v for k, v in _KEYS.items() if k != "method"}
    _with_display(f, _judged_display(cells, keys, "change of vem's lead, nats"))
    f.evidence = ("vem − VAE test L[q_φ] with the richer family minus with the diagonal "
                  "Gaussian, per seed (nats, mean [95 % CI]): "
                  + _extremes(cells, [*by, "family"], _iv_of)
                  + (f". With the diagonal Gaussian the lead itself is {base['lead'].mean():.2f}"
                     f" nats on average over {len(base)} seed(s) and data sets"
                     if len(base) else "") + "." + _left_out(left))
    return f


@register
def f_full_covariance_exact_on_ppca(st: _Study) -> Finding:
    f = Finding(
        "full_covariance_exact_on_ppca",
        "The full-covariance q* reaches log p(x) on the linear-Gaussian model",
        f"On ppca (a linear decoder) the posterior is Gaussian, so the best full-covariance "
        f"Gaussian q* is the posterior and the approximation gap log p(x) − L[q*] (both exact) "
        f"is below {EXACT_TOL} nat per point for every method.",
        "Tipping & Bishop 1999 (the PPCA posterior); the study's exact check",
        f"effect per run = {EXACT_TOL} − approximation gap of the full-covariance q* (exact "
        f"log p(x), closed-form L[q*]; gaps.csv), on the train and the test points; cells = "
        f"estimator × method × split on ppca; threshold 0. " + RULE_TAIL, _CSV)
    w, left = _with_family(st, ["train_approximation_gap", "test_approximation_gap"])
    if w.empty:
        f.evidence = "not measured: no approximation gaps." + _left_out(left)
        return f
    w = w[(w["dataset"] == "ppca") & (w["family"] == "full")]
    parts = [w.assign(split=s, d=EXACT_TOL - w[f"{s}_approximation_gap"])
             for s in ("train", "test") if f"{s}_approximation_gap" in w]
    if w.empty or not parts:
        f.evidence = "not measured: no full-covariance runs on ppca." + _left_out(left)
        return f
    by = ["estimator_label", "method", "split"]
    cells = _judge(_cells(pd.concat(parts, ignore_index=True), by))
    f.verdict = _overall(cells["judgement"]) if len(cells) else NOT_MEASURED
    f.contradicts = f.verdict == NOT_SUPPORTED
    f.table = cells
    _with_display(f, _judged_display(cells, {"estimator_label": "estimator", "method": "method",
                                             "split": "split"},
                                     f"{EXACT_TOL} − approx. gap, nats", digits=4))
    f.evidence = (f"{EXACT_TOL} nat minus the full-covariance approximation gap on ppca, per "
                  f"run (nats, mean [95 % CI]): "
                  + _extremes(cells, by, lambda r: _iv_of(r, 4)) + "." + _left_out(left))
    return f
