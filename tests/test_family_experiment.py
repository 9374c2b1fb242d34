"""The family axis of the study: the size of λ in validation's memory bounds, the family column
of the gap table, the ``families`` grid and its findings on synthetic results."""

from __future__ import annotations

import itertools

import pytest

import vi
from vi.families import FAMILIES


@pytest.mark.parametrize("family", list(FAMILIES))
def test_lambda_size_follows_the_family(family: str) -> None:
    """parameter_count's encoder output and memory_bytes' local table use P of the family
    (2H, H + H(H+1)/2, 2H + S(2H+1)), not 2H."""
    h, d, hidden, n = 10, 200, 32, 1000  # D above every P: the widest layer stays D
    cfg = vi.RunConfig.from_dict({"model": {"latent_dim": h, "hidden": [hidden]},
                                  "method": {"name": "vem", "family": family,
                                             "encoder_hidden": [hidden]}})
    diag = cfg.replace(method=cfg.method.__class__(**{**cfg.method.__dict__,
                                                      "family": "diagonal"}))
    p = FAMILIES[family].param_dim(h)
    assert cfg.lambda_dim() == p
    assert cfg.parameter_count(d) - diag.parameter_count(d) == (hidden + 1) * (p - 2 * h)
    extra_params = 4 * 6 * (hidden + 1) * (p - 2 * h)
    assert (cfg.memory_bytes(d, n, 10) - diag.memory_bytes(d, n, 10)
            == extra_params + n * (p - 2 * h) * 20)
    if family != "diagonal":
        assert p > 2 * h


def test_lambda_sizes_of_the_families() -> None:
    for h, (name, fam) in itertools.product((1, 4, 10), FAMILIES.items()):
        expected = {"diagonal": 2 * h, "full": h + h * (h + 1) // 2,
                    "flow": 2 * h + fam.__dict__.get("steps", 0) * (2 * h + 1)}[name]
        assert fam.param_dim(h) == expected
