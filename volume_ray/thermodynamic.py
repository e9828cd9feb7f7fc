"""`thermodynamic_log_volume`: the paper's basin volume, consistently (DESIGN §7).

The basin is the paper's own set B = {ρu : 0 <= ρ <= r(u)} in the radii's coordinates
z, r(u) the first crossing of the threshold along the unit direction u (capped). A
ladder of harmonic restraints p_k(z) ∝ exp(-k|z|²/2)·1_B(z) runs from the uniform law
of directions down to k = 0, where the law of directions is ∝ r(u)^n (`ladder`), in
whitened coordinates where B is round enough for short chains (`whitening`). MBAR
(`pymbar`) over every rung's samples gives log E_u[r(u)^n], in the paper's convention;
thermodynamic integration and sequential Monte Carlo along the same ladder (whose
chains are resampled by their weights from rung to rung) are its cross-checks
(docs/thermodynamic.md has the identities and what the prototypes measured).

The three steps (`open_basin`, `basin_whitening`, then rung after rung with
`rung_generator`) are what the sweep service runs as Ray tasks too, with the same
seeds, so that its rows are this function's estimates.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy import special, stats
from torch import nn

from volume_ray.basin_radii import BasinRadii
from volume_ray.checks import BOOLEAN, MODEL_AND_DATA_RULES, check, integer, optional, real
from volume_ray.curvature import HessianOperator
from volume_ray.directions import FilterNorm, perturbed_parameters
from volume_ray.estimators import EstimateResult
from volume_ray.ladder import (
    GROUPS,
    Rung,
    advance,
    following_restraint,
    groups,
    incremental_log_weights,
    uniform_rung,
)
from volume_ray.measure import RadiusMeter
from volume_ray.polar import log_gamma_cdf, mean_square_radius, rung_potentials
from volume_ray.search import DEFAULT_RTOL
from volume_ray.whitening import whiten

_pymbar_log = logging.getLogger("pymbar")
_level = _pymbar_log.level
_pymbar_log.setLevel(logging.ERROR)  # its import logs a banner about JAX and a caveat
try:
    import pymbar
    from pymbar import timeseries
    from pymbar.utils import BoundsError, ConvergenceError
finally:
    _pymbar_log.setLevel(_level)

__all__ = [
    "EmptyBasinError",
    "ThermodynamicResult",
    "basin_whitening",
    "estimate_from_rungs",
    "open_basin",
    "rung_generator",
    "thermodynamic_log_volume",
]

CHAINS = 64  # chains run side by side, by default
STEPS = 20  # HMC moves of every chain per rung, by default; the first half is burn-in
WHITENING_ITERATIONS = 6
WHITENING_DIRECTIONS = 50  # uniform directions per iteration, per parameter,
MAX_WHITENING_DIRECTIONS = 20_000  # up to this many
# The bias the whole kept half carries, in units of the drift between its two halves,
# if each half lags half as much as the one before: biases 2d and d, mean 1.5d.
LAG_FACTOR = 1.5
# The two-sided 95% quantile of Student's t with GROUPS - 1 degrees of freedom: the
# standard error rests on the spread of GROUPS independent groups of chains (3.18 for
# 4 groups, where a normal quantile, 1.96, under-covers).
QUANTILE = float(stats.t.ppf(0.975, GROUPS - 1))

# What each argument of `thermodynamic_log_volume` must be, checked before any work.
ARGUMENT_RULES = {
    **MODEL_AND_DATA_RULES,
    "threshold": real(-math.inf),
    "seed": integer(0),
    "rungs": optional(integer(2)),
    "chains": optional(integer(GROUPS)),
    "steps": optional(integer(2)),
    "batch_size": optional(integer(1)),
    "max_coefficient": real(0, low_open=True),
    "whitening_directions": optional(integer(1)),
    "allow_tf32": BOOLEAN,
}


class EmptyBasinError(ValueError):
    """The threshold is at or below the loss at the trained weights: no basin."""


@dataclass(frozen=True)
class ThermodynamicResult(EstimateResult):
    """The estimate (MBAR) with its diagnostics: the two cross-checks, the drift (the
    estimate from the later half of every rung's kept moves minus the one from the
    earlier half: chains that lag behind the ladder show it), the ladder (UNIFORM
    first, 0 last), per rung the acceptance rate, the statistical inefficiency of the
    chains (autocorrelation time, in moves) and the effective samples, and the cost
    (whitening included). `ess` is the fewest effective samples of any rung."""

    thermodynamic_integration: float = math.nan
    drift: float = math.nan
    sequential_monte_carlo: float = math.nan
    ladder: np.ndarray = field(default_factory=lambda: np.empty(0))
    acceptance: np.ndarray = field(default_factory=lambda: np.empty(0))
    inefficiency: np.ndarray = field(default_factory=lambda: np.empty(0))
    effective_samples: np.ndarray = field(default_factory=lambda: np.empty(0))
    radius_searches: int = 0
    loss_evaluations: int = 0


def thermodynamic_log_volume(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    loss_fn,
    *,
    threshold: float,
    filter_norm: str = "paper",
    seed: int = 0,
    rungs: int | None = None,
    chains: int | None = None,
    steps: int | None = None,
    batch_size: int | None = None,
    device: str | torch.device | None = None,
    max_coefficient: float = 1.0,
    whitening_directions: int | None = None,
    allow_tf32: bool = False,
) -> ThermodynamicResult:
    """log E_u[r(u)^n] of the basin where the mean `loss_fn` on (x, y) stays below
    `threshold`, with r capped at max_coefficient·√n as `measure_radii` caps it.

    `rungs` fixes the ladder's length (None: placed adaptively); `chains` run side by
    side, `steps` moves each per rung. The standard error adds MBAR's uncertainty to
    the spread between GROUPS groups of chains; the interval also carries the drift
    and the radius search's precision (`estimate_from_rungs`). On a GPU float32 runs
    at full precision unless `allow_tf32`. The caller's model is left as it was.
    """
    check(ARGUMENT_RULES, locals())
    chains, steps = chains or CHAINS, steps or STEPS
    basin = open_basin(
        model, x, y, loss_fn, threshold=threshold, filter_norm=filter_norm,
        max_coefficient=max_coefficient, batch_size=batch_size, device=device, seed=seed,
        allow_tf32=allow_tf32,
    )  # fmt: skip
    basin.whitening = basin_whitening(basin, seed, whitening_directions)
    whitening_cost = (basin.searches, basin.evaluations)
    ladder = [uniform_rung(basin, chains, steps, rung_generator(seed, 0))]
    while ladder[-1].k > 0:
        k = following_restraint(ladder, basin.n, basin.cap, rungs)
        ladder.append(advance(basin, ladder[-1], k, steps, rung_generator(seed, len(ladder))))
    return estimate_from_rungs(ladder, basin.n, whitening_cost)


def open_basin(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn, *, threshold: float,
    filter_norm: str, max_coefficient: float, batch_size: int | None,
    device: str | torch.device | None, seed: int, allow_tf32: bool = False,
) -> BasinRadii:  # fmt: skip
    """The basin's radii and gradients on `device`, not yet whitened, at float32's
    full precision unless `allow_tf32`; EmptyBasinError when `threshold` is not above
    the loss at the trained weights."""
    params = perturbed_parameters(model)
    scale = FilterNorm(params, filter_norm).scale  # raises for li2018: no fixed z
    gradients = HessianOperator(
        model, x, y, loss_fn, scale=scale, batch_size=batch_size, device=device,
        allow_tf32=allow_tf32,
    )  # fmt: skip
    if not threshold > gradients.base_loss:
        raise EmptyBasinError(
            f"threshold must lie above the loss at the trained weights, "
            f"{gradients.base_loss:.6g}, got {threshold!r}: the basin would be empty"
        )
    meter = RadiusMeter(
        model, x, y, loss_fn, thresholds=(threshold,), filter_norm=filter_norm,
        max_coefficient=max_coefficient, batch_size=batch_size, device=device, seed=seed,
        allow_tf32=allow_tf32,
    )  # fmt: skip
    return BasinRadii(meter, gradients, max_coefficient * math.sqrt(params.count))


def basin_whitening(basin: BasinRadii, seed: int, directions: int | None = None) -> np.ndarray:
    """The whitening A of `basin` (`whitening.whiten`), from `directions` uniform
    directions per iteration (None: WHITENING_DIRECTIONS per parameter, up to
    MAX_WHITENING_DIRECTIONS)."""
    default = min(WHITENING_DIRECTIONS * basin.n, MAX_WHITENING_DIRECTIONS)
    return whiten(
        basin.crossings,
        basin.n,
        iterations=WHITENING_ITERATIONS,
        directions=directions or default,
        rng=np.random.default_rng([seed, 0]),
    )


def rung_generator(seed: int, index: int) -> np.random.Generator:
    """The random numbers of rung `index` (0: the uniform one), wherever it runs."""
    return np.random.default_rng([seed, 1, index])


def estimate_from_rungs(
    rungs: list[Rung], n: int, whitening_cost: tuple[int, int] = (0, 0)
) -> ThermodynamicResult:
    """The estimate from a finished ladder (UNIFORM first, k = 0 last), its
    cross-checks and diagnostics; `whitening_cost` is (radius searches, loss
    evaluations) spent on the whitening, added to the rungs' own.

    The interval's half-width adds three things: QUANTILE standard errors (MBAR's
    uncertainty and the spread between chain groups, which resample apart), LAG_FACTOR
    times the drift (a lag within rungs that every chain shares), and n·rtol (each
    radius is known only to its bracket, so the log-volume to n times that)."""
    ladder = [rung.k for rung in rungs]
    samples = [rung.trace for rung in rungs]
    chains = len(rungs[0].radii)
    estimate, mbar_error = _mbar(ladder, samples, n)
    spread = np.std(
        [_mbar(ladder, [s[:, g] for s in samples], n)[0] for g in groups(chains)], ddof=1
    )
    sequential = _sequential(rungs, n)
    stderr = math.sqrt(mbar_error**2 + spread**2 / GROUPS)
    drift = _drift(ladder, samples, n)
    inefficiency = np.array([_inefficiency(trace) for trace in samples])
    effective = samples[0].size / inefficiency
    valid = math.isfinite(stderr) and math.isfinite(drift)
    half_width = QUANTILE * stderr + LAG_FACTOR * abs(drift) + n * DEFAULT_RTOL
    return ThermodynamicResult(
        estimate=estimate,
        stderr=stderr,
        ci_low=estimate - half_width if valid else math.nan,
        ci_high=estimate + half_width if valid else math.nan,
        ess=float(effective.min()),
        ci_valid=valid,
        thermodynamic_integration=_integrated(ladder, samples, n),
        drift=drift,
        sequential_monte_carlo=float(special.logsumexp(sequential) - math.log(GROUPS)),
        ladder=np.array(ladder),
        acceptance=np.array([rung.acceptance for rung in rungs]),
        inefficiency=inefficiency,
        effective_samples=effective,
        radius_searches=whitening_cost[0] + sum(rung.radius_searches for rung in rungs),
        loss_evaluations=whitening_cost[1] + sum(rung.loss_evaluations for rung in rungs),
    )


def _drift(ladder: list[float], samples: list[np.ndarray], n: int) -> float:
    """MBAR from the later half of every restrained rung's kept moves minus MBAR from
    the earlier half (the uniform rung's exact samples in both); NaN with a single kept
    move, where no drift can be seen."""
    half = samples[-1].shape[0] // 2
    if half == 0:
        return math.nan
    first = _mbar(ladder, [samples[0], *[s[:half] for s in samples[1:]]], n)[0]
    second = _mbar(ladder, [samples[0], *[s[-half:] for s in samples[1:]]], n)[0]
    return second - first


def _sequential(rungs: list[Rung], n: int) -> np.ndarray:
    """ln E_u[r^n] of each chain group by sequential Monte Carlo: the sum over rungs of
    the log mean weight π_k'/π_k of the group's chains as the ladder moved on (they
    were resampled by those weights). Each group's E_u[r^n] is unbiased whether or not
    its chains mixed."""
    totals = np.zeros(GROUPS)
    for before, after in zip(rungs, rungs[1:]):
        log_w = incremental_log_weights(before, after.k, n)
        totals += [special.logsumexp(log_w[g]) - math.log(len(g)) for g in groups(len(log_w))]
    return totals


def _mbar(ladder: list[float], samples: list[np.ndarray], n: int) -> tuple[float, float]:
    """ln E_u[r^n] and its MBAR uncertainty, from each rung's radii: minus the free
    energy of k = 0 (potential -n ln r) relative to the uniform rung (potential 0,
    normaliser 1); NaN where neighbouring rungs' samples do not overlap at all (too few
    of them), so that no solver start exists. Potentials are shifted per rung, for the
    solver's sake."""
    radii = np.concatenate([s.ravel() for s in samples])
    counts = np.array([s.size for s in samples])
    if np.ptp(np.log(radii)) == 0:  # a ball: every direction alike, and exact
        return float(n * math.log(radii[0])), 0.0
    potentials = np.stack([rung_potentials(k, radii, n) for k in ladder])
    shift = potentials.min(axis=1)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            mbar = pymbar.MBAR(potentials - shift[:, None], counts, initialize="BAR")
            found = mbar.compute_free_energy_differences()
    # BAR's start fails without overlap: BoundsError, or in pymbar 4.0.3 a NameError of
    # its own handler (it names ConvergenceError without importing it)
    except (BoundsError, ConvergenceError, NameError):
        return math.nan, math.nan
    first, last = 0, len(ladder) - 1
    estimate = -(found["Delta_f"][first, last] + shift[last] - shift[first])
    return float(estimate), float(found["dDelta_f"][first, last])


