"""Several weight sets in one forward pass, with `torch.func.vmap`.

On a GPU one small forward pass leaves most of the device idle. Stacking P weight sets
and vmapping the model over them (as in PyTorch's model-ensembling tutorial) runs P
points in one pass. Some models and losses cannot be batched so (data-dependent
control flow, `.item()`); those are scored one weight set per pass, with a warning.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch.func import vmap

__all__ = ["batch_works", "losses_per_set"]

Forward = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (flat weights, x) -> outputs
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@torch.no_grad()
def batch_works(
    forward: Forward, loss_fn: LossFn | None, flat: torch.Tensor, x: torch.Tensor, y: torch.Tensor
) -> bool:
    """Can `forward` at two stacked copies of `flat`, and `loss_fn` (when given) on its
    outputs, run under vmap? Tried on the first two samples; False with a warning."""
    try:
        outputs = vmap(forward, in_dims=(0, None))(flat.expand(2, -1), x[:2])
        if loss_fn is not None:
            losses_per_set(loss_fn, outputs, y[:2])
    except RuntimeError as error:
        warnings.warn(
            f"this model or loss cannot be batched with torch.func.vmap ({error}); scoring one "
            "weight set per forward pass instead",
            RuntimeWarning,
            stacklevel=5,
        )
        return False
    return True


def losses_per_set(loss_fn: LossFn, outputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """`loss_fn` of each weight set's outputs: (P, B, ...) -> (P,)."""
    return vmap(loss_fn, in_dims=(0, None))(outputs, y)
