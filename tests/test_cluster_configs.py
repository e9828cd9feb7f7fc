"""The cluster configurations in cluster/: every YAML parses; the `ray up` configs pass Ray's
own cluster-launcher schema and checks, and start every node with token authentication and
a loopback-only dashboard; the KubeRay manifests run the pinned Ray with token
authentication and autoscaled GPU workers; and every version pin or image tag under
cluster/ is the one pyproject.toml pins. Fast, no network: nothing is launched."""

from __future__ import annotations

import copy
import json
import re
import shlex
import tomllib
from pathlib import Path

import jsonschema
import pytest
import ray.autoscaler
import yaml
from packaging.requirements import Requirement
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
RAY_UP = [CLUSTER / "aws.yaml", CLUSTER / "gcp.yaml"]
KUBERAY = CLUSTER / "kuberay"
DOCKERFILE = CLUSTER / "Dockerfile"
YAMLS = sorted(p for p in CLUSTER.rglob("*") if p.suffix in {".yaml", ".yml"})
MANIFESTS = sorted(p for p in KUBERAY.rglob("*") if p.suffix in {".yaml", ".yml"})
# Every file under cluster/ that can pin a version (Markdown prose is left alone).
PINNABLE = sorted(
    p
    for p in CLUSTER.rglob("*")
    if p.is_file()
    and "__pycache__" not in p.parts
    and (
        p.suffix in {".yaml", ".yml", ".sh", ".py", ".toml", ".txt", ".cfg", ".json"}
        or p.name.startswith("Dockerfile")
    )
)


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


# -- what pyproject.toml pins -------------------------------------------------------------

PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _exact_pins(requirements: list[str]) -> dict[str, str]:
    pins = {}
    for text in requirements:
        requirement = Requirement(text)
        exact = [s.version for s in requirement.specifier if s.operator == "=="]
        if exact:
            pins[requirement.name.lower()] = exact[0]
    return pins


PINS = _exact_pins(PROJECT["dependencies"])
RAY, TORCH, TORCHVISION = PINS.get("ray"), PINS.get("torch"), PINS.get("torchvision")
# "py311" for requires-python ">=3.11": the Python of the rayproject/ray image tags.
PY_TAG = "py" + "".join(re.search(r"(\d+)\.(\d+)", PROJECT["requires-python"]).groups())

# A version or image tag: word characters, dots, dashes, `+` and `!`, ending in a word
# character (so "volume-ray:0.1.0," in prose reads as 0.1.0).
_V = r"(\w(?:[\w.+!-]*\w)?)"
# kind -> (pattern whose group 1 is the version or tag, the pyproject.toml version)
PATTERNS = {
    "torch==": (re.compile(r"(?<![\w.-])torch==" + _V), TORCH),
    "torchvision==": (re.compile(r"(?<![\w.-])torchvision==" + _V), TORCHVISION),
    "ray==": (re.compile(r"(?<![\w.-])ray(?:\[[^\]]*\])?==" + _V), RAY),
    "rayVersion": (re.compile(r"\brayVersion[\"']?\s*:\s*[\"']?" + _V), RAY),
    "rayproject/ray": (re.compile(r"\brayproject/ray(?:-ml)?:" + _V), RAY),
    "volume-ray image": (re.compile(r"(?<![\w.-])volume-ray:" + _V), PROJECT["version"]),
}


def _fits(kind: str, value: str, expected: str) -> bool:
    if kind != "rayproject/ray":
        return value == expected
    # A Ray image tag: the release itself, or release-variant ("2.60.0-py311-gpu").
    if value != expected and not value.startswith(expected + "-"):
        return False
    python = re.search(r"-(py\d+)(?:-|$)", value)
    return python is None or python.group(1) == PY_TAG


def scan_versions(text: str) -> tuple[set[str], list[str]]:
    """The kinds of pin found in `text`, and each one that disagrees with pyproject.toml."""
    found, stale = set(), []
    for kind, (pattern, expected) in PATTERNS.items():
        for match in pattern.finditer(text):
            found.add(kind)
            if not _fits(kind, match.group(1), expected):
                line = text.count("\n", 0, match.start()) + 1
                stale.append(f"line {line}: {match.group(0)!r} (pyproject.toml: {expected})")
    return found, stale


# -- parsing helpers -----------------------------------------------------------------------


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _segments(command: str) -> list[str]:
    """The simple commands of a shell line, split at `;`, `&&` and `||`."""
    return [s.strip() for s in re.split(r";|&&|\|\|", command) if s.strip()]


