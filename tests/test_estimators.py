"""Estimators against direct computations and distributions with known moments."""

import math

import numpy as np
import pandas as pd
import pytest

from volume_ray.estimators import (
    VOLUME_COLUMNS,
    bootstrap_log_volume,
    log_volume,
    log_volume_by_count,
    radius_summary,
    volume_table,
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


def test_volume_table_has_every_estimator_per_threshold():
    radii = pd.DataFrame(
        {
            "metric": "loss",
            "threshold": [0.1] * 3 + [0.2] * 3,
            "radius": [1.0, 2.0, math.nan, 1.5, 2.5, 3.0],
            "censored": [False, False, True, False, False, False],
            "coefficient": [0.1, 0.2, 1.0, 0.15, 0.25, 0.3],
            "raw_norm": [10.0] * 6,
        }
    )
    table = volume_table(radii, 3, num_resamples=100)
    assert list(table.columns) == VOLUME_COLUMNS
    assert len(table) == 4
    low = table[(table.threshold == 0.1)].set_index("estimator")
    assert low.loc["paper", "log_volume"] == pytest.approx(log_volume([1.0, 2.0], 3))
    assert low.loc["censored_lower_bound", "log_volume"] == pytest.approx(
        log_volume([1.0, 2.0, 10.0], 3)
    )
    assert low.loc["paper", "n_censored"] == 1 and low.loc["paper", "n_directions"] == 3
    assert low.loc["paper", "max_radius"] == 2.0


def test_bootstrap_interval_with_zero_radii_keeps_a_finite_upper_end():
    result = bootstrap_log_volume([0.0, 0.0, 1.0], 3)
    assert result.ci_low == -math.inf
    assert result.ci_high == pytest.approx(0.0)  # all three resampled as 1: log 1
    assert result.estimate == pytest.approx(math.log(1 / 3))
