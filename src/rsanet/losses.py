"""Exponentially weighted cross-entropy of the RSANet paper (Section 3.1).

The paper weights the two classes with

    lesion weight     w_1 = e^r       / (e^r + e^(1-r))
    background weight w_0 = e^(1-r)   / (e^r + e^(1-r))

where ``r`` is the average fraction of lesion voxels in the training images (5.15e-4 in the
paper's data). The weights are a softmax of ``[1 - r, r]`` and sum to 1.

Note -- implemented exactly as printed, not "fixed":
    For ``r < 0.5`` the formula gives the **background a larger weight than the lesion**
    (``w_1 < 0.5 < w_0``). With the paper's ``r = 5.15e-4`` the lesion weight is about 0.269
    and the background weight about 0.731, i.e. the printed formula *down*-weights the rare
    class, the opposite of what the paper's motivation (class imbalance) suggests. The ratio
    ``w_0 / w_1 = e^(1 - 2r)`` is also bounded by ``e``, so it could never compensate an
    imbalance of ~1:2000 anyway. Both forms are available by name: ``"printed"`` (the paper's
    text) and ``"swapped"`` (the two weights the other way round, lesion ~0.73, evidently what
    was meant); which one a study runs, and the measurement behind it, is in docs/models.md.

Nothing here reads or writes files.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ExpWeightedCrossEntropy", "class_weights", "lesion_fraction", "soft_dice_loss"]


def _no_autocast(device_type: str) -> contextlib.AbstractContextManager:
    """Autocast switched off on devices that have it (losses are computed in float32)."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


def lesion_fraction(masks: Iterable[np.ndarray]) -> float:
    """Average lesion fraction ``r`` of a set of training masks.

    Args:
        masks: one lesion mask per training image (boolean or 0/1, any shape, e.g.
            ``(D, H, W)``); non-zero voxels count as lesion.

    Returns:
        The mean over images of ``count(lesion voxels) / count(voxels)``, a float in [0, 1]
        (each image counts once, whatever its size).

    Raises:
        ValueError: if there are no masks or a mask has no voxels.
    """
    fractions: list[float] = []
    for m in masks:
        arr = np.asarray(m)
        if arr.size == 0:
            raise ValueError("lesion_fraction: a mask has no voxels")
        fractions.append(np.count_nonzero(arr) / arr.size)
    if not fractions:
        raise ValueError("lesion_fraction: no masks given")
    return float(np.mean(fractions))


def class_weights(r: float, form: str = "printed") -> torch.Tensor:
    """Class weights of the paper's exponentially weighted cross-entropy.

    Args:
        r: average lesion fraction of the training images, in [0, 1].
        form: ``"printed"``: as the paper prints them; ``"swapped"``: the two the other way round.

    Returns:
        float32 tensor of shape ``(2,)``, ``[background, lesion]``: printed
        ``[e^(1-r), e^r] / (e^r + e^(1-r))``, swapped ``[e^r, e^(1-r)] / (e^r + e^(1-r))``. They
        sum to 1; printed, for ``r < 0.5`` the background weight is the larger one (see the
        module docstring).
    """
    r = float(r)
    if not (0.0 <= r <= 1.0) or math.isnan(r):
        raise ValueError(f"r must be a fraction in [0, 1], got {r}")
    if form not in ("printed", "swapped"):
        raise ValueError(f"form must be 'printed' or 'swapped', got {form!r}")
    e_bg, e_les = math.exp(1.0 - r), math.exp(r)
    z = e_bg + e_les
    w = [e_bg / z, e_les / z]
    return torch.tensor(w if form == "printed" else w[::-1], dtype=torch.float32)


