"""The registry: which figure functions, tables and input tables belong to which experiment.

Each experiment module registers itself when imported::

    @register("elbo_curves")
    def fig_elbo_curves(res: ExperimentResults) -> Iterator[tuple[str, Figure]]:
        ...  # yield (file stem, figure) pairs

    @register_table("gradient_variance", outputs=("variance_ratio.csv", "variance_ratio.md"))
    def write_variance_ratio(res: ExperimentResults) -> list[Path]:
        ...  # write tables beside the CSVs, return their paths

``table_outputs(experiment)`` names those derived files (``check`` may list them as expected
beside the manifest's CSVs).

``register(..., inputs={"images.csv": columns})`` also declares the extra tables (beside
metrics.csv and runs.csv) that the figures read, with the columns they need; they are validated
with the rest. Experiments are drawn in the grids' order (``experiments.vocabulary``), those
without a grid file after them.
``check_registry`` fails loudly when an experiment with a grid has no figure module, rather than
leaving its results undrawn.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from experiments.grids import GRID_DIR

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from experiments.figures.loading import ExperimentResults

__all__ = [
    "REGISTRY",
    "Entry",
    "FigureFunction",
    "RegistryError",
    "TableWriter",
    "check_registry",
    "figure_functions",
    "grid_names",
    "input_tables",
    "register",
    "register_table",
    "registered",
    "table_outputs",
    "table_writers",
]

#: a figure function: one experiment's results → (file stem, figure) pairs
FigureFunction = Callable[["ExperimentResults"], Iterator[tuple[str, "Figure"]]]
#: a table writer: one experiment's results → the files it wrote
TableWriter = Callable[["ExperimentResults"], list[Path]]
_F = TypeVar("_F", bound=Callable)


class RegistryError(LookupError):
    """An experiment has a grid but no registered figure module (or a registration clashes)."""


@dataclass
class Entry:
    """What one experiment registered: figure functions and table writers (each run in
    registration order), and the extra input tables with the columns they must have."""

    figures: list[FigureFunction] = field(default_factory=list)
    tables: list[TableWriter] = field(default_factory=list)
    inputs: dict[str, tuple[str, ...]] = field(default_factory=dict)
    outputs: list[str] = field(default_factory=list)


#: experiment name → its registrations, in the order experiments were first registered
REGISTRY: dict[str, Entry] = {}


def _add(functions: list, function: Callable) -> None:
    """Append ``function``, or replace one of the same module and name (a reloaded module)."""
    key = (function.__module__, function.__qualname__)
    for i, old in enumerate(functions):
        if (old.__module__, old.__qualname__) == key:
            functions[i] = function
            return
    functions.append(function)


def register(experiment: str, *, inputs: Mapping[str, Sequence[str]] | None = None
             ) -> Callable[[_F], _F]:
    """Decorator: draw the decorated figure function for ``experiment``.

    ``inputs`` maps an extra table's file name to the columns the figure needs (after
    ``loading._normalise``); the table is validated when present and its absence skips only
    the figures that ask for it.
    """
    entry = REGISTRY.setdefault(experiment, Entry())
    for filename, columns in (inputs or {}).items():
        known = entry.inputs.setdefault(filename, tuple(columns))
        if known != tuple(columns):
            raise RegistryError(f"{experiment}: {filename} registered with columns {known} and "
                                f"{tuple(columns)}")

    def decorate(function: _F) -> _F:
        _add(entry.figures, function)
        return function

    return decorate


def register_table(experiment: str, *, outputs: Sequence[str] = ()) -> Callable[[_F], _F]:
    """Decorator: run the decorated table writer for ``experiment`` before its figures;
    ``outputs`` names the files it writes beside the experiment's CSVs (``table_outputs``),
    derived from them and so not in the experiment's manifest."""
    entry = REGISTRY.setdefault(experiment, Entry())
    for name in outputs:
        if name not in entry.outputs:
            entry.outputs.append(name)

    def decorate(function: _F) -> _F:
        _add(entry.tables, function)
        return function

    return decorate


def registered() -> tuple[str, ...]:
    """The experiments with a figure module, in the grids' order (others after them, by
    name)."""
    from experiments.vocabulary import experiment_order

    return tuple(experiment_order(REGISTRY))


def figure_functions(experiment: str) -> tuple[FigureFunction, ...]:
    """The figure functions of ``experiment`` (none when it registered nothing)."""
    entry = REGISTRY.get(experiment)
    return tuple(entry.figures) if entry else ()


def table_writers(experiment: str) -> tuple[TableWriter, ...]:
    """The table writers of ``experiment`` (none when it registered nothing)."""
    entry = REGISTRY.get(experiment)
    return tuple(entry.tables) if entry else ()


def table_outputs(experiment: str) -> tuple[str, ...]:
    """The files the table writers of ``experiment`` write beside its CSVs (e.g.
    ``variance_ratio.csv``): derived from the CSVs, not listed in its manifest."""
    entry = REGISTRY.get(experiment)
    return tuple(entry.outputs) if entry else ()


def input_tables(experiment: str) -> dict[str, tuple[str, ...]]:
    """Extra input table → the columns the figures of ``experiment`` need."""
    entry = REGISTRY.get(experiment)
    return dict(entry.inputs) if entry else {}


def grid_names() -> list[str]:
    """The experiments that have a grid file (``experiments/grids/<name>.json``)."""
    return sorted(p.stem for p in GRID_DIR.glob("*.json"))


def check_registry(names: Iterable[str] | None = None) -> None:
    """Raise ``RegistryError`` naming every experiment in ``names`` (default: every experiment
    with a grid file) that has no registered figure module."""
    names = grid_names() if names is None else list(names)
    missing = [n for n in names if n not in REGISTRY]
    if missing:
        raise RegistryError(
            f"no figure module registered for experiment(s) {', '.join(missing)}: add "
            f"experiments/figures/<experiment>.py with a function decorated "
            f"@register(\"<experiment>\"), which experiments.figures imports with the others "
            f"(registered: {', '.join(REGISTRY) or 'none'})")
