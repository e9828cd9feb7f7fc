"""How much a measuring worker takes on at once: its memory budget, and the points
it scores per forward pass.

On the CPU a fixed budget (`BLOCK_FLOATS`) keeps a block of directions, the weight
sets of one pass and the parallel walks' copies within cache-friendly bounds. A GPU
holds far more, and how much is free depends on what shares it, so there the budget is
a fraction of the free memory that `torch.cuda.mem_get_info` reports. How many points
(directions x coefficients) one pass should hold depends on the model, the landscape
and the device; rather than guess, `calibrated_points_per_pass` times a few passes of
each candidate size at set-up and keeps the fastest.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from volume_ray.landscape import Landscape, Prepared

__all__ = [
    "BLOCK_FLOATS", "CANDIDATES", "PINNED_FLOATS", "calibrated_points_per_pass", "memory_budget",
]  # fmt: skip

BLOCK_FLOATS = 2**24  # the CPU's budget in scalars (64 MiB in fp32)
PINNED_FLOATS = 2**28  # a GPU block's raw Gaussians, drawn into pinned host memory (1 GiB)
CANDIDATES = (1, 4, 16, 64, 256)  # points per pass the calibration tries
REPEATS = 3  # timed passes of each candidate; the first warms up, the best counts

log = logging.getLogger(__name__)


def memory_budget(device: torch.device, fraction: float, element_bytes: int = 4) -> int:
    """Scalars a worker may hold on `device`: `fraction` of the GPU's free memory
    (counting what this process's allocator holds unused, as a worker that moved to
    another pair does), or BLOCK_FLOATS on the CPU."""
    if device.type != "cuda":
        return BLOCK_FLOATS
    free, _total = torch.cuda.mem_get_info(device)
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return max(BLOCK_FLOATS, int(free * fraction) // element_bytes)


def calibrated_points_per_pass(
    landscape: Landscape, prepared: Prepared, most: int, candidates=CANDIDATES
) -> tuple[int, dict[int, float]]:
    """The candidate (at most `most`) that scores the most points a second on
    `landscape`, each point scored on every sample, with the points a second of each
    candidate tried. A candidate that runs out of device memory ends the trial (1 when
    even that does). The landscape is left at the choice."""
    rates: dict[int, float] = {}
    for count in candidates:
        if count > most and rates:
            break
        landscape.points_per_pass = count
        seconds = _seconds_to_score(landscape, prepared, count)
        if seconds is None:
            torch.cuda.empty_cache()  # out of the handler: its traceback held the memory
            break
        rates[count] = count / seconds
    best = max(rates, key=rates.get) if rates else 1
    landscape.points_per_pass = best
    shown = ", ".join(f"{count}: {rate:,.0f}" for count, rate in rates.items())
    log.info("points per pass: %d (points scored a second by points per pass: %s)", best, shown)
    return best, rates


def _seconds_to_score(landscape: Landscape, prepared: Prepared, count: int) -> float | None:
    """The best of REPEATS - 1 timed calls scoring `count` points in full, after one
    that warms up; None when they run out of device memory."""
    rows, coefficients = [0] * count, [0.0] * count
    unbounded = np.full(count, np.inf)
    seconds = []
    try:
        for _ in range(REPEATS):
            began = time.perf_counter()
            landscape.score(prepared, rows, coefficients, unbounded, -unbounded)
            if landscape.params.flat.is_cuda:
                torch.cuda.synchronize(landscape.params.flat.device)
            seconds.append(time.perf_counter() - began)
    except torch.cuda.OutOfMemoryError:
        return None
    return min(seconds[1:])
