"""Shared fixtures: small real models trained on real data, built once per session."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from volume_ray.data import load_digits
from volume_ray.models import MLP
from volume_ray.train import train

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """600 of sklearn's real 8x8 digits."""
    x, y = load_digits()
    return x[:600], y[:600]


@pytest.fixture(scope="session")
def digits_mlp(digits) -> MLP:
    """A 64-32-10 MLP trained on `digits` to a train loss below 1e-3."""
    x, y = digits
    torch.manual_seed(0)
    model = MLP(64, [32], 10)
    history = train(model, x, y, F.cross_entropy, lr=1e-2, epochs=2000, target_loss=1e-3)
    assert history[-1] < 1e-3
    return model


@pytest.fixture
def model(digits_mlp) -> MLP:
    """A private copy of the trained MLP, so a test may not leak changes into another."""
    copy = MLP(64, [32], 10)
    copy.load_state_dict(digits_mlp.state_dict())
    return copy.eval()
