"""Volume estimators against basins of known volume, and side by side on a real network.

1. Least-squares basins (`volume_ray.basins.quadratic_basin`): Hessian eigenvalues
   spread evenly in log over 4 decades under a random rotation, so the truth is
   (n/2) ln(2 dL) - 1/2 sum ln(lambda). For n = 100, 1,000 and 10,000, every estimator
   prints its estimate, the truth, the error in nats, its 95% interval and whether it
   covers, the ESS, the cost (loss evaluations of the radius walks, Hessian-vector
   products of the curvature) and seconds.
   `thermodynamic` runs up to --thermodynamic-max-n (default 1,000); past it, on the
   unrotated ellipsoid of the same spectrum (the indexed layout, O(n) a loss
   evaluation: the rotated one costs O(n²) an evaluation, hours of matrix products
   at n = 10,000 here, and needs a dense whitening past `whitening.DENSE_LIMIT`).
2. Cross-polytopes {sum a_i |z_i| <= t} (`cross_polytope_basin`, indexed layout), not
   quadratic, at n = 100, 1,000 and 10,000: paper, typical and thermodynamic (laplace
   has no Hessian there).
3. The digits MLP 64-256-256-10 (1,437 samples, trained below 1e-3): paper, typical and
   laplace side by side, the quadratic radii against the measured ones, and the
   curvature's cost as a multiple of the 500-direction radius walk on the same pair.
4. A digits MLP small enough for the thermodynamic ladder on this CPU (64-32-10):
   all four side by side, with their costs in loss evaluations.
5. The thermodynamic ladder's cost against n: loss evaluations to reach a fixed
   standard error (TARGET_STDERR), and what it projects for the paper's MNIST MLP
   (235,146 parameters).

    python benchmarks/bench_estimators.py            # about 90 minutes on 2 cores
    python benchmarks/bench_estimators.py --sizes 100 1000 --no-networks   # 1. and 2. only
    python benchmarks/bench_estimators.py --smoke    # seconds, for CI
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch.nn.functional as F

from volume_ray.basins import cross_polytope_basin, quadratic_basin
from volume_ray.curvature import curvature
from volume_ray.data import load_source
from volume_ray.estimators import (
    EstimateResult,
    laplace_from_curvature,
    paper_estimate,
    typical_estimate,
)
from volume_ray.measure import RadiusMeter
from volume_ray.models import build_model
from volume_ray.thermodynamic import thermodynamic_log_volume
from volume_ray.train import TrainConfig, train

THRESHOLD = 0.1
MNIST_MLP = 235_146  # parameters of the paper's MNIST MLP
TARGET_STDERR = 0.5  # nats: the fixed precision the scaling compares costs at
# A forward pass of the MNIST MLP over a 10,000-sample landscape is 2 x 235k x 10k =
# 4.7 GFLOP; at 50 TFLOP/s (an H200 in float32, batched weight sets), about 0.1 ms.
# An assumption until issue 17 measures it on the device.
GPU_SECONDS_PER_EVALUATION = 1e-4
LADDER_COSTS: list[tuple[str, int, int, float]] = []  # (kind, n, evaluations, stderr)


def radius_estimates(frame, n: int) -> list[tuple[str, EstimateResult]]:
    """paper and typical from a measure_radii frame (censored at their caps for typical)."""
    crossed = frame.loc[~frame.censored, "radius"].to_numpy()
    caps = (frame.coefficient * frame.raw_norm)[frame.censored].to_numpy()
    return [
        ("paper", paper_estimate(crossed, n)),
        ("typical", typical_estimate(np.concatenate([crossed, caps]), n)),
    ]


def laplace_row(found, n: int, max_coefficient: float) -> EstimateResult:
    """As volume_table computes it: the interval has the probes' spread and the
    quadrature's convergence term."""
    assert found.n_params == n
    return laplace_from_curvature(found, THRESHOLD, max_coefficient)[0]


def print_row(label, name, result, truth, cost, seconds) -> None:
    error = result.estimate - truth if truth is not None else math.nan
    covers = "-" if truth is None or not result.ci_valid else (
        "yes" if result.ci_low <= truth <= result.ci_high else "NO"
    )  # fmt: skip
    interval = f"[{result.ci_low:,.1f}, {result.ci_high:,.1f}]" if result.ci_valid else "withheld"
    print(
        f"{label:>8} {name:<16} {result.estimate:>12,.1f} "
        f"{'' if truth is None else f'{truth:,.1f}':>12} {error:>10,.1f} {interval:>26} "
        f"{covers:>6} {result.ess:>7.1f} {cost:>12} {seconds:>8.1f}"
    )


