"""The process a Ray trial or actor runs in: the GPUs it asks Ray for (`gpus_each`, on
the driver), then what it sets up in that process: threads, allocator, its device.

Kept apart from `experiment`, whose builders are pure, so that the same spec builds the
same data and model anywhere, with or without Ray.
"""

from __future__ import annotations

import os

import ray
import torch

from volume_ray.allocator import keep_freed_memory
from volume_ray.spec import SweepSpec

__all__ = ["assigned_device", "configure_process", "gpus_each", "trial_resources"]


def gpus_each(spec: SweepSpec) -> float:
    """GPUs per trial or worker: the spec's number, or under "auto" a share of one GPU
    (1 / resources.actors_per_gpu) when the cluster has any, else none."""
    wanted = spec.resources.gpus_per_worker
    if wanted != "auto":
        return float(wanted)
    has_gpus = ray.cluster_resources().get("GPU", 0) >= 1
    return 1.0 / spec.resources.actors_per_gpu if has_gpus else 0.0


def trial_resources(spec: SweepSpec) -> dict[str, float]:
    """What a Tune training trial asks Ray for: `resources.cpus_per_trial` CPUs and, on
    a cluster with GPUs, its share of one (`gpus_each`)."""
    return {"cpu": spec.resources.cpus_per_trial, "gpu": gpus_each(spec)}


def configure_process() -> None:
    """Ray reuses worker processes and torch fixes its thread count at import: set it
    from OMP_NUM_THREADS (Ray sets it to the CPUs a task or actor holds). Also keep
    freed memory for reuse (see `allocator`)."""
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 1)))
    keep_freed_memory()


def assigned_device() -> torch.device:
    """The GPU Ray gave this task or actor, else the CPU: a worker that asked for no
    GPU must not crowd onto one that happens to be visible."""
    return torch.device("cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu")
