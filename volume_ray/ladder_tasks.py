"""The thermodynamic stage's tasks: one restraint ladder per (model, landscape,
threshold), run on the measuring actors as a whitening task, then one task per rung.

A rung needs the one before it, so a ladder is a chain of tasks: each finished task,
once written to the store, names the task that follows it (`following`). Ladders of
different pairs and thresholds run side by side. Rungs are pure steps with their own
seeds (`thermodynamic.rung_generator`), so a rung recomputed after a kill, or on
another actor, is the same rung, and the stage resumes from the last stored one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import ray

from volume_ray.estimators import NO_ESTIMATE, EstimateResult
from volume_ray.ladder import Rung, following_restraint
from volume_ray.polar import UNIFORM
from volume_ray.spec import Pair, SweepSpec, ThermodynamicSpec
from volume_ray.store import SweepStore
from volume_ray.thermodynamic import estimate_from_rungs

__all__ = ["RungTask", "WhiteningTask", "ladder_estimates", "ladder_settings", "pending_ladders"]


def ladder_settings(t: ThermodynamicSpec) -> str:
    """The ladder budget in a file name: a ladder of another budget is another ladder."""
    rungs = "auto" if t.rungs is None else t.rungs
    whitening = "auto" if t.whitening_directions is None else t.whitening_directions
    return f"s{t.seed}-c{t.chains}-m{t.steps}-r{rungs}-w{whitening}"


@dataclass(frozen=True)
class _Ladder:
    """Which ladder a task belongs to, and what rebuilds its model on an actor."""

    pair: Pair
    seed: int  # the model's training seed
    checkpoint: str
    threshold: float
    max_coefficient: float  # the radius cap is max_coefficient·√n
    name: str  # `SweepStore.ladder_name`

    def label(self, what: str) -> str:
        return f"{what} {self.pair.model_id} L{self.pair.landscape_size} T{self.threshold:g}"

    def arguments(self) -> tuple:
        return self.checkpoint, self.seed, self.pair.landscape_extra, self.threshold, self.name


@dataclass(frozen=True)
class WhiteningTask:
    """Whiten a ladder's basin (or find it empty); then its uniform rung follows."""

    ladder: _Ladder
    spec: ThermodynamicSpec

    @property
    def pair(self) -> Pair:
        return self.ladder.pair

    def submit(self, actor) -> ray.ObjectRef:
        name = self.ladder.label("whitening")
        return actor.whitening.options(name=name).remote(*self.ladder.arguments())

    def write(self, store: SweepStore, result: tuple[np.ndarray | None, dict | str]) -> None:
        matrix, facts = result  # facts: the cost, or why the basin is empty
        if matrix is None:
            store.write_empty_ladder(self.ladder.name, facts)
        else:
            store.write_whitening(self.ladder.name, matrix, facts)

    def following(self, result: tuple[np.ndarray | None, dict | str]) -> list:
        matrix, _ = result
        return [] if matrix is None else [RungTask(self.ladder, self.spec, (), UNIFORM)]


@dataclass(frozen=True)
class RungTask:
    """Rung len(`rungs`) of a ladder at restraint k, started from the last of `rungs`
    (those before it, without their chains' states)."""

    ladder: _Ladder
    spec: ThermodynamicSpec
    rungs: tuple[Rung, ...]
    k: float

    @property
    def pair(self) -> Pair:
        return self.ladder.pair

    def submit(self, actor) -> ray.ObjectRef:
        index = len(self.rungs)
        previous = self.rungs[-1] if self.rungs else None
        name = self.ladder.label(f"rung {index}")
        return actor.rung.options(name=name).remote(
            *self.ladder.arguments(), index, self.k, previous
        )

    def write(self, store: SweepStore, result: Rung) -> None:
        columns = result.to_columns()
        if result.k == 0:  # the ladder is finished: its chains' states are never read again
            del columns["gaussian"]
        store.write_rung(self.ladder.name, len(self.rungs), columns)

    def following(self, result: Rung) -> list:
        return _next_rung(self.ladder, self.spec, (*self.rungs, result))


