"""The datasets that ship with the dependencies or are generated: no files, no network.

Each loader returns a `Source`: train and test tensors, loaded once, plus the task
that decides the loss. Generated sets are deterministic given their seed and never
touch the global RNGs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "TASKS",
    "MissingDataError",
    "Source",
    "load_char_text",
    "load_digits",
    "load_mnist1d",
    "load_modular",
    "load_swiss_roll",
]

# classification: integer labels, cross-entropy. binary: one logit, BCE.
# onehot_mse: one-hot float targets, MSE. language: next-character labels per position.
TASKS = ("classification", "binary", "onehot_mse", "language")
TEST_FRACTION = 0.2  # held out by sets that come without a test split


class MissingDataError(ValueError):
    """A file-based dataset whose files are not where the spec says."""


@dataclass(frozen=True)
class Source:
    """A dataset in memory. `x_*` are float inputs (token ids for `language`)."""

    name: str
    task: str
    num_classes: int
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])


def _hold_out(x: torch.Tensor, y: torch.Tensor, seed: int) -> tuple[torch.Tensor, ...]:
    """Split off TEST_FRACTION of (x, y) as a test set, by a seeded permutation."""
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_test = math.ceil(len(x) * TEST_FRACTION)
    test, train = order[:n_test], order[n_test:]
    return x[train], y[train], x[test], y[test]


def _standardise(train: torch.Tensor, test: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-feature standardisation with the training statistics. A feature constant in
    training (a border pixel) is only centred: dividing by its ~0 spread would blow a
    test sample's stray value up into an enormous input."""
    mean, std = train.mean(0), train.std(0)
    std = torch.where(std > 1e-6, std, torch.ones_like(std))
    return (train - mean) / std, (test - mean) / std


def load_digits(seed: int = 0) -> Source:
    """sklearn's 1,797 real 8x8 handwritten digits, 20% held out for testing."""
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    x = torch.as_tensor(bunch.data, dtype=torch.float32)  # (1797, 64), pixel values 0..16
    y = torch.as_tensor(bunch.target, dtype=torch.int64)
    x_train, y_train, x_test, y_test = _hold_out(x, y, seed)
    x_train, x_test = _standardise(x_train, x_test)
    return Source("digits", "classification", 10, x_train, y_train, x_test, y_test)


def load_mnist1d(seed: int = 42) -> Source:
    """MNIST-1D, generated offline by the `mnist1d` package: 4,000 train and 1,000
    test sequences of length 40 (its default arguments, with `seed`)."""
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.seed = seed
    state = np.random.get_state()  # noqa: NPY002 - make_dataset seeds numpy's global RNG
    try:
        data = make_dataset(args)
    finally:
        np.random.set_state(state)  # noqa: NPY002
    x_train, x_test = _standardise(
        torch.as_tensor(data["x"], dtype=torch.float32),
        torch.as_tensor(data["x_test"], dtype=torch.float32),
    )
    return Source(
        "mnist1d", "classification", 10, x_train,
        torch.as_tensor(data["y"], dtype=torch.int64), x_test,
        torch.as_tensor(data["y_test"], dtype=torch.int64),
    )  # fmt: skip


def swiss_roll(
    n: int, generator: torch.Generator, turns: float = 1.7, noise: float = 0.3
) -> tuple[torch.Tensor, torch.Tensor]:
    """`n` points of two interleaved spirals: x (n, 2), binary labels y (n, 1) float.

    Points are uniform along the arc of `turns` turns; the second spiral is the first
    rotated by half a turn; Gaussian noise of std `noise` is added to both coordinates.
    """
    labels = torch.randint(0, 2, (n,), generator=generator)
    angle = torch.sqrt(torch.rand(n, generator=generator)) * turns * 2 * math.pi  # (n,)
    sign = 1.0 - 2.0 * labels  # class 1 is rotated by pi
    points = torch.stack([angle * torch.cos(angle), angle * torch.sin(angle)], dim=1)
    points = points * sign[:, None] + noise * torch.randn(n, 2, generator=generator)
    return points.float(), labels.float()[:, None]


def load_swiss_roll(seed: int = 0, n_train: int = 2000, n_test: int = 1000) -> Source:
    """The two-spiral problem of the paper (1.7 turns, noise 0.3), generated."""
    generator = torch.Generator().manual_seed(seed)
    x_train, y_train = swiss_roll(n_train, generator)
    x_test, y_test = swiss_roll(n_test, generator)
    return Source("swiss_roll", "binary", 2, x_train, y_train, x_test, y_test)


def load_modular(seed: int = 0, modulus: int = 97, train_fraction: float = 0.3) -> Source:
    """(a + b) mod p for every pair, inputs one-hot(a) ++ one-hot(b) (2p,), targets
    one-hot (p,) for an MSE head; `train_fraction` of the p*p pairs train, the rest test."""
    if not 0 < train_fraction < 1:
        raise ValueError(f"train_fraction must lie in (0, 1), got {train_fraction!r}")
    a, b = torch.meshgrid(torch.arange(modulus), torch.arange(modulus), indexing="ij")
    a, b = a.reshape(-1), b.reshape(-1)  # (p*p,)
    eye = torch.eye(modulus)
    x = torch.cat([eye[a], eye[b]], dim=1)  # (p*p, 2p)
    y = eye[(a + b) % modulus]  # (p*p, p)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_train = round(train_fraction * len(x))
    train, test = order[:n_train], order[n_train:]
    return Source("modular", "onehot_mse", modulus, x[train], y[train], x[test], y[test])


def load_char_text(path: str | Path, seed: int = 0, block_size: int = 256) -> Source:
    """Character-level windows of a text file for next-character prediction.

    The text is cut into non-overlapping windows of `block_size + 1` characters; a
    window gives inputs (its first block_size ids) and targets (the next ids). The
    vocabulary is every character of the file, sorted.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingDataError(
            f"dataset 'char_text' reads the text file named by dataset.root, and {path} "
            "is not a file: point root at any UTF-8 text file (a book, code, ...)"
        )
    text = path.read_text(encoding="utf-8")
    vocabulary = sorted(set(text))
    index = {ch: i for i, ch in enumerate(vocabulary)}
    ids = torch.tensor([index[ch] for ch in text], dtype=torch.int64)
    n_windows = len(ids) // (block_size + 1)
    if n_windows < 2:
        raise ValueError(
            f"{path} holds {len(ids)} characters: too few for two windows of "
            f"block_size + 1 = {block_size + 1}; use a longer text or a smaller block_size"
        )
    windows = ids[: n_windows * (block_size + 1)].view(n_windows, block_size + 1)
    x_train, y_train, x_test, y_test = _hold_out(windows[:, :-1], windows[:, 1:], seed)
    return Source("char_text", "language", len(vocabulary), x_train, y_train, x_test, y_test)
