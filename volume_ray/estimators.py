"""From radii (and curvature) to log-volumes: pure functions of arrays (no torch, no Ray).

Every estimator estimates one number, the paper's log E_u[r(u)^n] over unit directions
u, n being the number of perturbed parameters, with no unit-ball constant (DESIGN §7):

- `paper`: log mean(r^n) over the crossing directions. At large n it is
  n*ln(r_max) - ln K, decided by one direction, so each estimate carries the effective
  sample size `ess` of its weights r^n and the largest normalised weight `top_share`;
  its bootstrap interval is printed only when ess >= MIN_ESS, since a percentile
  bootstrap cannot see above the sample maximum where E[r^n] lives.
- `censored_lower_bound`: as `paper`, censored directions at their search cap.
- `typical`: n*mean(ln r), the log-volume of the ball of geometric-mean radius. By
  Jensen a lower bound on the paper's quantity, but it converges as 1/sqrt(K).
- `laplace`: (n/2)*ln(2*dL) - 1/2*log_det(H, floor), exact for a quadratic basin of
  Hessian H (in the radii's coordinates) and dL = T - L*. Eigenvalues below the floor
  2*dL/R^2 (R the radius cap) count as reaching the cap.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import pandas as pd
from scipy import stats
from scipy.special import logsumexp

__all__ = [
    "DEFAULT_ESTIMATORS",
    "ESTIMATORS",
    "MIN_ESS",
    "VOLUME_COLUMNS",
    "EstimateResult",
    "bootstrap_log_volume",
    "laplace_estimate",
    "laplace_floor",
    "laplace_from_curvature",
    "log_volume",
    "log_volume_by_count",
    "paper_estimate",
    "radius_summary",
    "typical_estimate",
    "volume_table",
    "weight_diagnostics",
]

RADII_ESTIMATORS = ("paper", "censored_lower_bound", "typical")
ESTIMATORS = (*RADII_ESTIMATORS, "laplace", "thermodynamic")
DEFAULT_ESTIMATORS = ("paper", "typical")
MIN_ESS = 10  # below this many effective directions a resampling interval means nothing
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
    "ess",
    "top_share",
    "ci_valid",
    "floor",
]


@dataclass(frozen=True)
class EstimateResult:
    """A log-volume with its standard error and interval. `ess` is how many directions
    effectively carry it and `top_share` the largest one's share (NaN where directions
    do not weigh in); `ci_valid` is False, and the interval NaN, when no interval can
    be trusted."""

    estimate: float
    stderr: float
    ci_low: float
    ci_high: float
    ess: float = math.nan
    top_share: float = math.nan
    ci_valid: bool = True


class SpectrumLike(Protocol):
    """What `laplace` needs of a `volume_ray.curvature.Curvature`."""

    base_loss: float
    n_params: int

    def log_det_samples(self, floor: float) -> np.ndarray: ...

    def log_det_error(self, floor: float) -> float: ...


NO_ESTIMATE = EstimateResult(math.nan, math.nan, math.nan, math.nan, ci_valid=False)


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


def _check_confidence(confidence: float) -> None:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence!r}")


def _log_weights(values: np.ndarray, n_params: int) -> np.ndarray:
    with np.errstate(divide="ignore"):  # log 0 = -inf: a zero radius weighs nothing
        return n_params * np.log(values)


def _log_mean_power(values: np.ndarray, n_params: int, axis: int = -1) -> np.ndarray:
    """log mean(values**n) along `axis`, by log-sum-exp."""
    return logsumexp(_log_weights(values, n_params), axis=axis) - math.log(values.shape[axis])


def weight_diagnostics(radii: Sequence[float] | np.ndarray, n_params: int) -> tuple[float, float]:
    """(ess, top_share) of the weights w = r^n of the finite radii: the effective sample
    size (sum w)^2 / sum w^2, and max w / sum w. NaN when every weight is zero."""
    _check_n_params(n_params)
    logs = _log_weights(_radii(radii), n_params)
    if len(logs) == 0 or np.all(np.isneginf(logs)):
        return math.nan, math.nan
    total = logsumexp(logs)
    return float(np.exp(2 * total - logsumexp(2 * logs))), float(np.exp(logs.max() - total))


def _t_interval(mean: float, stderr: float, dof: int, confidence: float) -> tuple[float, float]:
    half = stats.t.ppf((1 + confidence) / 2, dof) * stderr
    return mean - half, mean + half


def log_volume(
    radii: Sequence[float] | np.ndarray,
    n_params: int,
    estimator: str = "paper",
    *,
    censored_radii: Sequence[float] | np.ndarray = (),
) -> float:
    """The log-volume of a minimum from its radii (see the module docstring).

    NaN radii (censored) are dropped, as the paper drops directions that never cross;
    `censored_lower_bound` and `typical` count censored directions at the radius where
    their search stopped (`censored_radii`): they crossed no earlier.
    """
    _check_n_params(n_params)
    if estimator not in RADII_ESTIMATORS:
        raise ValueError(
            f"estimator must be one of {RADII_ESTIMATORS}, got {estimator!r} (laplace comes "
            "from curvature: use laplace_estimate)"
        )
    values = _radii(radii)
    if estimator != "paper":
        values = np.concatenate([values, _radii(censored_radii, "censored_radii")])
    if len(values) == 0:
        raise ValueError("no radii to estimate from: every direction was censored or NaN")
    if estimator == "typical":
        return typical_estimate(values, n_params).estimate
    return float(_log_mean_power(values, n_params))


def bootstrap_log_volume(
    radii: Sequence[float] | np.ndarray,
    n_params: int,
    *,
    num_resamples: int = DEFAULT_RESAMPLES,
    confidence: float = DEFAULT_CONFIDENCE,
    rng: np.random.Generator | int | None = 0,
) -> EstimateResult:
    """The paper estimate with a percentile bootstrap interval over directions, whatever
    its ess (`paper_estimate` withholds the interval when it cannot be trusted)."""
    _check_n_params(n_params)
    _check_confidence(confidence)
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
    ess, top_share = weight_diagnostics(values, n_params)
    return EstimateResult(
        estimate=float(_log_mean_power(values, n_params)),
        stderr=float(np.std(finite, ddof=1)) if len(finite) > 1 else math.nan,
        ci_low=float(low),
        ci_high=float(high),
        ess=ess,
        top_share=top_share,
    )


def paper_estimate(
    radii: Sequence[float] | np.ndarray,
    n_params: int,
    *,
    num_resamples: int = DEFAULT_RESAMPLES,
    confidence: float = DEFAULT_CONFIDENCE,
    rng: np.random.Generator | int | None = 0,
) -> EstimateResult:
    """log mean(r^n) with its diagnostics; the bootstrap interval only when ess >= MIN_ESS
    (otherwise NaN, and `ci_valid` False)."""
    result = bootstrap_log_volume(
        radii, n_params, num_resamples=num_resamples, confidence=confidence, rng=rng
    )
    if result.ess >= MIN_ESS:
        return result
    return EstimateResult(
        result.estimate, math.nan, math.nan, math.nan, result.ess, result.top_share, False
    )


def typical_estimate(
    radii: Sequence[float] | np.ndarray,
    n_params: int,
    *,
    confidence: float = DEFAULT_CONFIDENCE,
) -> EstimateResult:
    """n * mean(ln r) with a Student-t interval on ln r, times n. Censored directions
    belong in `radii` at their cap. Every direction weighs alike: ess = K."""
    _check_n_params(n_params)
    _check_confidence(confidence)
    values = _radii(radii)
    count = len(values)
    if count == 0:
        raise ValueError("no radii to estimate from: every direction was NaN")
    with np.errstate(divide="ignore"):
        logs = np.log(values)
    estimate = float(n_params * logs.mean())
    if count < 2 or not np.isfinite(estimate):  # a zero radius: the volume is zero
        return EstimateResult(estimate, math.nan, math.nan, math.nan, count, 1 / count, False)
    stderr = float(n_params * logs.std(ddof=1) / math.sqrt(count))
    low, high = _t_interval(estimate, stderr, count - 1, confidence)
    return EstimateResult(estimate, stderr, low, high, float(count), 1 / count)


def laplace_floor(delta_loss: float, radius_cap: float) -> float:
    """2*dL/R^2: along an eigendirection flatter than this, the quadratic radius
    sqrt(2*dL/lambda) lies past the search cap R."""
    if not delta_loss > 0:
        raise ValueError(f"delta_loss must be > 0, got {delta_loss!r}")
    if not (radius_cap > 0 and math.isfinite(radius_cap)):
        raise ValueError(f"radius_cap must be a finite number > 0, got {radius_cap!r}")
    return 2 * delta_loss / radius_cap**2


def laplace_estimate(
    log_det_samples: Sequence[float] | np.ndarray,
    n_params: int,
    delta_loss: float,
    *,
    log_det_error: float = 0.0,
    confidence: float = DEFAULT_CONFIDENCE,
) -> EstimateResult:
    """(n/2)*ln(2*dL) - 1/2*log_det from per-probe SLQ estimates of log_det (their mean
    is the estimate). The interval is Student t over the probes' spread, widened by half
    `log_det_error`, the quadrature's systematic error bound (`Curvature.log_det_error`),
    which no spread over probes shows."""
    _check_n_params(n_params)
    _check_confidence(confidence)
    if not delta_loss > 0:
        raise ValueError(
            f"delta_loss (threshold - base loss) must be > 0, got {delta_loss!r}: the "
            "threshold is at or below the loss at the minimum; raise it"
        )
    samples = np.asarray(log_det_samples, dtype=np.float64).reshape(-1)
    if len(samples) == 0 or not np.isfinite(samples).all():
        raise ValueError("log_det_samples must be a non-empty sequence of finite numbers")
    if not (log_det_error >= 0 and math.isfinite(log_det_error)):
        raise ValueError(f"log_det_error must be a finite number >= 0, got {log_det_error!r}")
    estimate = float(0.5 * n_params * math.log(2 * delta_loss) - 0.5 * samples.mean())
    if len(samples) < 2:
        return EstimateResult(estimate, math.nan, math.nan, math.nan, ci_valid=False)
    stderr = float(0.5 * samples.std(ddof=1) / math.sqrt(len(samples)))
    low, high = _t_interval(estimate, stderr, len(samples) - 1, confidence)
    return EstimateResult(estimate, stderr, low - log_det_error / 2, high + log_det_error / 2)


def laplace_from_curvature(
    curvature: SpectrumLike,
    threshold: float,
    max_coefficient: float,
    *,
    confidence: float = DEFAULT_CONFIDENCE,
) -> tuple[EstimateResult, float]:
    """(laplace estimate, floor) at loss threshold T from a landscape's spectrum. The
    floor is 2*dL/R^2 with R = max_coefficient * sqrt(n), the cap of a typical direction
    (|g| ~ sqrt(n)); the interval owns the quadrature's error. T at or below the loss at
    the minimum gives no estimate (NaN, floor NaN)."""
    delta = threshold - curvature.base_loss
    if not delta > 0:
        return NO_ESTIMATE, math.nan
    n = curvature.n_params
    floor = laplace_floor(delta, max_coefficient * math.sqrt(n))
    result = laplace_estimate(
        curvature.log_det_samples(floor), n, delta,
        log_det_error=curvature.log_det_error(floor), confidence=confidence,
    )  # fmt: skip
    return result, floor


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
    estimators: Sequence[str] = DEFAULT_ESTIMATORS,
    curvature: SpectrumLike | None = None,
    thermodynamic: Mapping[float, EstimateResult] | None = None,
    max_coefficient: float = 1.0,
    num_resamples: int = DEFAULT_RESAMPLES,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = 0,
) -> pd.DataFrame:
    """One row per (metric, threshold, estimator) of a `measure_radii` table.

    `laplace` needs the landscape's `curvature` and a loss metric (see
    `laplace_from_curvature`); `thermodynamic` takes its estimates per threshold from
    the ladders (`thermodynamic_log_volume`; a threshold without one gets NaN).
    """
    unknown = [e for e in estimators if e not in ESTIMATORS]
    if unknown or not estimators:
        raise ValueError(f"estimators must be a non-empty subset of {ESTIMATORS}, got {unknown}")
    if "laplace" in estimators and curvature is None:
        raise ValueError("the laplace estimator needs the landscape's curvature; pass curvature")
    if "thermodynamic" in estimators and thermodynamic is None:
        raise ValueError(
            "the thermodynamic estimator needs the ladders' estimates; pass thermodynamic"
        )
    rows = []
    for (metric, threshold), group in radii.groupby(["metric", "threshold"], sort=True):
        crossed = group.loc[~group.censored, "radius"].to_numpy()
        censored = group.loc[group.censored]
        with_caps = np.concatenate([crossed, (censored.coefficient * censored.raw_norm)])
        common = {
            "metric": metric,
            "threshold": threshold,
            "n_directions": len(group),
            "n_censored": len(censored),
            "n_params": n_params,
            **radius_summary(crossed),
        }
        for estimator in estimators:
            floor = math.nan
            if estimator in ("laplace", "thermodynamic") and metric != "loss":
                raise ValueError(f"the {estimator} estimator needs metric 'loss'")
            if estimator == "thermodynamic":
                result = thermodynamic.get(threshold, NO_ESTIMATE)
            elif estimator == "laplace":
                result, floor = laplace_from_curvature(
                    curvature, threshold, max_coefficient, confidence=confidence
                )
            else:
                values = crossed if estimator == "paper" else with_caps
                if len(_radii(values)) == 0:
                    result = NO_ESTIMATE
                elif estimator == "typical":
                    result = typical_estimate(values, n_params, confidence=confidence)
                else:
                    result = paper_estimate(
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
                    "ess": result.ess,
                    "top_share": result.top_share,
                    "ci_valid": result.ci_valid,
                    "floor": floor,
                }
            )
    return pd.DataFrame.from_records(rows, columns=VOLUME_COLUMNS)
