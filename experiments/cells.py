"""The cells of a grid: expanded, validated and grouped into ensembles before anything runs
(docs/results.md).

``prepare`` turns a grid into cells (one run each: its full configuration, ``run_id`` and run
folder), applying the selected step sizes and checking every configuration, probe, data set and
size before anything is allocated or written. ``group_ensembles`` groups the cells that can train
as one batched model: same everything but seed and step sizes (``vi.config.ensemble_key``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from experiments.grids import MAX_CELLS, Grid, get_path, run_id_for

__all__ = [
    "DEFAULT_NO_ROW",
    "DEFAULT_NO_SELECTION",
    "MAX_MEMBERS",
    "SELECTION",
    "Cell",
    "Outcome",
    "PrepareError",
    "cell_payload",
    "check_config",
    "group_ensembles",
    "prepare",
    "read_selection",
]

SELECTION = Path("lr_selection") / "selected.csv"
#: the most members one ensemble holds (bigger groups are split)
MAX_MEMBERS = 64


class PrepareError(ValueError):
    """An experiment that cannot run as configured (raised before any file is written)."""


@dataclass
class Cell:
    """One run: everything a worker needs, as plain values (picklable, JSON-able)."""

    experiment: str
    run_id: str
    config: dict[str, Any]
    lr_source: str
    run_dir: str
    selection_round: int | None = None
    force_token: str | None = None
    provenance: dict[str, Any] = field(default_factory=dict)


@dataclass
class Outcome:
    run_id: str
    status: str
    message: str
    action: str  # ran | resumed | skipped
    seconds: float


def read_selection(results: Path) -> pd.DataFrame | None:
    """``lr_selection/selected.csv``, verified against its manifest (a truncated or edited table
    would silently give the wrong step sizes), or None when there is no selection."""
    from experiments.checks import verify_manifest_file

    path = results / SELECTION
    if not path.exists():
        return None
    problem = verify_manifest_file(path)
    if problem:
        raise PrepareError(f"{problem}; rerun lr_selection (python -m experiments run "
                           f"lr_selection --force)")
    try:
        table = pd.read_csv(path, dtype={"baseline": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise PrepareError(f"{path}: not a readable CSV ({err}); rerun lr_selection") from err
    need = {"dataset", "method", "estimator", "baseline"}
    missing = sorted(need - set(table.columns))
    if missing:
        raise PrepareError(f"{path}: missing column(s) {', '.join(missing)}; rerun lr_selection")
    return table


def _apply_selection(config: dict, table: pd.DataFrame | None) -> str | None:
    """Set the selected step sizes of the cell's (dataset, method, estimator, baseline); its
    ``lr_source`` (``selected`` or ``shared``), or None when ``table`` has no row for it. A row
    that lacks some of the method's step sizes (its ``step_sizes`` trait; a selection made
    before the method used them) leaves those at the grid's values, and the ``lr_source`` says
    so: ``selected, encoder_lr from the grid``."""
    if table is None:
        return None
    key = {"dataset": config["data"]["name"], "method": config["method"]["name"],
           "estimator": config["method"]["estimator"],
           "baseline": config["method"]["baseline"]}
    match = table
    for k, v in key.items():
        match = match[match[k].astype(str) == str(v)]
    if match.empty:
        return None
    row = match.iloc[0]
    from vi.inference import METHODS, STEP_SIZE_FIELDS

    for name in STEP_SIZE_FIELDS:
        column = f"method.{name}"
        if column in row and pd.notna(row[column]):
            config["method"][name] = float(row[column])
    shared = row.get("shared_from")
    source = "shared" if isinstance(shared, str) and shared else "selected"
    method = METHODS.get(key["method"])
    lacking = [n for n in (method.step_sizes if method else ())
               if pd.isna(row.get(f"method.{n}", float("nan")))]
    return f"{source}, {', '.join(lacking)} from the grid" if lacking else source


def _selection_command(results: Path, scale: str | None) -> str:
    flag = "" if scale in (None, "default") else (" --quick" if scale == "quick"
                                                  else f" --scale {scale}")
    return f"python -m experiments run lr_selection{flag} --results {results}"


def _missing_selection(grid: str, results: Path, scale: str | None) -> PrepareError:
    """Why an experiment that takes its step sizes from lr_selection cannot run: no choice."""
    path = results / SELECTION
    manifest = path.parent / "manifest.json"
    try:
        listed = json.loads(manifest.read_text()).get("files", {})
    except (OSError, ValueError, AttributeError):
        listed = None
    if listed is None:
        why = f"{path} does not exist"
    elif isinstance(listed, dict) and path.name in listed:
        why = f"{path} is missing (deleted: {manifest} lists it)"
    else:
        why = (f"{path} is missing: the lr_selection in {results} has run but its choice was "
               f"never written (interrupted before the end)")
    return PrepareError(f"{grid} takes its step sizes from lr_selection, but {why}; run "
                        f"`{_selection_command(results, scale)}` first, or pass --default-lr "
                        f"to train with the grid's own step sizes (lr_source records it)")


def _missing_rows(grid: str, results: Path, scale: str | None,
                  groups: list[tuple]) -> PrepareError:
    shown = ", ".join("/".join(str(v) for v in g) for g in groups[:6])
    more = f" and {len(groups) - 6} more" if len(groups) > 6 else ""
    return PrepareError(f"{grid} takes its step sizes from lr_selection, but "
                        f"{results / SELECTION} has no row for {len(groups)} (dataset/method/"
                        f"estimator/baseline) group(s) of its cells: {shown}{more}; select "
                        f"them (`{_selection_command(results, scale)}` with a grid that "
                        f"covers them), or pass --default-lr to train them with the grid's "
                        f"own step sizes (lr_source records it)")


#: ``lr_source`` of a cell trained with the grid's step sizes because ``--default-lr`` was
#: given: no selected.csv at all, or no row for the cell's group in it
DEFAULT_NO_SELECTION = "default (--default-lr: no lr_selection/selected.csv)"
DEFAULT_NO_ROW = "default (--default-lr: no row in lr_selection/selected.csv)"


def _defaults() -> dict[str, Any]:
    from vi.config import RunConfig

    return RunConfig().to_dict()


def prepare(
    grid: Grid,
    results: Path,
    *,
    scale: str | None = None,
    seeds: list[int] | None = None,
    device: str | None = None,
    candidates: dict[tuple, list[dict]] | None = None,
    default_lr: bool = False,
    selection_pending: bool = False,
) -> list[Cell]:
    """Expand ``grid`` into cells and validate every one (configuration, probes, data, sizes)
    without writing anything or building a model. Raises ``PrepareError`` naming the cell.

    ``candidates`` ({(dataset, method, estimator, baseline): [step sizes]}) adds the extension
    rounds of a step-size selection (``experiments.selection``).

    A grid with ``lr: "selected"`` needs ``lr_selection/selected.csv`` with a row for every
    cell's (dataset, method, estimator, baseline): without one ``prepare`` refuses, naming
    what is missing, unless ``default_lr`` (the cell keeps the grid's step sizes and its
    ``lr_source`` says why). ``selection_pending``: the selection runs first in the same
    command (``reproduce``), so these cells are only being validated (``lr_source``
    ``pending``).
    """
    from experiments.grids import deep_merge
    from experiments.selection import check_candidates, initial_candidates

    g = grid.scaled(scale)
    if seeds is not None:
        bad = [s for s in seeds if isinstance(s, bool) or not isinstance(s, int)
               or not 0 <= s < 2**32]
        if bad or not seeds:
            raise PrepareError(f"seeds must be integers in [0, 2^32); got {seeds}")
    selection = None
    if g.lr == "selected" and not selection_pending:
        selection = read_selection(results)  # (missing: refused once the cells are valid)
    defaults = _defaults()
    partials = g.cells(seeds)
    if not partials:
        raise PrepareError(f"grid {g.name!r} has no cells (every combination is excluded)")
    if g.select is not None:
        from vi.inference import METHODS

        try:  # the axes searched are each method's step sizes (its traits)
            check_candidates(g.select, {n: cls.step_sizes for n, cls in METHODS.items()})
        except ValueError as err:
            raise PrepareError(f"{g.name}: {err}") from err
    expanded: list[tuple[dict, int | None]] = []
    for partial in partials:
        if g.select is None:
            expanded.append((partial, None))
            continue
        full = deep_merge(defaults, partial)
        m = full["method"]
        key = (full["data"]["name"], m["name"], m["estimator"], m["baseline"])
        try:
            rounds = [(c, 0) for c in initial_candidates(
                g.select, m["name"], full["data"]["name"], f"{m['estimator']}+{m['baseline']}")]
        except ValueError as err:
            raise PrepareError(f"{g.name}: {err}") from err
        extra = (candidates or {}).get(key, [])
        rounds += [(c, r) for c, r in extra]
        for step_sizes, rnd in rounds:
            expanded.append((deep_merge(partial, {"method": dict(step_sizes)}), rnd))
        if len(expanded) > MAX_CELLS:
            raise PrepareError(f"{g.name}: more than {MAX_CELLS} cells with the step-size "
                               f"candidates of its selection; shorten its axes")
    data_checked: dict[str, Any] = {}
    cells: list[Cell] = []
    seen: set[str] = set()
    unselected: list[tuple] = []
    for i, (partial, rnd) in enumerate(expanded):
        full = deep_merge(defaults, partial)
        where = f"{g.name}, cell {i + 1} of {len(expanded)} ({_describe(full)})"
        if device is not None:
            full["device"] = device
        full["probes"] = g.probes_for(full)
        lr_source = "grid" if g.lr == "grid" else _apply_selection(full, selection)
        if lr_source is None:
            m = full["method"]
            if selection_pending:
                lr_source = "pending"
            elif selection is None:
                lr_source = DEFAULT_NO_SELECTION
            else:
                lr_source = DEFAULT_NO_ROW
                group = (full["data"]["name"], m["name"], m["estimator"], m["baseline"])
                if group not in unselected:
                    unselected.append(group)
        try:
            config, _ = check_config(full, checked=data_checked)
        except ValueError as err:
            raise PrepareError(f"{where}: {err}") from err
        values = config.to_dict()
        run_id = run_id_for(g.name, values)
        if run_id in seen:
            raise PrepareError(f"{where}: duplicates an earlier cell (same configuration)")
        seen.add(run_id)
        cells.append(Cell(g.name, run_id, values, lr_source,
                          str(results / g.name / "runs" / run_id), rnd))
    if g.lr == "selected" and selection is None and not (selection_pending or default_lr):
        raise _missing_selection(g.name, results, scale)
    if unselected and not default_lr:
        raise _missing_rows(g.name, results, scale, unselected)
    return cells


def check_config(values: dict[str, Any], probes: dict[str, dict] | None = None,
                 checked: dict[str, Any] | None = None) -> tuple[Any, list]:
    """A run configuration (nested plain values) validated as every cell of a grid is, without
    allocating anything: its fields and ranges (``vi.config``), its probes (``probes``: these
    instead of the configuration's own), its data and the sizes that depend on it, memory
    included. Returns (``RunConfig``, the built probes); ``ValueError`` names the problem.
    ``checked`` caches loaded data sets across calls."""
    from vi.config import RunConfig
    from vi.probes import build_probes

    config = RunConfig.from_dict(values)
    built = build_probes(config.probes if probes is None else probes, config)
    _check_data(config, {} if checked is None else checked, built)
    return config, built


def _check_data(config, checked: dict[str, Any], probes: Sequence = ()) -> None:
    """Load the cell's data once per (data set, options, fractions, seed) and check the sizes
    that depend on it (batch size, empty splits, memory: the run's and its largest probe's)
    before anything is allocated."""
    from vi.data import load_dataset

    d = config.data
    key = json.dumps([d.name, d.options, d.path, config.data_seed, d.test_fraction,
                      d.validation_fraction], sort_keys=True)
    if key not in checked:
        checked[key] = load_dataset(d.name, seed=config.data_seed, test_fraction=d.test_fraction,
                                    validation_fraction=d.validation_fraction, path=d.path,
                                    **d.options)
    data = checked[key]
    n_train = data.train.shape[0]
    if config.training.batch_size > n_train:
        raise ValueError(f"training.batch_size {config.training.batch_size} exceeds the "
                         f"{n_train} training points")
    splits = set(config.training.eval_splits)
    if config.training.stopping is not None:
        splits.add("validation")
    for s in sorted(splits):
        if data.split(s).shape[0] == 0:
            raise ValueError(f"split {s!r} is empty for this data configuration")
    need = config.memory_bytes(data.data_dim, n_train,
                               max(data.split(s).shape[0] for s in splits), members=1)
    limit = _memory_limit()
    if need > limit:
        raise ValueError(f"this configuration needs about {need / 2**30:.1f} GiB per run, more "
                         f"than this machine's {limit / 2**30:.1f} GiB")
    for probe in probes:  # probes run one at a time, after training, beside the run's state
        extra = probe_memory_bytes(probe.name, probe.options, config, data.data_dim, n_train)
        if need + extra > limit:
            raise ValueError(f"probe {probe.name!r} needs about {extra / 2**30:.3g} GiB per run "
                             f"with these options, more than the {limit / 2**30:.1f} GiB this "
                             f"machine has (lower its draws, n_mc or batch)")


def probe_memory_bytes(name: str, options: Any, config, data_dim: int, n_train: int) -> int:
    """A rough upper estimate of the memory (bytes, one run) of the probes whose size the
    options set: ``gradvar``, ``variance_sweep`` and ``k_sweep`` (M = n_mc · k) hold a noise
    tensor of draws x M x B x H,
    per parameter group a gradient per draw (draws x (2 · B · P + parameters), P the length of
    one point's λ in the method's family, with the copies their statistics make) and at least
    one draw's activations (M x B x the widest layer, forward and backward); the others
    evaluate in bounded chunks (0)."""
    if name not in ("gradvar", "variance_sweep", "k_sweep"):
        return 0
    item = 8 if config.dtype == "float64" else 4
    h, p = config.model.latent_dim, config.lambda_dim()
    batch = min(int(options.batch), n_train)
    width = max(data_dim, p, *config.model.hidden, *config.method.encoder_hidden)
    if name == "gradvar":
        sample_counts = [options.n_mc or config.method.n_mc]
    elif name == "k_sweep":  # M groups of k samples
        sample_counts = [options.n_mc * max(options.ks)]
    else:
        sample_counts = list(options.n_mc)
    draws = int(options.draws)
    grads = 3 * draws * (2 * batch * p + config.parameter_count(data_dim))
    return max(item * (draws * m * batch * h + grads + 8 * m * batch * width)
               for m in sample_counts)


def _memory_limit() -> int:
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * 0.8)
    except (ValueError, OSError, AttributeError):
        return 2**34


def _describe(config: dict) -> str:
    parts = [("dataset", "data.name"), ("method", "method.name"),
             ("estimator", "method.estimator"), ("baseline", "method.baseline"),
             ("latent_dim", "model.latent_dim"), ("n_mc", "method.n_mc"), ("seed", "seed")]
    return ", ".join(f"{k}={get_path(config, p)}" for k, p in parts
                     if get_path(config, p) is not None)


def group_ensembles(cells: Sequence[Cell], max_members: int = MAX_MEMBERS) -> list[list[Cell]]:
    """Cells that can train as one ensemble (same everything but seed and step sizes), in grid
    order, split into groups of at most ``max_members``; most expensive first."""
    from vi.config import RunConfig, ensemble_key

    groups: dict[str, list[Cell]] = {}
    for cell in cells:
        groups.setdefault(ensemble_key(RunConfig.from_dict(cell.config)), []).append(cell)
    out = []
    for members in groups.values():
        for start in range(0, len(members), max_members):
            out.append(members[start:start + max_members])
    return sorted(out, key=lambda g: -_cost(g))


def _cost(group: list[Cell]) -> float:
    """A rough relative cost, to start long ensembles first (better packing on N workers)."""
    from vi.inference import METHODS

    c = group[0].config
    m = c["method"]
    traits = METHODS[m["name"]]
    passes = m["e_steps"] + m["m_steps"] if traits.has_local_table else 1
    if traits.refines_in_training:
        passes += m["refine_steps"] * (2 if traits.refine_through else 1)
    width = max([c["model"]["latent_dim"], *c["model"]["hidden"], *m["encoder_hidden"]])
    return len(group) ** 0.3 * m["n_mc"] * passes * width * c["training"]["max_epochs"]


def cell_payload(cell: Cell) -> dict:
    """The plain-dict form of a cell (what crosses process and cluster boundaries)."""
    return asdict(cell)
