"""The paper's "zero-volume" cutoff: the landscape size at which a minimum stops being
a minimum, because its loss on base + L samples first exceeds the threshold."""

from __future__ import annotations

import numpy as np

__all__ = ["cutoff_size", "per_sample_losses"]


def cutoff_size(per_sample_losses: np.ndarray, threshold: float, base_size: int) -> int | None:
    """The smallest landscape size L >= base_size whose mean loss over the first L
    samples (landscape order: base, then the pool) exceeds `threshold`; None if none."""
    losses = np.asarray(per_sample_losses, dtype=np.float64)
    if not 1 <= base_size <= len(losses):
        raise ValueError(f"base_size must lie in [1, {len(losses)}], got {base_size}")
    means = np.cumsum(losses) / np.arange(1, len(losses) + 1)  # mean over the first L
    past = np.nonzero(means[base_size - 1 :] > threshold)[0]
    return int(base_size + past[0]) if len(past) else None


def per_sample_losses(model, x, y, loss_fn) -> np.ndarray:
    """The loss of each sample, in order (eval mode, no gradients)."""
    import torch
    from torch.func import vmap

    def one(out, target):
        return loss_fn(out.unsqueeze(0), target.unsqueeze(0))

    model.eval()
    with torch.no_grad():
        return vmap(one)(model(x), y).double().cpu().numpy()
