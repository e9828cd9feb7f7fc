"""Scoring weight vectors on a landscape dataset, with early exit.

A walk asks one question many times: is the metric at w past a level? Both metrics
are sums of non-negative per-sample terms (the loss, or the error indicator), so a
partial sum over some of the samples bounds the full one from below, and for
accuracy also from above. Scoring stops as soon as the bounds decide the question.
The landscape keeps its samples ordered hardest-first (by per-sample loss at w*), so
that a point past the level proves it within the first chunks.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, vmap

from volume_ray.directions import PerturbedParameters

__all__ = ["METRICS", "Landscape", "Scores", "sample_accuracy"]

METRICS = ("loss", "accuracy")
FIRST_CHUNK_FRACTION = 1 / 8  # without batch_size: the hardest eighth is scored first,
MAX_AUTO_BATCH = 4096  # then the rest in chunks of at most this many samples

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def sample_accuracy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Accuracy of each sample, float (..., B), any leading dims of `outputs` broadcast.

    One output column is a binary logit (positive means class 1). Float targets shaped
    like the outputs are one-hot or soft (MSE heads): compared by argmax. Otherwise
    targets are class indices; for sequences (B, T) the accuracy of a sample is the
    fraction of its positions predicted right.
    """
    if outputs.shape[-1] == 1:
        return ((outputs[..., 0] > 0) == (targets.reshape(targets.shape[0]) > 0.5)).float()
    if targets.is_floating_point() and targets.shape == outputs.shape[-targets.dim() :]:
        return (outputs.argmax(-1) == targets.argmax(-1)).float()
    hits = (outputs.argmax(-1) == targets).float()  # (..., B, T...)
    positions = tuple(range(hits.dim() - targets.dim() + 1, hits.dim()))
    return hits.mean(positions) if positions else hits


def _chunks(size: int, batch_size: int | None) -> list[tuple[int, int]]:
    """(start, stop) of each chunk. A point far past its level is proved so by the
    hardest samples alone, while a point near it needs every sample: so by default a
    small first chunk, then chunks as large as memory comfortably allows."""
    if batch_size is not None:
        starts = list(range(0, size, batch_size))
    else:
        first = max(1, math.ceil(size * FIRST_CHUNK_FRACTION))
        starts = [0, *range(first, size, MAX_AUTO_BATCH)]
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