def header(truth: bool = True) -> None:
    print(
        f"{'n':>8} {'estimator':<16} {'estimate':>12} {'truth' if truth else '':>12} "
        f"{'error (nats)':>10} {'95% interval':>26} {'covers':>6} {'ess':>7} "
        f"{'cost':>12} {'seconds':>8}"
    )


def thermodynamic_row(label, model, x, y, loss_fn, truth, max_coefficient, budget) -> float:
    """Runs the ladder, prints its row and its cross-checks; returns the estimate."""
    began = time.perf_counter()
    result = thermodynamic_log_volume(
        model, x, y, loss_fn, threshold=THRESHOLD, max_coefficient=max_coefficient, **budget
    )
    seconds = time.perf_counter() - began
    print_row(label, "thermodynamic", result, truth, f"{result.loss_evaluations:,} evals", seconds)
    print(
        f"{'':>8} (MBAR; TI {result.thermodynamic_integration:,.1f}, SMC "
        f"{result.sequential_monte_carlo:,.1f}; {len(result.ladder)} rungs, "
        f"{result.radius_searches:,} radius searches, acceptance "
        f"{np.round(result.acceptance[1:], 2).tolist()}, fewest effective samples "
        f"{result.ess:.0f})"
    )
    return result


def radius_rows(basin, truth: float, max_coefficient: float, directions: int, label=None):
    """The radius walk on a basin and the paper and typical rows it gives; its radii."""
    n = basin.n_params
    label = label or n
    began = time.perf_counter()
    meter = RadiusMeter(
        basin.model, basin.x, basin.y, basin.loss_fn, thresholds=(THRESHOLD,),
        max_coefficient=max_coefficient,
    )  # fmt: skip
    frame = meter.measure(0, directions)
    seconds = time.perf_counter() - began
    for name, result in radius_estimates(frame, n):
        print_row(label, name, result, truth, f"{int(frame.evals.sum()):,} evals", seconds)
    return frame


def known_basins(
    sizes: list[int], directions: int, probes: int, steps: int, ladder_max_n: int, budget
) -> None:
    print(
        f"\n1. Least-squares basins, eigenvalues over 4 decades, T = {THRESHOLD}, "
        f"{directions} directions; curvature {probes} probes x {steps} Lanczos steps"
    )
    header()
    for n in sizes:
        began = time.perf_counter()
        basin = quadratic_basin(n, seed=0)
        built = time.perf_counter() - began
        truth = basin.log_volume(THRESHOLD)
        # a cap past the longest radius, so that no direction is censored
        longest = math.sqrt(2 * (THRESHOLD - basin.base_loss) / basin.eigenvalues.min())
        max_coefficient = 2 * longest / math.sqrt(n)
        frame = radius_rows(basin, truth, max_coefficient, directions)
        budgets = [("laplace", probes, steps)]
        if n <= 1000:
            budgets.append(("laplace exact", 2, n))  # Lanczos spans the whole space
        for name, p, s in budgets:
            began = time.perf_counter()
            found = curvature(
                basin.model, basin.x, basin.y, basin.loss_fn, probes=p, lanczos_steps=s
            )
            seconds = time.perf_counter() - began
            result = laplace_row(found, n, max_coefficient)
            print_row(n, name, result, truth, f"{p * min(s, n):,} HVPs", seconds)
        if n <= ladder_max_n:
            ladder = thermodynamic_row(n, basin.model, basin.x, basin.y, basin.loss_fn, truth,
                                       max_coefficient, budget)  # fmt: skip
            LADDER_COSTS.append(("ellipsoid", n, ladder.loss_evaluations, ladder.stderr))
        print(f"{'':>8} (basin built in {built:.1f} s; {frame.censored.sum()} censored)")
        if n > ladder_max_n:
            unrotated_ellipsoid(n, directions, budget)


