"""Volume estimators against basins of known volume, and side by side on a real network.

1. Least-squares basins (`volume_ray.basins.quadratic_basin`): Hessian eigenvalues
   spread evenly in log over 4 decades under a random rotation, so the truth is
   (n/2) ln(2 dL) - 1/2 sum ln(lambda). For n = 100, 1,000 and 10,000, every estimator
   prints its estimate, the truth, the error in nats, its 95% interval and whether it
   covers, the ESS, the cost (loss evaluations of the radius walks, Hessian-vector
   products of the curvature) and seconds.
2. The digits MLP 64-256-256-10 (1,437 samples, trained below 1e-3): paper, typical and
   laplace side by side, the quadratic radii against the measured ones, and the
   curvature's cost as a multiple of the 500-direction radius walk on the same pair.

    python benchmarks/bench_estimators.py            # about 5 minutes on 2 cores
    python benchmarks/bench_estimators.py --smoke    # seconds, for CI
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch.nn.functional as F

from volume_ray.basins import quadratic_basin
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
from volume_ray.train import TrainConfig, train

THRESHOLD = 0.1


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


def known_basins(sizes: list[int], directions: int, probes: int, steps: int) -> None:
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
        began = time.perf_counter()
        meter = RadiusMeter(
            basin.model, basin.x, basin.y, basin.loss_fn, thresholds=(THRESHOLD,),
            max_coefficient=max_coefficient,
        )  # fmt: skip
        frame = meter.measure(0, directions)
        walk_seconds = time.perf_counter() - began
        evals = f"{int(frame.evals.sum()):,} evals"
        for name, result in radius_estimates(frame, n):
            print_row(n, name, result, truth, evals, walk_seconds)
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
        print(f"{'':>8} (basin built in {built:.1f} s; {frame.censored.sum()} censored)")


def digits_network(hidden: list[int], directions: int, probes: int, steps: int) -> None:
    source = load_source("digits")
    x, y = source.x_train, source.y_train
    model = build_model("mlp", source.input_shape, 10, hidden=hidden, seed=0)
    train(model, (x, y), None, F.cross_entropy, TrainConfig(lr=1e-3, epochs=3000,
                                                             target_loss=1e-3))  # fmt: skip
    widths = "-".join(map(str, [64, *hidden, 10]))
    began = time.perf_counter()
    meter = RadiusMeter(model, x, y, F.cross_entropy, thresholds=(THRESHOLD,))
    frame = meter.measure(0, directions)
    walk_seconds = time.perf_counter() - began
    n = meter.landscape.params.count
    base = meter.landscape.base_total / meter.landscape.size
    print(
        f"\n2. Digits MLP {widths} ({n:,} parameters) on {len(x):,} samples, base loss "
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="small sizes, for CI")
    args = parser.parse_args()
    if args.smoke:
        known_basins([100], directions=50, probes=8, steps=32)
        digits_network([32], directions=40, probes=4, steps=16)
    else:
        known_basins([100, 1000, 10_000], directions=500, probes=32, steps=64)
        digits_network([256, 256], directions=500, probes=32, steps=64)


if __name__ == "__main__":
    main()
