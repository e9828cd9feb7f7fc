"""The thermodynamic stage on a real local Ray: ladders as actor tasks, their rows in
volumes.parquet equal to the Python API's estimate, resuming from stored rungs."""

from __future__ import annotations

import math
import shutil
import subprocess

import pandas as pd
import pyarrow.parquet as pq
import pytest
import ray
import torch
from conftest import kill_when, measure_command
from threadpoolctl import threadpool_limits

from volume_ray.cli import main
from volume_ray.driver import (
    aggregate_stage,
    measure_stage,
    pending_shards,
    run_sweep,
    trained_pairs,
)
from volume_ray.experiment import experiment_data, new_model
from volume_ray.ladder_tasks import WhiteningTask, pending_ladders
from volume_ray.models import loss_for_task
from volume_ray.spec import SpecError, load_spec, smoke_variant
from volume_ray.store import SweepStore
from volume_ray.thermodynamic import thermodynamic_log_volume

BUDGET = {"chains": 8, "steps": 4, "whitening_directions": 100, "seed": 3}  # small, yet valid
LADDER = {
    "name": "ladder",
    "dataset": {"name": "digits", "base_size": 60, "extra_sizes": [0]},
    "model": {"name": "mlp", "hidden": [4]},
    "train": {"epochs": 150, "lr": 0.01, "seeds": [0]},
    # 0.01 lies below the trained loss (about 0.14): that basin is empty
    "volume": {"directions": 8, "shard_size": 4, "thresholds": [0.01, 1.0],
               "estimators": ["paper", "typical", "thermodynamic"]},
    "thermodynamic": BUDGET,
    "resources": {"workers": 2},
}  # fmt: skip


@pytest.fixture(scope="module")
def swept(tmp_path_factory) -> SweepStore:
    """The ladder sweep, run once on a local Ray that stays up for the module."""
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield run_sweep(load_spec(LADDER), str(tmp_path_factory.mktemp("s")), progress=False)
    finally:
        ray.shutdown()


def thermodynamic_rows(store: SweepStore) -> pd.DataFrame:
    volumes = pd.read_parquet(store.volumes_path)
    return volumes[volumes.estimator == "thermodynamic"].set_index("threshold")


