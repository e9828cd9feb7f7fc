"""The thermodynamic volume against basins of known volume, with the real radius search
and loss gradients, and its refusals of bad input."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from volume_ray.basins import cross_polytope_basin, quadratic_basin
from volume_ray.polar import UNIFORM
from volume_ray.search import DEFAULT_RTOL
from volume_ray.thermodynamic import LAG_FACTOR, QUANTILE, thermodynamic_log_volume

THRESHOLD = 0.1
# Budgets below the default, so that the suite stays short; the targets still hold at
# them. The n = 100 ellipsoid and benchmarks/bench_estimators.py run the default.
SMALL_BUDGET = {"chains": 32, "steps": 10, "whitening_directions": 1000}
N1000_BUDGET = {"chains": 64, "steps": 10, "whitening_directions": 4000}


def cap_above(basin):
    """max_coefficient whose cap, max_coefficient·√n, lies past the basin's longest
    radius, so that B is the whole basin and its closed form holds."""
    gap, n = THRESHOLD - basin.base_loss, basin.n_params
    return 1.5 * math.sqrt(2 * gap / basin.eigenvalues.min()) / math.sqrt(n)


def measured(basin, **kwargs):
    return thermodynamic_log_volume(
        basin.model, basin.x, basin.y, basin.loss_fn, threshold=THRESHOLD,
        max_coefficient=cap_above(basin), **kwargs,
    )  # fmt: skip


def test_the_volume_of_an_ellipsoid_at_n_100_is_within_3_nats_and_covered():
    """Eigenvalues over 4 decades."""
    basin = quadratic_basin(100, seed=0)
    truth = basin.log_volume(THRESHOLD)
    result = measured(basin, seed=1)
    assert abs(result.estimate - truth) <= 3
    assert result.ci_valid and result.ci_low <= truth <= result.ci_high
    # the cross-checks along the same ladder
    assert abs(result.sequential_monte_carlo - truth) <= 3
    if len(result.ladder) > 2:  # TI needs a restraint between the ends to integrate over
        assert abs(result.thermodynamic_integration - truth) <= 5
    else:
        assert math.isnan(result.thermodynamic_integration)
    assert result.ladder[0] == UNIFORM and result.ladder[-1] == 0
    assert len(result.acceptance) == len(result.ladder) == len(result.effective_samples)
    assert np.all(result.acceptance[1:] > 0.2) and np.all(result.inefficiency >= 1)
    assert result.loss_evaluations > result.radius_searches > 0
    # the interval: the standard error, the drift between the kept halves, the radii's rtol
    assert abs(QUANTILE - 3.182446305284263) < 1e-9  # Student's t, 3 degrees of freedom
    half_width = QUANTILE * result.stderr + LAG_FACTOR * abs(result.drift) + 100 * DEFAULT_RTOL
    assert result.ci_high - result.estimate == pytest.approx(half_width)
    assert result.estimate - result.ci_low == pytest.approx(half_width)


def test_the_volume_of_a_cross_polytope_at_n_100_is_within_3_nats_and_covered():
    """Not quadratic: weights over 4 decades, kinks at every coordinate plane."""
    basin = cross_polytope_basin(100, seed=0, layout="indexed")
    truth = basin.log_volume(THRESHOLD)
    longest = 100 * (THRESHOLD - basin.base_loss) / basin.weights.min()  # along e_i
    result = thermodynamic_log_volume(
        basin.model, basin.x, basin.y, basin.loss_fn, threshold=THRESHOLD,
        max_coefficient=1.5 * longest / 10, seed=0, **SMALL_BUDGET,
    )  # fmt: skip
    assert abs(result.estimate - truth) <= 3
    assert result.ci_valid and result.ci_low <= truth <= result.ci_high
    assert abs(result.sequential_monte_carlo - truth) <= 3


def test_the_volume_of_an_ellipsoid_at_n_1000_is_within_5_nats_and_covered():
    basin = quadratic_basin(1000, seed=0)
    truth = basin.log_volume(THRESHOLD)
    result = measured(basin, seed=2, **N1000_BUDGET)
    assert abs(result.estimate - truth) <= 5
    assert result.ci_valid and result.ci_low <= truth <= result.ci_high
    assert abs(result.sequential_monte_carlo - truth) <= 5


def test_a_ball_is_measured_exactly():
    """decades = 0: every direction has the same radius, the ladder goes straight to 0."""
    basin = quadratic_basin(50, decades=0.0, seed=2)
    result = measured(basin, chains=8, steps=4, whitening_directions=500)
    assert result.estimate == pytest.approx(basin.log_volume(THRESHOLD), abs=0.01)
    assert list(result.ladder) == [UNIFORM, 0.0]


def test_a_fixed_ladder_has_the_rungs_asked_for():
    basin = quadratic_basin(40, seed=3)
    result = measured(basin, rungs=5, chains=16, steps=10, whitening_directions=500)
    assert len(result.ladder) == 5 and result.ladder[0] == UNIFORM and result.ladder[-1] == 0
    assert np.all(np.diff(result.ladder[1:]) < 0)
    assert abs(result.estimate - basin.log_volume(THRESHOLD)) <= 3


def test_the_callers_model_is_left_as_it_was():
    basin = quadratic_basin(30, seed=4)
    basin.model.train()
    before = basin.model.weight.detach().clone()
    measured(basin, chains=8, steps=4, whitening_directions=500)
    assert torch.equal(basin.model.weight, before) and basin.model.training


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"threshold": 0.0}, "threshold must lie above the loss at the trained weights"),
        ({"rungs": 1}, "rungs must be None or an integer >= 2"),
        ({"chains": 0}, "chains must be None or an integer >= 4"),
        ({"steps": 1}, "steps must be None or an integer >= 2"),
        ({"threshold": math.nan}, "threshold must be a finite number"),
        ({"filter_norm": "li2018"}, "no fixed coordinate scale"),
    ],
)
def test_bad_arguments_are_named(kwargs, match):
    basin = quadratic_basin(10, seed=5)
    arguments = {"threshold": THRESHOLD, **kwargs}
    with pytest.raises(ValueError, match=match):
        thermodynamic_log_volume(basin.model, basin.x, basin.y, basin.loss_fn, **arguments)


def test_a_basin_with_a_non_finite_loss_inside_is_refused():
    """The loss turns NaN past half the basin's smallest radius: inside B."""
    basin = quadratic_basin(10, decades=0.0, seed=6)
    radius = math.sqrt(2 * THRESHOLD / basin.eigenvalues.min())
    w_star = basin.model.weight.detach().clone()

    class Guarded(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = basin.model

        def forward(self, x):
            out = self.inner(x)
            far = (self.inner.weight - w_star).norm() > radius / 2
            return torch.where(far, torch.full_like(out, math.nan), out)

    with pytest.raises(ValueError, match="non-finite loss inside the basin"):
        thermodynamic_log_volume(
            Guarded(), basin.x, basin.y, F.mse_loss, threshold=THRESHOLD, chains=4, steps=2
        )
