"""Counting what the attention blocks and the networks cost, by formula and by
``torch.utils.flop_counter`` on fake tensors (sizes far beyond this machine are counted without
allocating anything).

Conventions: one FLOP is one multiply or one add (a multiply-add is 2 FLOPs), as in
``torch.utils.flop_counter``; "map FLOPs" are those of computing the attention maps
(``Q K^T``) and applying them (``A V``), i.e. the ``bmm`` calls of the blocks; the
projections (1x1x1 convolutions) are counted separately. Memory is MiB (2**20 bytes).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..kernels import pointwise_as_convolution
from ..models import NonLocalBlock, RSABlock, build_model


MIB = 2**20
DEMO_WIDTHS: tuple[int, ...] = (8, 16, 32, 64)

#: Input volumes ``(D, H, W)`` the attention cost is reported for.
INPUT_SIZES: dict[str, tuple[int, int, int]] = {
    "demo crop 16x64x64": (16, 64, 64),
    "paper-default crop 32x128x128": (32, 128, 128),
    "paper-sized volume 48x320x256": (48, 320, 256),
    "paper example 512x512x256": (256, 512, 512),
}
#: A demo volume after the brain crop (about 54x130x110 voxels of 3x1.4x1.4 mm).
DEMO_VOLUME: tuple[int, int, int] = (54, 130, 110)
PAPER_VOLUME: tuple[int, int, int] = INPUT_SIZES["paper-sized volume 48x320x256"]

#: Placement -> how many levels above the bottom (``None``: the input resolution, level 0).
PLACEMENTS: dict[str, int | None] = {"bottom": 0, "second-bottom": 1, "input resolution": None}


# ---------------------------------------------------------------------------------------------
# 1. Sizes
# ---------------------------------------------------------------------------------------------
def feature_shape(size: Sequence[int], widths: Sequence[int], placement: str) -> tuple[int, tuple[int, int, int]]:
    """Channels and ``(D, H, W)`` of the feature map at ``placement`` for an input of ``size``.

    The U-Net pads the input to a multiple of ``2 ** (levels - 1)`` and halves it per level.
    """
    levels = len(widths)
    divisor = 2 ** (levels - 1)
    padded = [math.ceil(s / divisor) * divisor for s in size]
    up = PLACEMENTS[placement]
    level = 0 if up is None else levels - 1 - up
    return int(widths[level]), tuple(p // 2**level for p in padded)  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------
# 2. Counting: formulas and torch.utils.flop_counter
# ---------------------------------------------------------------------------------------------
def map_entries(kind: str, shape: Sequence[int]) -> int:
    """Attention-map entries of one block for one volume: ``P**2`` (NCL) or ``D**2+H**2+W**2`` (RSA)."""
    d, h, w = (int(s) for s in shape)
    if kind == "ncl":
        return (d * h * w) ** 2
    if kind == "rsa":
        return d * d + h * h + w * w  # three maps, one per direction
    raise ValueError(f"kind must be 'ncl' or 'rsa', got {kind!r}")


def map_flops(kind: str, channels: int, shape: Sequence[int]) -> int:
    """FLOPs of computing and applying the attention maps of one block (one volume).

    NCL: ``theta^T phi`` and ``f g`` are each ``P x P x C/2`` multiply-adds: ``4 (C/2) P**2``.
    RSA: per direction with ``S`` slices of ``F = C P / S`` features, ``Q K^T`` and ``A V`` are
    each ``S x S x F``: ``4 C P S``; over the three directions ``4 C P (D + H + W)``.
    """
    d, h, w = (int(s) for s in shape)
    p = d * h * w
    if kind == "ncl":
        return 4 * max(channels // 2, 1) * p * p
    if kind == "rsa":
        return 4 * channels * p * (d + h + w)
    raise ValueError(f"kind must be 'ncl' or 'rsa', got {kind!r}")


def projection_flops(kind: str, channels: int, shape: Sequence[int]) -> int:
    """FLOPs of the 1x1x1 projections (multiply-adds only, as the flop counter counts them)."""
    p = int(np.prod(shape))
    if kind == "ncl":
        inner = max(channels // 2, 1)
        return 2 * p * (3 * channels * inner + inner * channels)  # theta, phi, g; out
    if kind == "rsa":
        return 2 * p * 9 * channels * channels  # q, k, v at each of the three steps
    raise ValueError(f"kind must be 'ncl' or 'rsa', got {kind!r}")


def make_block(kind: str, channels: int) -> nn.Module:
    """The attention block of ``kind`` with every residual scale non-zero (so nothing is skipped)."""
    block = RSABlock(channels) if kind == "rsa" else NonLocalBlock(channels)
    with torch.no_grad():
        if kind == "rsa":
            block.alpha.fill_(0.5)
        else:
            block.norm.weight.fill_(1.0)
    return block


def counted_flops(build: Callable[[], Callable[[], Any]], backward: bool = False) -> dict[str, int]:
    """FLOPs per ATen op of ``fn()`` counted by :class:`FlopCounterMode` on fake tensors.

    ``build()`` runs inside a ``FakeTensorMode`` (nothing is allocated or computed, so any size
    can be counted) and returns the function to count; with ``backward`` its result is summed
    and back-propagated inside the counter too. Returns ``{"total": .., "aten.bmm": .., ...}``.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    with pointwise_as_convolution(), FakeTensorMode():  # aten.bmm is then exactly the maps
        fn = build()
        counter = FlopCounterMode(display=False)
        with counter:
            out = fn()
            if backward:
                out.float().sum().backward()
        counts = {str(k): int(v) for k, v in counter.get_flop_counts()["Global"].items()}
    counts["total"] = int(counter.get_total_flops())
    return counts


def block_flops(kind: str, channels: int, shape: Sequence[int]) -> dict[str, int]:
    """Forward FLOPs of one block on a ``(1, C, D, H, W)`` map, counted: maps (``bmm``), the rest.

    "The rest" is the 1x1x1 projections (convolutions or matrix products); additions (biases,
    the RSA partial logits, residuals) are not counted, as usual for ``flop_counter``.
    """

    def build():
        block = make_block(kind, channels)
        x = torch.empty(1, channels, *shape)
        return lambda: block(x)

    counts = counted_flops(build)
    maps = counts.get("aten.bmm", 0)  # the blocks' only batched products: Q K^T and A V
    return {"maps": maps, "projections": counts["total"] - maps, "total": counts["total"]}


def network_flops(variant: str, widths: Sequence[int], size: Sequence[int], batch: int, train: bool) -> int:
    """FLOPs of one forward (``train=False``) or forward+backward pass of a variant, counted."""

    def build():
        model = build_model(variant, widths=widths)
        model.train(train)
        x = torch.empty(batch, 3, *size)
        return lambda: model(x)

    return counted_flops(build, backward=train)["total"]