class Landscape:
    """A landscape set on one device, and the metric of any weight vector on it.

    `metric="loss"` sums `loss_fn` per sample (the loss is assumed to be a mean over
    the batch of non-negative per-sample terms, as the usual PyTorch losses are);
    `metric="accuracy"` counts errors. Points are given as flat weight vectors in the
    layout of `params`; `points_per_pass > 1` scores that many per forward pass with
    `torch.func.vmap`.
    """

    def __init__(
        self,
        model: nn.Module,
        params: PerturbedParameters,
        x: torch.Tensor,
        y: torch.Tensor,
        loss_fn: LossFn,
        *,
        metric: str = "loss",
        batch_size: int | None = None,
        points_per_pass: int = 1,
    ):
        self.model = model
        self.params = params
        self.loss_fn = loss_fn
        self.metric = metric
        self.points_per_pass = points_per_pass
        self.size = len(x)
        self.sample_max = math.inf if metric == "loss" else 1.0
        self._chunks = _chunks(self.size, batch_size)
        self._modules_params = [model.get_parameter(name) for name in params.names]
        self._point = torch.empty_like(params.flat)  # the weights of one point, reused
        self._point_views = list(params.tensors(self._point).values())
        self.x, self.y = x, y
        per_sample = self._per_sample_losses(params.flat)
        # Early exit needs per-sample terms >= 0; a loss that cannot be checked, or has
        # negative terms (a Gaussian NLL, say), is always scored in full.
        self.losses_nonnegative = per_sample is not None and bool((per_sample >= 0).all())
        if per_sample is not None:  # hardest first: a point far past a level shows it soon
            order = per_sample.argsort(descending=True, stable=True)
            self.x, self.y = x[order], y[order]
        if points_per_pass > 1 and not self._vmap_works():
            self.points_per_pass = 1
        still = params.flat.new_zeros(1, params.count)
        base = self.score(
            params.flat, still, [0], [0.0], np.array([math.inf]), np.array([-math.inf])
        )
        self.base_total = float(base.lower[0])

    def _forward(self, flat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The model at weights `flat` (n,) on `x`, without touching the module."""
        return functional_call(self.model, self.params.tensors(flat), (x,))

    def _vmap_works(self) -> bool:
        """Can this model be batched over weight sets? Some cannot (data-dependent
        control flow, `.item()` in forward): those are scored one point at a time."""
        try:
            with torch.no_grad():
                stacked = self.params.flat.expand(2, -1)
                vmap(self._forward, in_dims=(0, None))(stacked, self.x[:2])
        except RuntimeError as error:
            warnings.warn(
                f"this model cannot be batched with torch.func.vmap ({error}); scoring one "
                "weight set per forward pass instead",
                RuntimeWarning,
                stacklevel=4,
            )
            return False
        return True

    @contextmanager
    def _point_loaded(self) -> Iterator[None]:
        """Point the module's parameters at the `_point` buffer for a while, then
        restore the very tensors they held: cheaper than `functional_call` per chunk."""
        saved = [p.data for p in self._modules_params]
        try:
            for p, view in zip(self._modules_params, self._point_views):
                p.data = view
            yield
        finally:
            for p, data in zip(self._modules_params, saved):
                p.data = data

    def _per_sample_losses(self, flat: torch.Tensor) -> torch.Tensor | None:
        """The loss of each sample at `flat`, or None if the loss cannot be split per
        sample (a loss that vmap does not support)."""

        def one(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            return self.loss_fn(out.unsqueeze(0), target.unsqueeze(0))

        per_sample = []
        try:
            with torch.no_grad():
                for start, stop in self._chunks:
                    out = self._forward(flat, self.x[start:stop])
                    per_sample.append(vmap(one)(out, self.y[start:stop]))
        except RuntimeError:
            return None
        return torch.cat(per_sample)

    def _sums(self, outputs: torch.Tensor, y: torch.Tensor) -> np.ndarray:
        """Summed metric of a chunk, per weight set: outputs (P, B, ...) -> (P,)."""
        if self.metric == "accuracy":
            errors = (1 - sample_accuracy(outputs, y).double()).sum(1)  # (P,)
            broken = ~torch.isfinite(outputs).flatten(1).all(1)  # NaN logits argmax to 0
            return errors.masked_fill(broken, math.nan).cpu().numpy()
        if len(outputs) == 1:
            return np.array([self.loss_fn(outputs[0], y).item() * len(y)])
        means = vmap(self.loss_fn, in_dims=(0, None))(outputs, y)  # (P,)
        return means.double().cpu().numpy() * len(y)

    @torch.no_grad()
    def score(
        self,
        origin: torch.Tensor,
        directions: torch.Tensor,
        rows: Sequence[int],
        coefficients: Sequence[float],
        stop_above: np.ndarray,
        stop_below: np.ndarray,
    ) -> Scores:
        """Bounds on the summed metric at the points origin + coefficients[k] *
        directions[rows[k]], for origin (n,) and directions (B, n).

        Scoring of a point stops once its lower bound exceeds `stop_above[k]` (past
        every level that matters) or its upper bound is at most `stop_below[k]` (past
        none). A NaN or inf sum stops at once and reads as past every level.
        """
        if self.metric == "loss" and not self.losses_nonnegative:
            stop_above = np.full(len(rows), math.inf)
        count = len(rows)
        totals = np.zeros(count)
        samples = np.zeros(count, dtype=np.int64)
        for first in range(0, count, self.points_per_pass):
            group = slice(first, first + self.points_per_pass)
            if count - first == 1 or self.points_per_pass == 1:
                torch.add(
                    origin, directions[rows[first]], alpha=coefficients[first], out=self._point
                )
                with self._point_loaded():
                    sums = self._score_chunks(
                        lambda _, x: self.model(x).unsqueeze(0),  # (1, B, ...)
                        stop_above[group], stop_below[group],
                    )  # fmt: skip
            else:
                scale = torch.tensor(coefficients[group], dtype=origin.dtype)
                along = directions[torch.as_tensor(rows[group])]  # (G, n)
                weights = torch.addcmul(origin, scale.to(origin.device)[:, None], along)
                batched = vmap(self._forward, in_dims=(0, None))
                sums = self._score_chunks(
                    lambda active, x: batched(weights[torch.as_tensor(active)], x),  # noqa: B023
                    stop_above[group], stop_below[group],
                )  # fmt: skip
            totals[group], samples[group] = sums
        upper = totals.copy()
        unscored = samples < self.size
        upper[unscored] += (self.size - samples[unscored]) * self.sample_max
        upper[~np.isfinite(totals)] = math.inf
        return Scores(lower=totals, upper=upper, samples=samples)

    def _score_chunks(
        self,
        outputs_of: Callable[[np.ndarray, torch.Tensor], torch.Tensor],
        stop_above: np.ndarray,
        stop_below: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Chunk by chunk, the summed metric of G points whose outputs on a chunk are
        `outputs_of(active, x)`; a point leaves `active` once decided."""
        totals = np.zeros(len(stop_above))
        samples = np.zeros(len(stop_above), dtype=np.int64)
        active = np.arange(len(stop_above))
        for start, stop in self._chunks:
            x, y = self.x[start:stop], self.y[start:stop]
            totals[active] += self._sums(outputs_of(active, x), y)
            samples[active] += stop - start
            remaining = self.size - stop
            running = totals[active]
            most = running + remaining * self.sample_max if remaining else running
            active = active[(running <= stop_above[active]) & (most > stop_below[active])]
            if len(active) == 0:
                break
        return totals, samples
