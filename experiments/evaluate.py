"""``python -m experiments evaluate``: measure a saved run again without retraining.

A run's ``checkpoint.pt`` holds its final (restored best) state; evaluating it computes the ELBO
of every split and, on request, the gap decomposition and the test-time curve (``vi.probes``),
with the run's own probe options where it had them. The streams are keyed by the run's seed and
the best epoch, so a probe the run already ran reproduces its rows.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

__all__ = ["CheckpointError", "EvaluationError", "evaluate", "load_checkpoint_file",
           "load_error"]


class CheckpointError(ValueError):
    """A file that is not a readable run checkpoint of this version, or one that holds nothing
    to evaluate (the message says why)."""


class EvaluationError(RuntimeError):
    """The evaluation of a valid checkpoint gave no finite value (the message says where)."""


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
    """Rows (the results schema) of a saved run: ELBO per split, and the requested probes.

    The configuration saved in the checkpoint is validated as a grid's cell is (fields, probes,
    data, memory) before anything is built: ``CheckpointError`` for a configuration that cannot
    run or a run that diverged (its state holds non-finite numbers), ``EvaluationError`` when a
    split's ELBO comes out non-finite."""
    from experiments.cells import check_config
    from vi.training import Trainer

    path = Path(path)
    state = load_checkpoint_file(path)
    if state.get("status") == "diverged":
        why = state.get("message") or "no message"
        raise CheckpointError(f"the run saved in {path} diverged ({why}): its state is not "
                              f"finite, so there is nothing to evaluate")
    values = state["config"]
    if not isinstance(values, dict):
        raise CheckpointError(f"{path} is not a run checkpoint (its config is a "
                              f"{type(values).__name__})")
    values = {**values, **({} if device is None else {"device": device})}
    saved = values.get("probes") if isinstance(values.get("probes"), dict) else {}
    spec: dict[str, dict] = {}
    if gaps:
        spec["gaps"] = dict(saved.get("gaps") or {})
        if iwae_k is not None:
            spec["gaps"]["iwae_k"] = iwae_k
    if test_curve:
        spec["test_curve"] = dict(saved.get("test_curve") or {})
    try:
        config, probes = check_config(values, probes=spec)
    except (ValueError, TypeError, RecursionError) as err:
        reason = "nested too deeply" if isinstance(err, RecursionError) else str(err)
        raise CheckpointError(f"the configuration saved in {path} cannot run here: {reason}"
                              ) from None
    try:
        trainer = Trainer.from_states([state], device=device)
    except Exception as err:  # a dict that looks like a checkpoint but is not a whole one
        raise CheckpointError(f"cannot rebuild the run saved in {path} ({type(err).__name__}: "
                              f"{err})") from None
    epoch = trainer.best_epoch[0] if state.get("status") != "running" else trainer.epoch
    rows, bad = trainer.evaluate(list(config.training.eval_splits), epoch=epoch)
    if bad:
        raise EvaluationError(f"the ELBO of the run saved in {path} is not finite on its "
                              f"{bad[0]} split at epoch {epoch}; nothing written")
    measured, _ = trainer.measure(probes, epoch=epoch)
    return pd.DataFrame(rows[0] + measured[0])
