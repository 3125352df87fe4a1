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
4. **The benchmark** (this module: :func:`run_benchmark`) - :func:`attention_cost` (NCL against RSA at every placement and size),
   :func:`network_cost` (every variant: parameters, training step, peak memory, GFLOP/s,
   whole-volume prediction), :func:`check_targets` and the writers (CSV, Markdown, figure).

Conventions: one FLOP is one multiply or one add (a multiply-add is 2 FLOPs), as in
``torch.utils.flop_counter``; "map FLOPs" are those of computing the attention maps
(``Q K^T``) and applying them (``A V``), i.e. the ``bmm`` calls of the blocks; the
projections (1x1x1 convolutions) are counted separately. Memory is MiB (2**20 bytes).
Attention rows are for one volume (batch 1) in float32.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..models import VARIANTS

from .counting import DEMO_WIDTHS
from .report import machine_info, verdict, write_csv, write_figure, write_markdown
from .timing import (
    attention_cost, check_targets, cuda_precision, layout_ablation, machine_ceiling, network_cost, paper_width_check,
    thread_policy,
)

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
