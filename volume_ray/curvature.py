"""The Hessian of the mean loss in the radii's own coordinates (DESIGN §7).

Radii live in z, with w = w* + f⊙z and f the filter-norm scale, so the Hessian that
predicts them is H = diag(f)·H_w·diag(f). In a quadratic basin the radius along a unit u
is sqrt(2ΔL / uᵀHu), and the Laplace log-volume, in the paper's convention, is
(n/2)·ln(2ΔL) − ½·Σ ln λᵢ. H is never formed: Hessian-vector products come from
`torch.func.jvp` over `torch.func.grad` (forward-over-reverse). Lanczos, fully
reorthogonalised and started from Rademacher probes, gives the top eigenvalues and
stochastic Lanczos quadrature (SLQ): each probe's tridiagonal is kept, so that
Σ ln max(λ, floor) can be taken at any floor later, with its convergence. Each probe's
first product also gives Hutchinson's trace and diagonal.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from itertools import chain

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad, jvp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from volume_ray.checks import (
    BOOLEAN,
    MODEL_AND_DATA_RULES,
    check,
    check_int,
    integer,
    private_copy,
    resolve_device,
)
from volume_ray.directions import FilterNorm, perturbed_parameters
from volume_ray.precision import float32_precision

__all__ = ["SAMPLES_PER_PASS", "Curvature", "HessianOperator", "curvature"]

SAMPLES_PER_PASS = 4096  # samples in one forward-over-reverse pass, by default
PASS_FLOATS = 2**24  # activations one pass holds by default (64 MiB in fp32)
BASIS_FLOATS = 2**27  # float64 Lanczos vectors held at once (1 GiB)
BREAKDOWN_ULPS = 100  # a Lanczos residual this many ulps of |T| small spans an invariant space

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# What each argument of `curvature` must be, checked in this order before any work.
CURVATURE_RULES = {
    **MODEL_AND_DATA_RULES,
    "top_k": integer(1),
    "probes": integer(1),
    "lanczos_steps": integer(1),
    "seed": integer(0),
    "allow_tf32": BOOLEAN,
}


class HessianOperator:
    """Products H_z v = f⊙H_w(f⊙v) of the mean loss on (x, y), at z = 0.

    `scale` is f, (n,) (None: ones, plain weight space). The data goes through the model
    in chunks of `batch_size` samples (None: at most SAMPLES_PER_PASS), each with as
    many vectors side by side as hold PASS_FLOATS activations (primal, tangent and
    gradient; `vectors_per_pass`): side by side, the model's matrix-vector work becomes
    matrix products. The mean's product sums the chunks' products, weighted by their
    share of samples. Attention runs through PyTorch's math kernel here: the fused ones
    have no forward-mode derivative (the switch is process-wide while a product runs).
    The operator computes on a copy of the model of its own, on `device` (None: the
    model's), in eval mode and in the model's dtype: the caller's model is never
    touched. Float32 products run at full precision unless `allow_tf32`
    (`volume_ray.precision`). `count` is the number of products so far, one per vector.
    """

    def __init__(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        loss_fn: LossFn,
        *,
        scale: torch.Tensor | None = None,
        batch_size: int | None = None,
        device: str | torch.device | None = None,
        allow_tf32: bool = False,
    ):
        if len(x) == 0 or len(x) != len(y):
            raise ValueError(
                f"x and y must hold the same positive number of samples, got len(x)={len(x)} "
                f"and len(y)={len(y)}"
            )
        if batch_size is not None:
            check_int("batch_size", batch_size, minimum=1)
        self.model = private_copy(model, resolve_device(device, model))
        self.loss_fn, self.allow_tf32 = loss_fn, allow_tf32
        self.params = perturbed_parameters(self.model)
        self.n = self.params.count
        flat = self.params.flat
        if scale is not None and scale.shape != (self.n,):
            raise ValueError(f"scale must have shape ({self.n},), got {tuple(scale.shape)}")
        self.scale = None if scale is None else scale.to(flat)
        chosen = set(self.params.names)
        named = chain(self.model.named_parameters(), self.model.named_buffers())
        self.fixed = {name: t.detach() for name, t in named if name not in chosen}
        x, y = x.to(flat.device), y.to(flat.device)
        size = min(len(x), batch_size or SAMPLES_PER_PASS)
        floats = 3 * size * self._floats_per_sample(x[:1])  # one vector's pass
        self.vectors_per_pass = max(1, PASS_FLOATS // floats)
        self.chunks = [
            (x[i : i + size], y[i : i + size], len(x[i : i + size]) / len(x))
            for i in range(0, len(x), size)
        ]
        self.count = 0
        self._vmap = True  # until a batched product shows the model or loss cannot vmap
        self.base_loss = self._check_loss_and_base()

    def _floats_per_sample(self, sample: torch.Tensor) -> int:
        """The outputs of every leaf module in one forward pass of one sample, counted by
        hooks that live for that pass only."""
        counts = []
        count = lambda _module, _inputs, out: counts.append(  # noqa: E731
            out.numel() if isinstance(out, torch.Tensor) else 0
        )
        leaves = [m for m in self.model.modules() if next(m.children(), None) is None]
        hooks = [m.register_forward_hook(count) for m in leaves]
        try:
            with torch.no_grad(), float32_precision(self.allow_tf32):
                self.model(sample)
        finally:
            for hook in hooks:
                hook.remove()
        return max(1, sum(counts))

    def _loss(self, z: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        w = self.params.flat + (z if self.scale is None else self.scale * z)
        with sdpa_kernel(SDPBackend.MATH):
            outputs = functional_call(self.model, {**self.fixed, **self.params.tensors(w)}, (x,))
        return self.loss_fn(outputs, y)

    def _check_loss_and_base(self) -> float:
        """The mean loss at w*, after checking that loss_fn has a second derivative."""
        zero = torch.zeros_like(self.params.flat)
        x, y, _ = self.chunks[0]
        weights = {**self.fixed, **self.params.tensors(zero)}
        with float32_precision(self.allow_tf32):
            outputs = functional_call(self.model, weights, (x,)).detach().requires_grad_()
        value = self.loss_fn(outputs, y)
        if not isinstance(value, torch.Tensor) or value.numel() != 1:
            raise ValueError("loss_fn must return the batch mean as a scalar tensor")
        if not value.requires_grad:
            raise ValueError(
                "loss_fn must be twice differentiable in the outputs, but its value does not "
                "depend on them through a differentiable path (detached, or not a torch op)"
            )
        try:
            _hvp(self.loss_fn, outputs.detach(), torch.ones_like(outputs), y)
        except (RuntimeError, NotImplementedError, TypeError) as error:
            raise ValueError(
                "loss_fn must be twice differentiable: torch.func.jvp over torch.func.grad "
                f"(forward-over-reverse) fails on it: {error}"
            ) from error
        with torch.no_grad(), float32_precision(self.allow_tf32):
            return sum(share * float(self._loss(zero, x, y)) for x, y, share in self.chunks)

    def gradient(self, points: torch.Tensor) -> torch.Tensor:
        """∇_z of the mean loss at each row of `points` (B, n), in float64: at a basin's
        edge, its outward normal."""
        points = points.to(self.params.flat)
        total = torch.zeros(points.shape, dtype=torch.float64, device=points.device)
        group = self.vectors_per_pass
        for x, y, share in self.chunks:
            one = grad(lambda z, x=x, y=y: self._loss(z, x, y))
            for i in range(0, len(points), group):
                total[i : i + group] += share * self._by_rows(one, points[i : i + group])
        return total

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """H_z v for v of shape (n,) or (B, n), in v's shape, dtype and device."""
        if not isinstance(v, torch.Tensor) or v.dim() not in (1, 2) or v.shape[-1] != self.n:
            shape = getattr(v, "shape", type(v).__name__)
            raise ValueError(
                f"v must be a tensor of shape ({self.n},) or (B, {self.n}), got {shape}"
            )
        vectors = v.reshape(-1, self.n).to(self.params.flat)
        total = torch.zeros(vectors.shape, dtype=torch.float64, device=vectors.device)
        group = self.vectors_per_pass
        for x, y, share in self.chunks:
            for i in range(0, len(vectors), group):
                total[i : i + group] += share * self._products(vectors[i : i + group], x, y)
        self.count += len(vectors)
        return total.reshape(v.shape).to(v)

    def _products(self, vectors: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The chunk-mean loss's H_z v of each row of `vectors`, in float64."""
        zero = torch.zeros_like(self.params.flat)
        product = lambda v: _hvp(lambda z, t: self._loss(z, x, t), zero, v, y)  # noqa: E731
        return self._by_rows(product, vectors)

    def _by_rows(self, fn: Callable, rows: torch.Tensor) -> torch.Tensor:
        """fn of each row, in float64, at the operator's float32 precision (forward and
        backward passes alike): vmapped, or one row per pass where the model or loss
        cannot be batched (warned once)."""
        with float32_precision(self.allow_tf32):
            if len(rows) > 1 and self._vmap:
                try:
                    return vmap(fn)(rows).double()
                except (RuntimeError, NotImplementedError) as error:
                    warnings.warn(
                        f"this model or loss cannot be batched with torch.func.vmap ({error}); "
                        "its derivatives are taken one vector per pass instead (slower)",
                        RuntimeWarning,
                        stacklevel=4,
                    )
                    self._vmap = False
            try:
                return torch.stack([fn(row) for row in rows]).double()
            except (RuntimeError, NotImplementedError, TypeError) as error:
                raise ValueError(
                    "model and loss_fn must be twice differentiable: torch.func.jvp over "
                    f"torch.func.grad fails on them: {error}"
                ) from error


def _hvp(fn: Callable, primal: torch.Tensor, tangent: torch.Tensor, y: torch.Tensor):
    """The jvp of grad(fn) in its first argument; fn(primal, y) is a scalar. Float targets
    go in as primals with a materialised zero tangent: F.mse_loss fails under
    forward-over-reverse otherwise ("ZeroTensors are immutable", pytorch/pytorch#123996)."""
    gradient = grad(fn)
    if y.is_floating_point():
        return jvp(gradient, (primal, y), (tangent, torch.zeros_like(y)))[1]
    return jvp(lambda p: gradient(p, y), (primal,), (tangent,))[1]


@dataclass(frozen=True, eq=False)
class Curvature:
    """What `curvature` found. `lanczos_alpha` (probes, steps) and `lanczos_beta`
    (probes, steps - 1) are each probe's Lanczos tridiagonal: its eigenvalues are the
    SLQ nodes, and the squared first components of its eigenvectors their weights."""

    n_params: int
    base_loss: float
    top_eigenvalues: np.ndarray  # descending
    trace: float
    trace_stderr: float
    diagonal: np.ndarray | None  # (n,), Hutchinson's; None when read back from a record
    lanczos_alpha: np.ndarray
    lanczos_beta: np.ndarray

    @property
    def probes(self) -> int:
        return self.lanczos_alpha.shape[0]

    @property
    def lanczos_steps(self) -> int:
        return self.lanczos_alpha.shape[1]

    @property
    def exact(self) -> bool:
        """Whether the Krylov space was the whole space (lanczos_steps = n): then each
        probe's Ritz values are all n eigenvalues, and sums over the spectrum are exact
        rather than estimates."""
        return self.lanczos_steps == self.n_params

    def quadrature(self, steps: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(nodes, weights), each (probes, steps): the Gauss rule of the first `steps`
        Lanczos steps (all by default, computed once). Weights are 1/n per node when
        exact."""
        if steps is None or steps == self.lanczos_steps:
            return self._full_rule
        return self._rule(steps)

    @cached_property
    def _full_rule(self) -> tuple[np.ndarray, np.ndarray]:
        return self._rule(self.lanczos_steps)

    def _rule(self, steps: int) -> tuple[np.ndarray, np.ndarray]:
        tridiagonals = np.zeros((self.probes, steps, steps))
        rows = np.arange(steps)
        tridiagonals[:, rows, rows] = self.lanczos_alpha[:, :steps]
        tridiagonals[:, rows[:-1], rows[1:]] = self.lanczos_beta[:, : steps - 1]
        tridiagonals[:, rows[1:], rows[:-1]] = self.lanczos_beta[:, : steps - 1]
        nodes, vectors = np.linalg.eigh(tridiagonals)
        if steps == self.n_params:
            return nodes, np.full_like(nodes, 1 / self.n_params)
        return nodes, vectors[:, 0, :] ** 2

    @property
    def slq_nodes(self) -> np.ndarray:
        """Each probe's Ritz values (probes, steps)."""
        return self.quadrature()[0]

    def log_det_samples(self, floor: float, steps: int | None = None) -> np.ndarray:
        """One SLQ estimate of Σ ln max(λᵢ, floor) per probe: (probes,)."""
        if not floor > 0:
            raise ValueError(f"floor must be > 0, got {floor!r}")
        nodes, weights = self.quadrature(steps)
        return self.n_params * (weights * np.log(np.maximum(nodes, floor))).sum(axis=1)

    def log_det(self, floor: float) -> float:
        """The SLQ estimate of Σ ln max(λᵢ, floor): the mean over probes."""
        return float(self.log_det_samples(floor).mean())

    def log_det_error(self, floor: float) -> float:
        """How far the quadrature may still be from converged: the change in `log_det`
        from half the Lanczos steps to all of them (0 when exact). The probes' spread
        misses this bias; when the Gauss rule converges geometrically, at least twice as
        fast as from half the steps, it bounds it."""
        if self.exact or self.lanczos_steps < 2:
            return 0.0
        half = self.log_det_samples(floor, self.lanczos_steps // 2).mean()
        return float(abs(self.log_det(floor) - half))

    def density(self, grid: np.ndarray, sigma: float | np.ndarray) -> np.ndarray:
        """The eigenvalue density on `grid`, SLQ smoothed by Gaussians of width `sigma`
        (one width, or one per grid point); it integrates to about 1."""
        sigma = np.asarray(sigma, dtype=np.float64)
        if not np.all(sigma > 0):
            raise ValueError(f"sigma must be > 0, got {sigma!r}")
        nodes, weights = self.quadrature()
        width = np.broadcast_to(sigma, np.shape(grid))[..., None, None]
        gaps = (np.asarray(grid, dtype=np.float64)[..., None, None] - nodes) / width
        bumps = np.exp(-0.5 * gaps**2) / (width * np.sqrt(2 * np.pi))
        return (bumps * weights).sum(axis=-1).mean(axis=-1)

    def to_record(self) -> dict:
        """Plain values for one Parquet row (the diagonal is left out: n values)."""
        return {
            "n_params": self.n_params,
            "base_loss": self.base_loss,
            "top_eigenvalues": self.top_eigenvalues.tolist(),
            "trace": self.trace,
            "trace_stderr": self.trace_stderr,
            "probes": self.probes,
            "lanczos_steps": self.lanczos_steps,
            "lanczos_alpha": self.lanczos_alpha.tolist(),
            "lanczos_beta": self.lanczos_beta.tolist(),
        }

    @classmethod
    def from_record(cls, row) -> Curvature:
        """The inverse of `to_record`, from a dict or a pandas row."""
        rows = lambda key: np.array([np.asarray(r, dtype=np.float64) for r in row[key]])  # noqa: E731
        diagonal = row.get("diagonal")
        alpha = rows("lanczos_alpha")
        return cls(
            n_params=int(row["n_params"]),
            base_loss=float(row["base_loss"]),
            top_eigenvalues=np.asarray(row["top_eigenvalues"], dtype=np.float64),
            trace=float(row["trace"]),
            trace_stderr=float(row["trace_stderr"]),
            diagonal=None if diagonal is None else np.asarray(diagonal, dtype=np.float64),
            lanczos_alpha=alpha,
            lanczos_beta=rows("lanczos_beta").reshape(len(alpha), -1),
        )


def curvature(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    loss_fn: LossFn,
    *,
    filter_norm: str = "paper",
    top_k: int = 5,
    probes: int = 32,
    lanczos_steps: int = 64,
    seed: int = 0,
    batch_size: int | None = None,
    device: str | torch.device | None = None,
    allow_tf32: bool = False,
) -> Curvature:
    """Curvature of the mean `loss_fn` on (x, y) at the model's weights, in z.

    `probes` Rademacher starts each run `lanczos_steps` Lanczos steps (clipped to n), so
    a call costs probes·lanczos_steps Hessian-vector products. With lanczos_steps >= n
    one probe finds the whole spectrum, and `log_det` is exact (`Curvature.exact`).
    `top_k` eigenvalues are the largest Ritz values over all probes (each a lower bound
    of its eigenvalue). Randomness comes from a generator seeded with `seed` only.
    `batch_size` is the samples per pass, as in `HessianOperator`; probes run side by
    side as many as fit. `device` picks where the work runs; the work is done on a
    copy of the model there, so the caller's model is left as it was.
    """
    check(CURVATURE_RULES, locals())
    params = perturbed_parameters(model)
    if top_k > params.count:
        raise ValueError(f"top_k must be <= n_params={params.count}, got {top_k}")
    steps = min(lanczos_steps, params.count)
    if top_k > steps:
        raise ValueError(f"top_k must be <= lanczos_steps, got top_k={top_k}, {steps} steps")
    scale = FilterNorm(params, filter_norm).scale  # raises for li2018
    device = resolve_device(device, model)
    operator = HessianOperator(
        model,
        x,
        y,
        loss_fn,
        scale=scale.to(device),
        batch_size=batch_size,
        device=device,
        allow_tf32=allow_tf32,
    )
    n = operator.n
    # Probes run side by side, as many as one pass of the model takes and the bases fit.
    side_by_side = max(1, min(operator.vectors_per_pass, BASIS_FLOATS // (steps * n)))
    tolerance = BREAKDOWN_ULPS * torch.finfo(params.flat.dtype).eps
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, 2, (probes, n), generator=generator).double().mul_(2).sub_(1)
    alpha, beta = np.zeros((probes, steps)), np.zeros((probes, steps - 1))
    quadratics, diagonal = np.zeros(probes), torch.zeros(n, dtype=torch.float64, device=device)
    for group in range(0, probes, side_by_side):
        rademacher = starts[group : group + side_by_side].to(device)  # v, with |v|² = n
        tridiagonals, first = _lanczos(
            operator, rademacher / np.sqrt(n), steps, generator, tolerance
        )
        rows = slice(group, group + len(rademacher))
        if not np.isfinite(tridiagonals).all():
            raise ValueError(
                "the Hessian-vector products are not finite: the loss (or the model's "
                "outputs) overflows near these weights; check the model and loss_fn"
            )
        alpha[rows] = np.diagonal(tridiagonals, axis1=1, axis2=2)
        beta[rows] = np.diagonal(tridiagonals, offset=1, axis1=1, axis2=2)
        quadratics[rows] = n * tridiagonals[:, 0, 0]  # vᵀHv
        diagonal += np.sqrt(n) * (rademacher * first).sum(dim=0)  # Σ v⊙Hv
    found = Curvature(n, operator.base_loss, np.zeros(0), 0.0, 0.0, None, alpha, beta)
    nodes = found.slq_nodes
    top = np.sort(nodes, axis=1)[:, ::-1][:, :top_k].max(axis=0)
    if found.exact:  # each probe's Ritz values are the whole spectrum: the trace is exact
        trace, stderr = nodes.sum(axis=1).mean(), 0.0
    else:
        trace = quadratics.mean()
        stderr = quadratics.std(ddof=1) / np.sqrt(probes) if probes > 1 else float("nan")
    return Curvature(
        n_params=n,
        base_loss=operator.base_loss,
        top_eigenvalues=top,
        trace=float(trace),
        trace_stderr=float(stderr),
        diagonal=(diagonal / probes).cpu().numpy(),
        lanczos_alpha=alpha,
        lanczos_beta=beta,
    )


def _lanczos(
    operator: HessianOperator,
    starts: torch.Tensor,
    steps: int,
    generator: torch.Generator,
    tolerance: float,
) -> tuple[np.ndarray, torch.Tensor]:
    """`steps` Lanczos steps from each unit row of `starts` (g, n) side by side: the
    three-term recurrence, then each new vector orthogonalised against all before it.
    Returns the tridiagonals T (g, steps, steps) and H·starts. A run that meets an
    invariant subspace restarts from a fresh random vector with a zero off-diagonal: its
    quadrature is unchanged (the new block has zero first components) and its Ritz
    values go on finding eigenvalues."""
    g, n = starts.shape
    basis = torch.zeros(g, steps, n, dtype=torch.float64, device=starts.device)
    tridiagonals = np.zeros((g, steps, steps))
    q, previous, beta = starts, torch.zeros_like(starts), torch.zeros(g, 1).to(starts)
    for j in range(steps):
        basis[:, j] = q
        w = operator.matvec(q)
        if j == 0:
            first = w
        alpha = (q * w).sum(dim=1, keepdim=True)
        tridiagonals[:, j, j] = alpha[:, 0].cpu().numpy()
        if j == steps - 1:
            break
        known = basis[:, : j + 1]
        w = _orthogonalise(w - alpha * q - beta * previous, known)
        beta = w.norm(dim=1, keepdim=True)
        size = np.abs(tridiagonals[:, : j + 1, : j + 1]).max(axis=(1, 2))
        broken = torch.as_tensor(beta[:, 0].cpu().numpy() <= tolerance * size, device=w.device)
        if broken.any():
            fresh = torch.randn(int(broken.sum()), n, generator=generator, dtype=torch.float64)
            fresh = _orthogonalise(fresh.to(w.device), known[broken], passes=2)
            w[broken], beta[broken] = fresh / fresh.norm(dim=1, keepdim=True), 0.0
        tridiagonals[:, j, j + 1] = tridiagonals[:, j + 1, j] = beta[:, 0].cpu().numpy()
        previous, q = q, w / w.norm(dim=1, keepdim=True)
    return tridiagonals, first


def _orthogonalise(w: torch.Tensor, known: torch.Tensor, passes: int = 1) -> torch.Tensor:
    """Rows of w (g, n) less their projections on the orthonormal rows of known (g, k, n).
    One pass suffices after the three-term recurrence; a random vector takes two."""
    for _ in range(passes):
        w = w - torch.einsum("gk,gkn->gn", torch.einsum("gkn,gn->gk", known, w), known)
    return w
