"""The README's statements about the results, generated from the committed CSVs.

``README.md`` holds two generated blocks, each between ``<!-- NAME:start -->`` and
``<!-- NAME:end -->``:

- ``findings``: what the runs are (how many stopped at a plateau, per experiment), how the step
  sizes were chosen (``lr_selection/selected.csv``), then one line per finding of
  ``experiments.findings`` — its verdict, its tally of cells and the range of its effect over the
  tested cells, each a mean with its 95 % t-interval — so the README says what FINDINGS.md says;
- ``results``: the test ELBO on digits (``elbo_curves``) by method and H, and at one H by training
  estimator, with the reference models beside them; bits per dimension at the largest H; the
  cells, seeds and code commits behind the CSVs. Every number is read from ``summary.csv``
  (each statistic's mean and its t-interval over the seeds it states) or counted in a CSV.

``python -m experiments readme`` rewrites both blocks from ``results/`` (``--check``: exit 1 if
they differ, writing nothing); ``tests/test_readme.py`` checks that the committed README equals
what the committed ``results/`` give, so the README cannot drift from the numbers. Reads CSVs
only (pandas, numpy; never torch or the training code), like ``experiments.findings``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pandas as pd

from experiments import findings as F
from experiments import summary as S
from experiments.findings.core import CONTRADICTS, SINGLE, SUPPORTS, UNCLEAR, _extremes, _iv
from experiments.findings.core import _ratio_of as _ratio_text
from experiments.findings.effects import EFFECTS
from experiments.vocabulary import LABEL_ORDER, METHOD_ORDER, experiment_order, ordered
from vi.files import atomic_write

__all__ = ["BLOCKS", "README", "ReadmeError", "readme_blocks", "readme_problems", "render",
           "write_readme"]

#: the repository's README, beside the ``experiments`` package
README = Path(__file__).resolve().parents[1] / "README.md"
#: the generated blocks, in the order the README holds them
BLOCKS = ("findings", "results")
_NOTE = ("<!-- generated from the CSVs by `python -m experiments readme`; do not edit by hand "
         "-->")
_JUDGED = (SUPPORTS, CONTRADICTS, UNCLEAR, SINGLE)
_NAMES = {"vem": "vem", "amortized": "amortized", "semi_amortized": "semi-amortized",
          "sa_vae": "SA-VAE"}

class ReadmeError(ValueError):
    """The README lacks a block's markers, or holds them out of order."""


# ------------------------------------------------------------------------------- helpers


def _iv_row(r, stem: str, digits: int = 2) -> str:
    """``mean [lo, hi]`` of a summary.csv quantity ``stem`` on row ``r`` (``—`` if absent)."""
    get = r.get if isinstance(r, dict) else r.__getitem__
    try:
        mean, n = float(get(f"{stem}_mean")), get(f"{stem}_n")
        lo, hi = float(get(f"{stem}_ci_low")), float(get(f"{stem}_ci_high"))
    except (KeyError, TypeError, ValueError):
        return "—"
    n = 0 if n is None or not np.isfinite(float(n)) else int(n)
    return _iv(mean, lo, hi, n, digits)


def _join(items: list[str]) -> str:
    return ", ".join(items) if items else "none"


def _int_list(values) -> str:
    return ", ".join(str(int(v)) for v in sorted(set(values)))


def _span(values) -> str:
    v = sorted({int(x) for x in values})
    return "—" if not v else str(v[0]) if v[0] == v[-1] else f"{v[0]}–{v[-1]}"


def _link(target: Path, readme: Path) -> str:
    return Path(os.path.relpath(target.resolve(), readme.resolve().parent)).as_posix()


