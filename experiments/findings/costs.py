"""Costs: test-time inference (E-steps from the encoder's output or the prior; vem's E-steps
vs one encoder pass) and what training with the score estimator costs at equal epochs or
seconds."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from experiments import summary as S
from experiments.findings.core import (
    CONTRADICTS,
    NOT_SUPPORTED,
    RULE_TAIL,
    SINGLE,
    SUPPORTS,
    UNCLEAR,
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
    _secs,
    _with_display,
    register,
    register_each,
)
from experiments.findings.study import _budget_pairs, _curves, _left_out, _Study
from experiments.vocabulary import METHOD_ORDER


def _test_curves(st: _Study) -> pd.DataFrame | None:
    m = st.csv("elbo_curves", "metrics")
    runs, _ = st.finished("elbo_curves", final=False)
    if m is None or runs is None:
        return None
    c = m[(m["metric"] == "test_curve_elbo") & m["run_id"].isin(runs["run_id"])].copy()
    if c.empty:
        return None
    c = c[c["epoch"] == c.groupby("run_id")["epoch"].transform("max")]
    c["start"] = c["param_group"].fillna("prior")
    return c.drop_duplicates(["run_id", "start", "step"], keep="last")


@register
def f_encoder_start(st: _Study) -> Finding:
    f = Finding(
        "test_time_encoder_start",
        "Test-time E-steps: from the encoder's output vs from the prior",
        "On held-out points with the decoder fixed, the same number of E-steps reaches a higher "
        "ELBO when it starts from the encoder's output than from the prior, for every method "
        "with an encoder (s = 0 from the encoder is the one-pass amortized ELBO).",
        "Kim et al. 2018; Krishnan et al. 2018; Hjelm et al. 2016",
        "effect per run (same model and points) = mean over the measured E-step counts s of "
        "ELBO_encoder(s) − ELBO_prior(s) (log-spaced s, so small budgets weigh more); cells = "
        "method × estimator; threshold 0. " + RULE_TAIL,
        ("elbo_curves/metrics.csv", "elbo_curves/runs.csv"))
    c = _test_curves(st)
    if c is None:
        f.evidence = "not measured: no test_curve_elbo rows in elbo_curves."
        return f
    piv = c.pivot_table(index=["method", "estimator_label", "latent_dim", "seed", "run_id",
                               "step"], columns="start", values="value", aggfunc="mean")
    if not {"prior", "encoder"} <= set(piv.columns):
        f.evidence = "not measured: no run has both the prior and the encoder start."
        return f
    diff = (piv["encoder"] - piv["prior"]).dropna().rename("d").reset_index()
    units = diff.groupby(["method", "estimator_label", "latent_dim", "seed", "run_id"],
                         as_index=False)["d"].mean()
    cells = _judge(_cells(units, ["method", "estimator_label"]))
    f.table = cells
    f.verdict = _overall(cells["judgement"])
    f.contradicts = f.verdict == NOT_SUPPORTED
    steps = sorted(diff["step"].unique())
    at = {}
    for s in (steps[0], steps[len(steps) // 2], steps[-1]):
        at[s] = _cells(diff[diff["step"] == s], ["method", "estimator_label"])
    disp = _judged_display(cells, {"method": "method", "estimator_label": "estimator"},
                           "mean over s [95 % CI]")
    for s, cs in at.items():
        m = cells[["method", "estimator_label"]].merge(cs, how="left",
                                                       on=["method", "estimator_label"])
        disp.insert(len(disp.columns) - 2, f"s = {_key_text(s)}",
                    [_iv(a, lo, hi, int(n) if np.isfinite(n) else 0) for a, lo, hi, n in
                     zip(m["mean"], m["lo"], m["hi"], m["n"].astype(float), strict=True)])
    _with_display(f, disp)
    f.evidence = (f"ELBO(encoder start) − ELBO(prior start), nats, at s ∈ "
                  f"{{{', '.join(_key_text(s) for s in steps)}}} E-steps; mean over s "
                  + _extremes(cells, ["method", "estimator_label"], _iv_of) + ".")
    return f


def _curve_table(c: pd.DataFrame) -> str:
    """Held-out ELBO (mean over seeds) and seconds per point against E-steps, per method and
    start, for one training estimator (reparam where present)."""
    labels = list(dict.fromkeys(c["estimator_label"]))
    label = "reparam" if "reparam" in labels else labels[0]
    d = c[c["estimator_label"] == label]
    mean = d.groupby(["method", "start", "step"])[["value", "wall_s"]].mean()
    steps = sorted(d["step"].unique())
    rows = []
    for (m, start), g in mean.groupby(level=[0, 1], sort=False):
        g = g.droplevel([0, 1])
        row = {"method": m, "start": start}
        for s in steps:
            row[f"s = {_key_text(s)}"] = (f"{_num(g.loc[s, 'value'])} ({_secs(g.loc[s, 'wall_s'])}"
                                          f" s/pt)" if s in g.index else "—")
        rows.append(row)
    order = {m: i for i, m in enumerate(METHOD_ORDER)}
    table = pd.DataFrame(rows).sort_values(["method", "start"], key=lambda k: k.map(
        lambda v: order.get(v, len(order)) if k.name == "method" else v), kind="stable")
    return (f"Held-out ELBO (nats, mean over seeds) and seconds per point against the number "
            f"of E-steps s, {label}-trained models:\n\n" + _md_table(table))


@register
def f_test_time_cost(st: _Study) -> Finding:
    f = Finding(
        "test_time_cost",
        "Test-time cost: vem's E-steps vs one encoder pass",
        "Amortization makes inference on a new point cheap: vem, which has no encoder, needs "
        "more seconds per held-out point to reach the ELBO an encoder gives in one pass.",
        "Kingma & Welling 2014; Gershman & Goodman 2014 (amortized inference); Cremer et al. "
        "2018",
        "per seed pair (vem vs an encoder method, same estimator, H and seed): the seconds per "
        "point of the fewest E-steps from the prior after which vem's held-out ELBO reaches the "
        "encoder method's one-pass (s = 0) ELBO, against the encoder pass's seconds per point "
        "(infinite when vem never reaches it within the measured steps; vem counts as faster "
        "when its prior start needs no E-step; a pair whose times are both below the CSV's "
        "resolution is undecided). A cell (encoder method "
        "× estimator) supports the claim when vem is slower in every pair, contradicts it when "
        "vem is faster in every pair, else is unclear (a sign rule; one pair: not judged). "
        "Verdict over the judged cells: supported when every one supports; not supported when "
        "any contradicts; otherwise inconclusive.",
        ("elbo_curves/metrics.csv", "elbo_curves/runs.csv"))
    c = _test_curves(st)
    if c is None:
        f.evidence = "not measured: no test_curve_elbo rows in elbo_curves."
        return f
    vem = c[(c["method"] == "vem") & (c["start"] == "prior")]
    enc = c[(c["start"] == "encoder") & (c["step"] == c["step"].min())]
    if vem.empty or enc.empty:
        f.evidence = "not measured: needs vem's prior curve and an encoder method's curve."
        return f
    rows = []
    key = ["estimator_label", "latent_dim", "seed"]
    for k, e in enc.groupby(["method", *key]):
        v = vem
        for col, val in zip(key, k[1:], strict=True):
            v = v[v[col] == val]
        if v.empty:
            continue
        target, t_enc = float(e["value"].iloc[0]), float(e["wall_s"].iloc[0])
        v = v.sort_values("step")
        reached = v[v["value"] >= target]
        t_vem = float(reached["wall_s"].iloc[0]) if len(reached) else math.inf
        s_vem = float(reached["step"].iloc[0]) if len(reached) else math.nan
        gain = float(v["value"].iloc[-1]) - target
        rows.append([*k, t_enc, t_vem, s_vem, gain, int(v["step"].iloc[-1])])
    if not rows:
        f.evidence = "not measured: no vem run pairs with an encoder run by seed."
        return f
    p = pd.DataFrame(rows, columns=["method", *key, "t_enc", "t_vem", "s_vem", "gain", "s_max"])
    # a pair is decided when vem never reaches the target within the measured steps, or when
    # both times were resolved (> 0: wall_s has a finite resolution in the CSV)
    never = ~np.isfinite(p["t_vem"])
    resolved = never | ((p["t_enc"] > 0) & (p["t_vem"] > 0))
    p["slower"] = never | (resolved & (p["t_vem"] > p["t_enc"]))
    p["faster"] = (resolved & ~never & (p["t_vem"] < p["t_enc"])) | (p["s_vem"] == 0)
    p["slower"] &= ~p["faster"]
    cells = []
    for (m, lab), g in p.groupby(["method", "estimator_label"]):
        n, slower, faster = len(g), int(g["slower"].sum()), int(g["faster"].sum())
        j = (SINGLE if n < 2 else SUPPORTS if slower == n else CONTRADICTS if faster == n
             else UNCLEAR)
        gain = S.t_interval(g["gain"])
        finite = g["t_vem"][np.isfinite(g["t_vem"])]
        cells.append({
            "encoder method": m, "estimator": lab, "pairs": n,
            "encoder s / point": _secs(g["t_enc"].median()),
            "vem s / point to match": (_secs(finite.median()) if len(finite) else "—")
            + (f" ({n - len(finite)} never)" if len(finite) < n else ""),
            "vem E-steps to match (median)": _num(g["s_vem"].median(), 0),
            "vem at its most E-steps − encoder, nats": _iv(gain.mean, gain.lo, gain.hi,
                                                          gain.n),
            "vem slower / faster / undecided": f"{slower} / {faster} / {n - slower - faster}",
            "judgement": j})
    disp = pd.DataFrame(cells)
    f.table = disp.rename(columns={"judgement": "judgement"})
    f.verdict = _overall(disp["judgement"])
    f.contradicts = f.verdict == NOT_SUPPORTED
    _with_display(f, disp)
    f.evidence = (f"{len(p)} seed pairs at H = "
                  f"{', '.join(_key_text(h) for h in sorted(p['latent_dim'].unique()))}; seconds "
                  f"per point as measured by the test-time probe (median over pairs).")
    f.notes.append(_curve_table(c))
    undecided = int((~p["slower"] & ~p["faster"]).sum())
    if undecided:
        f.notes.append(f"{undecided} pair(s) undecided: a time of 0 s per point is below the "
                       f"resolution of the CSV's wall_s column, so the two costs cannot be "
                       f"compared there; the E-step counts still can.")
    return f



_BUDGET_WORDS = {"epochs": "number of epochs (the shorter run's last epoch)",
                 "seconds": "training time (the shorter run's total seconds)"}


@register_each("f_score_cost", "epochs", "seconds")
def _score_cost(st: _Study, budget: str) -> Finding:
    word = "epochs" if budget == "epochs" else "wall-clock seconds"
    f = Finding(
        f"score_training_cost_{budget}",
        f"What training with the score estimator costs: test ELBO at equal {word}",
        f"Models trained with the score-function estimator (no baseline, or leave-one-out) "
        f"reach a lower test ELBO than reparameterization-trained ones after equal {word}: "
        f"noisier gradients slow stochastic optimisation (and the score estimator's M = 4 "
        f"samples cost more per step).",
        "Kingma & Welling 2014; Ranganath et al. 2014; Mohamed et al. 2020",
        f"effect per seed pair (same method, H, data split) = test ELBO(reparam) − test "
        f"ELBO(score+baseline), each at its last evaluation within the pair's common "
        f"{_BUDGET_WORDS[budget]}"
        f"; cells = method × H × score estimator; threshold 0 (> 0: the score estimator costs "
        f"ELBO). " + RULE_TAIL,
        ("elbo_curves/metrics.csv", "elbo_curves/runs.csv"))
    c, left = _curves(st, "elbo_curves")
    if c is None:
        f.evidence = "not measured: no test ELBO curves in elbo_curves."
        return f
    labels = [x for x in ("score+none", "score+loo") if x in set(c["estimator_label"])]
    p = _budget_pairs(c, ["method", "latent_dim"], "estimator_label", "reparam", labels, budget)
    cells = _judge(_cells(p, ["method", "latent_dim", "versus"]))
    f.table = cells
    if cells.empty:
        f.evidence = "not measured: no reparam / score seed pairs in elbo_curves."
        return f
    f.verdict = _overall(cells["judgement"])
    f.contradicts = f.verdict == NOT_SUPPORTED
    _with_display(f, _judged_display(cells, {"method": "method", "latent_dim": "H",
                                             "versus": "score estimator"},
                                     "ELBO(reparam) − ELBO(score), nats [95 % CI]"))
    unit = "epochs" if budget == "epochs" else "s"
    f.evidence = (f"Common budget per pair: median {_num(p['budget'].median(), 1)} {unit}. "
                  f"Cost of the score estimator (nats) "
                  + _extremes(cells, ["method", "latent_dim", "versus"], _iv_of) + "."
                  + _left_out(left))
    return f
