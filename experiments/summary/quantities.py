"""The summary's keys and quantities, and the statistics over seeds: the Student-t interval
and bits per dimension (numpy, pandas, scipy.stats only)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

#: experiments whose runs are not comparable rows (step-size candidates)
EXCLUDED = ("lr_selection",)
#: the keys of a summary cell (``setting`` and ``convergence`` complete a row)
CELL = ["experiment", "dataset", "method", "estimator", "baseline", "estimator_label", "kl",
        "n_mc", "latent_dim", "setting"]
#: configuration columns that never define a setting: identity duplicates and seeds
_NOT_SETTINGS = {"data.name", "method.name", "method.estimator", "method.baseline", "method.kl",
                 "method.n_mc", "model.latent_dim", "data.seed", "data.path"}
_SPLITS = ("train", "test")
_GAP_COLUMNS = {"ais": "log_px_ais", "iwae": "log_px_iwae", "log_px_exact": "log_px_exact",
                "elbo_qstar": "elbo_qstar", "elbo_qphi": "elbo_qphi",
                "approximation_gap": "approximation_gap", "amortization_gap": "amortization_gap"}


@dataclass(frozen=True)
class Quantity:
    """A summary column stem: its split, where its per-run value comes from, its heading."""

    split: str
    source: str
    heading: str
    core: bool = False


def _quantities() -> dict[str, Quantity]:
    q: dict[str, Quantity] = {}
    for s in _SPLITS:
        q[f"{s}_elbo"] = Quantity(s, f"runs.csv final_elbo_{s}", f"{s} ELBO", True)
        q[f"{s}_elbo_bpd"] = Quantity(s, f"runs.csv final_elbo_{s}, bits/dim",
                                      f"{s} ELBO (bits/dim)")
        for stem, head in (("ais", "AIS log p(x)"), ("iwae", "IWAE log p(x)"),
                           ("log_px_exact", "exact log p(x)"),
                           ("elbo_qstar", "L[q*]"), ("elbo_qphi", "L[q_φ]"),
                           ("approximation_gap", "approx. gap"),
                           ("amortization_gap", "amort. gap")):
            q[f"{s}_{stem}"] = Quantity(s, f"gaps.csv {_GAP_COLUMNS[stem]} ({s})",
                                        f"{s} {head}", s == "test" or stem == "amortization_gap")
        q[f"{s}_iwae_bpd"] = Quantity(s, "gaps.csv log_px_iwae, bits/dim",
                                      f"{s} IWAE (bits/dim)")
        q[f"{s}_log_px_mle"] = Quantity(s, f"runs.csv final_log_px_mle_{s}",
                                        f"{s} PPCA-MLE log p(x)")
        q[f"{s}_approximation_gap_mle"] = Quantity(s, f"runs.csv final_approximation_gap_mle_{s}",
                                                   f"{s} PPCA-MLE approx. gap")
        for ref, head in (("no_latent", "no-latent"), ("factor_analysis", "FA"),
                          ("ppca", "PPCA")):
            q[f"{s}_ref_{ref}"] = Quantity(s, f"references.csv {ref} ({s})",
                                           f"{s} {head} log p(x)", ref == "factor_analysis")
        for ref, head in (("no_latent", "no-latent"), ("factor_analysis", "FA")):
            q[f"{s}_ref_{ref}_bpd"] = Quantity(s, f"references.csv {ref} ({s}), bits/dim",
                                               f"{s} {head} (bits/dim)")
        q[f"{s}_elbo_minus_fa"] = Quantity(s, f"runs.csv final_elbo_{s} − references.csv "
                                              f"factor_analysis ({s})", f"{s} ELBO − FA", True)
    q["test_active_units"] = Quantity("test", "runs.csv final_active_units_test",
                                      "active units", True)
    q["test_kl_total"] = Quantity("test", "runs.csv final_kl_total_test", "KL(q‖p)")
    q["test_e_steps"] = Quantity("test", "runs.csv final_e_steps_test", "held-out E-steps")
    q["seconds_per_epoch"] = Quantity("train", "runs.csv seconds_per_epoch", "s / epoch", True)
    q["epochs_run"] = Quantity("train", "runs.csv epochs_run", "epochs")
    return q


#: column stem → (split, source, heading, always present)
QUANTITIES: dict[str, Quantity] = _quantities()


# ------------------------------------------------------------------------------- statistics


@dataclass(frozen=True)
class Interval:
    """Mean, standard deviation (ddof 1), count and 95 % Student-t interval of some values."""

    mean: float
    sd: float
    n: int
    lo: float
    hi: float

    @property
    def defined(self) -> bool:
        """True when the interval exists (n ≥ 2 finite values)."""
        return self.n >= 2 and math.isfinite(self.lo) and math.isfinite(self.hi)


def t_interval(values, level: float = 0.95) -> Interval:
    """Mean ± t_{(1+level)/2, n−1} · sd / √n over the finite ``values`` (NaN bounds if n < 2).

    With seeds as the units this is the usual interval for a mean over independent runs; for
    paired designs pass the per-seed differences."""
    x = np.asarray(pd.to_numeric(pd.Series(values, dtype=object), errors="coerce"), dtype=float)
    x = x[np.isfinite(x)]
    n = int(x.size)
    if n == 0:
        return Interval(math.nan, math.nan, 0, math.nan, math.nan)
    mean = float(x.mean())
    if n < 2:
        return Interval(mean, math.nan, 1, math.nan, math.nan)
    sd = float(x.std(ddof=1))
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
    return Interval(mean, sd, n, mean - half, mean + half)



# The same formula as ``vi.data.bits_per_dim``, kept here because importing ``vi.data`` loads
# torch, which the summary and the findings must not import; the findings use this one (through
# the ``*_bpd`` quantities of ``run_values``), so the experiment layer has one implementation.
def bits_per_dim(nats, data_dim, levels):
    """Bits per dimension of quantized data: −(L − D ln K) / (D ln 2) for a log-density L per
    point in nats, D dimensions and K levels (the dequantization bound); NaN without D or K."""
    nats = np.asarray(nats, dtype=float)
    d = np.asarray(pd.to_numeric(pd.Series(np.atleast_1d(data_dim)), errors="coerce"), float)
    k = np.asarray(pd.to_numeric(pd.Series(np.atleast_1d(levels)), errors="coerce"), float)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = -(nats - d * np.log(k)) / (d * np.log(2.0))
    return out if out.ndim else float(out)

