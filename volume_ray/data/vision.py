"""Image datasets from files under a local root, through torchvision's own loaders.

Nothing is downloaded unless asked (`download=True`). A missing root or file gives an
error that names the path expected and how to get the data. Images become float
tensors (N, C, H, W), normalised with the usual per-channel statistics of each set.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torchvision import datasets

from volume_ray.data.sources import MissingDataError, Source

__all__ = ["VISION_DATASETS", "load_vision"]


CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip


class _CIFAR10(datasets.CIFAR10):
    """CIFAR-10 that checks its batch files are present rather than their MD5 sums,
    so re-packed or trimmed copies load; parsing is torchvision's own."""

    def _check_integrity(self) -> bool:
        base = Path(self.root, self.base_folder)
        return all((base / name).is_file() for name, _ in self.train_list + self.test_list)

    def _load_meta(self) -> None:  # the class names are fixed; skip batches.meta
        self.classes = list(CIFAR10_CLASSES)
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}


class _SVHN(datasets.SVHN):
    """SVHN that checks its .mat file is present rather than its MD5 sum."""

    def _check_integrity(self) -> bool:
        return Path(self.root, self.filename).is_file()


@dataclass(frozen=True)
class _Vision:
    loader: type
    public: str  # the torchvision class that downloads it
    files: tuple[str, ...]  # expected under root
    mean: tuple[float, ...]  # per channel, of the training images in [0, 1]
    std: tuple[float, ...]


def _idx_files(folder: str) -> tuple[str, ...]:
    return tuple(
        f"{folder}/raw/{split}-{kind}-idx{3 if kind == 'images' else 1}-ubyte"
        for split in ("train", "t10k")
        for kind in ("images", "labels")
    )


CIFAR_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
VISION_DATASETS = {
    "mnist": _Vision(datasets.MNIST, "MNIST", _idx_files("MNIST"), (0.1307,), (0.3081,)),
    "fashion_mnist": _Vision(
        datasets.FashionMNIST, "FashionMNIST", _idx_files("FashionMNIST"), (0.2860,), (0.3530,)
    ),
    "cifar10": _Vision(
        _CIFAR10, "CIFAR10",
        tuple(f"cifar-10-batches-py/{b}" for b in [*CIFAR_TRAIN_BATCHES, "test_batch"]),
        (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
    ),
    "svhn": _Vision(
        _SVHN, "SVHN", ("train_32x32.mat", "test_32x32.mat"),
        (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970),
    ),
}  # fmt: skip


def load_vision(name: str, root: str | Path | None, download: bool = False) -> Source:
    """Load `name` (see VISION_DATASETS) from `root` into normalised tensors."""
    spec = VISION_DATASETS[name]
    if root is None:
        raise MissingDataError(
            f"dataset '{name}' is read from files: set dataset.root to the folder that "
            f"holds {spec.files[0]}"
        )
    root = Path(root)
    missing = [str(root / f) for f in spec.files if not (root / f).is_file()]
    if missing and not download:
        raise MissingDataError(
            f"dataset '{name}': missing {', '.join(missing)}. Fetch them once where there "
            f"is network with torchvision.datasets.{spec.public}(root='{root}', "
            "download=True) and copy the folder here, or set dataset.download: true"
        )
    splits = []
    for train in (True, False):
        if name == "svhn":
            dataset = spec.loader(root, split="train" if train else "test", download=download)
            images, labels = dataset.data, dataset.labels  # (N, 3, 32, 32) uint8
        else:
            dataset = spec.loader(root, train=train, download=download)
            images, labels = dataset.data, dataset.targets
        images = torch.as_tensor(np.asarray(images))
        if images.dim() == 3:  # MNIST-like (N, 28, 28)
            images = images[:, None]
        elif images.shape[-1] == 3:  # CIFAR-10 (N, 32, 32, 3)
            images = images.permute(0, 3, 1, 2)
        x = images.float() / 255.0
        x = (x - torch.tensor(spec.mean)[:, None, None]) / torch.tensor(spec.std)[:, None, None]
        splits += [x.contiguous(), torch.as_tensor(np.asarray(labels), dtype=torch.int64)]
    return Source(name, "classification", 10, *splits)
