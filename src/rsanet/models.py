"""The networks of the RSANet study, read top-down: blocks first, then the U-Net that holds them.

Every tensor here is a 3D feature map laid out ``(N, C, D, H, W)``:

* ``N`` batch, ``C`` channels,
* ``D`` the **axial** axis (inferior -> superior),
* ``H`` the **coronal** axis (posterior -> anterior),
* ``W`` the **sagittal** axis (left -> right).

Images are reoriented to RAS+ and stored ``(z, y, x)`` to get there (see
:func:`rsanet.volumes.ras_to_model`). "Slice-wise attention along the axial direction" means
the ``D`` slices attend to each other.

Contents
--------
1. :func:`slice_attention` - Eq. 1-2 of the paper for one direction (a pure function).
2. :class:`SliceAttention` - one SA block (own projections, own alpha).
3. :class:`RSABlock` - three SA steps in sequence (sagittal -> coronal -> axial) sharing one
   set of query/key/value projections, each step with its own alpha.
4. :class:`NonLocalBlock` - the embedded-Gaussian non-local block (the NCL baseline).
5. :class:`UNet3D` - the backbone (5 levels, 32..512 channels, 23.77 M parameters; RSA-010
   24.55 M, the paper's "about 24.5 M") with the
   attention blocks placed by a 3-bit code: ``010`` bottom, ``101`` encoder + decoder of the
   second-bottom level, ``111`` all three.
6. :data:`VARIANTS` and :func:`build_model` - the seven Table 1 variants.
7. :func:`attention_scales` and :class:`attention_off` - the blocks' residual scales, and the
   network with its attention switched off (the attention check of every training).

All blocks start as the identity (their residual scale is zero at initialisation), so a
variant begins training as the plain 3D U-Net. At the demo's scale a scale at ``lr = 1e-3``
hardly moves (Adam moves a parameter by at most ~``lr`` per step), so the scales get their own
learning rate (``train.attention_lr``, docs/models.md "Attention that learns").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .kernels import GroupNorm, PointwiseConv3d

Direction = Literal["axial", "coronal", "sagittal"]

#: Which tensor dimension of ``(N, C, D, H, W)`` each slice direction runs along.
SLICE_AXIS: dict[str, int] = {"axial": 2, "coronal": 3, "sagittal": 4}

#: The paper's order of the three SA steps inside an RSA block (Section 2.2, Fig. 4).
PAPER_ORDER: tuple[Direction, Direction, Direction] = ("sagittal", "coronal", "axial")


# ---------------------------------------------------------------------------------------------
# Precision of the attention logits
# ---------------------------------------------------------------------------------------------
def logit_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The dtype attention logits are computed in: the widest input, and at least float32.

    ``bfloat16``/``float16`` are promoted to ``float32``; ``float64`` stays ``float64`` (never
    downcast), so a float64 block matches a float64 reference to rounding.
    """
    out = torch.float32
    for dt in dtypes:
        out = torch.promote_types(out, dt)
    return out


def _maybe_to(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.to(dtype)


# ---------------------------------------------------------------------------------------------
# 1. Slice-wise attention, Eq. 1-2, as a pure function
# ---------------------------------------------------------------------------------------------
def slice_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, direction: Direction
) -> torch.Tensor:
    """Aggregate each slice as an attention-weighted sum of all slices along ``direction``.

    With ``S`` the number of slices along ``direction`` and ``F = C * (other two sizes)``:
    ``A = softmax(Q K^T)`` is an ``S x S`` map (Eq. 1, **no** ``1/sqrt(F)`` scaling, softmax
    over the key slice, computed in float32 because the logits can be very large), and the
    result is ``A V`` reshaped back to the input layout (the ``RT(A M3)`` of Eq. 2).

    Args:
        query, key, value: ``(N, C, D, H, W)`` projections of the feature map.
        direction: ``"axial"`` (D slices), ``"coronal"`` (H slices) or ``"sagittal"`` (W).

    Returns:
        ``(N, C, D, H, W)``, dtype of ``value``. Only the ``S x S`` map is materialised.
    """
    axis = SLICE_AXIS[direction]
    n = value.shape[0]
    # Move the slice axis next to the batch axis and flatten each slice: (N, S, C*rest)
    q = query.movedim(axis, 1).reshape(n, query.shape[axis], -1)
    k = key.movedim(axis, 1).reshape(n, key.shape[axis], -1)
    v_moved = value.movedim(axis, 1)  # (N, S, C, ., .)
    v = v_moved.reshape(n, value.shape[axis], -1)
    with torch.autocast(device_type=q.device.type, enabled=False):
        dt = logit_dtype(q.dtype, k.dtype)
        logits = torch.bmm(q.to(dt), k.to(dt).transpose(1, 2))  # (N, S, S)
        attn = torch.softmax(logits, dim=-1)  # rows sum to 1 over the key slice
    out = torch.bmm(attn.to(v.dtype), v)  # (N, S, C*rest)
    return out.reshape(v_moved.shape).movedim(1, axis)  # back to (N, C, D, H, W)


