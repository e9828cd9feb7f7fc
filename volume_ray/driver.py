"""Stages B and C: dispatch measuring tasks to VolumeWorker actors, write each finished
task's rows atomically, then aggregate the radii (curvature, ladders) into volumes.

The driver only moves work and results: which tasks exist, which are done, who
measures what next. A task is a shard of directions of one (model, landscape) pair,
that pair's curvature, or a step of one of its restraint ladders (`ladder_tasks`).
Every task has `pair`, `submit(actor)`, `write(store, result)` and `following(result)`,
the tasks its result makes ready (a ladder's next rung). Every model is measured with
the same direction seeds, and a task's result depends only on (model, landscape,
settings), so retries and reruns reproduce it exactly.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections import deque
from dataclasses import dataclass

import pandas as pd
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from tqdm import tqdm

from volume_ray.curvature import Curvature
from volume_ray.data.subsets import landscapes_use_extras
from volume_ray.estimators import VOLUME_COLUMNS, volume_table
from volume_ray.experiment import with_absolute_root
from volume_ray.ladder_tasks import ladder_estimates, pending_ladders
from volume_ray.ray_process import gpus_each
from volume_ray.spec import Pair, SweepSpec, load_spec, plan_pairs, plan_trials
from volume_ray.store import SweepStore, write_table
from volume_ray.telemetry import DriverMetrics
from volume_ray.workers import VolumeWorker, store_problem

__all__ = [
    "CurvatureTask",
    "MeasureStats",
    "Shard",
    "aggregate_stage",
    "check_store_from_every_node",
    "curvature_settings",
    "measure_stage",
    "pending_curvature",
    "pending_shards",
    "run_sweep",
    "trained_pairs",
]

VOLUME_TABLE_COLUMNS = ["model_id", "landscape_size", *VOLUME_COLUMNS]
WAIT_NOTICE_S = 60  # say so when nothing finished for this long (actors restarting)
START_GRACE_S = 30  # after the first actor is up, wait this long at most for the others

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Shard:
    """Directions start..start+count-1 of one (model, landscape) pair."""

    pair: Pair
    seed: int  # the model's training seed (to rebuild its module)
    checkpoint: str
    start: int
    count: int

    @property
    def key(self) -> tuple[str, int, int, int]:
        """What names its file in the store: (model, landscape size, start, count)."""
        return self.pair.model_id, self.pair.landscape_size, self.start, self.count

    def submit(self, actor) -> ray.ObjectRef:
        p, last = self.pair, self.start + self.count - 1
        return actor.measure.options(
            name=f"measure {p.model_id} L{p.landscape_size} dirs {self.start}-{last}"
        ).remote(p.model_id, self.checkpoint, self.seed, p.landscape_extra, self.start, self.count)

    def write(self, store: SweepStore, result: tuple[dict, dict]) -> None:
        columns, facts = result
        frame = pd.DataFrame(columns)
        frame.insert(0, "model_id", self.pair.model_id)
        frame.insert(1, "landscape_size", self.pair.landscape_size)
        metadata = {f"volume_ray.{k}": str(v) for k, v in facts.items()}
        write_table(frame, store.shard_path(*self.key), metadata=metadata)

    def following(self, result: tuple[dict, dict]) -> list:
        return []


@dataclass(frozen=True)
class CurvatureTask:
    """The Hessian spectrum of one (model, landscape) pair, at a budget (`settings`)."""

    pair: Pair
    seed: int
    checkpoint: str
    settings: str

    def submit(self, actor) -> ray.ObjectRef:
        p = self.pair
        return actor.curvature.options(name=f"curvature {p.model_id} L{p.landscape_size}").remote(
            p.model_id, self.checkpoint, self.seed, p.landscape_extra
        )

    def write(self, store: SweepStore, result: dict) -> None:
        keys = {"model_id": self.pair.model_id, "landscape_size": self.pair.landscape_size}
        store.write_curvature_row({**keys, **result}, self.settings)

    def following(self, result: dict) -> list:
        return []


def curvature_settings(spec: SweepSpec) -> str:
    """The curvature budget in a file name: rows of another budget are other rows."""
    c = spec.curvature
    return f"p{c.probes}-m{c.lanczos_steps}-k{c.top_k}-s{c.seed}"


def trained_pairs(spec: SweepSpec, store: SweepStore) -> list[tuple[Pair, int, str]]:
    """(pair, training seed, checkpoint) of every pair whose model is trained."""
    models = store.finished_models()
    if models.empty:
        return []
    checkpoints = dict(zip(models.model_id, models.checkpoint))
    trials = plan_trials(spec)
    trial_of = {m: t for t in trials for m in t.model_ids(spec.train.checkpoint_epochs)}
    uses_extras = landscapes_use_extras(spec.dataset.extra_kind)
    return [
        (pair, trial_of[pair.model_id].seed, checkpoints[pair.model_id])
        for pair in plan_pairs(spec, trials, uses_extras)
        if pair.model_id in checkpoints
    ]


def pending_shards(spec: SweepSpec, store: SweepStore) -> tuple[list[Shard], int]:
    """(shards not yet in the store, shards in all) for the models already trained,
    decided from one listing of the store (`SweepStore.finished_shards`)."""
    finished = store.finished_shards()
    shards, total = [], 0
    for pair, seed, checkpoint in trained_pairs(spec, store):
        for start in range(0, spec.volume.directions, spec.volume.shard_size):
            count = min(spec.volume.shard_size, spec.volume.directions - start)
            total += 1
            shard = Shard(pair, seed, checkpoint, start, count)
            if store.shard_name(*shard.key) not in finished:
                shards.append(shard)
    return shards, total


def pending_curvature(spec: SweepSpec, store: SweepStore) -> tuple[list[CurvatureTask], int]:
    """(curvature tasks not yet on disk, tasks in all) for the models already trained;
    none when the spec's curvature stage is off."""
    if not spec.curvature.enabled:
        return [], 0
    written, settings = store.written_curvature(), curvature_settings(spec)
    pairs = trained_pairs(spec, store)
    tasks = [
        CurvatureTask(pair, seed, checkpoint, settings)
        for pair, seed, checkpoint in pairs
        if store.curvature_name(pair.model_id, pair.landscape_size, settings) not in written
    ]
    return tasks, len(pairs)


