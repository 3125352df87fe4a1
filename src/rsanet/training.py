"""Training one Table 1 variant on one split: random crops, the paper's loss and optimiser.

Read top-down: :class:`TrainConfig` (every knob, paper defaults), :class:`CropSampler` (random
crops that contain lesions often enough to learn), :func:`train` (the loop, with atomic
checkpoints that a killed job resumes from bit for bit on CPU in deterministic mode).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .losses import ExpWeightedCrossEntropy, lesion_fraction, soft_dice_loss
from .metrics import dice_from_counts
from .models import (PAPER_ORDER, PAPER_WIDTHS, attention_off, attention_scale_summary, attention_scales,
                     build_model, count_parameters)
from .devices import bf16_native, memory_layout, precision, resolve_device
from .files import staged
from .volumes import Preprocessed

log = logging.getLogger(__name__)

#: Columns of ``train_log.csv``: one row per iteration. ``batch_dice`` is the hard Dice of the
#: batch (blank when the batch has no lesion and none is predicted), ``predicted_lesion_fraction``
#: the share of the batch's voxels predicted lesion, ``health_score`` the health check's score
#: at the iterations where it is taken (blank elsewhere).
LOG_COLUMNS = ("iteration", "loss", "lesion_fraction_in_batch", "batch_dice", "predicted_lesion_fraction",
               "health_score", "seconds", "lr")


@dataclass(frozen=True)
class TrainConfig:
    """Settings of one training run. Defaults are the paper's (Section 3.1) where it gives them.

    Attributes:
        variant: a key of :data:`rsanet.models.VARIANTS`.
        widths: channels per U-Net level; the paper's ``(32, 64, 128, 256, 512)`` by default.
        crop: training crop ``(D, H, W)`` in voxels (the paper: "a fixed size", not stated).
        batch_size: 4 in the paper.
        iterations: 800 in the paper.
        lr, weight_decay: Adam, 1e-3 and 1e-5 in the paper.
        lr_schedule: ``"constant"`` (the paper states no schedule) or ``"cosine"``: the rate
            falls from ``lr`` to 0 along half a cosine over the iterations (see
            :func:`learning_rate`), which makes the final weights of short runs far less
            dependent on where training stops.
        lesion_crop_prob: probability that a crop is centred near a random lesion voxel
            (otherwise uniform over the volume). Not in the paper (0 by default); the demo needs
            it with few iterations.
        checkpoint_every: iterations between atomic checkpoints.
        log_every: iterations between progress lines in the log.
        seed: seeds torch and the crop sampler.
        deterministic: ``torch.use_deterministic_algorithms`` (CPU runs are then bit-exact; on
            CUDA only where PyTorch has deterministic kernels, with warnings for the rest).
        device: ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``.
        amp: mixed precision (bfloat16 autocast) where the device computes bfloat16 natively
            (:func:`bf16_native`: CUDA, and CPUs with AMX); float32 elsewhere.
        rsa_order: order of the SA steps inside RSA blocks.
        dropout: rate of the stem's Dropout3d.
        lesion_weight: ``"printed"`` for the paper's exponential class weights as printed
            (they favour the background), ``"swapped"`` for the same two weights the other way
            round (lesion ``e^(1-r) / (e^r + e^(1-r))``), or a number ``w`` in (0, 1) for
            ``[1 - w, w]`` (see :class:`rsanet.losses.ExpWeightedCrossEntropy`).
        dice_weight: the loss is the weighted cross-entropy plus ``dice_weight`` times
            :func:`rsanet.losses.soft_dice_loss`; 0 (the paper) leaves the cross-entropy alone.
        min_lesion_crops: at least this many crops of every batch are lesion-centred (nnU-Net
            forces foreground into part of each batch); 0 (the paper) leaves it to chance.
        lr_floor: the cosine schedule ends at ``lr * lr_floor`` instead of 0.
        health_checks: how many evenly spaced points of the run score the health check (the
            last one at the final iteration); see :func:`health_score`.
        health_floor: a training has learned when its final health score (hard Dice, 0-1)
            is at least this.
        on_failure: ``"flag"`` records a failed health check with the model and goes on;
            ``"fail"`` stops the training (:class:`TrainingFailed`) at the first check from
            half-way on whose score is below ``health_floor``.
        attention_lr: learning rate of the attention blocks' residual scales
            (:func:`rsanet.models.attention_scales`), on the same schedule as ``lr``; ``None``
            (the paper) trains them at ``lr`` like every other weight.
        attention_init: the attention blocks' residual scales at the start; 0 (the paper) starts
            every block as the identity (:func:`rsanet.models.build_model`).
        attention_inert_below: the attention check calls a model's attention *inert* when
            switching it off changes fewer than this share of the validation patches' predicted
            lesion voxels (see :func:`attention_check`).
    """

    variant: str
    widths: tuple[int, ...] = PAPER_WIDTHS
    crop: tuple[int, int, int] = (32, 128, 128)
    batch_size: int = 4
    iterations: int = 800
    lr: float = 1e-3
    lr_schedule: str = "constant"
    weight_decay: float = 1e-5
    lesion_crop_prob: float = 0.0
    checkpoint_every: int = 100
    log_every: int = 10
    seed: int = 0
    deterministic: bool = False
    device: str = "auto"
    amp: bool = True
    rsa_order: tuple[str, ...] = PAPER_ORDER
    dropout: float = 0.2
    lesion_weight: float | str = "printed"
    dice_weight: float = 0.0
    min_lesion_crops: int = 0
    lr_floor: float = 0.0
    health_checks: int = 4
    health_floor: float = 0.2
    on_failure: str = "flag"
    attention_lr: float | None = None
    attention_init: float = 0.0
    attention_inert_below: float = 0.01

    def __post_init__(self) -> None:
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {self.lr_schedule!r}")
        if not self.dice_weight >= 0:
            raise ValueError(f"dice_weight must be >= 0, got {self.dice_weight}")
        if self.on_failure not in ("flag", "fail"):
            raise ValueError(f"on_failure must be 'flag' or 'fail', got {self.on_failure!r}")
        if not 0 <= self.min_lesion_crops <= self.batch_size:
            raise ValueError(f"min_lesion_crops must be in [0, batch_size = {self.batch_size}], got {self.min_lesion_crops}")
        if not 0.0 <= self.lr_floor <= 1.0:
            raise ValueError(f"lr_floor must be in [0, 1], got {self.lr_floor}")
        if self.health_checks < 1:
            raise ValueError(f"health_checks must be >= 1, got {self.health_checks}")
        if self.attention_lr is not None and not self.attention_lr > 0:
            raise ValueError(f"attention_lr must be > 0 or null, got {self.attention_lr}")

    @staticmethod
    def from_dict(d: dict) -> "TrainConfig":
        """Build from a plain mapping (e.g. the workflow config), ignoring unknown keys."""
        names = {f.name for f in dataclasses.fields(TrainConfig)}
        kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in names}
        return TrainConfig(**kw)


def learning_rate(config: TrainConfig, iteration: int) -> float:
    """Learning rate of iteration ``iteration`` (1-based, up to ``config.iterations``).

    ``"constant"``: ``lr``. ``"cosine"``: ``lr * (f + (1 - f) * (1 + cos(pi * (i - 1) / n)) / 2)``
    with ``f = lr_floor``, from ``lr`` at the first iteration down towards ``f * lr`` at the last.
    A pure function of the iteration, so a resumed run follows the same schedule without any
    saved scheduler state.
    """
    if config.lr_schedule == "constant":
        return config.lr
    f = config.lr_floor
    return config.lr * (f + (1.0 - f) * 0.5 * (1.0 + math.cos(math.pi * (iteration - 1) / config.iterations)))


# ---------------------------------------------------------------------------------------------
# Random crops
# ---------------------------------------------------------------------------------------------
class CropSampler:
    """Draws batches of random crops from in-memory subjects.

    With probability ``lesion_prob`` a crop is placed so that a randomly chosen lesion voxel
    lies at a random position inside it; otherwise its corner is uniform over the volume. The
    first ``min_lesion`` crops of every batch are lesion-centred in any case (drawn from the
    subjects that have lesions).
    Volumes smaller than the crop are zero-padded once at construction.
    All randomness comes from one ``numpy.random.Generator`` whose state is checkpointed.

    Shapes: images ``(3, D, H, W)``, masks ``(D, H, W)``; :meth:`batch` returns
    ``x (B, 3, d, h, w)`` float32 and ``y (B, d, h, w)`` int64 with ``(d, h, w) = crop``.
    """

    def __init__(
        self, subjects: Sequence[Preprocessed], crop: Sequence[int], lesion_prob: float, seed: int,
        min_lesion: int = 0,
    ) -> None:
        self.crop = tuple(int(c) for c in crop)
        self.lesion_prob = lesion_prob
        self.min_lesion = min_lesion
        self.rng = np.random.default_rng(seed)
        self.images, self.masks, self.lesion_voxels = [], [], []
        for s in subjects:
            pad = [(0, max(c - n, 0)) for c, n in zip(self.crop, s.lesions.shape)]
            # no copy when no axis needs padding (the usual case: ~0.3 s of each job's start)
            needs_pad = any(after for _, after in pad)
            self.images.append(np.pad(s.image, [(0, 0)] + pad) if needs_pad else s.image)
            mask = np.pad(s.lesions, pad) if needs_pad else s.lesions
            self.masks.append(mask)
            self.lesion_voxels.append(np.argwhere(mask > 0))
        self.with_lesions = [i for i, v in enumerate(self.lesion_voxels) if len(v)]

    def _corner(self, i: int, force_lesion: bool = False) -> tuple[int, ...]:
        shape = self.masks[i].shape
        lesions = self.lesion_voxels[i]
        if len(lesions) and (force_lesion or self.rng.random() < self.lesion_prob):
            centre = lesions[self.rng.integers(len(lesions))]
            offset = [self.rng.integers(c) for c in self.crop]  # where the lesion voxel lands
            return tuple(int(np.clip(p - o, 0, n - c)) for p, o, n, c in zip(centre, offset, shape, self.crop))
        return tuple(int(self.rng.integers(n - c + 1)) for n, c in zip(shape, self.crop))

    def batch(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = [], []
        for k in range(size):
            forced = k < self.min_lesion and bool(self.with_lesions)
            pool = self.with_lesions if forced else range(len(self.images))
            i = int(pool[int(self.rng.integers(len(pool)))])
            box = tuple(slice(a, a + c) for a, c in zip(self._corner(i, forced), self.crop))
            xs.append(self.images[i][(slice(None),) + box])
            ys.append(self.masks[i][box])
        return torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys).astype(np.int64))


# ---------------------------------------------------------------------------------------------
# The health check: did this training learn?
# ---------------------------------------------------------------------------------------------
class TrainingFailed(RuntimeError):
    """A training stopped by its health check (``train.on_failure: fail``)."""


def lesion_counts(logits: torch.Tensor, target: torch.Tensor) -> tuple[int, int, int]:
    """``(TP, FP, FN)`` voxel counts of the hard prediction (lesion where its logit is the larger,
    i.e. ``p > 0.5``). ``logits (N, 2, D, H, W)``, ``target (N, D, H, W)`` in {0, 1}."""
    pred = logits[:, 1] > logits[:, 0]
    truth = target > 0
    tp = int((pred & truth).sum())
    return tp, int(pred.sum()) - tp, int(truth.sum()) - tp


def check_iterations(iterations: int, checks: int) -> list[int]:
    """The iterations at which the health check scores a run of ``iterations``: ``checks``
    evenly spaced points, the last one the final iteration (fewer when the run is shorter)."""
    return sorted({max(1, round(iterations * j / checks)) for j in range(1, checks + 1)})


def validation_patches(
    subjects: Sequence[Preprocessed], crop: Sequence[int], seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed patches of the validation subjects that the health check scores: per subject one
    crop centred on a random lesion voxel (when it has lesions) and one at a random place, drawn
    once from ``seed``. Returns ``x (P, 3, d, h, w)`` float32 and ``y (P, d, h, w)`` int64.
    (nnU-Net's progress plot scores validation patches in the same way, not whole volumes.)"""
    sampler = CropSampler(subjects, crop, lesion_prob=0.0, seed=seed)
    xs, ys = [], []
    for i in range(len(subjects)):
        for forced in (True, False):
            box = tuple(slice(a, a + c) for a, c in zip(sampler._corner(i, forced), sampler.crop))
            xs.append(sampler.images[i][(slice(None),) + box])
            ys.append(sampler.masks[i][box])
    return torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys).astype(np.int64))