def unrotated_ellipsoid(n: int, directions: int, budget) -> None:
    """The ladder where the rotated ellipsoid is out of reach: the same spectrum,
    unrotated, in the indexed layout."""
    basin = quadratic_basin(n, seed=0, layout="indexed")
    truth = basin.log_volume(THRESHOLD)
    longest = math.sqrt(2 * (THRESHOLD - basin.base_loss) / basin.eigenvalues.min())
    max_coefficient = 2 * longest / math.sqrt(n)
    label = f"{n:,}u"
    radius_rows(basin, truth, max_coefficient, directions, label)
    ladder = thermodynamic_row(label, basin.model, basin.x, basin.y, basin.loss_fn, truth,
                               max_coefficient, budget)  # fmt: skip
    LADDER_COSTS.append(("ellipsoid", n, ladder.loss_evaluations, ladder.stderr))
    print(f"{'':>8} (u: the unrotated ellipsoid of the same spectrum, indexed layout)")


def cross_polytopes(sizes: list[int], directions: int, budget) -> None:
    print(f"\n2. Cross-polytopes, weights over 4 decades, T = {THRESHOLD}, {directions} directions")
    header()
    for n in sizes:
        basin = cross_polytope_basin(n, seed=0, layout="indexed")
        truth = basin.log_volume(THRESHOLD)
        longest = n * (THRESHOLD - basin.base_loss) / basin.weights.min()  # along e_i
        max_coefficient = 1.5 * longest / math.sqrt(n)
        radius_rows(basin, truth, max_coefficient, directions)
        ladder = thermodynamic_row(n, basin.model, basin.x, basin.y, basin.loss_fn, truth,
                                   max_coefficient, budget)  # fmt: skip
        LADDER_COSTS.append(("cross-polytope", n, ladder.loss_evaluations, ladder.stderr))


def walked_digits_mlp(hidden: list[int], directions: int, lr: float, samples: int | None):
    """A digits MLP trained below 1e-3 on the first `samples` training samples (None:
    all), and its radius walk: (model, x, y, widths, meter, radii, seconds)."""
    source = load_source("digits")
    x, y = source.x_train[:samples], source.y_train[:samples]
    model = build_model("mlp", source.input_shape, 10, hidden=hidden, seed=0)
    train(model, (x, y), None, F.cross_entropy, TrainConfig(lr=lr, epochs=3000,
                                                             target_loss=1e-3))  # fmt: skip
    widths = "-".join(map(str, [64, *hidden, 10]))
    began = time.perf_counter()
    meter = RadiusMeter(model, x, y, F.cross_entropy, thresholds=(THRESHOLD,))
    frame = meter.measure(0, directions)
    return model, x, y, widths, meter, frame, time.perf_counter() - began


def digits_network(hidden: list[int], directions: int, probes: int, steps: int) -> None:
    model, x, y, widths, meter, frame, walk_seconds = walked_digits_mlp(
        hidden, directions, lr=1e-3, samples=None
    )
    n = meter.landscape.params.count
    base = meter.landscape.base_total / meter.landscape.size
    print(
        f"\n3. Digits MLP {widths} ({n:,} parameters) on {len(x):,} samples, base loss "
        f"{base:.2e}, T = {THRESHOLD}, {directions} directions"
    )
    header(truth=False)
    for name, result in radius_estimates(frame, n):
        print_row(n, name, result, None, f"{int(frame.evals.sum()):,} evals", walk_seconds)
    began = time.perf_counter()
    found = curvature(model, x, y, F.cross_entropy, probes=probes, lanczos_steps=steps)
    curvature_seconds = time.perf_counter() - began
    print_row(n, "laplace", laplace_row(found, n, 1.0), None,
              f"{probes * steps:,} HVPs", curvature_seconds)  # fmt: skip
    began = time.perf_counter()
    quadratic = RadiusMeter(model, x, y, F.cross_entropy, thresholds=(THRESHOLD,),
                            quadratic_radii=True).measure(0, directions)  # fmt: skip
    quadratic_seconds = time.perf_counter() - began - walk_seconds
    ratio = (quadratic.radius / quadratic.radius_quadratic).to_numpy()
    print(
        f"top eigenvalues {np.array2string(found.top_eigenvalues, precision=3)}; trace "
        f"{found.trace:.3g} ± {found.trace_stderr:.2g}"
    )
    print(
        f"measured / quadratic radius: median {np.median(ratio):.3f}, 5-95% "
        f"{np.quantile(ratio, 0.05):.3f}-{np.quantile(ratio, 0.95):.3f}; their 1 HVP per "
        f"direction costs about {quadratic_seconds:.1f} s more than the walk"
    )
    print(
        f"curvature cost: {curvature_seconds / walk_seconds:.1f}x the {directions}-direction "
        f"radius walk on the same pair ({curvature_seconds:.1f} s against {walk_seconds:.1f} s)"
    )


