"""``python -m experiments evaluate``: measure a saved run again without retraining.

A run's ``checkpoint.pt`` holds its final (restored best) state; evaluating it computes the ELBO
of every split and, on request, the gap decomposition and the test-time curve (``vi.probes``),
with the run's own probe options where it had them. The streams are keyed by the run's seed and
the best epoch, so a probe the run already ran reproduces its rows.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

__all__ = ["CheckpointError", "evaluate"]


class CheckpointError(ValueError):
    """A file that is not a readable run checkpoint of this version (the message says why)."""


def _load(path: Path) -> dict:
    import pickle
    import zipfile

    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, zipfile.BadZipFile, RuntimeError, EOFError, OSError,
            ValueError, TypeError, AttributeError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
        raise CheckpointError(f"{path} is not a run checkpoint ({type(err).__name__}: "
                              f"{first})") from None
    if not isinstance(state, dict) or "format" not in state or "config" not in state:
        kind = type(state).__name__
        raise CheckpointError(f"{path} is not a run checkpoint (it holds a {kind}, not the "
                              f"state a run saves)")
    return state


def evaluate(path: str | Path, *, gaps: bool = False, test_curve: bool = False,
             iwae_k: int | None = None, device: str | None = None) -> pd.DataFrame:
    """Rows (the results schema) of a saved run: ELBO per split, and the requested probes."""
    from vi.probes import build_probes
    from vi.training import Trainer

    path = Path(path)
    state = _load(path)
    try:
        trainer = Trainer.from_states([state], device=device)
    except (ValueError, KeyError, RuntimeError) as err:
        raise CheckpointError(f"cannot rebuild the run saved in {path}: {err}") from err
    config = trainer.configs[0]
    epoch = trainer.best_epoch[0] if state.get("status") != "running" else trainer.epoch
    rows, _ = trainer.evaluate(list(config.training.eval_splits), epoch=epoch)
    spec: dict[str, dict] = {}
    if gaps:
        spec["gaps"] = dict(config.probes.get("gaps", {}))
        if iwae_k is not None:
            spec["gaps"]["iwae_k"] = iwae_k
    if test_curve:
        spec["test_curve"] = dict(config.probes.get("test_curve", {}))
    try:
        probes = build_probes(spec, config)
    except ValueError as err:
        raise CheckpointError(str(err)) from err
    measured, _ = trainer.measure(probes, epoch=epoch)
    return pd.DataFrame(rows[0] + measured[0])