def health_verdict(scores: Sequence[tuple[int, float]], floor: float, source: str, stopped_at: int | None) -> dict:
    """The recorded verdict of a training: learned when its last score is at least ``floor``.

    Args:
        scores: ``(iteration, hard Dice 0-1)`` of each check taken, in order.
        floor: :attr:`TrainConfig.health_floor`.
        source: what was scored (``"validation patches"`` or ``"lesion-bearing training batches"``).
        stopped_at: the iteration a ``fail`` policy stopped the run at, or None.
    """
    final = scores[-1][1] if scores else float("nan")
    return {
        "learned": bool(final >= floor) and stopped_at is None,
        "score": final, "floor": floor, "source": source,
        "rule": f"hard Dice of the {source} at the last check >= {floor}",
        "checks": [{"iteration": int(i), "score": float(v)} for i, v in scores],
        "stopped_at": stopped_at,
    }


def attention_verdict(on: Sequence[tuple[int, int, int]], off: Sequence[tuple[int, int, int]], changed: int,
                      predicted: int, scales: dict[str, list[float]], inert_below: float, source: str) -> dict:
    """The recorded attention check of a training (pure; see :func:`attention_check`).

    Args:
        on, off: per patch ``(TP, FP, FN)`` with the attention as trained and switched off.
        changed: voxels whose hard prediction differs between the two.
        predicted: voxels predicted lesion by either.
        scales: :func:`rsanet.models.attention_scale_summary` of the model.
        inert_below: :attr:`TrainConfig.attention_inert_below`.
        source: what was scored.

    Returns a dict with ``scales``, ``dice_on``/``dice_off`` (hard Dice pooled over the patches,
    0-1), ``sample_dice_on``/``sample_dice_off`` (mean of the per-patch hard Dice over the
    patches that hold or predict lesion, 0-1), ``changed_voxels``, ``predicted_voxels``,
    ``changed_share`` and ``inert`` (``changed_share < inert_below``).
    """
    def pooled(counts):
        tp, fp, fn = (sum(c[k] for c in counts) for k in range(3))
        return dice_from_counts(tp, fp, fn) if tp + fp + fn else 1.0

    def sample(counts):
        per = [dice_from_counts(*c) for c in counts if sum(c)]
        return float(np.mean(per)) if per else 1.0

    share = changed / predicted if predicted else 0.0
    return {
        "scales": scales, "source": source,
        "dice_on": pooled(on), "dice_off": pooled(off),
        "sample_dice_on": sample(on), "sample_dice_off": sample(off),
        "changed_voxels": int(changed), "predicted_voxels": int(predicted), "changed_share": share,
        "inert": bool(share < inert_below), "inert_below": inert_below,
        "rule": f"inert when switching the attention off changes < {inert_below:.0%} of the predicted lesion voxels",
    }


