"""Argument checks shared by the core's public functions (`measure_radii`, `curvature`):
each error names the argument, the rule and the value, before any work starts."""

from __future__ import annotations

import numbers

import torch
from torch import nn

__all__ = ["check_int", "resolve_device"]


def check_int(name: str, value: object, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def resolve_device(requested: str | torch.device | None, model: nn.Module) -> torch.device:
    """Where to work: `requested`, or the model's device; 'cuda' means the current GPU."""
    if requested is None:
        return next(model.parameters()).device
    try:
        device = torch.device(requested)
    except (RuntimeError, TypeError) as error:
        raise ValueError(
            f"device must name a torch device such as 'cpu' or 'cuda:0': {error}"
        ) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r} was asked for, but CUDA is not available")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    return device