def _worker_count(spec: SweepSpec, shards: int) -> tuple[int, float, float]:
    """(actors, CPUs each, GPUs each): as many as the GPUs hold (resources.actors_per_gpu
    a GPU) when there are GPUs, else one per CPU. Every actor holds one CPU: a GPU
    actor's draws the next directions while its device measures."""
    resources = ray.cluster_resources()
    per_gpu = gpus_each(spec)
    if spec.resources.workers != "auto":
        wanted = spec.resources.workers
    elif per_gpu > 0:
        wanted = min(round(resources.get("GPU", 0) / per_gpu), int(resources.get("CPU", 1)))
    else:
        wanted = int(resources.get("CPU", 1))
    return max(1, min(wanted, shards)), 1.0, per_gpu


@dataclass(frozen=True)
class MeasureStats:
    """What one measuring stage did: tasks run (shards, curvature tasks, ladder tasks),
    seconds until the first actor was ready (process start, imports, data), seconds
    spent measuring, and tasks re-queued."""

    shards: int
    startup_seconds: float
    measure_seconds: float
    requeued: int = 0  # tasks whose actor was lost, run again by another
    curvature: int = 0
    ladder_tasks: int = 0  # whitening and rung tasks


def measure_stage(spec: SweepSpec, store: SweepStore, *, progress: bool = True) -> MeasureStats:
    """Run every shard, curvature task and ladder not yet on disk, on one pool of
    actors; an actor takes the next task of the pair it holds (a pair's curvature task
    first, then its ladders' steps, then its shards)."""
    shards, _ = pending_shards(spec, store)
    curvature, _ = pending_curvature(spec, store)
    ladders, _ = pending_ladders(spec, store, trained_pairs(spec, store))
    if not shards and not curvature and not ladders:
        return MeasureStats(0, 0.0, 0.0)
    began = time.perf_counter()
    count, cpus, gpus = _worker_count(spec, len(shards) + len(curvature) + len(ladders))
    # The spec is small enough to travel inline with each actor's creation, so a
    # restarted actor never depends on an object that could be evicted.
    spec_dict = spec.model_dump(mode="json")
    actors = []
    try:
        for i in range(count):
            actors.append(
                VolumeWorker.options(
                    name=f"volume_worker:{spec.name}:{i}", num_cpus=cpus, num_gpus=gpus
                ).remote(spec_dict, store.location)
            )
        startup, measuring, requeued, done = _dispatch(
            store, [*curvature, *ladders, *shards], actors, began, progress,
            DriverMetrics(spec.name),
        )  # fmt: skip
        ladder_tasks = done - len(shards) - len(curvature)
        return MeasureStats(len(shards), startup, measuring, requeued, len(curvature), ladder_tasks)
    finally:
        for actor in actors:
            ray.kill(actor)


