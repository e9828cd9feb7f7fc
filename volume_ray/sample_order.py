"""The landscape's samples, hardest first: a point far past a level shows it soonest.

Early exit (`early_exit`) stops scoring a point once a partial sum decides it, and a
partial sum grows fastest over the samples whose loss is highest. Along a walk those
stay much the same ones as at w*, so the samples are ordered once, by their loss at
w*. That needs the loss split per sample, which `torch.func.vmap` does for the usual
losses; one it cannot split keeps the given order and is never stopped early.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch
from torch.func import vmap

__all__ = ["hardest_first", "per_sample_losses"]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@torch.no_grad()
def per_sample_losses(
    forward: Callable[[torch.Tensor], torch.Tensor],
    loss_fn: LossFn,
    x: torch.Tensor,
    y: torch.Tensor,
    chunks: Sequence[tuple[int, int]],
) -> torch.Tensor | None:
    """The loss of each sample, `loss_fn` on `forward`'s outputs one sample at a time;
    None, with a warning saying what it costs, where vmap cannot split the loss."""

    def one(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return loss_fn(out.unsqueeze(0), target.unsqueeze(0))

    try:
        return torch.cat(
            [vmap(one)(forward(x[start:stop]), y[start:stop]) for start, stop in chunks]
        )
    except RuntimeError as error:
        warnings.warn(
            f"loss_fn cannot be split per sample with torch.func.vmap ({error}); every "
            "point is scored on the whole set in the given order: no early exit, no "
            "hardest-first order (slower, same radii)",
            RuntimeWarning,
            stacklevel=5,
        )
        return None


def hardest_first(losses: torch.Tensor) -> torch.Tensor:
    """The permutation that sorts samples by decreasing loss, ties in their own order."""
    return losses.argsort(descending=True, stable=True)
