"""Float32 products at full precision on a GPU, unless a spec opts in to TF32.

On Ampere and later GPUs cuDNN's convolutions use TF32 (a 10-bit mantissa) by
default, and matrix products do wherever a library turned it on. A loss computed so
is off by about 1e-3 relative, far past a search's rtol: GPU radii would silently part
from CPU radii. The measuring and curvature code run under `float32_precision`, which
sets both switches for the work it wraps and puts back what it found. Torch keeps them
process-wide, so the block is not for threads that need another setting meanwhile.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["float32_precision"]


@contextmanager
def float32_precision(allow_tf32: bool) -> Iterator[None]:
    """TF32 matrix products and convolutions on (`allow_tf32`) or off, inside the block."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = allow_tf32
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn
