"""The result store on object storage: a real S3 API (moto's server on 127.0.0.1), the
store's own reads and writes, and a whole sweep run into a bucket.

Two ways to reach the endpoint are exercised: the store unit tests use plain
`s3://bucket/...` URIs with `AWS_ENDPOINT_URL` in the environment; the sweep carries the
endpoint in its URI (`?endpoint_override=...&scheme=http`) with no endpoint variable, so
the location alone leads Ray actors and Tune trials to the bucket. Credentials come from
`AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`, which the local Ray's workers inherit.
"""

from __future__ import annotations

import logging
import re
import socket
import types
from pathlib import Path
from urllib.parse import quote

import pandas as pd
import pytest
import ray
import torch
from pyarrow import fs

from volume_ray import locations
from volume_ray.cli import main
from volume_ray.driver import pending_shards, run_sweep
from volume_ray.locations import exists, join, locate, read_bytes, split, write_atomic
from volume_ray.results import load_table
from volume_ray.spec import load_spec
from volume_ray.store import PARQUET_MIN_BYTES, SweepStore, write_table
from volume_ray.workers import VolumeWorker

BUCKET = "sweeps"
SPEC = {
    "name": "tiny-s3",
    "dataset": {"name": "digits", "base_size": 60, "extra_sizes": [0, 60]},
    "model": {"name": "mlp", "hidden": [16]},
    "train": {"epochs": 30, "lr": 0.01, "seeds": [0]},
    "volume": {"directions": 4, "shard_size": 2, "thresholds": [0.5]},
    "resources": {"workers": 1},
}
KEYS = ["model_id", "landscape_size", "direction", "threshold"]


@pytest.fixture(scope="module")
def s3_endpoint():
    """An S3 server with one bucket; AWS credentials in the environment for this module
    (set before Ray starts, so its workers inherit them), no endpoint variable."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"127.0.0.1:{port}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AWS_ACCESS_KEY_ID", "testing")
        patch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        patch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE"):
            patch.delenv(name, raising=False)
        bucket(endpoint).create_dir(BUCKET)
        yield endpoint
    server.stop()


def bucket(endpoint: str) -> fs.S3FileSystem:
    """A direct view of the bucket, independent of the code under test."""
    return fs.S3FileSystem(endpoint_override=endpoint, scheme="http", allow_bucket_creation=True)


@pytest.fixture
def plain_uri(s3_endpoint, monkeypatch, request) -> str:
    """A fresh `s3://` prefix, its endpoint given by AWS_ENDPOINT_URL."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://{s3_endpoint}")
    return f"s3://{BUCKET}/{re.sub(r'[^A-Za-z0-9_-]', '-', request.node.name)}"


def objects(endpoint: str, prefix: str) -> dict[str, fs.FileInfo]:
    """Every object under `prefix` in the bucket, by path."""
    selector = fs.FileSelector(f"{BUCKET}/{prefix}", recursive=True, allow_not_found=True)
    found = bucket(endpoint).get_file_info(selector)
    return {info.path: info for info in found if info.type == fs.FileType.File}


# -- the store's reads and writes -------------------------------------------------------


