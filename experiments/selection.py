"""Step-size selection that brackets the optimum (the ``lr_selection`` experiment).

Every method × estimator (× data set) trains each candidate combination of its step sizes for
several seeds under the same stopping rule as the experiments that use the choice, and is
scored by the final ``metric`` on ``split`` (the validation ELBO, a split carved from the
training data). Per group:

* a candidate's score is the **median** over its seeds (one catastrophic seed cannot decide);
* a candidate is **unstable** when a seed diverged or failed, or ended more than
  ``unstable_gap`` nats below the candidate's median, and **unconverged** when a seed reached
  the epoch cap before its validation ELBO plateaued (its step size is too small for the budget
  the experiments have); candidates that are stable and converged rank first, then stable
  ones, and a flagged candidate is chosen only when nothing better exists (the choice is then
  flagged);
* the candidates start as a cross around a centre per method (or per method and data set, or
  per method, data set and estimator, keyed ``reparam+none``, ``score+loo``): the centre, and
  each step size alone multiplied and divided by ``extend_factor`` (for two step sizes, five
  candidates);
* the best candidate must be **interior**: for each step size, a smaller and a larger value must
  have been tried with the other step sizes at the best's values. Where one is missing, the
  best's step size is moved by ``extend_factor`` in that direction and trained (a pattern
  search); this repeats up to ``max_extensions`` times per group, after which a choice still at
  an edge is flagged ``at_cap``.

How often the epoch cap binds is recorded: ``n_capped`` per candidate (its seeds that reached
``max_epochs``), and per choice ``capped_candidates`` (the group's candidates with such a seed)
and ``cap_binds`` (the chosen candidate itself had one: its step sizes were chosen with a cap
that stopped training, so the cap, not only the data, may have chosen them). ``searched`` is
true for a group whose candidates were trained and false for a choice copied by a ``share``
rule.

``share`` rules give groups that were not selected the choice of a group that was (e.g. STL
the step sizes chosen for reparam); ``selected.csv`` names the source in ``shared_from``.

The axes searched for a method are its step sizes, the ``step_sizes`` trait of its
``vi.inference`` class: a grid gives a centre for each of them and for nothing else
(``check_candidates``, run when the cells are prepared; the order of the step-size columns is
the order in which the grid's candidates first name them).

Pure pandas (no torch). ``candidate_table`` and ``choose`` turn ``runs.csv`` into
``candidates.csv`` and ``selected.csv``; ``extensions`` says which candidates to add.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["GROUP", "candidate_table", "check_candidates", "check_select", "choose",
           "extensions", "initial_candidates", "select_rule", "step_size_columns"]

GROUP = ["dataset", "method", "estimator", "baseline"]
DEFAULTS = {"metric": "elbo", "split": "validation", "unstable_gap": 20.0,
            "extend_factor": 3.0, "max_extensions": 2}
_KEYS = (*DEFAULTS, "candidates", "share")


def check_select(select: Any) -> None:
    """Raise ``ValueError`` for a malformed ``select`` block of a grid."""
    if not isinstance(select, dict):
        raise ValueError("'select' must be an object")
    bad = sorted(set(select) - set(_KEYS))
    if bad:
        raise ValueError(f"unknown key(s) {', '.join(bad)} in 'select'; valid: "
                         f"{', '.join(_KEYS)}")
    candidates = select.get("candidates")
    if not isinstance(candidates, dict) or not candidates:
        raise ValueError("'select.candidates' must be an object {method: {step size: centre}}, "
                         "{method: {dataset: {step size: centre}}} or {method: {dataset: "
                         "{estimator+baseline: {step size: centre}}}}")
    for method, where, fields in _centres(select):
        if not isinstance(fields, dict) or not fields:
            raise ValueError(f"select.candidates.{where} must be an object of centre values")
        for name, value in fields.items():
            if isinstance(value, bool) or not isinstance(value, int | float) or not (
                    math.isfinite(value) and value > 0):
                raise ValueError(f"select.candidates.{where}.{name} must be a positive number "
                                 f"(the centre of the cross)")
        first = _centre_fields(select, method)
        if set(fields) != set(first):
            raise ValueError(f"select.candidates.{where} names {', '.join(fields)}; every "
                             f"centre of {method} must name the same step sizes "
                             f"({', '.join(first)})")
    share = select.get("share", [])
    if not isinstance(share, list) or not all(
            isinstance(r, dict) and set(r) == {"from", "to"} and isinstance(r["from"], dict)
            and isinstance(r["to"], dict) and set(r["from"]) == set(r["to"])
            and set(r["from"]) <= set(GROUP) for r in share):
        raise ValueError("'select.share' must be a list of {from: {...}, to: {...}} over the "
                         f"same keys among {', '.join(GROUP)}")
    rule = select_rule(select)
    if not rule["extend_factor"] > 1 or not rule["unstable_gap"] > 0:
        raise ValueError("select.extend_factor must be > 1 and select.unstable_gap > 0")
    m = rule["max_extensions"]
    if isinstance(m, bool) or not isinstance(m, int) or not 0 <= m <= 10:
        raise ValueError("select.max_extensions must be an integer in [0, 10]")


def _is_level(value: Any) -> bool:
    """Whether a candidates entry is a level of named centres ({dataset: ...} or {estimator:
    ...}) rather than a centre ({step size: value})."""
    return isinstance(value, dict) and bool(value) and all(isinstance(v, dict)
                                                           for v in value.values())


def _centres(select: dict) -> list[tuple[str, str, Any]]:
    """(method, where, centre) for every centre of the candidates: one per method, per method
    and data set, or per method, data set and estimator (``reparam+none``, ``score+loo``),
    as deep as the grid nests them."""
    out = []

    def walk(method: str, where: str, value: Any) -> None:
        if _is_level(value):
            for name, inner in value.items():
                walk(method, f"{where}.{name}", inner)
        else:
            out.append((method, where, value))

    for method, fields in select["candidates"].items():
        walk(method, method, fields)
    return out


def _centre_fields(select: dict, method: str) -> list[str]:
    """The step sizes (configuration names) a method's first centre names, in grid order."""
    centre = select["candidates"].get(method) or {}
    while _is_level(centre):
        centre = next(iter(centre.values()))
    return list(centre) if isinstance(centre, dict) else []