def _dispatch(
    store: SweepStore, tasks: list, actors: list, began: float, progress: bool,
    reported: DriverMetrics,
) -> tuple[float, float, int, int]:  # fmt: skip
    """Keep every live actor busy until every task, and every task that a finished one
    makes ready, is written; return the seconds until work started, the seconds of
    work, how many tasks were re-queued, and how many were done (also `reported`, as
    they move).

    Work starts once every actor has answered its first ping, or START_GRACE_S after the
    first one did: an autoscaler may bring the others' nodes minutes later, or never,
    and those join in when they come. An actor lost with its node (or killed) fails its
    task at once: the task goes back to the front of its queue for whichever actor is
    free next, and the lost actor is pinged. The ping waits through Ray's restart of the
    actor (which needs free resources) and puts it back to work; a ping that fails means
    the restarts are used up. Only the driver writes results, so a lost task leaves
    nothing behind and nothing is written twice."""
    first_up, ready = None, None  # when the first actor answered; when work started
    starting = set(range(len(actors)))  # actors yet to answer their first ping
    waiting: dict[Pair, deque] = {}  # per pair, in order: an actor keeps its pair
    for task in tasks:
        waiting.setdefault(task.pair, deque()).append(task)
    running: dict[ray.ObjectRef, tuple[int, object]] = {}  # tasks, with their actor
    pings = {actor.pid.remote(): i for i, actor in enumerate(actors)}  # actor: answers when up
    idle: list[int] = []
    last_pair: dict[int, Pair] = {}

    def submit(actor: int) -> None:
        pair = last_pair.get(actor)
        if pair not in waiting:
            pair = next(iter(waiting))
        task = waiting[pair].popleft()
        if not waiting[pair]:
            del waiting[pair]
        last_pair[actor] = pair
        running[task.submit(actors[actor])] = (actor, task)

    def report() -> None:
        reported.update(done_count, sum(map(len, waiting.values())) + len(running))

    bar = tqdm(total=len(tasks), unit="task", desc="measuring", disable=not progress)
    requeued, done_count, lost_for_good = 0, 0, None
    report()
    try:
        while waiting or running:
            held = starting and (first_up is None or time.perf_counter() - first_up < START_GRACE_S)
            if not held and ready is None:
                ready = time.perf_counter()
            while not held and idle and waiting:
                submit(idle.pop())
            if not running and not pings:
                last = str(lost_for_good).strip().splitlines()[-1]  # the cause, not its trace
                raise RuntimeError(
                    "every VolumeWorker is lost or could not start; the finished shards are "
                    f"kept: rerun the same command to measure the rest. The last error: {last}"
                )
            wake = START_GRACE_S if held and first_up is not None else WAIT_NOTICE_S
            done, _ = ray.wait([*running, *pings], num_returns=1, timeout=wake)
            if not done:
                if pings:
                    log.warning("%d measuring actor(s) wait for resources", len(pings))
                continue
            if done[0] in pings:
                actor = pings.pop(done[0])
                starting.discard(actor)  # answered, or failed to start: no longer awaited
                try:
                    ray.get(done[0])
                except ray.exceptions.RayActorError as error:  # never started, or outlived
                    lost_for_good = error  # every restart: gone for good
                    continue
                first_up = first_up or time.perf_counter()
                idle.append(actor)
                continue
            actor, task = running.pop(done[0])
            try:
                result = ray.get(done[0])
            except ray.exceptions.RayActorError:  # lost with its actor: back to the front
                waiting.setdefault(task.pair, deque()).appendleft(task)
                requeued += 1
                pings[actors[actor].pid.remote()] = actor  # back to work once restarted
                continue
            task.write(store, result)
            for follower in reversed(task.following(result)):  # its pair's next, first
                waiting.setdefault(follower.pair, deque()).appendleft(follower)
                bar.total += 1
            bar.update(1)
            done_count += 1
            report()
            idle.append(actor)
    finally:
        bar.close()
    if requeued:
        log.warning("re-queued %d task(s) of lost measuring actors; all done", requeued)
    return ready - began, time.perf_counter() - ready, requeued, done_count


