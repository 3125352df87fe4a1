"""Sliding-window prediction: Gaussian-blended tiles (or one pass), lesion probability out.

The networks are trained on random crops, so at inference they should see inputs of the same
kind: tiles of (about) the training crop. A whole volume in one pass gives every network other
GroupNorm statistics, sharper RSA attention (its unscaled logits sum over the slice area) and a
non-local softmax over many more positions than in training, and its memory is unbounded
(docs/inference.md). Overlapping tiles are blended with a Gaussian weight that is highest at the
tile centre (as nnU-Net does), so each voxel is predicted mostly by the tiles that see the most
context around it.
"""

from __future__ import annotations

import itertools
import logging
import math
import pickle
from dataclasses import dataclass
from typing import Literal, Mapping, Sequence

import numpy as np
import torch

from .models import VARIANTS
from .devices import bf16_native, memory_layout

log = logging.getLogger(__name__)

Blending = Literal["gaussian", "constant"]


def tile_starts(size: int, tile: int, step: int) -> list[int]:
    """Start positions of the fewest tiles of length ``tile`` that cover ``[0, size)`` with starts at
    most ``step`` voxels apart, spread evenly (as nnU-Net does): the first at 0, the last flush with
    the end, so neighbours overlap by at least ``tile - step`` voxels and by about the same amount.

    (Steps of exactly ``step`` plus a last tile flush with the end, as before, could place two
    tiles 1 voxel apart: 113 voxels in tiles of 64 by steps of 48 gave starts 0, 48, 49.)
    """
    if size <= tile:
        return [0]
    n = math.ceil((size - tile) / step) + 1
    return [int(i * (size - tile) / (n - 1) + 0.5) for i in range(n)]


def gaussian_weight(tile: Sequence[int], sigma_scale: float = 0.125, floor: float = 1e-3) -> np.ndarray:
    """Blending weight of one tile: a separable Gaussian centred on the tile, maximum 1.

    ``sigma = sigma_scale * tile`` per axis (nnU-Net's 1/8); values below ``floor`` are raised to
    it so voxels near a volume border covered by a single tile edge still get a defined average.

    Returns:
        ``tile``-shaped float32 array in ``[floor, 1]``.
    """
    w = np.ones(tuple(int(t) for t in tile), dtype=np.float64)
    for axis, t in enumerate(tile):
        x = np.arange(t, dtype=np.float64) - (t - 1) / 2
        g = np.exp(-0.5 * (x / max(sigma_scale * t, 1e-6)) ** 2)
        shape = [1] * len(tile)
        shape[axis] = t
        w = w * g.reshape(shape)
    w = w / w.max()
    return np.maximum(w, floor).astype(np.float32)


def clip_tile(tile: Sequence[int], shape: Sequence[int]) -> tuple[int, ...]:
    """The ``(d, h, w)`` tile clipped to a volume of ``shape`` (voxels): no axis longer than the volume."""
    return tuple(min(int(t), int(s)) for t, s in zip(tile, shape))


def tile_corners(shape: Sequence[int], tile: Sequence[int], overlap: float) -> list[tuple[int, ...]]:
    """Corners of the tiles covering ``shape``, neighbours overlapping by at least the fraction
    ``overlap`` of a tile (0 <= overlap < 1; :func:`tile_starts` per axis)."""
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    steps = [max(int(round(t * (1 - overlap))), 1) for t in tile]
    return list(itertools.product(*(tile_starts(s, t, st) for s, t, st in zip(shape, tile, steps))))


