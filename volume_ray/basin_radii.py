"""The basin B as a ladder sees it: radii, and the slopes of ln r, along directions.

B = {ρu : 0 <= ρ <= r(u)} in the radii's coordinates z (DESIGN §7), r(u) found by
this project's own radius search (`RadiusMeter.crossings_along`). The ladder works in
whitened coordinates y, z = A y with det A = 1 (`whitening`), where B's radius along
a unit v is r(Av/|Av|)/|Av|. On B's edge L(r(u) u) = T, so implicit differentiation
gives ∇_u ln r = -P_u ∇L / (u·∇L) from one loss gradient at the crossing (P_u the
projection off u; 0 where r is capped).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from volume_ray.curvature import HessianOperator
from volume_ray.measure import RadiusMeter

__all__ = ["BasinRadii"]


class BasinRadii:
    """Radii along directions of one basin, in z or in whitened y, with the loss
    gradients at the crossings; counts the radius searches and loss evaluations."""

    def __init__(self, meter: RadiusMeter, gradients: HessianOperator, cap: float):
        self.meter, self.gradients, self.cap = meter, gradients, cap
        self.n = gradients.n
        self.whitening: np.ndarray = np.ones(self.n)  # A: (n, n) dense, or (n,) diagonal
        self.searches = self.evaluations = 0

    def radii(self, u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """r(u) (B,) along unit z-directions u (B, n), and whether each is censored."""
        raw = torch.from_numpy(u * math.sqrt(self.n))  # |g| = √n, as seeded directions
        coefficient, censored, nonfinite, evals = self.meter.crossings_along(raw)
        self.searches += len(u)
        self.evaluations += int(evals.sum())
        if nonfinite.any():
            raise ValueError(
                "model and loss_fn give a non-finite loss inside the basin along a direction "
                "the chains proposed: the basin is not a set of finite loss; check the model "
                "for overflow, or lower the threshold"
            )
        return coefficient[:, 0] * math.sqrt(self.n), censored[:, 0]

    def crossings(self, u: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """What `whiten` needs: radii, the loss gradients in z at the crossings, censored."""
        radii, censored = self.radii(u)
        points = torch.from_numpy(radii[:, None] * u)
        return radii, self.gradients.gradient(points).cpu().numpy(), censored

    def _to_z(self, v: np.ndarray) -> np.ndarray:
        a = self.whitening
        return v @ a.T if a.ndim == 2 else v * a

    def radii_in_y(self, v: np.ndarray) -> np.ndarray:
        """The whitened body's radius along unit y-directions v: r(Av/|Av|) / |Av|."""
        w = self._to_z(v)
        length = np.linalg.norm(w, axis=1)
        return self.radii(w / length[:, None])[0] / length

    def radii_and_slopes_in_y(self, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """ρ(v) = r(Av/|Av|)/|Av| along unit y-directions v, and ∇_v ln ρ (u = w/|w|,
        w = A v)."""
        w = self._to_z(v)
        length = np.linalg.norm(w, axis=1, keepdims=True)
        u = w / length
        radii, gradients, censored = self.crossings(u)
        along = (gradients * u).sum(1, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            slope_u = np.where(censored[:, None], 0.0, -(gradients - along * u) / along)
        slope_w = (slope_u - u) / length
        a = self.whitening
        slope_v = slope_w @ a if a.ndim == 2 else slope_w * a
        return radii / length[:, 0], slope_v
