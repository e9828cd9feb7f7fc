"""A model of a walk's loss between scored points, from the model outputs there.

Along a walk w* + c*d a network's outputs are smooth (piecewise polynomial) in c, and
each sample's loss follows from its own outputs. So outputs interpolated sample by
sample, quadratic in c through those at w* and at two scored points, give a loss that
tracks the true one near those points far more closely than any curve through the
two sums. A search uses it only to place its next probe (`search.BracketSearch`);
every answer rests on scored points.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

__all__ = ["OutputSurrogate"]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class OutputSurrogate:
    """The summed loss of one walk at any c, from the outputs at w* (`base_outputs`)
    and at the first two points scored fully with a finite sum; it knows nothing once
    a third such point exists, as the search then interpolates scored points alone."""

    def __init__(self, base_outputs: torch.Tensor, loss_fn: LossFn, y: torch.Tensor):
        self._base, self._loss_fn, self._y = base_outputs, loss_fn, y
        self._scored: dict[float, torch.Tensor] = {}  # coefficient -> outputs
        self._count = 0
        self._known: dict[float, float] = {}  # values computed ahead (`remember`)

    def record(self, coefficient: float, total: float, outputs: torch.Tensor | None) -> None:
        """Take a scored point: its sum and, where it was scored fully, its outputs."""
        if outputs is None or not math.isfinite(total):
            return
        self._count += 1
        self._known.clear()
        if self._count <= 2:
            self._scored[coefficient] = outputs
        else:
            self._scored.clear()

    def __call__(self, c: float) -> float | None:
        """The summed loss at c, or None without two scored points to interpolate."""
        if c in self._known:
            return self._known[c]
        summed = self.summed_loss(c)
        return None if summed is None else summed.item()

    @torch.no_grad()
    def summed_loss(self, c: float) -> torch.Tensor | None:
        """The summed loss at c as a float64 scalar on the outputs' device, not yet
        read back (so that a caller can read many walks' values in one sync); None
        without two scored points."""
        if len(self._scored) != 2:
            return None
        (c1, z1), (c2, z2) = self._scored.items()
        w1 = c * (c - c2) / (c1 * (c1 - c2))
        w2 = c * (c - c1) / (c2 * (c2 - c1))
        outputs = self._base * (1 - w1 - w2) + z1 * w1 + z2 * w2
        return self._loss_fn(outputs, self._y).double() * len(self._y)

    def remember(self, c: float, value: float) -> None:
        """Take the value at c computed ahead, which a call at c then returns."""
        self._known[c] = value
