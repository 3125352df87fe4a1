"""What the attention blocks and the networks cost, measured (the paper's cost claims and the CPU speed targets).

Read top-down:

1. **Sizes** - the feature map an attention block sees at each placement (:func:`feature_shape`).
2. **Counting** - attention-map entries and map FLOPs by formula (:func:`map_entries`,
   :func:`map_flops`) and by ``torch.utils.flop_counter`` on fake tensors, so sizes far beyond
   this machine (the paper's 512x512x256 example) are counted without allocating anything
   (:func:`counted_flops`).
3. **Measuring** - medians of interleaved repeats after warm-up (:func:`interleaved_times`),
   peak memory from the PyTorch profiler's allocation events on CPU or
   ``torch.cuda.max_memory_allocated`` on CUDA (:func:`peak_bytes`), and the machine's own
   ceiling: a large matrix product and a large 3D convolution (:func:`machine_ceiling`).
4. **The benchmark** - :func:`attention_cost` (NCL against RSA at every placement and size),
   :func:`network_cost` (every variant: parameters, training step, peak memory, GFLOP/s,
   whole-volume prediction), :func:`check_targets` and the writers (CSV, Markdown, figure).

Conventions: one FLOP is one multiply or one add (a multiply-add is 2 FLOPs), as in
``torch.utils.flop_counter``; "map FLOPs" are those of computing the attention maps
(``Q K^T``) and applying them (``A V``), i.e. the ``bmm`` calls of the blocks; the
projections (1x1x1 convolutions) are counted separately. Memory is MiB (2**20 bytes).
Attention rows are for one volume (batch 1) in float32.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..losses import ExpWeightedCrossEntropy
from ..kernels import pointwise_as_convolution
from ..models import PAPER_WIDTHS, VARIANTS, NonLocalBlock, RSABlock, build_model, count_parameters

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


# ---------------------------------------------------------------------------------------------
# 3. Measuring: time, memory, the machine's ceiling
# ---------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_times(
    fns: Mapping[str, Callable[[], Any]], rounds: int, warmup: int = 1, device: torch.device | str = "cpu"
) -> dict[str, list[float]]:
    """Seconds of each ``fns[k]()`` per round; every round runs every function once, in turn.

    Interleaving puts all candidates under the same (noisy, shared) machine load, so ratios
    taken within a round are fair. The first ``warmup`` rounds are run and discarded.
    """
    device = torch.device(device)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(warmup + rounds):
        for name, fn in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            if r >= warmup:
                times[name].append(time.perf_counter() - t0)
    return times


def paired_ratio(times: Mapping[str, list[float]], name: str, reference: str) -> float:
    """Median over rounds of ``time[name] / time[reference]`` within the same round."""
    return float(statistics.median(a / b for a, b in zip(times[name], times[reference])))


def cpu_peak_bytes(fn: Callable[[], Any]) -> int:
    """Peak of the bytes allocated by ``fn()`` above what was allocated before, on CPU.

    Measured with the PyTorch profiler (``profile_memory=True``): every allocation and free of
    the CPU allocator is an event with a signed size; the peak is the largest running sum.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
    )
    current = peak = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    return int(peak)


