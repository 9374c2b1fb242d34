"""``python -m experiments evaluate``: measure a saved run again without retraining.

A run's ``checkpoint.pt`` holds its final (restored best) state; evaluating it computes the ELBO
of every split and, on request, the gap decomposition and the test-time curve (``vi.probes``),
with the run's own probe options where it had them. The streams are keyed by the run's seed and
the best epoch, so a probe the run already ran reproduces its rows.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

__all__ = ["CheckpointError", "evaluate", "load_checkpoint_file", "load_error"]


class CheckpointError(ValueError):
    """A file that is not a readable run checkpoint of this version (the message says why)."""


def load_error(err: BaseException) -> str:
    """A short reason why ``torch.load`` failed: the error's type and its own first line, never
    torch's advice to retry with ``weights_only=False`` (which would run arbitrary code)."""
    text = str(err)
    if "WeightsUnpickler error:" in text:  # torch wraps the real reason in paragraphs of advice
        text = text.split("WeightsUnpickler error:", 1)[1]
    lines = [line.strip() for line in text.splitlines()
             if line.strip() and "weights_only" not in line and "torch.load" not in line]
    reason = lines[0][:160] if lines else ""
    return f"{type(err).__name__}: {reason}" if reason else type(err).__name__


def load_checkpoint_file(path: str | Path) -> dict:
    """The state saved in a run's ``checkpoint.pt``, loaded safely (tensors and plain values
    only); ``CheckpointError`` with a one-line reason for anything else (an empty file, a CSV,
    random bytes, a file that holds a tensor or a list)."""
    import torch

    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise CheckpointError(f"{path} is not a run checkpoint (an empty file)")
        state = torch.load(path, map_location="cpu", weights_only=True)
    except CheckpointError:
        raise
    except Exception as err:  # torch.load on arbitrary bytes raises nearly anything
        raise CheckpointError(f"{path} is not a run checkpoint ({load_error(err)})") from None
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
    state = load_checkpoint_file(path)
    try:
        trainer = Trainer.from_states([state], device=device)
    except Exception as err:  # a dict that looks like a checkpoint but is not a whole one
        raise CheckpointError(f"cannot rebuild the run saved in {path} ({type(err).__name__}: "
                              f"{err})") from None
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
