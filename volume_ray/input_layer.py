"""The first weighted layer of a walk, computed once: its output is linear in c.

Along w(c) = w* + c*d, the first layer that uses any weight sees the same input at
every c (the data, maybe reshaped), and a Linear or Conv layer is affine in its own
weight and bias: layer(x; W + cD, b + c*e) = layer(x; W, b) + c * layer(x; D, e). Its
output at any c is therefore h* + c*g, with h* computed once per landscape and g once
per direction, and every later evaluation skips that layer's matrix product: for a linear model, all
of the work.

In the landscape's own copy of the model, a `KeptOutput` takes the layer's place and
returns the output it is given. The values differ from a plain forward pass by
rounding only (summation order).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.func import functional_call

from volume_ray.directions import PerturbedParameters

__all__ = ["AFFINE_LAYERS", "InputLayer", "KeptOutput", "find_input_layer"]

AFFINE_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


class InputLayer:
    """One affine layer whose input does not depend on any perturbed weight.

    `path` is the layer's name in the model ("" for the model itself); `names` maps the
    layer's own parameter names ("weight", "bias") to their names in the model, which
    are columns of the flat layout of `params`.
    """

    def __init__(
        self, module: nn.Module, path: str, names: dict[str, str], params: PerturbedParameters
    ):
        self.module, self.path = module, path
        self._names = names
        self._params = params

    def copy(self) -> InputLayer:
        """This layer with a module of its own, for another thread to compute with."""
        return InputLayer(copy.deepcopy(self.module), self.path, self._names, self._params)

    def output(self, inputs: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
        """The layer at the weights in `flat` (n,): the trained ones give h*, a
        direction gives g (the layer is linear in its weights, bias included)."""
        views = self._params.tensors(flat)
        weights = {own: views[full] for own, full in self._names.items()}
        return functional_call(self.module, weights, (inputs,))

    def keep_in(self, model: nn.Module) -> tuple[nn.Module, KeptOutput]:
        """Put a `KeptOutput` in the layer's place in `model` (a copy of the model's own,
        which this changes); return the model, which is the `KeptOutput` itself when the
        layer was the whole model, and the `KeptOutput`."""
        kept = KeptOutput(self.module)
        if not self.path:
            return kept, kept
        parent, _, child = self.path.rpartition(".")
        setattr(model.get_submodule(parent), child, kept)
        return model, kept


class KeptOutput(nn.Module):
    """Stands in for the input layer: returns the output set by `giving`, computed
    elsewhere. It holds the layer's parameters, so the model's parameter names, and
    `functional_call` on them, stay as they were. Works inside `vmap` with a batched
    output."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        for name, parameter in layer.named_parameters(recurse=False):
            self.register_parameter(name, parameter)
        self.output: torch.Tensor | None = None

    def forward(self, *_args, **_kwargs) -> torch.Tensor:
        if self.output is None:
            raise RuntimeError("the input layer's output was not given: use `giving`")
        return self.output

    @contextmanager
    def giving(self, output: torch.Tensor) -> Iterator[None]:
        """Within the block, the layer's output is `output`."""
        self.output = output
        try:
            yield
        finally:
            self.output = None


def find_input_layer(
    model: nn.Module, params: PerturbedParameters, x: torch.Tensor
) -> InputLayer | None:
    """The model's first weighted layer, if caching its output is exact: a Linear or
    Conv layer (exactly those types, so no overridden forward), called once per
    forward pass, whose parameters are all perturbed, and whose input is the same at
    two different weight vectors. None otherwise (the walk then runs in full)."""
    with_weights = [m for m in model.modules() if any(True for _ in m.parameters(recurse=False))]
    calls: list[tuple[nn.Module, torch.Tensor]] = []

    def note(module: nn.Module, args: tuple) -> None:
        calls.append((module, args[0] if args else None))

    def run(flat: torch.Tensor) -> list[tuple[nn.Module, torch.Tensor]]:
        calls.clear()
        handles = [m.register_forward_pre_hook(note) for m in with_weights]
        try:
            with torch.no_grad():
                functional_call(model, params.tensors(flat), (x,))
        finally:
            for handle in handles:
                handle.remove()
        return list(calls)

    trained = run(params.flat)
    if not trained:
        return None
    first, inputs = trained[0]
    if not isinstance(inputs, torch.Tensor):
        return None
    if type(first) not in AFFINE_LAYERS or sum(m is first for m, _ in trained) != 1:
        return None
    full_names = {id(p): name for name, p in model.named_parameters()}
    names = {own: full_names.get(id(p)) for own, p in first.named_parameters(recurse=False)}
    if not all(name in params.names for name in names.values()):
        return None
    moved = run(params.flat * 1.5 + 0.25)
    if not (moved and moved[0][0] is first and torch.equal(moved[0][1], inputs)):
        return None
    path = next(name for name, module in model.named_modules() if module is first)
    return InputLayer(first, path, names, params)
