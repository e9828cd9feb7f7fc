"""`measure_radii`: threshold radii along seeded random directions (DESIGN §5).

This module checks the arguments in one place, then glues the core together:
directions from `directions`, scoring from `landscape`, one search per direction from
`search`. Directions are processed in blocks; within a block, every direction's next
proposal is scored in one call, so a device can batch them.
"""

from __future__ import annotations

import copy
import math
import numbers
import warnings
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from volume_ray.directions import FILTER_NORMS, FilterNorm, perturbed_parameters, raw_directions
from volume_ray.landscape import METRICS, Landscape
from volume_ray.search import DEFAULT_RTOL, BracketSearch, GridSearch, Hint, paper_grid

__all__ = ["SEARCHES", "RADII_COLUMNS", "measure_radii"]

SEARCHES = ("bisect", "grid")
RADII_COLUMNS = [
    "direction",
    "seed",
    "threshold",
    "metric",
    "coefficient",
    "radius",
    "radius_euclid",
    "raw_norm",
    "censored",
    "evals",
    "data_passes",
    "nonfinite",
]
BLOCK_FLOATS = 2**24  # directions held at once: about this many scalars (64 MiB in fp32)
CUDA_POINTS_PER_PASS = 16  # default batch of weight sets per forward pass on a GPU


