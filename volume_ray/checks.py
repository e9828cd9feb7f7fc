"""What the core's public functions (`measure_radii`, `curvature`) share in handling
their arguments: checks whose errors name the argument, the rule and the value, before
any work starts; the device to work on; and the private copy of the model they compute
with, so that the caller's model is never written, moved or switched to eval mode."""

from __future__ import annotations

import copy
import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "BOOLEAN",
    "CALLABLE",
    "MODEL_AND_DATA_RULES",
    "Rule",
    "check",
    "check_int",
    "instance",
    "integer",
    "one_of",
    "optional",
    "private_copy",
    "real",
    "resolve_device",
]


@dataclass(frozen=True)
class Rule:
    """What an argument must be: `text` says it in words (after "must be"), `holds`
    tests a value."""

    text: str
    holds: Callable[[object], bool]


def _is_number(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def integer(minimum: int) -> Rule:
    return Rule(
        f"an integer >= {minimum}",
        lambda v: _is_number(v) and isinstance(v, numbers.Integral) and v >= minimum,
    )


def real(low: float, high: float = math.inf, *, low_open: bool = False) -> Rule:
    """A number in [low, high) (or (low, high) with `low_open`); finite."""
    interval = f"{'(' if low_open else '['}{low}, {high})"
    return Rule(
        f"a finite number in {interval}",
        lambda v: (
            _is_number(v) and math.isfinite(v) and (low < v if low_open else low <= v) and v < high
        ),
    )


def one_of(values: tuple) -> Rule:
    return Rule(f"one of {values}", lambda v: isinstance(v, str) and v in values)


def instance(kind: type, name: str) -> Rule:
    return Rule(f"a {name}", lambda v: isinstance(v, kind))


def optional(rule: Rule) -> Rule:
    return Rule(f"None or {rule.text}", lambda v: v is None or rule.holds(v))


BOOLEAN = Rule("True or False", lambda v: isinstance(v, bool))
CALLABLE = Rule("callable as loss_fn(outputs, targets)", callable)
# What every core function that runs a model on data takes first.
MODEL_AND_DATA_RULES = {
    "model": instance(nn.Module, "torch.nn.Module"),
    "x": instance(torch.Tensor, "torch.Tensor"),
    "y": instance(torch.Tensor, "torch.Tensor"),
    "loss_fn": CALLABLE,
}


def check(rules: Mapping[str, Rule], arguments: Mapping[str, object]) -> None:
    """Check every argument named in `rules`, in the table's order: the first that
    breaks its rule raises a ValueError naming it, the rule and the value."""
    for name, rule in rules.items():
        value = arguments[name]
        if not rule.holds(value):
            shown = repr(value)
            if len(shown) > 80 or isinstance(value, torch.Tensor | nn.Module):
                shown = f"a {type(value).__name__}"
            raise ValueError(f"{name} must be {rule.text}, got {shown}")


def check_int(name: str, value: object, *, minimum: int) -> None:
    check({name: integer(minimum)}, {name: value})


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


def private_copy(model: nn.Module, device: torch.device) -> nn.Module:
    """A copy of `model` on `device`, in eval mode, for the core to compute with: another
    thread may keep using the caller's model meanwhile."""
    try:
        copied = copy.deepcopy(model)
    except (TypeError, RuntimeError, copy.Error) as error:
        raise ValueError(
            f"model cannot be copied ({error}): volume_ray computes on a copy of the model, "
            "so that yours is never changed; keep what copy.deepcopy refuses (a lock, an "
            "open file) outside the module, or give the module a __deepcopy__"
        ) from None
    return copied.to(device).eval()
