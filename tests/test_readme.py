"""The README's generated statements (``experiments.readme``): the committed README equals what
the committed results give, an edited number is caught, and the command refuses bad input."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest

from experiments import readme as R
from experiments.cli import main

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results"

needs_results = pytest.mark.skipif(not (RESULTS / "summary.csv").is_file(),
                                   reason="no committed results/summary.csv")


@pytest.fixture(scope="module")
def blocks() -> dict[str, str]:
    return R.readme_blocks(RESULTS, R.README)


def _block(text: str, name: str) -> str:
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    return text[text.index(start) + len(start):text.index(end)]


@needs_results
def test_committed_readme_equals_what_the_committed_results_give(blocks) -> None:
    text = R.README.read_text()
    for name in R.BLOCKS:
        assert _block(R.render(text, blocks), name) == _block(text, name), (
            f"README.md's {name} block differs from the CSVs in results/; run "
            f"`python -m experiments readme`")


@needs_results
def test_the_digits_table_reads_summary_csv(blocks) -> None:
    """Each method's cell of the digits table at H = 5 is summary.csv's mean [t-interval] of
    that cell's converged runs, and "—" exactly where the cell has none."""
    s = pd.read_csv(RESULTS / "summary.csv")
    lines = blocks["results"].splitlines()
    header = next(x for x in lines if x.startswith("| H |")).strip("| ").split(" | ")
    row = next(x for x in lines if x.startswith("| 5 |")).strip("| ").split(" | ")
    methods = {label: name for name, label in R._NAMES.items()}
    checked = 0
    for label, text in zip(header, row, strict=True):
        if label not in methods:
            continue
        cell = s[(s.experiment == "elbo_curves") & (s.dataset == "digits")
                 & (s.method == methods[label]) & (s.estimator_label == "reparam")
                 & (s.latent_dim == 5) & (s.convergence == "converged")]
        if cell.empty:
            assert text == "—", label
            continue
        r = cell.iloc[0]
        assert text == f"{r.test_elbo_mean:.2f} [{r.test_elbo_ci_low:.2f}, " \
                       f"{r.test_elbo_ci_high:.2f}]", label
        checked += 1
    assert checked >= 1  # the committed study has converged digits runs at H = 5


@needs_results
def test_an_edited_number_or_a_missing_marker_is_caught(blocks) -> None:
    text = R.README.read_text()
    current = R.render(text, blocks)
    body = _block(current, "results")
    edited = current.replace(body, re.sub(r"\d\.\d\d", "9.99", body, count=1))
    assert edited != current and R.render(edited, blocks) == current
    outside = current.replace("## Reproducibility", "## Reproducibility (edited)")
    assert R.render(outside, blocks) == outside  # text outside the markers is kept
    with pytest.raises(R.ReadmeError, match="findings:start"):
        R.render(current.replace("<!-- findings:end -->", ""), blocks)


@needs_results
def test_readme_problems_names_the_block_that_differs(tmp_path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text("# t\n\n<!-- findings:start -->\nold\n<!-- findings:end -->\n\n"
                      "<!-- results:start -->\n<!-- results:end -->\n")
    problems = R.readme_problems(RESULTS, readme)
    assert len(problems) == 2 and "findings block" in problems[0]
    R.write_readme(RESULTS, readme)
    assert R.readme_problems(RESULTS, readme) == []


def test_readme_command_refuses_bad_input(tmp_path, capsys) -> None:
    """No results folder, no README, a README without its markers, CSVs that fail `check`:
    one message, exit 2, the README as it was."""
    readme = tmp_path / "README.md"
    marked = ("<!-- findings:start -->\nold\n<!-- findings:end -->\n"
              "<!-- results:start -->\nold\n<!-- results:end -->\n")
    readme.write_text("no markers\n")
    assert main(["readme", "--results", str(tmp_path / "absent"), "--readme", str(readme)]) == 2
    assert "no results folder" in capsys.readouterr().err
    assert main(["readme", "--results", str(tmp_path), "--readme",
                 str(tmp_path / "missing.md")]) == 2
    assert "no README file" in capsys.readouterr().err
    assert main(["readme", "--results", str(tmp_path), "--readme", str(readme)]) == 2
    assert "must hold <!-- findings:start -->" in capsys.readouterr().err
    assert readme.read_text() == "no markers\n"
    results = tmp_path / "results"
    (results / "elbo_curves").mkdir(parents=True)
    (results / "elbo_curves" / "runs.csv").write_text("run_id,status\nx,ok\n")  # no manifest
    readme.write_text(marked)
    for extra in ([], ["--check"]):
        assert main(["readme", "--results", str(results), "--readme", str(readme), *extra]) == 2
        assert "fail validation" in capsys.readouterr().err
    assert readme.read_text() == marked  # nothing written