def test_the_store_round_trips_through_s3(plain_uri, s3_endpoint, tmp_path):
    store = SweepStore(plain_uri, "tiny")
    assert store.location == f"{plain_uri}/tiny"
    spec = load_spec(SPEC).model_dump(mode="json")
    store.claim(spec)
    store.claim(spec)  # the same spec: accepted
    with pytest.raises(ValueError, match="different spec"):
        store.claim({**spec, "volume": {**spec["volume"], "seed": 9}})
    assert store.recorded_spec() == spec

    state = {"layers.0.weight": torch.arange(6.0).reshape(2, 3)}
    torch.save(state, tmp_path / "model.pt")
    row = {"model_id": "m1", "train_size": 60, "checkpoint": "checkpoints/m1.pt"}
    store.write_checkpoint("m1", tmp_path / "model.pt")
    store.write_model_row(row)
    store.write_model_row({**row, "model_id": "m2"})  # a row whose checkpoint is missing
    assert store.finished_models().model_id.tolist() == ["m1"]
    damaged = join(store.model_rows, "m3.parquet")
    write_atomic(damaged, lambda sink: sink.write(b"not parquet"))
    with pytest.raises(RuntimeError, match="m3.parquet cannot be read.*delete it"):
        store.finished_models()  # never quietly dropped, which would train it again
    filesystem, where = locate(damaged)
    filesystem.delete_file(where)
    loaded = store.read_state_dict("checkpoints/m1.pt")
    assert torch.equal(loaded["layers.0.weight"], state["layers.0.weight"])
    store.write_models()
    assert load_table(store.location, "models").model_id.tolist() == ["m1"]

    frame = pd.DataFrame({"direction": [0, 1, 2], "radius": [0.1, 0.2, 0.3]})
    written = store.shard_path("m1", 60, 0, 3)
    write_table(frame, written, metadata={"volume_ray.node_id": "n"})
    pd.testing.assert_frame_equal(store.read_radii(), frame)
    truncated = store.shard_path("m1", 60, 3, 3)
    write_atomic(truncated, lambda sink: sink.write(read_bytes(written)[:100]))
    write_atomic(store.shard_path("m1", 60, 6, 3), lambda sink: None)  # an empty object
    finished = {"m1__L60__d0000000-3.parquet", "m1__L60__d0000003-3.parquet"}
    assert store.finished_shards() == finished  # from the listing: names and sizes
    with pytest.raises(RuntimeError, match=r"radii/m1__L60__d0000003-3.parquet cannot be read"):
        store.read_radii()

    # all of it is in the bucket, none on the local disk
    stored = objects(s3_endpoint, "test_the_store_round_trips_through_s3/tiny")
    names = sorted(path.split("/tiny/")[1] for path in stored)
    assert names == [
        "checkpoints/m1.pt", "models.parquet", "models/m1.parquet", "models/m2.parquet",
        "radii/m1__L60__d0000000-3.parquet", "radii/m1__L60__d0000003-3.parquet",
        "radii/m1__L60__d0000006-3.parquet", "spec.yaml",
    ]  # fmt: skip
    assert not Path("s3:").exists()


@pytest.mark.parametrize("where", ["s3", "local"])
def test_a_write_that_fails_midway_leaves_no_object(where, plain_uri, tmp_path):
    storage = plain_uri if where == "s3" else str(tmp_path)
    store = SweepStore(storage, "tiny")
    target = store.shard_path("m1", 60, 0, 3)

    def half_then_fail(sink) -> None:
        sink.write(b"PAR1 half a shard")
        raise RuntimeError("serialisation failed")

    with pytest.raises(RuntimeError, match="serialisation failed"):
        write_atomic(target, half_then_fail)
    assert not exists(target)
    write_table(pd.DataFrame({"radius": [0.5]}), target)
    before = read_bytes(target)
    with pytest.raises(RuntimeError, match="serialisation failed"):
        write_atomic(target, half_then_fail)
    assert read_bytes(target) == before  # the old object, whole
    if where == "local":
        assert sorted(p.name for p in Path(store.radii).iterdir()) == [Path(target).name]


@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        (lambda shard: shard[:100], "cannot be read"),  # truncated
        (lambda shard: b"PAR1" + bytes(range(256)) + b"PAR1", "cannot be read"),  # foreign
        (lambda shard: None, "holds 2 rows, not the 3 of 3 directions x 1 thresholds"),
    ],
    ids=["truncated", "foreign", "rows"],
)
def test_a_shard_damaged_from_outside_is_named_where_the_radii_are_read(damage, problem, tmp_path):
    store = SweepStore(tmp_path, "tiny")
    store.claim(load_spec(SPEC).model_dump(mode="json"))  # one threshold
    frame = pd.DataFrame({"direction": [0, 1, 2], "threshold": 0.5, "radius": [0.1, 0.2, 0.3]})
    write_table(frame, store.shard_path("m1", 60, 0, 3))
    victim = Path(store.shard_path("m1", 60, 3, 3))
    write_table(frame.iloc[:2], victim)  # another shard's rows, or the start of a damage
    if (damaged := damage(victim.read_bytes())) is not None:
        victim.write_bytes(damaged)
    assert victim.name in store.finished_shards()  # a plausible size: taken as finished
    with pytest.raises(RuntimeError) as caught:
        store.read_radii()
    message = str(caught.value)
    assert f"{victim} {problem}" in message and "Delete it; a rerun measures" in message


