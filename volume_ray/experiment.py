"""From a validated spec to the concrete pieces: data splits and models.

Both the training trials and the measuring workers build their data and models here,
so the two stages can never disagree about what a model id means. These builders are
pure (spec in, data or model out): what a Ray trial or actor sets up in its process
(threads, allocator, device) is `ray_process`'s.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from volume_ray.data import ExperimentData, load_source, split_experiment
from volume_ray.models import build_model
from volume_ray.spec import SweepSpec

__all__ = ["check_runnable", "experiment_data", "new_model", "with_absolute_root"]


def with_absolute_root(spec: SweepSpec) -> SweepSpec:
    """The spec with dataset.root made absolute from the driver's folder: Tune trials
    and actors run in folders of their own."""
    root = spec.dataset.root
    if root is None or os.path.isabs(root):
        return spec
    dataset = spec.dataset.model_copy(update={"root": os.path.abspath(root)})
    return spec.model_copy(update={"dataset": dataset})


def experiment_data(spec: SweepSpec) -> ExperimentData:
    """The base set, extra pool and test split the spec describes."""
    data = spec.dataset
    source = load_source(
        data.name, root=data.root, download=data.download, seed=data.data_seed, **data.options
    )
    return split_experiment(
        source,
        base_size=data.base_size,
        pool_size=max(data.extra_sizes),
        extra_kind=data.extra_kind,
        data_seed=data.data_seed,
        imbalance_class=data.imbalance_class,
        imbalance_fraction=data.imbalance_fraction,
    )


def new_model(spec: SweepSpec, data: ExperimentData, seed: int) -> nn.Module:
    """A freshly initialised model of the spec for this data."""
    m = spec.model
    outputs = 1 if data.source.task == "binary" else data.source.num_classes  # one logit
    return build_model(
        m.name, data.source.input_shape, outputs, seed=seed, hidden=m.hidden,
        channels=m.channels, layers=m.layers, heads=m.heads, width=m.width,
    )  # fmt: skip


def check_runnable(spec: SweepSpec) -> ExperimentData:
    """Build the data and one model now, so that a size over the pool or a model that
    does not fit the data fails before any cluster work starts."""
    data = experiment_data(spec)
    model = new_model(spec, data, seed=0)
    sample = data.base_x[:2]
    try:
        with torch.no_grad():
            model(sample)
    except RuntimeError as error:
        raise ValueError(
            f"model {spec.model.name!r} does not fit dataset {spec.dataset.name!r} samples of "
            f"shape {tuple(sample.shape[1:])}: {error}"
        ) from None
    return data