def step_size_columns(select: dict) -> list[str]:
    """Every step size the selection searches, as runs.csv names them (``method.lr``, …), in
    the order the grid's candidates first name them."""
    names: dict[str, None] = {}
    for method in select["candidates"]:
        names |= dict.fromkeys(_centre_fields(select, method))
    return [f"method.{n}" for n in names]


def check_candidates(select: dict, step_sizes: dict[str, tuple[str, ...]]) -> None:
    """Raise ``ValueError`` unless every method's centres name exactly its step sizes
    (``step_sizes``: method → the ``step_sizes`` trait of its class, ``vi.inference``), so a
    selection searches every step size a method uses and nothing it does not."""
    for method, where, fields in _centres(select):
        if method not in step_sizes:
            raise ValueError(f"select.candidates: unknown method {method!r}; valid: "
                             f"{', '.join(step_sizes)}")
        own = tuple(step_sizes[method])
        extra = [n for n in fields if n not in own]
        missing = [n for n in own if n not in fields]
        if extra or missing:
            said = "; ".join(part for part in (
                f"{', '.join(map(repr, extra))} not a step size of {method}" if extra else "",
                f"no centre for {', '.join(missing)}" if missing else "") if part)
            raise ValueError(f"select.candidates.{where}: {said} ({method}'s step sizes, from "
                             f"its traits: {', '.join(own)})")


def select_rule(select: dict) -> dict:
    """The selection settings with their defaults filled in."""
    return {**DEFAULTS, **{k: v for k, v in select.items() if k not in ("candidates", "share")}}


def _centre(select: dict, method: str, dataset: str | None = None,
            estimator: str | None = None) -> dict[str, float]:
    """A method's centre step sizes: its per-dataset centre where the grid gives one, and
    within it the estimator's (``reparam+none``, ``score+loo``) where the grid gives one."""
    centre = select["candidates"].get(method)
    if not centre:
        raise ValueError(f"select.candidates has no step sizes for method {method!r}")
    where = method
    for name, what in ((dataset, "dataset"), (estimator, "estimator")):
        if not _is_level(centre):
            break
        if name not in centre:
            raise ValueError(f"select.candidates.{where} has no centre for {what} {name!r}")
        centre, where = centre[name], f"{where}.{name}"
    return centre


def initial_candidates(select: dict, method: str, dataset: str | None = None,
                       estimator: str | None = None) -> list[dict[str, float]]:
    """The first round's step-size combinations of a method ({"lr": .., "local_lr": ..}): the
    centre and, for each step size alone, the centre times and divided by ``extend_factor``."""
    centre = _centre(select, method, dataset, estimator)
    factor = select_rule(select)["extend_factor"]
    out = [dict(centre)]
    for name, value in centre.items():
        for moved in (_round(value / factor), _round(value * factor)):
            out.append({**centre, name: moved})
    return out


