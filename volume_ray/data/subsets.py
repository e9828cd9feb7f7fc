"""The controlled manipulations of training data: base set, extra pool, test split.

A sweep trains model M on base + the first M samples of an ordered extra pool, so
every smaller training set is a prefix of a larger one, and measures it in landscapes
base + the first L samples (L <= M). Everything is deterministic from `data_seed`.

Extra kinds:
- `data`: clean samples.
- `poison`: clean inputs whose labels are moved by a random offset in 1..C-1 (mod C),
  so every one is wrong. Landscapes are the clean base only.
- `noise`: Gaussian inputs with the base set's per-feature mean and std, and random
  labels. Landscapes are the clean base only.
- `imbalanced`: a fraction `imbalance_fraction` of the pool from `imbalance_class`,
  spread so that every prefix holds exactly floor(M * fraction) of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from volume_ray.data.sources import Source

__all__ = ["EXTRA_KINDS", "ExperimentData", "landscapes_use_extras", "split_experiment"]

EXTRA_KINDS = ("data", "poison", "noise", "imbalanced")
_POISON_STREAM, _NOISE_STREAM = 1_000_003, 2_000_003  # seed offsets: independent RNG streams


def landscapes_use_extras(extra_kind: str) -> bool:
    """Poison and noise extras are never part of a landscape: only the clean base is."""
    return extra_kind in ("data", "imbalanced")


@dataclass(frozen=True)
class ExperimentData:
    """The base set, the ordered extra pool and the test split of one sweep."""

    source: Source
    extra_kind: str
    base_x: torch.Tensor
    base_y: torch.Tensor
    pool_x: torch.Tensor
    pool_y: torch.Tensor

    @property
    def base_size(self) -> int:
        return len(self.base_x)

    def training_set(self, extra: int) -> tuple[torch.Tensor, torch.Tensor]:
        """base + the first `extra` samples of the pool: what model M = extra trains on."""
        if not 0 <= extra <= len(self.pool_x):
            raise ValueError(
                f"extra size {extra} is outside the pool: 0..{len(self.pool_x)} extra samples "
                "are available"
            )
        return (
            torch.cat([self.base_x, self.pool_x[:extra]]),
            torch.cat([self.base_y, self.pool_y[:extra]]),
        )

    @property
    def landscapes_use_extras(self) -> bool:
        return landscapes_use_extras(self.extra_kind)

    def landscape_set(self, extra: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The set a landscape of `extra` extra samples measures loss on."""
        return self.training_set(extra if self.landscapes_use_extras else 0)

    @property
    def test_set(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.source.x_test, self.source.y_test


def split_experiment(
    source: Source,
    *,
    base_size: int,
    pool_size: int,
    extra_kind: str = "data",
    data_seed: int = 0,
    imbalance_class: int = 0,
    imbalance_fraction: float = 0.9,
) -> ExperimentData:
    """Draw the base set and a pool of `pool_size` extras from `source`'s train split."""
    if extra_kind not in EXTRA_KINDS:
        raise ValueError(f"dataset.extra_kind must be one of {EXTRA_KINDS}, got {extra_kind!r}")
    if extra_kind != "data" and source.task not in ("classification", "binary"):
        raise ValueError(
            f"dataset.extra_kind {extra_kind!r} needs class labels, and '{source.name}' is a "
            f"{source.task} task: use extra_kind 'data'"
        )
    available = len(source.x_train)
    if base_size < 1 or base_size > available:
        raise ValueError(
            f"dataset.base_size must lie in 1..{available} for '{source.name}' "
            f"({available} training samples), got {base_size}"
        )
    order = torch.randperm(available, generator=torch.Generator().manual_seed(data_seed))
    base, rest = order[:base_size], order[base_size:]
    base_x, base_y = source.x_train[base], source.y_train[base]
    if extra_kind != "noise" and pool_size > len(rest):
        raise ValueError(
            f"dataset.extra_sizes asks for up to {pool_size} extra samples, but only "
            f"{len(rest)} remain in '{source.name}' after a base of {base_size}: "
            f"use extra sizes of at most {len(rest)}"
        )
    if extra_kind == "imbalanced":
        rest = _imbalanced_order(source, rest, pool_size, imbalance_class, imbalance_fraction)
    pool = rest[:pool_size]
    pool_x, pool_y = source.x_train[pool], source.y_train[pool]
    if extra_kind == "poison":
        pool_y = _poisoned(source, pool_y, data_seed)
    elif extra_kind == "noise":
        pool_x, pool_y = _noise(source, base_x, pool_size, data_seed)
    return ExperimentData(source, extra_kind, base_x, base_y, pool_x, pool_y)


def _class_labels(source: Source, y: torch.Tensor) -> torch.Tensor:
    """Integer class of each target (classification or binary tasks)."""
    return y.reshape(len(y)).round().long() if source.task == "binary" else y


def _poisoned(source: Source, y: torch.Tensor, seed: int) -> torch.Tensor:
    """Every label moved by a random offset in 1..C-1, mod C: always wrong."""
    classes = _class_labels(source, y)
    generator = torch.Generator().manual_seed(seed + _POISON_STREAM)
    offsets = torch.randint(1, source.num_classes, (len(y),), generator=generator)
    wrong = (classes + offsets) % source.num_classes
    return wrong.float().reshape(y.shape) if source.task == "binary" else wrong


def _noise(source: Source, base_x: torch.Tensor, size: int, seed: int):
    """Gaussian inputs with the base's per-feature mean and std, and random labels."""
    generator = torch.Generator().manual_seed(seed + _NOISE_STREAM)
    mean, std = base_x.mean(0), base_x.std(0)
    x = mean + std * torch.randn(size, *base_x.shape[1:], generator=generator)
    labels = torch.randint(0, source.num_classes, (size,), generator=generator)
    return x, labels.float()[:, None] if source.task == "binary" else labels


def _imbalanced_order(
    source: Source, rest: torch.Tensor, size: int, majority: int, fraction: float
) -> torch.Tensor:
    """Reorder `rest` so its first `size` samples hold floor(M * fraction) of class
    `majority` in every prefix of length M."""
    if not 0 <= fraction <= 1:
        raise ValueError(f"dataset.imbalance_fraction must lie in [0, 1], got {fraction!r}")
    classes = _class_labels(source, source.y_train[rest])
    if not 0 <= majority < source.num_classes:
        raise ValueError(
            f"dataset.imbalance_class must lie in 0..{source.num_classes - 1}, got {majority}"
        )
    ones, others = rest[classes == majority], rest[classes != majority]
    positions = torch.arange(1, size + 1, dtype=torch.float64)
    from_majority = torch.floor(positions * fraction) > torch.floor((positions - 1) * fraction)
    need_major, need_other = int(from_majority.sum()), size - int(from_majority.sum())
    if need_major > len(ones) or need_other > len(others):
        raise ValueError(
            f"an imbalanced pool of {size} at fraction {fraction} needs {need_major} samples "
            f"of class {majority} and {need_other} others; '{source.name}' has "
            f"{len(ones)} and {len(others)} left after the base"
        )
    order = torch.empty(size, dtype=rest.dtype)
    order[from_majority] = ones[:need_major]
    order[~from_majority] = others[:need_other]
    return order
