"""Random directions in weight space, regenerated from (seed, index), never stored.

Direction i of seed s is the paper's convention exactly: a CPU generator seeded with
s + i draws one standard-normal tensor per perturbed parameter, in
`named_parameters()` order. Those are the numbers `torch.manual_seed(s + i)` followed
by `randn_like` on the CPU would give, but the global RNG is never touched. That is
paper parity, and the default (`direction_rng="cpu"`). On a GPU those draws cost CPU
time and a copy: `direction_rng="device"` draws direction i on the device instead,
one normal vector of n from a generator of that device seeded from (s, i) (Philox on
CUDA). It is reproducible per (seed, i) on a device kind, whatever the sharding, but
its numbers are not the paper's.

Directions live as rows of a flat matrix whose columns follow the concatenated
perturbed parameters. Filter normalisation turns raw Gaussians `g` into the
directions `d` that the walk w(c) = w* + c*d uses.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "DIRECTION_RNGS",
    "FILTER_NORMS",
    "PerturbedParameters",
    "FilterNorm",
    "perturbed_parameters",
    "raw_directions",
]

FILTER_NORMS = ("paper", "none", "li2018")
DIRECTION_RNGS = ("cpu", "device")


@dataclass(frozen=True)
class PerturbedParameters:
    """The parameters a walk moves, with their flat layout.

    `names[k]` occupies columns `offsets[k]:offsets[k] + shapes[k].numel()` of a flat
    vector; `flat` is the trained weight vector w* (a detached copy).
    """

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]
    offsets: tuple[int, ...]
    flat: torch.Tensor  # (n,)

    @property
    def count(self) -> int:
        """n, the number of perturbed scalars: the exponent of the paper's volume."""
        return self.flat.numel()

    def tensors(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views of `flat` (..., n) shaped as the parameters, keyed by name."""
        lead = flat.shape[:-1]
        return {
            name: flat[..., off : off + shape.numel()].view(*lead, *shape)
            for name, shape, off in zip(self.names, self.shapes, self.offsets)
        }


def _is_perturbed(name: str) -> bool:
    tokens = name.split(".")
    return "weight" in tokens or "bias" in tokens


def perturbed_parameters(model: nn.Module) -> PerturbedParameters:
    """Every parameter whose dotted name has a `weight` or `bias` token, in order."""
    chosen = [(n, p) for n, p in model.named_parameters() if _is_perturbed(n)]
    if not chosen:
        names = [n for n, _ in model.named_parameters()]
        raise ValueError(
            "model has no parameter to perturb: directions cover parameters whose dotted "
            f"name has a 'weight' or 'bias' token, and the model's are {names}"
        )
    dtypes = {p.dtype for _, p in chosen}
    if len(dtypes) > 1:
        raise ValueError(f"model: perturbed parameters must share one dtype, got {dtypes}")
    offsets, total = [], 0
    for _, p in chosen:
        offsets.append(total)
        total += p.numel()
    flat = torch.cat([p.detach().reshape(-1) for _, p in chosen]).clone()
    return PerturbedParameters(
        names=tuple(n for n, _ in chosen),
        shapes=tuple(p.shape for _, p in chosen),
        offsets=tuple(offsets),
        flat=flat,
    )


def raw_directions(
    params: PerturbedParameters,
    seed: int,
    indices: Sequence[int],
    *,
    rng: str = "cpu",
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The raw Gaussians g of directions `indices`: (len(indices), n). With rng "cpu"
    on the CPU (into `out` when given, a pinned buffer say); with rng "device" on the
    device of `params.flat`."""
    if rng == "device":
        device = params.flat.device
        rows = torch.empty(len(indices), params.count, dtype=params.flat.dtype, device=device)
        for row, index in zip(rows, indices):
            generator = torch.Generator(device).manual_seed(device_seed(seed, index))
            torch.randn(params.count, generator=generator, dtype=rows.dtype, device=device, out=row)
        return rows
    rows = (
        out if out is not None else torch.empty(len(indices), params.count, dtype=params.flat.dtype)
    )
    for row, index in zip(rows, indices):
        generator = torch.Generator().manual_seed(seed + index)
        for shape, block in zip(params.shapes, params.tensors(row).values()):
            torch.randn(shape, generator=generator, dtype=rows.dtype, out=block)
    return rows


def device_seed(seed: int, index: int) -> int:
    """The device generator's seed of direction `index` of `seed`: one per pair, unlike
    the paper's seed + index, under which (s, i + 1) and (s + 1, i) share a direction."""
    if not 0 <= seed < 2**31 or not 0 <= index < 2**32:
        raise ValueError(
            f"seed must lie in [0, 2**31) and directions below 2**32 with direction_rng "
            f"'device', got seed {seed} and direction {index}"
        )
    return (seed << 32) + index


class FilterNorm:
    """Turns raw Gaussians into directions; computed once per model, on its device.

    - `paper`: entries of each 2-D and 4-D tensor are multiplied row by row (output
      unit or filter) by the norm of that row of the trained weight; everything else
      by 1. The Gaussian row is not divided by its own norm.
    - `none`: d = g, isotropic.
    - `li2018`: Li et al. 2018. Each row of a tensor with 2 or more dims is rescaled to
      the norm of the weight's row; a 1-D tensor counts as one row.
    """

    def __init__(self, params: PerturbedParameters, mode: str):
        if mode not in FILTER_NORMS:
            raise ValueError(f"filter_norm must be one of {FILTER_NORMS}, got {mode!r}")
        self.mode = mode
        row_of_column, row_norms, rows = [], [], 0
        device = params.flat.device
        for weight in params.tensors(params.flat).values():
            if mode == "paper" and weight.dim() not in (2, 4):
                norms = torch.ones(weight.numel(), dtype=weight.dtype, device=device)
                per_row = 1
            elif weight.dim() >= 2:
                norms = weight.flatten(1).norm(dim=1)  # (rows,)
                per_row = weight[0].numel()
            else:
                norms = weight.norm().reshape(1)
                per_row = weight.numel()
            row_of_column.append(
                torch.arange(rows, rows + len(norms), device=device).repeat_interleave(per_row)
            )
            row_norms.append(norms)
            rows += len(norms)
        self._row_of_column = torch.cat(row_of_column)  # (n,) row id of each column
        self._row_norms = torch.cat(row_norms)  # (rows,) norm of each weight row
        self._rows = rows
        # paper: the per-column multiplier is fixed for the model.
        self._scale = self._row_norms[self._row_of_column] if mode == "paper" else None

    @property
    def scale(self) -> torch.Tensor:
        """f, the fixed per-column multiplier of `paper` and `none` (ones): (n,), a copy.
        Walks then move w = w* + f*z, and z are the coordinates radii and curvature use."""
        if self.mode == "li2018":
            raise ValueError(
                "filter_norm: li2018 rescales each direction by its own norm, so it has no "
                "fixed coordinate scale; use filter_norm='paper' or 'none'"
            )
        if self.mode == "none":
            return torch.ones_like(self._row_of_column, dtype=self._row_norms.dtype)
        return self._scale.clone()

    def __call__(self, raw: torch.Tensor) -> torch.Tensor:
        """Directions d from raw Gaussians g: (B, n) -> (B, n)."""
        if self.mode == "none":
            return raw.clone()
        if self.mode == "paper":
            return raw * self._scale
        squares = raw.new_zeros(len(raw), self._rows)
        squares.index_add_(1, self._row_of_column, raw.square())  # (B, rows)
        factor = self._row_norms / squares.sqrt()  # (B, rows)
        return raw * factor[:, self._row_of_column]
