"""`measure_radii`: threshold radii along seeded random directions (DESIGN §5).

This module checks the arguments in one place (`ARGUMENT_RULES`, then the rules that
tie arguments together), then glues the core together: directions from `directions`,
scoring from `landscape`, one search per direction from `search`. Directions are
processed in blocks; within a block, every direction's next proposal is scored in one
call, so a device can batch them.

On a GPU (the device path, `RadiusMeter(device_path=...)`) a block holds as many
directions as a fraction of the free memory allows, one forward pass as many points
as a calibration at set-up found fastest (`device_budget`), each round of the searches
syncs with the host once (`Landscape(sync_once=True)`), and the next block's
directions are drawn while this one is walked (`direction_prefetch`).
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from volume_ray.checks import (
    BOOLEAN,
    MODEL_AND_DATA_RULES,
    check,
    check_int,
    integer,
    one_of,
    optional,
    real,
    resolve_device,
)
from volume_ray.curvature import HessianOperator
from volume_ray.device_budget import (
    CANDIDATES,
    PINNED_FLOATS,
    calibrated_points_per_pass,
    memory_budget,
)
from volume_ray.direction_prefetch import prefetched
from volume_ray.directions import (
    DIRECTION_RNGS,
    FILTER_NORMS,
    FilterNorm,
    perturbed_parameters,
    raw_directions,
)
from volume_ray.landscape import METRICS, Landscape
from volume_ray.parallel_walks import ParallelWalks
from volume_ray.precision import float32_precision
from volume_ray.search import (
    DEFAULT_RTOL,
    MIN_RTOL,
    BracketSearch,
    GridSearch,
    Hint,
    paper_grid,
)

__all__ = ["SEARCHES", "RADII_COLUMNS", "RadiusMeter", "measure_radii"]

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

# What each argument of `RadiusMeter` must be, checked in this order before any work;
# `_check_arguments` adds the rules that tie arguments together.
ARGUMENT_RULES = {
    **MODEL_AND_DATA_RULES,
    "seed": integer(0),
    "metric": one_of(METRICS),
    "filter_norm": one_of(FILTER_NORMS),
    "search": one_of(SEARCHES),
    "rtol": real(MIN_RTOL, 0.5),
    "max_coefficient": real(0, low_open=True),
    "batch_size": optional(integer(1)),
    "points_per_pass": optional(integer(1)),
    "parallel_walks": optional(integer(1)),
    "full_curve": BOOLEAN,
    "quadratic_radii": BOOLEAN,
    "allow_tf32": BOOLEAN,
    "direction_rng": one_of(DIRECTION_RNGS),
    "device_path": optional(BOOLEAN),
    "memory_fraction": real(0, 1, low_open=True),
}


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
    quadratic_radii: bool = False,
    allow_tf32: bool = False,
    direction_rng: str = "cpu",
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
      forward pass (default: 1 on the CPU, where batching does not pay; on a GPU, the
      fastest of a few sizes timed at set-up).
    - `quadratic_radii=True` adds a column `radius_quadratic`: the radius a quadratic
      basin with the landscape's Hessian H at the trained weights would give along the
      direction, |g|*sqrt(2(T - L*)/dᵀHd), from one Hessian-vector product per direction
      (inf where dᵀHd <= 0). Where it parts from `radius`, the basin is not quadratic.
    - On a GPU, float32 products run at full precision unless `allow_tf32=True`
      (`volume_ray.precision`), so that GPU radii equal CPU radii within rtol.
    - `direction_rng="cpu"` draws direction i as the paper does, from a CPU generator
      seeded with seed + i; `"device"` draws it on the device from a generator seeded
      from (seed, i): no CPU time, reproducible, but not the paper's directions.
    - On the CPU, walks run in parallel, one per torch thread, each op on a single
      thread (`volume_ray.parallel_walks`): radii are those of one thread, whatever the
      thread count, and `loss_fn` may be called from several threads at once. Each
      parallel walk holds a copy of the model, so large models get fewer: past 2**22
      parameters, one walk at a time whose ops run on all threads.

    The work is done on a copy of the model: the caller's model is never written,
    moved or switched to eval mode, so another thread may use it meanwhile.
    """
    check_int("num_directions", num_directions, minimum=1)  # before any work
    check_int("start", start, minimum=0)
    meter = RadiusMeter(
        model, x, y, loss_fn, seed=seed, metric=metric, thresholds=thresholds,
        filter_norm=filter_norm, search=search, coefficients=coefficients, rtol=rtol,
        max_coefficient=max_coefficient, batch_size=batch_size, device=device,
        full_curve=full_curve, points_per_pass=points_per_pass, quadratic_radii=quadratic_radii,
        allow_tf32=allow_tf32, direction_rng=direction_rng,
    )  # fmt: skip
    return meter.measure(start, num_directions)