def _projected_slice_attention(
    m: torch.Tensor, query: nn.Conv3d, key: nn.Conv3d, value: nn.Conv3d, direction: Direction,
    alpha: torch.Tensor,
) -> torch.Tensor:
    """``alpha * slice_attention(query(m), key(m), value(m), direction)``, without copies.

    The same Eq. 1-2 (float32 softmax, no scaling), arranged for speed and memory:

    * the 1x1x1 projections are computed channels-last, ``(N, D, H, W, C)``, and never copied:
      with ``B`` the dimensions before the slice axis and ``F`` those after it (``C`` included),
      each is a ``(N*B, S, F)`` view, ``Q K^T`` is the sum over ``B`` of ``B`` batched products
      (the same dot products, in another order) and ``A V`` a batched product that writes the
      result straight into the channels-last layout;
    * ``alpha`` scales the small ``S x S`` map instead of the result (``alpha (A V) =
      (alpha A) V``), so autograd keeps no copy of the result for alpha's gradient.

    Several times faster than projecting, reshaping three maps and scaling the result (see
    ``tools/benchmark.py``). Returns ``(N, C, D, H, W)``, channels-last.
    """
    x = m.movedim(1, -1)  # (N, D, H, W, C): a view, contiguous when m is channels-last
    v = F.linear(x, value.weight.flatten(1), value.bias)  # (N, D, H, W, C), autocast dtype
    axis = SLICE_AXIS[direction] - 1  # slice axis in (N, D, H, W, C)
    n, s = v.shape[0], v.shape[axis]
    before = math.prod(v.shape[1:axis])
    with torch.autocast(device_type=x.device.type, enabled=False):
        # Query and key, hence the logits, in at least float32 even under bf16 autocast: the
        # logits are unscaled sums over up to C*H*W products and bf16 inputs would round them.
        dt = logit_dtype(x.dtype, query.weight.dtype)
        q = F.linear(x.to(dt), query.weight.flatten(1).to(dt), _maybe_to(query.bias, dt))
        k = F.linear(x.to(dt), key.weight.flatten(1).to(dt), _maybe_to(key.bias, dt))
        q3, k3 = q.view(n * before, s, -1), k.view(n * before, s, -1)  # (N*B, S, F)
        logits = torch.bmm(q3, k3.transpose(1, 2))  # (N*B, S, S)
        if before > 1:
            logits = logits.view(n, before, s, s).sum(1)  # (N, S, S): full dot products
        attn = torch.softmax(logits, dim=-1)
        scaled = alpha * attn  # (N, S, S)
    if before == 1:
        out = torch.bmm(scaled.to(v.dtype), v.view(n, s, -1))  # (N, S, F)
    else:
        out = torch.matmul(scaled.to(v.dtype).unsqueeze(1), v.view(n, before, s, -1))  # (N, B, S, F)
    return out.view(v.shape).movedim(-1, 1)


# ---------------------------------------------------------------------------------------------
# 2. One SA block: Fig. 2 of the paper
# ---------------------------------------------------------------------------------------------
class SliceAttention(nn.Module):
    """A single slice-wise attention (SA) block: ``M' = alpha * RT(A V) + M``.

    Query, key and value are 1x1x1 convolutions ``C -> C`` with bias (no channel reduction);
    ``alpha`` is a learnable scalar initialised to 0, so the block starts as the identity.

    Shapes: input and output ``(N, C, D, H, W)``.
    """

    def __init__(self, channels: int, direction: Direction = "axial", init: float = 0.0) -> None:
        super().__init__()
        if direction not in SLICE_AXIS:
            raise ValueError(f"direction must be one of {sorted(SLICE_AXIS)}, got {direction!r}")
        self.direction: Direction = direction
        self.query = PointwiseConv3d(channels, channels)
        self.key = PointwiseConv3d(channels, channels)
        self.value = PointwiseConv3d(channels, channels)
        self.alpha = nn.Parameter(torch.full((), float(init)))  # 0: the identity at the start

    def forward(self, m: torch.Tensor) -> torch.Tensor:
        # = self.alpha * slice_attention(self.query(m), self.key(m), self.value(m), self.direction)
        scaled = _projected_slice_attention(m, self.query, self.key, self.value, self.direction, self.alpha)
        return m + scaled  # m first: the sum keeps m's memory layout