def _fields(select: dict, method: str) -> list[str]:
    """The step sizes selected for a method (runs.csv names), in the grid's order."""
    chosen = {f"method.{n}" for n in _centre_fields(select, method)}
    return [f for f in step_size_columns(select) if f in chosen]


def candidate_table(runs: pd.DataFrame, select: dict) -> pd.DataFrame:
    """One row per group × candidate: the median (and mean, sd) of the seeds' scores, the
    diverged count, ``unstable``, and the rank within the group (stable first, then by median,
    ties to the smaller step sizes)."""
    rule = select_rule(select)
    column = f"final_{rule['metric']}_{rule['split']}"
    table = runs.copy()
    if column not in table:
        table[column] = np.nan
    table["_score"] = np.where(table["status"] == "ok", table[column].astype(float), np.nan)
    rows = []
    for key, part in table.groupby(GROUP, sort=False, dropna=False):
        fields = _fields(select, key[1])
        for values, cand in part.groupby(fields, sort=True, dropna=False):
            values = values if isinstance(values, tuple) else (values,)
            scores = cand["_score"].dropna()
            median = float(scores.median()) if len(scores) else math.nan
            n_bad = int(len(cand) - len(scores))
            far = bool(len(scores) and (scores < median - rule["unstable_gap"]).any())
            capped = cand["stop_reason"].eq("max_epochs") if "stop_reason" in cand else \
                pd.Series(False, index=cand.index)
            rows.append({**dict(zip(GROUP, key, strict=True)),
                         **dict(zip(fields, values, strict=True)),
                         "score": median,
                         "score_mean": float(scores.mean()) if len(scores) else math.nan,
                         "score_sd": float(scores.std(ddof=1)) if len(scores) > 1 else math.nan,
                         "score_min": float(scores.min()) if len(scores) else math.nan,
                         "n_seeds": len(cand), "n_diverged": n_bad,
                         "unstable": bool(n_bad > 0 or far),
                         "unconverged": bool(capped.any()),
                         "n_capped": int(capped.sum()),
                         "round": int(cand["selection_round"].max())
                         if "selection_round" in cand else 0})
    cand = pd.DataFrame(rows)
    if cand.empty:
        return cand
    order = cand.assign(_stable=~cand["unstable"], _converged=~cand["unconverged"],
                        _neg=-cand["score"].fillna(-math.inf))
    steps = [f for f in step_size_columns(select) if f in cand]
    sort_by = ["_stable", "_converged", "_neg", *steps]
    order = order.sort_values(sort_by, ascending=[False, False, True] +
                              [True] * (len(sort_by) - 3), kind="stable")
    order["rank"] = order.groupby(GROUP, sort=False, dropna=False).cumcount() + 1
    front = [*GROUP, *steps]
    cols = front + [c for c in order.columns if c not in front and not c.startswith("_")]
    return order[cols].sort_values([*GROUP, "rank"], kind="stable").reset_index(drop=True)


def _edges(group: pd.DataFrame, best: pd.Series, select: dict) -> dict[str, str]:
    """{field: "low" | "high" | "both"}: the directions in which no smaller (larger) value of a
    step size was tried with the other step sizes at the best's values."""
    fields = _fields(select, best["method"])
    edges = {}
    for f in fields:
        others = [g for g in fields if g != f]
        line = group
        for g in others:
            line = line[np.isclose(line[g].astype(float), float(best[g]))]
        values = line[f].astype(float)
        low = not bool((values < float(best[f]) * (1 - 1e-9)).any())
        high = not bool((values > float(best[f]) * (1 + 1e-9)).any())
        if low or high:
            edges[f] = "both" if low and high else ("low" if low else "high")
    return edges


