"""`volume-ray`: the command line.

`demo` trains one MLP on the embedded digits set and measures the volume of its
minimum in this process, without Ray: the quickest check that an install works and
what the numbers look like. Sweeps over many models arrive with the Ray service.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main"]


def _demo(args: argparse.Namespace) -> int:
    import torch
    import torch.nn.functional as F

    from volume_ray.data import load_source
    from volume_ray.directions import perturbed_parameters
    from volume_ray.estimators import volume_table
    from volume_ray.measure import measure_radii
    from volume_ray.models import build_model
    from volume_ray.store import write_table
    from volume_ray.train import TrainConfig, train

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)))
    source = load_source("digits", seed=args.seed)
    x, y = source.x_train, source.y_train
    model = build_model("mlp", source.input_shape, 10, hidden=args.hidden, seed=args.seed)
    started = time.perf_counter()
    config = TrainConfig(epochs=args.epochs, target_loss=1e-3, seed=args.seed)
    history = train(model, (x, y), (source.x_test, source.y_test), F.cross_entropy, config)
    print(
        f"trained MLP 64-{'-'.join(map(str, args.hidden))}-10 on {len(x)} digits: train loss "
        f"{history[-1]['train_loss']:.2e}, test accuracy {history[-1]['test_acc']:.1%} after "
        f"{len(history)} epochs ({time.perf_counter() - started:.1f} s)"
    )
    started = time.perf_counter()
    radii = measure_radii(
        model, x, y, F.cross_entropy, num_directions=args.directions, thresholds=args.thresholds
    )
    n_params = perturbed_parameters(model).count
    volumes = volume_table(radii, n_params)
    print(
        f"measured {args.directions} directions x {len(args.thresholds)} thresholds "
        f"({radii.evals.mean():.1f} evaluations per direction, "
        f"{time.perf_counter() - started:.1f} s)\n"
    )
    shown = volumes[volumes.estimator == "paper"][
        ["threshold", "log_volume", "ci_low", "ci_high", "n_censored", "mean_radius"]
    ]
    print(shown.to_string(index=False, float_format=lambda v: f"{v:,.2f}"))
    out = Path(args.out)
    write_table(radii, out / "radii.parquet")
    write_table(volumes, out / "volumes.parquet")
    print(f"\nwrote {out / 'radii.parquet'} and {out / 'volumes.parquet'}")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="volume-ray", description="Measure the volume of loss-landscape minima."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo", help="train an MLP on the embedded digits set and measure its minimum"
    )
    demo.add_argument("--directions", type=_positive_int, default=200)
    demo.add_argument("--thresholds", type=float, nargs="+", default=[0.1, 0.05, 0.02, 0.01])
    demo.add_argument("--hidden", type=_positive_int, nargs="+", default=[256, 256])
    demo.add_argument("--epochs", type=_positive_int, default=2000)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--out", default="results/demo", help="folder for the Parquet tables")
    demo.set_defaults(run=_demo)
    return parser


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.run(args)
    except ValueError as error:  # bad input: the message names the field and the fix
        print(f"volume-ray: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