class ExpWeightedCrossEntropy(nn.Module):
    """Cross-entropy with the paper's exponential class weights (see :func:`class_weights`).

    The loss is ``torch.nn.functional.cross_entropy(logits, target, weight=w)``; with the
    default ``reduction="mean"`` this is PyTorch's *weighted* mean,
    ``sum_i w[y_i] * (-log softmax(logits_i)[y_i]) / sum_i w[y_i]`` over all voxels ``i``.
    It is always computed in float32 (half/bfloat16 logits are upcast, autocast is disabled
    inside), and returned as a float32 tensor.

    Args:
        r: average lesion fraction of the training images (e.g. from :func:`lesion_fraction`).
        reduction: ``"mean"`` (default), ``"sum"`` or ``"none"`` as in PyTorch.
        lesion_weight: ``"printed"`` (default) for the paper's weights as printed,
            ``"swapped"`` for the two the other way round (:func:`class_weights`); a number ``w``
            in (0, 1) replaces them by ``[1 - w, w]`` -- a documented deviation for short
            trainings (docs/models.md).
    """

    weight: torch.Tensor

    def __init__(self, r: float, reduction: str = "mean", lesion_weight: float | str = "printed") -> None:
        super().__init__()
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
        self.r = float(r)
        self.reduction = reduction
        if isinstance(lesion_weight, str):
            weight = class_weights(r, lesion_weight)
        elif 0.0 < lesion_weight < 1.0:
            weight = torch.tensor([1.0 - lesion_weight, lesion_weight], dtype=torch.float32)
        else:
            raise ValueError(f"lesion_weight must be in (0, 1), got {lesion_weight}")
        self.register_buffer("weight", weight)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Weighted cross-entropy.

        Args:
            logits: raw scores, shape ``(N, 2, D, H, W)`` (channel 0 background, 1 lesion);
                any floating dtype.
            target: integer class labels in {0, 1}, shape ``(N, D, H, W)``.

        Returns:
            A float32 scalar (or ``(N, D, H, W)`` for ``reduction="none"``).
        """
        if logits.ndim != target.ndim + 1 or logits.shape[1] != 2:
            raise ValueError(
                f"expected logits (N, 2, ...) and target (N, ...), got {tuple(logits.shape)} "
                f"and {tuple(target.shape)}"
            )
        if logits.shape[:1] + logits.shape[2:] != target.shape:
            raise ValueError(
                f"spatial/batch shape mismatch: logits {tuple(logits.shape)} vs target "
                f"{tuple(target.shape)}"
            )
        device_type = logits.device.type
        weight = self.weight.to(device=logits.device, dtype=torch.float32)
        with _no_autocast(device_type):
            # Per voxel w[y] * -log p_y, then PyTorch's weighted mean by hand: the same value as
            # F.cross_entropy(..., weight=w), but built from element-wise ops and plain sums,
            # which have deterministic CUDA kernels (the fused weighted mean has none).
            target = target.long()
            per_voxel = F.cross_entropy(logits.float(), target, weight=weight, reduction="none")
            if self.reduction == "none":
                return per_voxel
            if self.reduction == "sum":
                return per_voxel.sum()
            return per_voxel.sum() / weight[target].sum()

    def extra_repr(self) -> str:
        w = self.weight.tolist()
        return f"r={self.r:.4g}, weight=[background {w[0]:.4f}, lesion {w[1]:.4f}]"


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """``1 - soft Dice`` of the lesion class over the whole batch (not in the paper).

    ``soft Dice = (2 * sum(p * t) + smooth) / (sum(p) + sum(t) + smooth)`` with ``p`` the
    softmax probability of class 1 and ``t`` the 0/1 target, summed over every voxel of every
    item of the batch (so crops without lesion do not each count as a perfect or failed case).
    Computed in float32 outside autocast.

    Args:
        logits: ``(N, 2, D, H, W)`` raw scores, any floating dtype.
        target: ``(N, D, H, W)`` integer labels in {0, 1}.
        smooth: added to numerator and denominator (a batch without lesion and without
            predicted lesion then has loss 0).

    Returns:
        A float32 scalar in [0, 1].
    """
    if logits.ndim != target.ndim + 1 or logits.shape[1] != 2:
        raise ValueError(
            f"expected logits (N, 2, ...) and target (N, ...), got {tuple(logits.shape)} and {tuple(target.shape)}"
        )
    with _no_autocast(logits.device.type):
        p = torch.softmax(logits.float(), dim=1)[:, 1]
        t = (target == 1).float()
        dice = (2.0 * (p * t).sum() + smooth) / (p.sum() + t.sum() + smooth)
    return 1.0 - dice