@torch.no_grad()
def attention_check(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int, device: torch.device,
                    layout: torch.memory_format, use_amp: bool, inert_below: float, source: str) -> dict | None:
    """Does the attention of ``model`` do anything? Scores the patches ``x (P, 3, d, h, w)`` /
    ``y (P, d, h, w)`` with the attention as trained and switched off
    (:class:`rsanet.models.attention_off`), in eval mode; :func:`attention_verdict` of the two.
    ``None`` for a model without attention blocks (the 3D U-Net)."""
    scales = attention_scale_summary(model)
    if not scales:
        return None
    model.eval()
    on, off, changed, predicted = [], [], 0, 0
    try:
        for k in range(0, len(x), batch):
            xb = x[k:k + batch].to(device).contiguous(memory_format=layout)
            yb = y[k:k + batch].to(device)
            preds = []
            for switched_off in (False, True):
                with attention_off(model) if switched_off else contextlib.nullcontext():
                    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_amp):
                        logits = model(xb).float()
                preds.append(logits[:, 1] > logits[:, 0])
                target = on if not switched_off else off
                target += [lesion_counts(logits[i:i + 1], yb[i:i + 1]) for i in range(len(xb))]
            changed += int((preds[0] != preds[1]).sum())
            predicted += int((preds[0] | preds[1]).sum())
    finally:
        model.train()
    return attention_verdict(on, off, changed, predicted, scales, inert_below, source)


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------
@dataclass
class TrainResult:
    """What :func:`train` returns: the trained model's state, the per-iteration log rows and the
    health verdict (:func:`health_verdict`)."""

    state_dict: dict
    log_rows: list[dict] = field(default_factory=list)
    r: float = 0.0
    parameters: int = 0
    device: str = "cpu"
    resumed_from: int = 0
    health: dict = field(default_factory=dict)


