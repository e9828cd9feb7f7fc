"""Walks in parallel on a multi-core CPU: one thread per walk, each running torch's ops
on a single thread.

A walk on the CPU is a string of small forward passes with Python between them (the
search, the bookkeeping) and ops that run on one thread anyway (drawing the
Gaussians). Spread over every core op by op, the cores wait through all of that; with
one walk per core, another walk's matrix products fill the gaps.
`benchmarks/bench_radius_search.py` prints the gain.

Every op of a walk then runs on one thread whatever torch's thread count, so the
values, and the radii, do not depend on it. Torch's ops release the GIL, so threads
suffice.

Torch's thread count is a setting of each thread (OpenMP's and MKL's), plus a
process-wide default that threads started later take up. Only this module's own
threads are set to one op thread, once, when they start; the default is put back at
once, so the caller's thread and every other thread keep their settings throughout.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from typing import TypeVar

import torch

__all__ = ["ParallelWalks"]

Part = TypeVar("Part")
Result = TypeVar("Result")


class ParallelWalks:
    """`count` threads, each computing with torch's ops on one thread. A count of 1 is
    the calling thread alone, with torch's thread count left as it is."""

    def __init__(self, count: int):
        if count < 1:
            raise ValueError(f"parallel_walks must be at least 1, got {count}")
        self.count = count
        self._threads = []
        if count > 1:
            self._threads = [
                ThreadPoolExecutor(1, "volume_ray_walk", initializer=_one_op_thread)
                for _ in range(count)
            ]  # fmt: skip
            wait([thread.submit(int) for thread in self._threads])  # each sets its own count
            torch.set_num_threads(torch.get_num_threads())  # the default for later threads

    def run(self, work: Callable[[], Result]) -> Result:
        """work(), computed as each walk computes: on the first walk's thread (on the
        calling thread when there is one walk)."""
        return work() if self.count == 1 else self._threads[0].submit(work).result()

    def map(self, work: Callable[[int, Part], Result], parts: Sequence[Part]) -> list[Result]:
        """[work(k, parts[k]) for each k], part k on thread k. Every thread has finished
        when this returns or raises."""
        if not 1 <= len(parts) <= self.count:
            raise ValueError(f"parallel walks: 1 to {self.count} parts, got {len(parts)}")
        if self.count == 1:
            return [work(0, parts[0])]
        futures = [thread.submit(work, k, part) for k, (thread, part) in
                   enumerate(zip(self._threads, parts))]  # fmt: skip
        wait(futures)
        return [future.result() for future in futures]


def _one_op_thread() -> None:
    """Set this thread to run torch's ops on one thread. Torch sets a thread up from
    the process-wide default at its first call, so that comes first; ours then stands."""
    torch.get_num_threads()
    torch.set_num_threads(1)
