"""Whole-volume prediction: one pass, or overlapping tiles averaged, lesion probability out."""

from __future__ import annotations

import itertools
from typing import Sequence

import numpy as np
import torch

from .training import memory_layout


def _starts(size: int, tile: int, step: int) -> list[int]:
    """Tile start positions covering ``[0, size)`` with the last tile flush with the end."""
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile, step)) + [size - tile]
    return sorted(set(starts))


@torch.no_grad()
def predict_volume(
    model: torch.nn.Module,
    image: np.ndarray,
    tile: Sequence[int] | None = None,
    overlap: float = 0.5,
    device: str | torch.device = "cpu",
    amp: bool = True,
) -> np.ndarray:
    """Lesion probability for a whole volume.

    Args:
        model: a network mapping ``(N, 3, D, H, W)`` to 2-class logits, in eval mode.
        image: ``(3, D, H, W)`` float32, preprocessed.
        tile: ``(d, h, w)`` tile size for sliding-window inference, or ``None`` to run the
            whole volume in one pass (the network pads sizes to a multiple of its stride).
        overlap: fraction of a tile shared with its neighbour (0 <= overlap < 1).
        device: where to run; bf16 autocast on CUDA when ``amp``.

    Returns:
        ``(D, H, W)`` float32 softmax probability of the lesion class, averaged over tiles.
    """
    device = torch.device(device)
    use_amp = amp and device.type == "cuda"
    x_full = torch.from_numpy(np.ascontiguousarray(image))[None]  # (1, 3, D, H, W)

    def run(x: torch.Tensor) -> torch.Tensor:
        # Channels-last 3D input on CPU: oneDNN then runs every convolution in NDHWC, 2-4x
        # faster than NCDHW (weights channels-last too: rsanet.training.load_model does it);
        # on CUDA NCDHW is faster (scripts/benchmark.py).
        x = x.to(device).contiguous(memory_format=memory_layout(device))
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_amp):
            logits = model(x)
        return torch.softmax(logits.float(), dim=1)[0, 1].contiguous().cpu()  # (d, h, w)

    shape = image.shape[1:]
    if tile is None:
        return run(x_full).numpy()
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    tile = tuple(min(int(t), s) for t, s in zip(tile, shape))
    steps = [max(int(t * (1 - overlap)), 1) for t in tile]
    total = torch.zeros(shape)
    count = torch.zeros(shape)
    for corner in itertools.product(*(_starts(s, t, st) for s, t, st in zip(shape, tile, steps))):
        box = tuple(slice(c, c + t) for c, t in zip(corner, tile))
        total[box] += run(x_full[(slice(None), slice(None)) + box])
        count[box] += 1
    return (total / count).numpy()
