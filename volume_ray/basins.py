"""Basins of known volume: real models, data and losses for validating volume estimators.

Each `Basin` is an `nn.Module` at its minimum w*, with data and a loss that
`measure_radii` (or any estimator) can walk, and whose radius r(u) and log-volume in
the paper's convention, log E_u[r(u)^n] = log Vol(B) - log V_n(1) (DESIGN §7), are
known in closed form. Both models are a bias-free `nn.Linear(n, 1)` whose one weight
row w* is a random unit vector: its "paper" filter norm is f = |w*| = 1 (up to
rounding), so z = w - w* and the filter norms "paper" and "none" coincide.

- `quadratic_basin`: least squares, L(z) = z^T (X^T X / N) z, Hessian eigenvalues
  known. X = sqrt(N) diag(sqrt(mu)) Q^T with Q a Haar rotation (float64 QR of a
  Gaussian, signs fixed by diag R), so X^T X / N = Q diag(mu) Q^T exactly up to
  rounding. That QR is O(n^3): at n in the ten thousands it takes tens of seconds
  (docs/performance.md).
- `cross_polytope_basin`: L(z) = (1/n) sum a_i |z_i|, not quadratic. The weights a_i
  sit in the inputs, x = diag(a), with `F.l1_loss`: each sample's loss depends on its
  own output and target alone, as it must, since the landscape reorders and chunks
  the samples (a loss holding a per-position `a` would mix them up). With
  `layout="indexed"` sample i is the pair (i, a_i) and the model looks its weight up
  (`CoordinateLookup`): the same basin at O(n) a loss evaluation instead of O(n²),
  which is what makes n = 10,000 affordable on a CPU.

Neither uses Ray or does I/O; randomness comes from a generator seeded by `seed`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "KINDS",
    "LAYOUTS",
    "Basin",
    "CoordinateLookup",
    "cross_polytope_basin",
    "quadratic_basin",
]

KINDS = ("quadratic", "cross_polytope")
LAYOUTS = ("dense", "indexed")
UNIT_TOL = 1e-5  # how far from 1 the norm of a "unit" direction may be
ROWS_PER_BLOCK = 1024  # rows of x converted to float64 at a time by `radius`


@dataclass(frozen=True)
class Basin:
    """A model at its minimum, its landscape (x, y, loss_fn), and the closed forms.

    `kind` is one of KINDS. `eigenvalues` are the Hessian's in z (ascending) for the
    quadratic basin, else None; `weights` are the a_i of the cross-polytope, else None.
    `base_loss` is L*, the loss of `model` on (x, y) as computed, 0 up to rounding.
    """

    model: nn.Module
    x: torch.Tensor  # (n, n): n samples; indexed, (n, 2)
    y: torch.Tensor  # (n, 1)
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    eigenvalues: np.ndarray | None  # (n,) float64
    base_loss: float
    kind: str
    weights: np.ndarray | None  # (n,) float64

    @property
    def n_params(self) -> int:
        """n, the dimension of the basin and the exponent of the paper's volume."""
        return self.model.weight.shape[1]

    def log_volume(self, threshold: float) -> float:
        """log E_u[r(u)^n] in nats: the truth every estimator of DESIGN §7 targets.

        Quadratic: (n/2) ln(2 dL) - (1/2) sum ln(lambda_i), with dL = T - L*.
        Cross-polytope {sum a_i |z_i| <= t}, t = n dL: Vol = (2t)^n / (n! prod a_i),
        minus log V_n(1) = (n/2) ln(pi) - lgamma(n/2 + 1).
        """
        gap, n = self._gap(threshold), self.n_params
        if self.kind == "quadratic":
            return 0.5 * n * math.log(2 * gap) - 0.5 * float(np.log(self.eigenvalues).sum())
        log_vol = n * math.log(2 * n * gap) - math.lgamma(n + 1) - float(np.log(self.weights).sum())
        return log_vol - (0.5 * n * math.log(math.pi) - math.lgamma(0.5 * n + 1))

    def radius(self, unit_directions: np.ndarray, threshold: float) -> np.ndarray:
        """r(u) (B,) along each unit row u of `unit_directions` (B, n), in float64.

        Quadratic: sqrt(2 dL / u^T H u), with u^T H u = 2 |X u|^2 / N from x itself.
        Cross-polytope: t / sum a_i |u_i|, t = n dL.
        """
        gap = self._gap(threshold)
        u = np.asarray(unit_directions, dtype=np.float64)
        if u.ndim != 2 or u.shape[1] != self.n_params or not np.isfinite(u).all():
            raise ValueError(
                f"unit_directions must be a finite (B, {self.n_params}) array, got shape {u.shape}"
            )
        norms = np.linalg.norm(u, axis=1)
        if np.any(np.abs(norms - 1) > UNIT_TOL):
            raise ValueError(f"unit_directions rows must have norm 1, got norms {norms}")
        if self.kind == "cross_polytope":
            return self.n_params * gap / (np.abs(u) @ self.weights)
        if isinstance(self.model, CoordinateLookup):  # X = diag(x[:, 1])
            squares = np.square(u * self.x[:, 1].double().numpy()).sum(axis=1)
            return np.sqrt(gap * len(self.x) / squares)
        squares = np.zeros(len(u))  # |X u|^2 (B,), row block by row block
        for start in range(0, len(self.x), ROWS_PER_BLOCK):
            block = self.x[start : start + ROWS_PER_BLOCK].detach().cpu().double().numpy()
            squares += np.square(block @ u.T).sum(axis=0)
        return np.sqrt(gap * len(self.x) / squares)

    def _gap(self, threshold: float) -> float:
        """dL = T - L*, after checking T."""
        if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real):
            raise ValueError(f"threshold must be a number, got {threshold!r}")
        if not math.isfinite(threshold) or threshold <= self.base_loss:
            raise ValueError(
                f"threshold must be finite and above the base loss {self.base_loss!r}, "
                f"got {threshold!r}"
            )
        return float(threshold) - self.base_loss


