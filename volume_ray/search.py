"""Where a walk first crosses a threshold: one search per direction.

A search is a small state machine over the coefficient c of one walk w* + c*d.
`propose()` names the next coefficient to score, with the bounds at which scoring may
stop early; `record()` takes the bounds the landscape returned. Searches know nothing
of models, devices or Ray, so a driver can score the proposals of many directions in
one pass and the logic stays testable on plain functions.

Values and levels are in the landscape's units: summed per-sample metric, where
"past a level" means the sum is above it. A NaN or inf sum is past every level.

- `GridSearch` is the paper's stage 1: the first grid coefficient past the level.
- `BracketSearch` brackets the first crossing, then refines it to `rtol` by inverse
  interpolation on log(value - base) against log(c), which is close to a straight
  line near a minimum (exactly so, with slope 2, on a quadratic bowl), safeguarded by
  geometric bisection. Sums within EXIT_FACTOR of the levels are scored fully, so
  that interpolation has exact values; points further off may stop early. Given a
  surrogate (a model of the sum between scored points, see `volume_ray.surrogate`),
  it places its third point by it, so that point often lands within a bracket width
  of the crossing and one more closes the bracket.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "DEFAULT_RTOL",
    "MIN_RTOL",
    "BracketSearch",
    "Crossing",
    "GridSearch",
    "Hint",
    "Proposal",
    "Surrogate",
    "paper_grid",
]

DEFAULT_RTOL = 1e-4
MIN_RTOL = 1e-12  # finer than float64 can tell coefficients apart, searches would stall
XTOL = 1e-12  # a crossing found below this coefficient, with only the base under it, stands
INITIAL_FRACTION = 1 / 16  # the first probe, as a fraction of max_coefficient
MAX_GROWTH = 4.0  # an unbracketed search moves by at most this factor per step
EXIT_FACTOR = 4.0  # sums within this factor of the pending levels are scored fully
MIN_SHRINK = 0.5  # a bracket that shrinks less than this over two steps is bisected
FIRST_STEP = 1e-4  # the least relative step of a one-sided search, growing 4x a step
OVERSHOOT_FROM_TWO = 0.45  # probe past an estimate from two points by this much of rtol*c,
OVERSHOOT_FROM_MORE = 0.05  # and past one from three or more (about 1e-6 off) by this much


Surrogate = Callable[[float], "float | None"]
"""surrogate(c): a model of this walk's summed metric at c, or None where it has none."""


def paper_grid() -> np.ndarray:
    """The paper's coefficient grid, linspace(0, 1, 100)**2: fine near 0."""
    return np.linspace(0.0, 1.0, 100) ** 2


@dataclass(frozen=True)
class Crossing:
    """The answer for one level.

    `coefficient` is the first coefficient seen past the level (0 if the base already
    is); for a censored walk, the bound the search reached. `nonfinite` says the
    value there was NaN or inf.
    """

    coefficient: float
    censored: bool
    nonfinite: bool


@dataclass(frozen=True)
class Proposal:
    """Score the walk at `coefficient`; stopping is allowed once the lower bound of the
    sum exceeds `stop_above` or its upper bound is at most `stop_below`."""

    coefficient: float
    stop_above: float
    stop_below: float


@dataclass(frozen=True)
class Hint:
    """Where a similar walk crossed a level, and the slope of log(value - base)
    against log c there: a good first probe and extrapolation for the next walk."""

    coefficient: float
    slope: float


@dataclass(frozen=True)
class _Point:
    c: float
    lower: float
    upper: float

    @property
    def exact(self) -> bool:
        return self.lower == self.upper and math.isfinite(self.lower)

    def past(self, level: float) -> bool | None:
        """Past `level`? None when the bounds do not decide it."""
        if not math.isfinite(self.lower) or self.lower > level:
            return True
        if self.upper <= level:
            return False
        return None


