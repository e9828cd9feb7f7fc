"""From radii to log-volumes: pure functions of arrays (no torch, no Ray, no I/O).

The paper's estimate of a minimum's volume is log mean(r^n) over the directions that
crossed, n being the number of perturbed parameters, with no unit-ball constant. At
large n it is n*ln(r_max) - ln K: one extreme direction decides it, which is why the
intervals and the estimate-against-K curve below matter.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.special import logsumexp

__all__ = [
    "ESTIMATORS",
    "VOLUME_COLUMNS",
    "EstimateResult",
    "bootstrap_log_volume",
    "log_volume",
    "log_volume_by_count",
    "radius_summary",
    "volume_table",
]

ESTIMATORS = ("paper", "censored_lower_bound")
DEFAULT_RESAMPLES = 1000
DEFAULT_CONFIDENCE = 0.95
VOLUME_COLUMNS = [
    "metric",
    "threshold",
    "estimator",
    "log_volume",
    "ci_low",
    "ci_high",
    "n_directions",
    "n_censored",
    "n_params",
    "mean_radius",
    "median_radius",
    "max_radius",
]


@dataclass(frozen=True)
class EstimateResult:
    """A log-volume with its bootstrap standard error and percentile interval."""

    estimate: float
    stderr: float
    ci_low: float
    ci_high: float


def _radii(radii: Sequence[float] | np.ndarray, name: str = "radii") -> np.ndarray:
    """The finite radii as float64; NaN (a censored or missing direction) dropped."""
    values = np.asarray(radii, dtype=np.float64).reshape(-1)
    values = values[~np.isnan(values)]
    if np.any(values < 0) or np.any(np.isinf(values)):
        raise ValueError(f"{name} must be >= 0 and finite (NaN marks a dropped direction)")
    return values


def _check_n_params(n_params: int) -> None:
    if isinstance(n_params, bool) or not isinstance(n_params, numbers.Integral) or n_params < 1:
        raise ValueError(f"n_params must be an integer >= 1, got {n_params!r}")


def _log_mean_power(values: np.ndarray, n_params: int, axis: int = -1) -> np.ndarray:
    """log mean(values**n) along `axis`, by log-sum-exp (log 0 = -inf is fine)."""
    with np.errstate(divide="ignore"):
        logs = n_params * np.log(values)
    return logsumexp(logs, axis=axis) - math.log(values.shape[axis])


def log_volume(
    radii: Sequence[float] | np.ndarray,
    n_params: int,
    estimator: str = "paper",
    *,
    censored_radii: Sequence[float] | np.ndarray = (),
) -> float:
    """log mean(r^n) of a minimum.

    - `paper`: over the crossing directions only; NaN radii (censored) are dropped,
      as the paper drops directions that never cross.
    - `censored_lower_bound`: censored directions count at the radius where their
      search stopped (`censored_radii`); they crossed no earlier, so this bounds the
      all-directions mean from below.
    """
    _check_n_params(n_params)
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    values = _radii(radii)
    if estimator == "censored_lower_bound":
        values = np.concatenate([values, _radii(censored_radii, "censored_radii")])
    if len(values) == 0:
        raise ValueError("no radii to estimate from: every direction was censored or NaN")
    return float(_log_mean_power(values, n_params))


def bootstrap_log_volume(
    radii: Sequence[float] | np.ndarray,
    n_params: int,
    *,
    num_resamples: int = DEFAULT_RESAMPLES,
    confidence: float = DEFAULT_CONFIDENCE,
    rng: np.random.Generator | int | None = 0,
) -> EstimateResult:
    """The paper estimate with a percentile bootstrap interval over directions."""
    _check_n_params(n_params)
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence!r}")
    if num_resamples < 1:
        raise ValueError(f"num_resamples must be >= 1, got {num_resamples!r}")
    values = _radii(radii)
    if len(values) == 0:
        raise ValueError("no radii to estimate from: every direction was censored or NaN")
    generator = np.random.default_rng(rng)
    picks = generator.integers(0, len(values), size=(num_resamples, len(values)))
    resampled = _log_mean_power(values[picks], n_params, axis=1)  # (num_resamples,)
    finite = resampled[np.isfinite(resampled)]  # a resample of zero radii only is -inf
    tail = (1 - confidence) / 2
    # inverted_cdf picks order statistics without interpolating, so -inf is safe
    low, high = np.quantile(resampled, [tail, 1 - tail], method="inverted_cdf")
    return EstimateResult(
        estimate=float(_log_mean_power(values, n_params)),
        stderr=float(np.std(finite, ddof=1)) if len(finite) > 1 else math.nan,
        ci_low=float(low),
        ci_high=float(high),
    )


def log_volume_by_count(
    radii: Sequence[float] | np.ndarray, n_params: int, counts: Sequence[int]
) -> np.ndarray:
    """The paper estimate from the first K directions, for each K in `counts`
    (NaN where those K directions hold no crossing)."""
    _check_n_params(n_params)
    ordered = np.asarray(radii, dtype=np.float64).reshape(-1)
    estimates = []
    for k in counts:
        if not 1 <= k <= len(ordered):
            raise ValueError(f"counts must lie in [1, {len(ordered)}], got {k}")
        values = _radii(ordered[:k])
        estimates.append(_log_mean_power(values, n_params) if len(values) else math.nan)
    return np.asarray(estimates, dtype=np.float64)


def radius_summary(radii: Sequence[float] | np.ndarray) -> dict[str, float]:
    """Mean, median and max of the finite radii (NaN when there are none)."""
    values = _radii(radii)
    if len(values) == 0:
        return {"mean_radius": math.nan, "median_radius": math.nan, "max_radius": math.nan}
    return {
        "mean_radius": float(values.mean()),
        "median_radius": float(np.median(values)),
        "max_radius": float(values.max()),
    }


def volume_table(
    radii: pd.DataFrame,
    n_params: int,
    *,
    num_resamples: int = DEFAULT_RESAMPLES,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = 0,
) -> pd.DataFrame:
    """Every estimator for each (metric, threshold) of a `measure_radii` table."""
    rows = []
    for (metric, threshold), group in radii.groupby(["metric", "threshold"], sort=True):
        crossed = group.loc[~group.censored, "radius"].to_numpy()
        censored = group.loc[group.censored]
        bounds = (censored.coefficient * censored.raw_norm).to_numpy()
        common = {
            "metric": metric,
            "threshold": threshold,
            "n_directions": len(group),
            "n_censored": len(censored),
            "n_params": n_params,
            **radius_summary(crossed),
        }
        for estimator, values in (
            ("paper", crossed),
            ("censored_lower_bound", np.concatenate([crossed, bounds])),
        ):
            if len(_radii(values)) == 0:
                result = EstimateResult(math.nan, math.nan, math.nan, math.nan)
            else:
                result = bootstrap_log_volume(
                    values, n_params, num_resamples=num_resamples, confidence=confidence,
                    rng=seed,
                )  # fmt: skip
            rows.append(
                {
                    **common,
                    "estimator": estimator,
                    "log_volume": result.estimate,
                    "ci_low": result.ci_low,
                    "ci_high": result.ci_high,
                }
            )
    return pd.DataFrame.from_records(rows, columns=VOLUME_COLUMNS)