def choose(candidates: pd.DataFrame, select: dict) -> pd.DataFrame:
    """``selected.csv``: per group the rank-1 candidate with its score, whether it is interior
    in every step size (``edge`` names the ones that are not), ``at_cap`` (still at an edge
    after the last extension) and ``unstable``."""
    rule = select_rule(select)
    rows = []
    for _, group in candidates.groupby(GROUP, sort=False, dropna=False):
        best = group[group["rank"] == 1].iloc[0]
        edges = _edges(group, best, select)
        rounds = int(group["round"].max())
        row = {k: best[k] for k in group.columns if k not in ("rank",)}
        row.update({"metric": rule["metric"], "split": rule["split"],
                    "n_candidates": len(group), "rounds": rounds + 1,
                    "capped_candidates": int(group["unconverged"].astype(bool).sum()),
                    "cap_binds": bool(best["unconverged"]),
                    "interior": not edges,
                    "edge": ",".join(f"{f.split('.')[1]}:{side}"
                                     for f, side in sorted(edges.items())),
                    "at_cap": bool(edges) and rounds >= rule["max_extensions"]})
        row["shared_from"] = ""
        row["searched"] = True
        rows.append(row)
    selected = pd.DataFrame(rows)
    for rule_ in select.get("share", []):
        have = {tuple(r[k] for k in GROUP) for _, r in selected.iterrows()}
        extra = []
        for _, r in selected.iterrows():
            if all(r[k] == v for k, v in rule_["from"].items()):
                copy = r.copy()
                for k, v in rule_["to"].items():
                    copy[k] = v
                if tuple(copy[k] for k in GROUP) not in have:
                    source = r["shared_from"] or f"{r['method']}/{r['estimator']}+{r['baseline']}"
                    if "dataset" in rule_["to"] and ":" not in source:
                        source = f"{r['dataset']}:{source}"  # chosen on another data set
                    copy["shared_from"] = source
                    copy["searched"] = False
                    extra.append(copy)
        if extra:
            selected = pd.concat([selected, pd.DataFrame(extra)], ignore_index=True)
    return selected


def extensions(candidates: pd.DataFrame, select: dict) -> dict[tuple, list[dict[str, float]]]:
    """New step-size combinations per group (``GROUP`` values as a tuple) for the groups whose
    best candidate is not bracketed and that have extensions left: the best moved by
    ``extend_factor`` along each open direction."""
    rule = select_rule(select)
    out: dict[tuple, list[dict[str, float]]] = {}
    for key, group in candidates.groupby(GROUP, sort=False, dropna=False):
        if int(group["round"].max()) >= rule["max_extensions"]:
            continue
        best = group[group["rank"] == 1].iloc[0]
        fields = _fields(select, best["method"])
        factor = rule["extend_factor"]
        tried = {tuple(round(float(r[f]), 12) for f in fields) for _, r in group.iterrows()}
        new = []
        for f, side in _edges(group, best, select).items():
            moves = ([1 / factor] if side in ("low", "both") else []) + \
                ([factor] if side in ("high", "both") else [])
            for m in moves:
                combo = {g.split(".")[1]: float(best[g]) for g in fields}
                combo[f.split(".")[1]] = _round(float(best[f]) * m)
                if tuple(round(combo[g.split(".")[1]], 12) for g in fields) not in tried:
                    new.append(combo)
        if new:
            out[tuple(key)] = new
    return out


def missing_choice(exp_dir: Path, listed: set[str]) -> str:
    """Why a finished aggregation of a step-size selection lacks its choice ("" when it does
    not): its runs.csv holds selection rounds, but ``listed`` (the CSVs its manifest records)
    has no ``selected.csv`` or ``candidates.csv``, as when the command stopped between
    aggregating the last round and writing the choice."""
    runs = Path(exp_dir) / "runs.csv"
    if "runs.csv" not in listed or {"selected.csv", "candidates.csv"} <= listed:
        return ""
    try:
        rounds = pd.read_csv(runs, usecols=lambda c: c == "selection_round")
    except (OSError, ValueError, pd.errors.ParserError, pd.errors.EmptyDataError):
        return ""  # an unreadable runs.csv is reported by its own check
    if "selection_round" not in rounds or rounds["selection_round"].isna().all():
        return ""
    lacking = sorted({"selected.csv", "candidates.csv"} - listed)
    return (f"{Path(exp_dir)}: a step-size selection whose runs are aggregated but whose "
            f"{' and '.join(lacking)} {'was' if len(lacking) == 1 else 'were'} never written "
            f"(interrupted before its choice); rerun it to finish (python -m experiments run "
            f"{Path(exp_dir).name} with the same options)")


def _round(value: float) -> float:
    """Step sizes to 3 significant digits (0.001/3 → 0.000333), so grids stay readable, and to
    2 where that moves them by under 0.2 % (0.000333·3 → 0.001, not 0.000999), so a cross
    around a divided centre meets the values the centre came from."""
    three, two = float(f"{value:.3g}"), float(f"{value:.2g}")
    return two if abs(two - three) < 2e-3 * three else three
