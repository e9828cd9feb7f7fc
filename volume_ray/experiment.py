"""From a validated spec to the concrete pieces: data splits, models, losses.

Both the training trials and the measuring workers build their data and models here,
so the two stages can never disagree about what a model id means.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from volume_ray.allocator import keep_freed_memory
from volume_ray.data import ExperimentData, load_source, split_experiment
from volume_ray.models import build_model
from volume_ray.spec import SweepSpec

__all__ = [
    "assigned_device",
    "check_runnable",
    "experiment_data",
    "gpus_each",
    "new_model",
    "configure_process",
    "with_absolute_root",
]


def configure_process() -> None:
    """Ray reuses worker processes and torch fixes its thread count at import: set it
    from OMP_NUM_THREADS (Ray sets it to the CPUs a task or actor holds). Also keep
    freed memory for reuse (see `allocator`)."""
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 1)))
    keep_freed_memory()


def assigned_device() -> torch.device:
    """The GPU Ray gave this task or actor, else the CPU: a worker that asked for no
    GPU must not crowd onto one that happens to be visible."""
    import ray

    return torch.device("cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu")


def gpus_each(spec: SweepSpec) -> float:
    """GPUs per trial or worker: the spec's number, or under "auto" one whole GPU when
    the cluster has any, else none."""
    import ray

    wanted = spec.resources.gpus_per_worker
    if wanted != "auto":
        return float(wanted)
    return 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0


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
