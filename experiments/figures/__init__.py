"""The study's figures, drawn from the results CSVs alone (the contract of ``experiments.schema``).

``make_figures(results)`` validates every CSV it will read (``experiments.schema``), then, for
each experiment that has results, writes its registered tables and draws every figure its
module registered into ``results/<experiment>/figures/<name>.{png,pdf}``. Figure code imports
numpy, pandas, matplotlib (Agg), seaborn, ``experiments.schema`` and ``experiments.grids`` only:
never torch or the training code (``vi``), so re-plotting works from committed CSVs anywhere.

Modules
- ``style``: order, names, colours, markers, line styles and the shared marks;
- ``loading``: reading and validating the CSVs (``ExperimentResults``, ``validate_results``),
  ``results/references.csv`` included; rows at each run's best epoch (``at_best``);
- ``drawing``: panels, axes, curves (mean ± sd), final values (mean, 95 % t-interval), saving;
- ``marks``: counting diverged and unconverged runs (``Tally``) and legends built from the
  artists actually drawn (``legend``, ``axis_legend``);
- ``refs``: reference-model lines and the bits-per-dimension axis; ``curves``: grids of ELBO
  curves; ``pictures``: images, manifold, latent scatter; ``variance``: gradient-variance
  sweep and ratio;
- ``registry``: which figures and tables belong to which experiment; ``make``: ``make_figures``;
- one module per experiment (grid), named after it, which registers its figures on import;
- ``generic``: the figures of an experiment without a module of its own (a custom grid): ELBO
  curves per split, the final ELBO per cell, and gaps where the runs measured them.

Conventions shared by every figure
- Colour and marker = estimator label (``reparam``, ``stl``, ``score+none``, ``score+mean``,
  ``score+loo``, ``score+cv``), the same in every figure; columns = inference method in the
  order variational EM, amortized (VAE), semi-amortized (VAE + SVI), SA-VAE.
- Titles say what is compared: the data set, split, H, the Monte Carlo samples M (of training,
  or the equal M at which gradient estimators were measured), how long the models trained
  ("at convergence (best epoch)": every final value is the run's best-epoch value), and over
  how many seeds. Curves: mean ± sd over seeds; final values: mean and 95 % t-interval, one dot
  per seed.
- ELBO and log p(x) figures of digits and mnist5k carry the no-latent Gaussian and factor
  analysis at the panel's H (from ``results/references.csv``, the mean over the data seeds the
  runs used); PPCA figures carry the maximum-likelihood target.
- Diverged runs: thin dashed curves ending in ×, excluded from means; finished runs that did
  not converge (``converged`` False: outcome ``cap``, ``collapsed`` or ``stuck`` in runs.csv):
  curves end in a hollow ▷, seed dots hollow.
  Both are counted in the legend ("score+none — 1/5 diverged, 2/5 not converged") and panel
  titles. Legends list only what was drawn.
- A figure whose input table or column is missing is skipped with a logged note; an invalid
  CSV raises ``schema.SchemaError`` and an experiment with a grid but no figure module
  ``registry.RegistryError``, both before anything is drawn.

Figures (``results/<experiment>/figures/<stem>.{png,pdf}``; ``_H<h>`` where an experiment has
several latent dimensions):

- lr_selection: ``lr_selection[_<dataset>]``
- vem_e_steps: ``elbo_vs_epoch_and_seconds``
- refinement: ``refinement_vs_steps``
- elbo_curves: ``elbo_vs_{examples,epoch,seconds}_{train,test}``, ``final_elbo_vs_latent_dim``,
  ``active_units_vs_latent_dim``, ``test_time_inference[_H]``, ``images[_H]``, ``manifold``,
  ``latent_scatter``
- gradient_variance: ``grad_{variance,snr}_vs_epoch[_H]``, ``grad_{variance,snr}_vs_latent_dim``,
  ``grad_variance_vs_n_mc[_H]``, ``grad_variance_per_cost_vs_n_mc[_H]``,
  ``variance_ratio_vs_latent_dim``; tables ``variance_ratio.csv``/``.md``
- amortization_gap: ``gaps_<dataset>``; tables ``gaps_table.csv``/``.md``
- families: ``families_<dataset>``; tables ``gaps_table.csv``/``.md`` (a row per family)
- ppca_exact: ``elbo_vs_target[_H]``, ``grad_variance_vs_n_mc[_H]``
- mnist_curves: ``elbo_vs_examples``, ``final_elbo_vs_latent_dim``,
  ``active_units_vs_latent_dim``, ``images[_H]``, ``manifold``
"""

from __future__ import annotations

import importlib
import importlib.util

import matplotlib

matplotlib.use("Agg")  # headless; must precede pyplot, which seaborn and the figure modules load

from experiments.figures.amortization_gap import fig_amortization_gap, gaps_table
from experiments.figures.elbo_curves import (
    fig_active_units,
    fig_elbo_curves,
    fig_final_elbo,
    fig_pictures,
    fig_test_time_inference,
)
from experiments.figures.gradient_variance import (
    fig_gradient_variance,
    fig_variance_ratio,
    fig_variance_sweep,
    variance_ratio,
)
from experiments.figures.loading import ExperimentResults, load_experiment, validate_results
from experiments.figures.lr_selection import fig_lr_selection
from experiments.figures.make import make_figures
from experiments.figures.mnist_curves import fig_mnist_curves
from experiments.figures.ppca_exact import fig_ppca_exact
from experiments.figures.refinement import fig_refinement
from experiments.figures.registry import (
    RegistryError,
    check_registry,
    figure_functions,
    register,
    register_table,
    registered,
)
from experiments.figures.style import estimator_label
from experiments.figures.vem_e_steps import fig_vem_e_steps
from experiments.vocabulary import experiment_order

__all__ = [
    "EXPERIMENTS",
    "FIGURES",
    "MODULES",
    "ExperimentResults",
    "RegistryError",
    "check_registry",
    "estimator_label",
    "fig_active_units",
    "fig_amortization_gap",
    "fig_elbo_curves",
    "fig_final_elbo",
    "fig_gradient_variance",
    "fig_lr_selection",
    "fig_mnist_curves",
    "fig_pictures",
    "fig_ppca_exact",
    "fig_refinement",
    "fig_test_time_inference",
    "fig_variance_ratio",
    "fig_variance_sweep",
    "fig_vem_e_steps",
    "gaps_table",
    "load_experiment",
    "make_figures",
    "register",
    "register_table",
    "validate_results",
    "variance_ratio",
]

#: the experiment modules: for each grid, the module named after it when there is one, imported
#: (which registers its figures) in the grids' order
MODULES = tuple(importlib.import_module(f"{__name__}.{name}") for name in experiment_order()
                if importlib.util.find_spec(f"{__name__}.{name}") is not None)
#: the experiments that have figures, in drawing order (the grids' order)
EXPERIMENTS = registered()
#: experiment → its figure functions, each yielding (file stem, figure)
FIGURES = {name: figure_functions(name) for name in EXPERIMENTS}