class RadiusMeter:
    """What `measure_radii` computes once per (model, landscape, settings): the
    landscape on its device, the filter norm, and the hints that direction 0 gives
    every other walk. `measure(start, count)` then walks any range of directions, and
    the radii never depend on how the ranges are split. A worker keeps one meter per
    (model, landscape) pair. Arguments are those of `measure_radii`, and
    `parallel_walks`: how many walks run at once, each on a thread of its own with
    torch's ops on one thread (see `parallel_walks`); by default torch's thread count
    on the CPU (fewer for large models), 1 on a GPU. One walk at a time runs each op
    on torch's threads instead. `device_path` (None: on a GPU) walks one block at a
    time with one host sync per search round and the next block's directions drawn
    meanwhile; its budget is `memory_fraction` of the device's free memory. On the
    CPU it computes the same radii as the CPU path, within rtol, for the tests.
    """

    def __init__(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        *,
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
        full_curve: bool = False,
        points_per_pass: int | None = None,
        parallel_walks: int | None = None,
        quadratic_radii: bool = False,
        allow_tf32: bool = False,
        direction_rng: str = "cpu",
        device_path: bool | None = None,
        memory_fraction: float = 0.5,
    ):
        grid = _check_arguments({name: v for name, v in locals().items() if name != "self"})
        device = resolve_device(device, model)
        count = perturbed_parameters(model).count
        self.device_path = device.type == "cuda" if device_path is None else device_path
        # Memory cap: a block of directions (with what the landscape keeps for each),
        # the weight sets stacked for one pass, and the parallel walks' copies of the
        # model and point buffer (2n scalars a walk) each hold about `budget` scalars
        # at most. The device path takes walks in batches instead.
        budget = memory_budget(device, memory_fraction)
        if self.device_path:
            if parallel_walks not in (None, 1):
                raise ValueError(
                    f"parallel_walks must be None or 1 on the device path, got {parallel_walks}: "
                    "it batches the walks in one forward pass instead; pass device_path=False "
                    "for threads"
                )
            parallel_walks = 1
        elif parallel_walks is None:
            most = max(1, budget // (2 * count))
            parallel_walks = min(torch.get_num_threads(), most) if device.type == "cpu" else 1
        self._walks = ParallelWalks(parallel_walks)
        self._hessian = (
            HessianOperator(
                model, x, y, loss_fn, batch_size=batch_size, device=device, allow_tf32=allow_tf32
            ) if quadratic_radii else None
        )  # fmt: skip
        self.seed, self.metric, self.thresholds = seed, metric, thresholds
        self.allow_tf32, self.direction_rng = allow_tf32, direction_rng
        most = max(1, budget // count)  # points one pass may stack
        wanted = points_per_pass or (max(CANDIDATES) if self.device_path else 1)

        def set_up() -> None:  # computed as the walks compute, on their first thread
            self.landscape = Landscape(
                model, x.to(device), y.to(device), loss_fn, metric=metric,
                batch_size=batch_size, points_per_pass=min(wanted, most),
                keep_outputs=search == "bisect",  # for its surrogate
                sync_once=self.device_path,
            )  # fmt: skip
            self.to_norm = FilterNorm(self.landscape.params, filter_norm)
            self.hints = self._hints_from_direction_zero() if search == "bisect" else None
            if points_per_pass is None and self.landscape.points_per_pass > 1:  # it batches
                first = self.landscape.prepare(self._directions([0])[1])
                calibrated_points_per_pass(self.landscape, first, self.landscape.points_per_pass)

        levels = _levels(metric, thresholds, len(x))
        if search == "grid":
            self.new_search = lambda _hints, _surrogate: GridSearch(
                levels, self.landscape.base_total, grid, full_curve=full_curve
            )
        else:
            self.new_search = lambda hints, surrogate: BracketSearch(
                levels, self.landscape.base_total, rtol=rtol, max_coefficient=max_coefficient,
                hints=hints, surrogate=surrogate,
            )  # fmt: skip
        with float32_precision(allow_tf32):
            self._walks.run(set_up)
        _warn_if_base_is_past(metric, thresholds, levels, self.landscape.base_total)
        per_walk = count + self.landscape.floats_per_walk
        if self.device_path:
            # also the directions d beside g, the float64 copies their norms take one at
            # a time, and the next block's g when the device draws it meanwhile
            per_walk += (4 if direction_rng == "device" else 3) * count
        self.block = max(self.landscape.points_per_pass, budget // per_walk)
        if self.device_path:  # the block's g in pinned host memory, twice while drawing
            self.block = min(self.block, max(1, PINNED_FLOATS // count))
        self._landscapes = [self.landscape]
        self._landscapes += [self.landscape.replica() for _ in range(1, parallel_walks)]

    @property
    def parallel_walks(self) -> int:
        """How many walks run at once."""
        return self._walks.count

    def _hints_from_direction_zero(self) -> list[Hint | None]:
        """Direction 0 guides every other walk's first probe. It does so identically in
        every shard, so radii never depend on how directions were sharded."""
        searches, _, _ = self._search(self.landscape, self._directions([0])[1], None)
        return searches[0].hints()

    def measure(self, start: int, num_directions: int) -> pd.DataFrame:
        """Rows of directions start .. start+num_directions-1, as `measure_radii`."""
        check_int("num_directions", num_directions, minimum=1)
        check_int("start", start, minimum=0)
        records = []
        items = range(start, start + num_directions)
        with float32_precision(self.allow_tf32):
            for block, rows in self._in_blocks(items, self._walk, self._draw):
                if self._hessian is not None:
                    quadratic = self._quadratic_radii(block).reshape(-1)
                    for record, value in zip(rows, quadratic, strict=True):
                        record["radius_quadratic"] = value
                records.extend(rows)
        return pd.DataFrame.from_records(records)

    def crossings_along(
        self, raw: torch.Tensor
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Along given raw directions g (B, n), walked as `measure` walks seeded ones:
        coefficients, censored and nonfinite flags, each (B, thresholds), and the loss
        evaluations per direction (B,). A thermodynamic ladder asks for crossings along
        the directions its chains propose."""
        raw = raw.to(self.landscape.params.flat)

        def walk(landscape: Landscape, _part: range, along: torch.Tensor) -> list:
            searches, evals, _ = self._search(landscape, self.to_norm(along), self.hints)
            return [(search.crossings(), count) for search, count in zip(searches, evals)]

        draw = lambda part: raw[part.start : part.stop]  # noqa: E731
        with float32_precision(self.allow_tf32):
            blocks = self._in_blocks(range(len(raw)), walk, draw)
            found = [row for _, rows in blocks for row in rows]
        coefficient = np.array([[c.coefficient for c in row] for row, _ in found])
        censored = np.array([[c.censored for c in row] for row, _ in found])
        nonfinite = np.array([[c.nonfinite for c in row] for row, _ in found])
        return coefficient, censored, nonfinite, np.array([count for _, count in found])

    def _in_blocks(
        self, items: range, walk: Callable, draw: Callable[[range], torch.Tensor]
    ) -> Iterator[tuple[range, list]]:
        """Each block of `items` (at most `block` directions, for memory) and the rows
        walk(landscape, part, draw(part)) gives for it, in order: on the CPU path its
        parts on the parallel walks, each drawing its own; on the device path whole,
        the next block drawn meanwhile."""
        blocks = [
            range(first, min(first + self.block, items.stop))
            for first in range(items.start, items.stop, self.block)
        ]  # fmt: skip
        device = self.landscape.params.flat.device
        if self.device_path:
            for block, raw in prefetched(blocks, draw, device):
                yield block, walk(self.landscape, block, raw)
            return

        def walk_part(k: int, part: range) -> list:
            return walk(self._landscapes[k], part, draw(part).to(device))

        for block in blocks:
            walked = self._walks.map(walk_part, _split(block, self._walks.count))
            yield block, [row for part in walked for row in part]

    def _quadratic_radii(self, indices: Sequence[int]) -> np.ndarray:
        """(directions, thresholds): |g|*sqrt(2(T - L*)/dᵀHd), the crossing of the
        quadratic model of the loss; inf where it never crosses, 0 where T <= L*. Computed
        on all of torch's threads, so its last bits may depend on the thread count."""
        raw, directions = self._directions(indices)
        curvatures = (directions.double() * self._hessian.matvec(directions).double()).sum(1)
        curvatures = curvatures.cpu().numpy()[:, None]
        raw_norms = raw.double().norm(dim=1).cpu().numpy()[:, None]
        gaps = np.asarray(self.thresholds, dtype=np.float64)[None, :] - self._hessian.base_loss
        with np.errstate(divide="ignore", invalid="ignore"):
            radii = raw_norms * np.sqrt(2 * gaps / curvatures)
        radii = np.where(curvatures > 0, radii, math.inf)
        return np.where(gaps > 0, radii, 0.0)

    def _walk(self, landscape: Landscape, indices: Sequence[int], raw: torch.Tensor) -> list[dict]:
        """The rows of directions `indices`, whose raw Gaussians are `raw` on the
        landscape's device, walked on `landscape` together."""
        directions = self.to_norm(raw)
        searches, evals, samples = self._search(landscape, directions, self.hints)
        raw_norms = raw.double().norm(dim=1).cpu().numpy()
        direction_norms = directions.double().norm(dim=1).cpu().numpy()
        size = landscape.size
        records = []
        for j, (index, search) in enumerate(zip(indices, searches)):
            full_curve = isinstance(search, GridSearch) and search.full_curve
            for threshold, crossing in zip(self.thresholds, search.crossings()):
                c = crossing.coefficient
                record = {
                    "direction": index,
                    "seed": self.seed,
                    "threshold": float(threshold),
                    "metric": self.metric,
                    "coefficient": c,
                    "radius": math.nan if crossing.censored else c * raw_norms[j],
                    "radius_euclid": math.nan if crossing.censored else c * direction_norms[j],
                    "raw_norm": raw_norms[j],
                    "censored": crossing.censored,
                    "evals": int(evals[j]),
                    "data_passes": samples[j] / size,
                    "nonfinite": crossing.nonfinite,
                }
                if full_curve:
                    record["curve"] = _metric_values(self.metric, np.asarray(search.curve), size)
                records.append(record)
        return records

    def _draw(self, indices: Sequence[int]) -> torch.Tensor:
        """Raw Gaussians g (B, n) of directions `indices`: on the device with
        direction_rng "device"; else on the CPU, pinned for a CUDA device."""
        params = self.landscape.params
        if self.direction_rng == "device":
            return raw_directions(params, self.seed, indices, rng="device")
        pinned = params.flat.is_cuda
        rows = torch.empty(len(indices), params.count, dtype=params.flat.dtype, pin_memory=pinned)
        return raw_directions(params, self.seed, indices, out=rows)

    def _directions(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw Gaussians g and directions d, both (B, n) on the landscape's device."""
        raw = self._draw(indices).to(self.landscape.params.flat.device)
        return raw, self.to_norm(raw)

    def _search(
        self, landscape: Landscape, directions: torch.Tensor, hints: list[Hint | None] | None
    ) -> tuple[list[BracketSearch | GridSearch], np.ndarray, np.ndarray]:
        """One search per direction, each driven to its end, every round's proposals
        scored together on `landscape`; with the evaluations and samples scored per
        search. Each walk's surrogate (None for a grid search) takes its scored points."""
        surrogates = [landscape.surrogate() for _ in range(len(directions))]
        searches = [self.new_search(hints, surrogate) for surrogate in surrogates]
        evals = np.zeros(len(searches), dtype=np.int64)
        samples = np.zeros(len(searches), dtype=np.int64)
        prepared = landscape.prepare(directions)
        while True:
            if self.device_path:
                _surrogates_ahead(searches, surrogates)
            asks = [(j, p) for j, s in enumerate(searches) if (p := s.propose()) is not None]
            if not asks:
                break
            scores = landscape.score(
                prepared,
                [j for j, _ in asks],
                [p.coefficient for _, p in asks],
                np.array([p.stop_above for _, p in asks]),
                np.array([p.stop_below for _, p in asks]),
            )
            for k, (j, proposal) in enumerate(asks):
                searches[j].record(proposal.coefficient, scores.lower[k], scores.upper[k])
                if surrogates[j] is not None:
                    surrogates[j].record(proposal.coefficient, scores.lower[k], scores.outputs[k])
                evals[j] += 1
                samples[j] += scores.samples[k]
        return searches, evals, samples


def _surrogates_ahead(searches: list, surrogates: list) -> None:
    """Every value the searches' surrogates will be asked for in this round, computed
    on the device and read back in one sync (one read per walk otherwise)."""
    queries = [
        (surrogate, c)
        for search, surrogate in zip(searches, surrogates)
        if surrogate is not None and (c := search.surrogate_query()) is not None
    ]  # fmt: skip
    if not queries:
        return
    values = torch.stack([surrogate.summed_loss(c) for surrogate, c in queries]).cpu()
    for (surrogate, c), value in zip(queries, values.tolist()):
        surrogate.remember(c, value)


def _split(items: Sequence[int], parts: int) -> list[Sequence[int]]:
    """`items` in at most `parts` runs of consecutive items, of near-equal lengths."""
    size = math.ceil(len(items) / parts)
    return [items[i : i + size] for i in range(0, len(items), size)]


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


def _metric_values(metric: str, totals: np.ndarray, size: int) -> np.ndarray:
    """Summed metric back to the user's units: mean loss, or accuracy."""
    return totals / size if metric == "loss" else 1.0 - totals / size


def _check_arguments(arguments: dict) -> np.ndarray | None:
    """Every argument rule of `measure_radii`, checked before any work: the table, then
    the rules that tie arguments together. Returns the coefficient grid of a grid
    search (None for bisect)."""
    check(ARGUMENT_RULES, arguments)
    model, x, y = arguments["model"], arguments["x"], arguments["y"]
    metric, search = arguments["metric"], arguments["search"]
    perturbed_parameters(model)  # raises when there is nothing to perturb
    if len(x) == 0 or len(x) != len(y):
        raise ValueError(
            f"x and y must hold the same positive number of samples, got len(x)={len(x)} "
            f"and len(y)={len(y)}"
        )
    if arguments["quadratic_radii"] and metric != "loss":
        raise ValueError(
            f"quadratic_radii=True needs metric='loss' (the Hessian is of the loss), got {metric!r}"
        )
    _check_thresholds(metric, arguments["thresholds"])
    coefficients = arguments["coefficients"]
    if search == "bisect":
        if coefficients is not None or arguments["full_curve"]:
            raise ValueError(
                "coefficients and full_curve belong to search='grid'; "
                "pass search='grid' or drop them"
            )
        return None
    if coefficients is None:
        return paper_grid() * arguments["max_coefficient"]
    grid = np.asarray(coefficients, dtype=np.float64)
    if grid.ndim != 1 or len(grid) == 0 or not np.isfinite(grid).all() or grid[0] < 0:
        raise ValueError(
            "coefficients must be a non-empty 1-D sequence of finite numbers >= 0, "
            f"got {coefficients!r}"
        )
    if np.any(np.diff(grid) <= 0):
        raise ValueError("coefficients must be strictly increasing; sort them first")
    return grid


def _check_thresholds(metric: str, thresholds: Sequence[float]) -> None:
    values = list(thresholds) if isinstance(thresholds, Sequence | np.ndarray) else None
    if not values:
        raise ValueError(f"thresholds must be a non-empty sequence of numbers, got {thresholds!r}")
    for t in values:
        if isinstance(t, bool) or not isinstance(t, numbers.Real) or not math.isfinite(t):
            raise ValueError(f"thresholds must be finite numbers, got {t!r}")
        if metric == "loss" and t <= 0:
            raise ValueError(f"loss thresholds must be > 0, got {t!r}")
        if metric == "accuracy" and not 0 < t <= 1:
            raise ValueError(f"accuracy thresholds must lie in (0, 1], got {t!r}")