def pass_sizes(n_tiles: int, batch_size: int) -> list[int]:
    """How many tiles each forward pass holds: ``n_tiles`` spread evenly over the passes, never a
    pass of one tile where ``batch_size >= 2`` (45 tiles by 4: nine passes of 4 and three of 3;
    by 2: passes of 2 and 3, not a last pass of 1). For a batch of one, PyTorch's CPU
    convolution takes a path ~6x slower per tile (docs/inference.md). The batching does not
    change the result: every tile is computed alone, bit for bit the same in any batch.
    """
    if n_tiles <= 0:
        return []
    passes = math.ceil(n_tiles / max(int(batch_size), 1))
    if batch_size >= 2 and n_tiles >= 2:
        passes = min(passes, n_tiles // 2)
    bounds = [round(i * n_tiles / passes) for i in range(passes + 1)]
    return [b - a for a, b in zip(bounds[:-1], bounds[1:])]


def _passes(items: Sequence, batch_size: int) -> list[Sequence]:
    out, start = [], 0
    for size in pass_sizes(len(items), batch_size):
        out.append(items[start:start + size])
        start += size
    return out


def attention_map_bytes(variant: str, widths: Sequence[int], size: Sequence[int], batch: int = 1) -> int:
    """Bytes of the largest attention map (float32 logits + softmax) one pass of ``size`` needs.

    Non-local blocks hold ``(D*H*W)^2`` entries at their level; RSA maps are ``S x S`` (small).
    Used to refuse, with a clear message, a pass that would not fit in memory.
    """
    v = VARIANTS[variant]
    if v.attention != "ncl":
        return 0
    levels = len(widths)
    divisor = 2 ** (levels - 1)
    padded = [math.ceil(s / divisor) * divisor for s in size]
    out = 0
    for bit, level in zip(v.placement, (levels - 2, levels - 1, levels - 2)):
        if bit == "1":
            positions = math.prod(p // 2**level for p in padded)
            out = max(out, 2 * 4 * batch * positions**2)
    return out


@torch.no_grad()
def predict_volume(
    model: torch.nn.Module,
    image: np.ndarray,
    tile: Sequence[int] | None,
    overlap: float,
    device: str | torch.device = "cpu",
    amp: bool = True,
    blending: Blending = "gaussian",
    batch_size: int = 4,
) -> np.ndarray:
    """Lesion probability for a whole volume.

    Args:
        model: a network mapping ``(N, 3, D, H, W)`` to 2-class logits, in eval mode.
        image: ``(3, D, H, W)`` float32, preprocessed.
        tile: ``(d, h, w)`` tile size in voxels (clipped to the volume), or ``None`` to run the
            whole volume in one pass (the network pads sizes to a multiple of its stride).
        overlap: fraction of a tile shared with its neighbour (0 <= overlap < 1).
        device: where to run.
        amp: bfloat16 autocast where the device computes it natively (:func:`rsanet.devices.bf16_native`);
            give the ``train.amp`` the network was trained with, so it predicts in the precision it learnt in.
        blending: ``"gaussian"`` (weights highest at each tile's centre) or ``"constant"``
            (plain averaging of overlapping tiles).
        batch_size: about this many tiles run together in one forward pass (the same result in
            any batching); the tiles are spread evenly over the passes (:func:`pass_sizes`).

    Returns:
        ``(D, H, W)`` float32 softmax probability of the lesion class, in ``[0, 1]``.
    """
    device = torch.device(device)
    use_amp = amp and bf16_native(device)
    x_full = torch.from_numpy(np.ascontiguousarray(image))  # (3, D, H, W)

    def run(x: torch.Tensor) -> torch.Tensor:
        # Channels-last 3D input on CPU: oneDNN then runs every convolution in NDHWC, 2-4x
        # faster than NCDHW (weights channels-last too: rsanet.training.load_model does it);
        # on CUDA NCDHW is faster (benchmarks/).
        x = x.to(device).contiguous(memory_format=memory_layout(device))
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_amp):
            logits = model(x)
        return torch.softmax(logits.float(), dim=1)[:, 1].cpu()  # (N, d, h, w)

    shape = tuple(image.shape[1:])
    if tile is None:
        return run(x_full[None])[0].contiguous().numpy()
    if blending not in ("gaussian", "constant"):
        raise ValueError(f"blending must be 'gaussian' or 'constant', got {blending!r}")
    tile = clip_tile(tile, shape)
    corners = tile_corners(shape, tile, overlap)
    weight = torch.from_numpy(gaussian_weight(tile) if blending == "gaussian" else np.ones(tile, np.float32))
    total = torch.zeros(shape)
    norm = torch.zeros(shape)
    for group in _passes(corners, batch_size):
        boxes = [tuple(slice(c, c + t) for c, t in zip(corner, tile)) for corner in group]
        probs = run(torch.stack([x_full[(slice(None),) + box] for box in boxes]))  # (n, d, h, w)
        for box, p in zip(boxes, probs):
            total[box] += p * weight
            norm[box] += weight
    return (total / norm).clamp_(0, 1).numpy()


@dataclass(frozen=True)
class PredictionPolicy:
    """How every network of a study predicts a volume: the one inference policy of the project,
    used by the study's prediction rule, ``rsanet-segment`` and the hand-run tools.

    ``tile``: ``(d, h, w)`` voxels, or ``None`` for the whole volume in one pass; ``overlap``,
    ``blending``, ``batch_size``: see :func:`predict_volume`; ``mirror``: also average the
    predictions of copies mirrored along each spatial axis (test-time augmentation, 4 passes);
    ``amp``: bf16 autocast where native (the ``train.amp`` the network was trained with).
    """

    tile: tuple[int, int, int] | None
    overlap: float = 0.25
    blending: Blending = "gaussian"
    batch_size: int = 4
    mirror: bool = False
    amp: bool = True

    @classmethod
    def from_config(cls, section: Mapping, crop: Sequence[int], amp: bool = True, mirror: bool = False) -> "PredictionPolicy":
        """From a validated ``predict:`` section (the schema's defaults filled in: every key present,
        as in a loaded config or an export's record) and the training ``crop`` (D, H, W voxels).

        ``predict.tile``: ``null`` = tiles of the training crop, ``"whole"`` = one pass, or a
        ``[d, h, w]`` list.
        """
        missing = [k for k in ("tile", "overlap", "blending", "batch_size") if k not in section]
        if missing:
            raise KeyError(f"predict section without {', '.join(missing)}: pass the validated section "
                           "(rsanet.checks.load_config fills in the schema's defaults)")
        tile = section["tile"]
        tile = tuple(int(c) for c in crop) if tile is None else (None if tile == "whole" else tuple(int(t) for t in tile))
        return cls(tile=tile, overlap=float(section["overlap"]), blending=str(section["blending"]),
                   batch_size=int(section["batch_size"]), mirror=mirror, amp=amp)

    def describe(self) -> str:
        """One line for the logs, e.g. ``tiles of (16, 64, 64) voxels, overlap 0.25, ...``."""
        text = ("whole volume, one pass" if self.tile is None else
                f"tiles of {self.tile} voxels, overlap {self.overlap}, {self.blending} blending, "
                f"{self.batch_size} tiles per pass")
        return text + (", mirrored along each axis" if self.mirror else "")

    def tiles(self, shape: Sequence[int]) -> int:
        """How many tiles (network inputs) predicting a volume of ``shape`` (D, H, W) runs through
        the network: the measure of its cost."""
        per_pass = 1 if self.tile is None else len(self._corners(shape))
        return per_pass * (4 if self.mirror else 1)

    def pass_bytes(self, variant: str, widths: Sequence[int], shape: Sequence[int]) -> int:
        """Bytes of the attention maps of one forward pass over a volume of ``shape`` (D, H, W)."""
        if self.tile is None:
            return attention_map_bytes(variant, widths, shape, 1)
        largest = max(pass_sizes(len(self._corners(shape)), self.batch_size))
        return attention_map_bytes(variant, widths, clip_tile(self.tile, shape), largest)

    def _corners(self, shape: Sequence[int]) -> list[tuple[int, ...]]:
        """Corners of the (clipped) tiles :func:`predict_volume` runs over a volume of ``shape``."""
        return tile_corners(shape, clip_tile(self.tile, shape), self.overlap)

    def predict(self, model: torch.nn.Module, image: np.ndarray, device: str | torch.device = "cpu") -> np.ndarray:
        """``(D, H, W)`` float32 lesion probability of ``image`` ``(3, D, H, W)`` under this policy."""
        flips = [()] + ([(1,), (2,), (3,)] if self.mirror else [])  # axes of (3, D, H, W)
        total = None
        for axes in flips:
            x = np.flip(image, axes).copy() if axes else image
            p = predict_volume(model, x, tile=self.tile, overlap=self.overlap, device=device, amp=self.amp,
                               blending=self.blending, batch_size=self.batch_size)
            p = np.flip(p, tuple(a - 1 for a in axes)) if axes else p
            total = p.astype(np.float64) if total is None else total + p
        return p if len(flips) == 1 else (total / len(flips)).astype(np.float32)


def ensemble_probability(per_model: np.ndarray) -> np.ndarray:
    """The ensemble's lesion probability: the mean over the models' ``(M, ...)`` probabilities,
    accumulated in float64, float32 out (one model: its own probability, bit for bit)."""
    return per_model.astype(np.float64).mean(axis=0).astype(np.float32)


def grid_shape_at(shape: Sequence[int], spacing_mm: Sequence[float], target_mm: Sequence[float]) -> tuple[int, ...]:
    """The ``(D, H, W)`` shape covering the same extent as ``shape`` voxels of ``spacing_mm`` at
    ``target_mm`` (both ``(dz, dy, dx)`` mm), at least one voxel per axis."""
    return tuple(max(int(round(n * s / t)), 1) for n, s, t in zip(shape, spacing_mm, target_mm))


def resample_to_shape(volume: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """``(C, D, H, W)`` -> ``(C, *shape)`` float32, trilinear, voxel centres of both grids spread
    over the same extent (torch's ``align_corners=False``): a channel image to another spacing and
    back, or probabilities back onto the image's own grid."""
    x = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))[None]
    return torch.nn.functional.interpolate(x, size=tuple(shape), mode="trilinear", align_corners=False)[0].numpy()


