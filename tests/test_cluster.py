"""volume_ray on a real multi-node Ray cluster on this host, token auth on.

The cluster is three `ray start` nodes (head + 2 workers, 1 CPU each) brought up by
`cluster/local_cluster.py`, exactly as a user would; every client here is a separate
process holding (or lacking) the cluster's token. Tests run in file order: the last
one takes a node away.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.request import urlopen

import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from volume_ray.experiment import experiment_data, new_model
from volume_ray.measure import measure_radii
from volume_ray.models import loss_for_task
from volume_ray.spec import load_spec
from volume_ray.train import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "cluster" / "local_cluster.py"

SPREAD = {  # three actors on three 1-CPU nodes: one per node
    "name": "spread",
    "dataset": {"name": "digits", "base_size": 60, "extra_sizes": [0, 120]},
    "model": {"name": "mlp", "hidden": [16]},
    "train": {"epochs": 100, "lr": 0.01, "seeds": [0]},
    "volume": {"directions": 24, "shard_size": 2, "thresholds": [0.5]},
    "resources": {"workers": 3},
}
LONG = {  # a measuring stage of ~12 s on this host, long enough to lose a node in it
    "name": "long",
    "dataset": {"name": "digits", "base_size": 200, "extra_sizes": [0, 400]},
    "model": {"name": "mlp", "hidden": [256, 256]},
    "train": {"epochs": 100, "lr": 0.01, "seeds": [0]},
    "volume": {"directions": 240, "shard_size": 4, "thresholds": [0.5], "search": "grid"},
    "resources": {"workers": 3},
}


@dataclass
class LocalCluster:
    folder: Path
    address: str
    dashboard: str
    env: dict[str, str]  # a client's environment, token included
    nodes: dict[str, dict]  # node id -> {"name", "metrics_port"}


def _client_env(auth: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS"))}
    return {**env, **auth, "RAY_USAGE_STATS_ENABLED": "0"}


def _run(command: list, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(c) for c in command], env=env, capture_output=True, text=True, timeout=timeout
    )


def _python(code: str, env: dict) -> subprocess.CompletedProcess:
    return _run([sys.executable, "-c", code], env, timeout=120)


def _load_script():
    """cluster/local_cluster.py as a module: the tests check its own notion of a node's
    processes rather than a copy of it."""
    spec = importlib.util.spec_from_file_location("local_cluster", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


local_cluster = _load_script()


def _alive(pid: int) -> bool:
    fields = local_cluster._stat(pid)
    return fields is not None and fields[0] != "Z"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cluster")
    node_env = {  # notice a lost node within a few seconds
        **_client_env({}),
        "RAY_health_check_period_ms": "1000",
        "RAY_health_check_timeout_ms": "1000",
        "RAY_health_check_failure_threshold": "3",
    }
    bystander = subprocess.Popen(["sleep", "600"], start_new_session=True)
    try:
        up = _run([sys.executable, SCRIPT, "up", "--workers", 2, "--dir", folder], node_env)
        assert up.returncode == 0, up.stdout + up.stderr
        state = json.loads((folder / "cluster.json").read_text())
        started = [p for node in state["nodes"] for p in local_cluster.node_processes(node)]
        assert len(started) >= 3 * 3  # a raylet, agents and more per node
        try:
            env = _client_env(state["auth"])
            listed = _python(
                "import json, ray\n"
                f"ray.init(address={state['address']!r}, log_to_driver=False)\n"
                "print(json.dumps({n['NodeID']: n['MetricsExportPort'] for n in ray.nodes() "
                "if n['Alive']}))",
                env,
            )
            assert listed.returncode == 0, listed.stderr
            ports = json.loads(listed.stdout.strip().splitlines()[-1])
            names = {n["metrics_port"]: n["name"] for n in state["nodes"]}
            nodes = {i: {"name": names[p], "metrics_port": p} for i, p in ports.items()}
            assert sorted(n["name"] for n in nodes.values()) == ["head", "worker-1", "worker-2"]
            yield LocalCluster(folder, state["address"], state["dashboard"], env, nodes)
        finally:
            down = _run([sys.executable, SCRIPT, "down", "--dir", folder], node_env)
            assert down.returncode == 0, down.stderr
        assert not any(_alive(pid) for pid in started)  # everything it started is gone
        assert bystander.poll() is None  # and nothing else
    finally:
        bystander.kill()


def _write_spec(folder: Path, spec: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{spec['name']}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _shard_nodes(store: Path) -> list[str]:
    return [
        pq.read_schema(path).metadata[b"volume_ray.node_id"].decode()
        for path in sorted((store / "radii").glob("*.parquet"))
    ]


@dataclass
class SpreadRun:
    store: Path
    seen: dict[str, set[str]]  # "tasks" and "actors": the names the state API listed


def _listed(cluster: LocalCluster) -> dict[str, set[str]]:
    """The names of every task and actor the cluster's state API lists now."""
    listed = _python(
        "import json\n"
        "from ray.util.state import list_actors, list_tasks\n"
        f"where = dict(address={cluster.dashboard!r}, limit=10000, raise_on_missing_output=False)\n"
        "names = {'tasks': [t.name for t in list_tasks(**where)],\n"
        "         'actors': [a.name for a in list_actors(**where)]}\n"
        "print(json.dumps(names))",
        cluster.env,
    )
    if listed.returncode != 0:  # the cluster is busy; the next poll will do
        return {"tasks": set(), "actors": set()}
    return {k: set(v) for k, v in json.loads(listed.stdout.strip().splitlines()[-1]).items()}