def aggregate_stage(spec: SweepSpec, store: SweepStore) -> pd.DataFrame:
    """Every estimator for every (model, landscape, metric, threshold) -> volumes.parquet,
    with models.parquet (and curvature.parquet) rewritten beside it so the tables
    always agree."""
    models = store.write_models()
    radii = store.read_radii()
    spectra = _spectra(store.write_curvature(curvature_settings(spec)))
    if radii.empty:
        volumes = pd.DataFrame(columns=VOLUME_TABLE_COLUMNS)
    else:
        n_params = {m: int(n) for m, n in zip(models.model_id, models.n_params)}
        ladders = ladder_estimates(spec, store, trained_pairs(spec, store), n_params)
        v = spec.volume
        frames = []
        for (model_id, size), group in radii.groupby(["model_id", "landscape_size"], sort=True):
            spectrum, ladder = spectra.get((model_id, size)), ladders.get((model_id, size))
            missing = {"laplace": spectrum is None, "thermodynamic": ladder is None}
            estimators = [e for e in v.estimators if not missing.get(e)]
            for name in set(v.estimators) - set(estimators):
                log.warning("no %s row for %s in landscape %d: not computed", name, model_id, size)
            table = volume_table(
                group, n_params[model_id], estimators=estimators, curvature=spectrum,
                thermodynamic=ladder, max_coefficient=v.max_coefficient, seed=v.seed,
            )  # fmt: skip
            table.insert(0, "model_id", model_id)
            table.insert(1, "landscape_size", size)
            frames.append(table)
        volumes = pd.concat(frames, ignore_index=True)[VOLUME_TABLE_COLUMNS]
    write_table(volumes, store.volumes_path)
    return volumes


def _spectra(curvature: pd.DataFrame) -> dict:
    """Each pair's spectrum, keyed by (model_id, landscape_size)."""
    return {
        (row["model_id"], row["landscape_size"]): Curvature.from_record(row)
        for row in curvature.to_dict("records")
    }


STAGES = ("train", "measure", "aggregate")


def connect(address: str | None) -> bool:
    """Join the cluster at `address` (else $RAY_ADDRESS), or start a local Ray; True if
    this call connected (and so should disconnect)."""
    if ray.is_initialized():
        return False
    # Under `ray job submit` (and KubeRay's RayJob) the cluster comes as RAY_ADDRESS.
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    try:
        context = ray.init(address=address, log_to_driver=False)
    except (ConnectionError, ray.exceptions.AuthenticationError) as error:
        # Ray's last words name the cause: no token, a wrong token, nothing listening
        cause = str(error.__cause__ or error).strip().splitlines()[-1]
        raise RuntimeError(f"cannot join the Ray cluster at {address}: {cause}") from None
    if address == "local" and context.dashboard_url:
        print(
            f"Ray dashboard: http://{context.dashboard_url} (it asks for the token that "
            "`ray get-auth-token` prints)",
            flush=True,
        )
    return True


def keep_dashboard_up() -> None:
    """Hold the local Ray, and its dashboard, until Ctrl-C: a short run's tasks, actors
    and metrics stay there to be read."""
    print("the local Ray and its dashboard stay up; Ctrl-C to stop", flush=True)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Tune leaves its own behind
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopping the local Ray", flush=True)


def check_store_from_every_node(store: SweepStore) -> None:
    """On a cluster, ask every node whether it can read the store before any work
    starts: a folder only the driver sees fails here, naming the node, not after the
    training stage. (Nodes an autoscaler adds later are checked by their actors.)"""
    nodes = [node["NodeID"] for node in ray.nodes() if node["Alive"]]
    if len(nodes) < 2:
        return
    probes = [
        store_problem.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)
        ).remote(store.location)
        for node in nodes
    ]
    problems = [problem for problem in ray.get(probes) if problem]
    if problems:
        others = f" (and {len(problems) - 1} more node(s))" if len(problems) > 1 else ""
        raise RuntimeError(problems[0] + others)


def _with_defaults(recorded: dict) -> dict:
    """A recorded spec as this version validates it: fields it predates at defaults."""
    return load_spec(recorded).model_dump(mode="json")


def run_sweep(
    spec: SweepSpec,
    storage: str,
    *,
    address: str | None = None,
    stages: tuple[str, ...] = STAGES,
    progress: bool = True,
    **train_options,
) -> SweepStore:
    """Run the given stages of a sweep into `<storage>/<name>/`, resuming finished work.
    `train_options` go to `train_stage`."""
    from volume_ray.tune_stage import train_stage  # Tune is heavy: only when training

    store = SweepStore(storage, spec.name)
    store.claim(spec.model_dump(mode="json"), canonical=_with_defaults)
    spec = with_absolute_root(spec)  # what trials and actors get; the store keeps the original
    started = connect(address)
    try:
        check_store_from_every_node(store)
        if "train" in stages:
            train_stage(spec, store, progress=progress, **train_options)
        if "measure" in stages:
            measure_stage(spec, store, progress=progress)
        if "aggregate" in stages:
            aggregate_stage(spec, store)
    finally:
        if started:
            ray.shutdown()
    return store