def _next_rung(ladder: _Ladder, spec: ThermodynamicSpec, rungs: tuple[Rung, ...]) -> list:
    """The task of the rung after `rungs` (the last with its chains' states), or none
    once the ladder has reached k = 0."""
    last = rungs[-1]
    if last.k == 0:
        return []
    n = last.gaussians.shape[1]
    k = following_restraint(list(rungs), n, ladder.max_coefficient * math.sqrt(n), spec.rungs)
    return [RungTask(ladder, spec, (*map(_without_states, rungs[:-1]), last), k)]


def _without_states(rung: Rung) -> Rung:
    """The rung as the ladder's later steps need it: all but the chains' states."""
    return Rung(**{**vars(rung), "gaussians": np.empty((len(rung.radii), 0))})


def ladders(
    spec: SweepSpec, store: SweepStore, trained: list[tuple[Pair, int, str]]
) -> list[_Ladder]:
    """Every ladder of the trained pairs; none unless volume.estimators names
    thermodynamic."""
    if "thermodynamic" not in spec.volume.estimators:
        return []
    settings = ladder_settings(spec.thermodynamic)
    return [
        _Ladder(pair, seed, checkpoint, threshold, spec.volume.max_coefficient,
                store.ladder_name(pair.model_id, pair.landscape_size, threshold, settings))
        for pair, seed, checkpoint in trained
        for threshold in spec.volume.thresholds
    ]  # fmt: skip


def pending_ladders(
    spec: SweepSpec, store: SweepStore, trained: list[tuple[Pair, int, str]]
) -> tuple[list, int]:
    """(the next task of every unfinished ladder, ladders in all), from what the store
    holds: a ladder without its whitening starts there; one with rungs goes on from its
    last stored rung (from the top, the same rungs again, if a later one was lost)."""
    finished = store.ladder_files()
    tasks, every = [], ladders(spec, store, trained)
    for ladder in every:
        if f"{ladder.name}__empty.parquet" in finished:  # no basin: no rungs
            continue
        if f"{ladder.name}__whitening.parquet" not in finished:
            tasks.append(WhiteningTask(ladder, spec.thermodynamic))
            continue
        rungs = [Rung.from_columns(c) for c in store.read_rungs(ladder.name, finished)]
        if rungs and rungs[-1].k != 0 and rungs[-1].gaussians.shape[1] == 0:
            rungs = []  # its states went with a later rung, since lost: rerun from the top
        if not rungs:
            tasks.append(RungTask(ladder, spec.thermodynamic, (), UNIFORM))
        else:
            tasks.extend(_next_rung(ladder, spec.thermodynamic, tuple(rungs)))
    return tasks, len(every)


def ladder_estimates(
    spec: SweepSpec, store: SweepStore, trained: list[tuple[Pair, int, str]],
    n_params: dict[str, int],
) -> dict[tuple[str, int], dict[float, EstimateResult]]:  # fmt: skip
    """Per (model, landscape size), the estimate of each threshold whose ladder is
    finished (an empty basin's: no estimate), from its stored rungs."""
    finished, found = store.ladder_files(), {}
    for ladder in ladders(spec, store, trained):
        key = (ladder.pair.model_id, ladder.pair.landscape_size)
        if f"{ladder.name}__empty.parquet" in finished:
            found.setdefault(key, {})[ladder.threshold] = NO_ESTIMATE
            continue
        rungs = [Rung.from_columns(c) for c in store.read_rungs(ladder.name, finished)]
        if rungs and rungs[-1].k == 0:
            cost = store.whitening_cost(ladder.name)
            whitening_cost = (cost["radius_searches"], cost["loss_evaluations"])
            estimate = estimate_from_rungs(rungs, n_params[ladder.pair.model_id], whitening_cost)
            found.setdefault(key, {})[ladder.threshold] = estimate
    return found
