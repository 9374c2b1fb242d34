"""The findings' common ground: the ``Finding`` type, the verdict rules (judging cells by their
95 % t-intervals), paired effects, the text of intervals and ratios, the Markdown of a finding and
of FINDINGS.md, and the registry of findings in the order FINDINGS.md lists them.

Names with a leading underscore are private to the ``experiments.findings`` package.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from experiments import summary as S

if TYPE_CHECKING:
    from experiments.findings.study import _Study

    #: a finding tested in variants: (study, variant) -> Finding
    _Make = Callable[[_Study, str], "Finding"]

SUPPORTED, NOT_SUPPORTED, INCONCLUSIVE, NOT_MEASURED = (
    "supported", "not supported", "inconclusive", "not measured")
VERDICTS = (SUPPORTED, NOT_SUPPORTED, INCONCLUSIVE, NOT_MEASURED)
#: cell judgements (``SINGLE``: fewer than two units, no interval: shown, never judged)
SUPPORTS, CONTRADICTS, UNCLEAR, SINGLE = "supports", "contradicts", "unclear", "single seed"

RULE_TAIL = ("A cell supports the claim when its 95 % t-interval lies above the threshold, "
             "contradicts it when the interval lies below the contradiction threshold, and is "
             "unclear otherwise (an interval end within a relative 1e-9 of its threshold is a "
             "rounding error, so unclear); a cell with fewer than 2 units has no interval and is "
             "shown but not judged. Verdict over the judged cells: supported when every one "
             "supports; not supported when any contradicts; otherwise (or with no judged cell) "
             "inconclusive.")


@dataclass
class Finding:
    """One claim tested on the results.

    ``table`` holds the cell-level evidence (effect mean, interval ``lo``/``hi``, units ``n``,
    ``judgement``); ``evidence`` states it in words with intervals and n; ``csv`` lists the
    files read (relative to the results folder); ``contradicts`` marks a literature claim the
    numbers contradict."""

    key: str
    title: str
    claim: str
    source: str
    rule: str
    csv: tuple[str, ...]
    verdict: str = NOT_MEASURED
    evidence: str = ""
    table: pd.DataFrame | None = None
    display: pd.DataFrame | None = None
    notes: list[str] = field(default_factory=list)
    contradicts: bool = False

    def markdown(self, number: int) -> str:
        """The finding as a Markdown section."""
        out = [f"## {number}. {self.title}", "",
               f"**Claim.** {self.claim} *Source: {self.source}.*", "",
               f"**Verdict: {self.verdict}.**" + (f" {self._tally()}" if self._tally() else "")]
        if self.contradicts:
            out += ["", f"**This contradicts the literature** ({self.source}); the evidence "
                        f"follows."]
        out += ["", f"**Evidence.** {self.evidence or 'not measured.'}"]
        if self.display is not None and len(self.display):
            out += ["", _md_table(self.display)]
        for note in self.notes:
            out += ["", note]
        out += ["", f"**Rule.** {self.rule}", "",
                "**Data.** " + ", ".join(f"`{c}`" for c in self.csv)]
        return "\n".join(out) + "\n"

    def _tally(self) -> str:
        t = self.table
        if t is None or "judgement" not in t or not len(t):
            return ""
        j = t["judgement"].value_counts()
        out = (f"{len(t)} cell(s): {int(j.get(SUPPORTS, 0))} support, "
               f"{int(j.get(CONTRADICTS, 0))} contradict, {int(j.get(UNCLEAR, 0))} unclear")
        if j.get(SINGLE, 0):
            out += f", {int(j.get(SINGLE, 0))} without an interval (one unit; not judged)"
        return out + "."


# ---------------------------------------------------------------------------------- helpers


def _num(x: float, digits: int = 2) -> str:
    if x is None or not np.isfinite(x):
        return "—"
    return f"{x:.{digits}f}".replace("-", "−")


def _iv(mean: float, lo: float, hi: float, n: int, digits: int = 2) -> str:
    """``mean [lo, hi]`` (or ``mean (n = 1)`` without an interval)."""
    if not n or not np.isfinite(mean):
        return "—"
    if n < 2 or not (np.isfinite(lo) and np.isfinite(hi)):
        return f"{_num(mean, digits)} (n = {n})"
    return f"{_num(mean, digits)} [{_num(lo, digits)}, {_num(hi, digits)}]"


def _times(log10: float) -> str:
    if not np.isfinite(log10):
        return "—"
    v = 10.0 ** log10
    return f"{v:.3g}×" if 1e-3 <= v < 1e5 else f"{v:.1e}×".replace("-", "−")


def _secs(x: float) -> str:
    if x is None or not np.isfinite(x):
        return "—"
    return "< resolution" if x <= 0 else f"{x:.2g}".replace("-", "−")


def _ratio(mean: float, lo: float, hi: float, n: int) -> str:
    """A log10 ratio's interval as a ratio: ``12.3× [8.1×, 18.7×]``."""
    if not n or not np.isfinite(mean):
        return "—"
    if n < 2 or not (np.isfinite(lo) and np.isfinite(hi)):
        return f"{_times(mean)} (n = {n})"
    return f"{_times(mean)} [{_times(lo)}, {_times(hi)}]"


