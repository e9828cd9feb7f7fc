"""Basins of known volume: the claimed Hessian, radii that `measure_radii` reproduces,
and closed-form log-volumes checked by Monte Carlo and by an ellipse's area."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from volume_ray import measure_radii
from volume_ray.basins import Basin, cross_polytope_basin, quadratic_basin
from volume_ray.directions import perturbed_parameters, raw_directions

SEED = 1  # direction seed for measure_radii
MC_DIRECTIONS = 200_000
MC_SIGMAS = 4.0  # Monte Carlo tolerance in standard errors


def test_quadratic_hessian_is_the_claimed_one_against_autograd():
    basin = quadratic_basin(100, decades=4.0, seed=3)
    x, y = basin.x.double(), basin.y.double()
    w_star = basin.model.weight.detach().double().reshape(-1)

    def mean_loss(w: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(x @ w[:, None], y)

    hessian = torch.autograd.functional.hessian(mean_loss, w_star)  # (n, n)
    found = torch.linalg.eigvalsh(hessian).numpy()
    np.testing.assert_allclose(found, basin.eigenvalues, rtol=1e-5)
    assert basin.eigenvalues.max() == pytest.approx(2.0)
    assert basin.eigenvalues.min() == pytest.approx(2e-4)


def test_quadratic_eigenvalues_at_n_1000_and_the_minimum():
    basin = quadratic_basin(1000, decades=3.0, scale=0.5, seed=0)
    x = basin.x.double()
    # X X^T / N = diag(mu) says X = sqrt(N) diag(sqrt(mu)) V with V orthogonal, so the
    # Hessian 2 X^T X / N = V^T diag(2 mu) V has eigenvalues 2 mu: one product, no eigvalsh.
    rows = x @ x.T / len(x)
    mu = rows.diagonal()
    np.testing.assert_allclose(np.sort(2 * mu.numpy()), basin.eigenvalues, rtol=1e-5)
    # relative eigenvalue error <= |V V^T - I|_2 <= |V V^T - I|_F, V's rows normalised
    gram = rows / torch.outer(mu.sqrt(), mu.sqrt())
    assert torch.linalg.matrix_norm(gram - torch.eye(len(x), dtype=x.dtype)).item() < 1e-5
    assert basin.base_loss == 0.0
    assert basin.model.weight.norm().item() == pytest.approx(1.0, abs=1e-6)  # f = 1
    assert basin.n_params == 1000 and basin.x.dtype == torch.float32


def test_builders_are_seeded():
    a, b = quadratic_basin(20, seed=5), quadratic_basin(20, seed=5)
    assert torch.equal(a.x, b.x) and torch.equal(a.model.weight, b.model.weight)
    assert not torch.equal(a.x, quadratic_basin(20, seed=6).x)
    c = cross_polytope_basin(20, seed=5, dtype=torch.float64)
    assert c.x.dtype == torch.float64 and c.base_loss == 0.0 and c.eigenvalues is None


def _measured_against_closed_form(basin: Basin, threshold: float) -> np.ndarray:
    """Radii of `measure_radii` over 20 directions, checked against `basin.radius`;
    returns the evaluations each direction needed."""
    params = perturbed_parameters(basin.model)
    raw = raw_directions(params, SEED, range(20)).double().numpy()  # (20, n)
    norms = np.linalg.norm(raw, axis=1)
    expected = basin.radius(raw / norms[:, None], threshold)
    coefficient_cap = 4.0 * float((expected / norms).max())  # c = r / |g| when f = 1
    df = measure_radii(
        basin.model, basin.x, basin.y, basin.loss_fn, num_directions=20, seed=SEED,
        thresholds=(threshold,), filter_norm="paper", max_coefficient=coefficient_cap,
    )  # fmt: skip
    assert not df["censored"].any()
    assert df["direction"].tolist() == list(range(20))
    np.testing.assert_allclose(df["raw_norm"], norms, rtol=1e-5)
    np.testing.assert_allclose(df["radius"], expected, rtol=1e-3)
    return df["evals"].to_numpy()


@pytest.mark.parametrize("n", [100, 1000])
def test_quadratic_radius_matches_measure_radii(n):
    evals = _measured_against_closed_form(quadratic_basin(n, seed=2), threshold=0.01)
    assert evals.max() < 60


def test_cross_polytope_radius_matches_measure_radii():
    evals = _measured_against_closed_form(cross_polytope_basin(100, seed=2), threshold=0.05)
    assert evals.max() < 60


@pytest.mark.parametrize("build", [quadratic_basin, cross_polytope_basin])
def test_the_indexed_layout_is_the_same_basin_at_o_n_a_sample(build):
    """Rows (i, a_i) looked up give the losses of x = diag(a) through nn.Linear; for the
    ellipsoid, the unrotated one, whose closed-form radius the measured radii match."""
    indexed = build(300, seed=2, layout="indexed")
    assert indexed.x.shape == (300, 2) and indexed.n_params == 300
    _measured_against_closed_form(indexed, threshold=0.05)
    rows = indexed.x[:, 1]
    dense = nn.Linear(300, 1, bias=False)
    with torch.no_grad():
        dense.weight.copy_(indexed.model.weight)
        z = torch.randn(300, generator=torch.Generator().manual_seed(0)) * 0.1
        indexed.model.weight.add_(z)
        dense.weight.add_(z)
        losses = indexed.loss_fn(indexed.model(indexed.x), indexed.y)
        expected = indexed.loss_fn(dense(torch.diag(rows)), indexed.y)
    assert losses.item() == pytest.approx(expected.item(), rel=1e-5)
    if build is quadratic_basin:
        np.testing.assert_allclose(np.sort(2 * rows.double().numpy() ** 2 / 300),
                                   indexed.eigenvalues, rtol=1e-5)  # fmt: skip


def _monte_carlo_log_volume(basin: Basin, threshold: float) -> tuple[float, float]:
    """log mean r(u)^n over uniform unit u, and its standard error (delta method)."""
    rng = np.random.default_rng(0)
    g = rng.standard_normal((MC_DIRECTIONS, basin.n_params))
    powers = basin.radius(g / np.linalg.norm(g, axis=1, keepdims=True), threshold)
    powers = powers**basin.n_params
    mean = powers.mean()
    return math.log(mean), powers.std(ddof=1) / math.sqrt(len(powers)) / mean


@pytest.mark.parametrize(
    "build",
    [
        lambda: quadratic_basin(3, decades=2.0, seed=1),
        lambda: quadratic_basin(5, decades=1.0, scale=3.0, seed=2),
        lambda: cross_polytope_basin(3, decades=1.0, seed=1),
        lambda: cross_polytope_basin(5, decades=0.5, scale=3.0, seed=2),
    ],
    ids=["quadratic-3", "quadratic-5", "cross-polytope-3", "cross-polytope-5"],
)
def test_log_volume_matches_monte_carlo(build):
    basin = build()
    threshold = 0.2
    estimate, stderr = _monte_carlo_log_volume(basin, threshold)
    assert stderr < 0.02  # a tight check: a wrong constant of a few percent is caught
    assert abs(estimate - basin.log_volume(threshold)) < MC_SIGMAS * stderr


def test_log_volume_at_n_2_is_the_ellipse_area_over_pi():
    basin = quadratic_basin(2, decades=1.5, scale=2.0, seed=4)
    threshold = 0.3
    lam1, lam2 = basin.eigenvalues
    area = math.pi * (2 * threshold) / math.sqrt(lam1 * lam2)  # {z^T H z / 2 <= dL}
    assert basin.log_volume(threshold) == pytest.approx(math.log(area / math.pi), rel=1e-12)


def test_cross_polytope_at_n_1_is_an_interval():
    basin = cross_polytope_basin(1, scale=0.25)  # {0.25 |z| <= T}: length 2T / 0.25
    assert basin.log_volume(0.1) == pytest.approx(math.log(2 * 0.1 / 0.25 / 2))
    assert basin.radius(np.array([[-1.0]]), 0.1) == pytest.approx([0.4])


@pytest.mark.parametrize(
    ("call", "name"),
    [
        (lambda: quadratic_basin(0), "n"),
        (lambda: quadratic_basin(2.0), "n"),
        (lambda: cross_polytope_basin(True), "n"),
        (lambda: quadratic_basin(3, decades=-1.0), "decades"),
        (lambda: cross_polytope_basin(3, decades=math.nan), "decades"),
        (lambda: quadratic_basin(3, scale=0.0), "scale"),
        (lambda: quadratic_basin(3, seed=-1), "seed"),
        (lambda: cross_polytope_basin(3, dtype=torch.int64), "dtype"),
        (lambda: cross_polytope_basin(3, layout="sparse"), "layout"),
        (lambda: quadratic_basin(3, layout="sparse"), "layout"),
        (lambda: quadratic_basin(3).log_volume(0.0), "threshold"),
        (lambda: cross_polytope_basin(3).log_volume(math.inf), "threshold"),
        (lambda: quadratic_basin(3).radius(np.eye(3), -1.0), "threshold"),
        (lambda: quadratic_basin(3).radius(np.ones((2, 3)), 0.1), "unit_directions"),
        (lambda: cross_polytope_basin(3).radius(np.eye(4), 0.1), "unit_directions"),
    ],
)
def test_bad_input_names_the_argument(call, name):
    with pytest.raises(ValueError, match=rf"^{name} "):
        call()


def test_builders_leave_the_global_rng_alone():
    state = torch.get_rng_state()
    quadratic_basin(4)
    cross_polytope_basin(4)
    assert torch.equal(torch.get_rng_state(), state)
