"""A landscape: the metric of any weight vector w* + c*d on one dataset, on one device.

It composes the core's pieces, each in a module of its own:
- early exit (`early_exit`): a point is scored chunk by chunk, and scoring stops once
  the partial sum decides the question a search asked;
- hardest-first order (`sample_order`): the samples sorted by their loss at w*, so
  that a point past a level shows it within the first chunks;
- the kept input layer (`input_layer`): the first layer's output is linear in c, so
  it is computed once per direction instead of at every point;
- weight batches (`weight_batches`): several points share a forward pass;
- the surrogate (`surrogate`): fully scored points return their outputs, from which
  a walk's loss between scored points is modelled, for a search to place its probes;
- class-major cross-entropy on the CPU (`cross_entropy`).

The landscape computes on a copy of the model of its own, whose parameters are views
of one buffer that holds the point being scored: the caller's model is never touched.
With `sync_once` (the device path, for a GPU) a call to `score` queues all its work
and brings the bounds to the host once, at its end (`ChunkedSum.sum_on_device`).
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, vmap

from volume_ray.checks import private_copy
from volume_ray.cross_entropy import faster_loss
from volume_ray.directions import perturbed_parameters
from volume_ray.early_exit import ChunkedSum, Scores
from volume_ray.input_layer import KeptOutput, find_input_layer
from volume_ray.models import sample_accuracy
from volume_ray.sample_order import hardest_first, per_sample_losses
from volume_ray.surrogate import OutputSurrogate
from volume_ray.weight_batches import batch_works, losses_per_set

__all__ = ["METRICS", "Landscape", "Prepared", "Scores"]

METRICS = ("loss", "accuracy")
INPUT_LAYER_FLOATS = 2**22  # the input layer's output is kept if it holds at most this many
OUTPUT_FLOATS = 2**20  # outputs on the whole set are kept for the surrogate up to this size

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Prepared:
    """Directions d (B, n) from the trained weights, ready to score: with the input
    layer's output along each on every sample (one (N, ...) tensor per direction),
    or None where the landscape keeps no input layer."""

    directions: torch.Tensor
    layer_outputs: list[torch.Tensor] | None


class Landscape:
    """A landscape set on the device of `x`, and the metric of any weight vector on it.

    `metric="loss"` sums `loss_fn` per sample (the loss is assumed to be a mean over
    the batch of non-negative per-sample terms, as the usual PyTorch losses are);
    `metric="accuracy"` counts errors. Points are w* + c*d for directions d prepared
    by `prepare`; `points_per_pass > 1` scores that many per forward pass; `sync_once`
    keeps the partial sums on the device until a `score` call ends. The input
    layer's output is kept when it holds at most INPUT_LAYER_FLOATS. With
    `keep_outputs` (loss metric, outputs up to OUTPUT_FLOATS), fully scored points
    return their outputs, for `surrogate()`.
    """

    def __init__(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        loss_fn: LossFn,
        *,
        metric: str = "loss",
        batch_size: int | None = None,
        points_per_pass: int = 1,
        keep_outputs: bool = True,
        sync_once: bool = False,
    ):
        self.model = private_copy(model, x.device)
        self.sync_once = sync_once
        self.params = perturbed_parameters(self.model)
        self.loss_fn = faster_loss(loss_fn, y) or loss_fn
        self.metric = metric
        self.size = len(x)
        self.chunked = ChunkedSum(self.size, batch_size, math.inf if metric == "loss" else 1.0)
        self.x, self.y = x, y
        losses = per_sample_losses(
            lambda inputs: self._forward(self.params.flat, inputs),
            self.loss_fn, x, y, self.chunked.full_chunks,
        )  # fmt: skip
        # Early exit needs per-sample terms >= 0; a loss that cannot be checked, or has
        # negative terms (a Gaussian NLL, say), is always scored in full.
        self.losses_nonnegative = losses is not None and bool((losses >= 0).all())
        if losses is not None and not self.losses_nonnegative and metric == "loss":
            warnings.warn(
                "loss_fn has negative per-sample terms at the trained weights, so a partial "
                "sum bounds nothing: every point is scored on the whole set (no early exit)",
                RuntimeWarning,
                stacklevel=3,
            )
        if losses is not None:
            order = hardest_first(losses)
            self.x, self.y = x[order], y[order]
        batched_loss = self.loss_fn if metric == "loss" else None
        if points_per_pass > 1 and not batch_works(
            self._forward, batched_loss, self.params.flat, self.x, self.y
        ):
            points_per_pass = 1
        self.points_per_pass = points_per_pass
        self._keep_input_layer()
        self._hold_point()
        # The outputs of fully scored points feed the surrogate (loss metric only).
        self.keeps_outputs = keep_outputs and metric == "loss"
        still = self.prepare(self.params.flat.new_zeros(1, self.params.count))
        base = self.score(still, [0], [0.0], np.array([math.inf]), np.array([-math.inf]))
        self.base_total = float(base.lower[0])
        self._base_outputs = base.outputs[0]
        if self._base_outputs is not None and self._base_outputs.numel() > OUTPUT_FLOATS:
            self.keeps_outputs, self._base_outputs = False, None

    @torch.no_grad()
    def _keep_input_layer(self) -> None:
        """Find the input layer; keep its input on every sample and h*, its output at
        the trained weights, and put a `KeptOutput` in its place in the model. Left
        as it is (the layer runs in full) when there is none or h* is too large."""
        self.input_layer = find_input_layer(self.model, self.params, self.x[:2])
        self._kept: KeptOutput | None = None
        self._layer_input = self._layer_output = None
        if self.input_layer is None:
            return
        captured: list[torch.Tensor] = []
        hook = self.input_layer.module.register_forward_pre_hook(
            lambda _module, args: captured.append(args[0])
        )
        try:
            for start, stop in self.chunked.full_chunks:
                self.model(self.x[start:stop])
        finally:
            hook.remove()
        inputs = torch.cat(captured)
        outputs = self.input_layer.output(inputs, self.params.flat)
        if outputs.numel() > INPUT_LAYER_FLOATS:
            self.input_layer = None
            return
        self._layer_input, self._layer_output = inputs, outputs
        self.model, self._kept = self.input_layer.keep_in(self.model)

    def _hold_point(self) -> None:
        """Point the model's perturbed parameters at views of one buffer, `_point`: a
        point is loaded by writing its weights there."""
        self._point = torch.empty_like(self.params.flat)
        views = self.params.tensors(self._point)
        for name in self.params.names:
            self.model.get_parameter(name).data = views[name]

    def replica(self) -> Landscape:
        """This landscape for another thread to score on at the same time: its own copy
        of the model and point buffer, and, shared read-only, all it computed once
        (the ordered samples, h*, the base outputs)."""
        twin = copy.copy(self)
        twin.model = copy.deepcopy(self.model)
        twin._hold_point()
        if self._kept is not None:
            path = self.input_layer.path
            twin._kept = twin.model if not path else twin.model.get_submodule(path)
            twin.input_layer = self.input_layer.copy()
        return twin

    @property
    def floats_per_walk(self) -> int:
        """Scalars a direction holds besides its own n, in `Prepared` and in the outputs
        its surrogate keeps (two points'): a memory cap's unit."""
        along = 0 if self._layer_output is None else self._layer_output.numel()
        return along + (2 * self._base_outputs.numel() if self.keeps_outputs else 0)

    def surrogate(self) -> OutputSurrogate | None:
        """A new walk's model of its loss between scored points; None where the
        landscape keeps no outputs (the accuracy metric, or outputs too large)."""
        if not self.keeps_outputs:
            return None
        return OutputSurrogate(self._base_outputs, self.loss_fn, self.y)

    def prepare(self, directions: torch.Tensor) -> Prepared:
        """Directions (B, n) ready to score: the input layer run along each, one
        direction at a time (so a direction's values never depend on the others it
        is batched with)."""
        if self._kept is None:
            return Prepared(directions, None)
        with torch.no_grad():
            along = [self.input_layer.output(self._layer_input, d) for d in directions]
        return Prepared(directions, along)

    def _forward(self, flat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The model at weights `flat` (n,) on `x`, whatever its parameters hold."""
        return functional_call(self.model, self.params.tensors(flat), (x,))

    def _forward_from(self, flat: torch.Tensor, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """`_forward`, with the input layer's output given as `h`."""
        with self._kept.giving(h):
            return self._forward(flat, x)

    def _sums(self, outputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Summed metric of a chunk, per weight set: outputs (P, B, ...) -> (P,) float64."""
        if self.metric == "accuracy":
            errors = (1 - sample_accuracy(outputs, y).double()).sum(1)  # (P,)
            broken = ~torch.isfinite(outputs).flatten(1).all(1)  # NaN logits argmax to 0
            return errors.masked_fill(broken, math.nan)
        if len(outputs) == 1:
            return (self.loss_fn(outputs[0], y).double() * len(y)).reshape(1)
        return losses_per_set(self.loss_fn, outputs, y).double() * len(y)

    @torch.no_grad()
    def score(
        self,
        prepared: Prepared,
        rows: Sequence[int],
        coefficients: Sequence[float],
        stop_above: np.ndarray,
        stop_below: np.ndarray,
    ) -> Scores:
        """Bounds on the summed metric at the points w* + coefficients[k] *
        d[rows[k]], for the directions d of `prepared`.

        Scoring of a point stops once its lower bound exceeds `stop_above[k]` (past
        every level that matters) or its upper bound is at most `stop_below[k]` (past
        none). A NaN or inf sum stops at once and reads as past every level.
        """
        if self.metric == "loss" and not self.losses_nonnegative:
            stop_above = np.full(len(rows), math.inf)
        if self.sync_once:
            return self._score_on_device(prepared, rows, coefficients, stop_above, stop_below)
        origin, directions = self.params.flat, prepared.directions
        count = len(rows)
        totals = np.zeros(count)
        samples = np.zeros(count, dtype=np.int64)
        outputs: list[torch.Tensor | None] = [None] * count
        for first in range(0, count, self.points_per_pass):
            group = slice(first, first + self.points_per_pass)
            if count - first == 1 or self.points_per_pass == 1:
                score_chunk = self._one_point_scorer(prepared, rows[first], coefficients[first])
            else:
                picked = list(rows[group])
                scale = origin.new_tensor(coefficients[group])
                weights = torch.addcmul(origin, scale[:, None], directions[picked])  # (G, n)

                def score_chunk(active, chunk, picked=picked, scale=scale, weights=weights):
                    index = torch.as_tensor(active, device=weights.device)
                    outputs = self._many_points(
                        prepared, chunk, [picked[k] for k in active], scale[index], weights[index]
                    )
                    return self._scored(outputs, chunk)

            sums = self.chunked.sum(
                score_chunk, stop_above[group].tolist(), stop_below[group].tolist(),
                keep_outputs=self.keeps_outputs,
            )  # fmt: skip
            totals[group], samples[group], outputs[group] = sums
        return self.chunked.scores(totals, samples, outputs)

    def _score_on_device(
        self,
        prepared: Prepared,
        rows: Sequence[int],
        coefficients: Sequence[float],
        stop_above: np.ndarray,
        stop_below: np.ndarray,
    ) -> Scores:
        """`score` with one host sync: every group's work queued on the device, the
        bounds brought back together at the end. The round's numbers go to the device
        first, through pinned memory, so that their copy waits for nothing."""
        origin, directions = self.params.flat, prepared.directions
        count = len(rows)
        bounds = np.stack([stop_above, stop_below, np.asarray(coefficients, dtype=np.float64)])
        above, below, scales = _on_device(bounds, origin.device)
        indices = _on_device(np.asarray(rows, dtype=np.int64), origin.device)
        groups = [
            slice(first, first + self.points_per_pass)
            for first in range(0, count, self.points_per_pass)
        ]
        found = []
        for group in groups:
            first = group.start
            if count - first == 1 or self.points_per_pass == 1:
                score_chunk = self._one_point_scorer(prepared, rows[first], coefficients[first])
            else:
                picked = list(rows[group])
                scale = scales[group].to(origin.dtype)
                weights = torch.addcmul(origin, scale[:, None], directions[indices[group]])

                def score_chunk(_active, chunk, picked=picked, scale=scale, weights=weights):
                    return self._scored(
                        self._many_points(prepared, chunk, picked, scale, weights), chunk
                    )

            plan = self.chunked.plan(stop_above[group].tolist(), stop_below[group].tolist())
            found.append(self.chunked.sum_on_device(
                score_chunk, above[group], below[group], plan, keep_outputs=self.keeps_outputs
            ))  # fmt: skip
        totals = torch.cat([t for t, _, _ in found])
        samples = torch.cat([n for _, n, _ in found])
        on_host = torch.stack([totals, samples.double()]).cpu().numpy()  # the one sync
        totals, samples = on_host[0], on_host[1].astype(np.int64)
        outputs = [
            kept for group, (_, _, pieces) in zip(groups, found)
            for kept in self.chunked.whole_outputs(pieces, samples[group])
        ]  # fmt: skip
        return self.chunked.scores(totals, samples, outputs)

    def _one_point_scorer(self, prepared: Prepared, row: int, c: float):
        """A chunk scorer of the point w* + c * d[row], loaded into `_point`."""
        torch.add(self.params.flat, prepared.directions[row], alpha=c, out=self._point)
        h = None if prepared.layer_outputs is None else prepared.layer_outputs[row]
        return lambda _active, chunk: self._scored(self._one_point(h, c, chunk), chunk)

    def _scored(self, outputs: torch.Tensor, chunk: slice) -> tuple[torch.Tensor, torch.Tensor]:
        return outputs, self._sums(outputs, self.y[chunk])

    def _one_point(self, h: torch.Tensor | None, c: float, chunk: slice) -> torch.Tensor:
        """Outputs (1, B, ...) on a chunk of the point loaded in `_point`, the input
        layer's output given as h* + c*g where it is kept."""
        if h is None:
            return self.model(self.x[chunk]).unsqueeze(0)
        with self._kept.giving(torch.add(self._layer_output[chunk], h[chunk], alpha=c)):
            return self.model(self.x[chunk]).unsqueeze(0)

    def _many_points(
        self,
        prepared: Prepared,
        chunk: slice,
        picked: list[int],
        scale: torch.Tensor,
        weights: torch.Tensor,
    ) -> torch.Tensor:
        """Outputs (G, B, ...) on a chunk of G points w* + scale[k] * d[picked[k]],
        whose weights are given stacked (G, n)."""
        if prepared.layer_outputs is None:
            return vmap(self._forward, in_dims=(0, None))(weights, self.x[chunk])
        g = torch.stack([prepared.layer_outputs[row][chunk] for row in picked])
        h = self._layer_output[chunk] + scale.view(-1, *[1] * (g.dim() - 1)) * g
        forward = vmap(self._forward_from, in_dims=(0, 0, None))
        return forward(weights, h, self.x[chunk])


def _on_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """`array` on `device`, copied from pinned memory without waiting on a GPU."""
    tensor = torch.from_numpy(array)
    if device.type == "cuda":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)