def _iv_of(r, digits: int = 2) -> str:
    """A cell's (row's) ``mean [lo, hi]``, as ``_iv``."""
    return _iv(r["mean"], r["lo"], r["hi"], r["n"], digits)


def _ratio_of(r) -> str:
    """A cell's (row's) log10 ratio interval as a ratio, as ``_ratio``."""
    return _ratio(r["mean"], r["lo"], r["hi"], r["n"])


def _md_table(df: pd.DataFrame, max_rows: int = 60) -> str:
    head = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in df.head(max_rows).itertuples(index=False):
        lines.append("| " + " | ".join(str(v) for v in row) + " |")
    if len(df) > max_rows:
        lines.append(f"\n({len(df) - max_rows} more rows in the `findings()` table.)")
    return "\n".join(lines)


def _cells(units: pd.DataFrame, by: list[str], value: str = "d") -> pd.DataFrame:
    """Mean and 95 % t-interval of ``value`` over the units (rows) of each cell ``by``."""
    cols = [*by, "n", "mean", "sd", "lo", "hi"]
    units = units[np.isfinite(pd.to_numeric(units[value], errors="coerce").astype(float))] \
        if len(units) else units
    if units.empty:
        return pd.DataFrame(columns=cols)
    groups = units.groupby(by, dropna=False, sort=True) if by else [((), units)]
    rows = []
    for key, g in groups:
        key = key if isinstance(key, tuple) else (key,)
        iv = S.t_interval(g[value])
        rows.append([*key, iv.n, iv.mean, iv.sd, iv.lo, iv.hi])
    return pd.DataFrame(rows, columns=cols)


#: effects closer than this (relative, with an absolute floor of the same size) to a threshold
#: are numerical zeros: far below any effect the study reports (nats, log-ratios)
NUMERICAL_TOL = 1e-9


def _tolerance(threshold: float, *values: float) -> float:
    """The margin an interval end must clear: NUMERICAL_TOL × the largest magnitude involved
    (at least NUMERICAL_TOL)."""
    scale = max([1.0, abs(threshold)] + [abs(v) for v in values if np.isfinite(v)])
    return NUMERICAL_TOL * scale


def _judge(cells: pd.DataFrame, support: float = 0.0, contradict: float | None = None
           ) -> pd.DataFrame:
    """Add ``judgement``: supports when lo > support, contradicts when hi < contradict
    (default: = support), else unclear; ``single seed`` (not judged) when n < 2.

    An interval end within ``NUMERICAL_TOL`` (relative to the magnitudes involved, at least
    absolute) of its threshold is unclear: a quantity that is exactly the threshold in theory
    (a slope of zero, say) comes out as ±1e-17 from floating-point rounding, and its verdict
    must not depend on the machine that rounded it."""
    contradict = support if contradict is None else contradict
    out = []
    for r in cells.itertuples(index=False):
        lo, hi, n = float(r.lo), float(r.hi), int(r.n)
        if n < 2:
            out.append(SINGLE)
        elif not (np.isfinite(lo) and np.isfinite(hi)):
            out.append(UNCLEAR)
        elif lo > support + _tolerance(support, lo, hi, float(r.mean)):
            out.append(SUPPORTS)
        elif hi < contradict - _tolerance(contradict, lo, hi, float(r.mean)):
            out.append(CONTRADICTS)
        else:
            out.append(UNCLEAR)
    return cells.assign(judgement=out)


def _overall(judgements) -> str:
    """supported / not supported / inconclusive over the judged cells (``single seed`` cells
    are not judged; with none judged: inconclusive); not measured without cells."""
    j = list(judgements)
    if not j:
        return NOT_MEASURED
    j = [v for v in j if v != SINGLE]
    if not j:
        return INCONCLUSIVE
    if all(v == SUPPORTS for v in j):
        return SUPPORTED
    if any(v == CONTRADICTS for v in j):
        return NOT_SUPPORTED
    return INCONCLUSIVE


def _paired(frame: pd.DataFrame, by: list[str], unit: list[str], contrast: str, a, b,
            value: str = "value", log: bool = False) -> pd.DataFrame:
    """Per unit (a run pair sharing ``unit`` within a cell ``by``): d = value[a] − value[b]
    (log10(value[a] / value[b]) with ``log``). Returns by + unit + [d]."""
    cols = [*by, *unit, "d"]
    if frame is None or frame.empty:
        return pd.DataFrame(columns=cols)
    f = frame[frame[contrast].isin([a, b])]
    if f.empty:
        return pd.DataFrame(columns=cols)
    keys = [*by, *unit]
    f = f.assign(**{k: f[k].fillna("—") if f[k].dtype == object else f[k] for k in keys})
    piv = f.pivot_table(index=keys, columns=contrast, values=value, aggfunc="mean")
    if a not in piv.columns or b not in piv.columns:
        return pd.DataFrame(columns=cols)
    va, vb = piv[a].astype(float), piv[b].astype(float)
    if log:
        with np.errstate(divide="ignore", invalid="ignore"):
            d = np.log10(va.where(va > 0) / vb.where(vb > 0))
    else:
        d = va - vb
    return d.rename("d").dropna().reset_index()


