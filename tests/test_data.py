"""Datasets load through the real loaders; manipulations are exact and reproducible."""

import pickle
import struct

import numpy as np
import pytest
import scipy.io
import torch

from volume_ray.data import DATASETS, load_source, split_experiment
from volume_ray.data.sources import swiss_roll

# -- torchvision sets from small files in their real on-disk formats ----------------------


def write_idx(folder, prefix, images, labels):
    """MNIST's IDX format: big-endian magic and sizes, then raw uint8."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"{prefix}-images-idx3-ubyte", "wb") as f:
        f.write(struct.pack(">IIII", 0x803, *images.shape) + images.tobytes())
    with open(folder / f"{prefix}-labels-idx1-ubyte", "wb") as f:
        f.write(struct.pack(">II", 0x801, len(labels)) + labels.tobytes())


def images(n, shape, seed):
    return np.random.default_rng(seed).integers(0, 256, size=(n, *shape), dtype=np.uint8)


def labels(n, seed):
    return np.random.default_rng(seed).integers(0, 10, size=n, dtype=np.uint8)


@pytest.mark.parametrize("name,folder", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_idx_sets_load(tmp_path, name, folder):
    train_x, test_x = images(12, (28, 28), 0), images(5, (28, 28), 1)
    train_y, test_y = labels(12, 2), labels(5, 3)
    write_idx(tmp_path / folder / "raw", "train", train_x, train_y)
    write_idx(tmp_path / folder / "raw", "t10k", test_x, test_y)
    source = load_source(name, root=tmp_path)
    assert source.x_train.shape == (12, 1, 28, 28) and source.x_test.shape == (5, 1, 28, 28)
    assert source.y_train.tolist() == train_y.tolist()
    mean, std = {"mnist": (0.1307, 0.3081), "fashion_mnist": (0.2860, 0.3530)}[name]
    expected = (torch.as_tensor(train_x[3]).float() / 255 - mean) / std
    torch.testing.assert_close(source.x_train[3, 0], expected)


def test_cifar10_loads_pickled_batches(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    batches = {}
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        data, y = images(3, (3072,), i), labels(3, 10 + i).tolist()
        batches[name] = (data, y)
        with open(folder / name, "wb") as f:
            pickle.dump({"data": data, "labels": y}, f)
    source = load_source("cifar10", root=tmp_path)
    assert source.x_train.shape == (15, 3, 32, 32) and source.x_test.shape == (3, 3, 32, 32)
    assert source.y_test.tolist() == batches["test_batch"][1]
    red = torch.as_tensor(batches["data_batch_1"][0][0, :1024].reshape(32, 32)).float() / 255
    torch.testing.assert_close(source.x_train[0, 0], (red - 0.4914) / 0.2470)


def test_svhn_loads_mat_files_and_maps_label_10_to_0(tmp_path):
    for split, n in (("train", 6), ("test", 4)):
        x = images(n, (32, 32, 3), n).transpose(1, 2, 3, 0)  # (32, 32, 3, N) as SVHN stores it
        y = np.arange(1, n + 1).reshape(n, 1) * 0 + 10  # every label "10", i.e. digit 0
        y[0] = 3
        scipy.io.savemat(tmp_path / f"{split}_32x32.mat", {"X": x, "y": y})
    source = load_source("svhn", root=tmp_path)
    assert source.x_train.shape == (6, 3, 32, 32)
    assert source.y_train.tolist() == [3, 0, 0, 0, 0, 0]


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist", "cifar10", "svhn"])
def test_missing_files_say_where_and_how(tmp_path, name):
    with pytest.raises(ValueError, match=rf"(?s){tmp_path}.*download=True"):
        load_source(name, root=tmp_path)
    with pytest.raises(ValueError, match="dataset.root"):
        load_source(name)


def test_unknown_dataset_lists_the_valid_names():
    with pytest.raises(ValueError, match="mnist1d"):
        load_source("imagenet")
    assert set(DATASETS) >= {"digits", "mnist1d", "swiss_roll", "modular", "char_text", "svhn"}


# -- embedded and generated sets --------------------------------------------------------------


def test_embedded_sets_have_their_shapes():
    digits = load_source("digits")
    assert digits.x_train.shape[1:] == (64,) and len(digits.x_train) + len(digits.x_test) == 1797
    mnist1d = load_source("mnist1d")
    assert mnist1d.x_train.shape == (4000, 40) and mnist1d.x_test.shape == (1000, 40)
    modular = load_source("modular")
    assert len(modular.x_train) == round(0.3 * 97 * 97) and modular.x_train.shape[1] == 194
    assert (modular.x_train.sum(1) == 2).all() and (modular.y_train.sum(1) == 1).all()
    a, b = modular.x_train[:, :97].argmax(1), modular.x_train[:, 97:].argmax(1)
    assert torch.equal(modular.y_train.argmax(1), (a + b) % 97)


def test_swiss_roll_is_two_spirals_of_1_7_turns():
    x, y = swiss_roll(4000, torch.Generator().manual_seed(0), noise=0.0)
    angle = x.norm(dim=1)  # radius = angle along the arc, without noise
    assert angle.max() == pytest.approx(1.7 * 2 * np.pi, rel=1e-2)
    assert 0.45 < y.mean() < 0.55
    mirrored = -x[y[:, 0] == 1]  # class 1 is class 0 rotated by half a turn
    direction = torch.stack([torch.cos(mirrored.norm(dim=1)), torch.sin(mirrored.norm(dim=1))], 1)
    torch.testing.assert_close(mirrored, direction * mirrored.norm(dim=1, keepdim=True))


def test_char_text_windows(tmp_path):
    text = "hello world, " * 100
    (tmp_path / "book.txt").write_text(text)
    source = load_source("char_text", root=tmp_path / "book.txt", block_size=16)
    assert source.task == "language" and source.num_classes == len(set(text))
    assert source.x_train.shape[1] == 16
    torch.testing.assert_close(source.x_train[:, 1:], source.y_train[:, :-1])
    with pytest.raises(ValueError, match="not a file"):
        load_source("char_text", root=tmp_path / "missing.txt")


def test_generated_sets_leave_the_global_rngs_alone():
    torch.manual_seed(5)
    np.random.seed(5)  # noqa: NPY002 - checking that the global state survives
    expected = (torch.rand(3), np.random.rand(3))  # noqa: NPY002
    torch.manual_seed(5)
    np.random.seed(5)  # noqa: NPY002
    for name in ("digits", "mnist1d", "swiss_roll", "modular"):
        load_source(name)
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1])  # noqa: NPY002


# -- manipulations ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits():
    return load_source("digits")


def test_base_and_pool_are_disjoint_nested_and_reproducible(digits):
    data = split_experiment(digits, base_size=100, pool_size=500, data_seed=3)
    base_rows = {tuple(r) for r in data.base_x.tolist()}
    pool_rows = {tuple(r) for r in data.pool_x.tolist()}
    assert not base_rows & pool_rows
    small, large = data.training_set(200), data.training_set(500)
    assert torch.equal(small[0], large[0][:300]) and torch.equal(small[1], large[1][:300])
    again = split_experiment(digits, base_size=100, pool_size=500, data_seed=3)
    assert torch.equal(again.pool_x, data.pool_x)
    other = split_experiment(digits, base_size=100, pool_size=500, data_seed=4)
    assert not torch.equal(other.base_x, data.base_x)


def test_poisoned_labels_are_all_wrong(digits):
    clean = split_experiment(digits, base_size=100, pool_size=800, data_seed=1)
    poisoned = split_experiment(
        digits, base_size=100, pool_size=800, data_seed=1, extra_kind="poison"
    )
    assert torch.equal(poisoned.pool_x, clean.pool_x)
    assert (poisoned.pool_y != clean.pool_y).all()
    assert set(((poisoned.pool_y - clean.pool_y) % 10).tolist()) == set(range(1, 10))
    assert torch.equal(poisoned.landscape_set(800)[0], clean.base_x)  # clean base only


def test_binary_poison_flips_every_label():
    roll = load_source("swiss_roll")
    clean = split_experiment(roll, base_size=50, pool_size=300)
    poisoned = split_experiment(roll, base_size=50, pool_size=300, extra_kind="poison")
    assert torch.equal(poisoned.pool_y, 1 - clean.pool_y)


def test_imbalance_fraction_is_exact_in_every_prefix(digits):
    data = split_experiment(
        digits, base_size=100, pool_size=140, extra_kind="imbalanced", imbalance_class=0,
        imbalance_fraction=0.9,
    )  # fmt: skip
    majority = (data.pool_y == 0).cumsum(0)
    for m in range(1, 141):
        assert majority[m - 1] == int(np.floor(m * 0.9))


def test_noise_matches_the_base_statistics(digits):
    data = split_experiment(digits, base_size=200, pool_size=20000, extra_kind="noise")
    torch.testing.assert_close(data.pool_x.mean(0), data.base_x.mean(0), atol=0.05, rtol=0)
    torch.testing.assert_close(data.pool_x.std(0), data.base_x.std(0), atol=0.05, rtol=0.03)
    assert set(data.pool_y.tolist()) == set(range(10))
    assert torch.equal(data.landscape_set(20000)[0], data.base_x)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"base_size": 100, "pool_size": 5000}, r"only 1337 remain"),
        ({"base_size": 5000, "pool_size": 10}, r"1\.\.1437"),
        ({"base_size": 100, "pool_size": 10, "extra_kind": "mislabel"}, "extra_kind"),
        ({"base_size": 100, "pool_size": 1300, "extra_kind": "imbalanced"}, "class 0"),
    ],
)
def test_impossible_sizes_say_what_is_available(digits, kwargs, match):
    with pytest.raises(ValueError, match=match):
        split_experiment(digits, **kwargs)


def test_manipulations_need_classes():
    with pytest.raises(ValueError, match="needs class labels"):
        split_experiment(load_source("modular"), base_size=10, pool_size=10, extra_kind="poison")