@pytest.fixture(scope="module")
def spread_run(cluster, tmp_path_factory) -> SpreadRun:
    """SPREAD run with `volume-ray run --address`, its tasks and actors read through
    Ray's state API while it runs."""
    folder = tmp_path_factory.mktemp("spread")
    spec = _write_spec(folder, SPREAD)
    command = ["volume-ray", "run", spec, "--address", cluster.address, "--storage", folder]
    log = folder / "run.log"
    with log.open("w") as sink:
        run = subprocess.Popen([str(c) for c in command], env=cluster.env, stdout=sink,
                               stderr=subprocess.STDOUT)  # fmt: skip
        seen: dict[str, set[str]] = {"tasks": set(), "actors": set()}
        while run.poll() is None:
            for kind, names in _listed(cluster).items():
                seen[kind] |= names
    assert run.wait(timeout=600) == 0, log.read_text()[-3000:]
    return SpreadRun(folder / "spread", seen)


@pytest.fixture(scope="module")
def spread_store(spread_run) -> Path:
    return spread_run.store


def test_the_state_api_lists_the_sweeps_work_by_name_during_the_run(spread_run):
    """Each shard's task reads `measure <model> L<size> dirs a-b`, for the shards the
    store holds; the workers are named after the sweep."""
    measured = {n for n in spread_run.seen["tasks"] if n.startswith("measure ")}
    radii = pd.read_parquet(spread_run.store / "radii")
    shards = {
        f"measure {model} L{size} dirs {start}-{start + 1}"
        for (model, size), rows in radii.groupby(["model_id", "landscape_size"])
        for start in range(0, rows.direction.max() + 1, 2)
    }
    assert measured and measured <= shards  # seen while running: a shard may be missed
    assert {f"volume_worker:spread:{i}" for i in range(3)} <= spread_run.seen["actors"]


def test_run_with_address_puts_actors_on_every_node(cluster, spread_store):
    nodes = _shard_nodes(spread_store)
    assert len(nodes) == 3 * 12  # 3 pairs x 24 directions in shards of 2
    assert set(nodes) == set(cluster.nodes)  # the shards were measured on all three nodes
    volumes = pd.read_parquet(spread_store / "volumes.parquet")
    assert len(volumes) > 0 and (volumes.n_directions == 24).all()


def _scrape(port: int) -> list:
    with urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return [
            sample
            for family in text_string_to_metric_families(response.read().decode())
            for sample in family.samples
            if sample.name.startswith("ray_volume_ray_") and sample.labels.get("sweep") == "spread"
        ]


def test_custom_metrics_are_on_every_node_metrics_endpoint(cluster, spread_store):
    radii = pd.read_parquet(spread_store / "radii")
    expected = radii.groupby(["model_id", "landscape_size"]).direction.nunique().to_dict()
    names = {
        "ray_volume_ray_directions_measured_total",
        "ray_volume_ray_evaluations_total",
        "ray_volume_ray_shard_seconds_count",
        "ray_volume_ray_latest_radius",
        "ray_volume_ray_radii_total",
    }
    deadline = time.monotonic() + 60
    while True:  # metrics reach the endpoint on each agent's next report (and a gauge
        # of a finished actor is dropped a while later: this test runs right after)
        per_node = {i: _scrape(n["metrics_port"]) for i, n in cluster.nodes.items()}
        samples = [s for found in per_node.values() for s in found]
        measured: dict[tuple[str, int], float] = {}
        for s in samples:
            if s.name == "ray_volume_ray_directions_measured_total":
                key = (s.labels["model"], int(s.labels["landscape"]))
                measured[key] = measured.get(key, 0) + s.value
        complete = measured == expected and names <= {s.name for s in samples}
        if complete and all(per_node.values()) or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert measured == expected  # summed over the nodes: every direction counted once
    assert names <= {s.name for s in samples}
    assert all(per_node.values())  # every node exports its own actor's metrics
    for s in samples:
        if s.name.startswith("ray_volume_ray_tasks_"):  # the driver's, tagged by sweep only
            continue
        assert s.labels["model"] in set(radii.model_id)
        assert int(s.labels["landscape"]) in set(radii.landscape_size)


