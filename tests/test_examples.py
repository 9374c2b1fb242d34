"""The examples: the one-page run through the public API prints its ELBOs, and the one-page
plain-PyTorch VAE matches the library's run to rounding."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from vi.config import RunConfig
from vi.streams import generator
from vi.training import Trainer

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_vae_vs_vem_example_runs() -> None:
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "vae_vs_vem.py"),
                          "--epochs", "1", "--latent-dim", "2"], capture_output=True, text=True,
                         check=True, timeout=300).stdout
    lines = out.splitlines()
    assert sum("amortized" in line and "seed" in line for line in lines) == 3
    assert sum("vem" in line and "seed" in line for line in lines) == 3
    assert any(line.strip().startswith("factor_analysis") for line in lines)


def test_example_is_short() -> None:
    assert len((ROOT / "examples" / "vae_vs_vem.py").read_text().splitlines()) < 100


def _plain_vae():
    spec = importlib.util.spec_from_file_location("plain_vae", ROOT / "examples" / "plain_vae.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_plain_pytorch_vae_is_one_page() -> None:
    text = (ROOT / "examples" / "plain_vae.py").read_text()
    assert len(text.splitlines()) < 150
    assert "vi.training" not in text and "vi.train(" not in text and "torch.optim.Adam" in text


def test_plain_pytorch_vae_matches_the_library_run() -> None:
    """examples/plain_vae.py (torch.nn, torch.distributions, torch.optim.Adam) and ``vi.train``
    from one seed's streams (initialisation, data order, noise) in float64: the same initial
    parameters bit for bit, and after 3 epochs (39 Adam steps) the same parameters and running
    ELBOs to rounding. The two differ only in the order of floating-point operations:
    nn.Linear's addmm against the library's batched baddbmm, torch.optim.Adam's lerp and
    √v / √(1 − β₂ᵗ) against the library's one Adam expression. Each step then differs by a few
    units of float64's roundoff u = 1.1e-16, and 39 steps of training amplify that to about
    5e-15 of each tensor's largest entry (measured); the tolerance, 1e-10, is far above that
    and far below any change of the algorithm (a float32 step alone differs by ~1e-7)."""
    plain = _plain_vae()
    seed, latent_dim, epochs = 3, 5, 3
    config = RunConfig.from_dict({
        "data": {"name": "digits"}, "model": {"latent_dim": latent_dim, "hidden": [64]},
        "method": {"name": "amortized", "encoder_hidden": [64], "lr": 3e-3},
        "training": {"max_epochs": epochs, "batch_size": 100, "stopping": None},
        "dtype": "float64", "seed": seed})
    trainer = Trainer([config])
    x = trainer.x["train"][0]
    model = plain.VAE(x.shape[1], latent_dim, 64, trainer.var_floor)
    model.reset(generator(seed, "init"))  # drawn in float32, as the library draws them
    model.double()
    model.init_from_data(x)

    def library() -> list:
        d = trainer.method.decoder.params.views()
        e = trainer.method.encoder.params.views()
        return [d["w0"][0].T, d["b0"][0], d["w1"][0].T, d["b1"][0], d["raw_var"][0],
                e["w0"][0].T, e["b0"][0], e["w1"][0].T, e["b1"][0]]

    ours = [model.decoder[0].weight, model.decoder[0].bias, model.decoder[2].weight,
            model.decoder[2].bias, model.raw_var, model.encoder[0].weight,
            model.encoder[0].bias, model.encoder[2].weight, model.encoder[2].bias]
    for a, b in zip(ours, library(), strict=True):
        assert torch.equal(a.detach(), b)
    start = [t.detach().clone() for t in ours]
    history = plain.train(model, x, epochs=epochs, lr=3e-3, order=generator(seed, "data"),
                          noise=generator(seed, "noise"))
    (result,) = trainer.fit()
    running = [r["value"] for r in result.rows if r["metric"] == "elbo_running"]
    np.testing.assert_allclose(history, running, rtol=1e-10, atol=0)
    moved = 0.0
    for a, b, s in zip(ours, library(), start, strict=True):
        scale = float(b.abs().max())
        assert float((a.detach() - b).abs().max()) <= 1e-10 * scale
        moved = max(moved, float((b - s).abs().max()) / scale)
    assert moved > 1e-3  # the parameters did move: the comparison is not of two copies
