"""The radius integrated out exactly: incomplete-gamma pieces against mpmath and
against straightforward numerical integration."""

import math

import mpmath
import numpy as np
import pytest
from scipy import integrate, stats

from volume_ray.polar import (
    UNIFORM,
    draw_radii,
    log_gamma_cdf,
    log_weight_slope,
    mean_square_radius,
    rung_potentials,
)


@pytest.mark.parametrize("a", [0.5, 5.0, 50.0, 500.0, 5000.0])
@pytest.mark.parametrize("fraction", [1e-4, 0.1, 0.5, 0.9, 1.0, 1.5, 3.0])
def test_log_gamma_cdf_matches_mpmath_where_p_underflows_too(a, fraction):
    x = fraction * a
    expected = float(mpmath.log(mpmath.gammainc(a, 0, x, regularized=True)))
    assert log_gamma_cdf(a, np.array([x]))[0] == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_log_gamma_cdf_of_zero_is_minus_infinity():
    assert log_gamma_cdf(3.0, np.array([0.0]))[0] == -math.inf


def test_rung_potentials_at_the_ends_of_the_ladder():
    radii = np.array([0.5, 1.0, 2.0])
    np.testing.assert_array_equal(rung_potentials(UNIFORM, radii, 7), 0.0)
    np.testing.assert_allclose(rung_potentials(0.0, radii, 7), -7 * np.log(radii))
    np.testing.assert_allclose(
        rung_potentials(1.3, radii, 7), -log_gamma_cdf(3.5, 1.3 * radii**2 / 2)
    )


@pytest.mark.parametrize("k", [0.0, 0.01, 1.0, 40.0])
def test_log_weight_slope_is_the_derivative_of_the_log_weight(k):
    radii, step = np.array([0.3, 1.0, 2.5]), 1e-6
    up = -rung_potentials(k, radii * math.exp(step), 12)
    down = -rung_potentials(k, radii * math.exp(-step), 12)
    slope = log_weight_slope(k, radii, 12)
    np.testing.assert_allclose(slope, (up - down) / (2 * step), rtol=1e-5, atol=1e-8)
    np.testing.assert_array_equal(log_weight_slope(UNIFORM, radii, 12), 0.0)


@pytest.mark.parametrize("k", [0.0, 0.2, 5.0])
def test_radial_draws_follow_the_restrained_law_inside_the_radius(k):
    n, r = 8, 1.7
    draws = draw_radii(k, np.full(20_000, r), n, np.random.default_rng(0))
    assert draws.max() <= r
    density = lambda rho: rho ** (n - 1) * math.exp(-k * rho * rho / 2)  # noqa: E731
    total = integrate.quad(density, 0, r)[0]
    cdf = np.vectorize(lambda s: integrate.quad(density, 0, min(s, r))[0] / total)
    assert stats.kstest(draws, cdf).pvalue > 1e-3


@pytest.mark.parametrize("k", [0.0, 0.7, 9.0])
def test_mean_square_radius_equals_the_integral(k):
    n, r = 6, 1.9
    density = lambda rho: rho ** (n - 1) * math.exp(-k * rho * rho / 2)  # noqa: E731
    expected = (
        integrate.quad(lambda rho: rho * rho * density(rho), 0, r)[0]
        / integrate.quad(density, 0, r)[0]
    )
    assert mean_square_radius(k, np.array([r]), n)[0] == pytest.approx(expected, rel=1e-8)


def test_the_uniform_rung_has_no_radial_law():
    with pytest.raises(ValueError, match="no radial law"):
        draw_radii(UNIFORM, np.ones(2), 3, np.random.default_rng(0))
