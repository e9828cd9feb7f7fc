#!/usr/bin/env python
"""A Ray cluster of several nodes on this one host, for trying volume_ray's cluster
path (and testing it) without a cloud account.

    python cluster/local_cluster.py up --workers 2      # head + 2 worker nodes
    eval "$(python cluster/local_cluster.py env)"       # RAY_ADDRESS, token, dashboard
    volume-ray run sweeps/digits_data_scaling.yaml --smoke --address "$RAY_ADDRESS"
    python cluster/local_cluster.py stop-node 1         # lose worker node 1 (--kill: SIGKILL)
    python cluster/local_cluster.py down                # stop what `up` started

Every node is a real `ray start --block`, launched in a session of its own, so the
node's raylet, GCS, dashboard, agents and the workers it spawns all share that
session id. `down` and `stop-node` signal exactly those sessions and nothing else:
other Ray instances on the host (a `ray start` of your own, another test) survive,
which `ray stop` would not allow.

Token authentication is on: the nodes share a token, from RAY_AUTH_TOKEN when it is
set, otherwise a fresh one written to `<dir>/auth_token` (mode 0600). Everything
binds to 127.0.0.1, the dashboard included. Each node gets `--memory` (the memory
Ray schedules against) and `--object-store-memory` (a hard cap on its shared-memory
store); the host does not cap a process's own memory without cgroups.

Standard library only, so it runs before anything is imported.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STATE_FILE = "cluster.json"
DEFAULT_DIR = os.path.join(tempfile.gettempdir(), "volume_ray_cluster")
STARTED_MARK = "Ray runtime started"
START_TIMEOUT_S = 90
STOP_GRACE_S = 5  # SIGTERM, then SIGKILL: Ray exits in a second or two when it will


def _bytes(text: str) -> int:
    """'2GiB', '512MiB', '1.5GB', '1000000' -> bytes."""
    units = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "ki": 2**10, "mi": 2**20, "gi": 2**30}
    match = re.fullmatch(r"\s*([0-9.]+)\s*([kmgKMG]i?)?[bB]?\s*", text)
    if not match or match.group(2) is not None and match.group(2).lower() not in units:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 2GiB or 512MiB)")
    return int(float(match.group(1)) * units[(match.group(2) or "").lower()])


def _free_ports(count: int) -> list[int]:
    """`count` distinct ports the OS considers free now (its ephemeral range, clear of
    Ray's worker ports), all held open together so none is handed out twice."""
    probes = [socket.socket() for _ in range(count)]
    try:
        for probe in probes:
            probe.bind(("127.0.0.1", 0))
        return [probe.getsockname()[1] for probe in probes]
    finally:
        for probe in probes:
            probe.close()


# The ports two Ray nodes on one host would otherwise both take by default.
NODE_PORTS = [
    "metrics-export-port",
    "dashboard-agent-listen-port",
    "dashboard-agent-grpc-port",
    "runtime-env-agent-port",
]


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after "pid (comm)", or None if there is no such process."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()


def _started(pid: int) -> int | None:
    """When `pid` started (clock ticks after boot): with the pid, a process's identity."""
    fields = _stat(pid)
    return int(fields[19]) if fields else None


def node_processes(node: dict) -> list[int]:
    """The live processes of a node this script started: those of its session. If the
    session's leader pid now belongs to a newer process, the session is gone (Linux
    never reuses a pid still in use as a session id), so nothing is ours."""
    session = node["session"]
    leader_started = _started(session)
    if leader_started is not None and leader_started != node["started"]:
        return []
    members = []
    for entry in Path("/proc").iterdir():
        fields = _stat(int(entry.name)) if entry.name.isdigit() else None
        if fields and int(fields[3]) == session and fields[0] != "Z":
            members.append(int(entry.name))
    return members


def _signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):  # exited meanwhile
            os.kill(pid, sig)


