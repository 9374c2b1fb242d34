"""``results/references.csv``: the reference models beside every number of the study.

For every data split an experiment trained on (data set, data seed, split fractions, options;
read from the runs.csv files), the no-latent diagonal Gaussian and, at each latent dimension H
used with that data, factor analysis and probabilistic PCA, fitted by maximum likelihood on the
training split and scored exactly on every split (``vi.references``), with bits per dimension
for quantized data. A converged nonlinear model should beat factor analysis at the same H.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

from vi.files import atomic_write

__all__ = ["REFERENCES", "reference_table", "write_references"]

REFERENCES = "references.csv"
_KEYS = ["dataset", "data.seed_used", "data.test_fraction", "data.validation_fraction",
         "data.options", "data.path"]


def _splits(results: Path) -> pd.DataFrame:
    frames = []
    for runs_csv in sorted(results.glob("*/runs.csv")):
        runs = pd.read_csv(runs_csv, dtype={"run_id": str}).copy()  # one block: no fragmentation
        if runs.empty:
            continue
        seed = runs["data.seed"] if "data.seed" in runs else pd.Series(math.nan, index=runs.index)
        runs = runs.assign(**{"data.seed_used": seed.fillna(runs["seed"]).astype(int)})
        for col in _KEYS:
            if col not in runs:
                runs[col] = None
        frames.append(runs[[*_KEYS, "latent_dim"]])
    if not frames:
        return pd.DataFrame(columns=[*_KEYS, "latent_dim"])
    return pd.concat(frames, ignore_index=True).drop_duplicates()


def reference_table(results: str | Path) -> pd.DataFrame:
    """The references of every data split used under ``results`` (one row per data seed ×
    model × H × split)."""
    from vi.data import bits_per_dim, load_dataset
    from vi.references import reference_rows

    used = _splits(Path(results))
    rows = []
    for key, part in used.groupby(_KEYS, dropna=False, sort=True):
        name, seed, test_f, val_f, options, path = key
        opts = json.loads(options) if isinstance(options, str) and options else {}
        data = load_dataset(name, seed=int(seed), test_fraction=float(test_f),
                            validation_fraction=float(val_f),
                            path=None if pd.isna(path) else path, **opts)
        dims = sorted(int(h) for h in part["latent_dim"].unique())
        for r in reference_rows(data, dims):
            r = dict(r)
            r.update({"test_fraction": float(test_f), "validation_fraction": float(val_f),
                      "options": options if isinstance(options, str) else ""})
            if data.levels is not None:
                r["log_px_bpd"] = float(bits_per_dim(r["log_px"], data.data_dim, data.levels))
            rows.append(r)
    return pd.DataFrame(rows)


def write_references(results: str | Path) -> Path:
    """Compute and atomically write ``results/references.csv``, recorded in the results
    folder's ``manifest.json`` (``check`` verifies it); return its path. Raises ``ValueError``,
    writing nothing, when no experiment under ``results`` has runs."""
    from experiments.checks import add_to_manifest

    results = Path(results)
    table = reference_table(results)
    if table.empty:
        raise ValueError(f"no data split to fit references on: no experiment under {results} "
                         f"has runs; {REFERENCES} not written")
    path = results / REFERENCES
    atomic_write(path, table.to_csv(index=False, lineterminator="\n"))
    add_to_manifest(results, [path], create=True)
    return path
