"""Whitening a basin by its boundary normals, so that a ladder's directions can move.

The volume's weight r(u)^n sits far in the uniform law's tail, along the basin's long
axes, where a random-walk chain on directions takes very long to go. In coordinates
z = A y the basin becomes A⁻¹B, with Vol(B) = |det A| Vol(A⁻¹B), and a ladder run on a
rounder body mixes in a few steps (docs/thermodynamic.md). A body is round exactly
when its unit boundary normals are isotropic, so A is found by the fixed point

    A <- A (n · mean of g gᵀ)^(-1/4),   g the unit normal, in y, at a uniform direction's
                                         crossing: Aᵀ∇L there, normalised,

which for an ellipsoid lands on H^(-1/2) and for a cross-polytope on diag(1/a), needs
one loss gradient per crossing and no Hessian. det A is kept at 1: the scale is free.
Each step is shrunk by the sampling noise of its normals (James-Stein, the diagonal
and the off-diagonal part each by its own), so a body already round keeps A as it is.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

__all__ = ["DENSE_LIMIT", "Crossings", "whiten"]

DENSE_LIMIT = 4096  # up to this n, A is a dense matrix; past it, a diagonal one
BATCH = 2048  # directions handed to `crossings` at once

# unit z-directions (B, n) -> (radii (B,), loss gradients in z at the crossings (B, n),
# censored (B,) bool: no crossing below the cap, where the cap's own normal counts)
Crossings = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]]


def whiten(
    crossings: Crossings,
    n: int,
    *,
    iterations: int,
    directions: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """A with det A = 1 that makes the basin's boundary normals isotropic: (n, n), or
    (n,) (a diagonal) past DENSE_LIMIT. `directions` uniform directions per iteration."""
    dense = n <= DENSE_LIMIT
    a = np.eye(n) if dense else np.ones(n)
    for _ in range(iterations):
        second = np.zeros((n, n)) if dense else np.zeros(n)
        for start in range(0, directions, BATCH):
            v = rng.standard_normal((min(BATCH, directions - start), n))
            w = v @ a.T if dense else v * a
            u = w / np.linalg.norm(w, axis=1, keepdims=True)
            _, gradients, censored = crossings(u)
            normals = np.where(censored[:, None], u, gradients)
            normals = normals @ a if dense else normals * a
            normals /= np.linalg.norm(normals, axis=1, keepdims=True)
            second += normals.T @ normals if dense else np.square(normals).sum(0)
        second *= n / directions
        second = _denoised(second, n, directions, dense)
        if dense:
            values, vectors = np.linalg.eigh(second)
            a = a @ ((vectors * np.maximum(values, 1e-12) ** -0.25) @ vectors.T)
            a /= np.exp(np.linalg.slogdet(a)[1] / n)
        else:
            a = a * np.maximum(second, 1e-12) ** -0.25
            a /= np.exp(np.log(a).mean())
    return a


def _denoised(second: np.ndarray, n: int, directions: int, dense: bool) -> np.ndarray:
    """n · mean ggᵀ with what is left of its anisotropy beyond the sampling noise of
    `directions` unit normals kept, so that the noise does not pile up in A: each part
    shrunk toward isotropy by its own James-Stein factor. For isotropic normals the
    noise is 2n/m in squared norm on the diagonal and n(n-1)/m off it; shrinking the
    two apart keeps a diagonal anisotropy (a cross-polytope's, known to 2n/m) exact
    while the off-diagonal noise, n/2 times larger, goes."""
    diagonal = np.diag(second) if dense else second
    kept = 1.0 + _shrunk(diagonal - 1.0, 2 * n / directions)
    if not dense:
        return kept
    return np.diag(kept) + _shrunk(second - np.diag(diagonal), n * (n - 1) / directions)


def _shrunk(excess: np.ndarray, noise: float) -> np.ndarray:
    """`excess` shrunk by the James-Stein factor of its expected squared noise."""
    size = np.square(excess).sum()
    return max(0.0, 1 - noise / size) * excess if size > 0 else excess
