"""CPU speed kernels of the networks: drop-in replacements with the same parameters, state-dict
keys and results, faster on a CPU (measured in docs/performance.md and by ``tools/benchmark.py``).

* :class:`PointwiseConv3d`: a 1x1x1 ``nn.Conv3d`` computed as a matrix product on CPU.
* :class:`GroupNorm`: ``nn.GroupNorm`` with a faster CPU backward.

Speed details, not modelling choices: :mod:`rsanet.models` reads the same without them.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn


# ---------------------------------------------------------------------------------------------
# 1x1x1 convolutions as matrix products
# ---------------------------------------------------------------------------------------------
class PointwiseConv3d(nn.Conv3d):
    """A 1x1x1 ``nn.Conv3d`` (same parameters, initialisation and state-dict keys).

    On CPU its forward is the equivalent matrix product over channels: oneDNN's 1x1x1 3D
    convolution (its backward above all) is 5-20x slower than a GEMM for the small maps and
    channel counts of this network (measured by ``tools/benchmark.py``). A channels-last
    input stays channels-last. Elsewhere (CUDA), and inside :func:`pointwise_as_convolution`,
    it is the ordinary convolution.

    Shapes: ``(N, C_in, D, H, W) -> (N, C_out, D, H, W)``.
    """

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True) -> None:
        super().__init__(in_channels, out_channels, kernel_size=1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _GEMM_ON_CPU.get() or x.device.type != "cpu" or x.dim() != 5:
            return super().forward(x)
        weight = self.weight.flatten(1)  # (C_out, C_in)
        if _is_channels_last(x):
            # (N, D, H, W, C) is a view of a channels-last tensor: one GEMM, no copies
            return F.linear(x.movedim(1, -1), weight, self.bias).movedim(-1, 1)
        y = torch.matmul(weight, x.flatten(2))  # (N, C_out, D*H*W)
        if self.bias is not None:
            y = y + self.bias[:, None]
        return y.view(x.shape[0], -1, *x.shape[2:])


def _is_channels_last(x: torch.Tensor) -> bool:
    """Whether the 5D tensor ``x`` is laid out channels-last (and is not also plain contiguous)."""
    return x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous()


#: Whether PointwiseConv3d uses the matrix product on CPU; set only by pointwise_as_convolution.
_GEMM_ON_CPU: contextvars.ContextVar[bool] = contextvars.ContextVar("rsanet_gemm_on_cpu", default=True)


@contextlib.contextmanager
def pointwise_as_convolution() -> Iterator[None]:
    """Within this block (this thread/context only), every :class:`PointwiseConv3d` runs as the
    ordinary convolution on CPU too: for benchmarks that count or time oneDNN's 1x1x1 kernels."""
    token = _GEMM_ON_CPU.set(False)
    try:
        yield
    finally:
        _GEMM_ON_CPU.reset(token)


class GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` (same parameters and state-dict keys) with a faster backward on CPU.

    PyTorch's CPU GroupNorm is slow to differentiate for channels-last tensors, and slower
    still in bfloat16 (measured in docs/performance.md). So, when gradients are recorded on a CPU, the norm is computed in float32 (float64 stays float64) on
    an NCDHW copy and handed back in the input's dtype and memory layout. Without gradients
    (inference) PyTorch's own kernel runs on the input as it is: its forward is fast in either
    layout. Both compute the statistics in float32 or wider; the result is the same norm.

    Shapes: ``(N, C, D, H, W) -> (N, C, D, H, W)``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled() or x.device.type != "cpu" or x.dim() != 5:
            return super().forward(x)
        channels_last = _is_channels_last(x)
        dt = torch.promote_types(torch.promote_types(torch.float32, x.dtype), self.weight.dtype)
        with torch.autocast(device_type="cpu", enabled=False):
            y = F.group_norm(x.to(dt).contiguous(), self.num_groups, self.weight.to(dt) if self.weight is not None else None, self.bias.to(dt) if self.bias is not None else None, self.eps)
        return y.to(dtype=x.dtype, memory_format=torch.channels_last_3d if channels_last else torch.contiguous_format)
