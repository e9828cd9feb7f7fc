"""Training a model to a minimum: plain PyTorch, deterministic given the seed."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

__all__ = ["train"]


def train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    *,
    lr: float = 1e-3,
    weight_decay: float = 0.01,
    epochs: int = 500,
    batch_size: int | None = None,
    target_loss: float | None = None,
    seed: int = 0,
) -> list[float]:
    """Train `model` in place with AdamW; return the train loss after each epoch.

    `batch_size=None` trains full batch. Training stops after `epochs` or as soon as
    the epoch's train loss is below `target_loss`, whichever comes first.
    """
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    n = len(x)
    batch = n if batch_size is None else batch_size
    history = []
    model.train()
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator) if batch < n else torch.arange(n)
        total = 0.0
        for start in range(0, n, batch):
            idx = order[start : start + batch]
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(x[idx]), y[idx])
            loss.backward()
            optimizer.step()
            total += loss.item() * len(idx)
        history.append(total / n)
        if target_loss is not None and history[-1] < target_loss:
            break
    model.eval()
    return history