def _integrated(ladder: list[float], samples: list[np.ndarray], n: int) -> float:
    """ln E_u[r^n] by thermodynamic integration of d ln Z/dk = -E_k|z|²/2 from the first
    restraint down to 0, started from Z(k_1) = (2π/k_1)^(n/2) E_uniform[P(n/2, k_1 r²/2)]
    (the uniform rung's samples), in the paper's convention (minus ln V_n(1))."""
    restrained = list(zip(ladder[1:], samples[1:]))
    k_first = restrained[0][0]
    if k_first == 0:  # the ladder went straight to 0: nothing to integrate
        return math.nan
    uniform = samples[0].ravel()
    start = special.logsumexp(log_gamma_cdf(n / 2, k_first * uniform**2 / 2)) - math.log(
        uniform.size
    )
    start += n / 2 * math.log(2 * math.pi / k_first)
    ks = np.array([k for k, _ in restrained])
    means = np.array([mean_square_radius(k, s.ravel(), n).mean() for k, s in restrained])
    # d ln Z = E|z|²/2 dk down the ladder; in ln k where k > 0, as E|z|² ~ n/k there
    positive = ks > 0
    integral = np.trapezoid(
        (ks * means)[positive][::-1] / 2, np.log(ks[positive])[::-1]
    ) if positive.sum() > 1 else 0.0  # fmt: skip
    last = ks[positive][-1]
    integral += last * (means[positive][-1] + means[-1]) / 4  # from the last restraint to 0
    log_unit_ball = n / 2 * math.log(math.pi) - special.gammaln(n / 2 + 1)
    return float(start + integral - log_unit_ball)


def _inefficiency(trace: np.ndarray) -> float:
    """The chains' statistical inefficiency at a rung (mean over chains, >= 1), from
    the series of ln r: 1 for independent draws; the kept length where a chain never
    moved."""
    values = []
    for series in np.log(trace).T:
        if np.ptp(series) == 0:
            values.append(float(len(series)))
            continue
        with contextlib.redirect_stdout(io.StringIO()):
            values.append(float(timeseries.statistical_inefficiency(series)))
    return float(np.mean(values))
