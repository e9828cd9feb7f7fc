"""VolumeWorker: a Ray actor that measures shards of directions, the curvature, and
the rungs of restraint ladders of (model, landscape) pairs. It holds one pair on its
device at a time and only delegates to the core."""

from __future__ import annotations

import math
import os
import socket
import time

import numpy as np
import ray

from volume_ray.curvature import curvature
from volume_ray.estimators import laplace_from_curvature
from volume_ray.experiment import experiment_data, new_model
from volume_ray.ladder import Rung, advance, uniform_rung
from volume_ray.locations import exists
from volume_ray.measure import RadiusMeter
from volume_ray.models import loss_for_task
from volume_ray.ray_process import assigned_device, configure_process
from volume_ray.spec import SweepSpec
from volume_ray.store import SweepStore
from volume_ray.telemetry import WorkerMetrics
from volume_ray.thermodynamic import EmptyBasinError, basin_whitening, open_basin, rung_generator

__all__ = ["VolumeWorker", "check_store_is_visible", "store_problem"]


@ray.remote(max_restarts=5, max_task_retries=0)  # the driver re-queues lost shards
class VolumeWorker:
    """Measures shards; a restarted worker rebuilds its state from the spec."""

    def __init__(self, spec: dict, store_location: str):
        self.store = SweepStore.at(store_location)
        check_store_is_visible(self.store)  # before anything slow: fail fast and clearly
        configure_process()
        self.spec = SweepSpec.model_validate(spec)
        self.device = assigned_device()
        self.data = experiment_data(self.spec)
        self.loss_fn = loss_for_task(self.data.source.task)
        self.loaded: tuple[str, int] | None = None
        self.meter = None
        self.ladder: str | None = None  # the ladder whose basin is held
        self.basin = None
        self.metrics = WorkerMetrics()

    def _pair(self, checkpoint: str, seed: int, landscape_extra: int):
        """The trained model and the landscape set of a pair."""
        model = new_model(self.spec, self.data, seed)
        model.load_state_dict(self.store.read_state_dict(checkpoint))
        return (model, *self.data.landscape_set(landscape_extra))

    def _load(self, model_id: str, checkpoint: str, seed: int, landscape_extra: int) -> None:
        """Build the meter of a pair once: landscape on the device, filter norm, hints."""
        if self.loaded == (model_id, landscape_extra):
            return
        self._free()
        model, x, y = self._pair(checkpoint, seed, landscape_extra)
        v, r = self.spec.volume, self.spec.resources
        self.meter = RadiusMeter(
            model, x, y, self.loss_fn, seed=v.seed, metric=v.metric,
            thresholds=tuple(v.thresholds), filter_norm=v.filter_norm, search=v.search,
            rtol=v.rtol, max_coefficient=v.max_coefficient, batch_size=v.batch_size,
            device=self.device, quadratic_radii=self.spec.curvature.quadratic_radii,
            allow_tf32=v.allow_tf32, direction_rng=v.direction_rng,
            memory_fraction=r.gpu_memory_fraction / r.actors_per_gpu,
        )  # fmt: skip
        self.loaded = (model_id, landscape_extra)

    def measure(
        self, model_id: str, checkpoint: str, seed: int, landscape_extra: int, start: int,
        count: int,
    ) -> tuple[dict, dict]:  # fmt: skip
        """Radii of directions start..start+count-1: (columns, facts about the run)."""
        configure_process()
        began = time.perf_counter()
        self._load(model_id, checkpoint, seed, landscape_extra)
        frame = self.meter.measure(start, count)
        seconds = time.perf_counter() - began
        tags = {
            "sweep": self.spec.name,
            "model": model_id,
            "landscape": str(self.data.base_size + landscape_extra),
        }
        self.metrics.shard(frame, seconds, tags)
        facts = {
            "node_id": ray.get_runtime_context().get_node_id(),
            "pid": os.getpid(),
            "seconds": seconds,
            "device": str(self.device),
            # the device path calibrates it: GPU radii depend on it within rtol
            "points_per_pass": self.meter.landscape.points_per_pass,
        }
        return frame.to_dict("list"), facts

    def curvature(self, model_id: str, checkpoint: str, seed: int, landscape_extra: int) -> dict:
        """The Hessian spectrum of a pair, as one curvature.parquet row (less the pair's
        keys), with log_det at the first threshold's floor."""
        configure_process()
        began = time.perf_counter()
        if self.loaded != (model_id, landscape_extra):
            self._free()
        model, x, y = self._pair(checkpoint, seed, landscape_extra)
        c, v = self.spec.curvature, self.spec.volume
        spectrum = curvature(
            model, x, y, self.loss_fn, filter_norm=v.filter_norm, top_k=c.top_k,
            probes=c.probes, lanczos_steps=c.lanczos_steps, seed=c.seed,
            batch_size=v.batch_size, device=self.device, allow_tf32=v.allow_tf32,
        )  # fmt: skip
        _, floor = laplace_from_curvature(spectrum, v.thresholds[0], v.max_coefficient)
        known = not math.isnan(floor)  # NaN: the first threshold is at or below the base loss
        log_det = spectrum.log_det(floor) if known else math.nan
        log_det_error = spectrum.log_det_error(floor) if known else math.nan
        record = spectrum.to_record()
        first = ["n_params", "base_loss", "top_eigenvalues", "trace", "trace_stderr"]
        return {
            **{k: record.pop(k) for k in first},
            "log_det": log_det,
            "floor": floor,
            **record,  # probes, lanczos_steps, and each probe's Lanczos tridiagonal
            "log_det_error": log_det_error,
            "seconds": time.perf_counter() - began,
        }

    def whitening(
        self, checkpoint: str, seed: int, landscape_extra: int, threshold: float, ladder: str
    ) -> tuple[np.ndarray | None, dict | str]:  # fmt: skip
        """A ladder's whitening and its cost, or (None, why) when its basin is empty."""
        configure_process()
        try:
            basin = self._basin(checkpoint, seed, landscape_extra, threshold, ladder, False)
        except EmptyBasinError as error:
            return None, str(error)
        t = self.spec.thermodynamic
        basin.whitening = basin_whitening(basin, t.seed, t.whitening_directions)
        return basin.whitening, {
            "radius_searches": basin.searches,
            "loss_evaluations": basin.evaluations,
        }

    def rung(
        self, checkpoint: str, seed: int, landscape_extra: int, threshold: float, ladder: str,
        index: int, k: float, previous: Rung | None,
    ) -> Rung:  # fmt: skip
        """Rung `index` of a whitened ladder at restraint k, from `previous` (None: the
        uniform rung at the top)."""
        configure_process()
        basin = self._basin(checkpoint, seed, landscape_extra, threshold, ladder, True)
        t, generator = self.spec.thermodynamic, rung_generator(self.spec.thermodynamic.seed, index)
        if previous is None:
            return uniform_rung(basin, t.chains, t.steps, generator)
        return advance(basin, previous, k, t.steps, generator)

    def _basin(
        self, checkpoint: str, seed: int, landscape_extra: int, threshold: float, ladder: str,
        stored_whitening: bool,
    ):  # fmt: skip
        """The basin of a ladder on the device, built once; when built here for a rung,
        whitened by the ladder's stored whitening (the whitening task sets its own)."""
        if self.ladder != ladder:
            self._free()
            model, x, y = self._pair(checkpoint, seed, landscape_extra)
            v = self.spec.volume
            self.basin = open_basin(
                model, x, y, self.loss_fn, threshold=threshold, filter_norm=v.filter_norm,
                max_coefficient=v.max_coefficient, batch_size=v.batch_size,
                device=self.device, seed=self.spec.thermodynamic.seed, allow_tf32=v.allow_tf32,
            )  # fmt: skip
            if stored_whitening:
                self.basin.whitening = self.store.read_whitening(ladder)
            self.ladder = ladder
        return self.basin

    def _free(self) -> None:
        """Drop what the held pair keeps on the device, before another pair's."""
        self.meter = self.loaded = self.basin = self.ladder = None

    @ray.method(max_task_retries=-1)  # a ping waits for a restart, fails only past the last
    def pid(self) -> int:
        return os.getpid()


@ray.remote(num_cpus=0)
def store_problem(location: str) -> str | None:
    """Why this node cannot read the store at `location`, or None if it can."""
    try:
        check_store_is_visible(SweepStore.at(location))
    except RuntimeError as error:
        return str(error)
    return None


def check_store_is_visible(store: SweepStore) -> None:
    """Every actor reads checkpoints from the store, so the store must be reachable from
    its node. A driver-local folder is not, on another node of a cluster: say so here,
    with the fix, rather than with a missing-checkpoint error in the middle of a shard."""
    try:
        if exists(store.spec_path):
            return
        reason = "spec.yaml is not there"
    except OSError as error:  # no credentials, no route to the endpoint, access denied...
        reason = str(error)
    node = ray.get_runtime_context().get_node_id()
    raise RuntimeError(
        f"node {node} ({socket.gethostname()}) cannot read the sweep store "
        f"{store.location}: {reason}. On a multi-node cluster put --storage on a path "
        "that every node mounts (NFS, a shared volume), or on an object-store URI such "
        "as s3://bucket/prefix with credentials on every node."
    )
