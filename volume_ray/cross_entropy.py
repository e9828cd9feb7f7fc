"""Cross-entropy over few classes, computed class-major on the CPU: same values, faster.

A landscape evaluates the same loss thousands of times on the same samples. For a
last dim of fewer than 16 classes, `F.cross_entropy`'s log-softmax along the classes is
slow on the CPU; laid out class-major, (C, B), the same log-softmax runs across the
samples, which vectorises. Both compute the same function in fp32, so values differ
by rounding only (about 1e-7 relative); the layout is chosen by a fixed rule on shapes,
never by timing, so a point's value does not depend on the machine's load.
`benchmarks/bench_radius_search.py` prints the gain in a whole search.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["cross_entropy", "faster_loss"]

FEW_CLASSES = range(3, 16)  # where the class-major log-softmax is faster,
CLASS_MAJOR_ROWS = 200  # given at least this many samples (measured)

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def faster_loss(loss_fn: LossFn, targets: torch.Tensor) -> LossFn | None:
    """A faster equivalent of `loss_fn` on these targets, or None if there is none.

    There is one for plain cross-entropy: `F.cross_entropy`, or an
    `nn.CrossEntropyLoss` with its defaults, on class-index targets that are all
    >= 0 (so that none is the ignored index).
    """
    plain = loss_fn is F.cross_entropy or (
        type(loss_fn) is nn.CrossEntropyLoss
        and loss_fn.weight is None
        and loss_fn.reduction == "mean"
        and loss_fn.label_smoothing == 0.0
    )
    indices = targets.dim() == 1 and not targets.is_floating_point()
    if plain and indices and len(targets) > 0 and bool((targets >= 0).all()):
        return cross_entropy
    return None


def cross_entropy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """`F.cross_entropy(outputs, targets)`, over class-major logits where that is faster."""
    if (
        outputs.dim() == 2
        and targets.dim() == 1
        and outputs.device.type == "cpu"
        and len(outputs) >= CLASS_MAJOR_ROWS
        and outputs.shape[1] in FEW_CLASSES
    ):
        logits = outputs.t().contiguous().unsqueeze(0)  # (1, C, B)
        return F.cross_entropy(logits, targets.unsqueeze(0))
    return F.cross_entropy(outputs, targets)