class GridSearch:
    """The first coefficient of `grid` whose value is past each level (paper parity).

    The base value counts as the point c = 0. Scoring stops once every level has
    crossed, unless `full_curve` asks for every grid point scored fully; `curve` then
    holds the value at each grid point, so thresholds can be re-applied later.
    """

    def __init__(
        self,
        levels: Sequence[float],
        base: float,
        grid: np.ndarray,
        *,
        full_curve: bool = False,
    ):
        self.levels = [float(level) for level in levels]
        self.grid = grid
        self.full_curve = full_curve
        self.curve: list[float] = []
        self._hits: list[_Point | None] = [None] * len(self.levels)
        self._next = 0
        self._note(_Point(0.0, base, base))
        self._base = base

    def _note(self, point: _Point) -> None:
        for k, level in enumerate(self.levels):
            if self._hits[k] is None and point.past(level):
                self._hits[k] = point

    def _pending(self) -> list[float]:
        return [level for level, hit in zip(self.levels, self._hits) if hit is None]

    def propose(self) -> Proposal | None:
        while self._next < len(self.grid) and self.grid[self._next] == 0:
            self.curve.append(self._base)  # c = 0 is the base, already scored
            self._next += 1
        pending = self._pending()
        if self._next == len(self.grid) or not (pending or self.full_curve):
            return None
        if self.full_curve:
            return Proposal(float(self.grid[self._next]), math.inf, -math.inf)
        return Proposal(float(self.grid[self._next]), max(pending), min(pending))

    def record(self, coefficient: float, lower: float, upper: float) -> None:
        """Take the bounds scored at `coefficient`."""
        self._note(_Point(coefficient, lower, upper))
        self.curve.append(lower)
        self._next += 1

    def crossings(self) -> list[Crossing]:
        last = float(self.grid[-1])
        return [
            Crossing(last, True, False)
            if hit is None
            else Crossing(hit.c, False, not math.isfinite(hit.lower))
            for hit in self._hits
        ]


