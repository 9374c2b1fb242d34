"""The lr_selection figure for a method whose selection searches two inference step sizes
(semi_amortized: ``encoder_lr`` and ``refine_lr``): one line per combination of them, the
chosen combination starred and named in the title."""

from __future__ import annotations

import pandas as pd
import pytest

pytest.importorskip("matplotlib")

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from experiments.figures import lr_selection as fig


def test_two_inference_step_sizes_draw_one_line_per_combination() -> None:
    centre = {"method.lr": 1e-3, "method.encoder_lr": 3e-3, "method.refine_lr": 3e-2}
    cross = [centre, {**centre, "method.lr": 3e-4}, {**centre, "method.lr": 3e-3},
             {**centre, "method.encoder_lr": 1e-3}, {**centre, "method.encoder_lr": 9e-3},
             {**centre, "method.refine_lr": 1e-2}, {**centre, "method.refine_lr": 9e-2}]
    c = pd.DataFrame([{**v, "score": -100.0 - k, "unstable": False, "unconverged": False,
                       "round": 0} for k, v in enumerate(cross)])
    s = c.iloc[[0]]
    fig_, ax = plt.subplots()
    try:
        _, found = fig._panel(ax, c, s, pd.DataFrame())
        assert found == {"encoder_lr = 0.003, refine_lr = 0.03",
                         "encoder_lr = 0.001, refine_lr = 0.03",
                         "encoder_lr = 0.009, refine_lr = 0.03",
                         "encoder_lr = 0.003, refine_lr = 0.01",
                         "encoder_lr = 0.003, refine_lr = 0.09"}
        centre_line = [ln for ln in ax.lines
                       if ln.get_label() == "encoder_lr = 0.003, refine_lr = 0.03"]
        assert len(centre_line) == 1 and list(centre_line[0].get_xdata()) == [3e-4, 1e-3, 3e-3]
        assert any(ln.get_marker() == "*" for ln in ax.lines)  # the choice is starred
        title = fig._title("semi_amortized", "reparam", s, c)
        assert "chosen: lr 0.001, encoder_lr 0.003, refine_lr 0.03" in title
    finally:
        plt.close(fig_)
