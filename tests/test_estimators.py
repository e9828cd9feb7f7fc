"""Estimators against direct computations and distributions with known moments."""

import math

import numpy as np
import pandas as pd
import pytest

from volume_ray import measure_radii
from volume_ray.basins import quadratic_basin
from volume_ray.estimators import (
    MIN_ESS,
    VOLUME_COLUMNS,
    bootstrap_log_volume,
    laplace_estimate,
    laplace_floor,
    log_volume,
    log_volume_by_count,
    paper_estimate,
    radius_summary,
    typical_estimate,
    volume_table,
    weight_diagnostics,
)


def test_paper_estimate_is_log_mean_power():
    radii = np.array([0.3, 1.2, 0.7, 2.0])
    assert log_volume(radii, 5) == pytest.approx(math.log(np.mean(radii**5)), rel=1e-12)


def test_large_n_is_stable():
    # (0.5**n + 1) / 2 underflows nothing in log space: the estimate is log(1/2)
    assert log_volume([0.5, 1.0], 235_146) == pytest.approx(-math.log(2), rel=1e-12)
    assert log_volume([2.0], 235_146) == pytest.approx(235_146 * math.log(2.0), rel=1e-12)


def test_nan_radii_are_dropped_as_the_paper_drops_them():
    assert log_volume([1.0, math.nan, 2.0], 3) == log_volume([1.0, 2.0], 3)


def test_zero_radii_count_as_zero_volume():
    assert log_volume([0.0, 1.0], 4) == pytest.approx(math.log(0.5))
    assert log_volume([0.0, 0.0], 4) == -math.inf


def test_censored_lower_bound_counts_censored_directions_at_their_bound():
    crossed, bounds = [1.0, 2.0], [3.0]
    got = log_volume(crossed, 2, "censored_lower_bound", censored_radii=bounds)
    assert got == pytest.approx(math.log((1 + 4 + 9) / 3))


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: log_volume([1.0], 0), "n_params"),
        (lambda: log_volume([-1.0], 2), "radii"),
        (lambda: log_volume([math.nan], 2), "no radii"),
        (lambda: log_volume([1.0], 2, "median"), "estimator"),
        (lambda: bootstrap_log_volume([1.0], 2, confidence=1.5), "confidence"),
        (lambda: log_volume_by_count([1.0, 2.0], 2, [3]), "counts"),
        (lambda: log_volume([1.0], 2, "laplace"), "laplace_estimate"),
        (lambda: typical_estimate([math.nan], 2), "no radii"),
        (lambda: laplace_estimate([1.0, 2.0], 2, 0.0), "delta_loss"),
        (lambda: laplace_estimate([], 2, 0.1), "log_det_samples"),
        (lambda: laplace_floor(0.1, 0.0), "radius_cap"),
        (lambda: volume_table(_table(), 3, estimators=["laplace"]), "curvature"),
        (lambda: volume_table(_table(), 3, estimators=["mean"]), "estimators"),
    ],
)
def test_bad_input_names_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_bootstrap_interval_covers_a_known_moment():
    # r = exp(sigma Z): E[r^2] = exp(2 sigma^2), so the true log-volume at n = 2 is 2 sigma^2
    sigma, truth = 0.3, 2 * 0.3**2
    generator = np.random.default_rng(1)
    hits = 0
    for trial in range(200):
        radii = np.exp(sigma * generator.standard_normal(200))
        result = bootstrap_log_volume(radii, 2, num_resamples=400, rng=trial)
        hits += result.ci_low <= truth <= result.ci_high
        assert result.ci_low <= result.estimate <= result.ci_high
    assert 0.88 <= hits / 200 <= 0.99


def test_bootstrap_stderr_matches_the_delta_method():
    radii = np.exp(0.3 * np.random.default_rng(2).standard_normal(5000))
    squares = radii**2
    delta = squares.std(ddof=1) / squares.mean() / math.sqrt(len(radii))
    assert bootstrap_log_volume(radii, 2).stderr == pytest.approx(delta, rel=0.1)