@dataclass(frozen=True, eq=False)
class Predictor:
    """A variant's networks ensembled under one prediction policy on one device, with the
    threshold that turns the ensemble's probability into lesion voxels: the one way the project
    predicts (the study's predict and validation rules with one network each, the lesion-confidence
    rule, ``rsanet-segment`` and the tools with their ensembles).

    ``models``: networks in eval mode on ``device``; ``policy``: :class:`PredictionPolicy`;
    ``threshold``: a voxel is lesion where the ensemble's probability exceeds it (the validated
    ``predict.threshold``); ``config``: the first network's training config
    (:class:`rsanet.training.TrainConfig`: variant, widths, crop, precision). Build it with
    :meth:`from_model_files` (a study's ``model.pt`` files, or an export's).
    """

    models: tuple[torch.nn.Module, ...]
    policy: PredictionPolicy
    device: torch.device
    threshold: float
    config: object
    #: ``(dz, dy, dx)`` mm the networks predict at (the training cohort's spacing: an image on
    #: another grid is resampled to it and the probabilities mapped back), or ``None``: every
    #: image on its own grid (``predict.spacing``, docs/inference.md, "Predicting at the study's spacing").
    spacing_mm: tuple[float, float, float] | None = None

    @classmethod
    def from_model_files(cls, paths: Sequence[str], predict: Mapping, device: str | torch.device,
                         mirror: bool = False, spacing_mm: Sequence[float] | None = None) -> "Predictor":
        """From saved networks of one variant (:func:`rsanet.training.save_model` files) and the
        validated ``predict:`` section; the tile size and precision come from the networks' own
        training config (``train.crop``, ``train.amp``). ``spacing_mm``: :attr:`spacing_mm`."""
        from .training import load_model

        loaded = []
        for path in paths:
            try:
                loaded.append(load_model(path, device))
            except (RuntimeError, KeyError, ValueError, OSError, EOFError, pickle.UnpicklingError) as err:
                raise RuntimeError(f"{path}: {type(err).__name__}: {err}") from err
        cfg = loaded[0][1]
        policy = PredictionPolicy.from_config(predict, cfg.crop, amp=cfg.amp, mirror=mirror)
        return cls(tuple(m for m, _ in loaded), policy, torch.device(device), float(predict["threshold"]), cfg,
                   tuple(float(s) for s in spacing_mm) if spacing_mm else None)

    def per_model(self, image: np.ndarray, spacing_mm: Sequence[float] | None = None) -> np.ndarray:
        """``(M, D, H, W)`` float32: each network's lesion probability of ``image`` ``(3, D, H, W)``
        of voxel size ``spacing_mm`` ``(dz, dy, dx)``; predicted at :attr:`spacing_mm` when both are
        set and differ by more than 1 % (the image resampled there, the probabilities back)."""
        if self.spacing_mm is None or spacing_mm is None or np.allclose(spacing_mm, self.spacing_mm, rtol=0.01):
            return np.stack([self.policy.predict(m, image, self.device) for m in self.models])
        shape = grid_shape_at(image.shape[1:], spacing_mm, self.spacing_mm)
        log.info("predicting at the study's spacing %s mm: %s -> %s voxels and back", self.spacing_mm,
                 image.shape[1:], shape)
        at = resample_to_shape(image, shape)
        probs = np.stack([self.policy.predict(m, at, self.device) for m in self.models])
        return np.clip(resample_to_shape(probs, image.shape[1:]), 0.0, 1.0)

    def probability(self, image: np.ndarray, spacing_mm: Sequence[float] | None = None) -> np.ndarray:
        """``(D, H, W)`` float32: the ensemble's lesion probability (:func:`ensemble_probability`)."""
        return ensemble_probability(self.per_model(image, spacing_mm))

    def lesions(self, probability: np.ndarray) -> np.ndarray:
        """Lesion voxels (bool, same shape) of an ensemble probability: ``probability > threshold``."""
        return probability > self.threshold
