"""Cached access to one results folder (``_Study``) and the data helpers that several groups
of findings share: seed pairs against the amortized VAE, ELBO curves and their comparison at a
common training budget."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from experiments import summary as S
from experiments.findings.core import _paired
from experiments.vocabulary import estimator_label


class LeftOut(int):
    """A count of finished runs left out as not converged, with its breakdown by ``outcome``
    (``vi.contract.OUTCOMES``: cap, collapsed, stuck; ``not converged`` where runs.csv has no
    outcome); sums keep the breakdown."""

    by: dict[str, int]

    def __new__(cls, by: dict[str, int] | None = None) -> LeftOut:
        by = {k: int(v) for k, v in (by or {}).items() if v}
        out = super().__new__(cls, sum(by.values()))
        out.by = by
        return out

    def __add__(self, other: object) -> LeftOut | int:
        if not isinstance(other, int):
            return NotImplemented
        by = dict(self.by)
        for k, v in getattr(other, "by", {"not converged": int(other)} if other else {}).items():
            by[k] = by.get(k, 0) + v
        return LeftOut(by)

    __radd__ = __add__


class _Study:
    """Cached access to one results folder."""

    def __init__(self, results: str | Path, converged_only: bool = True) -> None:
        self.root = Path(results)
        self.converged_only = converged_only
        self._runs: dict[str, pd.DataFrame | None] = {}
        self._csv: dict[tuple[str, str], pd.DataFrame | None] = {}
        self._values: dict[str, pd.DataFrame] = {}

    def runs(self, exp: str) -> pd.DataFrame | None:
        if exp not in self._runs:
            self._runs[exp] = S.load_runs(self.root, exp)
        return self._runs[exp]

    def finished(self, exp: str, final: bool) -> tuple[pd.DataFrame | None, int]:
        """Status-ok runs; with ``final`` and ``converged_only``, only those that converged
        (unknown convergence kept). Returns (runs, number left out as not converged, by
        outcome: a ``LeftOut``)."""
        runs = self.runs(exp)
        if runs is None:
            return None, LeftOut()
        ok = runs[runs["status"] == "ok"]
        if not (final and self.converged_only):
            return ok, LeftOut()
        keep = ok["conv"].ne(False)
        outcome = ok["outcome"].fillna("not converged").astype(str) if "outcome" in ok else \
            pd.Series("not converged", index=ok.index)
        return ok[keep], LeftOut(outcome[~keep].value_counts().to_dict())

    def csv(self, exp: str, name: str) -> pd.DataFrame | None:
        key = (exp, name)
        if key not in self._csv:
            df = S.read_csv(self.root / exp / f"{name}.csv")
            if df is not None and {"estimator", "baseline"} <= set(df.columns):
                df = df.assign(baseline=df["baseline"].astype(object).where(
                    df["baseline"].notna(), "none"))
                df["estimator_label"] = [estimator_label(e, b) for e, b in
                                         zip(df["estimator"], df["baseline"], strict=True)]
            self._csv[key] = df
        return self._csv[key]

    def values(self, exp: str) -> pd.DataFrame:
        if exp not in self._values:
            self._values[exp] = S.run_values(self.root, [exp], {exp: self.runs(exp)}) \
                if self.runs(exp) is not None else pd.DataFrame(columns=["run_id", "quantity",
                                                                         "value"])
        return self._values[exp]

    def final_values(self, exp: str, quantities: list[str]) -> tuple[pd.DataFrame, int]:
        """Per-run values of ``quantities`` (wide: one column each) of the finished (and, with
        ``converged_only``, converged) runs, with their identity; and the count left out."""
        runs, left = self.finished(exp, final=True)
        if runs is None or runs.empty:
            return pd.DataFrame(), left
        v = self.values(exp)
        v = v[v["run_id"].isin(runs["run_id"]) & v["quantity"].isin(quantities)]
        if v.empty:
            return pd.DataFrame(), left
        wide = v.pivot_table(index="run_id", columns="quantity", values="value", aggfunc="mean")
        ident = runs.set_index("run_id")[[*S.CELL, "seed", "data_seed"]]
        return ident.join(wide, how="inner").reset_index(), left


def _left_out(n: int) -> str:
    """The sentence saying which finished runs a comparison left out, by outcome."""
    if not n:
        return ""
    by = getattr(n, "by", {})
    parts = ", ".join(f"{v} {k}" for k, v in sorted(by.items())) if by else ""
    return f" {int(n)} finished run(s) left out as not converged" + (
        f" ({parts})." if parts else ".")


def _vs_amortized(w: pd.DataFrame, col: str, by: list[str], methods) -> pd.DataFrame:
    parts = []
    for m in methods:
        d = _paired(w, by, ["seed"], "method", m, "amortized", value=col)
        if len(d):
            parts.append(d.assign(method=m))
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(
        columns=[*by, "seed", "d", "method"])


#: outcomes of finished runs whose later evaluations are not the method's training but a
#: broken state (a collapsed run's validation and training ELBO fell by more than a nat): left
#: out of the curve comparisons at equal budgets, and counted (diverged runs are not finished)
_BROKEN = ("collapsed",)


def _curves(st: _Study, exp: str, split: str = "test") -> tuple[pd.DataFrame | None, LeftOut]:
    """Each finished run's ELBO evaluations on ``split``: epoch, wall_s, value (one per
    epoch), except runs whose outcome is collapsed; and the count of those left out, by
    outcome."""
    m = st.csv(exp, "metrics")
    runs, _ = st.finished(exp, final=False)
    if m is None or runs is None:
        return None, LeftOut()
    left = LeftOut()
    if "outcome" in runs:
        broken = runs["outcome"].isin(_BROKEN)
        left = LeftOut(runs.loc[broken, "outcome"].value_counts().to_dict())
        runs = runs[~broken]
    c = m[(m["metric"] == "elbo") & (m["split"] == split) & m["run_id"].isin(runs["run_id"])
          & m["param_group"].isna()]
    if c.empty:
        return None, left
    c = c.sort_values(["run_id", "epoch"], kind="stable").drop_duplicates(["run_id", "epoch"])
    return c.merge(runs[["run_id", "setting"]], on="run_id", how="left"), left


def _at_budget(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]
               ) -> tuple[float, float, float]:
    """Both runs' ELBO at the largest common budget: each run's last evaluation within
    min(their last budget value). ``a``/``b`` = (budget values ascending, ELBOs)."""
    (xa, va), (xb, vb) = a, b
    if not len(xa) or not len(xb):
        return math.nan, math.nan, math.nan
    limit = min(float(xa[-1]), float(xb[-1]))
    ia = int(np.searchsorted(xa, limit + 1e-12, side="right")) - 1
    ib = int(np.searchsorted(xb, limit + 1e-12, side="right")) - 1
    if ia < 0 or ib < 0:
        return math.nan, math.nan, limit
    return float(va[ia]), float(vb[ib]), limit


def _budget_pairs(curves: pd.DataFrame, by: list[str], contrast: str, a, b_values,
                  budget: str) -> pd.DataFrame:
    """Per seed pair: d = ELBO(a) − ELBO(b) at the common budget (epochs or wall_s)."""
    col = "epoch" if budget == "epochs" else "wall_s"
    cols = [*by, "seed", "versus", "d", "budget"]
    c = curves.dropna(subset=[col]).sort_values(["run_id", col], kind="stable")
    if c.empty:
        return pd.DataFrame(columns=cols)
    series = {rid: (g[col].to_numpy(dtype=float), g["value"].to_numpy(dtype=float))
              for rid, g in c.groupby("run_id", sort=False)}
    info = c.drop_duplicates("run_id")
    rows = []
    for key, g in info.groupby([*by, "seed"], dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        ids = g.groupby(contrast)["run_id"].agg(list)
        if a not in ids or len(ids[a]) != 1:
            continue
        for b in b_values:
            if b not in ids or len(ids[b]) != 1:
                continue
            va, vb, limit = _at_budget(series[ids[a][0]], series[ids[b][0]])
            rows.append([*key, b, va - vb, limit])
    return pd.DataFrame(rows, columns=cols)

