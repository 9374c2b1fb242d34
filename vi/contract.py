"""The results contract: what the trainer and the probes may write (docs/results.md).

Standard library only, so the tools that read results (``experiments.schema``, ``check``,
``figures``, the summary) know the contract without importing torch, and the library
(``vi.training``, ``vi.probes``) writes against the same names.

- ``METRIC_COLUMNS``: the columns of a metric row (``IDENTITY_COLUMNS`` first);
- ``METRICS``: every metric name a row may carry → what it measures (units): the only place a
  metric is described;
- ``TABLES``: every per-run table a probe may write → the columns it must have besides the
  identity columns (more may follow; ``table_columns`` gives the published header);
- ``PROBES``: every probe → the metrics and tables it writes (``ProbeContract``);
- ``OUTCOMES``: how a run ended, one label per run (``runs.csv`` column ``outcome``), and
  ``OUTCOME_COLUMNS``, the ``runs.csv`` columns that record how training went.

The study's own trainer metrics and probes are declared below. A probe defined anywhere else
declares what it brings through ``declare_probe`` (``vi.probes.ProbeBase`` does it for a probe
class that gives its metrics as ``{name: description}`` and its tables as ``{name: columns}``);
a process that imports that module then knows its names. ``check_probe`` refuses a probe that
names a metric or table nobody declared, naming the missing entry; ``vi.probes.build_probes``
calls it before anything is trained.

The contract travels with the results: a finished run records, in its ``provenance.json``, the
declarations of every metric and table it wrote and the baselines each registered estimator
accepts (``record``); aggregation gathers them into the experiment's ``contract.json``. A
process that reads results (``check``, ``figures``, the summary, the findings, none of which
imports the library's extensions) learns them from there (``adopt``), so the results of a probe
or estimator defined in a module of its own read like the study's.

- ``ESTIMATORS``: estimator → the baselines it accepts, as recorded with results
  (``vi.estimators.Estimator.baselines``); an estimator accepting one besides ``none`` names
  its baseline in every label (``experiments.vocabulary.estimator_label``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

__all__ = [
    "ESTIMATORS",
    "GRADIENT_METRICS",
    "IDENTITY_COLUMNS",
    "METRICS",
    "METRIC_COLUMNS",
    "OUTCOMES",
    "OUTCOME_COLUMNS",
    "PROBES",
    "TABLES",
    "TABLE_ONLY_METRICS",
    "TRAINER_METRICS",
    "ContractError",
    "ProbeContract",
    "adopt",
    "check_probe",
    "declare_metric",
    "declare_probe",
    "declare_table",
    "record",
    "table_columns",
]

#: the columns naming a run in every row and table
IDENTITY_COLUMNS = (
    "run_id", "experiment", "dataset", "method", "estimator", "baseline", "kl",
    "latent_dim", "n_mc", "seed",
)
#: the columns of a metric row (``metrics.csv``)
METRIC_COLUMNS = (*IDENTITY_COLUMNS, "epoch", "step", "wall_s", "split", "param_group",
                  "metric", "value")

#: a run's outcome (``runs.csv`` ``outcome``) → what it means; judged by ``vi.training`` from
#: the run's own validation ELBO with the margins of ``vi.config.StoppingConfig`` (defaults in
#: brackets), in this order of precedence (the first that applies)
OUTCOMES: dict[str, str] = {
    "failed": "the run raised an error or its files could not be written (no numbers)",
    "diverged": "a loss, gradient, parameter or evaluation became non-finite",
    "stuck": "its best validation ELBO is less than stuck_margin (0.5 nat) above the no-latent "
             "Gaussian fitted to its training split: the latent variables never paid off",
    "collapsed": "its validation ELBO at the last check is more than collapse_margin (1 nat) "
                 "below its best and its training ELBO fell too (a fall of the validation "
                 "ELBO alone is overfitting, undone by restoring the best state): the "
                 "restored best state is reported, flagged",
    "cap": "max_epochs stopped it before the plateau of its last phase (late_gain: how much it "
           "was still rising)",
    "converged": "reached the plateau of its last phase: the plateau rule stopped it after its "
                 "last step-size decay",
    "budget": "a fixed number of epochs without a stopping rule, none of the above",
}
#: the ``runs.csv`` columns that record how training went (besides ``status``, ``message``,
#: ``stop_reason``, ``converged`` = outcome is ``converged``, ``epochs_run``, ``best_epoch``)
OUTCOME_COLUMNS: dict[str, str] = {
    "outcome": "one of OUTCOMES",
    "decays": "step-size decays taken (count)",
    "decay_epochs": "the epochs at which the step sizes decayed (JSON list)",
    "best_validation": "the best validation ELBO of any check (nats)",
    "last_validation": "the validation ELBO at the last check (nats)",
    "late_gain": "rise of the best validation ELBO over the last 20 % of the last phase (the "
                 "epochs since the last step-size decay; all epochs without one) (nats)",
    "no_latent_validation": "validation log-likelihood of the no-latent Gaussian fitted to the "
                            "training split, same points (nats)",
}

#: metric name → what it measures (units)
METRICS: dict[str, str] = {
    # the trainer (vi.training)
    "elbo": "ELBO per data point of the method's own posterior, full split (nats)",
    "elbo_running": "running mean of the minibatch ELBO estimates over a training epoch (nats)",
    "e_steps": "E-steps the held-out fit took before the stopping rule fired (count)",
    # gaps, exact
    "iwae": "IWAE estimate of log p(x) with the defensive proposal built on q* (nats)",
    "ais": "log p(x) by annealed importance sampling with HMC from q* (vi.ais), mean over the "
           "probe's points (nats)",
    "ais_se": "mean over the points of the AIS estimate's standard error over its chains (nats)",
    "ais_ess_min": "smallest effective sample size of the AIS chains' weights over the points "
                   "(of the chains per point)",
    "ais_acceptance": "mean HMC acceptance probability of the AIS chains",
    "log_px_exact": "exact log p(x) of a linear decoder (nats)",
    "log_px_mle": "exact log p(x) under the closed-form PPCA maximum-likelihood fit of the "
                  "training split (nats)",
    "approximation_gap_mle": "closed-form approximation gap of the best diagonal q at the PPCA "
                             "maximum-likelihood decoder (nats)",
    "elbo_qstar": "ELBO of the per-datapoint optimum q* on the trained decoder (nats)",
    "elbo_qphi": "ELBO of the method's own posterior, evaluated like L[q*] (nats)",
    "approximation_gap": "log p(x) − L[q*] (nats)",
    "amortization_gap": "L[q*] − L[q_φ] (nats)",
    "qstar_steps": "optimisation steps taken to fit q* (count)",
    "qstar_decays": "step-size decays the fit of q* took (count)",
    "qstar_capped": "1 where the fit of q* stopped at its step cap, else 0",
    "iwae_ess_min": "smallest effective sample size of the IWAE weights over the points",
    "iwae_low_ess_points": "points whose IWAE effective sample size is below low_ess · k",
    # test_curve
    "test_curve_elbo": "held-out ELBO after `step` E-steps of test-time inference (nats)",
    # gradvar (also the metric column of the variance_sweep table)
    "grad_var_total": "total variance tr Σ of a single gradient estimate",
    "grad_var_relative": "tr Σ / ||mean gradient||²",
    "grad_snr_mean": "mean over coordinates of |ĝ_i| / sqrt(v_i)",
    "grad_snr_median": "median over coordinates of |ĝ_i| / sqrt(v_i)",
    "grad_mean_norm": "||mean gradient||",
    # k_sweep (the metric column of its table): an estimator against a reference estimator on
    # the same noise draws
    "grad_bias_relative": "(||mean(g - g_ref)||^2 - tr Sigma_(g - g_ref) / draws) / "
                          "||mean g_ref||^2: squared distance of an estimator's mean from the "
                          "reference estimator's, unbiased for ||bias||^2, relative",
    "grad_bias_z": "the same excess over its null expectation divided by its null standard "
                   "deviation sqrt(2 sum_i (v_i / draws)^2) (about N(0, 1) when unbiased)",
    # activity
    "active_units": "latent dimensions with Cov_x(E_q[z_h]) above the threshold (count)",
    "kl_total": "KL(q(z | x) ‖ p(z)) averaged over the points (nats)",
}
#: the metrics the trainer itself writes
TRAINER_METRICS = ("elbo", "elbo_running", "e_steps")
#: metric names that appear only in a table's metric column, never as metrics.csv rows
TABLE_ONLY_METRICS = ("grad_bias_relative", "grad_bias_z")
#: the statistics of a gradient estimate (``vi.gradstats.gradient_statistics``)
GRADIENT_METRICS = ("grad_var_total", "grad_var_relative", "grad_snr_mean", "grad_snr_median",
                    "grad_mean_norm")

#: per-run table name → the columns a probe writes besides the identity columns
TABLES: dict[str, tuple[str, ...]] = {
    "images": ("epoch", "kind", "index", "label", "z1", "z2", "height", "width"),
    "latents": ("epoch", "point", "label", "mu1", "logvar1"),
    "variance_sweep": ("epoch", "param_group", "grad_estimator", "grad_baseline", "grad_kl",
                       "grad_n_mc", "draws", "metric", "value"),
    "gaps": ("epoch", "split", "point", "log_px_iwae", "iwae_ess", "iwae_low_ess",
             "elbo_qstar", "elbo_qphi", "approximation_gap", "amortization_gap"),
    "activity": ("epoch", "split", "dim", "kl_per_dim", "activity", "active"),
    "bdmc": ("epoch", "point", "lower", "upper", "width"),
    "k_sweep": ("epoch", "param_group", "grad_estimator", "grad_baseline", "grad_k",
                "grad_n_mc", "draws", "metric", "value"),
    "iwae_bounds": ("epoch", "split", "k", "points", "value", "se"),
}


@dataclass(frozen=True)
class ProbeContract:
    """What one probe writes: metric names (rows) and table names."""

    metrics: tuple[str, ...] = ()
    tables: tuple[str, ...] = ()


#: probe name → what it writes
PROBES: dict[str, ProbeContract] = {
    "gradvar": ProbeContract(GRADIENT_METRICS),
    "gaps": ProbeContract(("iwae", "log_px_exact", "elbo_qstar", "elbo_qphi",
                           "approximation_gap", "amortization_gap", "qstar_steps",
                           "qstar_decays", "qstar_capped", "iwae_ess_min",
                           "iwae_low_ess_points", "ais", "ais_se", "ais_ess_min",
                           "ais_acceptance"), ("gaps", "bdmc")),
    "test_curve": ProbeContract(("test_curve_elbo",)),
    "exact": ProbeContract(("log_px_exact", "approximation_gap", "log_px_mle",
                            "approximation_gap_mle")),
    "activity": ProbeContract(("active_units", "kl_total"), ("activity",)),
    "images": ProbeContract((), ("images",)),
    "latents": ProbeContract((), ("latents",)),
    "variance_sweep": ProbeContract((), ("variance_sweep",)),
    "k_sweep": ProbeContract((), ("k_sweep",)),
    "iwae_bounds": ProbeContract((), ("iwae_bounds",)),
}

#: estimator → the baselines it accepts, learnt from recorded contracts (``adopt``)
ESTIMATORS: dict[str, tuple[str, ...]] = {}

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


class ContractError(ValueError):
    """A declaration that breaks the contract (a clash, a bad name, a missing entry)."""


def _check_name(kind: str, name: object) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise ContractError(f"{kind} name {name!r} must be lower-case letters, digits and "
                            f"underscores, starting with a letter")
    return name


def declare_metric(name: str, description: str) -> None:
    """Declare a metric a row may carry. Declaring a known name again with the same description
    does nothing; with another description it is a ``ContractError``."""
    _check_name("metric", name)
    if not isinstance(description, str) or not description.strip():
        raise ContractError(f"metric {name!r} needs a description (what it measures, units)")
    known = METRICS.get(name)
    if known is not None and known != description:
        raise ContractError(f"metric {name!r} is already declared as {known!r}; a second "
                            f"description {description!r} would make it mean two things")
    METRICS[name] = description


def declare_table(name: str, columns: Iterable[str]) -> None:
    """Declare a per-run table and the columns it must have besides the identity columns (the
    same columns again does nothing; other columns are a ``ContractError``)."""
    _check_name("table", name)
    if isinstance(columns, str):
        raise ContractError(f"table {name!r}: columns must be a list of names, not a string")
    columns = tuple(columns)
    for c in columns:
        if not isinstance(c, str) or not c:
            raise ContractError(f"table {name!r}: column names must be non-empty strings; "
                                f"got {c!r}")
    known = TABLES.get(name)
    if known is not None and known != columns:
        raise ContractError(f"table {name!r} is already declared with columns {known}; "
                            f"not {columns}")
    TABLES[name] = columns


def declare_probe(name: str, metrics: Mapping[str, str] | Iterable[str] = (),
                  tables: Mapping[str, Iterable[str]] | Iterable[str] = ()) -> ProbeContract:
    """Declare what probe ``name`` writes. ``metrics`` and ``tables`` are names already
    declared, or mappings that declare them on the way (``{metric: description}``,
    ``{table: columns}``). Names nobody declared are recorded and refused by ``check_probe``."""
    _check_name("probe", name)
    if isinstance(metrics, str) or isinstance(tables, str):
        raise ContractError(f"probe {name!r}: metrics and tables are collections of names, "
                            f"not a string")
    if isinstance(metrics, Mapping):
        for metric, description in metrics.items():
            declare_metric(metric, description)
    if isinstance(tables, Mapping):
        for table, columns in tables.items():
            declare_table(table, columns)
    entry = ProbeContract(tuple(metrics), tuple(tables))
    PROBES[name] = entry
    return entry


def check_probe(name: str) -> ProbeContract:
    """What probe ``name`` writes, every entry declared; else a ``ContractError`` naming the
    probe and each missing entry."""
    entry = PROBES.get(name)
    if entry is None:
        raise ContractError(f"probe {name!r} is not declared in the results contract "
                            f"(vi.contract.declare_probe); declared: {', '.join(PROBES)}")
    missing = [f"metric {m!r}" for m in entry.metrics if m not in METRICS]
    missing += [f"table {t!r}" for t in entry.tables if t not in TABLES]
    if missing:
        raise ContractError(
            f"probe {name!r} writes {', '.join(missing)}, which the results contract does not "
            f"declare: give each metric a description (metrics = {{name: description}}) and "
            f"each table its columns (tables = {{name: columns}}) in the probe class, or "
            f"declare them with vi.contract.declare_metric / declare_table")
    return entry


def table_columns(name: str) -> tuple[str, ...]:
    """The columns a published per-run table must have: the identity columns, then the
    columns its probe writes (``KeyError`` for an undeclared table)."""
    return (*IDENTITY_COLUMNS, *TABLES[name])


def record(metrics: Iterable[str] = (), tables: Iterable[str] = (),
           estimators: Mapping[str, Iterable[str]] | None = None) -> dict[str, dict]:
    """The declarations of the named metrics and tables, and the baselines of ``estimators``
    (name → the baselines it accepts), as they travel with results (a run's
    ``provenance.json``, an experiment's ``contract.json``)::

        {"metrics": {name: description}, "tables": {name: [columns]},
         "estimators": {name: [baselines]}}

    sorted by name. A metric or table nobody declared is a ``ContractError``."""
    metrics, tables = sorted(set(metrics)), sorted(set(tables))
    missing = [f"metric {m!r}" for m in metrics if m not in METRICS]
    missing += [f"table {t!r}" for t in tables if t not in TABLES]
    if missing:
        raise ContractError(f"{', '.join(missing)} not declared in the results contract")
    return {"metrics": {m: METRICS[m] for m in metrics},
            "tables": {t: list(TABLES[t]) for t in tables},
            "estimators": {e: sorted(set(b)) for e, b in sorted((estimators or {}).items())}}


def adopt(recorded: object, where: str) -> dict[str, dict]:
    """Learn the declarations of a recorded contract (``record``'s output, read back from
    ``where``): each metric, table and estimator this process does not know yet is declared;
    one it knows keeps its own declaration (a description revised since the results were
    written does not make them unreadable). Returns the record; a malformed one (not an
    object, a bad name, an empty description, columns or baselines not a list of names) is a
    ``ContractError`` naming ``where``, and nothing is declared."""
    if not isinstance(recorded, Mapping):
        raise ContractError(f"{where}: the recorded contract is not an object")
    unknown = sorted(str(k) for k in set(recorded) - {"metrics", "tables", "estimators"})
    if unknown:
        raise ContractError(f"{where}: the recorded contract has unknown key(s) {unknown}")
    parts = {k: recorded.get(k, {}) for k in ("metrics", "tables", "estimators")}
    try:
        for kind, entries in parts.items():
            if not isinstance(entries, Mapping):
                raise ContractError(f"its {kind!r} is not an object")
            for name, value in entries.items():
                _check_name(kind[:-1], name)
                if kind == "metrics":
                    if not isinstance(value, str) or not value.strip():
                        raise ContractError(f"metric {name!r} has no description")
                elif (not isinstance(value, list)
                      or not all(isinstance(v, str) and v for v in value)):
                    raise ContractError(f"{kind[:-1]} {name!r}: expected a list of names, "
                                        f"got {value!r}")
    except ContractError as err:
        raise ContractError(f"{where}: the recorded contract is malformed ({err})") from None
    for name, description in parts["metrics"].items():
        METRICS.setdefault(name, description)
    for name, columns in parts["tables"].items():
        TABLES.setdefault(name, tuple(columns))
    for name, baselines in parts["estimators"].items():
        ESTIMATORS.setdefault(name, tuple(baselines))
    return {k: dict(v) for k, v in parts.items()}
