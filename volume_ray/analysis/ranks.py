"""Do volume ranks follow generalisation? Inversions, correlation, stability."""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.stats import spearmanr

from volume_ray.analysis.trends import with_variant
from volume_ray.estimators import log_volume

__all__ = [
    "adjacent_inversions",
    "own_minimum_is_largest",
    "ranking_stability",
    "volume_accuracy_spearman",
]


def adjacent_inversions(log_volumes: np.ndarray, test_losses: np.ndarray) -> int:
    """Order minima by log-volume, largest first; count neighbours whose test losses
    are out of order (the larger-volume one generalising worse)."""
    order = np.argsort(-np.asarray(log_volumes, dtype=np.float64), kind="stable")
    losses = np.asarray(test_losses, dtype=np.float64)[order]
    return int(np.sum(losses[:-1] > losses[1:]))


def volume_accuracy_spearman(log_volumes: np.ndarray, test_accuracies: np.ndarray) -> float:
    """Spearman rank correlation of log-volume with test accuracy over the finite
    pairs (NaN when either is constant, as with one minimum per landscape)."""
    return _spearman(log_volumes, test_accuracies)


def _spearman(a, b) -> float:
    """Spearman correlation over the finite pairs; NaN when either side is constant."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    finite = np.isfinite(a) & np.isfinite(b)
    a, b = a[finite], b[finite]
    if len(a) < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(spearmanr(a, b).statistic)


def own_minimum_is_largest(volumes: pd.DataFrame, models: pd.DataFrame) -> pd.DataFrame:
    """Per landscape (and metric, threshold, estimator): is the volume of the minimum
    trained on exactly that landscape the largest there? Seeds are averaged."""
    table = volumes.merge(
        with_variant(models)[["model_id", "train_size", "variant"]], on="model_id"
    )
    keys = ["landscape_size", "variant", "metric", "threshold", "estimator"]
    rows = []
    for key, group in table.groupby(keys, sort=True):
        mean = group.groupby("train_size").log_volume.mean()
        landscape = key[0]
        if landscape in mean.index and mean.notna().any():
            rows.append({**dict(zip(keys, key)), "largest_train_size": int(mean.idxmax()),
                         "own_is_largest": bool(mean.idxmax() == landscape)})  # fmt: skip
    return pd.DataFrame(rows)


def ranking_stability(
    radii_by_model: dict[str, np.ndarray], n_params: dict[str, int], counts: list[int],
    *, subsets: int = 200, seed: int = 0,
) -> pd.DataFrame:  # fmt: skip
    """For each K in `counts`: over random K-subsets of directions (the same subset for
    every model: common random numbers), how often the ranking of the minima equals
    the ranking from all directions (`stable_fraction`), and the mean Spearman
    correlation of the two rankings (`rank_correlation`)."""
    names = sorted(radii_by_model)
    full = [log_volume(radii_by_model[m], n_params[m]) for m in names]
    reference = np.argsort(full)
    directions = min(len(radii_by_model[m]) for m in names)
    generator = np.random.default_rng(seed)
    rows = []
    for k in counts:
        if not 1 <= k <= directions:
            raise ValueError(f"counts must lie in [1, {directions}], got {k}")
        same, correlation = 0, 0.0
        for _ in range(subsets):
            pick = generator.choice(directions, size=k, replace=False)
            estimates = []
            for m in names:
                chosen = np.asarray(radii_by_model[m])[pick]
                finite = chosen[np.isfinite(chosen)]
                estimates.append(log_volume(finite, n_params[m]) if len(finite) else -np.inf)
            same += bool(np.array_equal(np.argsort(estimates), reference))
            correlation += _spearman(estimates, full)
        rows.append({"directions": k, "stable_fraction": same / subsets,
                     "rank_correlation": correlation / subsets})  # fmt: skip
    return pd.DataFrame(rows)
