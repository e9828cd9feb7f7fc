"""Scoring weight vectors on a landscape dataset, with early exit.

A walk asks one question many times: is the metric at w past a level? Both metrics
are sums of non-negative per-sample terms (the loss, or the error indicator), so a
partial sum over some of the samples bounds the full one from below, and for
accuracy also from above. Scoring stops as soon as the bounds decide the question.
The landscape keeps its samples ordered hardest-first (by per-sample loss at w*), so
that a point past the level proves it within the first chunks. A point that cannot
stop early (its stop bounds are infinite) is scored in as few chunks as memory allows.
Fully scored points also return their outputs, from which `surrogate_total` models
the loss between scored points, for a search to aim by.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, vmap

from volume_ray.cpu_kernels import faster_loss, linears_through_onednn, onednn_linears
from volume_ray.directions import PerturbedParameters
from volume_ray.input_layer import find_input_layer
from volume_ray.models import sample_accuracy

__all__ = ["METRICS", "Landscape", "Scores", "Walks"]

METRICS = ("loss", "accuracy")
FIRST_CHUNK_FRACTION = 1 / 8  # without batch_size: the hardest eighth is scored first,
MAX_AUTO_BATCH = 4096  # then the rest in chunks of at most this many samples
INPUT_LAYER_FLOATS = 2**22  # the input layer's output is kept if it holds at most this many
OUTPUT_FLOATS = 2**20  # outputs on the whole set are kept for the surrogate up to this size

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _chunks(size: int, batch_size: int | None, *, early_exit: bool) -> list[tuple[int, int]]:
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
class Walks:
    """Directions d (B, n) from the trained weights, and what the landscape keeps for
    each: the input layer's output along d on every sample, `along` (one (N, ...)
    tensor per direction), or None when the model has no cached input layer."""

    directions: torch.Tensor
    along: list[torch.Tensor] | None


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


class Landscape:
    """A landscape set on one device, and the metric of any weight vector on it.

    `metric="loss"` sums `loss_fn` per sample (the loss is assumed to be a mean over
    the batch of non-negative per-sample terms, as the usual PyTorch losses are);
    `metric="accuracy"` counts errors. Points are w* + c*d for directions d given as
    `Walks` (see `walks`); `points_per_pass > 1` scores that many per forward pass
    with `torch.func.vmap`. When the model's first weighted layer is affine (see
    `input_layer`) and its output fits INPUT_LAYER_FLOATS, that output is computed
    once per direction instead of at every point. With `keep_outputs` (loss metric,
    outputs up to OUTPUT_FLOATS), fully scored points return their outputs, from which
    `surrogate_total` models the loss between them. On the CPU, plain cross-entropy and
    Linear layers of some shapes run on the faster kernels of `cpu_kernels`.
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
        keep_outputs: bool = True,
    ):
        self.model = model
        self.params = params
        self.loss_fn = faster_loss(loss_fn, y) or loss_fn  # see `cpu_kernels`
        self.metric = metric
        self.points_per_pass = points_per_pass
        self.size = len(x)
        self.sample_max = math.inf if metric == "loss" else 1.0
        self._early_chunks = _chunks(self.size, batch_size, early_exit=True)
        self._full_chunks = _chunks(self.size, batch_size, early_exit=False)
        self._hold_point()
        self.x, self.y = x, y
        per_sample = self._per_sample_losses(params.flat)
        # Early exit needs per-sample terms >= 0; a loss that cannot be checked, or has
        # negative terms (a Gaussian NLL, say), is always scored in full.
        self.losses_nonnegative = per_sample is not None and bool((per_sample >= 0).all())
        if per_sample is not None and not self.losses_nonnegative and metric == "loss":
            warnings.warn(
                "loss_fn has negative per-sample terms at the trained weights, so a partial "
                "sum bounds nothing: every point is scored on the whole set (no early exit)",
                RuntimeWarning,
                stacklevel=3,
            )
        if per_sample is not None:  # hardest first: a point far past a level shows it soon
            order = per_sample.argsort(descending=True, stable=True)
            self.x, self.y = x[order], y[order]
        if points_per_pass > 1 and not self._vmap_works():
            self.points_per_pass = 1
        self.input_layer = find_input_layer(model, params, self.x[:2])
        self._layer_input: torch.Tensor | None = None  # the input layer's, on every sample
        self._layer_output: torch.Tensor | None = None  # h*, its output at w*
        if self.input_layer is not None:
            self._keep_input_layer_output()
        # Linear layers of some shapes multiply through oneDNN on the CPU (see
        # `cpu_kernels`), one point per pass: vmap cannot batch oneDNN's op.
        kept_layer = [] if self.input_layer is None else [self.input_layer.module]
        rows = max(stop - start for start, stop in self._full_chunks)
        self._onednn_linears = (
            onednn_linears(model, x.device, rows, exclude=kept_layer)
            if self.points_per_pass == 1
            else []
        )
        # The outputs of fully scored points feed the surrogate (loss metric only).
        self.keeps_outputs = keep_outputs and metric == "loss"
        still = self.walks(params.flat.new_zeros(1, params.count))
        base = self.score(still, [0], [0.0], np.array([math.inf]), np.array([-math.inf]))
        self.base_total = float(base.lower[0])
        self._base_outputs = base.outputs[0]
        if self._base_outputs is not None and self._base_outputs.numel() > OUTPUT_FLOATS:
            self.keeps_outputs, self._base_outputs = False, None

    def _hold_point(self) -> None:
        """A buffer for the weights of one point, reused, and the model's parameters that
        `_point_loaded` points at it."""
        self._modules_params = [self.model.get_parameter(name) for name in self.params.names]
        self._point = torch.empty_like(self.params.flat)
        self._point_views = list(self.params.tensors(self._point).values())

    def replica(self) -> Landscape:
        """This landscape for another thread to score on at the same time: its own copy
        of the model and point buffer, and, shared read-only, all it computed once
        (the ordered samples, h*, the base outputs)."""
        twin = copy.copy(self)
        twin.model = copy.deepcopy(self.model)
        twin._hold_point()
        name_of = {id(module): name for name, module in self.model.named_modules()}
        twins = dict(twin.model.named_modules())
        if self.input_layer is not None:
            twin.input_layer = self.input_layer.on(twins[name_of[id(self.input_layer.module)]])
        twin._onednn_linears = [twins[name_of[id(m)]] for m in self._onednn_linears]
        return twin

    @property
    def floats_per_walk(self) -> int:
        """Scalars a direction holds besides its own n, in `Walks` and in the outputs
        its search keeps for the surrogate (two points'): a memory cap's unit."""
        along = 0 if self._layer_output is None else self._layer_output.numel()
        return along + (2 * self._base_outputs.numel() if self.keeps_outputs else 0)

    @torch.no_grad()
    def surrogate_total(self, c: float, scored: Sequence[tuple[float, torch.Tensor]]) -> float:
        """The summed loss at c of outputs interpolated sample by sample, quadratic in
        c through those at w* (c = 0) and at two scored points (coefficient, outputs).

        Along a walk a network's outputs are smooth (piecewise polynomial) in c, and
        each sample's loss follows from its own outputs, so near the scored points
        this tracks the loss far more closely than any curve through the two sums.
        Searches use it only to aim; every answer rests on scored points.
        """
        (c1, z1), (c2, z2) = scored
        w1 = c * (c - c2) / (c1 * (c1 - c2))
        w2 = c * (c - c1) / (c2 * (c2 - c1))
        outputs = self._base_outputs * (1 - w1 - w2) + z1 * w1 + z2 * w2
        return self.loss_fn(outputs, self.y).item() * self.size

    def walks(self, directions: torch.Tensor) -> Walks:
        """Directions (B, n) ready to score: the input layer run along each, one
        direction at a time (so a direction's values never depend on the others it
        is batched with)."""
        if self.input_layer is None:
            return Walks(directions, None)
        with torch.no_grad():
            along = [self.input_layer.output(self._layer_input, d) for d in directions]
        return Walks(directions, along)

    @torch.no_grad()
    def _keep_input_layer_output(self) -> None:
        """h*, the input layer's output at the trained weights, and its input, on every
        sample; dropped again (the layer then runs in full) if they are too large."""
        captured: list[torch.Tensor] = []
        module = self.input_layer.module
        handle = module.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
        try:
            for start, stop in self._full_chunks:
                self.model(self.x[start:stop])
        finally:
            handle.remove()
        self._layer_input = torch.cat(captured)
        self._layer_output = self.input_layer.output(self._layer_input, self.params.flat)
        if self._layer_output.numel() > INPUT_LAYER_FLOATS:
            self.input_layer, self._layer_input, self._layer_output = None, None, None

    def _forward(self, flat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The model at weights `flat` (n,) on `x`, without touching the module."""
        return functional_call(self.model, self.params.tensors(flat), (x,))

    def _forward_from(self, flat: torch.Tensor, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """`_forward`, with the input layer's output given as `h`."""
        with self.input_layer.replaced(h):
            return self._forward(flat, x)

    def _vmap_works(self) -> bool:
        """Can this model and its loss be batched over weight sets? Some cannot
        (data-dependent control flow, `.item()`): those are scored one point at a time."""
        try:
            with torch.no_grad():
                stacked = self.params.flat.expand(2, -1)
                outputs = vmap(self._forward, in_dims=(0, None))(stacked, self.x[:2])
                if self.metric == "loss":  # `_sums` batches the loss too
                    vmap(self.loss_fn, in_dims=(0, None))(outputs, self.y[:2])
        except RuntimeError as error:
            warnings.warn(
                f"this model or loss cannot be batched with torch.func.vmap ({error}); scoring one "
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
                for start, stop in self._full_chunks:
                    out = self._forward(flat, self.x[start:stop])
                    per_sample.append(vmap(one)(out, self.y[start:stop]))
        except RuntimeError as error:
            warnings.warn(
                f"loss_fn cannot be split per sample with torch.func.vmap ({error}); every "
                "point is scored on the whole set in the given order: no early exit, no "
                "hardest-first order (slower, same radii)",
                RuntimeWarning,
                stacklevel=4,
            )
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
        walks: Walks,
        rows: Sequence[int],
        coefficients: Sequence[float],
        stop_above: np.ndarray,
        stop_below: np.ndarray,
    ) -> Scores:
        """Bounds on the summed metric at the points w* + coefficients[k] *
        d[rows[k]], for the directions d of `walks`.

        Scoring of a point stops once its lower bound exceeds `stop_above[k]` (past
        every level that matters) or its upper bound is at most `stop_below[k]` (past
        none). A NaN or inf sum stops at once and reads as past every level.
        """
        if self.metric == "loss" and not self.losses_nonnegative:
            stop_above = np.full(len(rows), math.inf)
        origin, directions, along = self.params.flat, walks.directions, walks.along
        count = len(rows)
        totals = np.zeros(count)
        samples = np.zeros(count, dtype=np.int64)
        outputs: list[torch.Tensor | None] = [None] * count
        with self._point_loaded(), linears_through_onednn(self._onednn_linears):
            for first in range(0, count, self.points_per_pass):
                group = slice(first, first + self.points_per_pass)
                if count - first == 1 or self.points_per_pass == 1:
                    row, c = rows[first], coefficients[first]
                    torch.add(origin, directions[row], alpha=c, out=self._point)
                    outputs_of = partial(self._model_on, along=along, row=row, c=c)
                else:
                    picked = list(rows[group])
                    scale = origin.new_tensor(coefficients[group])
                    weights = torch.addcmul(origin, scale[:, None], directions[picked])  # (G, n)
                    outputs_of = partial(
                        self._batch_on, along=along, picked=picked, scale=scale, weights=weights
                    )
                sums = self._score_chunks(outputs_of, stop_above[group], stop_below[group])
                totals[group], samples[group], outputs[group] = sums
        upper = totals.copy()
        unscored = samples < self.size
        upper[unscored] += (self.size - samples[unscored]) * self.sample_max
        upper[~np.isfinite(totals)] = math.inf
        return Scores(lower=totals, upper=upper, samples=samples, outputs=outputs)

    def _model_on(
        self, _active: list[int], chunk: slice, *, along, row: int, c: float
    ) -> torch.Tensor:
        """Outputs (1, B, ...) of the loaded module on a chunk, its input layer's
        output given as h* + c*g where it is kept."""
        if along is None:
            return self.model(self.x[chunk]).unsqueeze(0)
        h = torch.add(self._layer_output[chunk], along[row][chunk], alpha=c)
        with self.input_layer.replaced(h):
            return self.model(self.x[chunk]).unsqueeze(0)

    def _batch_on(
        self, active: list[int], chunk: slice, *, along, picked, scale, weights
    ) -> torch.Tensor:
        """Outputs (G', B, ...) of the still-active points of a group on a chunk."""
        index = torch.as_tensor(active, device=weights.device)
        if along is None:
            return vmap(self._forward, in_dims=(0, None))(weights[index], self.x[chunk])
        g = torch.stack([along[picked[k]][chunk] for k in active])  # (G', B, ...)
        h = self._layer_output[chunk] + scale[index].view(-1, *[1] * (g.dim() - 1)) * g
        forward = vmap(self._forward_from, in_dims=(0, 0, None))
        return forward(weights[index], h, self.x[chunk])

    def _score_chunks(
        self,
        outputs_of: Callable[[list[int], slice], torch.Tensor],
        stop_above: np.ndarray,
        stop_below: np.ndarray,
    ) -> tuple[list[float], list[int], list[torch.Tensor | None]]:
        """Chunk by chunk, the summed metric of G points whose outputs on a chunk are
        `outputs_of(active, chunk)`; a point leaves `active` once decided. Also the
        outputs on every sample of each point scored fully, where they are kept.
        (Plain lists: a group holds a few points, and numpy's per-call cost on such
        small arrays would outweigh the work.)"""
        above, below = stop_above.tolist(), stop_below.tolist()
        totals, samples = [0.0] * len(above), [0] * len(above)
        pieces: list[list[torch.Tensor]] = [[] for _ in above]
        active = list(range(len(above)))
        bounded = [*above, *(below if math.isfinite(self.sample_max) else [])]
        chunks = self._early_chunks if any(map(math.isfinite, bounded)) else self._full_chunks
        for start, stop in chunks:
            outputs = outputs_of(active, slice(start, stop))
            sums = self._sums(outputs, self.y[start:stop]).tolist()
            rest = (self.size - stop) * self.sample_max if stop < self.size else 0.0  # at most
            still = []
            for point, total, output in zip(active, sums, outputs.unbind()):
                totals[point] += total
                samples[point] = stop
                if self.keeps_outputs:
                    pieces[point].append(output)
                if totals[point] <= above[point] and totals[point] + rest > below[point]:
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
