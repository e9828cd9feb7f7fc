"""The networks of the paper's experiments, in plain PyTorch, and the loss and accuracy
that each task's outputs are read with.

`build_model(name, ...)` is the registry a sweep's `model.name` resolves through. Its
initialisation is deterministic from `seed` and leaves the global RNG as it was.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "MODELS",
    "CNN",
    "MLP",
    "CharTransformer",
    "build_model",
    "count_parameters",
    "describe_model",
    "loss_for_task",
    "sample_accuracy",
]


class MLP(nn.Module):
    """Fully connected ReLU network: in -> hidden... -> out.

    Linear layers sit in `self.layers`, so parameter names read `layers.0.weight`,
    `layers.0.bias`, ... in forward order.
    """

    def __init__(self, in_features: int, hidden: Sequence[int], out_features: int):
        super().__init__()
        widths = [in_features, *hidden, out_features]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)  # (B, in_features)
        *hidden, last = self.layers  # (unpacked: slicing a ModuleList builds a new one)
        for layer in hidden:
            # In place: nothing else reads a Linear's fresh output (its backward needs
            # only its input), and a walk's many forward passes skip one write each.
            x = torch.relu_(layer(x))
        return last(x)  # (B, out_features)


class CNN(nn.Module):
    """conv 3x3 (pad 1) -> ReLU -> 2x2 max-pool per channel count, then an MLP head.

    `CNN(1, 28, [32, 64], [128], 10)` is the paper's MNIST net, and
    `CNN(3, 32, [32, 64, 128], [512, 256], 10)` its CIFAR-10 net (1.28M parameters).
    """

    def __init__(
        self,
        in_channels: int,
        image_size: int,
        channels: Sequence[int],
        hidden: Sequence[int],
        out_features: int,
    ):
        super().__init__()
        widths = [in_channels, *channels]
        self.convs = nn.ModuleList(
            nn.Conv2d(a, b, kernel_size=3, padding=1) for a, b in zip(widths[:-1], widths[1:])
        )
        side = image_size // 2 ** len(channels)
        if side < 1:
            raise ValueError(
                f"model.channels: {len(channels)} pooling stages shrink a {image_size}-pixel "
                "image below one pixel; use fewer channels entries"
            )
        self.head = MLP(widths[-1] * side * side, hidden, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in self.convs:  # (B, C, H, W) -> (B, C', H/2, W/2)
            x = F.max_pool2d(torch.relu_(conv(x)), 2)  # in place, as in MLP
        return self.head(x)


class _Block(nn.Module):
    """Pre-norm transformer block: causal self-attention, then a 4x MLP."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.ln_2 = nn.LayerNorm(width)
        self.fc = nn.Linear(width, 4 * width)
        self.fc_proj = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, steps, width = x.shape  # (B, T, C)
        q, k, v = self.attn(self.ln_1(x)).split(width, dim=2)
        shape = (batch, steps, self.heads, width // self.heads)
        q, k, v = (t.view(shape).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
        x = x + self.proj(y.transpose(1, 2).reshape(batch, steps, width))
        return x + self.fc_proj(F.gelu(self.fc(self.ln_2(x))))


class CharTransformer(nn.Module):
    """A small nanoGPT-style decoder for character-level language modelling.

    Token and position embeddings, `layers` pre-norm blocks, a final LayerNorm and a
    head tied to the token embedding. No dropout: the loss landscape is deterministic.
    """

    def __init__(self, vocab_size: int, block_size: int, layers: int, heads: int, width: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"model.width ({width}) must be a multiple of model.heads ({heads})")
        self.block_size = block_size
        self.wte = nn.Embedding(vocab_size, width)
        self.wpe = nn.Embedding(block_size, width)
        self.blocks = nn.ModuleList(_Block(width, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab_size, bias=False)
        self.head.weight = self.wte.weight  # tied, as in GPT-2

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        steps = idx.shape[1]  # idx (B, T)
        if steps > self.block_size:
            raise ValueError(f"sequence of {steps} is longer than block_size {self.block_size}")
        x = self.wte(idx) + self.wpe(torch.arange(steps, device=idx.device))  # (B, T, C)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))  # (B, T, vocab)


MODELS = ("mlp", "cnn", "char_transformer")


def build_model(
    name: str,
    input_shape: Sequence[int],
    num_outputs: int,
    *,
    seed: int = 0,
    hidden: Sequence[int] = (),
    channels: Sequence[int] = (),
    layers: int = 6,
    heads: int = 6,
    width: int = 384,
) -> nn.Module:
    """The model `name` for inputs of `input_shape` (one sample) and `num_outputs`
    outputs (classes, or vocabulary size), initialised from `seed`."""
    if name not in MODELS:
        raise ValueError(f"model.name must be one of {MODELS}, got {name!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if name == "mlp":
            return MLP(math.prod(input_shape), hidden, num_outputs)
        if name == "cnn":
            if len(input_shape) != 3 or input_shape[1] != input_shape[2]:
                raise ValueError(
                    f"model 'cnn' needs square images (C, H, W); the dataset gives samples "
                    f"of shape {tuple(input_shape)}: use model 'mlp'"
                )
            return CNN(input_shape[0], input_shape[1], channels, hidden, num_outputs)
        if len(input_shape) != 1:
            raise ValueError(
                "model 'char_transformer' reads token windows (T,); the dataset gives "
                f"samples of shape {tuple(input_shape)}: use dataset 'char_text'"
            )
        return CharTransformer(num_outputs, input_shape[0], layers, heads, width)


_OBJECTIVES = {  # task: (loss name, metric name)
    "classification": ("cross_entropy", "accuracy"),
    "binary": ("binary_cross_entropy_with_logits", "accuracy"),
    "onehot_mse": ("mse", "accuracy (argmax)"),
    "language": ("token_cross_entropy", "token accuracy"),
}


def describe_model(name: str, model: nn.Module, task: str) -> dict[str, object]:
    """What a model is trained and measured with: its parameter count, loss and metric."""
    if task not in _OBJECTIVES:
        raise ValueError(f"task must be one of {tuple(_OBJECTIVES)}, got {task!r}")
    loss, metric = _OBJECTIVES[task]
    return {"model": name, "n_params": count_parameters(model), "loss": loss, "metric": metric}


def loss_for_task(task: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The batch-mean loss a task trains and is measured with."""
    if task == "classification":
        return F.cross_entropy
    if task == "binary":
        return F.binary_cross_entropy_with_logits
    if task == "onehot_mse":
        return F.mse_loss
    if task == "language":
        return _token_cross_entropy
    raise ValueError(f"unknown task {task!r}")


def _token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over every position: logits (B, T, V), targets (B, T)."""
    return F.cross_entropy(logits.flatten(0, -2), targets.flatten())


def count_parameters(model: nn.Module) -> int:
    """Number of trainable scalars in `model` (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def sample_accuracy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Accuracy of each sample, float (..., B), any leading dims of `outputs` broadcast.

    One output column is a binary logit (positive means class 1). Float targets shaped
    like the outputs are one-hot or soft (MSE heads): compared by argmax. Otherwise
    targets are class indices; for sequences (B, T) the accuracy of a sample is the
    fraction of its positions predicted right.
    """
    if outputs.shape[-1] == 1:
        return ((outputs[..., 0] > 0) == (targets.reshape(targets.shape[0]) > 0.5)).float()
    if targets.is_floating_point() and targets.shape == outputs.shape[-targets.dim() :]:
        return (outputs.argmax(-1) == targets.argmax(-1)).float()
    hits = (outputs.argmax(-1) == targets).float()  # (..., B, T...)
    positions = tuple(range(hits.dim() - targets.dim() + 1, hits.dim()))
    return hits.mean(positions) if positions else hits
