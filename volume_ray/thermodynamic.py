"""`thermodynamic_log_volume`: the paper's basin volume, consistently (DESIGN §7).

The basin is the paper's own set B = {ρu : 0 <= ρ <= r(u)} in the radii's coordinates
z, r(u) the first crossing of the threshold along the unit direction u (capped). A
ladder of harmonic restraints p_k(z) ∝ exp(-k|z|²/2)·1_B(z) runs from the uniform law
of directions (no restraint reaches B's edge: its normaliser is 1, its samples exact
and independent) down to k = 0, where the law of directions is ∝ r(u)^n. The radius
given the direction is integrated out exactly (`polar`), so chains move directions
only: Hamiltonian Monte Carlo on a Gaussian g whose direction is u (the Gaussian
leaves the uniform law of directions, the rung's weight tilts it), with the gradient
of ln r(u) from the loss gradient at the crossing (implicit differentiation of
L(r(u) u) = T). They move in whitened coordinates (`whitening`), where the basin is
round enough for short chains; a random-walk step there still lagged by tens of nats
at n = 1,000 on a cross-polytope, HMC by about one (docs/thermodynamic.md).
Rungs are placed where the chains' conditional effective sample size of the next
rung's weights falls to half. MBAR (`pymbar`) over every rung's samples gives
log E_u[r(u)^n], in the paper's convention; thermodynamic integration and annealed
importance sampling along the same ladder are its cross-checks
(docs/thermodynamic.md has the identities and what the prototypes measured).
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy import special
from torch import nn

from volume_ray.checks import MODEL_AND_DATA_RULES, check, integer, optional, real
from volume_ray.curvature import HessianOperator
from volume_ray.directions import FilterNorm, perturbed_parameters
from volume_ray.estimators import EstimateResult
from volume_ray.measure import RadiusMeter
from volume_ray.polar import (
    UNIFORM,
    log_gamma_cdf,
    log_weight_slope,
    mean_square_radius,
    rung_potentials,
)
from volume_ray.search import DEFAULT_RTOL
from volume_ray.whitening import whiten

_pymbar_log = logging.getLogger("pymbar")
_level = _pymbar_log.level
_pymbar_log.setLevel(logging.ERROR)  # its import logs a banner about JAX and a caveat
try:
    import pymbar
    from pymbar import timeseries
finally:
    _pymbar_log.setLevel(_level)

__all__ = ["ThermodynamicResult", "thermodynamic_log_volume"]

CHAINS = 64  # chains run side by side, by default
STEPS = 20  # HMC moves of every chain per rung, by default; the first half is burn-in
LEAPFROG = 8  # leapfrog steps per move: one radius search and one gradient each
CESS_TARGET = 0.5  # a new rung where the chains' conditional ESS would fall to this
MAX_RUNGS = 2000  # an adaptive ladder longer than this means the basin is out of reach
ACCEPTANCE = 0.65  # the acceptance rate the step size is steered to during burn-in
FIRST_STEP_SIZE = 0.1  # leapfrog step size in whitened Gaussian units, at the first rung
WHITENING_ITERATIONS = 6
WHITENING_DIRECTIONS = 50  # uniform directions per iteration, per parameter,
MAX_WHITENING_DIRECTIONS = 20_000  # up to this many
GROUPS = 4  # chain groups whose MBAR estimates give the chain-to-chain spread
Z = 1.959963984540054  # two-sided 95% normal quantile

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
}


@dataclass(frozen=True)
class ThermodynamicResult(EstimateResult):
    """The estimate (MBAR) with its diagnostics: the two cross-checks, the ladder
    (UNIFORM first, 0 last), per rung the acceptance rate, the statistical
    inefficiency of the chains (autocorrelation time, in moves) and the effective
    samples, and the cost. `ess` is the fewest effective samples of any rung."""

    thermodynamic_integration: float = math.nan
    annealed_importance: float = math.nan
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
) -> ThermodynamicResult:
    """log E_u[r(u)^n] of the basin where the mean `loss_fn` on (x, y) stays below
    `threshold`, with r capped at max_coefficient·√n as `measure_radii` caps it.

    `rungs` fixes the ladder's length (None: placed adaptively); `chains` run side by
    side, `steps` moves each per rung. The standard error adds MBAR's uncertainty to
    the spread between GROUPS groups of chains; the interval also carries the radius
    search's precision, n·rtol. The caller's model is left as it was.
    """
    check(ARGUMENT_RULES, locals())
    chains, steps = chains or CHAINS, steps or STEPS
    params = perturbed_parameters(model)
    n = params.count
    scale = FilterNorm(params, filter_norm).scale  # raises for li2018: no fixed z
    gradients = HessianOperator(
        model, x, y, loss_fn, scale=scale, batch_size=batch_size, device=device
    )
    if not threshold > gradients.base_loss:
        raise ValueError(
            f"threshold must lie above the loss at the trained weights, "
            f"{gradients.base_loss:.6g}, got {threshold!r}: the basin would be empty"
        )
    meter = RadiusMeter(
        model, x, y, loss_fn, thresholds=(threshold,), filter_norm=filter_norm,
        max_coefficient=max_coefficient, batch_size=batch_size, device=device, seed=seed,
    )  # fmt: skip
    basin = _Basin(meter, gradients, n, max_coefficient * math.sqrt(n))
    rng = np.random.default_rng(seed)
    basin.whitening = whiten(
        basin.crossings,
        n,
        iterations=WHITENING_ITERATIONS,
        directions=min(WHITENING_DIRECTIONS * n, MAX_WHITENING_DIRECTIONS),
        rng=rng,
    )
    return _Ladder(basin, n, chains, steps, rungs, rng).run()


class _Basin:
    """B as the ladder sees it: radii along directions in whitened coordinates y
    (z = A y, det A = 1, so volumes are the same), and, for whitening, crossings in z
    with the loss gradient there. Counts the radius searches and loss evaluations."""

    def __init__(self, meter: RadiusMeter, gradients: HessianOperator, n: int, cap: float):
        self.meter, self.gradients, self.n, self.cap = meter, gradients, n, cap
        self.whitening: np.ndarray | None = None
        self.searches = self.evaluations = 0

    def radii(self, u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """r(u) (B,) along unit z-directions u (B, n), and whether each is censored."""
        raw = torch.from_numpy(u * math.sqrt(self.n))  # |g| = √n, as seeded directions
        coefficient, censored, nonfinite, evals = self.meter.crossings_along(raw)
        self.searches += len(u)
        self.evaluations += int(evals.sum())
        if nonfinite.any():
            raise ValueError(
                "model and loss_fn give a non-finite loss inside the basin along a direction "
                "the chains proposed: the basin is not a set of finite loss; check the model "
                "for overflow, or lower the threshold"
            )
        return coefficient[:, 0] * math.sqrt(self.n), censored[:, 0]

    def crossings(self, u: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """What `whiten` needs: radii, the loss gradients in z at the crossings, censored."""
        radii, censored = self.radii(u)
        points = torch.from_numpy(radii[:, None] * u)
        return radii, self.gradients.gradient(points).cpu().numpy(), censored

    def _to_z(self, v: np.ndarray) -> np.ndarray:
        a = self.whitening
        return v @ a.T if a.ndim == 2 else v * a

    def radii_in_y(self, v: np.ndarray) -> np.ndarray:
        """The whitened body's radius along unit y-directions v: r(Av/|Av|) / |Av|."""
        w = self._to_z(v)
        length = np.linalg.norm(w, axis=1)
        return self.radii(w / length[:, None])[0] / length

    def radii_and_slopes_in_y(self, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """ρ(v) = r(Av/|Av|)/|Av| along unit y-directions v, and ∇_v ln ρ. On B's edge
        L(r(u) u) = T, so ∇_u ln r = -P_u ∇L / (u·∇L), P_u the projection off u (0
        where r is capped); then u = w/|w|, w = A v."""
        w = self._to_z(v)
        length = np.linalg.norm(w, axis=1, keepdims=True)
        u = w / length
        radii, gradients, censored = self.crossings(u)
        along = (gradients * u).sum(1, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            slope_u = np.where(censored[:, None], 0.0, -(gradients - along * u) / along)
        slope_w = (slope_u - u) / length
        a = self.whitening
        slope_v = slope_w @ a if a.ndim == 2 else slope_w * a
        return radii / length[:, 0], slope_v


class _Ladder:
    """The chains, rung by rung, and what is kept of them."""

    def __init__(
        self, basin: _Basin, n: int, chains: int, steps: int, rungs: int | None, rng
    ) -> None:
        self.basin, self.n, self.chains, self.steps = basin, n, chains, steps
        self.rungs, self.rng = rungs, rng
        self.kept = steps - steps // 2
        self.ladder: list[float] = []
        self.samples: list[np.ndarray] = []  # per rung: (kept, chains) radii in y
        self.acceptance: list[float] = []

    def run(self) -> ThermodynamicResult:
        n, chains = self.n, self.chains
        gaussians = self.rng.standard_normal((chains * self.kept, n))
        radii = self.basin.radii_in_y(_unit(gaussians))
        self._keep(UNIFORM, radii.reshape(self.kept, chains), math.nan)
        gaussians, radii = gaussians[:chains], radii[:chains].copy()
        fixed = self._fixed_ladder(radii) if self.rungs is not None else None
        log_weights, step, k = np.zeros(chains), FIRST_STEP_SIZE, UNIFORM
        while k > 0:
            following = fixed[len(self.ladder)] if fixed is not None else self._next_rung(k, radii)
            log_weights -= rung_potentials(following, radii, n) - rung_potentials(k, radii, n)
            k = following
            gaussians, radii, step, accepted, trace = self._moves(k, gaussians, radii, step)
            self._keep(k, trace, accepted)
            if len(self.ladder) > MAX_RUNGS:
                raise RuntimeError(
                    f"the ladder passed {MAX_RUNGS} rungs before reaching k = 0: the basin's "
                    "radii spread too widely for this budget; raise chains or give rungs"
                )
        return self._result(log_weights)

    def _keep(self, k: float, trace: np.ndarray, accepted: float) -> None:
        self.ladder.append(k)
        self.samples.append(trace)
        self.acceptance.append(accepted)

    def _next_rung(self, k: float, radii: np.ndarray) -> float:
        """The largest k' < k at which the chains' conditional ESS of the weights
        π_k'/π_k is still CESS_TARGET (0 once the whole way there keeps it)."""

        def cess(candidate: float) -> float:
            log_w = rung_potentials(k, radii, self.n) - rung_potentials(candidate, radii, self.n)
            w = np.exp(log_w - log_w.max())
            return float(w.sum() ** 2 / (len(w) * np.square(w).sum()))

        if cess(0.0) >= CESS_TARGET:
            return 0.0
        low = math.log(1e-12 / np.square(radii).max())
        high = math.log(k) if math.isfinite(k) else math.log(1e12 * self.n / np.square(radii).min())
        for _ in range(60):
            middle = (low + high) / 2
            if cess(math.exp(middle)) >= CESS_TARGET:
                high = middle
            else:
                low = middle
        return math.exp(high)

    def _fixed_ladder(self, radii: np.ndarray) -> list[float]:
        """UNIFORM, rungs - 2 restraints from k_high (every uniform chain's restraint all
        but inside B) down to k_low (none reaches into B: k r² <= 1) in geometric steps,
        then 0."""
        n, inner = self.n, self.rungs - 2
        k_high = (n + 6 * math.sqrt(n)) / np.square(radii).min()
        k_low = 1 / np.square(self.basin.cap)
        middle = list(np.geomspace(k_high, min(k_low, k_high), inner)) if inner else []
        return [UNIFORM, *middle, 0.0]

    def _moves(
        self, k: float, gaussians: np.ndarray, radii: np.ndarray, step: float
    ) -> tuple[np.ndarray, np.ndarray, float, float, np.ndarray]:
        """`steps` HMC moves of every chain at rung k, on the Gaussian g whose direction
        is the state: log target -|g|²/2 - u_k(ρ(g/|g|)). The step size is steered
        toward ACCEPTANCE during the burn-in and fixed after it. Returns the states, the
        step size, the kept half's acceptance rate and radii (kept, chains)."""
        log_p, slope, radii = self._target(k, gaussians)
        trace, accepted = [], 0.0
        for move in range(self.steps):
            momentum = self.rng.standard_normal(gaussians.shape)
            position, p = gaussians.copy(), momentum + step / 2 * slope
            for leap in range(LEAPFROG):
                position = position + step * p
                new_log_p, new_slope, new_radii = self._target(k, position)
                p = p + (step if leap < LEAPFROG - 1 else step / 2) * new_slope
            change = new_log_p - np.square(p).sum(1) / 2 - log_p + np.square(momentum).sum(1) / 2
            take = np.log(self.rng.random(len(radii))) < np.nan_to_num(change, nan=-np.inf)
            gaussians[take], log_p[take] = position[take], new_log_p[take]
            slope[take], radii[take] = new_slope[take], new_radii[take]
            if move < self.steps - self.kept:
                step = float(np.clip(step * math.exp(take.mean() - ACCEPTANCE), 1e-4, 2.0))
            else:
                accepted += take.mean() / self.kept
                trace.append(radii.copy())
        return gaussians, radii, step, accepted, np.array(trace)

    def _target(self, k: float, gaussians: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The log target at each chain's g, its gradient in g, and the radii."""
        length = np.linalg.norm(gaussians, axis=1, keepdims=True)
        v = gaussians / length
        radii, slope_v = self.basin.radii_and_slopes_in_y(v)
        weight = log_weight_slope(k, radii, self.n)[:, None]
        tangent = slope_v - (slope_v * v).sum(1, keepdims=True) * v
        log_p = -np.square(gaussians).sum(1) / 2 - rung_potentials(k, radii, self.n)
        return log_p, -gaussians + weight * tangent / length, radii

    def _result(self, log_weights: np.ndarray) -> ThermodynamicResult:
        estimate, mbar_error = _mbar(self.ladder, self.samples, self.n)
        groups = np.array_split(np.arange(self.chains), GROUPS)
        spread = np.std(
            [_mbar(self.ladder, [s[:, g] for s in self.samples], self.n)[0] for g in groups],
            ddof=1,
        )
        stderr = math.sqrt(mbar_error**2 + spread**2 / GROUPS)
        inefficiency = np.array([_inefficiency(trace) for trace in self.samples])
        effective = self.chains * self.kept / inefficiency
        valid = math.isfinite(stderr)
        # each radius is known to a relative DEFAULT_RTOL (its bracket), so the log
        # volume to n times that, whatever the sampling: the interval carries it too
        half_width = Z * stderr + self.n * DEFAULT_RTOL
        return ThermodynamicResult(
            estimate=estimate,
            stderr=stderr,
            ci_low=estimate - half_width if valid else math.nan,
            ci_high=estimate + half_width if valid else math.nan,
            ess=float(effective.min()),
            ci_valid=valid,
            thermodynamic_integration=_integrated(self.ladder, self.samples, self.n),
            annealed_importance=float(special.logsumexp(log_weights) - math.log(self.chains)),
            ladder=np.array(self.ladder),
            acceptance=np.array(self.acceptance),
            inefficiency=inefficiency,
            effective_samples=effective,
            radius_searches=self.basin.searches,
            loss_evaluations=self.basin.evaluations,
        )


def _unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def _mbar(ladder: list[float], samples: list[np.ndarray], n: int) -> tuple[float, float]:
    """ln E_u[r^n] and its MBAR uncertainty, from each rung's radii: minus the free
    energy of k = 0 (potential -n ln r) relative to the uniform rung (potential 0,
    normaliser 1). Potentials are shifted per rung, for the solver's sake."""
    radii = np.concatenate([s.ravel() for s in samples])
    counts = np.array([s.size for s in samples])
    if np.ptp(np.log(radii)) == 0:  # a ball: every direction alike, and exact
        return float(n * math.log(radii[0])), 0.0
    potentials = np.stack([rung_potentials(k, radii, n) for k in ladder])
    shift = potentials.min(axis=1)
    with contextlib.redirect_stdout(io.StringIO()):
        mbar = pymbar.MBAR(potentials - shift[:, None], counts, initialize="BAR")
        found = mbar.compute_free_energy_differences()
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
