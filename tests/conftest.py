"""Shared fixtures: small real models trained on real data, built once per session."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from volume_ray.data import load_source
from volume_ray.models import MLP, build_model
from volume_ray.train import TrainConfig, train

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """600 of sklearn's real 8x8 digits."""
    source = load_source("digits")
    return source.x_train[:600], source.y_train[:600]


@pytest.fixture(scope="session")
def digits_mlp(digits) -> MLP:
    """A 64-32-10 MLP trained on `digits` to a train loss below 1e-3."""
    model = build_model("mlp", (64,), 10, hidden=[32], seed=0)
    config = TrainConfig(lr=1e-2, epochs=2000, target_loss=1e-3)
    history = train(model, digits, None, F.cross_entropy, config)
    assert history[-1]["train_loss"] < 1e-3
    return model


@pytest.fixture
def model(digits_mlp) -> MLP:
    """A private copy of the trained MLP, so a test may not leak changes into another."""
    copy = MLP(64, [32], 10)
    copy.load_state_dict(digits_mlp.state_dict())
    return copy.eval()


def measure_command(spec: dict, storage: Path) -> list[str]:
    """`volume-ray measure` of `spec` (written beside the store) into `storage`."""
    spec_path = storage / f"{spec['name']}.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    return [sys.executable, "-m", "volume_ray.cli", "measure", str(spec_path),
            "--storage", str(storage)]  # fmt: skip


def kill_when(command: list[str], ready: Callable[[], bool], timeout: float) -> None:
    """Run `command` in a session of its own and SIGKILL the whole session (driver, Ray
    and its workers) once `ready()` holds, or after `timeout` seconds."""
    process = subprocess.Popen(command, start_new_session=True, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + timeout
    while not ready() and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