def quadratic_basin(
    n: int,
    *,
    decades: float = 4.0,
    scale: float = 1.0,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    layout: str = "dense",
) -> Basin:
    """Least squares with Hessian eigenvalues 2 mu: mu evenly spaced in log from
    `scale` down to scale * 10**-decades, so `decades` sets the conditioning.

    N = n samples, targets y = X w*, MSE loss, so L* = 0 and the Hessian of the mean
    loss is 2 X^T X / N. `decades=0` gives an isotropic ball. `layout` "indexed" gives
    the unrotated ellipsoid, Q = I, as rows (i, sqrt(n mu_i)) to a `CoordinateLookup`.
    """
    generator = _check(n, decades, scale, seed, dtype)
    _check_layout(layout)
    mu = _log_spaced(n, decades, scale)  # (n,) descending
    if layout == "indexed":
        x = _indexed(np.sqrt(n * mu), dtype)
        return _basin(x, F.mse_loss, generator, "quadratic", np.sort(2 * mu), None, layout)
    gaussian = torch.randn(n, n, generator=generator, dtype=torch.float64)
    reflectors, tau = torch.geqrf(gaussian)
    del gaussian
    signs = torch.where(reflectors.diagonal() < 0, -1.0, 1.0).double()  # so Q is Haar
    rotation = torch.linalg.householder_product(reflectors, tau)  # Q (n, n)
    del reflectors
    rotation.mul_(signs * torch.from_numpy(np.sqrt(n * mu)))  # columns of Q, scaled
    x = torch.empty(n, n, dtype=dtype).copy_(rotation.t())  # X = sqrt(N mu) Q^T, row i
    del rotation
    return _basin(x, F.mse_loss, generator, "quadratic", np.sort(2 * mu), None)


def cross_polytope_basin(
    n: int,
    *,
    decades: float = 4.0,
    scale: float = 1.0,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    layout: str = "dense",
) -> Basin:
    """The cross-polytope {sum a_i |z_i| <= t}: mean loss (1/n) sum a_i |z_i|.

    Sample i is a_i e_i with target a_i w*_i, so its L1 loss is a_i |w_i - w*_i| and
    the mean loss stays <= T exactly when sum a_i |z_i| <= t = n (T - L*). The a_i are
    spaced as `quadratic_basin`'s mu. Not smooth at w*: no eigenvalues. `layout`
    "indexed" gives sample i as (i, a_i) to a `CoordinateLookup`: the same losses.
    """
    generator = _check(n, decades, scale, seed, dtype)
    _check_layout(layout)
    a = _log_spaced(n, decades, scale)
    x = torch.diag(torch.from_numpy(a).to(dtype)) if layout == "dense" else _indexed(a, dtype)
    weights = torch.from_numpy(a).to(dtype).double().numpy()  # as the model sees them
    return _basin(x, F.l1_loss, generator, "cross_polytope", None, weights, layout)


def _indexed(coefficients: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """Samples a_i e_i as rows (i, a_i), for a `CoordinateLookup`."""
    n = len(coefficients)
    return torch.stack([torch.arange(n, dtype=dtype), torch.from_numpy(coefficients).to(dtype)], 1)


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


class CoordinateLookup(nn.Module):
    """A bias-free linear model y = w·x for inputs x = a_i e_i given as rows (i, a_i):
    output a_i w_i, looked up in O(1) instead of an O(n) dot product. Its weight is
    (1, n), like `nn.Linear(n, 1)`'s, so its "paper" filter norm is the same."""

    def __init__(self, n: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(1, n, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.weight[0, x[:, 0].long()] * x[:, 1])[:, None]


def _basin(
    x: torch.Tensor,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    generator: torch.Generator,
    kind: str,
    eigenvalues: np.ndarray | None,
    weights: np.ndarray | None,
    layout: str = "dense",
) -> Basin:
    """The Linear(n, 1) (or its `CoordinateLookup`) at a random unit w*, with targets
    its own outputs (L* = 0)."""
    n = len(x)
    w_star = torch.randn(n, generator=generator, dtype=torch.float64)
    # built on "meta" and then filled, so that the global RNG is never drawn from
    if layout == "dense":
        model = nn.Linear(n, 1, bias=False, device="meta", dtype=x.dtype).to_empty(device="cpu")
    else:
        model = CoordinateLookup(n, x.dtype)
    with torch.no_grad():
        model.weight.copy_(w_star / w_star.norm())  # (1, n): the row norm f is 1
        y = model(x)  # (n, 1)
        base_loss = float(loss_fn(model(x), y))
    return Basin(model.eval(), x, y, loss_fn, eigenvalues, base_loss, kind, weights)


def _log_spaced(n: int, decades: float, scale: float) -> np.ndarray:
    """n values from `scale` down to scale * 10**-decades, evenly spaced in log."""
    return scale * np.logspace(0.0, -decades, n) if n > 1 else np.array([float(scale)])


def _check(n: int, decades: float, scale: float, seed: int, dtype: torch.dtype) -> torch.Generator:
    """Checks the builders' arguments and returns the generator seeded by `seed`."""
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    for name, value in (("decades", decades), ("scale", scale)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ValueError(f"{name} must be a number, got {value!r}")
    if not (math.isfinite(decades) and decades >= 0):
        raise ValueError(f"decades must be finite and >= 0, got {decades!r}")
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be finite and > 0, got {scale!r}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype!r}")
    return torch.Generator().manual_seed(int(seed))
