"""Training a model to a minimum: plain PyTorch, deterministic given the seed.

`train` knows nothing of Ray: a Tune trainable calls it with an `on_epoch` callback
that reports. Optimizers are AdamW and SGD with momentum, either one optionally
wrapped in SAM; batches are full or mini; training stops after `epochs` or once the
epoch's train loss is below `target_loss`, whichever comes first.
"""

from __future__ import annotations

import copy
import os
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from volume_ray.models import sample_accuracy

__all__ = [
    "OPTIMIZERS",
    "SAM",
    "TrainConfig",
    "evaluate",
    "load_checkpoint",
    "save_checkpoint",
    "train",
]

OPTIMIZERS = ("adamw", "sgd")
EVAL_BATCH = 8192  # samples per forward pass when evaluating

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class TrainConfig:
    """How one model trains. `batch_size=None` is full batch; `sam_rho > 0` wraps the
    optimizer in SAM; `checkpoint_epochs` lists epochs whose weights are kept."""

    optimizer: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.01
    momentum: float = 0.9  # SGD only
    sam_rho: float = 0.0
    sam_adaptive: bool = False
    epochs: int = 500
    batch_size: int | None = None
    target_loss: float | None = None
    seed: int = 0
    checkpoint_epochs: tuple[int, ...] = field(default_factory=tuple)


class SAM:
    """Sharpness-aware minimisation (Foret et al., 2021) around a base optimizer.

    Each step moves to the worst nearby point w + e, with e = rho * g / |g| (adaptive:
    e = rho * w^2 g / |w g|, Kwon et al., 2021), takes the gradient there, comes back
    to w and lets the base optimizer step with that gradient.
    """

    def __init__(self, params: Iterable[nn.Parameter], base: torch.optim.Optimizer, rho: float,
                 adaptive: bool = False):  # fmt: skip
        if rho <= 0:
            raise ValueError(f"train.sam_rho must be > 0 to use SAM, got {rho!r}")
        self.params = [p for p in params if p.requires_grad]
        self.base = base
        self.rho = rho
        self.adaptive = adaptive

    def zero_grad(self) -> None:
        self.base.zero_grad(set_to_none=True)

    def state_dict(self) -> dict:
        return self.base.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.base.load_state_dict(state)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor]) -> torch.Tensor:
        """`closure` zeroes nothing: it computes the loss and calls backward."""
        with torch.enable_grad():
            loss = closure()
        # e = rho * T^2 g / |T g|, with T = |w| (adaptive) or the identity
        stretched = [p.grad * p.abs() if self.adaptive else p.grad for p in self.params]  # T g
        norm = torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(s) for s in stretched])
        )
        moves = []
        for p, s in zip(self.params, stretched):
            e = (s * p.abs() if self.adaptive else s) * (self.rho / (norm + 1e-12))
            p.add_(e)
            moves.append(e)
        self.zero_grad()
        with torch.enable_grad():
            closure()
        for p, e in zip(self.params, moves):
            p.sub_(e)
        self.base.step()
        return loss


def _optimizer(model: nn.Module, config: TrainConfig):
    if config.optimizer not in OPTIMIZERS:
        raise ValueError(f"train.optimizer must be one of {OPTIMIZERS}, got {config.optimizer!r}")
    if config.optimizer == "adamw":
        base = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    else:
        base = torch.optim.SGD(
            model.parameters(), lr=config.lr, momentum=config.momentum,
            weight_decay=config.weight_decay,
        )  # fmt: skip
    if config.sam_rho > 0:
        return SAM(model.parameters(), base, config.sam_rho, config.sam_adaptive)
    return base


@torch.no_grad()
def evaluate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn
) -> tuple[float, float]:
    """(mean loss, accuracy) of `model` on (x, y), in eval mode."""
    was_training = model.training
    model.eval()
    total_loss, correct = 0.0, 0.0
    for start in range(0, len(x), EVAL_BATCH):
        out = model(x[start : start + EVAL_BATCH])
        target = y[start : start + EVAL_BATCH]
        total_loss += loss_fn(out, target).item() * len(target)
        correct += sample_accuracy(out, target).sum().item()
    model.train(was_training)
    return total_loss / len(x), correct / len(x)


def train(
    model: nn.Module,
    train_set: tuple[torch.Tensor, torch.Tensor],
    test_set: tuple[torch.Tensor, torch.Tensor] | None,
    loss_fn: LossFn,
    config: TrainConfig,
    *,
    on_epoch: Callable[[dict[str, float], nn.Module], None] | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: dict | None = None,
    on_state: Callable[[dict], None] | None = None,
    state_every: int = 0,
) -> list[dict[str, float]]:
    """Train `model` in place on `train_set`; return one metrics dict per epoch:
    epoch, train_loss (mean over the epoch's batches), train_acc, test_loss, test_acc.

    Data and model should already be on one device. Epochs in
    `config.checkpoint_epochs` save `epoch_<n>.pt` state dicts into `checkpoint_dir`.
    Every `state_every` epochs, `on_state` receives the full training state (model,
    optimizer, shuffling RNG, history); passing such a state as `resume` continues the
    run exactly where it was, as a long Tune trial does after a failure.
    """
    if config.checkpoint_epochs and checkpoint_dir is None:
        raise ValueError("train.checkpoint_epochs needs a checkpoint_dir to write to")
    x, y = train_set
    optimizer = _optimizer(model, config)
    generator = torch.Generator().manual_seed(config.seed)
    size = len(x)
    batch = size if config.batch_size is None else min(config.batch_size, size)
    history: list[dict[str, float]] = []
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        generator.set_state(resume["generator"])
        history = list(resume["history"])
    model.train()
    for epoch in range(len(history) + 1, config.epochs + 1):
        order = torch.randperm(size, generator=generator) if batch < size else None
        total_loss, total_correct = 0.0, 0.0
        for start in range(0, size, batch):
            idx = order[start : start + batch].to(x.device) if order is not None else slice(None)
            xb, yb = x[idx], y[idx]
            outputs = {}

            def closure(xb=xb, yb=yb, outputs=outputs) -> torch.Tensor:
                out = model(xb)
                loss = loss_fn(out, yb)
                loss.backward()
                outputs.setdefault("out", out.detach())
                return loss

            optimizer.zero_grad()
            loss = optimizer.step(closure)
            total_loss += loss.item() * len(yb)
            total_correct += sample_accuracy(outputs["out"], yb).sum().item()
        metrics = {
            "epoch": epoch,
            "train_loss": total_loss / size,
            "train_acc": total_correct / size,
        }
        if test_set is not None:
            metrics["test_loss"], metrics["test_acc"] = evaluate(model, *test_set, loss_fn)
        history.append(metrics)
        if epoch in config.checkpoint_epochs:
            save_checkpoint(model, Path(checkpoint_dir) / f"epoch_{epoch}.pt")
        if on_epoch is not None:
            on_epoch(metrics, model)
        if on_state is not None and state_every and epoch % state_every == 0:
            on_state(  # copies on the CPU: training goes on and mutates the originals
                copy.deepcopy(
                    {"model": {k: v.cpu() for k, v in model.state_dict().items()},
                     "optimizer": optimizer.state_dict(), "generator": generator.get_state(),
                     "history": history}
                )
            )  # fmt: skip
        if config.target_loss is not None and metrics["train_loss"] < config.target_loss:
            break
    model.eval()
    return history


def save_checkpoint(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write the state dict to `path` atomically (temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as sink:
            torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, sink)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a state dict saved by `save_checkpoint`; tensors only, no pickled code."""
    state = torch.load(Path(path), map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model
