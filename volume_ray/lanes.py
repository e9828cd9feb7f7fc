"""Walks side by side on a multi-core CPU: one lane (thread) per core, each running
torch's ops on a single thread.

A walk on the CPU is a string of small forward passes (about a millisecond each on
the digits MLP), with Python between them (the search, the bookkeeping) and ops that
run on one thread anyway (drawing the Gaussians). Spread over every core op by op,
the cores wait through all of that; with one walk per core, another lane's matrix
products fill the gaps, and a product on one thread also runs nearer the core's peak
than one split across cores. `benchmarks/bench_radius_search.py` prints the gain.

Every op of a walk then runs on one thread whatever torch's thread count, so the
values, and the radii, do not depend on it. Torch's ops release the GIL, so threads
suffice.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import TypeVar

import torch

__all__ = ["Lanes", "one_op_thread"]

Part = TypeVar("Part")
Result = TypeVar("Result")


@contextmanager
def one_op_thread() -> Iterator[None]:
    """Within the block, torch runs each op on one thread; its thread count is
    restored afterwards. The count is process-wide: other threads see it meanwhile."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class Lanes:
    """`count` lanes: the calling thread and `count - 1` threads of a pool. A single
    lane is the calling thread alone, with torch's thread count left as it is."""

    def __init__(self, count: int):
        if count < 1:
            raise ValueError(f"lanes: count must be at least 1, got {count}")
        self.count = count
        self._pool = ThreadPoolExecutor(count - 1, "volume_ray_lane") if count > 1 else None

    def op_threads(self) -> AbstractContextManager[None]:
        """Within the block, torch's ops run as they do in the lanes: on one thread when
        there are several lanes, else on torch's threads as set."""
        return one_op_thread() if self.count > 1 else nullcontext()

    def map(self, work: Callable[[int, Part], Result], parts: Sequence[Part]) -> list[Result]:
        """[work(k, parts[k]) for each k], part k on lane k, under `op_threads`. Every
        lane has finished when this returns or raises."""
        if not 1 <= len(parts) <= self.count:
            raise ValueError(f"lanes: 1 to {self.count} parts, got {len(parts)}")
        if self.count == 1:
            return [work(0, parts[0])]
        with one_op_thread():
            others = [
                self._pool.submit(_on_one_op_thread, work, k, part)
                for k, part in enumerate(parts[1:], start=1)
            ]
            try:
                first = work(0, parts[0])
            finally:
                wait(others)  # no lane may outlive the thread count set for it
            return [first, *(future.result() for future in others)]


def _on_one_op_thread(work: Callable[[int, Part], Result], lane: int, part: Part) -> Result:
    torch.set_num_threads(1)  # this pool thread's own setting, as torch keeps one per thread
    return work(lane, part)