def _with_display(f: Finding, display: pd.DataFrame) -> None:
    f.display = display.reset_index(drop=True)


def _judged_display(cells: pd.DataFrame, keys: dict[str, str], effect: str, fmt="iv",
                    digits: int = 2) -> pd.DataFrame:
    """Cells as a display table: the keys (renamed), n, effect [interval], judgement."""
    out = pd.DataFrame({new: cells[old].map(_key_text) for old, new in keys.items()})
    out["n"] = cells["n"].astype(int).to_numpy()
    if fmt == "ratio":
        out[effect] = [_ratio(m, lo, hi, n) for m, lo, hi, n in
                       zip(cells["mean"], cells["lo"], cells["hi"], cells["n"], strict=True)]
    else:
        out[effect] = [_iv(m, lo, hi, n, digits) for m, lo, hi, n in
                       zip(cells["mean"], cells["lo"], cells["hi"], cells["n"], strict=True)]
    if "judgement" in cells:
        out["judgement"] = cells["judgement"].to_numpy()
    return out


def _key_text(v) -> str:
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


_KEY_NAMES = {"param_group": "group", "latent_dim": "H", "grad_n_mc": "M",
              "estimator_label": "estimator", "dataset": "data set", "versus": "vs"}


def _extremes(cells: pd.DataFrame, keys: list[str], fmt: Callable) -> str:
    """'from X (cell) to Y (cell)' over the cells' means."""
    c = cells[np.isfinite(cells["mean"].astype(float))]
    if c.empty:
        return ""
    lo, hi = c.loc[c["mean"].astype(float).idxmin()], c.loc[c["mean"].astype(float).idxmax()]

    def where(r) -> str:
        return ", ".join(f"{_KEY_NAMES.get(k, k)} = {_key_text(r[k])}" for k in keys)

    if len(c) == 1:
        return f"{fmt(lo)} ({where(lo)})" if keys else fmt(lo)
    if fmt(lo) == fmt(hi):
        return f"{fmt(lo)} in each of the {len(c)} cells"
    return f"from {fmt(lo)} ({where(lo)}) to {fmt(hi)} ({where(hi)})"


# ------------------------------------------------------------------------------- registry


#: every finding, in the order FINDINGS.md lists them: the package imports its group modules in
#: that order and each registers its findings (``@register``) from top to bottom
REGISTRY: list[Callable[[_Study], Finding]] = []


def register(fn: Callable[[_Study], Finding]) -> Callable[[_Study], Finding]:
    """Add the finding ``fn`` to ``REGISTRY``; a second one of the same name is an error."""
    if any(f.__name__ == fn.__name__ for f in REGISTRY):
        raise ValueError(f"finding {fn.__name__} is registered twice")
    REGISTRY.append(fn)
    return fn


def register_each(name: str, *variants: str) -> Callable[[_Make], _Make]:
    """Decorator: register ``make(st, v)`` as the finding ``{name}_{v}`` for each variant ``v``,
    in order (one claim tested at equal epochs and at equal seconds, or on each data set)."""

    def decorate(make: _Make) -> _Make:
        for v in variants:
            register(_variant(make, f"{name}_{v}", v))
        return make

    return decorate


def _variant(make: _Make, name: str, v: str) -> Callable[[_Study], Finding]:
    def finding(st: _Study) -> Finding:
        return make(st, v)

    finding.__name__ = finding.__qualname__ = name
    return finding


# ------------------------------------------------------------------------------- FINDINGS.md


def report_markdown(items: list[Finding], *, converged_only: bool = True) -> str:
    """FINDINGS.md: a generated header, a verdict overview, then one section per finding."""
    head = [
        "# Findings",
        "",
        "Generated by `experiments/findings/` from the CSVs in this folder; do not edit by "
        "hand. It is regenerated by `python -m experiments findings` and at the end of "
        "`python -m experiments reproduce`.",
        "",
        "Each finding states a claim from the literature or the study's design, tests it on "
        "the committed numbers with an effect size and its 95 % interval over seeds (paired "
        "where runs share a seed, i.e. the same data split; variance ratios on the same model "
        "with common random numbers), and gives a verdict — supported, not supported, "
        "inconclusive or not measured — by the rule stated with it. "
        + ("Comparisons of trained models use converged runs only (outcome `converged` in "
           "runs.csv: stopped by the plateau rule after its last step-size decay, neither "
           "stuck nor collapsed); each comparison counts the runs it left out, by outcome. "
           if converged_only else "Comparisons of trained models use every finished run. ")
        + "Diverged and failed runs never enter an effect.",
        "",
        "| # | finding | verdict |",
        "|---|---|---|",
    ]
    for i, f in enumerate(items, 1):
        mark = " (contradicts the literature)" if f.contradicts else ""
        head.append(f"| {i} | {f.title} | {f.verdict}{mark} |")
    body = [f.markdown(i) for i, f in enumerate(items, 1)]
    return "\n".join(head) + "\n\n" + "\n".join(body)