def measure_radii(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    *,
    num_directions: int,
    seed: int = 1,
    metric: str = "loss",
    thresholds: Sequence[float] = (0.1,),
    filter_norm: str = "paper",
    search: str = "bisect",
    coefficients: Sequence[float] | None = None,
    rtol: float = DEFAULT_RTOL,
    max_coefficient: float = 1.0,
    batch_size: int | None = None,
    device: str | torch.device | None = None,
    start: int = 0,
    full_curve: bool = False,
    points_per_pass: int | None = None,
) -> pd.DataFrame:
    """Walk from the trained weights along directions `start .. start+num_directions-1`
    until the metric on (x, y) first passes each threshold.

    - `metric="loss"` crosses when the mean `loss_fn` exceeds T; `"accuracy"` when the
      accuracy falls below A. `loss_fn(outputs, targets)` returns a batch mean of
      non-negative per-sample terms, as `torch.nn.functional.cross_entropy` does.
    - `search="bisect"` refines the first crossing to `rtol` within
      [0, max_coefficient]; `search="grid"` takes the first of `coefficients`
      (default: the paper's linspace(0,1,100)**2, times `max_coefficient`) past the
      threshold, and `full_curve=True` keeps the metric at every grid point in a
      `curve` column.
    - `radius` is coefficient * |g| with g the raw Gaussian, `radius_euclid` is
      coefficient * |d|. Censored walks (no crossing) have NaN radii and carry the
      search bound in `coefficient`. A base already past T gives radius 0 and a
      warning; `nonfinite` flags radii set by a NaN or inf metric.
    - `batch_size` chunks the data; `device` picks where the work runs (the model is
      copied there if it lives elsewhere); `points_per_pass` weight sets share a
      forward pass (default 1 on CPU, where batching does not pay).

    The model is left as it was: its weights are never written.
    """
    grid = _check_arguments(
        model, x, y, loss_fn, num_directions, seed, metric, thresholds, filter_norm,
        search, coefficients, rtol, max_coefficient, batch_size, start, full_curve,
        points_per_pass,
    )  # fmt: skip
    device = torch.device(device) if device is not None else next(model.parameters()).device
    if next(model.parameters()).device != device:
        model = copy.deepcopy(model).to(device)
    if points_per_pass is None:
        points_per_pass = CUDA_POINTS_PER_PASS if device.type == "cuda" else 1
    was_training = model.training
    model.eval()
    try:
        params = perturbed_parameters(model)
        landscape = Landscape(
            model, params, x.to(device), y.to(device), loss_fn,
            metric=metric, batch_size=batch_size, points_per_pass=points_per_pass,
        )  # fmt: skip
        levels = _levels(metric, thresholds, landscape.size)
        _warn_if_base_is_past(metric, thresholds, levels, landscape.base_total)

        to_norm = FilterNorm(params, filter_norm)

        def new_search(hints: list[Hint | None] | None = None) -> BracketSearch | GridSearch:
            if search == "grid":
                return GridSearch(levels, landscape.base_total, grid, full_curve=full_curve)
            return BracketSearch(
                levels, landscape.base_total, rtol=rtol, max_coefficient=max_coefficient,
                interpolate=metric == "loss", hints=hints,
            )  # fmt: skip

        hints = None
        if search == "bisect":  # direction 0 guides every shard alike
            pilot = new_search()
            _run_searches([pilot], landscape, params.flat, to_norm(_raw(params, seed, [0], device)))
            hints = pilot.hints()
        per_block = max(1, min(num_directions, BLOCK_FLOATS // params.count))
        frames = []
        for first in range(start, start + num_directions, per_block):
            indices = list(range(first, min(first + per_block, start + num_directions)))
            raw = _raw(params, seed, indices, device)  # (B, n)
            directions = to_norm(raw)  # (B, n)
            searches = [new_search(hints) for _ in indices]
            evals, samples = _run_searches(searches, landscape, params.flat, directions)
            frames.append(
                _rows(
                    indices, seed, thresholds, metric, searches, evals,
                    samples / landscape.size,
                    raw.double().norm(dim=1).cpu().numpy(),
                    directions.double().norm(dim=1).cpu().numpy(),
                    landscape,
                )
            )  # fmt: skip
    finally:
        model.train(was_training)
    return pd.concat(frames, ignore_index=True)


def _raw(params, seed: int, indices: list[int], device: torch.device) -> torch.Tensor:
    return raw_directions(params, seed, indices).to(device)


def _run_searches(
    searches: list[BracketSearch | GridSearch],
    landscape: Landscape,
    origin: torch.Tensor,
    directions: torch.Tensor,
) -> tuple[np.ndarray, np.ndarray]:
    """Drive every search to its end; return evaluations and samples scored per search."""
    evals = np.zeros(len(searches), dtype=np.int64)
    samples = np.zeros(len(searches), dtype=np.int64)
    while True:
        asks = [(j, s.propose()) for j, s in enumerate(searches)]
        asks = [(j, p) for j, p in asks if p is not None]
        if not asks:
            return evals, samples
        scores = landscape.score(
            origin,
            directions,
            [j for j, _ in asks],
            [p.coefficient for _, p in asks],
            np.array([p.stop_above for _, p in asks]),
            np.array([p.stop_below for _, p in asks]),
        )
        for k, (j, proposal) in enumerate(asks):
            searches[j].record(proposal.coefficient, scores.lower[k], scores.upper[k])
            evals[j] += 1
            samples[j] += scores.samples[k]


def _levels(metric: str, thresholds: Sequence[float], size: int) -> list[float]:
    """Thresholds in the landscape's units: a summed loss, or a number of errors."""
    if metric == "loss":
        return [t * size for t in thresholds]
    return [size - a * size for a in thresholds]  # accuracy < A  <=>  errors > N - A*N


def _warn_if_base_is_past(
    metric: str, thresholds: Sequence[float], levels: list[float], base: float
) -> None:
    past = [t for t, level in zip(thresholds, levels) if not base <= level]
    if past:
        warnings.warn(
            f"the {metric} at the trained weights is already past thresholds {past}: "
            "their radii are 0. Train the model further or raise the threshold.",
            RuntimeWarning,
            stacklevel=3,
        )


def _rows(
    indices, seed, thresholds, metric, searches, evals, passes, raw_norms, dir_norms, landscape
) -> pd.DataFrame:
    records = []
    for j, (index, s) in enumerate(zip(indices, searches)):
        curve = None
        if isinstance(s, GridSearch) and s.full_curve:
            curve = _metric_values(metric, np.asarray(s.curve), landscape.size)
        for threshold, crossing in zip(thresholds, s.crossings()):
            c = crossing.coefficient
            record = {
                "direction": index,
                "seed": seed,
                "threshold": float(threshold),
                "metric": metric,
                "coefficient": c,
                "radius": math.nan if crossing.censored else c * raw_norms[j],
                "radius_euclid": math.nan if crossing.censored else c * dir_norms[j],
                "raw_norm": raw_norms[j],
                "censored": crossing.censored,
                "evals": int(evals[j]),
                "data_passes": float(passes[j]),
                "nonfinite": crossing.nonfinite,
            }
            if curve is not None:
                record["curve"] = curve
            records.append(record)
    return pd.DataFrame.from_records(records)


def _metric_values(metric: str, totals: np.ndarray, size: int) -> np.ndarray:
    """Summed metric back to the user's units: mean loss, or accuracy."""
    return totals / size if metric == "loss" else 1.0 - totals / size


def _check_arguments(
    model, x, y, loss_fn, num_directions, seed, metric, thresholds, filter_norm, search,
    coefficients, rtol, max_coefficient, batch_size, start, full_curve, points_per_pass,
) -> np.ndarray | None:  # fmt: skip
    """Every argument rule of `measure_radii`, checked before any work; returns the
    coefficient grid of a grid search (None for bisect)."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    perturbed_parameters(model)  # raises when there is nothing to perturb
    for name, tensor in (("x", x), ("y", y)):
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if len(x) == 0 or len(x) != len(y):
        raise ValueError(
            f"x and y must hold the same positive number of samples, got len(x)={len(x)} "
            f"and len(y)={len(y)}"
        )
    if not callable(loss_fn):
        raise ValueError("loss_fn must be callable as loss_fn(outputs, targets)")
    _check_int("num_directions", num_directions, minimum=1)
    _check_int("seed", seed, minimum=0)
    _check_int("start", start, minimum=0)
    for name, value, allowed in (
        ("metric", metric, METRICS),
        ("filter_norm", filter_norm, FILTER_NORMS),
        ("search", search, SEARCHES),
    ):
        if value not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    _check_thresholds(metric, thresholds)
    if not (isinstance(rtol, numbers.Real) and 0 < rtol < 0.5):
        raise ValueError(f"rtol must be a number in (0, 0.5), got {rtol!r}")
    if not (isinstance(max_coefficient, numbers.Real) and 0 < max_coefficient < math.inf):
        raise ValueError(f"max_coefficient must be a finite number > 0, got {max_coefficient!r}")
    if batch_size is not None:
        _check_int("batch_size", batch_size, minimum=1)
    if points_per_pass is not None:
        _check_int("points_per_pass", points_per_pass, minimum=1)
    if search == "bisect":
        if coefficients is not None or full_curve:
            raise ValueError(
                "coefficients and full_curve belong to search='grid'; "
                "pass search='grid' or drop them"
            )
        return None
    if coefficients is None:
        return paper_grid() * max_coefficient
    grid = np.asarray(coefficients, dtype=np.float64)
    if grid.ndim != 1 or len(grid) == 0 or not np.isfinite(grid).all() or grid[0] < 0:
        raise ValueError(
            "coefficients must be a non-empty 1-D sequence of finite numbers >= 0, "
            f"got {coefficients!r}"
        )
    if np.any(np.diff(grid) <= 0):
        raise ValueError("coefficients must be strictly increasing; sort them first")
    return grid


def _check_int(name: str, value: object, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_thresholds(metric: str, thresholds: Sequence[float]) -> None:
    values = list(thresholds) if isinstance(thresholds, Sequence | np.ndarray) else None
    if not values:
        raise ValueError(f"thresholds must be a non-empty sequence of numbers, got {thresholds!r}")
    for t in values:
        if not isinstance(t, numbers.Real) or not math.isfinite(t):
            raise ValueError(f"thresholds must be finite numbers, got {t!r}")
        if metric == "loss" and t <= 0:
            raise ValueError(f"loss thresholds must be > 0, got {t!r}")
        if metric == "accuracy" and not 0 < t <= 1:
            raise ValueError(f"accuracy thresholds must lie in (0, 1], got {t!r}")