def deterministic_kernels() -> None:
    """``torch.use_deterministic_algorithms(True)`` for eager PyTorch, without its import of
    ``torch._inductor.config`` (which pulls in TorchDynamo: 1.2-1.4 s of every training job's
    start on the demo machine, for a flag that only ``torch.compile`` reads; nothing here is
    compiled). The same switch of the same kernels; falls back to the public call if PyTorch
    no longer has the private setter."""
    setter = getattr(torch._C, "_set_deterministic_algorithms", None)
    if setter is None:
        torch.use_deterministic_algorithms(True)
    else:
        setter(True)


def _save_checkpoint(path: Path, payload: dict) -> None:
    with staged([path]) as (tmp,):
        torch.save(payload, tmp)


def train(
    config: TrainConfig,
    subjects: Sequence[Preprocessed],
    checkpoint: str | os.PathLike | None = None,
    partial_log: str | os.PathLike | None = None,
    threads: int | None = None,
    validation: Sequence[Preprocessed] = (),
) -> TrainResult:
    """Train ``config.variant`` on ``subjects`` and return the final weights, log and verdict.

    Args:
        config: the run's settings.
        subjects: the training subjects, preprocessed.
        validation: the split's validation subjects, scored (as fixed patches, never fitted) by
            the health check; without them (or without lesions in them) the check scores the
            lesion-bearing training batches since the previous check.
        checkpoint: file for periodic atomic checkpoints; if it exists and was written with the
            same config, training resumes from it (weights, optimiser, RNG states, log).
        partial_log: CSV written as training goes (for watching progress); optional.
        threads: CPU threads for PyTorch (e.g. the Snakemake rule's ``threads``).

    The loss is :class:`rsanet.losses.ExpWeightedCrossEntropy` with ``r`` the mean lesion
    fraction of the training masks (plus ``dice_weight`` x soft Dice loss when set); the
    optimiser Adam(lr, weight_decay) at :func:`learning_rate`.

    Raises:
        TrainingFailed: ``on_failure: fail`` and a check from half-way on scored below
            ``health_floor``.
    """
    if threads:
        torch.set_num_threads(threads)
    device = resolve_device(config.device)
    if config.deterministic:
        if device.type == "cuda":
            # Some CUDA kernels this network needs (e.g. the backward of nearest upsampling)
            # have no deterministic version: use deterministic ones where they exist, warn for
            # the rest. Bit-exact repeats are guaranteed on the CPU only.
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.backends.cudnn.deterministic = True
            torch.use_deterministic_algorithms(True, warn_only=True)
            log.warning("deterministic: true on CUDA: deterministic kernels where PyTorch has them; "
                        "runs are bit-exact on the CPU only")
        else:
            deterministic_kernels()
    torch.manual_seed(config.seed)
    r = lesion_fraction([s.lesions for s in subjects])
    model = build_model(config.variant, widths=config.widths, dropout=config.dropout, rsa_order=config.rsa_order,
                        attention_init=config.attention_init)
    # Memory layout (tools/benchmark.py, docs/performance.md): on a CPU oneDNN runs 3x3x3
    # convolutions 2-4x faster channels-last (NDHWC); on an H200 cuDNN is faster with the
    # default NCDHW under bf16 autocast (1.25-1.29x per benchmark step, 1.10-1.21x per training
    # iteration). Same numbers up to rounding either way.
    layout = memory_layout(device)
    model = model.to(device, memory_format=layout)
    criterion = ExpWeightedCrossEntropy(r, lesion_weight=config.lesion_weight).to(device)
    # fused: one kernel for all parameters (the same Adam; ~2x faster step on CPU, see benchmark)
    # The attention blocks' residual scales get their own rate (train.attention_lr) on the same
    # schedule: each group's "base_lr" times the schedule's shape (learning_rate at lr = 1).
    scale_ids = {id(p) for p in attention_scales(model)}
    groups = [{"params": [p for p in model.parameters() if id(p) not in scale_ids], "base_lr": config.lr}]
    if scale_ids:
        groups.append({"params": [p for p in model.parameters() if id(p) in scale_ids],
                       "base_lr": config.lr if config.attention_lr is None else config.attention_lr})
    shape = dataclasses.replace(config, lr=1.0)
    optimiser = torch.optim.Adam(groups, lr=config.lr, weight_decay=config.weight_decay,
                                 fused=device.type in ("cpu", "cuda"))
    sampler = CropSampler(subjects, config.crop, config.lesion_crop_prob, config.seed, config.min_lesion_crops)
    use_amp = config.amp and bf16_native(device)
    val_x, val_y = validation_patches(validation, config.crop, config.seed) if validation else (None, None)
    if val_y is not None and not bool((val_y > 0).any()):
        val_x = val_y = None
    source = "validation patches" if val_x is not None else "lesion-bearing training batches"
    checks = set(check_iterations(config.iterations, config.health_checks))
    window = [0, 0, 0]  # TP, FP, FN of the lesion-bearing training batches since the last check

    start, rows = 0, []
    ckpt_path = Path(checkpoint) if checkpoint else None
    if ckpt_path and ckpt_path.exists():
        state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        if state.get("config") == dataclasses.asdict(config):
            model.load_state_dict(state["model"])
            optimiser.load_state_dict(state["optimiser"])
            sampler.rng.bit_generator.state = state["sampler_rng"]
            torch.set_rng_state(state["torch_rng"])
            if device.type == "cuda" and "cuda_rng" in state:
                torch.cuda.set_rng_state(state["cuda_rng"])
            start, rows = int(state["iteration"]), list(state["log_rows"])
            window = list(state.get("health_window", window))
            log.info("resuming %s from checkpoint %s at iteration %d", config.variant, ckpt_path, start)
        else:
            log.warning("ignoring checkpoint %s: written with a different config", ckpt_path)

    log.info(
        "training %s: %d parameters, %d subjects, r=%.3g, crop %s, batch %d, %d iterations on %s%s",
        config.variant, count_parameters(model), len(subjects), r, config.crop, config.batch_size,
        config.iterations, device, " (bf16 autocast)" if use_amp else "",
    )
    log_file = None
    if partial_log:
        Path(partial_log).parent.mkdir(parents=True, exist_ok=True)
        log_file = open(partial_log, "w", newline="")
        writer = csv.DictWriter(log_file, fieldnames=LOG_COLUMNS, restval="")
        writer.writeheader()
        writer.writerows(rows)
    model.train()
    t0 = time.perf_counter()
    stopped_at = None
    try:
        for it in range(start + 1, config.iterations + 1):
            for group in optimiser.param_groups:
                group["lr"] = learning_rate(shape, it) * group["base_lr"]
            x, y = sampler.batch(config.batch_size)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            x = x.contiguous(memory_format=layout)
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_amp):
                logits = model(x)  # (B, 2, d, h, w)
            loss = criterion(logits, y)
            if config.dice_weight:
                loss = loss + config.dice_weight * soft_dice_loss(logits, y)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            loss_value = float(loss.detach())
            if not math.isfinite(loss_value):
                raise FloatingPointError(
                    f"{config.variant}: loss became {loss_value} at iteration {it} ({precision(config.amp, device)}); "
                    "lower train.lr, or set train.amp: false if it ran in bf16"
                )
            tp, fp, fn = lesion_counts(logits.detach(), y)
            if tp + fn:
                window = [a + b for a, b in zip(window, (tp, fp, fn))]
            row = {
                "iteration": it, "loss": loss_value, "lesion_fraction_in_batch": float(y.float().mean()),
                "batch_dice": dice_from_counts(tp, fp, fn) if tp + fp + fn else "",
                "predicted_lesion_fraction": (tp + fp) / y.numel(),
                "seconds": time.perf_counter() - t0, "lr": optimiser.param_groups[0]["lr"],
            }
            if it in checks:
                if val_x is not None:
                    counts = _score_patches(model, val_x, val_y, config.batch_size, device, layout, use_amp)
                else:
                    counts, window = window, [0, 0, 0]
                row["health_score"] = dice_from_counts(*counts) if sum(counts) else 0.0
                log.info("%s iter %d/%d health check: hard Dice of the %s %.3f (floor %.2f)", config.variant,
                         it, config.iterations, source, row["health_score"], config.health_floor)
            rows.append(row)
            if log_file:
                writer.writerow(row)
                log_file.flush()
            if it % config.log_every == 0 or it == config.iterations:
                done = it - start
                rate = done / max(row["seconds"], 1e-9)
                eta = (config.iterations - it) / max(rate, 1e-9)
                log.info("%s iter %d/%d loss %.4f (%.2f it/s, eta %.0f s)",
                         config.variant, it, config.iterations, loss_value, rate, eta)
            if ckpt_path and (it % config.checkpoint_every == 0) and it < config.iterations:
                payload = {
                    "config": dataclasses.asdict(config), "iteration": it, "model": model.state_dict(),
                    "optimiser": optimiser.state_dict(), "sampler_rng": sampler.rng.bit_generator.state,
                    "torch_rng": torch.get_rng_state(), "log_rows": rows, "health_window": window,
                }
                if device.type == "cuda":
                    payload["cuda_rng"] = torch.cuda.get_rng_state()
                _save_checkpoint(ckpt_path, payload)
            score = row.get("health_score")
            if (config.on_failure == "fail" and score != "" and score is not None and 2 * it >= config.iterations
                    and score < config.health_floor):
                stopped_at = it
                break
    finally:
        if log_file:
            log_file.close()
    scores = [(row["iteration"], row["health_score"]) for row in rows if row.get("health_score", "") != ""]
    health = health_verdict(scores, config.health_floor, source, stopped_at)
    if val_x is not None:
        check = attention_check(model, val_x, val_y, config.batch_size, device, layout, use_amp,
                                config.attention_inert_below, source)
        if check is not None:
            health["attention"] = check
            log.info("%s attention check: scales %s; validation-patch hard Dice %.3f on, %.3f off; %d of %d "
                     "predicted lesion voxels change when it is switched off (%.1f %%)%s", config.variant,
                     {k: [round(v, 3) for v in vs] for k, vs in check["scales"].items()}, check["dice_on"],
                     check["dice_off"], check["changed_voxels"], check["predicted_voxels"],
                     100 * check["changed_share"], ": ATTENTION INERT" if check["inert"] else "")
    if stopped_at is not None:
        raise TrainingFailed(
            f"{config.variant} (seed {config.seed}) has not learned: the hard Dice of the {source} is "
            f"{scores[-1][1]:.3f} at iteration {stopped_at} of {config.iterations}, below train.health_floor = "
            f"{config.health_floor}; stopped because train.on_failure is 'fail'. Check the loss settings "
            f"(train.lesion_weight = {config.lesion_weight!r}, train.dice_weight = {config.dice_weight}), "
            f"train.lr = {config.lr}, train.iterations and the lesion masks; or set train.on_failure: flag "
            "to record the failure and go on"
        )
    if not health["learned"]:
        log.warning("%s (seed %d) FAILED its health check: %s = %.3f, below %.2f; it is recorded as failed",
                    config.variant, config.seed, health["rule"].split(" at ")[0], health["score"], config.health_floor)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return TrainResult(state, rows, r, count_parameters(model), str(device), start, health)


