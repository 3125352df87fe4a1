"""Where and in what arithmetic the networks run: device choice, memory layout, bf16 autocast.

Kept apart from the training and inference code that uses them, and measured in
docs/performance.md: channels-last 3D on CPU (oneDNN runs every convolution in NDHWC, 2-4x faster),
NCDHW on CUDA; bf16 autocast on CUDA and on CPUs with AMX only.
"""

from __future__ import annotations

import functools

import torch


def memory_layout(device: torch.device) -> torch.memory_format:
    """The faster layout for 3D convolutions: channels-last on CPU, NCDHW on CUDA (measured)."""
    return torch.channels_last_3d if device.type == "cpu" else torch.contiguous_format


def bf16_native(device: torch.device) -> bool:
    """Whether bfloat16 autocast is used on ``device``: always on CUDA; on a CPU only when it has
    AMX-BF16 instructions (Linux's ``/proc/cpuinfo`` flag ``amx_bf16``). Elsewhere (macOS,
    Windows, CPUs without AMX): False, float32.

    Why AMX and not AVX512-BF16 alone: without AMX, bf16 demo trainings diverged to NaN, were not
    reproducible and were no faster (docs/performance.md, "bf16 autocast").
    """
    if device.type == "cuda":
        return True
    if device.type != "cpu":
        return False
    return "amx_bf16" in _cpu_flags()


def precision(amp: bool, device: torch.device) -> str:
    """The arithmetic a network trains and predicts in on ``device`` with ``train.amp`` = ``amp``:
    ``"bf16 autocast"`` or ``"float32"`` (for logs and provenance)."""
    return "bf16 autocast" if amp and bf16_native(device) else "float32"


@functools.cache
def _cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def resolve_device(name: str) -> torch.device:
    """``"auto"`` -> CUDA if available else CPU; otherwise the named device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("config asks for device 'cuda' but PyTorch sees no CUDA GPU")
    return torch.device(name)
