"""Running one cell of a grid into its run folder: validate, train (resuming), record (SPEC §7).

A run folder ``results/<experiment>/runs/<run_id>/`` holds

``config.json``      {run_id, experiment, config (every ``TrainConfig`` field), products}
``provenance.json``  git commit and dirty flag, python/torch versions, device, host, command line,
                     start/end time, ``status`` (running, ok, diverged, failed), ``message``,
                     ``lr_source`` and the SHA-256 and row count of every CSV written
``metrics.csv``      the run's tidy rows (``vi.training.ROW_COLUMNS``)
``checkpoint.pt``    the trainer's full state (model, optimisers, local table, generators, rows)
``tables/*.csv``     per-run extra tables (``images``, ``latents``, ``variance_sweep``, ``gaps``)

Every file is written atomically (``vi.training.atomic_write``): a reader sees the old file or
the new one, never half of one. ``provenance.json`` is written last, so ``status`` ok/diverged
means every other file is complete and its checksum recorded.

Resuming: the trainer is checkpointed after every ``checkpoint_every``-th epoch before the last.
Running the cell again loads the checkpoint and continues; because the rows, the generators and
every optimiser state are in it, the final ``metrics.csv`` equals an uninterrupted run's byte for
byte on CPU, ``wall_s`` aside. The last epoch is never checkpointed before the run's files are
written, so an interruption during the final measurements repeats them rather than losing them.

Divergence is a result: a non-finite loss, gradient or parameter ends the run with ``status =
diverged`` and the rows up to the last finished epoch; the sweep goes on. Any other exception
ends the cell ``failed`` (message and traceback in provenance) and is rerun next time.
"""

from __future__ import annotations

import json
import math
import platform
import socket
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from experiments.grids import LR_FIELDS, Grid, products_for, run_id_for

__all__ = [
    "COMPLETE",
    "Cell",
    "Outcome",
    "PrepareError",
    "base_provenance",
    "prepare",
    "read_provenance",
    "run_cell",
    "write_csv",
]

COMPLETE = ("ok", "diverged")
ROOT = Path(__file__).resolve().parents[1]
SELECTION = Path("lr_selection") / "selected.csv"


class PrepareError(ValueError):
    """An experiment that cannot run as configured (raised before any file is written)."""


@dataclass
class Cell:
    """One run: everything a worker needs, as plain values (picklable, JSON-able)."""

    experiment: str
    run_id: str
    config: dict[str, Any]
    products: dict[str, dict]
    lr_source: str
    run_dir: str
    checkpoint_every: int = 1
    provenance: dict[str, Any] = field(default_factory=dict)


@dataclass
class Outcome:
    run_id: str
    status: str
    message: str
    action: str  # ran | resumed | skipped
    seconds: float


# ------------------------------------------------------------------------------- preparing


