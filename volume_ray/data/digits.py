"""sklearn's 1,797 real 8x8 handwritten digits: embedded, no download."""

from __future__ import annotations

import torch
from sklearn.datasets import load_digits as _sklearn_digits

__all__ = ["load_digits"]


def load_digits(dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Return `(x, y)`: x (1797, 64) standardised per pixel over the set, y (1797,) int64."""
    bunch = _sklearn_digits()
    x = torch.as_tensor(bunch.data, dtype=dtype)  # (N, 64), pixel values 0..16
    y = torch.as_tensor(bunch.target, dtype=torch.int64)  # (N,)
    mean = x.mean(0)
    std = x.std(0).clamp_min(1e-6)  # some corner pixels are always 0
    return (x - mean) / std, y
