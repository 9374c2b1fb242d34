"""The one-page example runs through the public API and prints its ELBOs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

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