def _selection(results: Path) -> pd.DataFrame | None:
    path = results / SELECTION
    if not path.is_file():
        return None
    try:
        table = pd.read_csv(path, dtype={"baseline": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise PrepareError(f"{path}: not a readable CSV ({err}); rerun lr_selection") from err
    need = {"dataset", "method", "estimator", "baseline", *LR_FIELDS}
    missing = sorted(need - set(table.columns))
    if missing:
        raise PrepareError(f"{path}: missing column(s) {', '.join(missing)}; rerun lr_selection")
    return table


def _apply_selection(config: dict, table: pd.DataFrame | None, defaults: dict) -> str:
    """Set the selected step sizes of the cell's (dataset, method, estimator, baseline)."""
    if table is None:
        return "default"
    key = {k: config.get(k, defaults[k]) for k in ("dataset", "method", "estimator", "baseline")}
    match = table
    for k, v in key.items():
        match = match[match[k].astype(str) == str(v)]
    if match.empty:
        return "default"
    row = match.iloc[0]
    for name in LR_FIELDS:
        value = row[name]
        if pd.notna(value):
            config[name] = float(value)
    return "selected"


def _check_features(config) -> None:
    """Fail clearly when a cell needs instrumentation this checkout lacks."""
    import importlib

    needs = []
    if config.gradvar:
        needs.append(("vi.gradstats", ("scheduled", "training_rows")))
    if config.gaps or config.test_curve:
        needs.append(("vi.evaluation", ("final_rows",)))
    for module, names in needs:
        try:
            mod = importlib.import_module(module)
        except ImportError as err:
            raise PrepareError(f"this experiment needs {module}, which cannot be imported "
                               f"({err})") from err
        missing = [n for n in names if not hasattr(mod, n)]
        if missing:
            raise PrepareError(f"this experiment needs {module}.{', '.join(missing)}, which "
                               f"this checkout does not provide")


def _check_products(products: dict, config, dataset) -> None:
    for name, options in products.items():
        if name == "variance_sweep":
            from vi import gradstats

            if not hasattr(gradstats, "variance_sweep"):
                raise PrepareError("product 'variance_sweep' needs vi.gradstats.variance_sweep")
            bad = sorted(set(options) - {"n_mc", "draws", "estimators"})
            if bad:
                raise PrepareError(f"unknown option(s) {bad} of product variance_sweep; valid: "
                                   f"n_mc, draws, estimators")
            n_mc = options.get("n_mc", [1, 4, 16])
            if not (isinstance(n_mc, list) and n_mc and all(
                    isinstance(m, int) and not isinstance(m, bool) and m >= 1 for m in n_mc)):
                raise PrepareError(f"variance_sweep n_mc must be a list of positive integers; "
                                   f"got {n_mc!r}")
        elif name == "exact":
            if config.decoder_mean != "linear":
                raise PrepareError("product 'exact' needs a linear decoder "
                                   "(decoder_mean='linear')")
            if config.decoder_variance != "learned" or not config.isotropic:
                raise PrepareError("product 'exact' compares with the PPCA maximum-likelihood "
                                   "fit: use decoder_variance='learned' and isotropic=true")
            if config.latent_dim >= dataset.data_dim:
                raise PrepareError(f"product 'exact' needs latent_dim < D = {dataset.data_dim}")
            if options:
                raise PrepareError(f"product 'exact' takes no options; got {sorted(options)}")
        elif name in ("images", "latents"):
            valid = {"images": {"n_recon", "n_samples", "manifold"}, "latents": set()}[name]
            bad = sorted(set(options) - valid)
            if bad:
                raise PrepareError(f"unknown option(s) {bad} of product {name}; valid: "
                                   f"{', '.join(sorted(valid)) or 'none'}")
            for key, value in options.items():
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise PrepareError(f"{name} option {key} must be a positive integer; "
                                       f"got {value!r}")
            if name == "latents" and "test_labels" not in dataset.ground_truth:
                raise PrepareError(f"product 'latents' needs labelled data (digits); dataset "
                                   f"{config.dataset!r} has none")


def prepare(
    grid: Grid,
    results: Path,
    *,
    quick: bool = False,
    seeds: list[int] | None = None,
    device: str | None = None,
    checkpoint_every: int = 1,
) -> list[Cell]:
    """Expand ``grid`` into cells and validate every one (configuration, data, products) by
    building its ``Trainer`` — without writing anything. Raises ``PrepareError`` naming the cell.
    """
    from vi.data import DataError, load_dataset
    from vi.training import TrainConfig, Trainer

    g = grid.scaled(quick)
    if seeds is not None:
        bad = [s for s in seeds if isinstance(s, bool) or not isinstance(s, int) or s < 0]
        if bad or not seeds:
            raise PrepareError(f"seeds must be non-negative integers; got {seeds}")
    selection = _selection(results) if g.lr == "selected" else None
    defaults = TrainConfig().to_dict()
    datasets: dict[str, Any] = {}
    cells: list[Cell] = []
    seen: set[str] = set()
    partials = g.cells(seeds)
    if not partials:
        raise PrepareError(f"grid {g.name!r} has no cells (every combination is excluded)")
    for i, partial in enumerate(partials):
        where = f"{g.name}, cell {i + 1} of {len(partials)} ({_describe(partial)})"
        if device is not None:
            partial["device"] = device
        lr_source = "grid" if g.lr == "grid" else _apply_selection(partial, selection, defaults)
        try:
            config = TrainConfig.from_dict(partial)
        except ValueError as err:
            raise PrepareError(f"{where}: {err}") from err
        key = json.dumps([config.dataset, config.dataset_options, config.data_path,
                          config.data_seed, config.test_fraction, config.validation_fraction],
                         sort_keys=True)
        if key not in datasets:
            try:
                datasets[key] = load_dataset(
                    config.dataset, seed=config.data_seed, test_fraction=config.test_fraction,
                    validation_fraction=config.validation_fraction, path=config.data_path,
                    **config.dataset_options)
            except (DataError, ValueError, TypeError) as err:
                raise PrepareError(f"{where}: {err}") from err
        dataset = datasets[key]
        try:
            _check_features(config)
            products = products_for(g.products, config.to_dict())
            _check_products(products, config, dataset)
            Trainer(config, dataset)  # construct-time checks: batch size vs data, empty splits
        except PrepareError as err:
            raise PrepareError(f"{where}: {err}") from err
        except ValueError as err:
            raise PrepareError(f"{where}: {err}") from err
        full = config.to_dict()
        run_id = run_id_for(g.name, full, products)
        if run_id in seen:
            raise PrepareError(f"{where}: duplicates an earlier cell (same configuration)")
        seen.add(run_id)
        cells.append(Cell(g.name, run_id, full, products, lr_source,
                          str(results / g.name / "runs" / run_id), checkpoint_every))
    return cells


def _describe(partial: dict) -> str:
    keys = ("dataset", "method", "estimator", "baseline", "latent_dim", "n_mc", "seed")
    return ", ".join(f"{k}={partial[k]}" for k in keys if k in partial)


# ------------------------------------------------------------------------------ provenance


def _git(*args: str) -> str:
    try:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                             timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip()


def base_provenance(command: list[str] | None = None) -> dict[str, Any]:
    """What is the same for every run of one invocation: code version, environment, command."""
    commit = _git("rev-parse", "HEAD")
    dirty = _git("status", "--porcelain", "--untracked-files=no") if commit else ""
    import torch

    return {
        "git_commit": commit,
        "git_dirty": bool(dirty) if commit else "",
        "python_version": platform.python_version(),
        "torch_version": torch.__version__,
        "hostname": socket.gethostname(),
        "command": _command_line(command),
    }


def _command_line(command: list[str] | None) -> str:
    argv = list(command if command is not None else sys.argv)
    if argv and argv[0].endswith(("experiments/__main__.py", "experiments\\__main__.py")):
        argv[0:1] = ["python", "-m", "experiments"]
    return " ".join(argv)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def read_provenance(run_dir: Path) -> dict | None:
    try:
        return json.loads((Path(run_dir) / "provenance.json").read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def _write_json(path: Path, value: dict) -> None:
    from vi.training import atomic_write

    text = json.dumps(value, indent=2, sort_keys=True, allow_nan=False) + "\n"
    atomic_write(path, lambda tmp: tmp.write_text(text))


def write_csv(path: Path, frame: pd.DataFrame) -> dict[str, Any]:
    """Atomically write ``frame`` (floats as shortest round-trip repr); return its checksum."""
    from vi.training import atomic_write

    text = frame.to_csv(index=False, lineterminator="\n")
    atomic_write(path, lambda tmp: tmp.write_text(text))
    import hashlib

    return {"sha256": hashlib.sha256(text.encode()).hexdigest(), "rows": len(frame)}


# -------------------------------------------------------------------------------- products


def _product_generator(trainer, name: str):
    """A generator of its own for each product (seeded by the run's seed and the product's
    name), so products are reproducible and never touch the training streams."""
    import hashlib

    import torch

    salt = int(hashlib.sha256(name.encode()).hexdigest()[:8], 16)
    seed = int(np.random.SeedSequence([trainer.config.seed, salt]).generate_state(1)[0])
    return torch.Generator(trainer.device).manual_seed(seed)


def _exact_rows(trainer, final: bool) -> list[dict]:
    """Closed-form rows of a linear decoder (SPEC §1, §5): log p(x) and the approximation gap
    of the trained decoder on each evaluated split; at the end also of the PPCA MLE."""
    import torch

    from vi import linear_gaussian as lg

    c = trainer.config
    if not (trainer.epoch % c.eval_every == 0 or trainer.epoch == c.epochs or final):
        return []
    rows = []
    with torch.no_grad():
        W, b, psi = (t.double() for t in trainer.decoder.linear_parameters())
        gap = float(lg.approximation_gap(W, psi))
        for split in c.eval_splits:
            x = trainer.x[split].double()
            rows.append(trainer.row(split, "log_px_exact",
                                    float(lg.exact_log_marginal(x, W, b, psi).mean())))
            rows.append(trainer.row(split, "approximation_gap", gap))
        if final:
            Wm, bm, s2 = lg.ppca_mle(trainer.x["train"].double(), c.latent_dim)
            psi_m = s2.expand(Wm.shape[0])
            gap_m = float(lg.approximation_gap(Wm, psi_m))
            for split in c.eval_splits:
                x = trainer.x[split].double()
                rows.append(trainer.row(split, "log_px_mle",
                                        float(lg.exact_log_marginal(x, Wm, bm, psi_m).mean())))
                rows.append(trainer.row(split, "approximation_gap_mle", gap_m))
    return rows


def _identity_frame(trainer, n: int) -> dict[str, Any]:
    return {k: [v] * n for k, v in trainer.identity.items()}


def _images_table(trainer, options: dict) -> pd.DataFrame:
    """Test images, their reconstructions μ_θ(E_q[z]) under the method's own q, decoder samples
    μ_θ(z), z ~ N(0, I), and for H = 2 the manifold μ_θ(Φ⁻¹(u)) over a u-grid in (0, 1)²."""
    import torch

    n_recon = options.get("n_recon", 16)
    n_samples = options.get("n_samples", 16)
    k = options.get("manifold", 12)
    gen = _product_generator(trainer, "images")
    dec, h = trainer.decoder, trainer.decoder.latent_dim
    x = trainer.x["test"][:n_recon]
    labels = trainer.dataset.ground_truth.get("test_labels")
    lam = trainer.method.infer(x, None, generator=gen).detach()
    with torch.no_grad():
        recon = dec.mean_and_variance(lam[:, :h])[0]
        z = torch.randn(n_samples, h, generator=gen, device=trainer.device, dtype=lam.dtype)
        samples = dec.mean_and_variance(z)[0]
        parts = [("data", x, None), ("reconstruction", recon, None), ("sample", samples, None)]
        if h == 2:
            u = torch.linspace(0.5 / k, 1 - 0.5 / k, k, dtype=lam.dtype, device=trainer.device)
            grid = torch.special.ndtri(u)
            zz = torch.stack(torch.meshgrid(grid, grid.flip(0), indexing="xy"), -1).reshape(-1, 2)
            parts.append(("manifold", dec.mean_and_variance(zz)[0], zz))
    frames = []
    side = round(math.sqrt(dec.data_dim))
    for kind, images, coords in parts:
        n = images.shape[0]
        cols: dict[str, Any] = _identity_frame(trainer, n)
        cols.update({"epoch": [trainer.epoch] * n, "kind": [kind] * n, "index": list(range(n))})
        if kind in ("data", "reconstruction") and labels is not None:
            cols["label"] = labels[:n].tolist()
        else:
            cols["label"] = [None] * n
        zs = coords.cpu().numpy() if coords is not None else np.full((n, 2), np.nan)
        cols["z1"], cols["z2"] = zs[:, 0].tolist(), zs[:, 1].tolist()
        cols["height"] = [side if side * side == dec.data_dim else 1] * n
        cols["width"] = [dec.data_dim // cols["height"][0]] * n
        pixels = images.float().cpu().numpy()  # float32: the CSV keeps its short repr
        width = len(str(dec.data_dim - 1))
        for j in range(dec.data_dim):
            cols[f"p{j:0{width}d}"] = pixels[:, j]
        frames.append(pd.DataFrame(cols))
    out = pd.concat(frames, ignore_index=True)
    out["label"] = out["label"].astype("Int64")
    return out


def _latents_table(trainer, options: dict) -> pd.DataFrame:
    """The encoded test set: mean and log-variance of the method's own q per test point."""
    gen = _product_generator(trainer, "latents")
    x = trainer.x["test"]
    lam = trainer.method.infer(x, None, generator=gen).detach().float().cpu().numpy()
    h = trainer.decoder.latent_dim
    n = x.shape[0]
    cols: dict[str, Any] = _identity_frame(trainer, n)
    cols.update({"epoch": [trainer.epoch] * n, "point": list(range(n)),
                 "label": trainer.dataset.ground_truth["test_labels"].tolist()})
    for j in range(h):
        cols[f"mu{j + 1}"] = lam[:, j]
    for j in range(h):
        cols[f"logvar{j + 1}"] = lam[:, h + j]
    return pd.DataFrame(cols)


def _variance_sweep_table(trainer, options: dict) -> pd.DataFrame:
    """Gradient variance against n_mc (and estimator) at the final state (vi.gradstats)."""
    from vi import gradstats

    kwargs: dict[str, Any] = {"n_mcs": options.get("n_mc", [1, 4, 16]),
                              "generator": _product_generator(trainer, "variance_sweep")}
    if "draws" in options:
        kwargs["draws"] = options["draws"]
    if "estimators" in options:
        kwargs["estimators"] = [tuple(e) for e in options["estimators"]]
    rows = gradstats.variance_sweep(trainer, **kwargs)
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    frame = frame.rename(columns={"estimator": "grad_estimator", "baseline": "grad_baseline",
                                  "n_mc": "grad_n_mc"})
    frame = frame.drop(columns=[c for c in ("method", "latent_dim") if c in frame.columns])
    ident = pd.DataFrame(_identity_frame(trainer, len(frame)))
    ident["epoch"] = trainer.epoch
    if not np.isfinite(frame["value"].to_numpy(dtype=float)).all():
        from vi.inference import Divergence

        raise Divergence("non-finite gradient variance in the final sweep")
    return pd.concat([ident, frame.reset_index(drop=True)], axis=1)


_TABLE_PRODUCTS = {"images": _images_table, "latents": _latents_table,
                   "variance_sweep": _variance_sweep_table}


# ------------------------------------------------------------------------------ one cell


def _complete(run_dir: Path) -> dict | None:
    prov = read_provenance(run_dir)
    if prov and prov.get("status") in COMPLETE and (run_dir / "metrics.csv").is_file():
        return prov
    return None


def _clear(run_dir: Path) -> None:
    for name in ("provenance.json", "metrics.csv", "checkpoint.pt"):
        (run_dir / name).unlink(missing_ok=True)
    tables = run_dir / "tables"
    if tables.is_dir():
        for f in tables.glob("*.csv"):
            f.unlink()


def run_cell(cell: Cell | dict, force: bool = False, threads: int | None = 1) -> Outcome:
    """Run (or resume, or skip) one cell into its folder; never raises for a run's own failure.

    ``threads``: torch intra-op threads for the run (1 by default: results then do not depend
    on how many workers share the machine, and ``--jobs N`` uses N cores).
    """
    if isinstance(cell, dict):
        cell = Cell(**cell)
    run_dir = Path(cell.run_dir)
    start = time.perf_counter()
    cpu_start = time.process_time()
    if not force:
        prov = _complete(run_dir)
        if prov is not None:
            return Outcome(cell.run_id, prov["status"], prov.get("message", ""), "skipped", 0.0)
    import torch

    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run(cell, run_dir, force, start, cpu_start)
    finally:
        torch.set_num_threads(previous_threads)


def _run(cell: Cell, run_dir: Path, force: bool, start: float, cpu_start: float) -> Outcome:
    from vi.inference import Divergence
    from vi.training import ROW_COLUMNS, TrainConfig, Trainer, load_checkpoint, save_checkpoint

    run_dir.mkdir(parents=True, exist_ok=True)
    if force:
        _clear(run_dir)
    _write_json(run_dir / "config.json", {"run_id": cell.run_id, "experiment": cell.experiment,
                                          "config": cell.config, "products": cell.products})
    old = read_provenance(run_dir) or {}
    ckpt = run_dir / "checkpoint.pt"
    trainer, action, note = None, "ran", ""
    if ckpt.is_file():
        try:
            trainer = load_checkpoint(ckpt)
            action = "resumed"
            if trainer.epoch >= trainer.config.epochs or trainer.status != "running":
                trainer, action = None, "ran"  # a final state from an unfinished write-out
                note = "restarted: the checkpoint held a finished state without its results"
        except Exception as err:  # an unreadable checkpoint is not worth losing the sweep
            trainer, note = None, f"restarted: checkpoint unreadable ({err})"
    prov = {**cell.provenance, "run_id": cell.run_id, "experiment": cell.experiment,
            "lr_source": cell.lr_source, "device": cell.config.get("device", ""),
            "started": old.get("started") if action == "resumed" else _now(),
            "finished": "", "status": "running", "message": "",
            "resumed": int(old.get("resumed", 0)) + (action == "resumed"),
            "resumed_from_epoch": trainer.epoch if action == "resumed" else None}
    if note:
        prov["note"] = note
    _write_json(run_dir / "provenance.json", prov)

    exact = "exact" in cell.products
    error_tb = ""

    def on_epoch(t: Trainer) -> None:
        if exact:
            try:
                t.rows += _exact_rows(t, final=t.epoch == t.config.epochs)
            except Divergence as err:
                t.status, t.message = "diverged", f"epoch {t.epoch}: {err}"
                return
        if t.epoch < t.config.epochs and t.epoch % cell.checkpoint_every == 0:
            save_checkpoint(t, ckpt)

    tables: dict[str, pd.DataFrame] = {}
    rows: list[dict] = []
    epochs_done, elapsed = 0, 0.0
    try:
        if trainer is None:
            trainer = Trainer(TrainConfig.from_dict(cell.config), run_id=cell.run_id,
                              experiment=cell.experiment)
        if trainer.epoch == 0 and not trainer.rows and exact:
            try:  # epoch 0 as Trainer.fit would record it, plus the closed forms
                trainer.rows += trainer.evaluate()
                trainer.rows += _exact_rows(trainer, final=False)
            except Divergence as err:
                trainer.status, trainer.message = "diverged", str(err)
        result = trainer.fit(progress=False, on_epoch=on_epoch)
        status, message = result.status, result.message
        if status == "ok":
            try:
                for name, make in _TABLE_PRODUCTS.items():
                    if name in cell.products:
                        tables[name] = make(trainer, cell.products[name])
                for name, frame in getattr(trainer, "tables", {}).items():
                    tables.setdefault(name, frame)
            except Divergence as err:
                status, message = "diverged", f"final products: {err}"
    except Exception as err:  # a bug or a resource problem: record it, keep the sweep going
        status, message = "failed", f"{type(err).__name__}: {err}"
        error_tb = traceback.format_exc()
    if trainer is not None:
        rows, epochs_done, elapsed = trainer.rows, trainer.epoch, trainer.elapsed

    files = {"metrics.csv": write_csv(run_dir / "metrics.csv",
                                      pd.DataFrame(rows, columns=list(ROW_COLUMNS)))}
    for name, frame in tables.items():
        files[f"tables/{name}.csv"] = write_csv(run_dir / "tables" / f"{name}.csv", frame)
    if status in COMPLETE:
        save_checkpoint(trainer, ckpt)
    prov.update({"status": status, "message": message, "finished": _now(),
                 "epochs_done": epochs_done, "run_seconds": round(elapsed, 3),
                 "cpu_seconds": round(time.process_time() - cpu_start, 3),
                 "wall_seconds": round(time.perf_counter() - start, 3),
                 "files": files})
    if error_tb:
        prov["traceback"] = error_tb
    _write_json(run_dir / "provenance.json", prov)
    return Outcome(cell.run_id, status, message, action, time.perf_counter() - start)


def cell_payload(cell: Cell) -> dict:
    """The plain-dict form of a cell (what crosses process and cluster boundaries)."""
    return asdict(cell)

