"""Searches on plain functions whose crossings are known (no network involved)."""

import math

import numpy as np
import pytest
import torch

from volume_ray.search import BracketSearch, GridSearch, Hint, paper_grid
from volume_ray.surrogate import OutputSurrogate


def drive(search, f):
    """Score every proposal exactly with f; return the crossings and the evaluations."""
    evals = 0
    while (proposal := search.propose()) is not None:
        value = f(proposal.coefficient)
        search.record(proposal.coefficient, value, value)
        evals += 1
    return search.crossings(), evals


# (name, f, level, first crossing of f past level)
CATALOGUE = [
    ("bowl", lambda c: 1 + 3 * c**2, 1.5, math.sqrt(0.5 / 3)),
    ("quintic", lambda c: 0.01 + c**5, 0.02, 0.01 ** (1 / 5)),
    ("exponential", lambda c: math.exp(8 * c), 5.0, math.log(5.0) / 8),
    ("steep_polynomial", lambda c: 1e-3 + 10 * c**2 + 1e3 * c**8, 0.1, None),
    ("sigmoid", lambda c: 1 / (1 + math.exp(-(c - 0.3) / 0.01)), 0.5, 0.3),
    ("kink", lambda c: 0.1 + (0.2 * c if c < 0.5 else 0.1 + 5 * (c - 0.5)), 1.0, 0.66),
    ("dip_below_base", lambda c: 1 - c + 3 * c**2, 2.0, (1 + math.sqrt(13)) / 6),
]


def _root(f, level, hi=1.0):
    """Reference crossing by plain bisection on a monotone stretch (to 1e-15)."""
    lo = 0.0
    while hi - lo > 1e-15:
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if f(mid) > level else (mid, hi)
    return hi


@pytest.mark.parametrize("rtol", [1e-4, 1e-8])
@pytest.mark.parametrize("name,f,level,root", CATALOGUE, ids=[c[0] for c in CATALOGUE])
def test_bracket_search_finds_the_crossing_to_rtol(name, f, level, root, rtol):
    root = root if root is not None else _root(f, level)
    (crossing,), evals = drive(BracketSearch([level], f(0.0), rtol=rtol), f)
    assert not crossing.censored and not crossing.nonfinite
    # the answer is a point past the level, at most rtol above the true crossing
    assert root * (1 - 1e-12) <= crossing.coefficient <= root / (1 - rtol)
    assert f(crossing.coefficient) > level
    assert evals <= (16 if rtol == 1e-4 else 24)


def test_smooth_bowl_converges_superlinearly():
    f = CATALOGUE[0][1]
    _, evals = drive(BracketSearch([1.5], f(0.0), rtol=1e-8), f)
    assert evals <= 5  # log-log interpolation is exact on a bowl


def test_a_good_hint_saves_evaluations():
    _, f, level, root = CATALOGUE[4]  # sigmoid: a cold start needs many steps
    _, cold = drive(BracketSearch([level], f(0.0)), f)
    (crossing,), warm = drive(BracketSearch([level], f(0.0), hints=[Hint(root * 1.05, 3.0)]), f)
    assert warm < cold
    assert root <= crossing.coefficient <= root / (1 - 1e-4)


def test_levels_share_points_and_each_is_right():
    f = CATALOGUE[2][1]
    levels = [2.0, 5.0, 3.0]
    crossings, evals = drive(BracketSearch(levels, f(0.0), rtol=1e-6), f)
    for level, crossing in zip(levels, crossings):
        root = math.log(level) / 8
        assert root <= crossing.coefficient <= root / (1 - 1e-6)
    _, alone = drive(BracketSearch([5.0], f(0.0), rtol=1e-6), f)
    assert evals < 3 * alone


def test_bisection_finds_a_step():
    def f(c):
        return math.floor(c * 100) / 100

    (crossing,), _ = drive(BracketSearch([0.305], 0.0, rtol=1e-6), f)
    assert 0.31 <= crossing.coefficient <= 0.31 / (1 - 1e-6)


def test_never_crossing_is_censored_at_max_coefficient():
    (crossing,), _ = drive(BracketSearch([10.0], 1.0, max_coefficient=0.5), lambda c: 1 + c)
    assert crossing.censored
    assert crossing.coefficient == 0.5


def test_base_past_the_level_gives_zero_without_evaluating():
    crossings, evals = drive(BracketSearch([0.5], 1.0), lambda c: 1 + c)
    assert crossings[0].coefficient == 0 and not crossings[0].censored
    assert evals == 0


def test_nan_counts_as_past_every_level_and_is_flagged():
    def f(c):
        return math.nan if c > 0.4 else 1 + c

    (crossing,), _ = drive(BracketSearch([100.0], 1.0), f)
    assert crossing.nonfinite and not crossing.censored
    assert 0.4 < crossing.coefficient <= 0.4 / (1 - 1e-4)