@torch.no_grad()
def _score_patches(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int, device: torch.device,
                   layout: torch.memory_format, use_amp: bool) -> tuple[int, int, int]:
    """``(TP, FP, FN)`` of ``model`` on patches ``x (P, 3, d, h, w)`` / ``y (P, d, h, w)``, in
    eval mode (dropout off), in batches of ``batch``; the model is left in training mode."""
    model.eval()
    counts = [0, 0, 0]
    try:
        for k in range(0, len(x), batch):
            xb = x[k:k + batch].to(device).contiguous(memory_format=layout)
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_amp):
                logits = model(xb)
            counts = [a + b for a, b in zip(counts, lesion_counts(logits.float(), y[k:k + batch].to(device)))]
    finally:
        model.train()
    return counts[0], counts[1], counts[2]


def save_model(result: TrainResult, config: TrainConfig, path: str | os.PathLike) -> None:
    """Write the trained weights with the config needed to rebuild the network (atomic)."""
    payload = {"config": dataclasses.asdict(config), "model": result.state_dict, "r": result.r, "health": result.health}
    with staged([path]) as (tmp,):
        torch.save(payload, tmp)


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, TrainConfig]:
    """Rebuild a network saved by :func:`save_model` (``weights_only`` loading: no code runs),
    on ``device``, in eval mode and in :func:`memory_layout` of the device."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    config = TrainConfig.from_dict(payload["config"])
    model = build_model(config.variant, widths=config.widths, dropout=config.dropout, rsa_order=config.rsa_order)
    weights = dict(payload["model"])
    if "head.1.bias" not in weights:  # trained before the output bias (docs/models.md, "The output bias"): the same network
        weights["head.1.bias"] = torch.zeros_like(model.head[1].bias)
    model.load_state_dict(weights)
    device = torch.device(device)
    # weights in the device's faster layout too (CPU: channels-last, 1.3x faster whole-volume
    # inference than NCDHW weights with channels-last input; CUDA: NCDHW)
    return model.to(device, memory_format=memory_layout(device)).eval(), config


def write_log_csv(rows: Sequence[dict], path: str | os.PathLike) -> None:
    """Write the per-iteration log atomically."""
    with staged([path]) as (tmp,):
        with open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=LOG_COLUMNS, restval="")
            writer.writeheader()
            writer.writerows(rows)
