"""``make_figures``: validate the CSVs, then write every registered table and figure.

For each experiment that has results, the table writers run first, then every figure function
(in registration order); each figure is saved as ``results/<experiment>/figures/<stem>.png`` and
``.pdf``. Which functions belong to which experiment is the registry's business
(``experiments.figures.registry``); an experiment that registered none (a custom grid) gets the
generic figures (``experiments.figures.generic``).
"""

from __future__ import annotations

import logging
import traceback
from pathlib import Path

import matplotlib.pyplot as plt
import seaborn as sns

from experiments.figures import generic
from experiments.figures.drawing import save_figure
from experiments.figures.loading import SkipFigure, validate_results
from experiments.figures.registry import (
    REGISTRY,
    check_registry,
    figure_functions,
    table_writers,
)

__all__ = ["make_figures"]

log = logging.getLogger(__name__)


def figure_makers(experiment: str) -> tuple:
    """The figure functions that draw ``experiment``: those its figure module registered (even
    none), or the generic figures for an experiment without a module (a custom grid)."""
    return figure_functions(experiment) if experiment in REGISTRY else tuple(generic.FIGURES)


def make_figures(results: str | Path, experiments: list[str] | None = None, *,
                 strict: bool = False) -> tuple[list[Path], list[str]]:
    """Validate the CSVs, then draw every figure of every experiment that has results.

    Returns the files written and the figures that failed ("experiment: function: error").
    Files written: PNG and PDF per figure, and the registered tables, e.g.
    gradient_variance's ``variance_ratio.csv``/``.md``). Raises ``registry.RegistryError`` if an
    experiment with a grid has no figure module, and ``schema.SchemaError`` if a CSV breaks the
    contract, both before drawing anything. A figure whose inputs are missing is skipped with a
    logged note; a figure that fails unexpectedly is returned among the failures (its
    traceback logged at debug level) and the others still drawn, unless ``strict`` (tests),
    which re-raises. When every figure function of an
    experiment ran, PNG/PDF files in its ``figures/`` folder that this call did not write (left
    from an earlier grid or version) are removed, so the folder shows exactly what the CSVs
    support. Output is byte-identical across reruns on the same CSVs and library versions.
    """
    results = Path(results)
    check_registry()
    loaded = validate_results(results, experiments)
    written: list[Path] = []
    failures: list[str] = []
    with sns.axes_style("whitegrid"), sns.plotting_context("paper", font_scale=1.0), \
            plt.rc_context({"figure.max_open_warning": 0}):
        for name, res in loaded.items():
            for write in table_writers(name):
                written += write(res)
            folder, mine, failed = res.folder / "figures", [], False
            for make in figure_makers(name):
                try:
                    for stem, fig in make(res):
                        mine += save_figure(fig, folder, stem)
                except SkipFigure as why:
                    log.info("%s: skipping %s: %s", name, make.__name__, why)
                except Exception as err:
                    plt.close("all")
                    if strict:
                        raise
                    failed = True
                    failures.append(f"{name}: {make.__name__}: {type(err).__name__}: {err}")
                    # the caller reports each failure in one line; the traceback is for debugging
                    log.debug("%s: %s failed; other figures go on\n%s", name, make.__name__,
                              traceback.format_exc())
            if not failed and folder.is_dir():
                for old in sorted(folder.glob("*.p[dn][gf]")):
                    if old.suffix in (".png", ".pdf") and old not in mine:
                        log.info("%s: removing stale %s", name, old)
                        old.unlink()
            log.info("%s: %d figure files in %s", name, len(mine), folder)
            written += mine
    return written, failures
