"""Multi-sample objectives: the signal-to-noise laws of the IWAE gradient against K (Rainforth et
al. 2018; Tucker et al. 2019), STL's bias on the IWAE, VIMCO against the plain score function,
and training with tighter bounds (``multisample``: ``k_sweep.csv``, ``gaps.csv``, ``runs.csv``).

The SNR laws are judged on the measurements made during training (``k_sweep``'s ``epochs``):
at a converged model the inference gradient's mean is near zero, so its SNR sits at the noise
floor of the estimate (|t|/√draws) and a slope there says little; the final-state slopes are
shown beside them, not judged."""

from __future__ import annotations

import numpy as np
import pandas as pd

from experiments.findings.core import (
    NOT_SUPPORTED,
    RULE_TAIL,
    Finding,
    _cells,
    _extremes,
    _iv_of,
    _judge,
    _judged_display,
    _md_table,
    _overall,
    _paired,
    _ratio_of,
    _with_display,
    register,
)
from experiments.findings.study import _left_out, _Study
from experiments.vocabulary import estimator_label

EXP = "multisample"
#: the inference parameters: an amortized method's encoder, vem's local λ
INFERENCE = {"encoder": "inference", "local": "inference", "decoder": "decoder"}
FINAL = "final"
CSV_SWEEP = (f"{EXP}/k_sweep.csv", f"{EXP}/runs.csv")
CSV_TRAIN = (f"{EXP}/gaps.csv", f"{EXP}/runs.csv")


def _sweep(st: _Study, metric: str) -> pd.DataFrame | None:
    """k_sweep.csv rows of ``metric`` from finished runs, with ``role`` (inference, decoder),
    ``label`` (the measured estimator) and ``stage`` (``epoch <e>`` during training,
    ``final`` at each run's last measurement)."""
    sw = st.csv(EXP, "k_sweep")
    need = {"run_id", "epoch", "param_group", "grad_estimator", "grad_baseline", "grad_k",
            "metric", "value"}
    if sw is None or sw.empty or not need <= set(sw.columns):
        return None
    runs, _ = st.finished(EXP, final=False)
    sw = sw[(sw["metric"] == metric) & sw["param_group"].isin(list(INFERENCE))]
    if runs is not None:
        sw = sw[sw["run_id"].isin(runs["run_id"])]
    if sw.empty:
        return None
    sw = sw.copy()
    last = sw.groupby("run_id")["epoch"].transform("max")
    sw["stage"] = np.where(sw["epoch"] == last, FINAL,
                           "epoch " + sw["epoch"].astype(int).astype(str))
    sw["role"] = sw["param_group"].map(INFERENCE)
    base = sw["grad_baseline"].astype(object).where(sw["grad_baseline"].notna(), "none")
    sw["label"] = [estimator_label(e, b) for e, b in zip(sw["grad_estimator"], base,
                                                           strict=True)]
    sw["K"] = sw["grad_k"].astype(float)
    return sw


def _slopes(sw: pd.DataFrame, label: str, role: str) -> pd.DataFrame:
    """Per run and stage: the least-squares slope of log10 value on log10 K (an elasticity:
    value ∝ K^slope) of estimator ``label`` on the ``role`` parameters (two or more K)."""
    d = sw[(sw["label"] == label) & (sw["role"] == role) & (sw["value"] > 0)]
    rows = []
    for (stage, ds, method, seed, rid), g in d.groupby(["stage", "dataset", "method", "seed",
                                                        "run_id"]):
        g = g.groupby("K")["value"].mean()
        if len(g) < 2:
            continue
        slope = np.polyfit(np.log10(g.index.to_numpy(float)), np.log10(g.to_numpy(float)), 1)[0]
        rows.append([stage, ds, method, seed, rid, slope])
    return pd.DataFrame(rows, columns=["stage", "dataset", "method", "seed", "run_id", "d"])


def _split_stages(cells: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame, str]:
    """(cells judged, cells shown only, words naming the judged stage): the measurements during
    training when there are any, else the final ones."""
    during = cells[cells["stage"] != FINAL]
    if len(during):
        return during, cells[cells["stage"] == FINAL], "during training"
    return cells, cells.iloc[0:0], "at the final state (no measurement during training)"


_STAGE_KEYS = {"stage": "measured", "dataset": "data set", "method": "method"}


