"""Experiment grids: small JSON files under ``experiments/grids/``, expanded into runs (cells).

A grid is data. Its keys:

``name``         the experiment's name (the results folder ``results/<name>/``)
``description``  one sentence: what the experiment shows
``cost``         measured wall time at default scale with ``--jobs 2`` on a 2-core CPU
``order``        where ``reproduce`` runs it (lower first)
``lr``           ``"selected"``: step sizes from ``results/lr_selection/selected.csv``, which
                 must have the cell's (dataset, method, estimator, baseline) (``run`` refuses
                 otherwise; ``--default-lr`` keeps the grid's own, and ``lr_source`` records
                 which); ``"grid"``: the grid's own values
``base``         a partial run configuration (``vi.config.RunConfig``) shared by every cell
``method_base``  optional ``{method name: partial configuration}`` applied on top of ``base``
``axes``         ``{axis: [entries]}``; the cells are the Cartesian product of the axes in the
                 order written. A scalar entry sets the field the axis names (a dotted path such
                 as ``"model.latent_dim"``); an object entry sets several fields at once (e.g.
                 ``{"method.estimator": "score", "method.baseline": "loo", "method.n_mc": 4}``),
                 so coupled settings are zipped rather than crossed
``exclude``      optional list of partial configurations; a cell matching one is dropped
``probes``       optional ``{probe: {options}}`` (``vi.probes``); an option ``when`` (a partial
                 configuration) limits a probe to the cells that match it
``select``       ``lr_selection`` only: the candidate step sizes and the selection rule
                 (``experiments.selection``)
``scales``       optional ``{scale: {base, method_base, axes, probes, exclude, select}}``:
                 ``--quick`` (scale ``quick``) or ``--scale NAME`` merges ``base``/
                 ``method_base`` and replaces the named ``axes``/``probes`` entries. A grid
                 without a ``quick`` scale has an implicit one (``Grid.implicit_quick``)

A grid holds at most ``MAX_CELLS`` cells (the product of its axes' lengths, counted before
anything is expanded, and again with a selection's candidates) and nests at most
``MAX_DEPTH`` levels; a bigger one is refused at once rather than expanded.

Partial configurations may be nested objects or use dotted keys; both are merged deeply.
Expansion here is pure Python (no torch), so ``list``, ``figures`` and ``check`` stay light;
``runner.prepare`` fills the defaults and validates every cell before anything runs. A cell's
``run_id`` is readable and stable: ``{dataset}-{method}-{estimator}-{baseline}-h{H}-m{M}-
s{seed}-{hash8}``, the hash over the experiment name and the full configuration.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "GRID_DIR",
    "GRID_KEYS",
    "MAX_CELLS",
    "MAX_DEPTH",
    "Grid",
    "GridError",
    "available",
    "config_hash",
    "deep_merge",
    "expand_dotted",
    "flatten",
    "get_path",
    "load_grid",
    "matches",
    "run_id_for",
]

GRID_DIR = Path(__file__).resolve().parent / "grids"
GRID_KEYS = ("name", "description", "cost", "order", "lr", "base", "method_base", "axes",
             "exclude", "probes", "select", "scales")
_REQUIRED = ("name", "description", "cost", "base", "axes")
_SCALE_KEYS = ("base", "method_base", "axes", "probes", "exclude", "select")
#: the most cells a grid may expand to (the largest study grid has a few hundred): a typo such as
#: a 1000-entry axis is refused before anything is expanded or validated
MAX_CELLS = 10_000
#: the deepest nesting of objects and lists a grid file may have (the study's reach 7)
MAX_DEPTH = 32


class GridError(ValueError):
    """A grid file that cannot be used; the message names the file and the problem."""


# ------------------------------------------------------------------ nested partial configs


def expand_dotted(values: dict[str, Any]) -> dict[str, Any]:
    """``{"model.latent_dim": 5}`` → ``{"model": {"latent_dim": 5}}`` (recursively)."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict) and key != "options" and not key.endswith(".options"):
            value = expand_dotted(value)
        parts = key.split(".")
        target = out
        for part in parts[:-1]:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise GridError(f"key {key!r} sets a field inside a non-object")
        last = parts[-1]
        if isinstance(value, dict) and isinstance(target.get(last), dict):
            target[last] = deep_merge(target[last], value)
        else:
            target[last] = value
    return out


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``base`` with ``update`` merged in (objects merge, everything else replaces;
    the ``options`` of a data set and a probe's options replace as a whole)."""
    out = copy.deepcopy(base)
    for key, value in expand_dotted(update).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "options":
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def get_path(config: dict[str, Any], path: str, default: Any = None) -> Any:
    """The value at a dotted path of a nested configuration (``default`` when absent)."""
    value: Any = config
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return default
        value = value[part]
    return value


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested configuration as {dotted name: value} (lists, and a data set's ``options``,
    stay whole)."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict) and value and key != "options":
            out |= flatten(value, f"{prefix}{key}.")
        else:
            out[prefix + key] = value
    return out


def matches(config: dict[str, Any], partial: dict[str, Any]) -> bool:
    """Whether every field of ``partial`` (nested or dotted) has that value in ``config``."""
    return all(get_path(config, path) == value
               for path, value in flatten(expand_dotted(partial)).items())


# ------------------------------------------------------------------------------------ grids


@dataclass
class Grid:
    """A parsed grid file (see the module docstring for the keys)."""

    name: str
    description: str
    cost: str
    base: dict[str, Any]
    axes: dict[str, list]
    lr: str = "selected"
    method_base: dict[str, dict] = field(default_factory=dict)
    exclude: list[dict] = field(default_factory=list)
    probes: dict[str, dict] = field(default_factory=dict)
    select: dict[str, Any] | None = None
    scales: dict[str, dict] = field(default_factory=dict)
    order: int = 100
    path: Path | None = None
    scale: str = "default"

    def implicit_quick(self) -> dict[str, Any]:
        """The ``quick`` scale of a grid that declares none: what every study grid's quick scale
        does, so that any grid can be tried in seconds. Networks of width 16, 2 epochs (method
        overrides of ``training.max_epochs`` too), a stopping rule checked every epoch (unless
        the grid trains without one), 100 evaluation points, the first seed only, and one
        extension round for a selection; data, methods, estimators and probes are the grid's."""
        training: dict[str, Any] = {"max_epochs": 2, "eval_points": 100}
        if get_path(self.base, "training.stopping", {}) is not None:
            training["stopping"] = {"check_every": 1, "patience": 1}
        q: dict[str, Any] = {"base": {"model": {"hidden": [16]},
                                      "method": {"encoder_hidden": [16]},
                                      "training": training}}
        q["method_base"] = {m: {"training": {"max_epochs": 2}} for m, v in
                            self.method_base.items()
                            if get_path(v, "training.max_epochs") is not None}
        if isinstance(self.axes.get("seed"), list) and self.axes["seed"]:
            q["axes"] = {"seed": self.axes["seed"][:1]}
        if self.select is not None:
            q["select"] = {"max_extensions": min(1, self.select.get("max_extensions", 1))}
        return q

    def scaled(self, scale: str | None) -> Grid:
        """This grid at another scale (``quick``, ``paper``, …; None or ``default``: itself).
        ``quick`` is ``implicit_quick`` where the grid declares no quick scale."""
        if scale in (None, "default"):
            return self
        if scale not in self.scales and scale != "quick":
            raise GridError(f"grid {self.name!r} has no scale {scale!r}; it has: "
                            f"{', '.join(dict.fromkeys(['default', 'quick', *self.scales]))}")
        g = copy.deepcopy(self)
        q = self.scales[scale] if scale in self.scales else self.implicit_quick()
        g.base = deep_merge(g.base, q.get("base", {}))
        for method, values in q.get("method_base", {}).items():
            g.method_base[method] = deep_merge(g.method_base.get(method, {}), values)
        g.axes = {**g.axes, **q.get("axes", {})}
        g.probes = {**g.probes, **q.get("probes", {})}
        if "exclude" in q:
            g.exclude = list(q["exclude"])
        if "select" in q and g.select is not None:
            g.select = {**g.select, **q["select"]}
        g.scale = scale
        return g

    def cells(self, seeds: list[int] | None = None) -> list[dict[str, Any]]:
        """The partial configurations of the grid's cells, nested, in axis order (no defaults
        filled). ``seeds`` replaces the ``seed`` axis (added last if the grid has none)."""
        axes = dict(self.axes)
        if seeds is not None:
            axes["seed"] = list(seeds)
        count = math.prod(len(entries) for entries in axes.values())
        if count > MAX_CELLS:
            sizes = " x ".join(f"{len(v)} {k}" for k, v in axes.items())
            raise GridError(f"grid {self.name!r} has {count} cells ({sizes}), more than the "
                            f"{MAX_CELLS} a grid may have; split it or shorten its axes")
        out = []
        names = list(axes)
        for combo in itertools.product(*(axes[n] for n in names)):
            settings: dict[str, Any] = {}
            for axis, entry in zip(names, combo, strict=True):
                settings = deep_merge(settings, entry if isinstance(entry, dict)
                                      else {axis: entry})
            method = get_path(settings, "method.name", get_path(self.base, "method.name",
                                                                 "amortized"))
            config = deep_merge(self.base, self.method_base.get(method, {}))
            config = deep_merge(config, settings)
            if any(matches(config, ex) for ex in self.exclude):
                continue
            out.append(config)
        return out

    def probes_for(self, config: dict[str, Any]) -> dict[str, dict]:
        """The probes that apply to one cell (``when`` matched), without ``when``."""
        out = {}
        for name, options in self.probes.items():
            options = dict(options)
            when = options.pop("when", {})
            if matches(config, when):
                out[name] = options
        return out


def available() -> dict[str, Path]:
    """Experiment name → grid file, in the order ``reproduce`` runs them."""
    grids = [load_grid(p) for p in sorted(GRID_DIR.glob("*.json"))]
    return {g.name: g.path for g in sorted(grids, key=lambda g: (g.order, g.name))}


def nesting_depth(value: Any) -> int:
    """How deeply objects and lists nest in parsed JSON (a scalar: 0), without recursion."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            depth += 1
            deepest = max(deepest, depth)
            stack.extend((v, depth) for v in (item.values() if isinstance(item, dict)
                                              else item))
    return deepest


def _fail(where: str, message: str) -> GridError:
    return GridError(f"{where}: {message}")


def load_grid(source: str | Path) -> Grid:
    """Parse and structurally check a grid: a known experiment name or a path to a .json file.

    Field names and values are checked later, cell by cell, by ``vi.config.RunConfig``.
    """
    path = Path(source)
    if path.suffix != ".json":
        candidate = GRID_DIR / f"{source}.json"
        if not candidate.is_file():
            names = sorted(p.stem for p in GRID_DIR.glob("*.json"))
            raise GridError(
                f"unknown experiment {str(source)!r}; valid: {', '.join(names)} "
                f"(or the path of a grid .json file)"
            )
        path = candidate
    where = str(path)
    if not path.is_file():
        raise _fail(where, "no such grid file")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as err:
        raise _fail(where, f"not valid JSON ({err})") from err
    except RecursionError:
        raise _fail(where, f"nested too deeply (a grid nests at most {MAX_DEPTH} levels)"
                    ) from None
    depth = nesting_depth(raw)
    if depth > MAX_DEPTH:
        raise _fail(where, f"nested {depth} levels deep; a grid nests at most {MAX_DEPTH}")
    if not isinstance(raw, dict):
        raise _fail(where, f"a grid must be a JSON object; got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(GRID_KEYS))
    if unknown:
        raise _fail(where, f"unknown grid key(s) {', '.join(unknown)}; valid: "
                           f"{', '.join(GRID_KEYS)}")
    missing = [k for k in _REQUIRED if k not in raw]
    if missing:
        raise _fail(where, f"missing grid key(s) {', '.join(missing)}")
    for key in ("name", "description", "cost"):
        if not isinstance(raw[key], str) or not raw[key].strip():
            raise _fail(where, f"{key!r} must be a non-empty string")
    name = raw["name"]
    if not name.replace("_", "").replace("-", "").isalnum():
        raise _fail(where, f"name {name!r} may hold only letters, digits, '_' and '-'")
    if raw.get("lr", "selected") not in ("selected", "grid"):
        raise _fail(where, f"'lr' must be 'selected' or 'grid'; got {raw['lr']!r}")
    _check_mapping(where, "base", raw["base"])
    _check_axes(where, "axes", raw["axes"])
    _check_method_base(where, "method_base", raw.get("method_base", {}))
    _check_exclude(where, "exclude", raw.get("exclude", []))
    _check_probes(where, "probes", raw.get("probes", {}))
    scales = raw.get("scales", {})
    if not isinstance(scales, dict):
        raise _fail(where, "'scales' must be an object {scale: {...}}")
    for scale, q in scales.items():
        if not isinstance(q, dict):
            raise _fail(where, f"scale {scale!r} must be an object")
        bad = sorted(set(q) - set(_SCALE_KEYS))
        if bad:
            raise _fail(where, f"unknown key(s) {', '.join(bad)} in scale {scale!r}; valid: "
                               f"{', '.join(_SCALE_KEYS)}")
        _check_mapping(where, f"scales.{scale}.base", q.get("base", {}))
        _check_method_base(where, f"scales.{scale}.method_base", q.get("method_base", {}))
        if "axes" in q:
            _check_axes(where, f"scales.{scale}.axes", q["axes"], allow_empty=True)
        _check_exclude(where, f"scales.{scale}.exclude", q.get("exclude", []))
        _check_probes(where, f"scales.{scale}.probes", q.get("probes", {}))
    select = raw.get("select")
    if select is not None:
        from experiments.selection import check_select

        try:
            check_select(select)
        except ValueError as err:
            raise _fail(where, str(err)) from err
    order = raw.get("order", 100)
    if isinstance(order, bool) or not isinstance(order, int):
        raise _fail(where, f"'order' must be an integer; got {order!r}")
    try:
        return Grid(
            name=name, description=raw["description"], cost=raw["cost"],
            base=expand_dotted(raw["base"]), axes=raw["axes"], lr=raw.get("lr", "selected"),
            method_base={k: expand_dotted(v) for k, v in raw.get("method_base", {}).items()},
            exclude=raw.get("exclude", []), probes=raw.get("probes", {}), select=select,
            scales=scales, order=order, path=path,
        )
    except GridError as err:
        raise _fail(where, str(err)) from err


def _check_mapping(where: str, key: str, value: Any) -> None:
    if not isinstance(value, dict):
        raise _fail(where, f"{key!r} must be an object (a partial run configuration); got "
                           f"{type(value).__name__}")


def _check_method_base(where: str, key: str, value: Any) -> None:
    if not isinstance(value, dict):
        raise _fail(where, f"{key!r} must be an object {{method: {{fields}}}}")
    for method, fields in value.items():
        _check_mapping(where, f"{key}.{method}", fields)


def _check_axes(where: str, key: str, axes: Any, allow_empty: bool = False) -> None:
    if not isinstance(axes, dict) or (not axes and not allow_empty):
        raise _fail(where, f"{key!r} must be a non-empty object {{axis: [entries]}}")
    for axis, entries in axes.items():
        if not isinstance(entries, list) or not entries:
            raise _fail(where, f"axis {axis!r} in {key!r} must be a non-empty list")
        for entry in entries:
            if isinstance(entry, list):
                raise _fail(where, f"axis {axis!r}: an entry is a list ({entry!r}); use a scalar "
                                   f"or an object of fields")


def _check_exclude(where: str, key: str, value: Any) -> None:
    if not isinstance(value, list) or not all(isinstance(v, dict) and v for v in value):
        raise _fail(where, f"{key!r} must be a list of non-empty objects")


def _check_probes(where: str, key: str, value: Any) -> None:
    from experiments.schema import PROBES

    if not isinstance(value, dict):
        raise _fail(where, f"{key!r} must be an object {{probe: {{options}}}}")
    for name, options in value.items():
        if name not in PROBES:
            raise _fail(where, f"unknown probe {name!r} in {key!r}; valid: {', '.join(PROBES)}")
        if not isinstance(options, dict):
            raise _fail(where, f"options of probe {name!r} must be an object")
        if not isinstance(options.get("when", {}), dict):
            raise _fail(where, f"'when' of probe {name!r} must be an object of fields")


# ------------------------------------------------------------------------------------ run ids


def config_hash(experiment: str, config: dict[str, Any]) -> str:
    """First 8 hex digits of SHA-256 over the canonical JSON of (experiment, config)."""
    blob = json.dumps({"experiment": experiment, "config": config}, sort_keys=True,
                      separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(blob.encode()).hexdigest()[:8]


def run_id_for(experiment: str, config: dict[str, Any]) -> str:
    """``{dataset}-{method}-{estimator}-{baseline}-h{H}-m{M}-s{seed}-{hash8}`` of a full
    (nested) configuration."""
    d, m = config["data"], config["method"]
    return (f"{d['name']}-{m['name']}-{m['estimator']}-{m['baseline']}-"
            f"h{config['model']['latent_dim']}-m{m['n_mc']}-s{config['seed']}-"
            f"{config_hash(experiment, config)}")