def peak_bytes(fn: Callable[[], Any], device: torch.device | str = "cpu") -> tuple[int, str]:
    """Peak bytes allocated by ``fn()`` above the allocation before it, and how it was measured."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - before), "cuda max_memory_allocated"
    return cpu_peak_bytes(fn), "cpu profiler allocations"


def machine_ceiling(device: torch.device | str = "cpu", rounds: int = 5) -> dict[str, float]:
    """GFLOP/s of a large fp32 matrix product and of a large 3x3x3 convolution, on this machine.

    The convolution (64 -> 64 channels on ``2 x 16 x 64 x 64`` voxels) is timed forward in
    NCDHW and NDHWC (channels-last) and forward+backward in NDHWC; ``conv_gflops`` is the best.
    """
    device = torch.device(device)
    n = 2048 if device.type == "cpu" else 8192
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    conv = nn.Conv3d(64, 64, 3, padding=1, bias=False).to(device)
    conv_cl = nn.Conv3d(64, 64, 3, padding=1, bias=False).to(device, memory_format=torch.channels_last_3d)
    shape = (2, 64, 16, 64, 64) if device.type == "cpu" else (8, 64, 32, 128, 128)
    x = torch.randn(shape, device=device)
    x_cl = x.contiguous(memory_format=torch.channels_last_3d)
    x_g = x_cl.clone().requires_grad_()
    conv_flops = 2 * 64 * 64 * 27 * int(np.prod(shape[2:])) * shape[0]

    def fwd_bwd():
        conv_cl(x_g).sum().backward()

    # the demo network's most common convolution: 8 -> 8 channels at the crop's full resolution
    conv8 = nn.Conv3d(8, 8, 3, padding=1, bias=False).to(device, memory_format=torch.channels_last_3d)
    x8 = torch.randn(2, 8, 16, 64, 64, device=device).contiguous(memory_format=torch.channels_last_3d)
    x8.requires_grad_()
    conv8_flops = 2 * 8 * 8 * 27 * x8[0, 0].numel() * 2

    def fwd_bwd8():
        conv8(x8).sum().backward()

    with torch.no_grad():
        t = interleaved_times(
            {"mm": lambda: a @ b, "conv": lambda: conv(x), "conv_cl": lambda: conv_cl(x_cl)}, rounds, 1, device
        )
    t.update(interleaved_times({"conv_cl_train": fwd_bwd, "conv8_train": fwd_bwd8}, max(rounds // 2, 2), 1, device))
    med = {k: statistics.median(v) for k, v in t.items()}
    out = {
        "matmul_gflops": 2 * n**3 / med["mm"] / 1e9,
        "conv_ncdhw_gflops": conv_flops / med["conv"] / 1e9,
        "conv_ndhwc_gflops": conv_flops / med["conv_cl"] / 1e9,
        "conv_ndhwc_train_gflops": 3 * conv_flops / med["conv_cl_train"] / 1e9,
        "conv8_ndhwc_train_gflops": 3 * conv8_flops / med["conv8_train"] / 1e9,
    }
    out["conv_gflops"] = max(out["conv_ncdhw_gflops"], out["conv_ndhwc_gflops"], out["conv_ndhwc_train_gflops"])
    # (conv8 is not a ceiling: it shows what the demo network's narrow layers can reach)
    return out


# ---------------------------------------------------------------------------------------------
# 4a. Attention cost: NCL against RSA
# ---------------------------------------------------------------------------------------------
@dataclass
class AttentionRow:
    """One network / input size / placement, NCL and RSA side by side (one volume, float32)."""

    network: str
    input: str
    placement: str
    channels: int
    feature: str  # "DxHxW" of the feature map the block sees
    positions: int  # P = D*H*W
    ncl_entries: int
    rsa_entries: int
    ncl_map_mib: float  # one float32 copy of every map
    rsa_map_mib: float
    ncl_map_gflop: float  # counted by torch.utils.flop_counter (bmm: compute + apply the maps)
    rsa_map_gflop: float
    ncl_block_gflop: float  # with the projections
    rsa_block_gflop: float
    formula_matches: bool  # counted map FLOPs == map_flops(); projections == projection_flops()
    ncl_peak_mib: float | None = None  # measured, forward + backward of the block
    rsa_peak_mib: float | None = None
    ncl_ms: float | None = None  # forward + backward, median
    rsa_ms: float | None = None
    memory_source: str = ""

    @property
    def entries_ratio(self) -> float:
        return self.ncl_entries / self.rsa_entries

    @property
    def map_flop_ratio(self) -> float:
        return self.ncl_map_gflop / self.rsa_map_gflop

    @property
    def block_flop_ratio(self) -> float:
        return self.ncl_block_gflop / self.rsa_block_gflop

    @property
    def peak_ratio(self) -> float | None:
        if self.ncl_peak_mib is None or self.rsa_peak_mib is None:
            return None
        return self.ncl_peak_mib / self.rsa_peak_mib

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(
            entries_ratio=self.entries_ratio, map_flop_ratio=self.map_flop_ratio,
            block_flop_ratio=self.block_flop_ratio, peak_ratio=self.peak_ratio,
            paper_28x_memory_maps=self.entries_ratio >= 28,
            paper_28x_memory_measured=None if self.peak_ratio is None else self.peak_ratio >= 28,
            paper_100x_flops=self.map_flop_ratio >= 100,
        )
        return d


def _estimated_train_bytes(kind: str, channels: int, shape: Sequence[int]) -> int:
    """Rough float32 bytes of one block's forward+backward (decides what can run here)."""
    p = int(np.prod(shape))
    if kind == "ncl":
        return 4 * (3 * p * p + 8 * channels * p)  # logits, map, map gradient; features
    return 4 * 24 * channels * p  # q, k, v, outputs and gradients of three steps


def measure_block(
    kind: str, channels: int, shape: Sequence[int], device: torch.device | str = "cpu", rounds: int = 2
) -> tuple[float, float | None, str]:
    """Measured peak MiB and median ms of one block's forward+backward on ``(1, C, D, H, W)``.

    The time is skipped (``None``) when ``rounds`` is 0; the first (profiled) run is the warm-up.
    """
    device = torch.device(device)
    block = make_block(kind, channels).to(device)
    x = torch.randn(1, channels, *shape, device=device, requires_grad=True)

    def step():
        block(x).sum().backward()
        x.grad = None
        block.zero_grad(set_to_none=True)

    step()  # warm-up, outside the measured peak (first-call allocations of the library)
    peak, source = peak_bytes(step, device)
    ms = None
    if rounds:
        ms = 1e3 * statistics.median(interleaved_times({"b": step}, rounds, 0, device)["b"])
    return peak / MIB, ms, source


