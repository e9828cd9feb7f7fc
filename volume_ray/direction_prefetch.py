"""Drawing the next block of directions while the device walks this one.

Paper-parity directions come from CPU generators, one per direction (`directions`).
On a GPU worker that CPU time would leave the device idle between blocks. Here a
background thread draws block i + 1 (into pinned memory, for a CUDA device) while
block i is walked, and the copy to the device does not wait for the device, so the
walks wait only when drawing is slower than walking.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

__all__ = ["prefetched"]


def prefetched(
    blocks: Sequence[range], draw: Callable[[range], torch.Tensor], device: torch.device
) -> Iterator[tuple[range, torch.Tensor]]:
    """Each block with draw(block) on `device`, the next block drawn meanwhile on a
    thread of its own. `draw` returns the block's rows, pinned when `device` is CUDA."""
    if not blocks:
        return
    with ThreadPoolExecutor(1, "volume_ray_directions") as drawing:
        following = drawing.submit(draw, blocks[0])
        for i, block in enumerate(blocks):
            drawn = following.result()
            if i + 1 < len(blocks):
                following = drawing.submit(draw, blocks[i + 1])
            yield block, drawn.to(device, non_blocking=True)
