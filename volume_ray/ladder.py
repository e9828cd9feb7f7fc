"""The rungs of the harmonic-restraint ladder, one at a time (docs/thermodynamic.md).

Rung k's law of directions is ∝ P(n/2, k·r(u)²/2) relative to the uniform one (k = 0:
∝ r(u)^n); the radius given the direction is integrated out exactly (`polar`). Chains
move directions only: Hamiltonian Monte Carlo on a Gaussian g whose direction is the
state (the Gaussian leaves the uniform law of directions, the rung's weight tilts it),
in whitened coordinates, with the gradient of ln r from `BasinRadii`. A random-walk
step there still lagged by tens of nats at n = 1,000 on a cross-polytope, HMC by
about one.

The ladder starts at the uniform law (UNIFORM: no restraint reaches B's edge, its
samples are exact and independent) and ends at k = 0. Each rung is a pure step from
the one before and its own seed, so a rung computed anywhere (a Ray actor, after a
restart) is the same rung.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from volume_ray.basin_radii import BasinRadii
from volume_ray.polar import UNIFORM, log_weight_slope, rung_potentials

__all__ = [
    "GROUPS", "Rung", "advance", "following_restraint", "groups", "incremental_log_weights",
    "uniform_rung",
]  # fmt: skip

LEAPFROG = 8  # leapfrog steps per move: one radius search and one gradient each
GROUPS = 4  # chains resample within their group only, so groups stay independent
CESS_TARGET = 0.5  # a new rung where the chains' conditional ESS would fall to this
ACCEPTANCE = 0.65  # the acceptance rate the step size is steered to during burn-in
FIRST_STEP_SIZE = 0.1  # leapfrog step size in whitened Gaussian units, at the first rung
MAX_RUNGS = 2000  # an adaptive ladder longer than this means the basin is out of reach


@dataclass(frozen=True)
class Rung:
    """What one rung leaves: its restraint k, the chains' final states (Gaussians in
    y, (chains, n)) and radii (chains,), the kept half's radii (kept, chains), the step
    size reached, the kept half's acceptance rate (NaN at UNIFORM) and the cost."""

    k: float
    gaussians: np.ndarray
    radii: np.ndarray
    trace: np.ndarray
    step: float
    acceptance: float
    radius_searches: int
    loss_evaluations: int

    def to_columns(self) -> dict[str, list]:
        """One row per chain, the rung's scalars repeated: a table for the store."""
        chains = len(self.radii)
        scalars = {
            "k": self.k, "step": self.step, "acceptance": self.acceptance,
            "radius_searches": self.radius_searches, "loss_evaluations": self.loss_evaluations,
        }  # fmt: skip
        return {
            "chain": list(range(chains)),
            **{name: [value] * chains for name, value in scalars.items()},
            "radius": self.radii.tolist(),
            "trace": self.trace.T.tolist(),
            "gaussian": list(self.gaussians),
        }

    @classmethod
    def from_columns(cls, columns: dict) -> Rung:
        """The rung `to_columns` wrote, as read back (Parquet keeps NaN as null); without
        "gaussian" (read for the estimate only), the states are empty."""
        order = np.argsort(columns["chain"])
        gaussians = columns.get("gaussian")
        return cls(
            k=float(columns["k"][0]),
            gaussians=np.stack([gaussians[i] for i in order]) if gaussians is not None
            else np.empty((len(order), 0)),
            radii=np.asarray(columns["radius"], dtype=float)[order],
            trace=np.stack([np.asarray(columns["trace"][i], dtype=float) for i in order]).T,
            step=float(columns["step"][0]),
            acceptance=math.nan if columns["acceptance"][0] is None else columns["acceptance"][0],
            radius_searches=int(columns["radius_searches"][0]),
            loss_evaluations=int(columns["loss_evaluations"][0]),
        )  # fmt: skip


def uniform_rung(basin: BasinRadii, chains: int, steps: int, rng: np.random.Generator) -> Rung:
    """The top of the ladder: chains x kept exact, independent uniform directions; the
    first row of them starts the chains."""
    kept = steps - steps // 2
    searches, evaluations = basin.searches, basin.evaluations
    gaussians = rng.standard_normal((chains * kept, basin.n))
    radii = basin.radii_in_y(_unit(gaussians))
    return Rung(
        k=UNIFORM, gaussians=gaussians[:chains], radii=radii[:chains],
        trace=radii.reshape(kept, chains), step=FIRST_STEP_SIZE, acceptance=math.nan,
        radius_searches=basin.searches - searches,
        loss_evaluations=basin.evaluations - evaluations,
    )  # fmt: skip