@pytest.mark.parametrize("size", [0, PARQUET_MIN_BYTES - 1])
def test_a_shard_too_short_to_be_parquet_is_measured_again(size, tmp_path):
    store = SweepStore(tmp_path, "tiny")
    write_table(pd.DataFrame({"radius": [0.5]}), store.shard_path("m1", 60, 0, 1))
    Path(store.shard_path("m1", 60, 1, 1)).write_bytes(b"PAR1PAR1PAR1"[:size])
    assert store.finished_shards() == {"m1__L60__d0000000-1.parquet"}


def test_a_file_in_radii_that_is_no_shard_is_named(tmp_path):
    store = SweepStore(tmp_path, "tiny")
    store.claim(load_spec(SPEC).model_dump(mode="json"))
    write_table(pd.DataFrame({"radius": [0.5]}), join(store.radii, "notes.parquet"))
    with pytest.raises(RuntimeError, match=r"notes.parquet is not named as a radii shard"):
        store.read_radii()


# -- one filesystem per store -----------------------------------------------------------


@pytest.fixture
def built(monkeypatch) -> list[str]:
    """The root URI of every filesystem `locations` builds from now on, none cached: its
    calls to pyarrow's `FileSystem.from_uri` are counted (and still build each one)."""
    uris = []

    def from_uri(uri: str):
        uris.append(uri)
        return fs.FileSystem.from_uri(uri)

    counting = types.ModuleType(fs.__name__)
    counting.__dict__.update(vars(fs))
    counting.FileSystem = types.SimpleNamespace(from_uri=from_uri)
    monkeypatch.setattr(locations, "fs", counting)
    locations._filesystem.cache_clear()
    return uris


@pytest.mark.parametrize(
    "path", ["", "/", "/runs/", "/my%20results%20100%25/tiny", "/a+b;c=d@e:f/%C3%A9/~x", "/a//b"]
)
def test_a_uri_locates_the_path_pyarrow_reads_from_it(path, s3_endpoint, tmp_path):
    uris = [
        f"file://{quote(str(tmp_path))}{path}",
        f"s3://{BUCKET}{path}?endpoint_override={s3_endpoint}&scheme=http",
    ]
    for uri in uris:
        filesystem, where = locate(uri)
        expected_filesystem, expected = fs.FileSystem.from_uri(uri)
        assert where == expected and type(filesystem) is type(expected_filesystem)


def test_local_paths_and_uris_share_one_filesystem_each(built, s3_endpoint, tmp_path):
    assert locate(tmp_path)[0] is locate(tmp_path / "a" / "b")[0]
    file_uri = f"file://{quote(str(tmp_path))}"
    assert locate(file_uri)[0] is locate(join(file_uri, "a b", "c%d"))[0]
    s3 = f"s3://{BUCKET}/a?endpoint_override={s3_endpoint}&scheme=http"
    assert locate(s3)[0] is locate(join(s3, "b"))[0]
    assert built == ["file:///", f"s3://{BUCKET}/?endpoint_override={s3_endpoint}&scheme=http"]


# -- a sweep in a bucket ----------------------------------------------------------------


@pytest.fixture(scope="module")
def local_ray(s3_endpoint):
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def sweeps(s3_endpoint, local_ray, tmp_path_factory) -> tuple[SweepStore, SweepStore]:
    """The same sweep run into the bucket (endpoint in the URI) and into a local folder."""
    storage = f"s3://{BUCKET}/runs?endpoint_override={s3_endpoint}&scheme=http"
    remote = run_sweep(load_spec(SPEC), storage, progress=False)
    local = run_sweep(load_spec(SPEC), str(tmp_path_factory.mktemp("local")), progress=False)
    return remote, local


