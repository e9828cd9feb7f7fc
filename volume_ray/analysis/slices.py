"""A 2-D slice of the loss landscape through three minima (the paper's Fig. 1).

The plane is w(a, b) = w1 + a (w2 - w1) + b (w3 - w1), so the three minima sit at
(0, 0), (1, 0) and (0, 1) whatever their distances.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from volume_ray.directions import perturbed_parameters

__all__ = ["loss_plane"]


@torch.no_grad()
def loss_plane(
    minima: list[nn.Module],
    x: torch.Tensor,
    y: torch.Tensor,
    loss_fn,
    *,
    resolution: int = 25,
    span: tuple[float, float] = (-0.5, 1.5),
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(a, b, loss): the mean loss on (x, y) over a resolution x resolution grid of the
    plane through three minima of one architecture; loss[i, j] is at (a[i], b[j])."""
    if len(minima) != 3:
        raise ValueError(f"a plane needs exactly three minima, got {len(minima)}")
    params = [perturbed_parameters(m) for m in minima]
    if len({p.names for p in params}) != 1:
        raise ValueError("the three minima must share an architecture")
    w1, w2, w3 = (p.flat for p in params)
    model = minima[0].eval()
    a = np.linspace(*span, resolution)
    b = np.linspace(*span, resolution)
    losses = np.empty((resolution, resolution))
    for i, alpha in enumerate(a):
        for j, beta in enumerate(b):
            w = w1 + float(alpha) * (w2 - w1) + float(beta) * (w3 - w1)
            out = functional_call(model, params[0].tensors(w), (x,))
            losses[i, j] = loss_fn(out, y).item()
    return a, b, losses
