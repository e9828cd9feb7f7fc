"""The radius integrated out exactly: what a ladder of harmonic restraints needs to know
of a basin's points given their direction.

In the radii's coordinates z = ρu, the restrained law p_k(z) ∝ exp(-k|z|²/2) on the
basin B = {ρu : ρ <= r(u)} has, given the direction u, the radial density
∝ ρ^(n-1) exp(-kρ²/2) on [0, r(u)], and the direction's own law, relative to the
uniform one on the sphere, ∝ P(n/2, k r(u)²/2), with P the regularised lower
incomplete gamma function (∝ r(u)^n at k = 0). So a rung's state is a direction, its
weight depends on r(u) alone, and Z(k) = (2π/k)^(n/2) E_u[P(n/2, k r²/2)] while
Z(0) = Vol(B) = V_n(1) E_u[r^n] (docs/thermodynamic.md). Pure numpy and scipy.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import special

__all__ = [
    "UNIFORM",
    "draw_radii",
    "log_gamma_cdf",
    "log_weight_slope",
    "mean_square_radius",
    "rung_potentials",
]

UNIFORM = math.inf  # the rung whose directions are uniform: no restraint reaches B's edge
SMALLEST_P = 1e-280  # below this, ln P comes from its series, as P itself underflows
SERIES_TERMS = 100_000  # the series' terms shrink geometrically; this bounds the loop


def log_gamma_cdf(a: float, x: np.ndarray) -> np.ndarray:
    """ln P(a, x), the regularised lower incomplete gamma function, for x >= 0: exact
    where P underflows too (x far below a), from P = x^a e^-x / Γ(a+1) Σ_j x^j /
    ((a+1)...(a+j)), whose terms shrink by x/(a+j) < 1 there."""
    x = np.asarray(x, dtype=np.float64)
    p = special.gammainc(a, x)
    out = np.full(x.shape, -math.inf)
    direct = p > SMALLEST_P
    out[direct] = np.log(p[direct])
    small = ~direct & (x > 0)
    if small.any():
        xs = x[small]
        term, total = np.ones_like(xs), np.ones_like(xs)
        for j in range(1, SERIES_TERMS):
            term *= xs / (a + j)
            total += term
            if np.all(term <= 1e-17 * total):
                break
        out[small] = a * np.log(xs) - xs - special.gammaln(a + 1) + np.log(total)
    return out


def rung_potentials(k: float, radii: np.ndarray, n: int) -> np.ndarray:
    """Reduced potentials of directions with radii r at rung k: minus the log of their
    weight relative to the uniform law (UNIFORM: 0; k = 0: -n ln r; else
    -ln P(n/2, k r²/2)), each rung's normaliser left to MBAR."""
    radii = np.asarray(radii, dtype=np.float64)
    if k == UNIFORM:
        return np.zeros_like(radii)
    if k == 0:
        return -n * np.log(radii)
    return -log_gamma_cdf(n / 2, k * radii * radii / 2)


def log_weight_slope(k: float, radii: np.ndarray, n: int) -> np.ndarray:
    """d(-rung potential)/d ln r at rung k: how fast a direction's log weight grows with
    its log radius (UNIFORM: 0; k = 0: n; else 2 x^a e^-x / (Γ(a) P(a, x)), a = n/2,
    x = k r²/2), for samplers that follow the weight's gradient."""
    radii = np.asarray(radii, dtype=np.float64)
    if k == UNIFORM:
        return np.zeros_like(radii)
    if k == 0:
        return np.full_like(radii, float(n))
    a, x = n / 2, k * radii * radii / 2
    return 2 * np.exp(a * np.log(x) - x - special.gammaln(a) - log_gamma_cdf(a, x))


def draw_radii(k: float, radii: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """ρ given each direction at rung k: drawn from ∝ ρ^(n-1) exp(-kρ²/2) on [0, r(u)]
    by inverting its distribution function (an incomplete gamma)."""
    radii = np.asarray(radii, dtype=np.float64)
    uniform = rng.random(len(radii))
    if k == 0:
        return radii * uniform ** (1 / n)
    if k == UNIFORM:
        raise ValueError("the uniform rung has no restraint, so no radial law")
    a = n / 2
    scaled = special.gammaincinv(a, uniform * special.gammainc(a, k * radii * radii / 2))
    return np.minimum(np.sqrt(2 * scaled / k), radii)


def mean_square_radius(k: float, radii: np.ndarray, n: int) -> np.ndarray:
    """E[ρ² | u] at rung k: (n/k) P(n/2+1, x) / P(n/2, x), x = k r²/2 (n r²/(n+2) at
    k = 0), the integrand of thermodynamic integration, d ln Z/dk = -E_k|z|²/2."""
    radii = np.asarray(radii, dtype=np.float64)
    if k == 0:
        return n * radii**2 / (n + 2)
    x = k * radii * radii / 2
    return (n / k) * np.exp(log_gamma_cdf(n / 2 + 1, x) - log_gamma_cdf(n / 2, x))