def _ray_start(command: str) -> tuple[dict[str, str], dict[str, str]] | None:
    """(environment, flags) of the `ray start` in a shell line, or None if it has none.
    The environment holds `NAME=value` words before `ray start` and earlier `export`s."""
    if not re.search(r"\bray start\b", command):
        return None
    env: dict[str, str] = {}
    for segment in _segments(command):
        words = shlex.split(segment)
        if words[:1] == ["export"]:
            env.update(w.split("=", 1) for w in words[1:] if "=" in w)
            continue
        prefix = {}  # `NAME=value command` sets NAME for that command only
        while words and re.fullmatch(r"[A-Za-z_]\w*=.*", words[0]):
            name, value = words.pop(0).split("=", 1)
            prefix[name] = value
        if words[:2] == ["ray", "start"]:
            env.update(prefix)
            flags, rest = {}, words[2:]
            while rest:
                word = rest.pop(0)
                if word.startswith("--"):
                    name, _, value = word.partition("=")
                    if not value and rest and not rest[0].startswith("--"):
                        value = rest.pop(0)
                    flags[name] = value
            return env, flags
    return None


def _starts(config: dict, key: str) -> list[tuple[dict[str, str], dict[str, str]]]:
    return [s for c in config.get(key, []) if (s := _ray_start(c)) is not None]


def _head_type(config: dict) -> tuple[str, dict]:
    name = config["head_node_type"]
    return name, config["available_node_types"][name]


def _gpu_types(config: dict) -> dict[str, dict]:
    head, _ = _head_type(config)
    return {
        name: node
        for name, node in config["available_node_types"].items()
        if name != head and node["resources"].get("GPU", 0) >= 1
    }


# -- every YAML ----------------------------------------------------------------------------


def test_the_cluster_files_are_there():
    names = {_rel(p) for p in YAMLS}
    expected = {"aws.yaml", "gcp.yaml", "kuberay/raycluster.yaml", "kuberay/rayjob.yaml"}
    assert {f"cluster/{n}" for n in expected} <= names
    assert DOCKERFILE.is_file()


@pytest.mark.parametrize("path", YAMLS, ids=_rel)
def test_every_yaml_parses(path):
    assert isinstance(_load(path), dict)


# -- versions: one source of truth ---------------------------------------------------------


def test_pyproject_pins_ray_torch_and_torchvision():
    assert RAY and TORCH and TORCHVISION, PINS


@pytest.mark.parametrize("path", PINNABLE, ids=_rel)
def test_every_pin_and_image_tag_is_the_pyproject_one(path):
    _, stale = scan_versions(path.read_text())
    assert not stale, f"{_rel(path)} disagrees with pyproject.toml:\n" + "\n".join(stale)


@pytest.mark.parametrize(
    ("name", "kinds"),
    [
        ("aws.yaml", {"torch==", "torchvision==", "ray==", "rayproject/ray"}),
        ("gcp.yaml", {"torch==", "torchvision==", "ray==", "rayproject/ray"}),
        ("Dockerfile", {"torch==", "torchvision==", "ray==", "rayproject/ray"}),
        ("kuberay/raycluster.yaml", {"rayVersion", "volume-ray image"}),
        ("kuberay/rayjob.yaml", {"rayVersion", "volume-ray image"}),
    ],
)
def test_each_file_pins_what_it_installs(name, kinds):
    found, _ = scan_versions((CLUSTER / name).read_text())
    assert kinds <= found, f"cluster/{name} lacks {kinds - found}"


@pytest.mark.parametrize(
    "snippet",
    [
        "pip install torch==2.0.1",
        "pip install torchvision==0.15.2",
        'pip install "ray[tune,default]==2.9.0"',
        "pip install ray==2.9.0",
        'rayVersion: "2.9.0"',
        "FROM rayproject/ray:2.9.0-py311-gpu",
        "image: rayproject/ray:latest-gpu",
        f"image: rayproject/ray:{RAY}0-py311-gpu",
        f"image: rayproject/ray:{RAY}-py310-gpu",
        "image: volume-ray:0.0.9",
    ],
)
def test_the_version_scan_flags_a_stale_pin(snippet):
    found, stale = scan_versions(snippet)
    assert found and stale