def attention_cost(
    device: torch.device | str = "cpu", memory_budget_mib: float = 1500, gflop_budget: float = 40.0,
    time_gflop_budget: float = 2.0, log: Callable[[str], None] = print,
) -> list[AttentionRow]:
    """NCL against RSA for the paper's network at every size and placement, and the demo network.

    Entries and FLOPs for every row (FLOPs counted on fake tensors); peak memory measured where
    the non-local block's forward+backward fits ``memory_budget_mib`` and ``gflop_budget``
    (forward map GFLOPs), its time where the maps are under ``time_gflop_budget``.
    """
    cases: list[tuple[str, Sequence[int], str, tuple[int, int, int], str]] = []
    for name, size in INPUT_SIZES.items():
        for placement in PLACEMENTS:
            cases.append(("paper (32..512)", PAPER_WIDTHS, name, size, placement))
    for name in ("demo crop 16x64x64", "paper-sized volume 48x320x256"):
        for placement in ("bottom", "second-bottom"):
            cases.append(("demo (8..64)", DEMO_WIDTHS, name, INPUT_SIZES[name], placement))

    rows = []
    for network, widths, name, size, placement in cases:
        channels, shape = feature_shape(size, widths, placement)
        flops = {k: block_flops(k, channels, shape) for k in ("ncl", "rsa")}
        matches = all(
            flops[k]["maps"] == map_flops(k, channels, shape)
            and flops[k]["projections"] == projection_flops(k, channels, shape)
            for k in ("ncl", "rsa")
        )
        row = AttentionRow(
            network=network, input=name, placement=placement, channels=channels,
            feature="x".join(map(str, shape)), positions=int(np.prod(shape)),
            ncl_entries=map_entries("ncl", shape), rsa_entries=map_entries("rsa", shape),
            ncl_map_mib=4 * map_entries("ncl", shape) / MIB, rsa_map_mib=4 * map_entries("rsa", shape) / MIB,
            ncl_map_gflop=flops["ncl"]["maps"] / 1e9, rsa_map_gflop=flops["rsa"]["maps"] / 1e9,
            ncl_block_gflop=flops["ncl"]["total"] / 1e9, rsa_block_gflop=flops["rsa"]["total"] / 1e9,
            formula_matches=matches,
        )
        fits = all(
            _estimated_train_bytes(k, channels, shape) / MIB <= memory_budget_mib for k in ("ncl", "rsa")
        ) and row.ncl_block_gflop <= gflop_budget
        if fits:
            reps = 2 if row.ncl_block_gflop <= time_gflop_budget else 0
            row.ncl_peak_mib, row.ncl_ms, row.memory_source = measure_block("ncl", channels, shape, device, reps)
            row.rsa_peak_mib, row.rsa_ms, _ = measure_block("rsa", channels, shape, device, reps)
        log(
            f"  {network:16s} {name:30s} {placement:16s} C={channels:3d} {row.feature:>12s}: "
            f"entries x{row.entries_ratio:.3g}, map FLOPs x{row.map_flop_ratio:.3g}"
            + (f", measured peak x{row.peak_ratio:.3g}" if row.peak_ratio else ", peak not run (too big)")
        )
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------
# 4b. Whole networks, per variant
# ---------------------------------------------------------------------------------------------
@dataclass
class NetworkRow:
    """One variant at the configured widths, crop and batch."""

    variant: str
    parameters: int
    step_ms: float  # forward + backward + Adam step, median of interleaved rounds
    step_ratio: float  # paired median of step / U-Net step in the same round
    step_gflop: float  # counted, forward + backward
    gflops: float  # achieved: step_gflop / step time
    peak_mib: float  # parameters, gradients and Adam state + the step's transient peak
    extra_peak_pct: float  # over the U-Net's peak
    predict_demo_s: float | None = None  # one whole demo volume (DEMO_VOLUME), one pass
    predict_paper_s: float | None = None  # one whole paper-sized volume (PAPER_VOLUME)
    predict_paper_gflop: float | None = None
    predict_paper_note: str = ""


def _batch(batch: int, crop: Sequence[int], device: torch.device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, *crop, generator=g)
    y = (torch.rand(batch, *crop, generator=g) < 0.02).long()
    return x.to(device), y.to(device)


