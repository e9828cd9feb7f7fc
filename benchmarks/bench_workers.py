"""The measuring stage on Ray actors against in-process `measure_radii`.

One digits MLP 64-256-256-10 (trained through the service), 512 directions in shards
of 32: measured in this process (1 and 2 torch threads), then by the service with 1
and with 2 VolumeWorker actors of one CPU each, on a local Ray with 2 CPUs.

    python benchmarks/bench_workers.py            # a few minutes on 2 cores
    python benchmarks/bench_workers.py --smoke    # about half a minute, for CI
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time

import ray
import torch

from volume_ray.driver import measure_stage, run_sweep
from volume_ray.experiment import experiment_data, new_model
from volume_ray.measure import measure_radii
from volume_ray.models import loss_for_task
from volume_ray.spec import load_spec
from volume_ray.store import SweepStore
from volume_ray.train import load_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, to check it runs")
    args = parser.parse_args()
    directions = 64 if args.smoke else 512
    spec = load_spec(
        {
            "name": "bench-workers",
            "dataset": {"name": "digits", "base_size": 1000, "extra_sizes": [0]},
            "model": {"name": "mlp", "hidden": [32] if args.smoke else [256, 256]},
            "train": {"epochs": 100 if args.smoke else 3000, "target_loss": 0.001, "lr": 0.001},
            "volume": {"directions": directions, "shard_size": 32},
        }
    )
    storage = tempfile.mkdtemp(prefix="bench-workers-")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        store = run_sweep(spec, storage, stages=("train",), progress=False)
        data = experiment_data(spec)
        model = load_checkpoint(new_model(spec, data, 0), next(store.checkpoints.glob("*.pt")))
        x, y = data.landscape_set(0)
        times = {}
        for threads in (1, 2):
            torch.set_num_threads(threads)
            start = time.perf_counter()
            measure_radii(model, x, y, loss_for_task("classification"), num_directions=directions)
            times[f"in-process, {threads} thread(s)"] = time.perf_counter() - start
        shards = directions // spec.volume.shard_size
        startup = {}
        for workers in (1, 2):
            variant = spec.model_copy(update={"resources": spec.resources.model_copy(
                update={"workers": workers})})  # fmt: skip
            shutil.rmtree(store.radii, ignore_errors=True)
            stats = measure_stage(variant, SweepStore(storage, spec.name), progress=False)
            times[f"service, {workers} worker(s)"] = stats.measure_seconds
            startup[workers] = stats.startup_seconds
    finally:
        ray.shutdown()
        shutil.rmtree(storage, ignore_errors=True)
    for label, seconds in times.items():
        print(f"{label:26s} {seconds:7.2f} s  ({directions / seconds:6.1f} directions/s)")
    print(f"actor start-up before the first shard (process, imports, data): {startup[1]:.1f} s "
          f"with 1 worker, {startup[2]:.1f} s with 2 (not counted above)")  # fmt: skip
    one, two = times["service, 1 worker(s)"], times["service, 2 worker(s)"]
    alone = times["in-process, 1 thread(s)"]
    print(f"speed-up, 2 workers over 1 worker:                   {one / two:.2f}x")
    print(f"speed-up, 2 workers over in-process with 1 thread:   {alone / two:.2f}x")
    print(f"speed-up, 2 workers over in-process with 2 threads:  "
          f"{times['in-process, 2 thread(s)'] / two:.2f}x")  # fmt: skip
    overhead = (one - alone) / shards * 1e3
    print(f"per-shard overhead (1 worker against 1 thread): {overhead:.0f} ms per shard of "
          f"{spec.volume.shard_size} directions")  # fmt: skip


if __name__ == "__main__":
    main()
