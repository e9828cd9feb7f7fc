"""Datasets by name, loaded once into tensors, and the manipulations sweeps apply."""

from __future__ import annotations

from pathlib import Path

from volume_ray.data.sources import (
    TASKS,
    MissingDataError,
    Source,
    load_char_text,
    load_digits,
    load_mnist1d,
    load_modular,
    load_swiss_roll,
)
from volume_ray.data.subsets import EXTRA_KINDS, ExperimentData, split_experiment
from volume_ray.data.vision import VISION_DATASETS, load_vision

__all__ = [
    "DATASETS",
    "EXTRA_KINDS",
    "TASKS",
    "ExperimentData",
    "MissingDataError",
    "Source",
    "load_source",
    "split_experiment",
]

EMBEDDED = ("digits", "mnist1d", "swiss_roll", "modular")
DATASETS = (*EMBEDDED, "char_text", *VISION_DATASETS)


def load_source(
    name: str,
    *,
    root: str | Path | None = None,
    download: bool = False,
    seed: int = 0,
    **options: object,
) -> Source:
    """The dataset `name` as tensors. `root` names the folder (or, for char_text, the
    text file) of file-based sets; `seed` fixes generated sets and held-out splits;
    `options` go to the loader (e.g. modulus, train_fraction, block_size)."""
    if name not in DATASETS:
        raise ValueError(f"dataset.name must be one of {DATASETS}, got {name!r}")
    if name in VISION_DATASETS:
        return load_vision(name, root, download=download)
    if name == "char_text":
        if root is None:
            raise MissingDataError("dataset 'char_text' needs dataset.root: a text file's path")
        return load_char_text(root, seed=seed, **options)
    loader = {
        "digits": load_digits,
        "mnist1d": load_mnist1d,
        "swiss_roll": load_swiss_roll,
        "modular": load_modular,
    }[name]
    return loader(seed=seed, **options)
