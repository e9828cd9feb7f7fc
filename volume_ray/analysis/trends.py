"""Scaling trends: how log-volume moves with the training-set or landscape size.

A power law V ~ size^a is a straight line log V = a log(size) + b, so the fit is a
least-squares line of log-volume against log size; its slope a is the exponent. The
interval comes from a bootstrap over the fitted points (seeds, for a sweep).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

__all__ = ["PowerLaw", "fit_power_law", "scaling_table", "with_variant"]


def with_variant(models: pd.DataFrame) -> pd.DataFrame:
    """`models` with a `variant` column: what sets minima apart besides the data size and
    the seed (optimizer with SAM, batch size, a kept epoch). Trends, ranks and figures
    compare like with like: within one variant."""
    kept = models.model_id.str.extract(r"-e(\d+)$")[0]
    label = (
        models.optimizer
        + " b"
        + models.batch_size.astype(str).where(models.batch_size != models.train_size, "full")
    )
    return models.assign(variant=label + ("@e" + kept).fillna(""))


@dataclass(frozen=True)
class PowerLaw:
    """log V = exponent * log(size) + intercept, with a bootstrap interval."""

    exponent: float
    intercept: float
    ci_low: float
    ci_high: float
    points: int


def fit_power_law(
    sizes: np.ndarray, log_volumes: np.ndarray, *, resamples: int = 1000, seed: int = 0
) -> PowerLaw:
    """Least-squares exponent of log-volume against log size, with a 95% percentile
    bootstrap interval over the points."""
    x = np.log(np.asarray(sizes, dtype=np.float64))
    v = np.asarray(log_volumes, dtype=np.float64)
    keep = np.isfinite(x) & np.isfinite(v)
    x, v = x[keep], v[keep]
    if len(np.unique(x)) < 2:
        raise ValueError("a power-law fit needs finite volumes at two sizes or more")
    slope, intercept = np.polyfit(x, v, 1)
    generator = np.random.default_rng(seed)
    slopes = []
    for _ in range(resamples):
        pick = generator.integers(0, len(x), len(x))
        if len(np.unique(x[pick])) >= 2:
            slopes.append(np.polyfit(x[pick], v[pick], 1)[0])
    low, high = np.quantile(slopes, [0.025, 0.975])
    return PowerLaw(float(slope), float(intercept), float(low), float(high), len(x))


def scaling_table(
    volumes: pd.DataFrame, models: pd.DataFrame, *, against: str = "train_size",
    per_dimension: bool = False, seed: int = 0,
) -> pd.DataFrame:  # fmt: skip
    """One power-law fit per fixed landscape (`against="train_size"`, the paper's
    Fig. 4 top) or per minimum (`against="landscape_size"`, Fig. 4 bottom), for each
    metric, threshold and estimator. `per_dimension` divides log-volumes by the
    number of parameters, so models of different sizes compare."""
    if against not in ("train_size", "landscape_size"):
        raise ValueError(f"against must be 'train_size' or 'landscape_size', got {against!r}")
    table = volumes.merge(
        with_variant(models)[["model_id", "train_size", "variant"]], on="model_id"
    )
    if per_dimension:
        table = table.assign(log_volume=table.log_volume / table.n_params)
    fixed = ["landscape_size", "variant"] if against == "train_size" else ["model_id"]
    rows = []
    keys = [*fixed, "metric", "threshold", "estimator"]
    for key, group in table.groupby(keys, sort=True):
        group = group[np.isfinite(group.log_volume)]
        if group[against].nunique() < 2:  # nothing to fit a slope through
            continue
        fit = fit_power_law(group[against], group.log_volume, seed=seed)
        rows.append({**dict(zip(keys, key)), "exponent": fit.exponent, "ci_low": fit.ci_low,
                     "ci_high": fit.ci_high, "points": fit.points})  # fmt: skip
    return pd.DataFrame(rows)