def test_ray_job_submit_runs_a_sweep_on_the_cluster(cluster, tmp_path):
    job = tmp_path / "job"
    _write_spec(job, {**SPREAD, "name": "submitted"})
    storage = tmp_path / "results"
    command = [
        "ray", "job", "submit", "--address", cluster.dashboard, "--working-dir", job, "--",
        "volume-ray", "run", "submitted.yaml", "--storage", storage,
    ]  # fmt: skip
    done = _run(command, cluster.env, timeout=600)
    assert done.returncode == 0 and "succeeded" in done.stdout, done.stdout[-3000:] + done.stderr
    assert "done in" in done.stdout  # the driver's own output, tailed back by the job CLI
    assert set(_shard_nodes(storage / "submitted")) == set(cluster.nodes)


def test_a_process_without_the_token_is_refused(cluster, tmp_path):
    home = tmp_path / "home"  # no ~/.ray/auth_token there
    home.mkdir()
    bare = {**_client_env({}), "HOME": str(home)}
    submit = ["ray", "job", "submit", "--address", cluster.dashboard, "--", "echo", "hi"]
    refused = _run(submit, bare, timeout=120)
    assert refused.returncode != 0
    assert "Unauthorized" in refused.stdout + refused.stderr
    wrong = {**bare, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64}
    refused = _run(submit, wrong, timeout=120)
    assert refused.returncode != 0
    assert "AuthenticationError" in refused.stdout + refused.stderr
    spec = _write_spec(tmp_path, SPREAD)  # nor can it join the cluster as a driver
    run = _run(["volume-ray", "run", spec, "--address", cluster.address, "--storage", tmp_path],
               wrong, timeout=120)  # fmt: skip
    assert run.returncode == 1 and "Traceback" not in run.stderr  # a message, not a trace
    (said,) = [line for line in run.stderr.splitlines() if "cannot join the Ray" in line]
    assert cluster.address in said and "token" in said  # and Ray's words on what is missing


def test_a_store_some_node_cannot_read_is_refused_before_any_work(cluster, tmp_path):
    missing = tmp_path / "nowhere"  # no spec.yaml there: no node can read it as a store
    checked = _python(
        "import ray\n"
        "from volume_ray.driver import check_store_from_every_node\n"
        "from volume_ray.store import SweepStore\n"
        f"ray.init(address={cluster.address!r}, log_to_driver=False)\n"
        f"check_store_from_every_node(SweepStore({str(missing)!r}, 'sweep'))",
        cluster.env,
    )
    assert checked.returncode != 0
    message = checked.stderr.strip().splitlines()[-1]
    assert "cannot read the sweep store" in message and "(and 2 more node(s))" in message
    assert any(node_id in message for node_id in cluster.nodes)  # it names the node


def test_losing_a_worker_node_mid_measure_loses_and_duplicates_nothing(cluster, tmp_path):
    spec_path = _write_spec(tmp_path, LONG)
    where = ["--address", cluster.address, "--storage", tmp_path]
    trained = _run(["volume-ray", "train", spec_path, *where], cluster.env)
    assert trained.returncode == 0, trained.stderr[-3000:]
    store = tmp_path / "long"
    victim = next(i for i, n in cluster.nodes.items() if n["name"] == "worker-2")
    measuring = subprocess.Popen(
        [str(c) for c in ["volume-ray", "measure", spec_path, *where]],
        env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while _shard_nodes(store).count(victim) < 5 and time.monotonic() < deadline:
            time.sleep(0.2)
        shards_before = len(_shard_nodes(store))
        lose = [sys.executable, SCRIPT, "stop-node", "2", "--kill", "--dir", cluster.folder]
        stop = _run(lose, cluster.env)  # SIGKILL to the whole node: a machine gone
        assert stop.returncode == 0, stop.stderr
        output, _ = measuring.communicate(timeout=600)
    finally:
        measuring.kill()
    assert measuring.returncode == 0, output[-3000:]
    shards = 3 * 240 // 4  # 3 pairs, 240 directions in shards of 4
    assert shards_before < shards  # the node went while shards were still to do
    assert re.search(r"re-queued [1-9]\d* task", output), output[-3000:]  # its shard(s)

    nodes = _shard_nodes(store)
    assert len(nodes) == shards and victim in nodes  # every shard, once
    assert nodes.count(victim) < shards / 3  # the survivors took over the rest
    radii = pd.read_parquet(store / "radii")
    keys = radii[["model_id", "landscape_size", "direction", "threshold"]]
    assert not keys.duplicated().any() and len(radii) == 3 * 240

    spec = load_spec(LONG)  # a sample of directions, measured again in this process
    data = experiment_data(spec)
    models = pd.read_parquet(store / "models.parquet").set_index("model_id")
    for (model_id, size), group in radii.groupby(["model_id", "landscape_size"]):
        model = new_model(spec, data, int(models.seed[model_id]))
        load_checkpoint(model, store / models.checkpoint[model_id])
        x, y = data.landscape_set(size - spec.dataset.base_size)
        sample = measure_radii(
            model, x, y, loss_for_task(data.source.task), num_directions=8, start=196,
            seed=1, thresholds=(0.5,), search="grid",
        )  # fmt: skip
        cluster_rows = group.set_index("direction").loc[sample.direction]
        assert sample.radius.to_numpy() == pytest.approx(cluster_rows.radius.to_numpy(), rel=1e-6)