def test_estimate_against_k_uses_the_first_k_directions():
    radii = np.array([1.0, math.nan, 3.0, 0.5])
    got = log_volume_by_count(radii, 2, [1, 2, 3, 4])
    expected = [log_volume(radii[:k], 2) for k in (1, 2, 3, 4)]
    np.testing.assert_allclose(got, expected)


def test_radius_summary():
    assert radius_summary([1.0, math.nan, 3.0, 2.0]) == {
        "mean_radius": 2.0,
        "median_radius": 2.0,
        "max_radius": 3.0,
    }


def _table() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "metric": "loss",
            "threshold": [0.1] * 3 + [0.2] * 3,
            "radius": [1.0, 2.0, math.nan, 1.5, 2.5, 3.0],
            "censored": [False, False, True, False, False, False],
            "coefficient": [0.1, 0.2, 1.0, 0.15, 0.25, 0.3],
            "raw_norm": [10.0] * 6,
        }
    )


def test_volume_table_has_every_estimator_per_threshold():
    estimators = ["paper", "censored_lower_bound", "typical"]
    table = volume_table(_table(), 3, estimators=estimators, num_resamples=100)
    assert list(table.columns) == VOLUME_COLUMNS
    assert len(table) == 6
    low = table[(table.threshold == 0.1)].set_index("estimator")
    assert low.loc["paper", "log_volume"] == pytest.approx(log_volume([1.0, 2.0], 3))
    assert low.loc["censored_lower_bound", "log_volume"] == pytest.approx(
        log_volume([1.0, 2.0, 10.0], 3)
    )
    assert low.loc["typical", "log_volume"] == pytest.approx(3 * np.log([1.0, 2.0, 10.0]).mean())
    assert low.loc["paper", "n_censored"] == 1 and low.loc["paper", "n_directions"] == 3
    assert low.loc["paper", "max_radius"] == 2.0
    # two directions cannot carry a resampling interval; the typical one stands
    assert not low.loc["paper", "ci_valid"] and np.isnan(low.loc["paper", "ci_high"])
    assert low.loc["typical", "ci_valid"] and low.loc["typical", "ess"] == 3
    assert table.floor.isna().all()


def test_default_estimators_are_paper_and_typical():
    assert list(volume_table(_table(), 3).estimator.unique()) == ["paper", "typical"]


def test_weight_diagnostics_against_direct_sums():
    radii = np.array([0.5, 0.9, 1.0, 1.1, 0.0])
    w = radii**7
    ess, top = weight_diagnostics(radii, 7)
    assert ess == pytest.approx(w.sum() ** 2 / (w**2).sum(), rel=1e-12)
    assert top == pytest.approx(w.max() / w.sum(), rel=1e-12)
    assert weight_diagnostics(np.ones(40), 10_000) == pytest.approx((40.0, 1 / 40))


def test_one_direction_carries_the_paper_estimate_at_large_n():
    # 500 radii spread by 5%: at n = 26,122 the largest outweighs the rest together
    radii = 1 + 0.05 * np.random.default_rng(0).standard_normal(500)
    ess, top = weight_diagnostics(radii, 26_122)
    assert ess == pytest.approx(1.0, abs=1e-3) and top == pytest.approx(1.0, abs=1e-3)
    result = paper_estimate(radii, 26_122)
    assert not result.ci_valid and math.isnan(result.ci_low) and math.isnan(result.ci_high)
    assert result.estimate == pytest.approx(26_122 * math.log(radii.max()) - math.log(500))


def test_paper_interval_is_given_once_enough_directions_carry_it():
    radii = np.exp(0.05 * np.random.default_rng(1).standard_normal(400))
    result = paper_estimate(radii, 20)
    assert result.ess >= MIN_ESS and result.ci_valid
    assert result.ci_low < result.estimate < result.ci_high


def test_typical_is_a_lower_bound_on_the_paper_estimate():
    generator = np.random.default_rng(3)
    for _ in range(20):
        radii = generator.uniform(0.1, 2.0, size=50)
        assert log_volume(radii, 30, "typical") <= log_volume(radii, 30)