def stop_node_processes(node: dict, *, grace_s: float = STOP_GRACE_S) -> int:
    """SIGTERM every process of the node (none with grace_s=0), SIGKILL what is left after
    the grace period; return how many processes there were."""
    members = node_processes(node)
    if grace_s:
        _signal_all(members, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while node_processes(node) and time.monotonic() < deadline:
        time.sleep(0.2)
    _signal_all(node_processes(node), signal.SIGKILL)
    deadline = time.monotonic() + STOP_GRACE_S
    while (left := node_processes(node)) and time.monotonic() < deadline:
        time.sleep(0.1)
    if left:
        raise SystemExit(f"{node['name']}: processes {left} survived SIGKILL (stuck in I/O?)")
    return len(members)


def _start_node(args: list[str], log: Path, env: dict[str, str]) -> dict:
    """`ray start ... --block` in a new session; wait until it reports the node up."""
    with open(log, "wb") as sink:
        process = subprocess.Popen(
            ["ray", "start", *args, "--block"],
            stdout=sink,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
    node = {"session": process.pid, "started": _started(process.pid)}
    deadline = time.monotonic() + START_TIMEOUT_S
    while STARTED_MARK not in log.read_text(errors="replace"):
        if process.poll() is not None or time.monotonic() > deadline:
            stop_node_processes({**node, "name": log.stem})
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
            raise SystemExit(f"ray start failed (log {log}):\n{tail}")
        time.sleep(0.2)
    return node


def _node_args(
    options: argparse.Namespace, index: int, cpus: int, ports: dict[str, int]
) -> list[str]:
    # A temp dir per node: nodes sharing one would share runtime_resources/, and one
    # node unpacking a job's working_dir would pull it from under another's driver.
    args = [
        "--node-ip-address=127.0.0.1",
        f"--num-cpus={cpus}",
        f"--num-gpus={options.gpus_per_node}",
        f"--memory={options.memory}",
        f"--object-store-memory={options.object_store_memory}",
        f"--temp-dir={options.ray_temp}/{index}",
    ]
    return args + [f"--{name}={port}" for name, port in ports.items()]


def _read_state(folder: Path) -> dict:
    path = folder / STATE_FILE
    if not path.exists():
        raise SystemExit(f"no local cluster recorded in {folder} ({STATE_FILE} is missing)")
    return json.loads(path.read_text())


def _write_state(folder: Path, state: dict) -> None:
    temporary = folder / f".{STATE_FILE}.tmp"
    temporary.write_text(json.dumps(state, indent=2))
    os.replace(temporary, folder / STATE_FILE)


def _token_env(folder: Path) -> dict[str, str]:
    """RAY_AUTH_* for every node: the caller's RAY_AUTH_TOKEN, or a new token file."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": os.environ["RAY_AUTH_TOKEN"]}
    token = folder / "auth_token"
    token.touch(mode=0o600)
    token.chmod(0o600)  # an older file keeps its mode through touch
    token.write_text(secrets.token_hex(32))
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}


def up(options: argparse.Namespace) -> None:
    folder = Path(options.dir).resolve()
    if (folder / STATE_FILE).exists() and any(
        node_processes(n) for n in _read_state(folder)["nodes"]
    ):
        raise SystemExit(f"a local cluster from {folder} is still running; run `down` first")
    folder.mkdir(parents=True, exist_ok=True)
    # Ray's unix sockets live under the temp dir and must stay under ~100 characters.
    options.ray_temp = tempfile.mkdtemp(prefix="vr-ray-", dir="/tmp")
    auth = _token_env(folder)
    env = {**os.environ, **auth, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    nodes = options.workers + 1
    ports = iter(_free_ports(3 + nodes * len(NODE_PORTS)))
    gcs_port, dashboard_port, client_port = next(ports), next(ports), next(ports)
    address = f"127.0.0.1:{gcs_port}"
    state = {
        "address": address,
        "dashboard": f"http://127.0.0.1:{dashboard_port}",
        "auth": {k: v for k, v in auth.items() if k != "RAY_AUTH_TOKEN"},
        "ray_temp": options.ray_temp,
        "nodes": [],
    }
    try:
        for index in range(nodes):
            head = index == 0
            own_ports = {name: next(ports) for name in NODE_PORTS}
            cpus = options.head_cpus if head else options.cpus
            args = _node_args(options, index, cpus, own_ports)
            if head:
                args += [
                    "--head",
                    f"--port={gcs_port}",
                    "--include-dashboard=true",
                    "--dashboard-host=127.0.0.1",
                    f"--dashboard-port={dashboard_port}",
                    f"--ray-client-server-port={client_port}",
                ]
            else:
                args.append(f"--address={address}")
            name = "head" if head else f"worker-{index}"
            node = _start_node(args, folder / f"{name}.log", env)
            state["nodes"].append(
                {
                    "name": name,
                    **node,
                    "metrics_port": own_ports["metrics-export-port"],
                    "log": str(folder / f"{name}.log"),
                }
            )
            _write_state(folder, state)  # so `down` can stop a half-started cluster
    except BaseException:
        for node in reversed(state["nodes"]):
            stop_node_processes(node)
        raise
    print(f"local cluster up: {nodes} nodes at {address}")
    print(f"dashboard {state['dashboard']}; metrics on ports", end=" ")
    print(", ".join(str(n["metrics_port"]) for n in state["nodes"]))
    print(f'connect with: eval "$(python {sys.argv[0]} env --dir {folder})"')


def env(options: argparse.Namespace) -> None:
    """Shell exports that let `volume-ray`, `ray job submit` and `ray status` in."""
    state = _read_state(Path(options.dir).resolve())
    exports = {
        "RAY_ADDRESS": state["address"],
        "RAY_API_SERVER_ADDRESS": state["dashboard"],
        **state["auth"],
    }
    for key, value in exports.items():
        print(f"export {key}={shlex.quote(value)}")


def stop_node(options: argparse.Namespace) -> None:
    folder = Path(options.dir).resolve()
    state = _read_state(folder)
    names = [n["name"] for n in state["nodes"]]
    name = f"worker-{options.index}"
    if name not in names[1:]:
        raise SystemExit(f"no node {name}; the cluster has {names}")
    node = state["nodes"][names.index(name)]
    stopped = stop_node_processes(node, grace_s=0 if options.kill else STOP_GRACE_S)
    print(f"{name}: {'killed' if options.kill else 'stopped'} {stopped} processes")


def down(options: argparse.Namespace) -> None:
    folder = Path(options.dir).resolve()
    state = _read_state(folder)
    stopped = sum(stop_node_processes(n) for n in reversed(state["nodes"]))
    print(f"local cluster down: stopped {stopped} processes")
    (folder / STATE_FILE).unlink()
    shutil.rmtree(state["ray_temp"], ignore_errors=True)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name in ("up", "env", "stop-node", "down"):
        command = commands.add_parser(name)
        command.add_argument("--dir", default=DEFAULT_DIR, help="state, logs and token")
    start = commands.choices["up"]
    start.add_argument("--workers", type=int, default=1, help="worker nodes beside the head")
    start.add_argument("--cpus", type=int, default=1, help="CPUs of each worker node")
    start.add_argument("--head-cpus", type=int, default=1, help="CPUs of the head node")
    start.add_argument("--gpus-per-node", type=int, default=0)
    start.add_argument("--memory", type=_bytes, default=_bytes("2GiB"), help="per node")
    start.add_argument("--object-store-memory", type=_bytes, default=_bytes("256MiB"))
    lose = commands.choices["stop-node"]
    lose.add_argument("index", type=int, help="worker node, from 1")
    lose.add_argument("--kill", action="store_true", help="SIGKILL at once, as a lost machine")
    return parser


def main() -> None:
    options = _parser().parse_args()
    if options.command == "up" and (options.workers < 0 or options.cpus < 0):
        raise SystemExit("--workers and --cpus must be >= 0")
    {"up": up, "env": env, "stop-node": stop_node, "down": down}[options.command](options)


if __name__ == "__main__":
    main()
