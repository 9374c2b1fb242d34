"""The study's summary table: ``results/summary.csv`` and its Markdown form.

One row per experiment × dataset × method × estimator (label, with ``kl`` and ``n_mc``) ×
latent dimension H × training setting × convergence. Nothing is ever averaged across
experiments or across training settings:

- ``setting`` names the configuration columns (dotted, from ``runs.csv``) that vary *within* one
  experiment × dataset × method × estimator × H cell besides the seed and the step sizes, with
  their values, e.g. ``method.e_steps=20, method.e_tol=—`` in ``vem_e_steps`` or
  ``method.refine_steps=5`` in ``refinement``; ``default`` where nothing varies. A column that
  varies only between cells (``training.batch_size`` for ppca) is already fixed by the keys.
- ``convergence``: finished runs (status ``ok``) whose outcome is ``converged`` (``converged``
  true in ``runs.csv``: the plateau rule stopped them after their last step-size decay, neither
  stuck nor collapsed) and the others are **separate rows**, one per ``outcome`` (``cap``,
  ``collapsed``, ``stuck``; ``not converged`` where runs.csv has no outcome, ``unknown`` where
  it does not say); diverged and failed runs are never averaged. The counts ``n_runs``,
  ``n_ok``, ``n_diverged``, ``n_failed``, ``n_not_converged`` (finished, not converged) and
  its parts ``n_cap``, ``n_collapsed``, ``n_stuck`` describe the whole cell and repeat on each
  of its rows: what a comparison of converged runs excluded; a cell without a finished run
  keeps one row (``convergence`` = ``none finished``) with its counts.
- ``lr_selection`` is left out: its runs differ in step size, the quantity it selects.

Quantities (per run first, then over the seeds of a row). Each column stem names its split:

=============================  ================================================================
``<split>_elbo``               ``final_elbo_<split>`` of runs.csv: the ELBO of the method's own
                               posterior at the best (restored) epoch, over all ``n_<split>``
                               points; ``_bpd`` in bits/dim for quantized (image) data
``<split>_ais``,               the ``gaps`` table (Cremer et al. 2018): per-point log p(x) by AIS
``<split>_iwae``,              from q* and by IWAE, exact log p(x) for a linear decoder,
``<split>_log_px_exact``,      L[q*], L[q_φ], approximation gap
``<split>_elbo_qstar``,        log p(x) − L[q*], amortization gap L[q*] − L[q_φ]; mean over the
``<split>_elbo_qphi``,         table's points (``_points`` = their number) at the run's last
``<split>_approximation_gap``, measurement; without a gaps table, the run's final value of that
``<split>_amortization_gap``   metric over the whole split (closed forms of ``ppca_exact``)
``<split>_log_px_mle``,        the PPCA maximum-likelihood fit of the training split (closed
``<split>_approximation_gap_   form, ``ppca_exact``)
mle``
``<split>_ref_no_latent``,     ``references.csv``: exact log p(x) of the no-latent Gaussian, of
``<split>_ref_factor_          factor analysis and (for the ppca data only) of PPCA at the row's
analysis``, ``<split>_ref_     H, fitted on the training split of each run's own data seed
ppca``
``<split>_elbo_minus_fa``      per run ``<split>_elbo`` − factor analysis at the same H and data
                               seed (same points), then averaged: > 0 means the model's bound
                               beats factor analysis's exact log-likelihood
``test_active_units``          active units (Burda et al. 2016) at the best epoch, test split
``test_kl_total``, ``test_     KL(q ‖ p) per point; E-steps of the held-out fit (test split)
e_steps``
``seconds_per_epoch``          training seconds / epochs run (runs.csv; else from ``wall_s``)
``epochs_run``                 epochs trained before stopping
=============================  ================================================================

For each quantity ``<q>``: ``<q>_mean``, ``<q>_sd`` (ddof 1), ``<q>_n`` (seeds averaged),
``<q>_ci_low``/``<q>_ci_high`` (95 % Student-t interval mean ± t_{0.975, n−1} · sd / √n, from
``scipy.stats.t``; empty for n < 2) and ``<q>_points`` (data points behind each run's value;
the smallest over the row's runs). Quantities that no row measures are left out, except a core
set that is always present. Reads CSVs only (pandas, numpy, scipy.stats; never torch or a
plotting library): the estimator labels, the order of methods and the order of experiments (the
grids') come from ``experiments.vocabulary``, and summary.csv is written with
``vi.files.atomic_write`` (standard library only).

Modules
- ``quantities``: the cell keys, the quantities (``QUANTITIES``) and the statistics
  (``t_interval``, ``Interval``, ``bits_per_dim``);
- ``runs``: reading the CSVs (``read_csv``, ``experiments_present``) and each experiment's runs
  with their derived columns (``load_runs``);
- ``values``: every quantity per run (``run_values``): runs.csv, gaps.csv, references.csv;
- ``table``: the summary over seeds (``summary_table``, ``write_summary``) and its Markdown
  (``summary_markdown``).
"""

from experiments.summary.quantities import (
    CELL,
    EXCLUDED,
    QUANTITIES,
    Interval,
    Quantity,
    bits_per_dim,
    t_interval,
)
from experiments.summary.runs import experiments_present, load_runs, read_csv
from experiments.summary.table import summary_markdown, summary_table, write_summary
from experiments.summary.values import run_values

__all__ = [
    "CELL",
    "EXCLUDED",
    "QUANTITIES",
    "Interval",
    "Quantity",
    "bits_per_dim",
    "experiments_present",
    "load_runs",
    "read_csv",
    "run_values",
    "summary_markdown",
    "summary_table",
    "t_interval",
    "write_summary",
]