def test_the_stage_gives_the_python_apis_estimate(swept):
    rows = thermodynamic_rows(swept)
    assert sorted(rows.index) == [0.01, 1.0]
    empty = rows.loc[0.01]
    assert math.isnan(empty.log_volume) and not empty.ci_valid
    spec = load_spec(LADDER)
    data = experiment_data(spec)
    model = new_model(spec, data, seed=0)
    model.load_state_dict(swept.read_state_dict(swept.finished_models().checkpoint[0]))
    x, y = data.landscape_set(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread, as on the actors: the same sums to the last bit
    try:
        with threadpool_limits(1):  # numpy's BLAS too (the whitening's products)
            direct = thermodynamic_log_volume(
                model, x, y, loss_for_task(data.source.task), threshold=1.0, **BUDGET
            )
    finally:
        torch.set_num_threads(threads)
    row = rows.loc[1.0]
    assert row.ci_valid and direct.ci_valid
    assert row.log_volume == pytest.approx(direct.estimate, rel=1e-9)
    assert row.ci_low == pytest.approx(direct.ci_low, rel=1e-9)
    assert row.ci_high == pytest.approx(direct.ci_high, rel=1e-9)
    assert row.ess == pytest.approx(direct.ess) and row.n_params == model_size(model)
    names = sorted(p.name for p in swept.ladders.iterdir())
    # the empty basin's mark; a whitening and a rung per restraint
    assert names[0].endswith("__empty.parquet") and "T0.01" in names[0]
    assert names[-1].endswith("__whitening.parquet") and "T1.0" in names[-1]
    assert len(names) == 2 + len(direct.ladder)
    # the chains' states (n numbers a chain) are kept in the last rung's file alone,
    # and only until the ladder is finished
    assert not any("gaussian" in pq.read_schema(path).names for path in rung_files(swept))


def model_size(model) -> int:
    return sum(p.numel() for p in model.parameters())


def test_a_killed_driver_goes_on_from_the_last_stored_rung(swept, tmp_path):
    store = copy_without_ladders(swept, tmp_path)
    command = measure_command(LADDER, tmp_path)
    kill_when(command, lambda: len(rung_files(store)) >= 4, timeout=180)
    stored = rung_files(store)
    assert 4 <= len(stored) < len(rung_files(swept))  # killed in the middle of the ladder
    # the last stored rung keeps its chains' states; the ones before are final already
    survivors = {p.name: p.stat().st_mtime_ns for p in stored[:-1]}
    rerun = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    for name, mtime in survivors.items():
        assert (store.ladders / name).stat().st_mtime_ns == mtime
    pd.testing.assert_frame_equal(
        pd.read_parquet(store.volumes_path), pd.read_parquet(swept.volumes_path)
    )


def test_a_ladder_whose_later_rungs_are_lost_is_run_again_to_the_same_rows(swept, tmp_path):
    """The chains' states live only in the last rung's file: with the last rungs gone,
    the ladder reruns from its top, to the same rungs."""
    shutil.copytree(swept.root, tmp_path / "ladder")
    store = SweepStore(tmp_path, "ladder")
    for path in rung_files(store)[-2:]:
        path.unlink()
    spec = load_spec(LADDER)
    stats = measure_stage(spec, store, progress=False)  # on the module's Ray
    assert stats.ladder_tasks == len(rung_files(swept)) and stats.shards == 0
    pd.testing.assert_frame_equal(aggregate_stage(spec, store), pd.read_parquet(swept.volumes_path))


def copy_without_ladders(store: SweepStore, tmp_path) -> SweepStore:
    shutil.copytree(store.root, tmp_path / store.root.name)
    copy = SweepStore(tmp_path, store.root.name)
    shutil.rmtree(copy.ladders)
    copy.volumes_path.unlink()
    return copy


def rung_files(store: SweepStore) -> list:
    return sorted(store.ladders.glob("*__rung*.parquet")) if store.ladders.exists() else []


def test_another_ladder_budget_keeps_the_radii_and_starts_a_new_ladder(swept, tmp_path):
    shutil.copytree(swept.root, tmp_path / "ladder")
    store = SweepStore(tmp_path, "ladder")
    more = load_spec({**LADDER, "thermodynamic": {**BUDGET, "chains": 12}})
    store.claim(more.model_dump(mode="json"))  # no conflict with the recorded spec
    assert not pending_shards(more, store)[0]
    tasks, total = pending_ladders(more, store, trained_pairs(more, store))
    assert total == 2 and all(isinstance(t, WhiteningTask) for t in tasks) and len(tasks) == 2


@pytest.mark.parametrize(
    "change, match",
    [
        ({"volume": {**LADDER["volume"], "metric": "accuracy", "thresholds": [0.9]}},
         "thermodynamic .* needs volume.metric: loss"),
        ({"volume": {**LADDER["volume"], "filter_norm": "li2018"}}, "filter_norm paper or none"),
        ({"thermodynamic": {"chains": 3}}, "thermodynamic.chains"),
        ({"thermodynamic": {"rungs": 1}}, "thermodynamic.rungs"),
        ({"thermodynamic": {"steps": 1}}, "thermodynamic.steps"),
    ],
)  # fmt: skip
def test_bad_ladder_specs_are_named(change, match):
    with pytest.raises(SpecError, match=match):
        load_spec({**LADDER, **change})


def test_status_counts_the_finished_ladders(swept, capsys):
    assert main(["status", str(swept.root)]) == 0
    assert "ladders  2/2 finished" in capsys.readouterr().out


def test_the_smoke_form_keeps_ladders_small():
    big = load_spec({**LADDER, "thermodynamic": {"chains": 64, "steps": 20}})
    t = smoke_variant(big).thermodynamic
    assert (t.chains, t.steps, t.whitening_directions) == (16, 6, 200)
