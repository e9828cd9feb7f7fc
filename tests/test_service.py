"""The Ray sweep service on a real local Ray: tables, resume, faults, bad specs."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import ray
import torch
import yaml
from conftest import kill_when, measure_command

from volume_ray import driver
from volume_ray.cli import main
from volume_ray.driver import aggregate_stage, measure_stage, pending_shards, run_sweep
from volume_ray.locations import read_bytes
from volume_ray.spec import load_spec, smoke_variant
from volume_ray.store import SweepStore
from volume_ray.tune_stage import resumable_states, train_trial

MODELS_COLUMNS = [
    "model_id", "dataset", "train_size", "batch_size", "optimizer", "seed", "epochs",
    "train_loss", "train_acc", "test_loss", "test_acc", "n_params", "checkpoint",
]  # fmt: skip
VOLUMES_COLUMNS = [
    "model_id", "landscape_size", "metric", "threshold", "estimator", "log_volume", "ci_low",
    "ci_high", "n_directions", "n_censored", "n_params", "mean_radius", "median_radius",
    "max_radius", "ess", "top_share", "ci_valid", "floor",
]  # fmt: skip
CURVATURE_COLUMNS = [
    "model_id", "landscape_size", "n_params", "base_loss", "top_eigenvalues", "trace",
    "trace_stderr", "log_det", "floor", "probes", "lanczos_steps",
]  # fmt: skip

TINY = {
    "name": "tiny",
    "dataset": {"name": "digits", "base_size": 60, "extra_sizes": [0, 120]},
    "model": {"name": "mlp", "hidden": [16]},
    "train": {"epochs": 150, "lr": 0.01, "seeds": [0]},
    "volume": {"directions": 24, "shard_size": 3, "thresholds": [0.5, 1.0]},
    "curvature": {"enabled": True, "probes": 6, "lanczos_steps": 12, "quadratic_radii": True},
    "resources": {"workers": 2},
}


@pytest.fixture(scope="module")
def local_ray():
    # Ray workers import functions defined here (a flaky trainable) by module name.
    tests = str(Path(__file__).parent)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [tests, os.environ.get("PYTHONPATH")]))
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def trained(local_ray, tmp_path_factory) -> SweepStore:
    """The tiny sweep, trained and measured once; tests copy it."""
    storage = tmp_path_factory.mktemp("storage")
    return run_sweep(load_spec(TINY), str(storage), progress=False)


def copy_store(store: SweepStore, tmp_path: Path, radii: bool) -> SweepStore:
    shutil.copytree(store.root, tmp_path / store.root.name)
    copy = SweepStore(tmp_path, store.root.name)
    if not radii:
        shutil.rmtree(copy.radii)
        shutil.rmtree(copy.curvature_rows)
        copy.volumes_path.unlink()
        copy.curvature_path.unlink()
    return copy


def test_a_tiny_sweep_yields_the_contract_tables(trained):
    models = pd.read_parquet(trained.models_path)
    assert list(models.columns) == MODELS_COLUMNS
    assert sorted(models.train_size) == [60, 180]
    radii = trained.read_radii()
    assert len(radii) == 3 * 24 * 2  # pairs (60 in 60; 180 in 60 and 180) x directions x T
    assert set(radii.landscape_size) == {60, 180}
    volumes = pd.read_parquet(trained.volumes_path)
    assert list(volumes.columns) == VOLUMES_COLUMNS
    assert len(volumes) == 3 * 2 * 3  # pairs x thresholds x estimators
    assert set(volumes.estimator) == {"paper", "typical", "laplace"}
    assert (volumes.n_directions == 24).all()
    laplace = volumes[volumes.estimator == "laplace"]
    assert laplace.ci_valid.all() and (laplace.floor > 0).all()
    assert volumes[volumes.estimator != "laplace"].floor.isna().all()
    curvature = pd.read_parquet(trained.curvature_path)
    assert list(curvature.columns[: len(CURVATURE_COLUMNS)]) == CURVATURE_COLUMNS
    assert len(curvature) == 3 and (curvature.probes == 6).all()
    assert all(len(top) == 5 for top in curvature.top_eigenvalues)
    assert np.isfinite(radii.radius_quadratic).all() and (radii.radius_quadratic > 0).all()
    assert yaml.safe_load(trained.spec_path.read_text())["name"] == "tiny"
    # every model is measured with the same direction seeds
    raw = radii.groupby("model_id").raw_norm.apply(lambda s: tuple(sorted(set(s))))
    assert raw.nunique() == 1


def sorted_radii(store: SweepStore) -> pd.DataFrame:
    keys = ["model_id", "landscape_size", "direction", "threshold"]
    return store.read_radii().sort_values(keys).reset_index(drop=True)


def shard_start(path: Path) -> int:
    return int(path.name.split("__d")[1].split("-")[0])


def test_an_empty_shard_is_measured_again_and_a_damaged_one_named(trained, local_ray, tmp_path):
    store = copy_store(trained, tmp_path, radii=True)
    empty, damaged = (sorted(store.radii.glob("*.parquet"))[i] for i in (4, 9))
    empty.write_bytes(b"")  # as a copy killed midway may leave: too short to be Parquet
    damaged.write_bytes(damaged.read_bytes()[:100])  # long enough to pass for a shard
    spec = load_spec(TINY)
    missing, total = pending_shards(spec, store)  # from the listing: names and sizes
    assert [m.start for m in missing] == [shard_start(empty)] and total == 3 * 8
    assert measure_stage(spec, store, progress=False).shards == 1
    pd.testing.assert_frame_equal(
        pd.read_parquet(empty), pd.read_parquet(trained.radii / empty.name)
    )
    with pytest.raises(RuntimeError, match=rf"{damaged.name} cannot be read.*Delete it; a rerun"):
        aggregate_stage(spec, store)  # never aggregated with a gap
    damaged.unlink()  # the fix the error names
    assert [m.start for m in pending_shards(spec, store)[0]] == [shard_start(damaged)]


def test_a_lost_curvature_row_alone_is_computed_again(trained, local_ray, tmp_path):
    store = copy_store(trained, tmp_path, radii=True)
    victim = sorted(store.curvature_rows.glob("*.parquet"))[1]
    victim.unlink()
    spec = load_spec(TINY)
    missing, total = driver.pending_curvature(spec, store)
    assert total == 3 and [store.curvature_name(t.pair.model_id, t.pair.landscape_size, t.settings)
                           for t in missing] == [victim.name]  # fmt: skip
    stats = measure_stage(spec, store, progress=False)
    assert stats.curvature == 1 and stats.shards == 0
    pd.testing.assert_frame_equal(
        aggregate_stage(spec, store), pd.read_parquet(trained.volumes_path)
    )
    recomputed = pd.read_parquet(store.curvature_path).drop(columns="seconds")
    pd.testing.assert_frame_equal(
        recomputed, pd.read_parquet(trained.curvature_path).drop(columns="seconds")
    )


def test_another_curvature_budget_is_computed_anew_beside_the_radii(trained, tmp_path):
    store = copy_store(trained, tmp_path, radii=True)
    more = {**TINY, "curvature": {**TINY["curvature"], "probes": 4}}
    store.claim(load_spec(more).model_dump(mode="json"), canonical=driver._with_defaults)
    assert load_spec(store.recorded_spec()).curvature.probes == 4  # spec.yaml: as run now
    missing, total = driver.pending_curvature(load_spec(more), store)
    assert len(missing) == total == 3  # the first budget's rows are not taken for it
    assert not pending_shards(load_spec(more), store)[0]  # the radii still stand
    off = {**TINY, "curvature": {"quadratic_radii": True}}  # laplace dropped, radii kept
    store.claim(load_spec(off).model_dump(mode="json"), canonical=driver._with_defaults)


def test_a_worker_killed_mid_shard_changes_nothing(trained, local_ray, tmp_path):
    store = copy_store(trained, tmp_path, radii=False)
    spec = load_spec(TINY)
    errors = []

    def measure() -> None:
        try:
            measure_stage(spec, store, progress=False)
        except Exception as error:  # surfaced by the assertion below
            errors.append(error)

    worker = threading.Thread(target=measure)
    worker.start()
    deadline = time.time() + 60
    killed = False
    while not killed and time.time() < deadline:
        try:
            actor = ray.get_actor("volume_worker:tiny:0")
            pid = ray.get(actor.pid.remote(), timeout=10)
            os.kill(pid, signal.SIGKILL)
            killed = True
        except (ValueError, ray.exceptions.RayError):
            time.sleep(0.2)
    worker.join(timeout=300)
    assert killed and not worker.is_alive() and not errors
    pd.testing.assert_frame_equal(sorted_radii(store), sorted_radii(trained))
    pd.testing.assert_frame_equal(
        aggregate_stage(spec, store), pd.read_parquet(trained.volumes_path)
    )


def test_a_killed_driver_resumes_without_recomputing(trained, tmp_path):
    store = copy_store(trained, tmp_path, radii=False)
    command = measure_command(TINY, tmp_path)
    kill_when(command, lambda: len(list(store.radii.glob("*.parquet"))) >= 4, timeout=120)
    survivors = {p.name: p.stat().st_mtime_ns for p in store.radii.glob("*.parquet")}
    assert 4 <= len(survivors) < 24  # killed in the middle
    rerun = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    for name, mtime in survivors.items():  # finished shards were not measured again
        assert (store.radii / name).stat().st_mtime_ns == mtime
    pd.testing.assert_frame_equal(sorted_radii(store), sorted_radii(trained))
    pd.testing.assert_frame_equal(
        pd.read_parquet(store.volumes_path), pd.read_parquet(trained.volumes_path)
    )


def flaky_trial(config: dict) -> None:
    """Fails the first attempt of every trial, then trains as usual."""
    marker = Path(config["marker_dir"]) / f"{config['trial']['model_id']}.failed"
    if not marker.exists():
        marker.touch()
        raise RuntimeError("injected failure")
    train_trial(config)


def test_a_trial_that_raises_once_is_retried(local_ray, tmp_path):
    spec = load_spec({**TINY, "name": "flaky", "dataset": {**TINY["dataset"], "extra_sizes": [0]}})
    store = run_sweep(
        spec, str(tmp_path), stages=("train",), progress=False,
        trainable=lambda config: flaky_trial({**config, "marker_dir": str(tmp_path)}),
    )  # fmt: skip
    assert list(tmp_path.glob("*.failed"))
    assert len(pd.read_parquet(store.models_path)) == 1


@pytest.mark.parametrize(
    "change,match",
    [
        (None, "does not exist"),
        ({"volume": {"search": "golden"}}, "volume.search"),
        ({"dataset": {"name": "digits", "base_size": 60, "extra_sizes": [0, 5000]}}, "remain"),
        ({"model": {"name": "cnn", "channels": [4]}}, "square images"),
        ({"dataset": {"name": "digits", "base_size": 60, "extra_sizes": [0], "wrong": 1}}, "wrong"),
        (
            {"volume": {"estimators": ["paper", "laplace"]}, "curvature": {"enabled": False}},
            "spec field volume.estimators: laplace needs the landscape's curvature",
        ),
        ({"volume": {"metric": "accuracy", "thresholds": [0.5]}}, "needs volume.metric: loss"),
        ({"volume": {"filter_norm": "li2018"}}, "curvature.enabled: li2018"),
        ({"curvature": {"enabled": True, "probes": 1}}, "curvature.probes"),
        ({"volume": {"estimators": ["paper", "paper"]}}, "volume.estimators"),
        (
            {"train": {"optimizer": "adamw"}},
            "spec field train.optimizer: unknown field; did you mean `optimizers: [adamw]`?",
        ),
        ({"volume": {"treshold": 0.2}}, "did you mean `thresholds: [0.2]`?"),
        ({"volume": {"zzz": 1}}, "the section's fields are ['directions', 'seed'"),
    ],
)
def test_bad_specs_get_a_message_without_traceback(tmp_path, capsys, change, match):
    path = tmp_path / "spec.yaml"
    if change is not None:
        path.write_text(yaml.safe_dump({**TINY, **change}))
    assert main(["validate", str(path)]) == 2
    error = capsys.readouterr().err
    assert match in error and "Traceback" not in error


def test_the_driver_reports_its_tasks_done_and_pending(trained, local_ray, tmp_path):
    """Read back from this node's metrics endpoint, as Prometheus would, after measuring
    the tiny sweep again: its shards and curvature tasks all done, none pending."""
    from urllib.request import urlopen

    from prometheus_client.parser import text_string_to_metric_families

    store = copy_store(trained, tmp_path, radii=False)
    measure_stage(load_spec(TINY), store, progress=False)
    port = ray.nodes()[0]["MetricsExportPort"]
    tasks = 3 * (24 // 3) + 3  # pairs x shards, and a curvature task a pair
    deadline, found = time.monotonic() + 60, {}
    while found != {"done": tasks, "pending": 0} and time.monotonic() < deadline:
        time.sleep(1)
        with urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            families = text_string_to_metric_families(response.read().decode())
        found = {
            sample.name.removeprefix("ray_volume_ray_tasks_"): sample.value
            for family in families
            for sample in family.samples
            if sample.name.startswith("ray_volume_ray_tasks_") and sample.labels["sweep"] == "tiny"
        }  # fmt: skip
    assert found == {"done": tasks, "pending": 0}


def test_concurrent_sweeps_in_one_storage_do_not_interfere(trained, tmp_path):
    storage = tmp_path / "shared"
    for name in ("one", "two"):
        shutil.copytree(trained.root, storage / name)
        spec = {**TINY, "name": name}
        (storage / name / "spec.yaml").write_text(
            yaml.safe_dump(load_spec(spec).model_dump(mode="json"), sort_keys=False)
        )
        shutil.rmtree(storage / name / "radii")
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(spec))
    runs = [
        subprocess.Popen(
            [sys.executable, "-m", "volume_ray.cli", "measure", str(tmp_path / f"{name}.yaml"),
             "--storage", str(storage)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        for name in ("one", "two")
    ]  # fmt: skip
    for run in runs:
        assert run.wait(timeout=300) == 0, run.stderr.read()
    for name in ("one", "two"):
        pd.testing.assert_frame_equal(
            sorted_radii(SweepStore(storage, name)), sorted_radii(trained)
        )


def test_status_and_query_read_the_store(trained, capsys):
    assert main(["status", str(trained.root)]) == 0
    out = capsys.readouterr().out
    assert "models   2/2 trained" in out and "shards   24/24 measured" in out
    assert main(["query", str(trained.root), "--table", "volumes", "--format", "csv",
                 "--where", "estimator == 'paper' and threshold == 0.5"]) == 0  # fmt: skip
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("model_id,landscape_size") and len(lines) == 1 + 3
    assert main(["query", str(trained.root), "--table", "radii", "--where", "nope >"]) == 2
    assert "--where" in capsys.readouterr().err


def test_checkpoint_epochs_become_models_measured_in_one_landscape(local_ray, tmp_path):
    spec = load_spec(
        {**TINY, "name": "grok", "dataset": {**TINY["dataset"], "extra_sizes": [0]},
         "train": {**TINY["train"], "epochs": 12, "checkpoint_epochs": [4, 8]},
         "volume": {**TINY["volume"], "directions": 6}}
    )  # fmt: skip
    store = run_sweep(spec, str(tmp_path), progress=False)
    models = pd.read_parquet(store.models_path).set_index("model_id")
    final = "n60-bfull-adamw-s0"
    assert sorted(models.index) == [final, f"{final}-e4", f"{final}-e8"]
    assert models.loc[f"{final}-e4", "epochs"] == 4 and models.loc[final, "epochs"] == 12
    radii = store.read_radii()
    assert set(radii.model_id) == set(models.index) and set(radii.landscape_size) == {60}
    # the kept weights differ from each other and from the final ones
    weights = [torch.load(store.checkpoint_path(m), weights_only=True)["layers.0.weight"]
               for m in models.index]  # fmt: skip
    assert not torch.equal(weights[0], weights[1]) and not torch.equal(weights[1], weights[2])


def test_checkpoint_epochs_must_fall_inside_training():
    bad = {**TINY, "train": {**TINY["train"], "epochs": 10, "checkpoint_epochs": [5, 10]}}
    with pytest.raises(ValueError, match="train.checkpoint_epochs"):
        load_spec(bad)


def test_spec_rules_that_keep_model_ids_unique_and_stores_resumable(tmp_path):
    with pytest.raises(ValueError, match="train.seeds"):
        load_spec({**TINY, "train": {**TINY["train"], "seeds": [0, 0]}})
    grok = load_spec(Path(__file__).parents[1] / "sweeps" / "modular_grokking.yaml")
    small = smoke_variant(grok)  # the kept epochs beyond the short run are dropped
    assert small.train.checkpoint_epochs == [] and small.train.epochs == 200
    store = SweepStore(tmp_path, "tiny")
    store.claim(load_spec(TINY).model_dump(mode="json"))
    more = {**TINY, "resources": {"workers": 8}}  # another cluster: same results
    store.claim(load_spec(more).model_dump(mode="json"))
    with pytest.raises(ValueError, match="different spec"):
        store.claim(
            load_spec({**TINY, "volume": {**TINY["volume"], "seed": 9}}).model_dump(mode="json")
        )
    # the estimators only aggregate the stored radii: they may change between runs
    fewer = {**TINY, "volume": {**TINY["volume"], "estimators": ["typical"]}}
    store.claim(load_spec(fewer).model_dump(mode="json"))


def test_a_store_recorded_before_the_curvature_fields_still_resumes(tmp_path):
    plain = {k: v for k, v in TINY.items() if k != "curvature"}
    store = SweepStore(tmp_path, "tiny")
    store.spec_path.parent.mkdir(parents=True)
    store.spec_path.write_text(yaml.safe_dump(plain))  # as an older version recorded it
    canonical = driver._with_defaults
    store.claim(load_spec(plain).model_dump(mode="json"), canonical=canonical)
    with pytest.raises(ValueError, match="different spec"):
        store.claim(load_spec(TINY).model_dump(mode="json"), canonical=canonical)


def test_training_cut_short_goes_on_from_its_last_state_in_the_next_run(local_ray, tmp_path):
    spec = {**TINY, "name": "cut", "dataset": {**TINY["dataset"], "extra_sizes": [0]},
            "train": {**TINY["train"], "epochs": 1000}}  # fmt: skip
    spec_path = tmp_path / "cut.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    command = [sys.executable, "-m", "volume_ray.cli", "train", str(spec_path),
               "--storage", str(tmp_path / "cut")]  # fmt: skip
    store = SweepStore(tmp_path / "cut", "cut")
    driver = subprocess.Popen(command, start_new_session=True, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 120
    while not resumable_states(store) and time.monotonic() < deadline:
        time.sleep(0.1)
    os.killpg(driver.pid, signal.SIGKILL)  # the driver and its whole local Ray: a lost cluster
    driver.wait()
    assert resumable_states(store), "no resumable state within 120 s"
    (model_id, location), *others = resumable_states(store).items()
    saved_epoch = len(torch.load(io.BytesIO(read_bytes(location)), weights_only=True)["history"])
    assert not others and store.finished_models().empty and saved_epoch % 50 == 0

    rerun = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    newest = max(Path(store.tune).glob("train-*"), key=lambda p: p.stat().st_mtime_ns)
    (results,) = newest.glob("*/result.json")
    first = json.loads(results.read_text().splitlines()[0])
    assert first["epoch"] == saved_epoch + 1  # went on from the state, not from epoch 1

    reference = run_sweep(load_spec(spec), str(tmp_path / "whole"), stages=("train",),
                          progress=False)  # fmt: skip
    resumed = store.read_state_dict(f"checkpoints/{model_id}.pt")
    uncut = reference.read_state_dict(f"checkpoints/{model_id}.pt")
    assert resumed.keys() == uncut.keys()
    for name in uncut:  # bit for bit the weights of a run that was never cut
        assert torch.equal(resumed[name], uncut[name]), name


def test_actors_that_cannot_start_fail_the_stage_with_their_reason(trained, tmp_path):
    store = copy_store(trained, tmp_path, radii=False)
    Path(store.spec_path).unlink()  # what an actor on a node without the store would see
    with pytest.raises(RuntimeError, match="could not start.*cannot read the sweep store"):
        measure_stage(load_spec(TINY), store, progress=False)
    assert not list(Path(store.radii).glob("*.parquet"))


def test_an_actor_that_never_finds_room_does_not_hold_up_the_stage(trained, tmp_path, monkeypatch):
    monkeypatch.setattr(driver, "START_GRACE_S", 2.0)  # the default waits 30 s
    store = copy_store(trained, tmp_path, radii=False)
    spec = load_spec({**TINY, "resources": {"workers": 3}})  # 2 CPUs: one actor never fits
    stats = measure_stage(spec, store, progress=False)
    assert 2.0 <= stats.startup_seconds < 60 and stats.shards == 24
    pd.testing.assert_frame_equal(sorted_radii(store), sorted_radii(trained))