def test_the_version_scan_accepts_the_pyproject_pins():
    text = (
        f'pip install torch=={TORCH} torchvision=={TORCHVISION} "ray[tune,default]=={RAY}"\n'
        f"FROM rayproject/ray:{RAY}-{PY_TAG}-gpu\nrayVersion: '{RAY}'\n"
        f"image: volume-ray:{PROJECT['version']}\n"
    )
    found, stale = scan_versions(text)
    assert found == set(PATTERNS) and not stale


# -- `ray up` configs ----------------------------------------------------------------------


@pytest.fixture(params=RAY_UP, ids=lambda p: p.name)
def ray_up(request) -> tuple[Path, dict]:
    return request.param, _load(request.param)


def test_ray_up_config_passes_rays_own_schema_and_checks(ray_up):
    _, config = ray_up
    schema_path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    jsonschema.validate(config, json.loads(schema_path.read_text()))
    # What `ray up` does with it: merge the provider's defaults, then validate.
    validate_config(prepare_config(copy.deepcopy(config)))


def test_ray_up_config_holds_what_ray_up_needs(ray_up):
    path, config = ray_up
    assert config["cluster_name"]
    assert config["provider"]["type"] == path.stem
    assert isinstance(config["max_workers"], int) and config["max_workers"] >= 1
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    for name, node in types.items():
        assert {"node_config", "resources", "min_workers", "max_workers"} <= set(node), name
        assert 0 <= node["min_workers"] <= node["max_workers"] <= config["max_workers"], name


def test_the_head_node_is_cpu_only_and_runs_no_tasks(ray_up):
    _, config = ray_up
    _, head = _head_type(config)
    assert head["resources"].get("GPU", 0) == 0
    assert head["resources"].get("CPU", 0) <= 1
    assert head["max_workers"] == 0
    node = head["node_config"]
    assert not re.match(r"[gp]\d", node.get("InstanceType", "")), "a GPU instance as head"
    assert not node.get("guestAccelerators"), "a GPU attached to the head"


def test_the_gpu_workers_autoscale_from_zero(ray_up):
    _, config = ray_up
    gpu = _gpu_types(config)
    assert gpu, "no worker type with a GPU"
    for name, node in gpu.items():
        assert node["min_workers"] == 0 and node["max_workers"] >= 1, name
        node_config = node["node_config"]
        if config["provider"]["type"] == "aws":
            assert re.match(r"[gp]\d[a-z]*\.", node_config["InstanceType"]), name
        else:
            accelerators = node_config["guestAccelerators"]
            assert accelerators and accelerators[0]["acceleratorType"].startswith("nvidia-")
            assert accelerators[0]["acceleratorCount"] >= 1
            assert node_config["scheduling"]["onHostMaintenance"] == "TERMINATE"
    docker = config.get("docker", {})
    if docker:  # the workers' container must have CUDA
        worker_image = docker.get("worker_image", docker["image"])
        assert re.search(r":\S*-(gpu|cu\d+)", worker_image), worker_image


def test_every_ray_start_uses_token_auth_and_exports_metrics(ray_up):
    _, config = ray_up
    heads = _starts(config, "head_start_ray_commands")
    workers = _starts(config, "worker_start_ray_commands")
    assert len(heads) == 1 and len(workers) == 1
    for env, flags in heads + workers:
        assert env.get("RAY_AUTH_MODE") == "token", env
        assert env.get("RAY_USAGE_STATS_ENABLED") == "0", env
        assert flags.get("--metrics-export-port", "").isdigit(), flags
    # No other command may start Ray outside the two lists above.
    for key, commands in config.items():
        if key.endswith("commands") and key not in {
            "head_start_ray_commands",
            "worker_start_ray_commands",
        }:
            assert not any(_ray_start(c) for c in commands), key


def test_the_token_comes_from_the_users_own_file_and_reaches_every_node(ray_up):
    path, config = ray_up
    token_mounts = [r for r, local in config["file_mounts"].items() if local == "~/.ray/auth_token"]
    assert len(token_mounts) == 1, "file_mounts must copy ~/.ray/auth_token to the nodes"
    (remote,) = token_mounts
    if remote != "~/.ray/auth_token":  # elsewhere: every node must be told where
        starts = _starts(config, "head_start_ray_commands")
        starts += _starts(config, "worker_start_ray_commands")
        assert all(env.get("RAY_AUTH_TOKEN_PATH") == remote for env, _ in starts)
    assert not re.search(r"RAY_AUTH_TOKEN=\S", path.read_text()), "a literal token"