class BracketSearch:
    """The first crossing of each level, refined until the bracket [lo, hi] around it
    satisfies hi - lo <= rtol * hi; the answer is hi, a coefficient seen past the level.

    A walk that is not past a level at `max_coefficient` is censored there. Levels
    share every scored point. `hints` (one per level, from another walk of the same
    model, see `hints()`) set the first probe and the slope used to extrapolate from
    a single point; without them the first probe is max_coefficient / 16 and the
    slope that of a bowl, 2. `surrogate` (see `Surrogate`) sharpens the estimate
    from two points; it only places probes, every answer rests on scored points. Steps that
    do not shrink the bracket fall back to geometric bisection, and a one-sided
    step's least size grows 4x each time it overrules the estimate, so every search
    ends within about a hundred evaluations even on plateaus, bumps and step
    functions.
    Assumes the value is monotone between the points it scores, as any search on a
    finite budget must.
    """

    def __init__(
        self,
        levels: Sequence[float],
        base: float,
        *,
        rtol: float = DEFAULT_RTOL,
        max_coefficient: float = 1.0,
        hints: Sequence[Hint | None] | None = None,
        surrogate: Surrogate | None = None,
    ):
        self.levels = [float(level) for level in levels]
        self.base = base
        self.rtol = rtol
        self.max_coefficient = max_coefficient
        self._log_cap = math.log(MAX_GROWTH * max_coefficient)
        self._surrogate = surrogate
        self._hints = dict(zip(self.levels, hints)) if hints is not None else {}
        self._points = [_Point(0.0, base, base)]
        self._widths: dict[float, list[float]] = {}  # bracket widths seen, per level
        self._started: set[float] = set()  # levels that had their first probe
        self._one_sided_steps: dict[float, int] = {}  # steps taken without a bracket

    def _bracket(self, level: float) -> tuple[_Point | None, _Point | None]:
        """(lo, hi): the first point past `level` and the last one not past it below."""
        hi = min((p for p in self._points if p.past(level)), key=lambda p: p.c, default=None)
        below = (p for p in self._points if p.past(level) is False and (hi is None or p.c < hi.c))
        return max(below, key=lambda p: p.c, default=None), hi

    def _resolved(self, level: float) -> bool:
        lo, hi = self._bracket(level)
        if hi is None:
            return lo.c >= self.max_coefficient
        if lo is None:  # past at the base
            return True
        if lo.c == 0:
            return hi.c <= XTOL
        return hi.c - lo.c <= self.rtol * hi.c

    def propose(self) -> Proposal | None:
        pending = [level for level in self.levels if not self._resolved(level)]
        if not pending:
            return None
        c, near = self._next_coefficient(min(pending))
        if near:  # expected near the level, where early exit cannot decide: one pass
            return Proposal(c, math.inf, -math.inf)
        stop_above, stop_below = EXIT_FACTOR * max(pending), min(pending) / EXIT_FACTOR
        # A bound the value at c cannot reach, given the points around c, is dropped:
        # scoring that cannot stop early is done in the fewest passes.
        lo, hi = self._bracket(min(pending))
        if hi is not None and c < hi.c and hi.upper <= stop_above:
            stop_above = math.inf
        if lo is not None and c > lo.c and lo.lower > stop_below:
            stop_below = -math.inf
        return Proposal(c, stop_above, stop_below)

    def record(self, coefficient: float, lower: float, upper: float) -> None:
        """Take the bounds scored at `coefficient`."""
        self._points.append(_Point(coefficient, lower, upper))

    def surrogate_query(self) -> float | None:
        """Where the next `propose` may ask its surrogate for a value (the first
        estimate from two scored points), if it may; None where it will not. Changes
        nothing: a caller with many walks computes their values ahead in one batch."""
        pending = [level for level in self.levels if not self._resolved(level)]
        if not pending or self._surrogate is None:
            return None
        nodes = _nearest(self._nodes(min(pending)))
        if len(nodes) != 2:
            return None
        return math.exp(min(_inverse_interpolation(nodes), self._log_cap))

    def crossings(self) -> list[Crossing]:
        answers = []
        for level in self.levels:
            lo, hi = self._bracket(level)
            if hi is None:
                answers.append(Crossing(lo.c, True, False))
            else:
                answers.append(Crossing(hi.c, False, not math.isfinite(hi.lower)))
        return answers

    def hints(self) -> list[Hint | None]:
        """What this finished walk tells the next one, per level (None where it crossed
        at 0 or not at all)."""
        answers: list[Hint | None] = []
        for level, crossing in zip(self.levels, self.crossings()):
            if crossing.censored or crossing.coefficient == 0:
                answers.append(None)
                continue
            near = sorted((log_c, gap) for gap, log_c in self._nodes(level) if abs(gap) <= 2.0)
            slope = 2.0
            if len(near) >= 2 and near[-1][0] > near[0][0]:
                (u0, g0), (u1, g1) = near[0], near[-1]
                slope = min(max((g1 - g0) / (u1 - u0), 1.0), 16.0)
            answers.append(Hint(crossing.coefficient, slope))
        return answers

    # -- choosing the next coefficient ---------------------------------------------

    def _next_coefficient(self, level: float) -> tuple[float, bool]:
        """The next coefficient to score for `level`, and whether a hint or an
        estimate placed it near the crossing (rather than a blind step)."""
        lo, hi = self._bracket(level)
        if level not in self._started:
            self._started.add(level)
            first = self._first_probe(level)
            low, high = (lo.c if lo else 0.0), (hi.c if hi else self.max_coefficient)
            if first is not None and low < first < high:
                return first, True
        hint = self._hints.get(level)
        slope = hint.slope if hint is not None else 2.0
        guess, nodes = self._estimate(level, slope)
        if hi is None and lo.c == 0:
            return INITIAL_FRACTION * self.max_coefficient, False
        if hi is None or lo.c == 0:
            # One-sided: step away from the known side, by the estimate but at least
            # a least step that grows 4x each time it overrules the estimate, so a
            # plateau or a bump that misleads the estimate costs a few steps, not
            # thousands, while a good estimate is followed as it is.
            taken = self._one_sided_steps.get(level, 0)
            least = 1 + min(max(self.rtol, FIRST_STEP) * 4**taken, MAX_GROWTH - 1)
            if hi is None:
                factor = MAX_GROWTH if guess is None else guess / lo.c
            else:
                factor = MAX_GROWTH if guess is None else hi.c / guess
            if factor < least:
                self._one_sided_steps[level] = taken + 1
            step = min(max(factor, least), MAX_GROWTH)
            c = min(lo.c * step, self.max_coefficient) if hi is None else hi.c / step
            return c, factor <= MAX_GROWTH and (nodes >= 2 or hint is not None)
        widths = self._widths.setdefault(level, [])
        widths.append(hi.c - lo.c)
        stalled = len(widths) >= 3 and widths[-1] > MIN_SHRINK * widths[-3]
        tol = 0.5 * self.rtol * hi.c
        near = guess is not None and not stalled
        if not near:
            guess = math.sqrt(lo.c * hi.c)
        else:
            # Probe past the estimate, away from the latest point, by about its error:
            # the point then lands on the far side within a bracket width, and the
            # next one, from three points, closes the bracket.
            overshoot = OVERSHOOT_FROM_TWO if nodes == 2 else OVERSHOOT_FROM_MORE
            guess += overshoot * self.rtol * hi.c * (1 if self._points[-1] is lo else -1)
        return min(max(guess, lo.c + tol), hi.c - tol), near

    def _first_probe(self, level: float) -> float | None:
        """Where the hints say this walk crosses `level`: the hinted coefficient, scaled
        by this walk's own crossing of another level when it has one (walks differ in
        scale more than in shape)."""
        hint = self._hints.get(level)
        if hint is None:
            return None
        for other in self.levels:
            other_hint = self._hints.get(other)
            if other != level and other_hint is not None and self._resolved(other):
                crossing = self._bracket(other)[1]
                if crossing is not None and crossing.c > 0:
                    return crossing.c * hint.coefficient / other_hint.coefficient
        return hint.coefficient

    def _log_gap(self, value: float, level: float) -> float | None:
        """log(value - base) - log(level - base), or None where it is undefined."""
        if not (value > self.base and level > self.base and math.isfinite(value)):
            return None
        return math.log(value - self.base) - math.log(level - self.base)

    def _nodes(self, level: float) -> list[tuple[float, float]]:
        """(log gap, log c) of every exactly scored point where the gap is defined."""
        return [
            (gap, math.log(p.c))
            for p in self._points
            if p.exact and p.c > 0 and (gap := self._log_gap(p.lower, level)) is not None
        ]

    def _estimate(self, level: float, slope: float) -> tuple[float | None, int]:
        """Where log(value - base) meets log(level - base), as a function of log c, and
        the number of scored points it rests on.

        Inverse interpolation through the (up to) three scored points nearest the
        level; from a single point, a straight line of the given slope; from two, the
        root of the surrogate through them when there is one.
        """
        nodes = _nearest(self._nodes(level))
        if not nodes:
            return None, 0
        if len(nodes) == 1:
            gap, log_c = nodes[0]
            log_c -= gap / slope
        elif len(nodes) == 2 and self._surrogate is not None:
            log_c = self._surrogate_root(level, nodes)
        else:
            log_c = _inverse_interpolation(nodes)
        # capped, so that a wild extrapolation cannot overflow; callers clamp anyway
        return math.exp(min(log_c, self._log_cap)), len(nodes)

    def _surrogate_root(self, level: float, nodes: list[tuple[float, float]]) -> float:
        """log c where the walk crosses `level`, from two scored points and the
        surrogate through them.

        Interpolating the two sums in log-log places the crossing only roughly; the
        surrogate, which interpolates the outputs sample by sample, far more closely
        (docs/performance.md). One surrogate value at the first estimate, as a third
        node of the inverse interpolation, gets that.
        """
        log_c = _inverse_interpolation(nodes)
        value = self._surrogate(math.exp(min(log_c, self._log_cap)))
        gap = None if value is None else self._log_gap(value, level)
        if gap is None or any(gap == g for g, _ in nodes):
            return log_c
        return _inverse_interpolation([*nodes, (gap, log_c)])


def _nearest(nodes: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (up to) three nodes nearest gap 0, with distinct gaps."""
    chosen: list[tuple[float, float]] = []
    for gap, log_c in sorted(nodes, key=lambda node: abs(node[0])):
        if len(chosen) < 3 and all(gap != g for g, _ in chosen):
            chosen.append((gap, log_c))
    return chosen


def _inverse_interpolation(nodes: list[tuple[float, float]]) -> float:
    """log c at gap 0 of the polynomial through (gap, log c) nodes, in Lagrange form."""
    log_c = 0.0
    for i, (g_i, u_i) in enumerate(nodes):
        weight = 1.0
        for j, (g_j, _) in enumerate(nodes):
            if j != i:
                weight *= g_j / (g_j - g_i)
        log_c += weight * u_i
    return log_c
