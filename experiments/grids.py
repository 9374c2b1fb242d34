"""Experiment grids: small JSON files under ``experiments/grids/``, expanded into runs (cells).

A grid is data (STYLE §9). Its keys:

``name``         the experiment's name (the results folder ``results/<name>/``)
``description``  one sentence: what the experiment shows
``cost``         measured wall time of the default scale with ``--jobs 2`` on a 2-core CPU
``lr``           ``"selected"``: take step sizes from ``results/lr_selection/selected.csv`` when
                 present (otherwise the base values, recorded as ``lr_source=default``);
                 ``"grid"``: the grid's own values (``lr_source=grid``)
``base``         ``TrainConfig`` fields shared by every cell
``method_base``  optional ``{method: {fields}}`` applied on top of ``base`` for that method
``axes``         ``{axis: [entries]}``; the cells are the Cartesian product of the axes in the
                 order written. A scalar entry sets the field named by the axis; a dict entry sets
                 several fields at once (e.g. ``{"estimator": "score", "baseline": "loo",
                 "n_mc": 4}``), so coupled settings are zipped rather than crossed.
``exclude``      optional list of partial configurations; a cell matching one is dropped
``products``     optional ``{name: {options}}``: extra per-run tables or rows
                 (``variance_sweep``, ``exact``, ``images``, ``latents``; see ``runner``);
                 an option ``when`` (a partial configuration) limits a product to the cells
                 that match it
``select``       optional (``lr_selection``): how the step sizes are chosen from ``runs.csv``
``quick``        overrides for ``--quick``: ``base``/``method_base`` are merged, ``axes`` and
                 ``products`` entries replace the named ones — the same grid, seconds-scale

Expansion here is pure Python (no torch), so ``list``, ``figures`` and ``check`` stay light;
``runner.prepare`` fills the ``TrainConfig`` defaults and validates every cell before anything
runs. A cell's ``run_id`` is readable and stable: ``{dataset}-{method}-{estimator}-{baseline}-
h{H}-m{M}-s{seed}-{hash8}``, the hash over the experiment name, the full configuration and the
products (so changing anything that changes the result changes the id).
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "GRID_DIR",
    "GRID_KEYS",
    "PRODUCTS",
    "Grid",
    "GridError",
    "available",
    "config_hash",
    "load_grid",
    "run_id_for",
]

GRID_DIR = Path(__file__).resolve().parent / "grids"
GRID_KEYS = ("name", "description", "cost", "lr", "base", "method_base", "axes", "exclude",
             "products", "select", "quick", "order")
_REQUIRED = ("name", "description", "cost", "base", "axes")
_QUICK_KEYS = ("base", "method_base", "axes", "products", "exclude")
#: per-run extras a grid may ask for, and what each writes
PRODUCTS = {
    "variance_sweep": "tables/variance_sweep.csv: gradient variance against n_mc at the final "
                      "state (vi.gradstats.variance_sweep)",
    "exact": "rows log_px_exact, approximation_gap (trained linear decoder) each evaluation, and "
             "log_px_mle, approximation_gap_mle (closed-form PPCA fit) at the end",
    "images": "tables/images.csv: test images, reconstructions, decoder samples and, for H = 2, "
              "the latent manifold, one image a row with its pixels as columns",
    "latents": "tables/latents.csv: the encoded test set (posterior mean and log-variance) with "
               "digit labels, for H = 2",
}
LR_FIELDS = ("lr", "local_lr", "refine_lr")


class GridError(ValueError):
    """A grid file that cannot be used; the message names the file and the problem."""


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
    products: dict[str, dict] = field(default_factory=dict)
    select: dict[str, Any] | None = None
    quick: dict[str, Any] = field(default_factory=dict)
    order: int = 100
    path: Path | None = None

    def scaled(self, quick: bool) -> Grid:
        """This grid, or its ``--quick`` version (same axes names, fewer/cheaper cells)."""
        if not quick:
            return self
        g = copy.deepcopy(self)
        q = self.quick
        g.base = {**g.base, **q.get("base", {})}
        for method, values in q.get("method_base", {}).items():
            g.method_base[method] = {**g.method_base.get(method, {}), **values}
        g.axes = {**g.axes, **q.get("axes", {})}
        g.products = {**g.products, **q.get("products", {})}
        if "exclude" in q:
            g.exclude = list(q["exclude"])
        return g

    def cells(self, seeds: list[int] | None = None) -> list[dict[str, Any]]:
        """The partial configurations of the grid's cells, in axis order (no defaults filled).

        ``seeds`` replaces the ``seed`` axis (added as the last axis if the grid has none).
        """
        axes = dict(self.axes)
        if seeds is not None:
            axes["seed"] = list(seeds)
        out = []
        names = list(axes)
        for combo in itertools.product(*(axes[n] for n in names)):
            config = copy.deepcopy(self.base)
            settings: dict[str, Any] = {}
            for axis, entry in zip(names, combo, strict=True):
                settings.update(entry if isinstance(entry, dict) else {axis: entry})
            method = settings.get("method", config.get("method", "amortized"))
            config.update(copy.deepcopy(self.method_base.get(method, {})))
            config.update(copy.deepcopy(settings))
            if any(all(config.get(k) == v for k, v in ex.items()) for ex in self.exclude):
                continue
            out.append(config)
        return out


def available() -> dict[str, Path]:
    """Experiment name → grid file, in the order ``reproduce`` runs them."""
    grids = [load_grid(p) for p in sorted(GRID_DIR.glob("*.json"))]
    return {g.name: g.path for g in sorted(grids, key=lambda g: (g.order, g.name))}


def _fail(where: str, message: str) -> GridError:
    return GridError(f"{where}: {message}")


def load_grid(source: str | Path) -> Grid:
    """Parse and structurally check a grid: a known experiment name or a path to a .json file.

    Field names and values are checked later, cell by cell, by ``TrainConfig.from_dict``.
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
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise _fail(where, f"not valid JSON ({err})") from err
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
    _check_products(where, "products", raw.get("products", {}))
    quick = raw.get("quick", {})
    if not isinstance(quick, dict):
        raise _fail(where, "'quick' must be an object")
    bad = sorted(set(quick) - set(_QUICK_KEYS))
    if bad:
        raise _fail(where, f"unknown key(s) {', '.join(bad)} in 'quick'; valid: "
                           f"{', '.join(_QUICK_KEYS)}")
    _check_mapping(where, "quick.base", quick.get("base", {}))
    _check_method_base(where, "quick.method_base", quick.get("method_base", {}))
    if "axes" in quick:
        _check_axes(where, "quick.axes", quick["axes"], allow_empty=True)
    _check_exclude(where, "quick.exclude", quick.get("exclude", []))
    _check_products(where, "quick.products", quick.get("products", {}))
    select = raw.get("select")
    if select is not None:
        _check_select(where, select)
    order = raw.get("order", 100)
    if isinstance(order, bool) or not isinstance(order, int):
        raise _fail(where, f"'order' must be an integer; got {order!r}")
    return Grid(
        name=name, description=raw["description"], cost=raw["cost"], base=raw["base"],
        axes=raw["axes"], lr=raw.get("lr", "selected"), method_base=raw.get("method_base", {}),
        exclude=raw.get("exclude", []), products=raw.get("products", {}), select=select,
        quick=quick, order=order, path=path,
    )