def test_a_sweep_in_a_bucket_writes_the_contract_tables_and_tune_state(sweeps, s3_endpoint):
    remote, _ = sweeps
    assert remote.location.startswith(f"s3://{BUCKET}/runs/tiny-s3?endpoint_override=")
    models = load_table(remote.location, "models")
    assert sorted(models.train_size) == [60, 120]
    volumes = load_table(remote.location, "volumes")
    assert len(volumes) == 3 * 2 and (volumes.n_directions == 4).all()  # pairs x estimators
    assert len(load_table(remote.location, "radii")) == 3 * 4
    stored = objects(s3_endpoint, "runs/tiny-s3")
    checkpoints = [p for p in stored if "/tune/train-" in p and p.endswith("/model.pt")]
    assert len(checkpoints) == 2  # each trial's final checkpoint, kept by Tune in the bucket
    assert not Path("s3:").exists()


def test_a_sweep_in_a_bucket_measures_what_a_local_one_does(sweeps):
    remote, local = sweeps
    pd.testing.assert_frame_equal(
        load_table(remote.location, "radii").sort_values(KEYS).reset_index(drop=True),
        local.read_radii().sort_values(KEYS).reset_index(drop=True),
    )
    pd.testing.assert_frame_equal(
        load_table(remote.location, "volumes"), load_table(local.location, "volumes")
    )


def test_a_rerun_in_a_bucket_recomputes_nothing(sweeps, s3_endpoint):
    remote, _ = sweeps
    before = objects(s3_endpoint, "runs/tiny-s3")
    shards = {path: info.mtime for path, info in before.items() if "/radii/" in path}
    storage, _ = split(remote.location)
    run_sweep(load_spec(SPEC), storage, progress=False)
    after = objects(s3_endpoint, "runs/tiny-s3")
    assert len(shards) == 6
    assert {path: after[path].mtime for path in shards} == shards
    volumes = f"{BUCKET}/runs/tiny-s3/volumes.parquet"
    assert after[volumes].mtime > before[volumes].mtime  # rewritten: mtimes do resolve
    tune_runs = {p.split("/tune/")[1].split("/")[0] for p in after if "/tune/" in p}
    assert len(tune_runs) == 1  # nothing trained again


def test_a_store_in_a_bucket_builds_one_filesystem(sweeps, built):
    remote, _ = sweeps
    store = SweepStore.at(remote.location)  # as an actor or a rerun makes it
    assert pending_shards(load_spec(SPEC), store) == ([], 6)
    assert len(store.read_radii()) == 3 * 4
    assert len(built) == 1 and built[0].startswith(f"s3://{BUCKET}/?endpoint_override=")


def test_status_query_and_report_take_a_sweep_uri(sweeps, capsys):
    remote, _ = sweeps
    assert main(["status", remote.location]) == 0
    out = capsys.readouterr().out
    assert "models   2/2 trained" in out and "shards   6/6 measured" in out
    assert main(["query", remote.location, "--table", "models", "--format", "csv"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 1 + 2
    assert main(["report", remote.location]) == 0
    summary = read_bytes(join(remote.location, "report", "summary.md")).decode()
    assert summary.startswith("# tiny-s3")
    assert "wrote 6 figures" in capsys.readouterr().out


def test_a_worker_that_cannot_see_the_store_says_where_and_how_to_fix(sweeps):
    remote, _ = sweeps
    elsewhere = remote.location.replace("/runs/tiny-s3?", "/nowhere/tiny-s3?")
    spec = load_spec(SPEC).model_dump(mode="json")
    actor = VolumeWorker.options(num_cpus=0).remote(spec, elsewhere)
    with pytest.raises(ray.exceptions.RayActorError) as caught:
        ray.get(actor.pid.remote(), timeout=60)
    message = str(caught.value)
    node = ray.get_runtime_context().get_node_id()
    assert f"node {node} ({socket.gethostname()}) cannot read the sweep store" in message
    assert elsewhere in message and "every node mounts" in message
    assert "s3://bucket/prefix" in message


def test_uris_with_spaces_and_percent_signs(tmp_path):
    folder = tmp_path / "my results 100%"
    uri = "file://" + quote(str(folder))  # percent-encoded, as a URI must be
    store = SweepStore(uri, "tiny")
    store.claim(load_spec(SPEC).model_dump(mode="json"))
    assert (folder / "tiny" / "spec.yaml").is_file()  # decoded on the way to the disk
    assert split(store.location) == (uri, "tiny") and exists(store.spec_path)
    with pytest.raises(ValueError, match="percent-encode"):
        exists(f"file://{folder}/tiny")  # a raw space is no URI