def _slope_finding(st: _Study, f: Finding, label: str, role: str, sign: float,
                   effect: str) -> Finding:
    """A finding on the slope of log SNR on log K: the effect is ``sign`` × slope, threshold
    0; the distance from the predicted rate 1/2 is stated."""
    sw = _sweep(st, "grad_snr_mean")
    if sw is None:
        f.evidence = "not measured: no k_sweep.csv in multisample."
        return f
    units = _slopes(sw, label, role)
    units = units.assign(d=sign * units["d"])
    cells = _cells(units, ["stage", "dataset", "method"])
    if cells.empty:
        f.evidence = f"not measured: no {label} rows for the {role} parameters at two or more K."
        return f
    judged, shown, when = _split_stages(cells)
    judged = _judge(judged)
    f.table = judged
    f.verdict = _overall(judged["judgement"])
    f.contradicts = f.verdict == NOT_SUPPORTED
    half = judged[(judged["lo"] <= 0.5) & (judged["hi"] >= 0.5)]
    ks = sorted(sw["K"].unique())
    f.evidence = (f"K ∈ {{{', '.join(f'{k:g}' for k in ks)}}}, measured {when}: {effect} "
                  + _extremes(judged, ["dataset", "method"], _iv_of)
                  + f"; {len(half)} of {len(judged)} intervals contain the predicted 1/2.")
    shown = shown.assign(judgement="not judged (final state)") if len(shown) else shown
    _with_display(f, _judged_display(pd.concat([judged, shown], ignore_index=True),
                                     _STAGE_KEYS, f"{effect} [95 % CI]"))
    return f


@register
def f_iwae_inference_snr(st: _Study) -> Finding:
    f = Finding(
        "iwae_inference_snr_falls",
        "Tighter bounds: the inference gradient's SNR falls with K (reparam)",
        "With the reparameterized IWAE gradient at a fixed number M of groups, the "
        "signal-to-noise ratio of the inference parameters' gradient (the encoder φ; vem's "
        "local λ) falls as K grows, like K^(−1/2).",
        "Rainforth, Kosiorek, Le, Maddison, Igl, Wood & Teh 2018, Theorem 1",
        "effect per run and cell (data set × method, measured during training) = −(least-squares "
        "slope of log10 SNR on log10 K), SNR = the mean over coordinates of |mean| / sd of "
        "the reparam gradient (k_sweep, M fixed, every K on the same minibatch); threshold 0; "
        "the predicted value is 1/2. " + RULE_TAIL, CSV_SWEEP)
    return _slope_finding(st, f, "reparam", "inference", -1.0,
                          "rate of decline −d log SNR / d log K")


@register
def f_iwae_decoder_snr(st: _Study) -> Finding:
    f = Finding(
        "iwae_decoder_snr_grows",
        "Tighter bounds: the decoder gradient's SNR grows with K (reparam)",
        "With the reparameterized IWAE gradient at a fixed number M of groups, the "
        "signal-to-noise ratio of the decoder's gradient grows as K grows, like K^(+1/2).",
        "Rainforth et al. 2018, Theorem 1",
        "effect per run and cell (data set × method, measured during training) = least-squares "
        "slope of log10 SNR on log10 K of the decoder's reparam gradient; threshold 0; the "
        "predicted value is 1/2. " + RULE_TAIL, CSV_SWEEP)
    return _slope_finding(st, f, "reparam", "decoder", 1.0, "slope d log SNR / d log K")


@register
def f_dreg_snr(st: _Study) -> Finding:
    f = Finding(
        "dreg_inference_snr_grows",
        "DReG: the inference gradient's SNR grows with K",
        "The doubly reparameterized estimator of the inference gradient has an SNR that grows "
        "with K (unlike reparam's), so tighter bounds no longer starve the encoder of signal.",
        "Tucker, Lawson, Gu & Maddison 2019, §5 and Figure 1",
        "effect per run and cell (data set × method, measured during training) = least-squares "
        "slope of log10 SNR on log10 K of the DReG gradient of the inference parameters; "
        "threshold 0. " + RULE_TAIL, CSV_SWEEP)
    return _slope_finding(st, f, "dreg", "inference", 1.0, "slope d log SNR / d log K")