def make_train_step(
    variant: str, widths: Sequence[int], crop: Sequence[int], batch: int, device: torch.device | str = "cpu",
    channels_last: bool = True, amp_dtype: torch.dtype | None = None, seed: int = 0,
) -> tuple[Callable[[], float], nn.Module, torch.optim.Optimizer]:
    """One training iteration of :func:`rsanet.training.train` as a closure (same loss, Adam)."""
    device = torch.device(device)
    torch.manual_seed(seed)
    model = build_model(variant, widths=widths)
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    model = model.to(device, memory_format=fmt).train()
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-5, fused=device.type in ("cpu", "cuda"))
    criterion = ExpWeightedCrossEntropy(0.01).to(device)
    x, y = _batch(batch, crop, device, seed)
    x = x.contiguous(memory_format=fmt)

    def step() -> float:
        with torch.autocast(device_type=device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
            logits = model(x)
        loss = criterion(logits, y)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        return float(loss.detach())

    return step, model, optimiser


def _persistent_bytes(model: nn.Module, optimiser: torch.optim.Optimizer) -> int:
    total = sum(p.numel() * p.element_size() * 2 for p in model.parameters())  # weights + grads
    for state in optimiser.state.values():
        total += sum(v.numel() * v.element_size() for v in state.values() if torch.is_tensor(v))
    return total


def ncl_prediction_bytes(variant: str, widths: Sequence[int], size: Sequence[int]) -> int:
    """Float32 bytes of the largest non-local map (logits + softmax) of a whole-volume pass."""
    v = VARIANTS[variant]
    if v.attention != "ncl":
        return 0
    places = [p for bit, p in zip(v.placement, ("second-bottom", "bottom", "second-bottom")) if bit == "1"]
    return max(2 * 4 * map_entries("ncl", feature_shape(size, widths, p)[1]) for p in places)


def time_prediction(
    model: nn.Module, size: Sequence[int], reps: int, device: torch.device | str = "cpu"
) -> float:
    """Median seconds of :func:`rsanet.inference.predict_volume` on a whole random volume."""
    from ..inference import predict_volume

    image = np.random.default_rng(0).standard_normal((3, *size)).astype(np.float32)
    model.eval()
    predict_volume(model, image, tile=None, device=device)  # warm-up (allocations, kernels)
    times = interleaved_times({"p": lambda: predict_volume(model, image, tile=None, device=device)}, reps, 0)
    return float(statistics.median(times["p"]))


def network_cost(
    widths: Sequence[int], crop: Sequence[int], batch: int, variants: Sequence[str] = tuple(VARIANTS),
    device: torch.device | str = "cpu", rounds: int = 7, predict_reps: int = 2,
    memory_budget_mib: float = 1500, log: Callable[[str], None] = print,
) -> list[NetworkRow]:
    """Parameters, training step (time, FLOPs, GFLOP/s, peak memory) and whole-volume prediction."""
    device = torch.device(device)
    variants = list(variants)
    if "unet3d" not in variants:
        variants.insert(0, "unet3d")
    amp = torch.bfloat16 if device.type == "cuda" else None  # as rsanet.training.train (amp: true)
    steps = {v: make_train_step(v, widths, crop, batch, device, amp_dtype=amp) for v in variants}
    log(f"  training steps: {rounds} interleaved rounds of {len(variants)} variants after 2 warm-up rounds")
    times = interleaved_times({v: s[0] for v, s in steps.items()}, rounds, warmup=2, device=device)
    rows = []
    for v, (step, model, optimiser) in steps.items():
        optimiser.zero_grad(set_to_none=True)  # free old gradients outside the measured window
        transient, _ = peak_bytes(step, device)
        peak = (transient + _persistent_bytes(model, optimiser)) / MIB
        gflop = network_flops(v, widths, crop, batch, train=True) / 1e9
        med = statistics.median(times[v])
        rows.append(NetworkRow(
            variant=v, parameters=count_parameters(model), step_ms=1e3 * med,
            step_ratio=paired_ratio(times, v, "unet3d"), step_gflop=gflop, gflops=gflop / med,
            peak_mib=peak, extra_peak_pct=0.0,
        ))
    base = next(r for r in rows if r.variant == "unet3d")
    for r in rows:
        r.extra_peak_pct = 100 * (r.peak_mib / base.peak_mib - 1)
        log(f"  {r.variant:8s} {r.parameters:>8d} params, step {r.step_ms:7.1f} ms (x{r.step_ratio:.3f} U-Net), "
            f"{r.gflops:6.1f} GFLOP/s, peak {r.peak_mib:6.1f} MiB ({r.extra_peak_pct:+.1f}%)")

    # Whole-volume prediction: every variant on a demo volume; on a paper-sized volume the
    # U-Net (the target) with more repeats, the others once where their maps fit in memory.
    for r in rows:
        model = steps[r.variant][1]
        budget_ok = lambda size: ncl_prediction_bytes(r.variant, widths, size) / MIB <= memory_budget_mib  # noqa: E731
        with contextlib.suppress(Exception):
            r.predict_paper_gflop = network_flops(r.variant, widths, PAPER_VOLUME, 1, train=False) / 1e9
        if budget_ok(DEMO_VOLUME):
            r.predict_demo_s = time_prediction(model, DEMO_VOLUME, predict_reps, device)
        if budget_ok(PAPER_VOLUME):
            r.predict_paper_s = time_prediction(model, PAPER_VOLUME, predict_reps + 1 if r.variant == "unet3d" else 1, device)
        else:
            need = ncl_prediction_bytes(r.variant, widths, PAPER_VOLUME) / 2**30
            r.predict_paper_note = f"not run: its non-local map needs {need:.0f} GiB"
        log(f"  {r.variant:8s} predict demo volume {DEMO_VOLUME}: {_fmt(r.predict_demo_s)} s, paper-sized "
            f"{PAPER_VOLUME}: {_fmt(r.predict_paper_s)} s {r.predict_paper_note}")
    return rows


def paper_width_check(
    crop: Sequence[int] = (16, 64, 64), batch: int = 1, variants: Sequence[str] = ("unet3d", "rsa-111"),
    device: torch.device | str = "cpu", rounds: int = 2, log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """The paper's widths (32..512) on a small crop: RSA's extra step time and peak memory there."""
    device = torch.device(device)
    steps = {v: make_train_step(v, PAPER_WIDTHS, crop, batch, device) for v in variants}
    times = interleaved_times({v: s[0] for v, s in steps.items()}, rounds, warmup=1, device=device)
    rows = []
    for v, (step, model, optimiser) in steps.items():
        optimiser.zero_grad(set_to_none=True)
        transient, _ = peak_bytes(step, device)
        gflop = network_flops(v, PAPER_WIDTHS, crop, batch, train=True) / 1e9
        rows.append({"variant": v, "parameters": count_parameters(model),
                     "step_ms": 1e3 * statistics.median(times[v]), "step_ratio": paired_ratio(times, v, variants[0]),
                     "step_gflop": gflop, "gflops": gflop / statistics.median(times[v]),
                     "peak_mib": (transient + _persistent_bytes(model, optimiser)) / MIB})
    for r in rows:
        r["extra_peak_pct"] = 100 * (r["peak_mib"] / rows[0]["peak_mib"] - 1)
        log(f"  paper widths {r['variant']}: step {r['step_ms']:.0f} ms (x{r['step_ratio']:.3f}, "
            f"{r['gflops']:.1f} GFLOP/s), "
            f"peak {r['peak_mib']:.0f} MiB ({r['extra_peak_pct']:+.1f}%)")
    del steps
    return rows


def layout_ablation(
    widths: Sequence[int], crop: Sequence[int], batch: int, rounds: int = 5, log: Callable[[str], None] = print
) -> dict[str, float]:
    """U-Net training step on CPU: before (NCDHW, oneDNN 1x1x1 convs) and after each change."""
    cases = {}
    for name, cl, gemm in (("ncdhw_conv1x1", False, False), ("ndhwc_conv1x1", True, False), ("ndhwc_gemm1x1", True, True)):
        step, _, _ = make_train_step("unet3d", widths, crop, batch, "cpu", channels_last=cl)

        def run(step=step, gemm=gemm):
            with contextlib.nullcontext() if gemm else pointwise_as_convolution():
                step()

        cases[name] = run
    times = interleaved_times(cases, rounds, warmup=1)
    out = {f"{k}_ms": 1e3 * statistics.median(v) for k, v in times.items()}
    out["speedup_total"] = paired_ratio(times, "ncdhw_conv1x1", "ndhwc_gemm1x1")
    out["speedup_channels_last"] = paired_ratio(times, "ncdhw_conv1x1", "ndhwc_conv1x1")
    out["speedup_gemm1x1"] = paired_ratio(times, "ndhwc_conv1x1", "ndhwc_gemm1x1")
    log("  U-Net step: " + ", ".join(f"{k} {v:.3g}" for k, v in out.items()))
    return out


def thread_policy(threads: int, widths: Sequence[int], crop: Sequence[int], batch: int,
                  log: Callable[[str], None] = print) -> dict[str, float]:
    """U-Net training step in fresh interpreters under each OpenMP wait policy (set at start-up).

    ``default`` is libgomp's own (spin a while, then sleep), ``ACTIVE`` spins, ``PASSIVE`` sleeps
    at once: spinning wins on an idle machine, sleeping when other processes want the cores.
    """
    out = {}
    for policy, n in (("default", threads), ("ACTIVE", threads), ("PASSIVE", threads), ("default", 1)):
        env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
        if policy != "default":
            env["OMP_WAIT_POLICY"] = policy
        args = json.dumps({"threads": n, "widths": list(widths), "crop": list(crop), "batch": batch})
        cmd = [sys.executable, "-c", f"from rsanet.benchmarks.speed import _worker_step; _worker_step({args!r})"]
        try:
            res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180, check=True)
            out[f"{policy.lower()}_{n}thr_ms"] = float(res.stdout.strip().splitlines()[-1])
        except (subprocess.SubprocessError, ValueError, IndexError) as exc:
            log(f"  thread policy {policy}/{n}: failed ({exc})")
    log("  U-Net step by OpenMP wait policy: " + ", ".join(f"{k} {v:.0f}" for k, v in out.items()))
    return out


def _worker_step(args_json: str) -> None:
    args = json.loads(args_json)
    torch.set_num_threads(int(args["threads"]))
    step, _, _ = make_train_step("unet3d", args["widths"], args["crop"], int(args["batch"]))
    times = interleaved_times({"s": step}, 5, warmup=2)["s"]
    print(1e3 * statistics.median(times))


def cuda_precision(
    widths: Sequence[int] = PAPER_WIDTHS, crop: Sequence[int] = (32, 128, 128), batch: int = 4,
    variants: Sequence[str] = ("unet3d", "rsa-111"), rounds: int = 5, log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """On CUDA: training step in fp32/bf16/fp16 autocast and NCDHW/NDHWC; speed-up over fp32 NCDHW."""
    if not torch.cuda.is_available():
        return []
    device = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    rows = []
    for v in variants:
        fns, models = {}, {}
        for name, cl, dt in (("fp32_ncdhw", False, None), ("fp32_ndhwc", True, None),
                             ("bf16_ndhwc", True, torch.bfloat16), ("fp16_ndhwc", True, torch.float16),
                             ("bf16_ncdhw", False, torch.bfloat16)):
            step, model, opt = make_train_step(v, widths, crop, batch, device, channels_last=cl, amp_dtype=dt)
            fns[name], models[name] = step, (model, opt)
        times = interleaved_times(fns, rounds, warmup=2, device=device)
        for name, fn in fns.items():
            peak, _ = peak_bytes(fn, device)
            rows.append({
                "variant": v, "setting": name, "step_ms": 1e3 * statistics.median(times[name]),
                "speedup_vs_fp32_ncdhw": paired_ratio(times, "fp32_ncdhw", name),
                "peak_mib": peak / MIB,
            })
            log(f"  CUDA {v} {name}: {rows[-1]['step_ms']:.1f} ms, x{rows[-1]['speedup_vs_fp32_ncdhw']:.2f}")
        del fns, models
        torch.cuda.empty_cache()
    return rows


# ---------------------------------------------------------------------------------------------
# 4c. The CPU speed targets, checked
# ---------------------------------------------------------------------------------------------
def rsa_softmax_shapes(variant: str, widths: Sequence[int], crop: Sequence[int], batch: int) -> list[tuple[int, ...]]:
    """Shapes of every softmax output (the attention maps) of a forward+backward pass, recorded
    through PyTorch's public ``TorchFunctionMode`` (every ``torch.softmax``/``F.softmax`` call)."""
    from torch.overrides import TorchFunctionMode

    shapes: list[tuple[int, ...]] = []

    class Record(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if getattr(func, "__name__", "") == "softmax":
                shapes.append(tuple(out.shape))
            return out

    step, _, _ = make_train_step(variant, widths, crop, batch)
    with Record():
        step()
    return shapes


@dataclass
class Target:
    name: str
    measured: str
    threshold: str
    holds: bool
    note: str = ""


def check_targets(
    nets: Sequence[NetworkRow], ceiling: Mapping[str, float], widths: Sequence[int], crop: Sequence[int],
    batch: int, threads: int,
) -> list[Target]:
    """The CPU speed targets (docs/performance.md) against this run's measurements."""
    targets = []
    by = {r.variant: r for r in nets}
    for v in ("rsa-010", "rsa-101", "rsa-111"):
        if v in by:
            r = by[v]
            targets.append(Target(f"{v} training step vs U-Net", f"x{r.step_ratio:.3f}", "<= x1.10",
                                  r.step_ratio <= 1.10, f"{r.step_ms:.0f} vs {by['unet3d'].step_ms:.0f} ms"))
    for v in ("rsa-010", "rsa-101", "rsa-111"):
        if v in by:
            shapes = rsa_softmax_shapes(v, widths, crop, batch)
            largest = max((s[-1] for s in shapes), default=0)
            biggest_axis = max(feature_shape(crop, widths, "second-bottom")[1])
            no_nxn = largest <= biggest_axis
            r = by[v]
            targets.append(Target(
                f"{v}: no NxN map, extra peak memory", f"largest map {largest}x{largest}; {r.extra_peak_pct:+.1f}%",
                "maps SxS only; <= +10%", no_nxn and r.extra_peak_pct <= 10,
                f"{len(shapes)} softmax maps recorded; peak {r.peak_mib:.1f} vs {by['unet3d'].peak_mib:.1f} MiB",
            ))
    conv = ceiling["conv_gflops"]
    for v in ("unet3d", "rsa-111"):
        if v in by:
            r = by[v]
            frac = r.gflops / conv
            targets.append(Target(f"{v} CPU training GFLOP/s vs 3D-conv ceiling",
                                  f"{r.gflops:.1f} / {conv:.1f} = {100 * frac:.0f}%", ">= 40%", frac >= 0.40,
                                  f"{threads} threads"))
    if "unet3d" in by and by["unet3d"].predict_paper_s is not None:
        s = by["unet3d"].predict_paper_s
        targets.append(Target(f"whole paper-sized volume {'x'.join(map(str, PAPER_VOLUME))}, demo U-Net",
                              f"{s:.2f} s", "< 10 s", s < 10, f"{threads} threads"))
    return targets


# ---------------------------------------------------------------------------------------------
# 4d. Writers: CSV, Markdown, figure
# ---------------------------------------------------------------------------------------------
def _fmt(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        if x != 0 and (abs(x) >= 1e6 or abs(x) < 1e-3):
            return f"{x:.{digits}g}"
        return f"{x:.{digits}g}" if abs(x) < 10 ** digits else f"{x:,.0f}"
    return str(x)


def write_csv(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cols = list(rows[0]) if rows else []
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Mapping[str, str]) -> str:
    """``columns``: key -> header. Values formatted with :func:`_fmt`."""
    head = "| " + " | ".join(columns.values()) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(_fmt(r.get(k)) for k in columns) + " |" for r in rows]
    return "\n".join([head, sep, *body])


ATTENTION_COLUMNS = {
    "network": "network", "input": "input (DxHxW)", "placement": "placement", "channels": "C",
    "feature": "feature map", "ncl_entries": "NCL map entries", "rsa_entries": "RSA map entries",
    "entries_ratio": "entries NCL/RSA", "ncl_map_gflop": "NCL map GFLOP", "rsa_map_gflop": "RSA map GFLOP",
    "map_flop_ratio": "map FLOPs NCL/RSA", "block_flop_ratio": "block FLOPs NCL/RSA",
    "ncl_peak_mib": "NCL peak MiB", "rsa_peak_mib": "RSA peak MiB", "peak_ratio": "peak NCL/RSA",
}
NETWORK_COLUMNS = {
    "variant": "variant", "parameters": "parameters", "step_ms": "train step ms", "step_ratio": "x U-Net",
    "step_gflop": "GFLOP/step", "gflops": "GFLOP/s", "peak_mib": "peak MiB", "extra_peak_pct": "extra peak %",
    "predict_demo_s": "predict demo volume s", "predict_paper_s": "predict paper-sized volume s",
    "predict_paper_note": "note",
}


def verdict(rows: Sequence[AttentionRow]) -> list[str]:
    """Plain sentences: for which sizes the paper's 28x (memory) and 100x (FLOPs) hold."""
    lines = []
    for r in rows:
        mem_maps = r.entries_ratio >= 28
        mem_meas = None if r.peak_ratio is None else r.peak_ratio >= 28
        fl = r.map_flop_ratio >= 100
        lines.append(
            f"- {r.network}, {r.input}, {r.placement} ({r.feature}, C={r.channels}): maps {_fmt(r.entries_ratio)}x "
            f"fewer entries (28x {'holds' if mem_maps else 'fails'})"
            + ("" if mem_meas is None else f", measured block peak {_fmt(r.peak_ratio)}x (28x {'holds' if mem_meas else 'fails'})")
            + f"; map FLOPs {_fmt(r.map_flop_ratio)}x (100x {'holds' if fl else 'fails'})."
        )
    return lines


def write_figure(rows: Sequence[AttentionRow], path: str | os.PathLike) -> None:
    """Four log-log panels against feature-map positions P: map entries, map FLOPs, memory, ratios."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(rows, key=lambda r: r.positions)
    p = np.array([r.positions for r in rows], dtype=float)
    meas = [r for r in rows if r.peak_ratio is not None]
    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    ax = axes[0, 0]
    ax.loglog(p, [r.ncl_entries for r in rows], "o-", color="tab:red", label="NCL: P² entries")
    ax.loglog(p, [r.rsa_entries for r in rows], "s-", color="tab:blue", label="RSA: D²+H²+W² entries")
    ax.set_title("(a) attention-map entries of one block, one volume")
    ax.set_ylabel("entries")
    ax = axes[0, 1]
    for net, marker in zip(dict.fromkeys(r.network for r in rows), "o^sv"):
        sel = [r for r in rows if r.network == net]
        if sel:
            ax.loglog([r.positions for r in sel], [r.ncl_map_gflop for r in sel], marker, color="tab:red",
                      label=f"NCL, {net} widths")
            ax.loglog([r.positions for r in sel], [r.rsa_map_gflop for r in sel], marker, color="tab:blue",
                      mfc="none", label=f"RSA, {net} widths")
    ax.set_title("(b) GFLOP to compute + apply the maps (flop counter)")
    ax.set_ylabel("GFLOP")
    ax = axes[1, 0]
    ax.loglog(p, [r.ncl_map_mib for r in rows], "-", color="tab:red", alpha=0.5, label="NCL maps, float32")
    ax.loglog(p, [r.rsa_map_mib for r in rows], "-", color="tab:blue", alpha=0.5, label="RSA maps, float32")
    if meas:
        ax.loglog([r.positions for r in meas], [r.ncl_peak_mib for r in meas], "x", color="tab:red", ms=9,
                  label="NCL block, measured peak (fwd+bwd)")
        ax.loglog([r.positions for r in meas], [r.rsa_peak_mib for r in meas], "+", color="tab:blue", ms=11,
                  label="RSA block, measured peak (fwd+bwd)")
    ax.set_title("(c) memory (MiB)")
    ax.set_ylabel("MiB")
    ax = axes[1, 1]
    ax.loglog(p, [r.entries_ratio for r in rows], "o", color="tab:purple", label="map entries (= map memory)")
    ax.loglog(p, [r.map_flop_ratio for r in rows], "s", color="tab:green", label="map FLOPs")
    if meas:
        ax.loglog([r.positions for r in meas], [r.peak_ratio for r in meas], "x", color="black", ms=9,
                  label="measured block peak memory")
    ax.axhline(28, color="gray", ls="--", lw=1, label="paper: 28x less memory")
    ax.axhline(100, color="gray", ls=":", lw=1, label="paper: 100x fewer FLOPs")
    ax.axhline(1, color="black", lw=0.5)
    ax.set_title("(d) NCL / RSA")
    ax.set_ylabel("ratio")
    for ax in axes.flat:
        ax.set_xlabel("feature-map positions P = D·H·W")
        ax.legend(fontsize=7)
        ax.grid(True, which="major", lw=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    fig.savefig(path.with_suffix(".pdf"))
    plt.close(fig)


def machine_info(threads: int) -> dict[str, Any]:
    info = {
        "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
        "processor": platform.processor(), "cpu_count": os.cpu_count(), "torch_threads": threads,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(unset)"),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    with contextlib.suppress(OSError):
        info["loadavg_at_start"] = os.getloadavg()
    return info


def write_markdown(result: Mapping[str, Any], path: str | os.PathLike) -> None:
    att = result["attention"]
    nets = result["networks"]
    ceil = result["ceiling"]
    cfg = result["config"]
    parts = [
        "# RSANet benchmark: attention cost and network speed",
        "",
        f"Machine: {result['machine']['cpu_count']} CPUs ({result['machine']['cpu_capability']}), torch "
        f"{result['machine']['torch']}, {cfg['threads']} threads, OMP_WAIT_POLICY="
        f"{result['machine']['omp_wait_policy']}, device {cfg['device']}; load average at start "
        f"{result['machine'].get('loadavg_at_start', '-')}. Wall time of the benchmark: {result['seconds']:.0f} s.",
        "",
        "## Attention cost, NCL (non-local) against RSA, one volume, float32",
        "",
        "Entries: all attention maps of one block (RSA: its three SxS maps). Map GFLOP: computing",
        "and applying the maps (the blocks' `bmm` calls), counted with `torch.utils.flop_counter` on",
        "fake tensors (equal to the formulas `4(C/2)P²` and `4CP(D+H+W)` in every row: "
        f"{all(r['formula_matches'] for r in att)}). Block FLOPs add the 1x1x1 projections. Peak: measured",
        f"forward+backward of one block ({att[0]['memory_source'] if att else ''}; '-' where it cannot run here).",
        "",
        markdown_table(att, ATTENTION_COLUMNS),
        "",
        "### The paper's claims (28x less memory, 100x fewer FLOPs for the attention maps)",
        "",
        *result["verdict"],
        "",
        f"## Whole networks at the configured settings (widths {cfg['widths']}, crop {cfg['crop']}, "
        f"batch {cfg['batch']})",
        "",
        f"Training step = forward + backward + Adam step, median of {cfg['rounds']} interleaved rounds; "
        "'x U-Net' is the median of per-round ratios. Peak = weights, gradients, Adam state + the step's "
        f"transient peak. Prediction: one whole volume in one pass (demo volume {DEMO_VOLUME}, paper-sized "
        f"{PAPER_VOLUME}).",
        "",
        markdown_table([asdict(r) for r in nets], NETWORK_COLUMNS),
        "",
        "## Machine ceiling (same run)",
        "",
        f"- fp32 matrix product: {ceil['matmul_gflops']:.1f} GFLOP/s",
        f"- 3x3x3 convolution 64->64: NCDHW {ceil['conv_ncdhw_gflops']:.1f}, NDHWC {ceil['conv_ndhwc_gflops']:.1f} "
        f"GFLOP/s forward; NDHWC forward+backward {ceil['conv_ndhwc_train_gflops']:.1f} GFLOP/s; ceiling used: "
        f"{ceil['conv_gflops']:.1f} GFLOP/s",
        f"- for comparison, the demo network's commonest layer (3x3x3, 8->8 channels, 2x16x64x64, NDHWC) "
        f"forward+backward: {ceil['conv8_ndhwc_train_gflops']:.1f} GFLOP/s "
        f"({100 * ceil['conv8_ndhwc_train_gflops'] / ceil['conv_gflops']:.0f}% of the ceiling)",
        "",
        "## Targets",
        "",
        markdown_table([asdict(t) for t in result["targets"]],
                       {"name": "target", "measured": "measured", "threshold": "threshold", "holds": "holds", "note": "note"}),
        "",
    ]
    if result.get("paper_widths"):
        parts += ["## The paper's widths (32..512), crop 16x64x64, batch 1", "",
                  markdown_table(result["paper_widths"], {"variant": "variant", "parameters": "parameters",
                                                          "step_ms": "train step ms", "step_ratio": "x U-Net",
                                                          "gflops": "GFLOP/s", "peak_mib": "peak MiB",
                                                          "extra_peak_pct": "extra peak %"}), ""]
    if result.get("ablation"):
        a = result["ablation"]
        parts += [
            "## What the speed-ups come from (U-Net training step, same run)",
            "",
            f"- before (NCDHW, oneDNN 1x1x1 convolutions): {a['ncdhw_conv1x1_ms']:.0f} ms",
            f"- channels-last (NDHWC): {a['ndhwc_conv1x1_ms']:.0f} ms (x{a['speedup_channels_last']:.2f})",
            f"- and 1x1x1 convolutions as GEMMs: {a['ndhwc_gemm1x1_ms']:.0f} ms (x{a['speedup_gemm1x1']:.2f}; "
            f"x{a['speedup_total']:.2f} in all)",
            "",
        ]
    if result.get("threads"):
        parts += ["## OpenMP wait policy (U-Net training step, fresh interpreters)", ""]
        parts += [f"- {k}: {v:.0f} ms" for k, v in result["threads"].items()] + [""]
    if result.get("cuda"):
        parts += ["## CUDA: precision and memory layout", "",
                  markdown_table(result["cuda"], {"variant": "variant", "setting": "setting", "step_ms": "step ms",
                                                  "speedup_vs_fp32_ncdhw": "speed-up", "peak_mib": "peak MiB"}), ""]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts))


# ---------------------------------------------------------------------------------------------
# 5. Everything
# ---------------------------------------------------------------------------------------------
@dataclass
class Outputs:
    """Where :func:`run_benchmark` writes."""

    attention_csv: Path
    networks_csv: Path
    markdown: Path
    figure: Path
    json: Path

    @staticmethod
    def in_folder(folder: str | os.PathLike) -> "Outputs":
        f = Path(folder)
        return Outputs(f / "attention_cost.csv", f / "networks.csv", f / "benchmark.md",
                       f / "attention_cost.png", f / "benchmark.json")


def run_benchmark(
    out: Outputs, widths: Sequence[int] = DEMO_WIDTHS, crop: Sequence[int] = (16, 64, 64), batch: int = 2,
    threads: int = 2, device: str = "auto", rounds: int = 7, variants: Sequence[str] = tuple(VARIANTS),
    memory_budget_mib: float = 1500, extras: bool = True, log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run every part, write the CSVs, the Markdown, the figure and a JSON of everything."""
    t0 = time.perf_counter()
    torch.set_num_threads(threads)
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device))
    widths, crop = tuple(int(w) for w in widths), tuple(int(c) for c in crop)
    log(f"benchmark on {dev}, {threads} threads, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}")
    log("machine ceiling")
    ceiling = machine_ceiling(dev)
    log("  " + ", ".join(f"{k} {v:.1f}" for k, v in ceiling.items()))
    log("attention cost, NCL against RSA")
    if dev.type == "cuda":  # room for far bigger maps than on a CPU
        att = attention_cost(dev, max(memory_budget_mib, 30000), gflop_budget=5000, time_gflop_budget=500, log=log)
    else:
        att = attention_cost(dev, memory_budget_mib, log=log)
    log("whole networks")
    nets = network_cost(widths, crop, batch, variants, dev, rounds, memory_budget_mib=memory_budget_mib, log=log)
    targets = check_targets(nets, ceiling, widths, crop, batch, threads)
    for t in targets:
        log(f"  target {t.name}: {t.measured} ({t.threshold}) -> {'holds' if t.holds else 'MISSED'}")
    result: dict[str, Any] = {
        "machine": machine_info(threads),
        "config": {"widths": list(widths), "crop": list(crop), "batch": batch, "threads": threads,
                   "device": str(dev), "rounds": rounds},
        "ceiling": ceiling,
        "attention": [r.as_dict() for r in att],
        "verdict": verdict(att),
        "networks": nets,
        "targets": targets,
    }
    if extras:
        log("paper widths (32..512) on a small crop: RSA-111 against the U-Net")
        result["paper_widths"] = paper_width_check(device=dev, log=log)
    if extras and dev.type == "cpu":
        log("before/after: memory layout and 1x1x1 convolutions")
        result["ablation"] = layout_ablation(widths, crop, batch, log=log)
        log("OpenMP wait policy")
        result["threads"] = thread_policy(threads, widths, crop, batch, log=log)
    if dev.type == "cuda":
        log("CUDA precision and layout")
        result["cuda"] = cuda_precision(log=log)
    result["seconds"] = time.perf_counter() - t0
    write_csv(result["attention"], out.attention_csv)
    write_csv([asdict(r) for r in nets], out.networks_csv)
    write_markdown(result, out.markdown)
    write_figure(att, out.figure)
    serialisable = {**result, "networks": [asdict(r) for r in nets], "targets": [asdict(t) for t in targets]}
    out.json.write_text(json.dumps(serialisable, indent=1, default=str))
    log(f"wrote {out.markdown} and the rest in {out.markdown.parent} ({result['seconds']:.0f} s)")
    return result
