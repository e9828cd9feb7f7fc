"""Scoring a point chunk by chunk, and stopping once the partial sum decides it.

A walk asks one question many times: is the metric at w past a level? Both metrics
are sums of non-negative per-sample terms (the loss, or the error indicator), so a
partial sum over some of the samples bounds the full one from below, and for
accuracy, whose terms are at most 1, also from above. Scoring stops as soon as the
bounds decide the question. With the samples ordered hardest first (`sample_order`),
a point past the level proves it within the first chunks.

On a GPU every bound brought to the host to decide is a sync that stalls the device.
`ChunkedSum.sum_on_device` applies the same rule with the sums, the counts and the
still-active flags kept on the device: a decided point is masked rather than dropped,
so every chunk is computed for every point (the early exit saves no work there) but
the bounds, the samples counted and the outputs kept are those of `sum`, and reach the
host once, when the caller asks for them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["ChunkedSum", "Scores", "chunks"]

FIRST_CHUNK_FRACTION = 1 / 8  # without batch_size: the hardest eighth is scored first,
MAX_AUTO_BATCH = 4096  # then the rest in chunks of at most this many samples

# score_chunk(active, chunk) -> (outputs (P', B, ...), sums (P',) float64) of the active
# points (on the device: of every point, whatever `active` says)
ChunkScorer = Callable[[list[int], slice], tuple[torch.Tensor, torch.Tensor]]


def chunks(size: int, batch_size: int | None, *, early_exit: bool) -> list[tuple[int, int]]:
    """(start, stop) of each chunk. A point far past its level is proved so by the
    hardest samples alone, while a point near it needs every sample: so by default a
    small first chunk when early exit may pay, then chunks as large as memory
    comfortably allows. `batch_size`, when given, is the size of every chunk."""
    if batch_size is not None:
        starts = list(range(0, size, batch_size))
    elif early_exit:
        first = max(1, math.ceil(size * FIRST_CHUNK_FRACTION))
        starts = [0, *range(first, size, MAX_AUTO_BATCH)]
    else:
        starts = list(range(0, size, MAX_AUTO_BATCH))
    return list(zip(starts, [*starts[1:], size]))


@dataclass(frozen=True)
class Scores:
    """Bounds on the summed per-sample metric of each scored point.

    `lower == upper` when every sample was scored. `samples` counts the samples
    scored per point, the cost that early exit saves.
    """

    lower: np.ndarray  # (P,) float64
    upper: np.ndarray  # (P,) float64
    samples: np.ndarray  # (P,) int64
    outputs: list[torch.Tensor | None]  # model outputs on every sample, where kept


class ChunkedSum:
    """Sums over `size` samples whose per-sample terms lie in [0, sample_max], chunk
    by chunk, with the chunks of `batch_size` samples (None: see `chunks`)."""

    def __init__(self, size: int, batch_size: int | None, sample_max: float):
        self.size, self.sample_max = size, sample_max
        self.early_chunks = chunks(size, batch_size, early_exit=True)
        self.full_chunks = chunks(size, batch_size, early_exit=False)

    def sum(
        self,
        score_chunk: ChunkScorer,
        stop_above: list[float],
        stop_below: list[float],
        *,
        keep_outputs: bool,
    ) -> tuple[list[float], list[int], list[torch.Tensor | None]]:
        """The partial sums of G points, their samples scored, and, with `keep_outputs`,
        the outputs on every sample of each point scored fully. A point stops once its
        sum exceeds `stop_above[k]` or cannot exceed `stop_below[k]`; a point whose
        bounds cannot stop it is scored in as few chunks as possible. (Plain lists: a
        group holds a few points, where numpy's per-call cost outweighs the work.)"""
        totals, samples = [0.0] * len(stop_above), [0] * len(stop_above)
        pieces: list[list[torch.Tensor]] = [[] for _ in stop_above]
        active = list(range(len(stop_above)))
        for start, stop in self.plan(stop_above, stop_below):
            outputs, sums = score_chunk(active, slice(start, stop))
            rest = self._rest(stop)
            still = []
            for point, total, output in zip(active, sums.tolist(), outputs.unbind()):
                totals[point] += total
                samples[point] = stop
                if keep_outputs:
                    pieces[point].append(output)
                if totals[point] <= stop_above[point] and totals[point] + rest > stop_below[point]:
                    still.append(point)
            active = still
            if not active:
                break
        # a copy: a kept point's outputs must not hold on to the pass they came from
        whole = [
            torch.cat(parts) if parts and n == self.size else None
            for parts, n in zip(pieces, samples)
        ]
        return totals, samples, whole

    def sum_on_device(
        self,
        score_chunk: ChunkScorer,
        stop_above: torch.Tensor,
        stop_below: torch.Tensor,
        plan: list[tuple[int, int]],
        *,
        keep_outputs: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """`sum`'s rule without a sync: the partial sums (G,) float64 and samples scored
        (G,) int64 of G points as device tensors, and, with `keep_outputs`, each chunk's
        outputs (G, B, ...) of every point; `whole_outputs` picks the kept ones out once
        the counts are on the host. `stop_above` and `stop_below` are (G,) float64
        tensors on the device (whose copy there, made before the round's work is queued,
        waits for nothing), `plan` is `plan` of them on the host."""
        device = stop_above.device
        totals = torch.zeros(len(stop_above), dtype=torch.float64, device=device)
        samples = torch.zeros(len(stop_above), dtype=torch.int64, device=device)
        active = torch.ones(len(stop_above), dtype=torch.bool, device=device)
        everyone = list(range(len(stop_above)))
        pieces = []
        for start, stop in plan:
            outputs, sums = score_chunk(everyone, slice(start, stop))
            totals = torch.where(active, totals + sums, totals)
            samples = torch.where(active, stop, samples)
            active &= (totals <= stop_above) & (totals + self._rest(stop) > stop_below)
            if keep_outputs:
                pieces.append(outputs)
        return totals, samples, pieces

    def whole_outputs(
        self, pieces: list[torch.Tensor], samples: np.ndarray
    ) -> list[torch.Tensor | None]:
        """From `sum_on_device`'s chunk outputs, each point's outputs on every sample
        where it was scored fully (samples[k] == size), else None: views of one
        concatenation (a copy per point costs more than the pass on a GPU), which keep
        it alive while a walk's surrogate holds one."""
        if not pieces or not (samples == self.size).any():
            return [None] * len(samples)
        whole = torch.cat(pieces, dim=1).unbind(0)
        return [outputs if n == self.size else None for outputs, n in zip(whole, samples)]

    def plan(self, stop_above: list[float], stop_below: list[float]) -> list[tuple[int, int]]:
        """The early-exit chunks where some bound can stop a point, else the full ones."""
        bounded = [*stop_above, *(stop_below if math.isfinite(self.sample_max) else [])]
        return self.early_chunks if any(map(math.isfinite, bounded)) else self.full_chunks

    def _rest(self, stop: int) -> float:
        """At most what the samples after `stop` can add."""
        return (self.size - stop) * self.sample_max if stop < self.size else 0.0

    def scores(
        self, totals: np.ndarray, samples: np.ndarray, outputs: list[torch.Tensor | None]
    ) -> Scores:
        """Bounds from partial sums: the unscored samples add at most `sample_max` each,
        and a NaN or inf sum reads as past every level."""
        upper = totals.copy()
        unscored = samples < self.size
        upper[unscored] += (self.size - samples[unscored]) * self.sample_max
        upper[~np.isfinite(totals)] = math.inf
        return Scores(lower=totals, upper=upper, samples=samples, outputs=outputs)