@register
def f_stl_bias(st: _Study) -> Finding:
    f = Finding(
        "stl_biased_on_iwae",
        "STL is biased on the IWAE for K > 1",
        "Applied to the IWAE bound, sticking the landing drops a term whose mean is zero only "
        "at K = 1: for K ≥ 2 its mean differs from the gradient of L_K.",
        "Tucker et al. 2019, §4; Roeder, Wu & Duvenaud 2017",
        "effect per run and cell (data set × method × K ≥ 2, measured during training) = "
        "(‖mean(g_stl − g_reparam)‖² − tr Σ_(g_stl − g_reparam) / draws) / ‖mean g_reparam‖²,"
        " the squared distance of STL's mean from reparam's (unbiased) on the same noise, "
        "corrected for its sampling noise: unbiased for ‖bias‖² / ‖∇L_K‖²; threshold 0 (no "
        "bias). K = 1 (both unbiased) is shown as a check. " + RULE_TAIL, CSV_SWEEP)
    sw = _sweep(st, "grad_bias_relative")
    if sw is None:
        f.evidence = "not measured: no bias rows in multisample's k_sweep.csv."
        return f
    d = sw[(sw["label"] == "stl") & (sw["role"] == "inference")]
    cells = _cells(d.rename(columns={"value": "d"}), ["stage", "dataset", "method", "K"])
    if cells.empty:
        f.evidence = "not measured: no STL bias rows for the inference parameters."
        return f
    judged, _, when = _split_stages(cells)
    check = judged[judged["K"] == 1]
    judged = _judge(judged[judged["K"] > 1])
    if judged.empty:
        f.evidence = "not measured: STL's bias was not measured at K ≥ 2."
        return f
    f.table = judged
    f.verdict = _overall(judged["judgement"])
    f.contradicts = f.verdict == NOT_SUPPORTED
    f.evidence = (f"Measured {when}: relative squared bias of STL "
                  + _extremes(judged, ["dataset", "method", "K"],
                              lambda r: _iv_of(r, 3)) + ".")
    if len(check):
        f.evidence += (" At K = 1 (no bias expected) "
                       + _extremes(check, ["dataset", "method"], lambda r: _iv_of(r, 3)) + ".")
    keys = {"stage": "measured", "dataset": "data set", "method": "method", "K": "K"}
    shown = pd.concat([judged, check.assign(judgement="check (K = 1)")], ignore_index=True)
    _with_display(f, _judged_display(shown, keys, "‖bias‖² / ‖∇L_K‖² [95 % CI]", digits=3))
    return f


@register
def f_vimco(st: _Study) -> Finding:
    f = Finding(
        "vimco_vs_score",
        "VIMCO's leave-one-out baseline reduces the score function's variance on the IWAE",
        "On the IWAE bound, the score-function estimator with VIMCO's per-sample leave-one-out "
        "baseline has a smaller variance than without a baseline, at the same K and noise.",
        "Mnih & Rezende 2016, §3",
        "effect per run and cell (data set × method × K ≥ 2, measured during training) = "
        "log10(tr Σ_score+none / tr Σ_score+loo) of the inference parameters on the same model, "
        "minibatch and noise; threshold 0 (no reduction). " + RULE_TAIL, CSV_SWEEP)
    sw = _sweep(st, "grad_var_total")
    if sw is None:
        f.evidence = "not measured: no k_sweep.csv in multisample."
        return f
    sw = sw[(sw["role"] == "inference") & (sw["K"] > 1)]
    d = _paired(sw, ["stage", "dataset", "method", "K"], ["seed", "run_id"], "label",
                "score+none", "score+loo", log=True)
    cells = _cells(d, ["stage", "dataset", "method", "K"])
    if cells.empty:
        f.evidence = "not measured: the sweep lacks score+none or score+loo rows at K ≥ 2."
        return f
    judged, _, when = _split_stages(cells)
    judged = _judge(judged)
    f.table = judged
    f.verdict = _overall(judged["judgement"])
    f.contradicts = f.verdict == NOT_SUPPORTED
    f.evidence = (f"Measured {when}: variance reduction score+none / VIMCO "
                  + _extremes(judged, ["dataset", "method", "K"], _ratio_of) + ".")
    keys = {"stage": "measured", "dataset": "data set", "method": "method", "K": "K"}
    _with_display(f, _judged_display(judged, keys, "tr Σ ratio none / VIMCO [95 % CI]",
                                     fmt="ratio"))
    return f


