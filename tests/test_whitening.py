"""Whitening by boundary normals: the fixed point rounds an ellipsoid and a
cross-polytope, given their crossings in closed form."""

import numpy as np
import pytest

import volume_ray.whitening as whitening_module
from volume_ray.whitening import whiten


def ellipsoid(n, decades, seed=0):
    """Crossings of {zᵀHz <= 1}: H with eigenvalues over `decades`, randomly rotated."""
    rng = np.random.default_rng(seed)
    rotation, _ = np.linalg.qr(rng.standard_normal((n, n)))
    hessian = (rotation * np.logspace(0, -decades, n)) @ rotation.T

    def crossings(u):
        radii = 1 / np.sqrt(np.einsum("ij,jk,ik->i", u, hessian, u))
        return radii, (radii[:, None] * u) @ hessian, np.zeros(len(u), bool)

    return hessian, crossings


def condition(matrix):
    values = np.linalg.eigvalsh(matrix)
    return values.max() / values.min()


def test_an_ellipsoid_comes_out_nearly_round_with_unit_determinant():
    hessian, crossings = ellipsoid(30, decades=3)
    a = whiten(crossings, 30, iterations=6, directions=3000, rng=np.random.default_rng(1))
    assert np.linalg.slogdet(a)[1] == pytest.approx(0.0, abs=1e-9)
    assert condition(hessian) == pytest.approx(1e3)
    assert condition(a.T @ hessian @ a) < 1.5


def test_a_cross_polytope_gets_the_inverse_of_its_weights():
    n, weights = 20, np.logspace(0, -2, 20)

    def crossings(u):
        radii = 1 / (np.abs(u) @ weights)
        return radii, weights * np.sign(u), np.zeros(len(u), bool)

    a = whiten(crossings, n, iterations=8, directions=4000, rng=np.random.default_rng(2))
    scales = np.diag(a) * weights  # constant when A = c diag(1/a)
    assert np.abs(a - np.diag(np.diag(a))).max() < 0.05 * np.abs(np.diag(a)).max()
    assert scales.max() / scales.min() < 1.3


def test_past_the_dense_limit_a_diagonal_rounds_an_axis_aligned_ellipsoid(monkeypatch):
    monkeypatch.setattr(whitening_module, "DENSE_LIMIT", 10)
    n, curvatures = 16, np.logspace(0, -2, 16)

    def crossings(u):
        radii = 1 / np.sqrt(np.square(u) @ curvatures)
        return radii, radii[:, None] * u * curvatures, np.zeros(len(u), bool)

    a = whiten(crossings, n, iterations=6, directions=3000, rng=np.random.default_rng(3))
    assert a.shape == (n,) and np.log(a).sum() == pytest.approx(0.0, abs=1e-9)
    rounded = a * a * curvatures
    assert rounded.max() / rounded.min() < 1.3


def test_a_capped_direction_counts_the_caps_own_normal():
    """All directions censored: the cap is a sphere, already round, so A stays I."""

    def crossings(u):
        return np.full(len(u), 5.0), np.full(u.shape, np.nan), np.ones(len(u), bool)

    a = whiten(crossings, 8, iterations=3, directions=2000, rng=np.random.default_rng(4))
    np.testing.assert_allclose(a, np.eye(8), atol=0.15)