def test_a_lower_bound_past_the_level_counts_as_past():
    search = BracketSearch([1.0], 0.0, rtol=1e-3)
    while (proposal := search.propose()) is not None:
        c = proposal.coefficient
        if c > 0.2:
            search.record(c, proposal.stop_above + 1, math.inf)  # stopped early
        else:
            search.record(c, c, c)
    (crossing,) = search.crossings()
    assert 0.2 < crossing.coefficient <= 0.2 / (1 - 1e-3)


def test_grid_search_takes_the_first_grid_point_past_each_level():
    grid = paper_grid()
    f = CATALOGUE[1][1]
    levels = [0.02, 0.5, 5.0]
    search = GridSearch(levels, f(0.0), grid)
    crossings, evals = drive(search, f)
    values = np.array([f(c) for c in grid])
    for level, crossing in zip(levels[:2], crossings):
        assert crossing.coefficient == grid[np.argmax(values > level)]
    assert crossings[2].censored and crossings[2].coefficient == grid[-1]
    assert evals == len(grid) - 1  # c = 0 is the base, never rescored


def test_grid_search_stops_once_every_level_crossed():
    f = CATALOGUE[1][1]
    _, evals = drive(GridSearch([0.02], f(0.0), paper_grid()), f)
    values = np.array([f(c) for c in paper_grid()])
    assert evals == np.argmax(values > 0.02)


def test_full_curve_keeps_every_value():
    grid = np.array([0.0, 0.1, 0.2, 0.4])
    search = GridSearch([0.01], 0.0, grid, full_curve=True)
    drive(search, lambda c: c)
    assert search.curve == [0.0, 0.1, 0.2, 0.4]


# -- adversarial walks: every search ends, in a bounded number of evaluations -------------


def _bump(c):
    """A bump to 0.9 at c = 0.1 that misleads extrapolation, then a crossing near 0.82."""
    return 0.9 * math.exp(-(((c - 0.1) / 0.03) ** 2)) + (c / 0.82) ** 4


ADVERSARIAL = [
    ("plateau_at_the_level", lambda c: min(20 * c**2, 1.0) if c < 0.6 else 1 + (c - 0.6), 0.6),
    ("plateau_just_below", lambda c: min(20 * c**2, 0.999) if c < 0.6 else 1 + (c - 0.6), 0.6),
    ("misleading_bump", _bump, None),
    ("crossing_at_1e-9", lambda c: 0.5 if c <= 1e-9 else math.nan, 1e-9),
]


@pytest.mark.parametrize("rtol", [1e-4, 1e-12])
@pytest.mark.parametrize("name,f,root", ADVERSARIAL, ids=[a[0] for a in ADVERSARIAL])
def test_adversarial_walks_end_quickly_and_right(name, f, root, rtol):
    root = (
        root if root is not None else _root(f, 1.0, hi=0.9) if name != "misleading_bump" else None
    )
    (crossing,), evals = drive(BracketSearch([1.0], f(0.0), rtol=rtol), f)
    assert evals <= 120
    assert not crossing.censored
    assert f(crossing.coefficient) > 1.0 or math.isnan(f(crossing.coefficient))
    if root is not None:
        assert root * (1 - 1e-12) <= crossing.coefficient <= root / (1 - rtol) + 1e-15


def test_a_walk_that_oscillates_below_the_level_is_censored_in_bounded_steps():
    def f(c):
        return 0.5 + 0.49 * math.sin(200 * c)

    (crossing,), evals = drive(BracketSearch([1.0], f(0.0), rtol=1e-12), f)
    assert crossing.censored and crossing.coefficient == 1.0
    assert evals <= 40


def test_a_crossing_at_zero_plus_stops_at_xtol():
    (crossing,), evals = drive(BracketSearch([1.0], 1.0), lambda c: 1.0 + c)
    assert 0 < crossing.coefficient <= 1e-12 and evals <= 40


@pytest.mark.parametrize("max_coefficient", [1e-3, 1.0, 1e6, 1e14])
def test_far_search_bounds_still_find_the_crossing(max_coefficient):
    root = 0.6 * min(max_coefficient, 1.0) ** 1.5  # inside [0, max_coefficient]
    f = lambda c: 1 + (c / root) ** 2  # noqa: E731
    (crossing,), evals = drive(BracketSearch([2.0], 1.0, max_coefficient=max_coefficient), f)
    assert root <= crossing.coefficient <= root / (1 - 1e-4)
    assert evals <= 60


