"""What trials and measuring actors ask Ray for on a cluster with GPUs, on a real local
Ray that declares one (this machine has none, so the work itself runs on the CPU)."""

from __future__ import annotations

import pandas as pd
import pyarrow.parquet as pq
import pytest
import ray

from volume_ray.driver import _worker_count, run_sweep
from volume_ray.ray_process import gpus_each, trial_resources
from volume_ray.spec import SpecError, load_spec

SHARED_GPU = {
    "name": "shared-gpu",
    "dataset": {"name": "digits", "base_size": 60, "extra_sizes": [0]},
    "model": {"name": "mlp", "hidden": [8]},
    "train": {"epochs": 60, "lr": 0.01, "seeds": [0, 1]},
    "volume": {"directions": 8, "shard_size": 2, "direction_rng": "device"},
    "resources": {"actors_per_gpu": 4},
}


@pytest.fixture(scope="module")
def ray_with_a_gpu():
    ray.init(address="local", num_cpus=3, num_gpus=1, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_actors_and_trials_share_a_gpu_as_the_spec_asks(ray_with_a_gpu):
    spec = load_spec(SHARED_GPU)
    assert gpus_each(spec) == 0.25
    assert trial_resources(spec) == {"cpu": 1.0, "gpu": 0.25}
    # four would share the GPU, but each holds a CPU to draw directions: three CPUs
    assert _worker_count(spec, shards=10) == (3, 1.0, 0.25)
    assert _worker_count(spec, shards=2) == (2, 1.0, 0.25)
    whole = load_spec({**SHARED_GPU, "resources": {}})
    assert gpus_each(whole) == 1.0 and _worker_count(whole, shards=10) == (1, 1.0, 1.0)
    fixed = load_spec({**SHARED_GPU, "resources": {"gpus_per_worker": 0.5, "workers": 2}})
    assert gpus_each(fixed) == 0.5 and _worker_count(fixed, shards=10) == (2, 1.0, 0.5)


def test_a_sweep_runs_on_gpu_shares_and_its_directions_do_not_depend_on_them(
    ray_with_a_gpu, tmp_path
):
    """Trials and actors on quarter GPUs; device-drawn directions are the same whatever
    the sharding and the actor that drew them."""
    shared = run_sweep(load_spec(SHARED_GPU), str(tmp_path / "a"), progress=False)
    alone = {**SHARED_GPU, "volume": {**SHARED_GPU["volume"], "shard_size": 8},
             "resources": {"workers": 1}}  # fmt: skip
    single = run_sweep(load_spec(alone), str(tmp_path / "b"), progress=False)
    keys = ["model_id", "direction", "threshold"]
    radii = [s.read_radii().sort_values(keys).reset_index(drop=True) for s in (shared, single)]
    assert len(radii[0]) == 2 * 8
    shard = next(shared.radii.glob("*.parquet"))
    facts = pq.read_schema(shard).metadata
    assert facts[b"volume_ray.device"] == b"cpu"  # Ray gave a GPU share, CUDA is absent
    assert facts[b"volume_ray.points_per_pass"] == b"1"
    pd.testing.assert_series_equal(radii[0].radius, radii[1].radius)
    pd.testing.assert_series_equal(radii[0].raw_norm, radii[1].raw_norm)


@pytest.mark.parametrize(
    "section,field,value",
    [
        ("resources", "actors_per_gpu", 0),
        ("resources", "gpu_memory_fraction", 1.0),
        ("volume", "direction_rng", "philox"),
        ("volume", "allow_tf32", "sometimes"),
    ],
)
def test_bad_gpu_settings_name_the_field(section, field, value):
    spec = {**SHARED_GPU, section: {**SHARED_GPU.get(section, {}), field: value}}
    with pytest.raises(SpecError, match=field):
        load_spec(spec)


def test_device_directions_need_a_seed_their_generator_takes():
    volume = {**SHARED_GPU["volume"], "seed": 2**31}
    with pytest.raises(SpecError, match="volume.seed must be below 2\\*\\*31"):
        load_spec({**SHARED_GPU, "volume": volume})