def _trained(st: _Study) -> tuple[pd.DataFrame | None, int]:
    """Per converged run: dataset, method, seed, K, training estimator label, and the means
    over the gaps probe's test points of log p(x) (exact, else AIS, else IWAE) and of
    log p(x) − L[q_φ] (the inference gap of the method's own posterior)."""
    runs, left = st.finished(EXP, final=True)
    gaps = st.csv(EXP, "gaps")
    if runs is None or gaps is None or "method.k" not in runs or gaps.empty:
        return None, left
    g = gaps[(gaps["split"] == "test") & gaps["run_id"].isin(runs["run_id"])].copy()
    lp = pd.Series(np.nan, index=g.index)
    for col in ("log_px_iwae", "log_px_ais", "log_px_exact"):  # the last present wins
        if col in g:
            lp = g[col].astype(float).where(g[col].notna(), lp)
    g["log_px"] = lp
    g["inference_gap"] = g["log_px"] - g["elbo_qphi"].astype(float)
    per = g.groupby("run_id", as_index=False)[["log_px", "inference_gap"]].mean()
    ident = runs[["run_id", "dataset", "method", "seed", "estimator_label", "method.k"]]
    per = per.merge(ident, on="run_id").rename(columns={"method.k": "K"})
    per["K"] = per["K"].astype(float)
    return per, left


def _vs_k1(per: pd.DataFrame, value: str) -> pd.DataFrame:
    """Per seed: value(K, estimator) − value(K = 1), within data set × method."""
    base = per[per["K"] == 1][["dataset", "method", "seed", value]]
    other = per[per["K"] > 1]
    d = other.merge(base, on=["dataset", "method", "seed"], suffixes=("", "_k1"))
    return d.assign(d=d[value] - d[f"{value}_k1"])


def _training_finding(st: _Study, f: Finding, value: str, effect: str) -> Finding:
    per, left = _trained(st)
    if per is None or per.empty:
        f.evidence = "not measured: no gaps.csv or method.k in multisample." + _left_out(left)
        return f
    d = _vs_k1(per, value)
    by = ["dataset", "method", "estimator_label", "K"]
    cells = _judge(_cells(d, by))
    if cells.empty:
        f.evidence = "not measured: no seed pairs of K = 1 and K > 1 models." + _left_out(left)
        return f
    f.table = cells
    f.verdict = _overall(cells["judgement"])
    f.contradicts = f.verdict == NOT_SUPPORTED
    f.evidence = (f"{effect} (K > 1 − K = 1, seed pairs) " + _extremes(cells, by, _iv_of)
                  + "." + _left_out(left))
    keys = {"dataset": "data set", "method": "method", "estimator_label": "estimator",
            "K": "K"}
    _with_display(f, _judged_display(cells, keys, f"{effect}, nats [95 % CI]"))
    return f


@register
def f_tighter_bound_decoder(st: _Study) -> Finding:
    f = Finding(
        "tighter_bound_better_decoder",
        "Training with a tighter bound gives a better decoder",
        "Models trained with the IWAE bound L_K (K > 1) reach a higher test log p(x) than "
        "those trained with the ELBO (K = 1), for each estimator of the IWAE gradient.",
        "Burda, Grosse & Salakhutdinov 2016, Table 1; Rainforth et al. 2018, §5",
        "effect per seed pair and cell (data set × method × training estimator × K) = test "
        "log p(x) of the K-trained model − that of the ELBO-trained (K = 1, reparam) model of "
        "the same seed, log p(x) exact for a linear decoder else by AIS, on the gaps probe's "
        "test points; converged runs only; threshold 0. " + RULE_TAIL, CSV_TRAIN)
    return _training_finding(st, f, "log_px", "test log p(x) gain")


@register
def f_tighter_bound_encoder(st: _Study) -> Finding:
    f = Finding(
        "tighter_bound_worse_encoder",
        "Training with a tighter bound gives a worse inference network",
        "Models trained with L_K (K > 1) have a posterior approximation q further from their "
        "decoder's posterior: a larger test inference gap log p(x) − L[q] than ELBO-trained "
        "models (for vem, q is the held-out fit of the ELBO, so the claim concerns what the "
        "decoder's posteriors let a Gaussian reach).",
        "Rainforth et al. 2018, §5 (Figure 4); Cremer, Li & Duvenaud 2018",
        "effect per seed pair and cell (data set × method × training estimator × K) = test "
        "(log p(x) − L[q_φ]) of the K-trained model − that of the ELBO-trained model of the "
        "same seed, on the gaps probe's test points; converged runs only; threshold 0. "
        + RULE_TAIL, CSV_TRAIN)
    out = _training_finding(st, f, "inference_gap", "inference gap increase")
    per, _ = _trained(st)
    if per is not None and len(per) and out.table is not None:
        mean = per.groupby(["dataset", "method", "estimator_label", "K"], as_index=False)[
            ["log_px", "inference_gap"]].mean()
        out.notes.append("Per cell, the mean over seeds of test log p(x) and of the inference "
                         "gap (nats):\n\n" + _md_table(mean.round(2)))
    return out
