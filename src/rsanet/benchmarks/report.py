"""Reporting the benchmark: CSV, Markdown and the attention-cost figure."""

from __future__ import annotations

import contextlib
import csv
import os
import platform
from dataclasses import asdict
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch


from .counting import DEMO_VOLUME, PAPER_VOLUME
from .timing import AttentionRow, _fmt

# ---------------------------------------------------------------------------------------------
# 4d. Writers: CSV, Markdown, figure
# ---------------------------------------------------------------------------------------------


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


