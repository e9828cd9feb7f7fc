"""Training throughput on this machine, in samples per second.

- the digits MLP 64-256-256-10 (full batch, AdamW), on sklearn's digits;
- the paper's MNIST CNN (conv 32, 64 + fc 128) on MNIST-shaped inputs (random pixels:
  the speed does not depend on the values, and MNIST itself needs files);
- for the digits MLP, mini-batches of 128 against full batch: throughput, and epochs
  and seconds to reach a train loss of 1e-3.

    python benchmarks/bench_training.py            # about a minute on 2 cores
    python benchmarks/bench_training.py --smoke    # seconds, for CI
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F

from volume_ray.data import load_source
from volume_ray.models import build_model, count_parameters
from volume_ray.train import TrainConfig, train


def throughput(model, data, config) -> tuple[float, int, float, float]:
    """(samples/s, epochs run, seconds, last train loss) of one training run."""
    start = time.perf_counter()
    history = train(model, data, None, F.cross_entropy, config)
    seconds = time.perf_counter() - start
    return len(history) * len(data[0]) / seconds, len(history), seconds, history[-1]["train_loss"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, to check it runs")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)))
    epochs = 3 if args.smoke else 30
    source = load_source("digits")
    digits = (source.x_train, source.y_train)
    hidden = [32] if args.smoke else [256, 256]

    mlp = build_model("mlp", (64,), 10, hidden=hidden, seed=0)
    rate, *_ = throughput(mlp, digits, TrainConfig(epochs=epochs))
    print(f"digits MLP 64-{'-'.join(map(str, hidden))}-10, full batch: {rate:12,.0f} samples/s")

    size = 256 if args.smoke else 4096
    images = torch.randn(size, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    mnist = (images, torch.randint(0, 10, (size,), generator=torch.Generator().manual_seed(1)))
    cnn = build_model("cnn", (1, 28, 28), 10, channels=[32, 64], hidden=[128], seed=0)
    rate, *_ = throughput(cnn, mnist, TrainConfig(epochs=1 if args.smoke else 3, batch_size=512))
    print(f"MNIST CNN ({count_parameters(cnn):,} params), batch 512: {rate:10,.0f} samples/s")

    target = TrainConfig(epochs=20 if args.smoke else 3000, target_loss=1e-3)
    for label, batch in (("full batch", None), ("batch 128 ", 128)):
        model = build_model("mlp", (64,), 10, hidden=hidden, seed=0)
        config = TrainConfig(epochs=target.epochs, target_loss=1e-3, batch_size=batch)
        rate, ran, seconds, loss = throughput(model, digits, config)
        print(
            f"digits MLP, {label}: {rate:10,.0f} samples/s; train loss {loss:.1e} after "
            f"{ran} epochs, {seconds:.1f} s (target 1e-3)"
        )


if __name__ == "__main__":
    main()
