"""The measuring stage across nodes, and the driver's dispatch at scale.

Both clusters are real `ray start` nodes on this host, from cluster/local_cluster.py,
with token auth on, up side by side; this process is the driver of each in turn.

1. Crossing nodes: one digits MLP 64-256-256-10, 512 directions in shards of 32, two
   VolumeWorker actors, on 2 nodes of 1 CPU each against 1 node of 2 CPUs. Interleaved
   rounds, medians of the measuring seconds (actor start-up reported apart).
2. Dispatch at scale: a tiny MLP measured in 1,000 and in 10,000 one-direction shards
   on the 2-node cluster, against the same directions measured in one call in this
   process: the fixed cost of a shard, whether it grows with the number of shards, and
   the shard size that keeps it under 5% of the measuring.

    python benchmarks/bench_cluster.py            # ~5 minutes on 2 cores
    python benchmarks/bench_cluster.py --smoke    # about a minute, for CI
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ray
import torch

from volume_ray.driver import measure_stage, run_sweep
from volume_ray.experiment import experiment_data, new_model
from volume_ray.measure import measure_radii
from volume_ray.models import loss_for_task
from volume_ray.spec import SweepSpec, load_spec
from volume_ray.store import SweepStore

SCRIPT = Path(__file__).resolve().parents[1] / "cluster" / "local_cluster.py"
OVERHEAD_TARGET = 0.05  # shard overhead as a fraction of measuring time


def local_cluster(command: str, folder: Path, *options: str) -> subprocess.Popen:
    """cluster/local_cluster.py COMMAND, started; `finish` waits for it."""
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), command, "--dir", str(folder), *options],
        stdout=subprocess.DEVNULL,
    )


def finish(*commands: subprocess.Popen) -> None:
    for command in commands:
        if command.wait() != 0:
            raise SystemExit(f"{' '.join(command.args)} failed")


def address(folder: Path) -> str:
    return json.loads((folder / "cluster.json").read_text())["address"]


def with_workers(spec: SweepSpec, directions: int, shard_size: int) -> SweepSpec:
    volume = spec.volume.model_copy(update={"directions": directions, "shard_size": shard_size})
    resources = spec.resources.model_copy(update={"workers": 2})
    return spec.model_copy(update={"volume": volume, "resources": resources})


def measure_on(cluster: Path, spec: SweepSpec, storage: str) -> tuple[float, float, float]:
    """(measuring seconds, actor start-up seconds, driver CPU seconds) of one stage,
    from an empty radii folder."""
    store = SweepStore(storage, spec.name)
    shutil.rmtree(store.radii, ignore_errors=True)
    ray.init(address=address(cluster), log_to_driver=False)
    try:
        cpu = time.process_time()
        stats = measure_stage(spec, store, progress=False)
        return stats.measure_seconds, stats.startup_seconds, time.process_time() - cpu
    finally:
        ray.shutdown()


def in_process_seconds(spec: SweepSpec, storage: str, directions: int) -> float:
    """The same directions measured in one call in this process, one thread."""
    store = SweepStore(storage, spec.name)
    data = experiment_data(spec)
    model = new_model(spec, data, 0)
    model.load_state_dict(store.read_state_dict(store.finished_models().checkpoint.iloc[0]))
    x, y = data.landscape_set(0)
    torch.set_num_threads(1)
    began = time.perf_counter()
    measure_radii(model, x, y, loss_for_task("classification"), num_directions=directions)
    return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, to check it runs")
    args = parser.parse_args()
    rounds = 1 if args.smoke else 3
    big_directions = 32 if args.smoke else 512
    shard_counts = (30, 90) if args.smoke else (1_000, 10_000)
    big = load_spec(
        {
            "name": "bench-nodes",
            "dataset": {"name": "digits", "base_size": 1000, "extra_sizes": [0]},
            "model": {"name": "mlp", "hidden": [32] if args.smoke else [256, 256]},
            "train": {"epochs": 100 if args.smoke else 3000, "target_loss": 0.001, "lr": 0.001},
            "volume": {"directions": big_directions, "shard_size": 32},
        }
    )
    tiny = load_spec(
        {
            "name": "bench-dispatch",
            "dataset": {"name": "digits", "base_size": 100, "extra_sizes": [0]},
            "model": {"name": "mlp", "hidden": [16]},
            "train": {"epochs": 300, "lr": 0.01},
            "volume": {"directions": max(shard_counts), "shard_size": 1},
        }
    )
    if os.environ.get("RAY_AUTH_MODE") != "token" or "RAY_AUTH_TOKEN" not in os.environ:
        # A driver reads its auth mode and token when Ray is imported: start again with
        # one token in the environment, for this driver and both clusters.
        env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
        env.pop("RAY_ADDRESS", None)
        os.execve(sys.executable, [sys.executable, __file__, *sys.argv[1:]], env)
    work = Path(tempfile.mkdtemp(prefix="bench-cluster-"))
    two_nodes, one_node = work / "two-nodes", work / "one-node"
    storage = str(work / "store")
    try:
        finish(  # both at once: their nodes start independently
            local_cluster("up", two_nodes, "--workers", "1", "--cpus", "1", "--head-cpus", "1"),
            local_cluster("up", one_node, "--workers", "0", "--head-cpus", "2"),
        )
        ray.init(address=address(one_node), log_to_driver=False)
        for spec in (big, tiny):
            run_sweep(spec, storage, stages=("train",), progress=False)
        ray.shutdown()

        crossing = {"2 nodes x 1 CPU": [], "1 node x 2 CPUs": []}
        startup = {label: [] for label in crossing}
        spec = with_workers(big, big_directions, 32)
        for _ in range(rounds):
            for label, cluster in zip(crossing, (two_nodes, one_node)):
                seconds, started, _ = measure_on(cluster, spec, storage)
                crossing[label].append(seconds)
                startup[label].append(started)

        dispatch = {}
        for shards in shard_counts:
            spec = with_workers(tiny, shards, 1)
            dispatch[shards] = measure_on(two_nodes, spec, storage)
        bulk = in_process_seconds(tiny, storage, max(shard_counts))
        big_bulk = in_process_seconds(big, storage, big_directions)
    finally:
        finish(
            *[
                local_cluster("down", cluster)
                for cluster in (two_nodes, one_node)
                if (cluster / "cluster.json").exists()
            ]
        )
        shutil.rmtree(work, ignore_errors=True)

    print(f"1. measuring {big_directions} directions in shards of 32 with 2 actors "
          f"({rounds} round(s), medians)")  # fmt: skip
    medians = {label: statistics.median(times) for label, times in crossing.items()}
    for label, seconds in medians.items():
        print(f"   {label:16s} {seconds:6.2f} s  ({big_directions / seconds:6.1f} directions/s), "
              f"actor start-up {statistics.median(startup[label]):.1f} s")  # fmt: skip
    two, one = medians["2 nodes x 1 CPU"], medians["1 node x 2 CPUs"]
    print(f"   overhead of crossing nodes: {100 * (two / one - 1):+.1f}% "
          f"(2 nodes / 1 node = {two / one:.3f})")  # fmt: skip

    per_direction = bulk / max(shard_counts)
    print(f"2. dispatch of one-direction shards, 2 actors on 2 nodes "
          f"(in-process: {1e3 * per_direction:.2f} ms per direction)")  # fmt: skip
    per_shard = {}
    for shards, (seconds, _, driver_cpu) in dispatch.items():
        per_shard[shards] = 2 * seconds / shards  # actor-seconds per shard
        driver_ms = 1e3 * driver_cpu / shards
        print(f"   {shards:6d} shards: {seconds:6.1f} s, {1e3 * per_shard[shards]:5.1f} "
              f"actor-ms per shard, driver CPU {driver_ms:4.1f} ms per shard")  # fmt: skip
    low, high = min(shard_counts), max(shard_counts)
    print(f"   per-shard cost, {high} against {low} shards: "
          f"{per_shard[high] / per_shard[low]:.2f}x")  # fmt: skip
    overhead = per_shard[high] - per_direction
    big_per_direction = big_bulk / big_directions
    print(f"   fixed cost of a shard: {1e3 * overhead:.1f} ms "
          f"({overhead / per_direction:.1f} directions of the tiny model)")  # fmt: skip
    for name, cost in (("tiny MLP", per_direction), ("MLP 64-256-256-10", big_per_direction)):
        size = max(1, round(overhead / (OVERHEAD_TARGET * cost)))
        print(f"   shard size for <{100 * OVERHEAD_TARGET:.0f}% overhead, {name} "
              f"({1e3 * cost:.2f} ms per direction): >= {size} directions")  # fmt: skip


if __name__ == "__main__":
    main()