def following_restraint(rungs: list[Rung], n: int, cap: float, fixed: int | None) -> float:
    """The restraint of the rung after `rungs`: with `fixed` rungs in all, geometric
    steps from where every uniform chain's restraint lies all but inside B down to
    where none reaches into it (k·cap² = 1), then 0; else adaptive: the largest k' < k
    at which the chains' conditional ESS of the weights π_k'/π_k is still CESS_TARGET
    (0 once the whole way there keeps it)."""
    if len(rungs) >= MAX_RUNGS:
        raise RuntimeError(
            f"the ladder passed {MAX_RUNGS} rungs before reaching k = 0: the basin's radii "
            "spread too widely for this budget; raise chains or give rungs"
        )
    if fixed is not None:
        first = rungs[0].radii
        k_high = (n + 6 * math.sqrt(n)) / np.square(first).min()
        k_low = min(1 / cap**2, k_high)
        inner = list(np.geomspace(k_high, k_low, fixed - 2)) if fixed > 2 else []
        return float([*inner, 0.0][len(rungs) - 1])
    k, radii = rungs[-1].k, rungs[-1].radii

    def cess(candidate: float) -> float:
        log_w = rung_potentials(k, radii, n) - rung_potentials(candidate, radii, n)
        w = np.exp(log_w - log_w.max())
        return float(w.sum() ** 2 / (len(w) * np.square(w).sum()))

    if cess(0.0) >= CESS_TARGET:
        return 0.0
    low = math.log(1e-12 / np.square(radii).max())
    high = math.log(k) if math.isfinite(k) else math.log(1e12 * n / np.square(radii).min())
    for _ in range(60):
        middle = (low + high) / 2
        if cess(math.exp(middle)) >= CESS_TARGET:
            high = middle
        else:
            low = middle
    return math.exp(high)


def advance(
    basin: BasinRadii, previous: Rung, k: float, steps: int, rng: np.random.Generator
) -> Rung:
    """`steps` HMC moves of every chain of `previous` at restraint k, on the Gaussian g
    whose direction is the state: log target -|g|²/2 - u_k(ρ(g/|g|)). The step size is
    steered toward ACCEPTANCE during the burn-in (the first half) and fixed after it."""
    kept = steps - steps // 2
    searches, evaluations = basin.searches, basin.evaluations
    ancestors = resampled(previous, k, basin.n, rng)
    gaussians, step = previous.gaussians[ancestors], previous.step
    log_p, slope, radii = _target(basin, k, gaussians)
    trace, accepted = [], 0.0
    for move in range(steps):
        momentum = rng.standard_normal(gaussians.shape)
        position, p = gaussians.copy(), momentum + step / 2 * slope
        for leap in range(LEAPFROG):
            position = position + step * p
            new_log_p, new_slope, new_radii = _target(basin, k, position)
            p = p + (step if leap < LEAPFROG - 1 else step / 2) * new_slope
        change = new_log_p - np.square(p).sum(1) / 2 - log_p + np.square(momentum).sum(1) / 2
        take = np.log(rng.random(len(radii))) < np.nan_to_num(change, nan=-np.inf)
        gaussians[take], log_p[take] = position[take], new_log_p[take]
        slope[take], radii[take] = new_slope[take], new_radii[take]
        if move < steps - kept:
            step = float(np.clip(step * math.exp(take.mean() - ACCEPTANCE), 1e-4, 2.0))
        else:
            accepted += take.mean() / kept
            trace.append(radii.copy())
    return Rung(
        k=k, gaussians=gaussians, radii=radii, trace=np.array(trace), step=step,
        acceptance=float(accepted), radius_searches=basin.searches - searches,
        loss_evaluations=basin.evaluations - evaluations,
    )  # fmt: skip


def groups(chains: int) -> list[np.ndarray]:
    """The chains of each of the GROUPS independent groups."""
    return np.array_split(np.arange(chains), GROUPS)


def incremental_log_weights(previous: Rung, k: float, n: int) -> np.ndarray:
    """ln π_k/π_previous at each chain's final state of `previous`."""
    return rung_potentials(previous.k, previous.radii, n) - rung_potentials(k, previous.radii, n)


def resampled(previous: Rung, k: float, n: int, rng: np.random.Generator) -> np.ndarray:
    """The chains that start rung k: systematic resampling of `previous`'s chains by
    their weights π_k/π_previous, within each group. The new rung's chains then start
    from its own law as far as the old samples reach, so that a lag does not carry
    from rung to rung (sequential Monte Carlo)."""
    log_w = incremental_log_weights(previous, k, n)
    ancestors = []
    for group in groups(len(log_w)):
        w = np.exp(log_w[group] - log_w[group].max())
        cumulative = np.cumsum(w / w.sum())
        points = (rng.random() + np.arange(len(group))) / len(group)
        ancestors.append(group[np.minimum(np.searchsorted(cumulative, points), len(group) - 1)])
    return np.concatenate(ancestors)


def _target(
    basin: BasinRadii, k: float, gaussians: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The log target at each chain's g, its gradient in g, and the radii."""
    length = np.linalg.norm(gaussians, axis=1, keepdims=True)
    v = gaussians / length
    radii, slope_v = basin.radii_and_slopes_in_y(v)
    weight = log_weight_slope(k, radii, basin.n)[:, None]
    tangent = slope_v - (slope_v * v).sum(1, keepdims=True) * v
    log_p = -np.square(gaussians).sum(1) / 2 - rung_potentials(k, radii, basin.n)
    return log_p, -gaussians + weight * tangent / length, radii


def _unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)