def test_the_dashboard_binds_loopback_only(ray_up):
    path, config = ray_up
    ((_, flags),) = _starts(config, "head_start_ray_commands")
    assert flags.get("--dashboard-host") == "127.0.0.1"
    hosts = re.findall(r"dashboard-host[=\s]+[\"']?([^\s\"']+)", path.read_text())
    assert hosts and set(hosts) == {"127.0.0.1"}, hosts


def test_the_nodes_install_the_pins_and_the_synced_repo(ray_up):
    _, config = ray_up
    (repo,) = [r for r, local in config["file_mounts"].items() if local.rstrip("/") == "."]
    installs = " ".join(c for c in config["setup_commands"] if "pip install" in c)
    found, stale = scan_versions(installs)
    assert {"torch==", "torchvision==", "ray=="} <= found and not stale, installs
    words = {w.rstrip("/") for c in config["setup_commands"] for w in shlex.split(c)}
    assert repo.rstrip("/") in words, f"the synced repo {repo} is never pip-installed"


# -- KubeRay manifests ---------------------------------------------------------------------


def _ray_clusters() -> list[tuple[Path, dict, dict]]:
    """(file, document, RayCluster spec) of every RayCluster and RayJob manifest."""
    found = []
    for path in MANIFESTS:
        doc = _load(path)
        if doc.get("kind") == "RayCluster":
            found.append((path, doc, doc["spec"]))
        elif doc.get("kind") == "RayJob":
            found.append((path, doc, doc["spec"]["rayClusterSpec"]))
    return found


RAY_CLUSTERS = _ray_clusters()
RAY_CLUSTER_IDS = [path.name for path, _, _ in RAY_CLUSTERS]


def _containers(group: dict) -> list[dict]:
    return group["template"]["spec"]["containers"]


def _gpus(container: dict) -> int:
    return int(container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))


@pytest.mark.parametrize("path", MANIFESTS, ids=_rel)
def test_every_manifest_names_its_kind(path):
    doc = _load(path)
    assert isinstance(doc.get("apiVersion"), str) and doc["apiVersion"]
    assert isinstance(doc.get("kind"), str) and doc["kind"]
    assert isinstance(doc.get("metadata", {}).get("name"), str) and doc["metadata"]["name"]


def test_there_is_a_raycluster_and_a_rayjob():
    assert sorted(doc["kind"] for _, doc, _ in RAY_CLUSTERS) == ["RayCluster", "RayJob"]


@pytest.mark.parametrize(("path", "doc", "spec"), RAY_CLUSTERS, ids=RAY_CLUSTER_IDS)
def test_the_ray_cluster_runs_the_pinned_ray_with_token_auth(path, doc, spec):
    assert doc["apiVersion"] == "ray.io/v1"
    assert spec["rayVersion"] == RAY
    assert spec["authOptions"]["mode"] == "token"
    assert not re.search(r"RAY_AUTH_TOKEN\W+value\s*:", path.read_text()), "a literal token"


@pytest.mark.parametrize(("path", "doc", "spec"), RAY_CLUSTERS, ids=RAY_CLUSTER_IDS)
def test_the_head_is_cpu_only_and_gpu_workers_autoscale_from_zero(path, doc, spec):
    assert spec["enableInTreeAutoscaling"] is True
    head = spec["headGroupSpec"]
    assert head["rayStartParams"].get("num-cpus") == "0"
    assert head["rayStartParams"].get("metrics-export-port", "").isdigit()
    assert all(_gpus(c) == 0 for c in _containers(head))
    gpu_groups = [g for g in spec["workerGroupSpecs"] if any(_gpus(c) >= 1 for c in _containers(g))]
    assert gpu_groups, "no worker group with nvidia.com/gpu limits"
    for group in gpu_groups:
        assert group["minReplicas"] == 0 and group["maxReplicas"] >= 1, group["groupName"]
        assert 0 <= group.get("replicas", 0) <= group["maxReplicas"]
        assert group["rayStartParams"].get("metrics-export-port", "").isdigit()
    images = {c["image"] for g in [head, *spec["workerGroupSpecs"]] for c in _containers(g)}
    assert len(images) == 1, f"one image for every Ray container, not {images}"


