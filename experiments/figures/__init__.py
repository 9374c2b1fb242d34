"""The study's figures, drawn from the results CSVs alone (the contract of ``experiments.schema``).

``make_figures(results)`` validates every CSV it will read (``experiments.schema``), then draws,
for each experiment that has results, every figure its module registered into
``results/<experiment>/figures/<name>.{png,pdf}``. Figure code imports numpy, pandas, matplotlib
(Agg), seaborn, ``experiments.schema`` and ``experiments.grids`` only: never torch or the
training code (``vi``), so re-plotting works from committed CSVs on any machine.

Modules
- ``style``: order, names, colours and markers shared by every figure;
- ``loading``: reading and validating the CSVs (``ExperimentResults``, ``validate_results``);
- ``drawing``: panels, bands and curves, the tally of diverged runs, legends, saving;
- ``registry``: which figures and tables belong to which experiment (``register``,
  ``register_table``, ``check_registry``);
- ``make``: ``make_figures``;
- one module per experiment, named after it, which registers its figures when imported.
  Adding a figure: a module ``experiments/figures/<experiment>.py`` with functions decorated
  ``@register("<experiment>")`` that yield ``(file stem, figure)`` pairs, imported below.

Conventions shared by every figure
- hue = estimator with its baseline (``estimator_label``: ``reparam``, ``stl``, ``score+none``,
  ``score+loo``, ...), columns = inference method; colours are fixed per label across figures.
- Bands are mean ± one standard deviation over seeds of the runs that finished (status ``ok``),
  computed by seaborn (``errorbar="sd"``; on log axes seaborn averages in log space).
- Diverged (and failed) runs are results, never dropped silently: their curves are drawn thin
  and dashed up to the last finite value, which carries an ``×``; every legend entry and panel
  title counts them ("score+none — 2/6 runs diverged"); where a figure shows final values (bars,
  tables) they are excluded from the mean and the exclusion is printed on the figure.
- A figure whose input table or column is missing is skipped with a logged note; nothing else
  stops the ``figures`` command short of an invalid CSV, which raises ``schema.SchemaError``, or
  an experiment with a grid but no figure module, which raises ``registry.RegistryError``.

Figures (``results/<experiment>/figures/<stem>.{png,pdf}``; ``_H<h>`` is added where an
experiment has several latent dimensions, ``_<dataset>`` where lr_selection has several):

- lr_selection: ``lr_selection`` (validation ELBO vs lr; stars = selected; × = diverged)
- elbo_curves: ``elbo_vs_epoch_{train,test}``, ``elbo_vs_seconds_{train,test}``
  (rows = latent dimension, columns = method)
- gradient_variance: ``grad_variance_vs_epoch[_H]``, ``grad_snr_vs_epoch[_H]``,
  ``grad_variance_vs_latent_dim``, ``grad_snr_vs_latent_dim``, ``grad_variance_vs_n_mc[_H]``
  (with a 1/M line), ``variance_ratio_vs_latent_dim``; tables ``variance_ratio.csv``/``.md``
- amortization_gap: ``gaps_<dataset>`` (bars, train vs test), ``bounds_vs_epoch_<dataset>_<split>``
  (log p(x), L[q*], L[q_φ] and the gaps over training, when measured at several epochs)
- ppca_exact: ``elbo_vs_target[_H]`` (ELBO vs epoch, dotted target log p(x) − gap)
- test_time_inference: ``test_time_inference[_H]`` (held-out ELBO and seconds per point vs E-steps)
- samples: ``images[_H]``, ``manifold``, ``latent_scatter``
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # headless; must precede pyplot, which seaborn and the figure modules load

# Importing an experiment's module registers its figures. Experiments are drawn in this order,
# the order ``reproduce`` runs them in.
# isort: off
from experiments.figures import (lr_selection, elbo_curves, gradient_variance, amortization_gap,
                                 ppca_exact, test_time_inference, samples)
# isort: on
from experiments.figures.amortization_gap import fig_amortization_gap
from experiments.figures.elbo_curves import fig_elbo_curves
from experiments.figures.gradient_variance import fig_gradient_variance, variance_ratio
from experiments.figures.loading import ExperimentResults, load_experiment, validate_results
from experiments.figures.loading import _normalise as _normalise
from experiments.figures.lr_selection import fig_lr_selection
from experiments.figures.make import make_figures
from experiments.figures.ppca_exact import fig_ppca_exact
from experiments.figures.registry import (
    RegistryError,
    check_registry,
    figure_functions,
    register,
    register_table,
    registered,
)
from experiments.figures.samples import fig_samples
from experiments.figures.style import estimator_label
from experiments.figures.test_time_inference import fig_test_time_inference

__all__ = [
    "EXPERIMENTS",
    "FIGURES",
    "MODULES",
    "ExperimentResults",
    "RegistryError",
    "check_registry",
    "estimator_label",
    "fig_amortization_gap",
    "fig_elbo_curves",
    "fig_gradient_variance",
    "fig_lr_selection",
    "fig_ppca_exact",
    "fig_samples",
    "fig_test_time_inference",
    "load_experiment",
    "make_figures",
    "register",
    "register_table",
    "validate_results",
    "variance_ratio",
]

#: the experiment modules, in drawing order
MODULES = (lr_selection, elbo_curves, gradient_variance, amortization_gap, ppca_exact,
           test_time_inference, samples)
#: the experiments that have figures, in drawing order (as registered on import)
EXPERIMENTS = registered()
#: experiment → its figure functions, each yielding (file stem, figure)
FIGURES = {name: figure_functions(name) for name in EXPERIMENTS}
