"""Faster exact CPU kernels for a walk's Linear layers and its cross-entropy.

A landscape runs the same model thousands of times on the same samples, so a kernel
that is slow at its shapes costs in every evaluation. On the CPU two are:

- the log-softmax of `F.cross_entropy`, along a last dim of fewer than 16 classes.
  `cross_entropy` lays the logits out class-major, (C, B), and takes it along dim 0,
  across the samples: for 3-15 classes and 200-4000 samples, 1.1-9x faster (2.5-7.4x
  for 10 classes and 300 or more), copy included;
- MKL's sgemm, PyTorch's default for an fp32 nn.Linear, against oneDNN's for 1024 rows
  or more: for 6-12 outputs (a classifier's output layer) MKL takes 1.0-2.4x as long
  (1.3-2.4x for 10), and for 256 inputs or more and 16 outputs or more 1.0-1.4x (the
  bias, which MKL adds by a pass of its own, included). `linears_through_onednn`
  sends those layers to oneDNN's product; others (few outputs, narrow inputs) stay
  with MKL, which is as fast or faster there.

Measured kernel by kernel, at 1 and 2 threads on this project's AMD EPYC machines;
`benchmarks/bench_radius_search.py` prints the gain in a whole search. Both compute
the same functions in fp32, so values differ by rounding only (about 1e-7 relative),
and each is chosen by a fixed rule on shapes, never by timing, so a point's value
does not depend on the machine's load.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import cache, partial

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["cross_entropy", "faster_loss", "linears_through_onednn", "onednn_linears"]

FEW_CLASSES = range(3, 16)  # where the class-major log-softmax is faster,
CLASS_MAJOR_ROWS = 200  # given at least this many samples (measured)
HEAD_WIDTHS = range(6, 13)  # outputs of a layer that oneDNN multiplies faster,
WIDE_INPUTS, WIDE_OUTPUTS = 256, 16  # as it does layers at least this wide,
ONEDNN_ROWS = 1024  # given at least this many rows (measured)

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


def onednn_linears(
    model: nn.Module, device: torch.device, rows: int, exclude: Sequence[nn.Module] = ()
) -> list[nn.Linear]:
    """The model's Linear layers that oneDNN multiplies faster on batches of up to
    `rows` samples, for `linears_through_onednn`. Only layers of exactly type nn.Linear
    qualify, as a subclass may override forward; none of those in `exclude`, and none
    where oneDNN's product would not run (off the CPU, fewer than ONEDNN_ROWS rows) or
    is missing or disagrees."""
    if device.type != "cpu" or rows < ONEDNN_ROWS or not _onednn_works():
        return []
    return [
        m
        for m in model.modules()
        if type(m) is nn.Linear
        and (
            m.out_features in HEAD_WIDTHS
            or (m.in_features >= WIDE_INPUTS and m.out_features >= WIDE_OUTPUTS)
        )
        and all(m is not other for other in exclude)
    ]


@contextmanager
def linears_through_onednn(linears: Sequence[nn.Linear]) -> Iterator[None]:
    """Within the block, `linears` multiply through oneDNN when their input has at
    least ONEDNN_ROWS rows. Not for use inside vmap: oneDNN's op has no batching rule."""
    for module in linears:
        module.forward = partial(_onednn_linear, module)
    try:
        yield
    finally:
        for module in linears:
            del module.forward


def _onednn_linear(module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """`module(x)`, through oneDNN when x has enough rows."""
    rows = x.numel() // max(x.shape[-1], 1)
    if rows >= ONEDNN_ROWS and x.dtype == module.weight.dtype == torch.float32:
        return _onednn_product(x, module.weight, module.bias)
    return F.linear(x, module.weight, module.bias)


def _onednn_product(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """`F.linear(x, weight, bias)` by oneDNN: the op Inductor uses, with no fused op."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


@cache
def _onednn_works() -> bool:
    """Is oneDNN's linear op here (an x86 build's), and does it give F.linear's product?"""
    if not (
        torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    ):
        return False
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(ONEDNN_ROWS, 64, generator=generator)
    weight, bias = torch.randn(10, 64, generator=generator), torch.randn(10, generator=generator)
    try:
        ours = _onednn_product(x, weight, bias)
    except (RuntimeError, TypeError):  # another signature in another torch
        return False
    return torch.allclose(ours, F.linear(x, weight, bias), rtol=1e-5, atol=1e-4)