@pytest.mark.parametrize(("path", "doc", "spec"), RAY_CLUSTERS, ids=RAY_CLUSTER_IDS)
def test_the_dashboard_is_loopback_or_its_exposure_is_explained(path, doc, spec):
    head = spec["headGroupSpec"]
    host = head["rayStartParams"].get("dashboard-host")
    assert head.get("serviceType", "ClusterIP") == "ClusterIP", "the head must stay in-cluster"
    if doc["kind"] == "RayCluster":
        assert host == "127.0.0.1"
    elif host != "127.0.0.1":  # behind token auth, and said why in the file
        comments = " ".join(
            line for line in path.read_text().splitlines() if line.lstrip().startswith("#")
        )
        assert host in comments and "token" in comments


def _rayjob() -> tuple[Path, dict]:
    (path,) = [p for p, doc, _ in RAY_CLUSTERS if doc["kind"] == "RayJob"]
    return path, _load(path)


def test_the_rayjob_runs_an_existing_sweep_and_shuts_down():
    _, doc = _rayjob()
    spec = doc["spec"]
    words = shlex.split(spec["entrypoint"])
    assert words[:2] == ["volume-ray", "run"], words
    assert re.fullmatch(r"sweeps/[\w.-]+\.yaml", words[2]), words
    assert (ROOT / words[2]).is_file(), f"{words[2]} is not a sweep of this repository"
    assert "--storage" in words and words.index("--storage") + 1 < len(words)
    # GPU workers start at zero: resources "auto" would see no GPU and train on CPUs
    gpus = words[words.index("--gpus-per-worker") + 1]
    assert float(gpus) > 0 and int(words[words.index("--workers") + 1]) > 0
    assert spec["shutdownAfterJobFinishes"] is True
    mode = spec["submissionMode"]  # set on purpose, not left to the default
    assert mode in {"K8sJobMode", "HTTPMode", "SidecarMode"}
    if mode == "SidecarMode":  # KubeRay's own rules for it
        restart = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"].get("restartPolicy")
        assert restart in (None, "Never")
        assert "submitterPodTemplate" not in spec and "submitterConfig" not in spec


def test_the_rayjob_storage_is_shared_by_every_pod():
    _, doc = _rayjob()
    words = shlex.split(doc["spec"]["entrypoint"])
    storage = words[words.index("--storage") + 1]
    if re.match(r"[a-z][a-z0-9+.-]*://", storage):  # an object store: nothing to mount
        return
    spec = doc["spec"]["rayClusterSpec"]
    claims = {}
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        pod = group["template"]["spec"]
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        (ray_container, *_) = pod["containers"]
        mounts = [
            m
            for m in ray_container.get("volumeMounts", [])
            if storage == m["mountPath"] or storage.startswith(m["mountPath"].rstrip("/") + "/")
        ]
        assert mounts, f"{storage} is not mounted in {group.get('groupName', 'the head')}"
        claim = volumes[mounts[0]["name"]]["persistentVolumeClaim"]["claimName"]
        claims[claim] = group.get("groupName", "head")
    assert len(claims) == 1, f"head and workers mount different volumes: {claims}"
    (claim,) = claims
    docs = [_load(p) for p in MANIFESTS]
    (pvc,) = [
        d
        for d in docs
        if d.get("kind") == "PersistentVolumeClaim" and d["metadata"]["name"] == claim
    ]
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]


# -- the image -----------------------------------------------------------------------------


def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per Dockerfile instruction, continuations joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1])
        for line in lines
        if line and not line.startswith("#")
    ]


def test_the_image_builds_on_the_pinned_ray_gpu_image_and_installs_the_repo():
    steps = _dockerfile()
    (base,) = [args for op, args in steps if op == "FROM"]
    assert re.fullmatch(r"rayproject/ray:\S+-(gpu|cu\d+)", base), base
    runs = " ".join(args for op, args in steps if op == "RUN")
    found, stale = scan_versions(runs)
    assert {"torch==", "torchvision==", "ray=="} <= found and not stale
    copied = " ".join(args for op, args in steps if op == "COPY")
    assert all(name in copied for name in ("pyproject.toml", "volume_ray", "sweeps"))
    assert re.search(r"pip install\b[^&;]*\s\.(\s|$)", runs), "the repo is never installed"


def test_the_manifests_start_ray_where_the_image_keeps_the_sweeps():
    workdirs = [args for op, args in _dockerfile() if op == "WORKDIR"]
    assert workdirs, "the image has no WORKDIR for `sweeps/...`"
    for path, _, spec in RAY_CLUSTERS:
        head = _containers(spec["headGroupSpec"])[0]
        assert head.get("workingDir", workdirs[-1]) == workdirs[-1], _rel(path)