def test_typical_interval_covers_n_times_the_mean_log_radius():
    # ln r ~ N(mu, sigma): the typical estimate targets n * mu
    n, mu, sigma = 1000, -0.7, 0.2
    generator = np.random.default_rng(4)
    hits = 0
    for _ in range(400):
        result = typical_estimate(np.exp(mu + sigma * generator.standard_normal(30)), n)
        hits += result.ci_low <= n * mu <= result.ci_high
        assert result.ci_valid and result.ess == 30
    assert 0.92 <= hits / 400 <= 0.98


def test_typical_with_a_zero_radius_is_minus_infinity_without_interval():
    result = typical_estimate([0.0, 1.0, 2.0], 5)
    assert result.estimate == -math.inf and not result.ci_valid


def test_laplace_is_the_quadratic_closed_form():
    # one sample of log_det equal to the exact sum of ln(lambda): the estimate is exact
    lambdas, delta, n = np.array([0.5, 2.0, 8.0]), 0.05, 3
    truth = n / 2 * math.log(2 * delta) - 0.5 * np.log(lambdas).sum()
    result = laplace_estimate([np.log(lambdas).sum()] * 4, n, delta)
    assert result.estimate == pytest.approx(truth, rel=1e-12)
    assert result.stderr == 0 and result.ci_valid
    spread = laplace_estimate([1.0, 3.0], n, delta)
    assert spread.stderr == pytest.approx(0.5 * math.sqrt(2) / math.sqrt(2))
    assert spread.ci_low < spread.estimate < spread.ci_high


def test_laplace_interval_widens_by_half_the_quadrature_error():
    plain = laplace_estimate([1.0, 3.0, 2.0], 4, 0.1)
    widened = laplace_estimate([1.0, 3.0, 2.0], 4, 0.1, log_det_error=6.0)
    assert widened.estimate == plain.estimate and widened.stderr == plain.stderr
    assert widened.ci_low == pytest.approx(plain.ci_low - 3.0)
    assert widened.ci_high == pytest.approx(plain.ci_high + 3.0)
    with pytest.raises(ValueError, match="log_det_error"):
        laplace_estimate([1.0, 3.0], 4, 0.1, log_det_error=-1.0)


def test_laplace_floor_puts_the_quadratic_radius_at_the_cap():
    floor = laplace_floor(0.1, 20.0)
    assert math.sqrt(2 * 0.1 / floor) == pytest.approx(20.0)


def test_bootstrap_interval_with_zero_radii_keeps_a_finite_upper_end():
    result = bootstrap_log_volume([0.0, 0.0, 1.0], 3)
    assert result.ci_low == -math.inf
    assert result.ci_high == pytest.approx(0.0)  # all three resampled as 1: log 1
    assert result.estimate == pytest.approx(math.log(1 / 3))


@pytest.mark.parametrize("n", [100, 1000])
def test_on_a_basin_of_known_volume_typical_covers_its_target_and_paper_says_it_is_lost(n):
    basin = quadratic_basin(n, seed=2)
    frame = measure_radii(
        basin.model, basin.x, basin.y, basin.loss_fn, num_directions=200,
        thresholds=(0.1,), max_coefficient=4.0,
    )  # fmt: skip
    assert not frame.censored.any()
    # the typical estimate targets n E[ln r]: computed here from the closed-form radius
    # along many more directions than were walked
    u = np.random.default_rng(0).standard_normal((20_000, n))
    target = n * np.log(basin.radius(u / np.linalg.norm(u, axis=1, keepdims=True), 0.1)).mean()
    typical = typical_estimate(frame.radius, n)
    assert typical.ci_low <= target <= typical.ci_high
    assert typical.estimate < basin.log_volume(0.1)  # Jensen: a lower bound
    paper = paper_estimate(frame.radius, n)
    assert paper.ess < MIN_ESS and not paper.ci_valid  # too few directions carry it
    assert paper.estimate < basin.log_volume(0.1) - 50  # and it is far off