def test_a_point_inside_a_bracket_drops_the_stop_bounds_it_cannot_reach():
    def f(c):  # monotone; level 10 is crossed at c = 0.0949
        return 1.0 + 1000.0 * c * c

    search, seen, one_pass = BracketSearch([10.0], f(0.0)), [], 0
    while (proposal := search.propose()) is not None:
        c = proposal.coefficient
        # a bound that a scored point shows f(c) cannot reach is always dropped
        if any(p > c and 10.0 < f(p) <= 40.0 for p in seen):
            assert proposal.stop_above == math.inf
        if any(p < c and 2.5 < f(p) <= 10.0 for p in seen):
            assert proposal.stop_below == -math.inf
        one_pass += proposal.stop_above == math.inf and proposal.stop_below == -math.inf
        search.record(c, f(c), f(c))
        seen.append(c)
    assert one_pass >= 1  # the refinement steps are scored without early exit


def test_a_blind_step_keeps_its_stop_bounds_and_an_aimed_one_drops_them():
    blind = BracketSearch([10.0], 1.0)  # no hint: the slope of a bowl is a guess
    blind.record(0.0625, 1.5, 1.5)  # below the level and below level/4
    proposal = blind.propose()
    assert proposal.stop_above == 40.0 and proposal.stop_below == 2.5
    hinted = BracketSearch([10.0], 1.0, hints=[Hint(0.1, 2.0)])
    first = hinted.propose()  # the hint's crossing: expected near the level
    assert first.coefficient == 0.1
    assert first.stop_above == math.inf and first.stop_below == -math.inf
    hinted.record(0.1, 4.0, 4.0)
    assert hinted.propose().stop_above == math.inf  # the hint's slope aims it too


def test_a_one_sided_step_follows_an_estimate_within_a_bracket_width():
    # A power law a little shallower than the hinted slope: the second point lands
    # 3.5e-5 below the crossing, and the third, one bracket width above it, closes
    # the bracket. The least step grows only where it overrules the estimate; were it
    # to grow at every one-sided step, the third point would overshoot 4x as far.
    root = 0.05
    f = lambda c: 100.0 * (c / root) ** 1.9999  # noqa: E731
    search = BracketSearch([100.0], 0.0, rtol=1e-4, hints=[Hint(root / 2, 2.0)])
    (crossing,), evals = drive(search, f)
    assert evals == 3
    assert root <= crossing.coefficient <= root / (1 - 1e-4)


def _outputs_walk(c):
    """A walk whose outputs are two samples' logits, quadratic in c, with a summed loss
    of 1 - the probability of class 0: the sum is no power law in c, but the
    surrogate, which interpolates the outputs, is exact on it."""
    return torch.tensor([[4.0 - 9 * c - 30 * c**2, 0.0], [5.0 + 3 * c - 80 * c**2, 0.0]])


def _mean_loss(logits, _targets):
    return (1 - torch.sigmoid(logits[:, 0] - logits[:, 1])).mean()


TARGETS = torch.zeros(2, dtype=torch.long)


def _outputs_loss(logits):
    return _mean_loss(logits, TARGETS).item() * 2


def _drive_with_outputs(search, surrogate=None):
    """Score the search's proposals on the walk, each point's outputs to `surrogate`."""
    evals = 0
    while (proposal := search.propose()) is not None:
        c = proposal.coefficient
        logits = _outputs_walk(c)
        value = _outputs_loss(logits)
        search.record(c, value, value)
        if surrogate is not None:
            surrogate.record(c, value, logits)
        evals += 1
    return search.crossings(), evals


def test_a_surrogate_from_outputs_saves_evaluations():
    f = lambda c: _outputs_loss(_outputs_walk(c))  # noqa: E731
    evals = {False: [], True: []}
    for level in (0.05, 0.2, 0.6, 1.0):
        root = _root(f, level)
        hint = [Hint(root * 1.12, 4.0)]  # a typical first probe: 12% off, slope approximate
        for with_surrogate in evals:
            surrogate = OutputSurrogate(_outputs_walk(0.0), _mean_loss, TARGETS)
            search = BracketSearch(
                [level], f(0.0), rtol=1e-4, hints=hint,
                surrogate=surrogate if with_surrogate else None,
            )  # fmt: skip
            (crossing,), count = _drive_with_outputs(search, surrogate)
            assert root <= crossing.coefficient <= root / (1 - 1e-4)
            evals[with_surrogate].append(count)
    # first probe, one step, then the third point lands within a bracket width
    assert evals[True] == [4, 4, 4, 4]
    assert sum(evals[False]) > 16


@pytest.mark.parametrize("wrong", [lambda c: 1e6, lambda c: math.nan, lambda c: None])
def test_a_misleading_surrogate_cannot_spoil_the_answer(wrong):
    f = lambda c: _outputs_loss(_outputs_walk(c))  # noqa: E731
    root = _root(f, 0.2)
    search = BracketSearch([0.2], f(0.0), rtol=1e-4, hints=[Hint(root * 0.9, 4.0)], surrogate=wrong)
    (crossing,), evals = _drive_with_outputs(search)
    assert root <= crossing.coefficient <= root / (1 - 1e-4)
    assert evals <= 16