# ---------------------------------------------------------------------------------------------
# 3. RSA block: Fig. 3-4 of the paper
# ---------------------------------------------------------------------------------------------
class RSABlock(nn.Module):
    """Recurrent slice-wise attention: three SA steps, one per direction, in sequence.

    ``M -> M' -> M'' -> E``: step ``i`` recomputes query, key and value from the current map
    with the **shared** projections ``query``, ``key``, ``value`` (1x1x1, ``C -> C``, bias) and
    adds ``alpha[i] * RT(A V)``. ``alpha`` has shape ``(3,)``, all zeros at initialisation, so
    the block starts as the identity. After the three steps each voxel depends on every voxel.

    Args:
        channels: ``C``.
        order: the three directions in the order they are applied; the paper's
            ``("sagittal", "coronal", "axial")`` by default (the authors' public code used
            ``("coronal", "sagittal", "axial")``).

    Shapes: input and output ``(N, C, D, H, W)``.
    """

    def __init__(self, channels: int, order: Sequence[Direction] = PAPER_ORDER, init: float = 0.0) -> None:
        super().__init__()
        order = tuple(order)
        if len(order) != 3 or sorted(order) != sorted(SLICE_AXIS):
            raise ValueError(f"order must be a permutation of {PAPER_ORDER}, got {order!r}")
        self.order: tuple[Direction, ...] = order
        self.query = PointwiseConv3d(channels, channels)
        self.key = PointwiseConv3d(channels, channels)
        self.value = PointwiseConv3d(channels, channels)
        self.alpha = nn.Parameter(torch.full((3,), float(init)))  # 0: the identity at the start

    def forward(self, m: torch.Tensor) -> torch.Tensor:
        for step, direction in enumerate(self.order):
            # = self.alpha[step] * slice_attention(self.query(m), self.key(m), self.value(m), direction)
            scaled = _projected_slice_attention(m, self.query, self.key, self.value, direction, self.alpha[step])
            m = m + scaled  # (N, C, D, H, W), in m's memory layout
        return m


