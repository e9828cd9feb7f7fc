"""Loss-landscape animations, written as GIFs with Pillow (no encoder to download), and
as MP4 too where imageio's ffmpeg encoder is installed (the `video` extra).

- `training_slice_frames`: the loss on a 2-D slice through a model's weights at each
  kept epoch (`train.checkpoint_epochs`), w_e + a·d1 + b·d2, with two seeded directions
  filter-normalised to each epoch's own weights (the paper's convention), on one colour
  scale, so the basin's forming and sharpening shows frame by frame;
- `rotating_surface_frames`: the loss plane through three minima (`slices.loss_plane`)
  as a surface turning about its vertical axis.
"""

from __future__ import annotations

import io
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.func import functional_call

from volume_ray.directions import FilterNorm, perturbed_parameters, raw_directions

__all__ = ["gif_bytes", "mp4_bytes", "rotating_surface_frames", "training_slice_frames"]

FRAME_SIZE = (6.4, 4.8)  # inches, at DPI: 640 x 480 pixels
DPI = 100


@torch.no_grad()
def training_slice_frames(
    checkpoints: list[tuple[int, nn.Module]], x: torch.Tensor, y: torch.Tensor, loss_fn, *,
    landscape: int, thresholds: list[float], resolution: int = 21, span: float = 1.0,
    seed: int = 0,
) -> list[Image.Image]:  # fmt: skip
    """One frame per (epoch, model) of `checkpoints`: log10 loss on the slice
    a, b in [-span, span] around that epoch's weights."""
    grid = np.linspace(-span, span, resolution)
    planes = [_slice(model, x, y, loss_fn, grid, seed) for _, model in checkpoints]
    logs = [np.log10(np.clip(p, 1e-12, None)) for p in planes]
    low, high = min(map(np.min, logs)), max(map(np.max, logs))
    levels = np.linspace(low, high, 30) if high > low else 30
    marks = sorted(np.log10(thresholds))
    frames = []
    for (epoch, _), log_loss in zip(checkpoints, logs):
        figure, axis = plt.subplots(figsize=FRAME_SIZE, dpi=DPI)
        filled = axis.contourf(grid, grid, log_loss.T, levels=levels, cmap="viridis")
        figure.colorbar(filled, ax=axis, label="log10 loss")
        if marks and log_loss.min() < marks[-1] < log_loss.max():
            axis.contour(grid, grid, log_loss.T, levels=marks, colors="w", linewidths=0.8)
        axis.plot(0, 0, "r*", markersize=12)
        axis.set(xlabel="a (filter-normalised direction 1)", ylabel="b (direction 2)",
                 title=f"epoch {epoch}: loss on the landscape of {landscape:,} samples "
                       f"(white: T = {', '.join(f'{t:g}' for t in thresholds)})")  # fmt: skip
        axis.title.set_fontsize(9)
        frames.append(_image(figure))
    return frames


def _slice(model: nn.Module, x, y, loss_fn, grid: np.ndarray, seed: int) -> np.ndarray:
    params = perturbed_parameters(model)
    d1, d2 = FilterNorm(params, "paper")(raw_directions(params, seed, [0, 1]))
    model.eval()
    losses = np.empty((len(grid), len(grid)))
    for i, a in enumerate(grid):
        for j, b in enumerate(grid):
            w = params.flat + float(a) * d1 + float(b) * d2
            losses[i, j] = loss_fn(functional_call(model, params.tensors(w), (x,)), y).item()
    return losses


def rotating_surface_frames(
    a: np.ndarray, b: np.ndarray, losses: np.ndarray, labels: list[str], *, landscape: int,
    frames: int = 36,
) -> list[Image.Image]:  # fmt: skip
    """`frames` views of the loss surface through three minima, turned a full circle."""
    grid_a, grid_b = np.meshgrid(a, b, indexing="ij")
    log_loss = np.log10(np.clip(losses, 1e-12, None))
    title = f"Loss through three minima, landscape of {landscape:,} samples"
    images = []
    for k in range(frames):
        figure = plt.figure(figsize=FRAME_SIZE, dpi=DPI)
        axis = figure.add_subplot(projection="3d")
        axis.plot_surface(grid_a, grid_b, log_loss, cmap="viridis", linewidth=0)
        for (pa, pb), label in zip([(0, 0), (1, 0), (0, 1)], labels):
            index = (np.abs(a - pa).argmin(), np.abs(b - pb).argmin())
            axis.text(pa, pb, log_loss[index], label, fontsize=7)
        axis.view_init(elev=35, azim=360 * k / frames)
        axis.set(xlabel="a", ylabel="b", zlabel="log10 loss", title=title)
        axis.title.set_fontsize(9)
        images.append(_image(figure))
    return images


def _image(figure) -> Image.Image:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)
    plt.close(figure)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def gif_bytes(frames: list[Image.Image], milliseconds: int) -> bytes:
    """The frames as a looping GIF, `milliseconds` each."""
    buffer = io.BytesIO()
    first, *rest = frames
    first.save(buffer, format="GIF", save_all=True, append_images=rest, duration=milliseconds,
               loop=0)  # fmt: skip
    return buffer.getvalue()


def mp4_bytes(frames: list[Image.Image], milliseconds: int) -> bytes | None:
    """The frames as an H.264 MP4, `milliseconds` each, through imageio's ffmpeg
    writer; None where that encoder is not installed."""
    try:
        import imageio.v2 as imageio
        import imageio_ffmpeg  # noqa: F401  (the encoder binary imageio's writer runs)
    except ImportError:
        return None
    with tempfile.TemporaryDirectory() as folder:  # ffmpeg seeks in its output: a file
        path = Path(folder) / "animation.mp4"
        with imageio.get_writer(path, format="FFMPEG", fps=1000 / milliseconds) as writer:
            for frame in frames:
                writer.append_data(np.asarray(frame))
        return path.read_bytes()