def _md(rows: list[list[str]], head: list[str]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


# ------------------------------------------------------------------------------ findings


def _runs_line(results: Path) -> str:
    """Per experiment: the finished runs that stopped at a plateau, and any other outcome."""
    names = experiment_order({p.parent.name for p in results.glob("*/runs.csv")})
    parts = []
    for name in names:
        runs = S.read_csv(results / name / "runs.csv")
        if runs is None or "status" not in runs:
            continue
        ok = runs[runs["status"] == "ok"]
        text = f"`{name}` {int(_truthy(ok.get('converged')).sum())} of {len(ok)}"
        other = runs["status"][runs["status"] != "ok"].value_counts()
        if "outcome" in runs:  # a recorded outcome per run: count every one
            other = runs["outcome"].fillna("—").value_counts()
        extra = [f"{int(c)} {k}" for k, c in sorted(other.items()) if k != "converged"]
        parts.append(text + (f" ({', '.join(extra)})" if extra else ""))
    return ("**Runs.** Finished runs that stopped at a validation plateau (`converged` in "
            "`runs.csv`): " + _join(parts) + ".")


def _truthy(col) -> pd.Series:
    if col is None:
        return pd.Series([], dtype=bool)
    return col.astype(str).str.lower().isin(["true", "1", "1.0"])


def _selection_line(results: Path) -> str:
    sel = S.read_csv(results / "lr_selection" / "selected.csv")
    if sel is None or sel.empty:
        return "**Step sizes.** No `lr_selection/selected.csv` in the results."
    shared = sel["shared_from"].notna() if "shared_from" in sel else pd.Series(False, sel.index)
    own = sel[~shared]
    other_data = sel["shared_from"][shared].astype(str).str.contains(":")
    text = (f"**Step sizes.** `lr_selection` searched {len(own)} of the {len(sel)} "
            f"data set × method × estimator choices; the other {int(shared.sum())} take a "
            f"searched choice's (`shared_from` in `selected.csv`): {int(other_data.sum())} "
            f"another data set's, {int((~other_data).sum())} another method's or estimator's "
            f"on the same data set.")
    if "interior" in own:
        text += (f" Of the searched, {int(_truthy(own['interior']).sum())} lie inside the "
                 f"candidates that were stable and converged")
        if "edge" in own:
            text += f", {int(own['edge'].notna().sum())} at an edge"
        text += "."
    cand = S.read_csv(results / "lr_selection" / "runs.csv")
    if cand is not None and "converged" in cand:
        ok = cand[cand["status"] == "ok"]
        text += (f" {int((~_truthy(ok['converged'])).sum())} of its {len(cand)} candidate runs "
                 f"reached their epoch cap before a plateau.")
    return text


def _headline(f) -> str:
    """The range of a finding's effect over its tested cells, each with its interval."""
    t = f.table
    effect, fmt = EFFECTS.get(f.key, ("effect", "iv"))
    if f.key == "test_time_cost":
        return _test_time_cost(f)
    if t is None or t.empty or not {"mean", "lo", "hi", "n"} <= set(t.columns):
        return f.evidence.split(". ")[0].rstrip(".") if f.evidence else ""
    cells = t[t["judgement"].isin(_JUDGED)] if "judgement" in t else t
    cells = cells if len(cells) else t
    named = [c for c in t.columns[:list(t.columns).index("n")]
             if cells[c].notna().all() and (cells[c].astype(str) != "").all()]
    # the columns that tell the cells apart; a single cell is named by all of its own
    keys = [c for c in named if cells[c].astype(str).nunique() > 1 or len(cells) == 1]
    if fmt == "ratio":
        def text(r):
            return _ratio_text(r)
    else:
        digits = {"iv1": 1, "iv4": 4}.get(fmt, 2)

        def text(r):
            return _iv(r["mean"], r["lo"], r["hi"], r["n"], digits)
    span = _extremes(cells, keys, text)
    return f"{effect}: {span}" if span else ""


def _test_time_cost(f) -> str:
    t = f.table
    need = {"encoder method", "estimator", "vem E-steps to match (median)",
            "vem s / point to match", "encoder s / point"}
    if t is None or not need <= set(t.columns):
        return f.evidence.split(". ")[0].rstrip(".") if f.evidence else ""
    rows = t[t["estimator"] == "reparam"]
    parts = [f"{_NAMES.get(r['encoder method'], r['encoder method'])}'s "
             f"{r['vem E-steps to match (median)']} E-steps, {r['vem s / point to match']} s "
             f"against {r['encoder s / point']} s" for _, r in rows.iterrows()]
    return ("reparam-trained, the median E-steps and seconds per point vem needs to match one "
            "pass of each encoder: " + "; ".join(parts)) if parts else ""


def _tally(f) -> str:
    """``s of k cells support[, c contradict][, u unclear][, m without an interval]``."""
    t = f.table
    if t is None or "judgement" not in t or not len(t):
        return ""
    j = t["judgement"].value_counts()
    k = int(sum(j.get(v, 0) for v in _JUDGED))
    out = [f"{int(j.get(SUPPORTS, 0))} of {k} cells support"]
    out += [f"{int(j[v])} {w}" for v, w in ((CONTRADICTS, "contradict"), (UNCLEAR, "unclear"),
                                             (SINGLE, "without an interval (n = 1)"))
            if j.get(v, 0)]
    return ", ".join(out)


def _findings_block(results: Path, readme: Path) -> str:
    items = F.findings(results)
    link = _link(results / "FINDINGS.md", readme)
    lines = [
        _NOTE,
        f"Each numbered line is one finding of [`{link}`]({link}), where its claim, tables "
        f"and rule are: its verdict, how its cells were judged, and the range of its effect "
        f"over those cells, as mean [95 % t-interval] over seeds or seed pairs. Trained models "
        f"are compared on the runs that stopped at a plateau.",
        "",
        _runs_line(results),
        "",
        _selection_line(results),
        "",
    ]
    for i, f in enumerate(items, 1):
        tally = _tally(f)
        head = f"{i}. **{f.title}**: {f.verdict}"
        if f.contradicts:
            head += ", contradicting the literature"
        line = head + (f" ({tally})" if tally else "") + "."
        headline = _headline(f)
        lines.append(line + (f" {headline[0].upper()}{headline[1:]}." if headline else ""))
    return "\n".join(lines)


# ------------------------------------------------------------------------------- results


def _summary(results: Path) -> pd.DataFrame | None:
    s = S.read_csv(results / "summary.csv")
    if s is None or s.empty:
        return None
    if "convergence" in s:
        s = s[s["convergence"] == "converged"]
    if "setting" in s:
        s = s[s["setting"] == "default"]
    return s


def _cell(s: pd.DataFrame, **keys) -> pd.Series | None:
    m = np.ones(len(s), dtype=bool)
    for k, v in keys.items():
        m &= (s[k] == v).to_numpy()
    return s[m].iloc[0] if m.any() else None


def _counted(results: Path, experiment: str, dataset: str) -> str:
    """Runs of the experiment × data set left out of its summary rows (not at a plateau,
    diverged or failed), by cell."""
    full = S.read_csv(results / "summary.csv")
    if full is None or "n_runs" not in full:
        return ""
    c = full[(full["experiment"] == experiment) & (full["dataset"] == dataset)]
    out = []
    for key, g in c.groupby(["method", "estimator_label", "latent_dim"], sort=False):
        runs = int(g["n_runs"].iloc[0])
        used = g[g["convergence"] == "converged"]["test_elbo_n"].sum() \
            if "convergence" in g else runs
        if runs > used:
            out.append(f"{_NAMES.get(key[0], key[0])} {key[1]} H = {int(key[2])}: "
                       f"{runs - int(used)} of {runs}")
    return ("Runs left out (not stopped at a plateau, diverged or failed): " + "; ".join(out)
            + "." if out else "Every finished run of these cells stopped at a plateau and is "
                              "counted.")


def _digits_tables(s: pd.DataFrame, results: Path) -> list[str]:
    d = s[(s["experiment"] == "elbo_curves") & (s["dataset"] == "digits")]
    if d.empty:
        return ["No `elbo_curves` digits rows in `summary.csv`."]
    methods = ordered(d["method"].unique(), METHOD_ORDER)
    rep = d[d["estimator_label"] == "reparam"]
    rows = []
    for h in sorted(rep["latent_dim"].unique()):
        r = [_cell(rep, method=m, latent_dim=h) for m in methods]
        ref = next(x for x in r if x is not None)
        rows.append([str(int(h)), *[_iv_row(x, "test_elbo") if x is not None else "—"
                                    for x in r],
                     _iv_row(ref, "test_ref_factor_analysis"), _iv_row(ref, "test_ref_no_latent")])
    n = _span(d["test_elbo_n"].dropna())
    out = [f"Test ELBO on digits (`elbo_curves`, reparam-trained, runs stopped at a plateau), "
           f"nats per test point over {_span(d['test_elbo_points'].dropna())} test points, "
           f"mean [95 % t-interval] over {n} seeds per cell; factor "
           f"analysis and the no-latent Gaussian are exact test log-likelihoods on the same "
           f"splits, mean [95 % t-interval] over the same data seeds:", "",
           _md(rows, ["H", *[_NAMES.get(m, m) for m in methods], "factor analysis",
                      "no-latent Gaussian"])]
    counts = d.groupby("latent_dim")["estimator_label"].nunique()
    h = int(counts.idxmax()) if len(counts) else None
    at = d[d["latent_dim"] == h]
    labels = ordered(at["estimator_label"].unique(), LABEL_ORDER)
    if len(labels) > 1:
        rows = [[lab, *[_iv_row(x, "test_elbo") if (x := _cell(at, method=m,
                                                                estimator_label=lab))
                        is not None else "—" for m in methods]] for lab in labels]
        ref = at.iloc[0]
        out += ["", f"At H = {h}, by training estimator (same units; factor analysis "
                    f"{_iv_row(ref, 'test_ref_factor_analysis')}, no-latent Gaussian "
                    f"{_iv_row(ref, 'test_ref_no_latent')}):", "",
                _md(rows, ["estimator", *[_NAMES.get(m, m) for m in methods]])]
    out += ["", _counted(results, "elbo_curves", "digits")]
    return out


def _bpd_line(s: pd.DataFrame) -> str:
    parts = []
    for exp, data in (("elbo_curves", "digits"), ("mnist_curves", "mnist5k")):
        d = s[(s["experiment"] == exp) & (s["dataset"] == data)
              & (s["estimator_label"] == "reparam")]
        if d.empty or "test_elbo_bpd_mean" not in d or d["test_elbo_bpd_mean"].isna().all():
            continue
        h = d["latent_dim"].max()
        at = d[d["latent_dim"] == h]
        vals = [f"{_NAMES.get(r['method'], r['method'])} {_iv_row(r, 'test_elbo_bpd')}"
                for _, r in at.set_index("method", drop=False).loc[
                    ordered(at["method"].unique(), METHOD_ORDER)].iterrows()]
        vals.append(f"factor analysis {_iv_row(at.iloc[0], 'test_ref_factor_analysis_bpd')}")
        parts.append(f"{data} (`{exp}`, H = {int(h)}): " + ", ".join(vals))
    if not parts:
        return ""
    return ("In bits per dimension of the quantized pixels (the dequantization bound of the "
            "test ELBO; lower is better), reparam-trained: " + "; ".join(parts) + ".")


def _cells_line(s_all: pd.DataFrame) -> str:
    """Per experiment × data set: seeds per cell, and which H each estimator was trained at."""
    parts = []
    for (exp, data), g in s_all.groupby(["experiment", "dataset"], sort=False):
        cover = []
        for lab in ordered(g["estimator_label"].unique(), LABEL_ORDER):
            gl = g[g["estimator_label"] == lab]
            hs = set(gl["latent_dim"])
            few = [f"{_NAMES.get(m, m)} at {_int_list(gm['latent_dim'])} only"
                   for m, gm in gl.groupby("method") if set(gm["latent_dim"]) < hs]
            cover.append(f"{lab} at H = {_int_list(hs)}" + (f" ({'; '.join(few)})"
                                                            if few else ""))
        seeds = _span(g["n_runs"])
        parts.append(f"- `{exp}`, {data}: {seeds} seed{'' if seeds == '1' else 's'} per "
                     f"cell; " + ", ".join(cover) + ".")
    order = {e: i for i, e in enumerate(experiment_order(set(s_all["experiment"])))}
    parts.sort(key=lambda p: order.get(p.split("`")[1], 99))
    return "\n".join(["**Cells and seeds** (`summary.csv`):", "", *parts])


def _commits_line(results: Path) -> str:
    commits, dirty, total = set(), 0, 0
    for path in sorted(results.glob("*/runs.csv")):
        runs = S.read_csv(path)
        if runs is None:
            continue
        total += len(runs)
        if "git_commit" in runs:
            commits |= set(runs["git_commit"].dropna().astype(str))
        if "git_dirty" in runs:
            dirty += int(_truthy(runs["git_dirty"]).sum())
    names = ", ".join(f"`{c[:10]}`" for c in sorted(commits)) or "none recorded"
    return (f"The {total} rows of the `runs.csv` files name {len(commits)} code commit(s) "
            f"({names}); {dirty} were run from a working tree with uncommitted changes "
            f"(`git_dirty`).")


def _results_block(results: Path, readme: Path) -> str:
    s = _summary(results)
    if s is None:
        return _NOTE + "\nNo `summary.csv` in the results."
    full = S.read_csv(results / "summary.csv")
    lines = [_NOTE, *_digits_tables(s, results)]
    bpd = _bpd_line(s)
    lines += ["", bpd] if bpd else []
    lines += ["", _cells_line(full), "", _commits_line(results)]
    return "\n".join(lines)


# ------------------------------------------------------------------------------ the file


def readme_blocks(results: str | Path = "results", readme: str | Path = README
                  ) -> dict[str, str]:
    """The generated text of each block (``BLOCKS``) from the CSVs under ``results``."""
    results, readme = Path(results), Path(readme)
    return {"findings": _findings_block(results, readme),
            "results": _results_block(results, readme)}


def _marker(name: str, end: str) -> str:
    return f"<!-- {name}:{end} -->"


def render(text: str, blocks: dict[str, str]) -> str:
    """``text`` with each block's content (between its markers) replaced by ``blocks[name]``;
    raises ``ReadmeError`` when a block's markers are missing, repeated or out of order."""
    for name, body in blocks.items():
        start, end = _marker(name, "start"), _marker(name, "end")
        if text.count(start) != 1 or text.count(end) != 1 or text.index(start) > text.index(end):
            raise ReadmeError(f"the README must hold {start} … {end} once, in that order")
        text = re.sub(re.escape(start) + r".*?" + re.escape(end),
                      lambda _m, b=body, s=start, e=end: f"{s}\n{b.strip()}\n{e}", text,
                      flags=re.S)
    return text


def readme_problems(results: str | Path = "results", readme: str | Path = README) -> list[str]:
    """The blocks of ``readme`` that differ from what ``results`` give (empty: up to date)."""
    readme = Path(readme)
    text = readme.read_text()
    blocks = readme_blocks(results, readme)
    return [f"{readme.name}: the {name} block differs from the CSVs under {results}; run "
            f"`python -m experiments readme`" for name in blocks
            if render(text, {name: blocks[name]}) != text]


def write_readme(results: str | Path = "results", readme: str | Path = README) -> Path:
    """Rewrite the generated blocks of ``readme`` from ``results`` (atomically)."""
    readme = Path(readme)
    text = readme.read_text()
    new = render(text, readme_blocks(results, readme))
    if new != text:
        atomic_write(readme, new)
    return readme


def command(args) -> int:
    """``python -m experiments readme [--results DIR] [--readme FILE] [--check]``: rewrite the
    README's generated blocks from verified CSVs (``--check``: exit 1 listing the blocks that
    differ, writing nothing). Bad input (no results folder, no README, missing markers, CSVs that
    fail ``check``): one message, exit 2, nothing written."""
    import sys

    from experiments.study import UsageError, refusal, verify_inputs, writable_folder

    results, readme = Path(args.results), Path(args.readme)
    if not results.is_dir():
        raise UsageError(f"no results folder {results}")
    if not readme.is_file() or readme.is_symlink():
        raise UsageError(f"no README file {readme} (a plain file, not a link)")
    try:
        render(readme.read_text(), dict.fromkeys(BLOCKS, ""))  # its markers, before any CSV
    except (ReadmeError, UnicodeDecodeError) as err:
        raise UsageError(f"{readme}: {err}") from None
    if not args.check:
        writable_folder(readme.resolve().parent, "--readme folder")
    problems = verify_inputs(results)
    if problems:  # never statements from unverified CSVs
        raise UsageError(refusal(results, problems, str(readme)))
    try:
        if args.check:
            differ = readme_problems(results, readme)
            for line in differ:
                print(line, file=sys.stderr)
            if not differ:
                print(f"{readme}: the generated blocks equal what {results} gives")
            return 1 if differ else 0
        path = write_readme(results, readme)
    except ReadmeError as err:
        raise UsageError(f"{readme}: {err}") from None
    print(f"readme → {path}")
    return 0


def refresh(results: str | Path) -> int:
    """After ``reproduce`` on the committed results folder: rewrite the README's blocks (0), or
    say why not (1); a README without the blocks (an installed copy) is left alone (0)."""
    import sys

    if not README.is_file():
        return 0
    try:
        print(f"readme → {write_readme(results, README)}")
    except ReadmeError:
        return 0
    except (OSError, ValueError) as err:
        print(f"error: writing {README} failed ({type(err).__name__}: {err})", file=sys.stderr)
        return 1
    return 0