# ---------------------------------------------------------------------------------------------
# 4. Non-local block (Wang et al. 2018), the NCL baseline
# ---------------------------------------------------------------------------------------------
class NonLocalBlock(nn.Module):
    """Embedded-Gaussian non-local block: every position attends to every position.

    ``theta, phi, g``: 1x1x1 convs ``C -> C/2``; ``f = softmax(theta^T phi)`` is an
    ``N_pos x N_pos`` map with ``N_pos = D*H*W`` (logits in at least float32); ``y = f g``; the output
    projection ``C/2 -> C`` is followed by a GroupNorm whose scale starts at 0, so
    ``z = norm(W y) + x`` is the identity at initialisation.

    Shapes: input and output ``(N, C, D, H, W)``. Memory grows as ``(D*H*W)^2``.
    """

    def __init__(self, channels: int, init: float = 0.0) -> None:
        super().__init__()
        inner = max(channels // 2, 1)
        self.theta = PointwiseConv3d(channels, inner)
        self.phi = PointwiseConv3d(channels, inner)
        self.g = PointwiseConv3d(channels, inner)
        self.out = PointwiseConv3d(inner, channels)
        self.norm = GroupNorm(_groups(channels), channels)
        nn.init.constant_(self.norm.weight, float(init))  # 0: the identity at initialisation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, d, h, w = x.shape
        g = self.g(x).flatten(2).transpose(1, 2)  # (N, P, C/2), P = D*H*W
        with torch.autocast(device_type=x.device.type, enabled=False):
            # theta, phi and their product in at least float32 (see logit_dtype)
            dt = logit_dtype(x.dtype, self.theta.weight.dtype)
            xf = x.to(dt)
            theta = self.theta(xf).flatten(2).transpose(1, 2)  # (N, P, C/2)
            phi = self.phi(xf).flatten(2)  # (N, C/2, P)
            attn = torch.softmax(torch.bmm(theta, phi), dim=-1)  # (N, P, P)
        y = torch.bmm(attn.to(g.dtype), g)  # (N, P, C/2)
        y = y.transpose(1, 2).reshape(n, -1, d, h, w)  # (N, C/2, D, H, W)
        return self.norm(self.out(y)) + x


# ---------------------------------------------------------------------------------------------
# 5. The 3D U-Net backbone
# ---------------------------------------------------------------------------------------------
def _groups(channels: int, preferred: int = 8) -> int:
    """GroupNorm groups: 8 as in the paper's backbone, fewer when ``channels`` is small."""
    return math.gcd(channels, preferred)


class ConvBlock(nn.Sequential):
    """Two ``[3x3x3 conv (no bias) -> GroupNorm(8) -> ReLU]``: ``(N, Cin, ...) -> (N, Cout, ...)``."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Conv3d(in_channels, out_channels, 3, padding=1, bias=False),
            GroupNorm(_groups(out_channels), out_channels),
            nn.ReLU(inplace=True),
            nn.Conv3d(out_channels, out_channels, 3, padding=1, bias=False),
            GroupNorm(_groups(out_channels), out_channels),
            nn.ReLU(inplace=True),
        )


class Up(nn.Module):
    """1x1x1 conv (no bias) halving channels, nearest x2 upsampling, concat the skip, :class:`ConvBlock`.

    ``(N, C_deep, d, h, w)`` and skip ``(N, C, 2d, 2h, 2w)`` -> ``(N, C, 2d, 2h, 2w)``.
    """

    def __init__(self, deep_channels: int, channels: int) -> None:
        super().__init__()
        self.reduce = PointwiseConv3d(deep_channels, channels, bias=False)
        self.block = ConvBlock(2 * channels, channels)

    def forward(self, deep: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        up = F.interpolate(self.reduce(deep), scale_factor=2, mode="nearest")
        return self.block(torch.cat([up, skip], dim=1))


#: The lesion probability the output bias starts at (RetinaNet's prior initialisation, Lin et
#: al. 2017, applied to the lesion class). Measured in docs/models.md, "The output bias".
LESION_PRIOR = 0.01


def _attention(kind: str | None, channels: int, order: Sequence[Direction], init: float = 0.0) -> nn.Module:
    if kind is None:
        return nn.Identity()
    if kind == "rsa":
        return RSABlock(channels, order, init)
    if kind == "ncl":
        return NonLocalBlock(channels, init)
    raise ValueError(f"unknown attention kind {kind!r}; expected 'rsa', 'ncl' or None")


class UNet3D(nn.Module):
    """3D U-Net with optional attention blocks at the paper's three places.

    Args:
        in_channels: input contrasts (3: T1, T2, FLAIR).
        num_classes: output classes (2: background, lesion).
        widths: channels per level, shallow to deep; ``(32, 64, 128, 256, 512)`` is the
            paper's backbone. At least 2 levels.
        attention: ``None``, ``"rsa"`` or ``"ncl"``.
        placement: 3-bit code ``"abc"``: ``a`` after the encoder of the second-bottom level,
            ``b`` at the bottom (bottleneck), ``c`` after the decoder of the second-bottom level.
        dropout: rate of the ``Dropout3d`` after the stem (the only dropout).
        rsa_order: order of the SA steps inside RSA blocks.
        lesion_prior: the lesion probability where every decoder feature is off, i.e. the
            initial output bias (two classes): ``[0, logit(lesion_prior)]``; trainable.
        attention_init: the attention blocks' residual scales at the start (RSA ``alpha``, the
            NCL output norm's weight); 0, the paper's, starts every block as the identity.

    Shapes: ``(N, in_channels, D, H, W) -> (N, num_classes, D, H, W)`` logits. Any ``D, H, W``
    work: inputs are zero-padded up to a multiple of ``2 ** (levels - 1)`` and the logits
    cropped back; crops divisible by 16 (paper backbone) need no padding.
    """

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 2,
        widths: Sequence[int] = (32, 64, 128, 256, 512),
        attention: str | None = None,
        placement: str = "000",
        dropout: float = 0.2,
        rsa_order: Sequence[Direction] = PAPER_ORDER,
        lesion_prior: float = LESION_PRIOR,
        attention_init: float = 0.0,
    ) -> None:
        super().__init__()
        widths = tuple(int(w) for w in widths)
        if len(widths) < 2:
            raise ValueError(f"widths needs at least 2 levels, got {widths}")
        if len(placement) != 3 or set(placement) - {"0", "1"}:
            raise ValueError(f"placement must be a 3-bit code such as '010', got {placement!r}")
        self.widths = widths
        self.divisor = 2 ** (len(widths) - 1)
        enc_bit, bottom_bit, dec_bit = (bit == "1" for bit in placement)

        self.stem = nn.Sequential(
            nn.Conv3d(in_channels, widths[0], 3, padding=1, bias=False), nn.Dropout3d(dropout)
        )
        # Level i's block widens c_{i-1} -> c_i in its first conv; the stride-2 down-convolution
        # before it keeps the channel count (c -> c, no bias), as in the authors' network.
        self.encoders = nn.ModuleList([ConvBlock(widths[0], widths[0])])
        self.downs = nn.ModuleList()
        for shallow, deep in zip(widths[:-1], widths[1:]):
            self.downs.append(nn.Conv3d(shallow, shallow, 3, stride=2, padding=1, bias=False))
            self.encoders.append(ConvBlock(shallow, deep))
        self.ups = nn.ModuleList(
            [Up(deep, shallow) for shallow, deep in zip(widths[:-1], widths[1:])]
        )  # ups[i]: level i+1 -> level i
        # The authors' head: a 3x3x3 conv (no bias) and a 1x1x1 conv to the classes. Here the
        # last conv has a bias that starts at the lesion prior (a deviation, docs/models.md "The
        # output bias"). Without it the logits are a linear, bias-free function of the
        # decoder's ReLU output (features >= 0): a voxel whose features are all off gets logits
        # (0, 0), p = 0.5 exactly, and short trainings learned to mark lesions by "all features
        # off", so no voxel ever exceeded p = 0.5 (an empty mask). With the bias at
        # logit(lesion_prior) "all off" means background (p = 0.01) and a lesion has to be
        # marked by features that are on.
        self.head = nn.Sequential(
            nn.Conv3d(widths[0], widths[0], 3, padding=1, bias=False),
            PointwiseConv3d(widths[0], num_classes, bias=True),
        )
        nn.init.zeros_(self.head[1].bias)
        if num_classes == 2:
            with torch.no_grad():
                self.head[1].bias[1] = math.log(lesion_prior / (1.0 - lesion_prior))

        second = widths[-2]
        self.attn_encoder = _attention(attention if enc_bit else None, second, rsa_order, attention_init)
        self.attn_bottom = _attention(attention if bottom_bit else None, widths[-1], rsa_order, attention_init)
        self.attn_decoder = _attention(attention if dec_bit else None, second, rsa_order, attention_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[2:]
        pad = [(-s) % self.divisor for s in size]  # D, H, W padding to a multiple of divisor
        if any(pad):
            x = F.pad(x, (0, pad[2], 0, pad[1], 0, pad[0]))
        levels = len(self.widths)

        # Encoder: level i has widths[i] channels at 1/2**i of the input size.
        skips = []
        h = self.stem(x)  # (N, w0, D, H, W)
        for i in range(levels):
            if i > 0:
                skips.append(h)
                h = self.downs[i - 1](h)  # (N, w_{i-1}, D/2^i, H/2^i, W/2^i): same channels
            h = self.encoders[i](h)  # (N, w_i, D/2^i, H/2^i, W/2^i): widened here
            if i == levels - 2:
                h = self.attn_encoder(h)  # second-bottom encoder ("1.." bit); also its skip
        h = self.attn_bottom(h)  # bottleneck (".1." bit), (N, w_last, D/2^(L-1), ...)

        # Decoder: back up one level at a time.
        for i in range(levels - 2, -1, -1):
            h = self.ups[i](h, skips[i])  # (N, w_i, D/2^i, H/2^i, W/2^i)
            if i == levels - 2:
                h = self.attn_decoder(h)  # second-bottom decoder ("..1" bit)

        logits = self.head(h)  # (N, num_classes, D+pad, H+pad, W+pad)
        return logits[:, :, : size[0], : size[1], : size[2]]


# ---------------------------------------------------------------------------------------------
# 6. The seven Table 1 variants
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Variant:
    """One row of Table 1: an id for file names, the paper's display name, the block and where."""

    id: str
    display_name: str
    attention: str | None
    placement: str


VARIANTS: dict[str, Variant] = {
    v.id: v
    for v in (
        Variant("unet3d", "3D U-Net", None, "000"),
        Variant("ncl-010", "NCL-010", "ncl", "010"),
        Variant("ncl-101", "NCL-101", "ncl", "101"),
        Variant("ncl-111", "NCL-111", "ncl", "111"),
        Variant("rsa-010", "RSA-010", "rsa", "010"),
        Variant("rsa-101", "RSA-101", "rsa", "101"),
        Variant("rsa-111", "RSA-111", "rsa", "111"),
    )
}

PAPER_WIDTHS: tuple[int, ...] = (32, 64, 128, 256, 512)


def build_model(
    variant: str,
    in_channels: int = 3,
    num_classes: int = 2,
    widths: Sequence[int] = PAPER_WIDTHS,
    dropout: float = 0.2,
    rsa_order: Sequence[Direction] = PAPER_ORDER,
    attention_init: float = 0.0,
) -> UNet3D:
    """Build a Table 1 variant by id (``"unet3d"``, ``"rsa-101"``, ...; see :data:`VARIANTS`).

    The default widths give the paper's backbone: 23.77 M parameters for ``unet3d``, 24.55 M
    for ``rsa-010`` (the paper's "about 24.5 M" counts the RSANet with its block);
    smaller widths or fewer levels, e.g. ``(8, 16, 32, 64)``, give CPU-sized networks.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    v = VARIANTS[variant]
    return UNet3D(
        in_channels=in_channels,
        num_classes=num_classes,
        widths=widths,
        attention=v.attention,
        placement=v.placement,
        dropout=dropout,
        rsa_order=rsa_order,
        attention_init=attention_init,
    )


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ---------------------------------------------------------------------------------------------
# 7. The attention's residual scales, and the attention switched off
# ---------------------------------------------------------------------------------------------
def attention_blocks(model: nn.Module) -> dict[str, nn.Module]:
    """The attention blocks of ``model`` by module name (``"attn_bottom"``, ...): RSA and NCL
    blocks only, in the order they are applied (encoder, bottom, decoder); empty for the U-Net."""
    return {name: m for name, m in model.named_modules() if isinstance(m, (RSABlock, NonLocalBlock, SliceAttention))}


def attention_scales(model: nn.Module) -> list[nn.Parameter]:
    """The parameters that scale each attention block's residual, all zero at initialisation:
    ``alpha`` of RSA/SA blocks (``(3,)`` or ``()``), the output GroupNorm's weight of NCL blocks
    (``(C,)``). These are what a block learns first to leave the identity; training gives them
    their own learning rate (``train.attention_lr``)."""
    out = []
    for block in attention_blocks(model).values():
        out.append(block.norm.weight if isinstance(block, NonLocalBlock) else block.alpha)
    return out


def attention_scale_summary(model: nn.Module) -> dict[str, list[float]]:
    """The learned scale of every attention block, by block name: RSA ``alpha`` (one number per
    SA step), NCL the mean ``|weight|`` of the output norm (one number). Unitless."""
    out = {}
    for name, block in attention_blocks(model).items():
        if isinstance(block, NonLocalBlock):
            out[name] = [float(block.norm.weight.detach().abs().mean())]
        else:
            out[name] = [float(v) for v in block.alpha.detach().reshape(-1)]
    return out


class attention_off:
    """Context manager: every attention block of ``model`` is the identity inside it (RSA ``alpha``
    and the NCL output norm's weight and bias set to 0), restored exactly on exit. The negative
    control of a variant: the same network with what its blocks add taken away."""

    def __init__(self, model: nn.Module) -> None:
        self.params: list[nn.Parameter] = []
        for block in attention_blocks(model).values():
            if isinstance(block, NonLocalBlock):
                self.params += [block.norm.weight, block.norm.bias]
            else:
                self.params.append(block.alpha)
        self.saved: list[torch.Tensor] = []

    def __enter__(self) -> "attention_off":
        with torch.no_grad():
            self.saved = [p.detach().clone() for p in self.params]
            for p in self.params:
                p.zero_()
        return self

    def __exit__(self, *exc: object) -> None:
        with torch.no_grad():
            for p, v in zip(self.params, self.saved):
                p.copy_(v)