def _check_mapping(where: str, key: str, value: Any) -> None:
    if not isinstance(value, dict):
        raise _fail(where, f"{key!r} must be an object of TrainConfig fields; got "
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


def _check_products(where: str, key: str, value: Any) -> None:
    if not isinstance(value, dict):
        raise _fail(where, f"{key!r} must be an object {{product: {{options}}}}")
    for name, options in value.items():
        if name not in PRODUCTS:
            raise _fail(where, f"unknown product {name!r} in {key!r}; valid: "
                               f"{', '.join(PRODUCTS)}")
        if not isinstance(options, dict):
            raise _fail(where, f"options of product {name!r} must be an object")
        if not isinstance(options.get("when", {}), dict):
            raise _fail(where, f"'when' of product {name!r} must be an object of fields")


def _check_select(where: str, select: Any) -> None:
    from experiments.schema import METRICS, SPLITS

    if not isinstance(select, dict):
        raise _fail(where, "'select' must be an object")
    valid = {"metric", "split", "by", "group"}
    bad = sorted(set(select) - valid)
    if bad:
        raise _fail(where, f"unknown key(s) {', '.join(bad)} in 'select'; valid: "
                           f"{', '.join(sorted(valid))}")
    metric = select.get("metric", "elbo")
    if metric not in METRICS:
        raise _fail(where, f"unknown metric {metric!r} in 'select'; valid: {', '.join(METRICS)}")
    split = select.get("split", "validation")
    if split not in SPLITS:
        raise _fail(where, f"unknown split {split!r} in 'select'; valid: {', '.join(SPLITS)}")


# ------------------------------------------------------------------------------------ run ids


def config_hash(experiment: str, config: dict[str, Any], products: dict[str, Any]) -> str:
    """First 8 hex digits of SHA-256 over the canonical JSON of (experiment, config, products)."""
    blob = json.dumps({"experiment": experiment, "config": config, "products": products},
                      sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(blob.encode()).hexdigest()[:8]


def run_id_for(experiment: str, config: dict[str, Any], products: dict[str, Any]) -> str:
    """``{dataset}-{method}-{estimator}-{baseline}-h{H}-m{M}-s{seed}-{hash8}`` of a full config."""
    c = config
    return (f"{c['dataset']}-{c['method']}-{c['estimator']}-{c['baseline']}-h{c['latent_dim']}"
            f"-m{c['n_mc']}-s{c['seed']}-{config_hash(experiment, config, products)}")


def products_for(products: dict[str, dict], config: dict[str, Any]) -> dict[str, dict]:
    """The products that apply to one cell: those whose ``when`` (a partial configuration,
    e.g. ``{"estimator": "reparam"}``) matches it, and ``latents`` only at H = 2 (the latent
    space is drawn as a plane). ``when`` itself is not passed on."""
    out = {}
    for name, options in products.items():
        options = dict(options)
        when = options.pop("when", {})
        if any(config.get(k) != v for k, v in when.items()):
            continue
        if name == "latents" and config["latent_dim"] != 2:
            continue
        out[name] = options
    return out
