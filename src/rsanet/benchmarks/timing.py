"""Timing and memory of the attention blocks and the networks: medians of interleaved repeats
after warm-up, peak memory (the PyTorch profiler's allocation events on CPU,
``torch.cuda.max_memory_allocated`` on CUDA), the machine's own ceiling, and the CPU speed
targets checked. Attention rows are for one volume (batch 1) in float32.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ..losses import ExpWeightedCrossEntropy
from ..kernels import pointwise_as_convolution
from ..models import PAPER_WIDTHS, VARIANTS, build_model, count_parameters

from .counting import (
    DEMO_VOLUME, DEMO_WIDTHS, INPUT_SIZES, MIB, PAPER_VOLUME, PLACEMENTS, block_flops, feature_shape, make_block,
    map_entries, map_flops, network_flops, projection_flops,
)

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
    predict_volume(model, image, tile=None, overlap=0.25, device=device)  # warm-up (allocations, kernels)
    times = interleaved_times({"p": lambda: predict_volume(model, image, tile=None, overlap=0.25, device=device)}, reps, 0)
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
        cmd = [sys.executable, "-c", f"from rsanet.benchmarks.timing import _worker_step; _worker_step({args!r})"]
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