def small_network(
    hidden: list[int], directions: int, probes: int, steps: int, budget, samples: int | None = None
) -> None:
    """All four estimators on a digits MLP small enough for the ladder here, on the
    first `samples` training samples (None: all)."""
    model, x, y, widths, meter, frame, walk_seconds = walked_digits_mlp(
        hidden, directions, lr=1e-2, samples=samples
    )
    n = meter.landscape.params.count
    print(
        f"\n4. Digits MLP {widths} ({n:,} parameters) on {len(x):,} samples, T = {THRESHOLD}, "
        f"{directions} directions"
    )
    header(truth=False)
    rows = radius_estimates(frame, n)
    for name, result in rows:
        print_row(n, name, result, None, f"{int(frame.evals.sum()):,} evals", walk_seconds)
    began = time.perf_counter()
    found = curvature(model, x, y, F.cross_entropy, probes=probes, lanczos_steps=steps)
    print_row(n, "laplace", laplace_row(found, n, 1.0), None, f"{probes * steps:,} HVPs",
              time.perf_counter() - began)  # fmt: skip
    ladder = thermodynamic_row(n, model, x, y, F.cross_entropy, None, 1.0, budget)
    LADDER_COSTS.append(("digits MLP", n, ladder.loss_evaluations, ladder.stderr))
    for name, result in rows:
        print(
            f"{name} sits {result.estimate - ladder.estimate:+,.1f} nats from the thermodynamic "
            f"value ({(result.estimate - ladder.estimate) / n:+.4f} per parameter)"
        )


def scaling() -> None:
    """Loss evaluations to a standard error of TARGET_STDERR against n, per basin kind,
    and the projection for the MNIST MLP from the largest two sizes of each kind. A
    run less precise than the target is scaled up by (stderr / target)^2 (sampling
    error falls as 1/sqrt(cost)); a more precise one counts as it is, since a ladder
    at the default chains is the least one runs."""
    print(f"\n5. Thermodynamic ladder cost against n, at a standard error of {TARGET_STDERR} nats")
    for kind in dict.fromkeys(k for k, *_ in LADDER_COSTS):
        points = []
        for k, n, spent, stderr in LADDER_COSTS:
            if k != kind or not (math.isfinite(stderr) and stderr > 0):
                continue
            points.append((n, spent * max(1.0, (stderr / TARGET_STDERR) ** 2)))
            print(
                f"{kind:>15} {n:>8,}: {points[-1][1]:>14,.0f} loss evaluations "
                f"({spent:,} spent for {stderr:.2f} nats)"
            )
        if len(points) < 2 or kind == "digits MLP":
            continue
        (n0, c0), (n1, c1) = points[-2], points[-1]
        power = math.log(c1 / c0) / math.log(n1 / n0)
        projected = c1 * (MNIST_MLP / n1) ** power
        hours = projected * GPU_SECONDS_PER_EVALUATION / 3600
        print(
            f"{kind:>15}: cost grows as n^{power:.2f}; for the MNIST MLP ({MNIST_MLP:,} "
            f"parameters) {projected:,.3g} loss evaluations, about {hours:,.1f} h on one GPU at "
            f"{GPU_SECONDS_PER_EVALUATION * 1e3:g} ms an evaluation (assumed; issue 17 measures it)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="small sizes, for CI")
    parser.add_argument(
        "--thermodynamic-max-n", type=int, default=1000, help="largest basin for the ladder"
    )
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=[100, 1000, 10_000], help="n of the known basins"
    )
    parser.add_argument("--no-networks", action="store_true", help="skip sections 3 and 4")
    args = parser.parse_args()
    if args.smoke:
        small = {"chains": 8, "steps": 4, "whitening_directions": 500}
        known_basins([100], directions=50, probes=8, steps=32, ladder_max_n=0, budget=small)
        cross_polytopes([30, 60], directions=50, budget=small)
        digits_network([32], directions=40, probes=4, steps=16)
    else:
        known_basins(args.sizes, directions=500, probes=32, steps=64,
                     ladder_max_n=args.thermodynamic_max_n, budget={})  # fmt: skip
        cross_polytopes(args.sizes, directions=500, budget={})
        if not args.no_networks:
            digits_network([256, 256], directions=500, probes=32, steps=64)
            small_network([32], directions=500, probes=32, steps=64, budget={})
    scaling()


if __name__ == "__main__":
    main()
