"""Tests of the networks: shapes, identity at start, Eq. 1-2 against a slow reference, equivariance."""

from __future__ import annotations

import math

import pytest
import torch

from rsanet.models import (
    PAPER_ORDER,
    PAPER_WIDTHS,
    SLICE_AXIS,
    VARIANTS,
    GroupNorm,
    NonLocalBlock,
    RSABlock,
    SliceAttention,
    build_model,
    count_parameters,
    slice_attention,
)

SMALL = (4, 8, 16)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_variants_are_the_seven_of_table1():
    assert list(VARIANTS) == [
        "unet3d", "ncl-010", "ncl-101", "ncl-111", "rsa-010", "rsa-101", "rsa-111",
    ]
    assert [v.display_name for v in VARIANTS.values()] == [
        "3D U-Net", "NCL-010", "NCL-101", "NCL-111", "RSA-010", "RSA-101", "RSA-111",
    ]


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("size", [(16, 16, 16), (13, 18, 21)])
def test_every_variant_keeps_the_spatial_size(variant, size):
    model = build_model(variant, widths=SMALL).eval()
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        y = model(x)
    assert y.shape == (2, 2, *size)
    assert torch.isfinite(y).all()


def test_fewer_levels_and_other_channel_counts():
    model = build_model("rsa-111", in_channels=1, num_classes=3, widths=(6, 12)).eval()
    assert model(torch.randn(1, 1, 7, 9, 5)).shape == (1, 3, 7, 9, 5)


def test_unknown_variant_names_the_choices():
    with pytest.raises(ValueError, match="rsa-111"):
        build_model("rsa-011")


@pytest.mark.parametrize("variant", ["rsa-111", "ncl-111"])
def test_attention_variants_start_as_the_unet(variant):
    """All blocks are the identity at initialisation, so outputs equal the plain U-Net's."""
    torch.manual_seed(1)
    unet = build_model("unet3d", widths=SMALL).eval()
    other = build_model(variant, widths=SMALL).eval()
    # Copy the backbone weights (the attention modules are extra keys).
    missing = other.load_state_dict(unet.state_dict(), strict=False).missing_keys
    assert missing and all(k.startswith("attn_") for k in missing)
    x = torch.randn(1, 3, 16, 16, 16)
    with torch.no_grad():
        assert torch.allclose(unet(x), other(x), atol=1e-6)


@pytest.mark.parametrize(
    "block", [lambda: RSABlock(6), lambda: SliceAttention(6, "coronal"), lambda: NonLocalBlock(6)]
)
def test_each_block_is_identity_at_initialisation(block):
    x = torch.randn(2, 6, 5, 7, 4)
    assert torch.equal(block()(x), x)


def test_rsa_alpha_shape_init_and_gradient():
    block = RSABlock(4)
    assert block.alpha.shape == (3,)
    assert torch.equal(block.alpha.detach(), torch.zeros(3))
    assert block.order == PAPER_ORDER == ("sagittal", "coronal", "axial")
    x = torch.randn(1, 4, 3, 5, 6)
    block(x).square().sum().backward()
    assert block.alpha.grad is not None and (block.alpha.grad != 0).all()


def test_rsa_projections_are_shared_1x1x1_convs_without_reduction():
    block = RSABlock(8)
    for conv in (block.query, block.key, block.value):
        assert conv.kernel_size == (1, 1, 1)
        assert (conv.in_channels, conv.out_channels) == (8, 8)
        assert conv.bias is not None
    # Only one set of projections + alpha: 3 * (8*8 + 8) + 3 parameters.
    assert count_parameters(block) == 3 * (8 * 8 + 8) + 3


def _slow_rsa(block: RSABlock, m: torch.Tensor) -> torch.Tensor:
    """Eq. 1-2 written out element by element in float64, for one sample at a time."""
    with torch.no_grad():
        return _slow_rsa_no_grad(block, m)


def _slow_rsa_no_grad(block: RSABlock, m: torch.Tensor) -> torch.Tensor:
    out = []
    for sample in m.double():
        x = sample  # (C, D, H, W)
        for step, direction in enumerate(block.order):
            axis = SLICE_AXIS[direction] - 1  # without the batch axis
            def project(conv):
                w = conv.weight.double()[:, :, 0, 0, 0]
                return torch.einsum("oc,cdhw->odhw", w, x) + conv.bias.double()[:, None, None, None]
            q, k, v = project(block.query), project(block.key), project(block.value)
            s = x.shape[axis]
            rows = [q.select(axis, i).reshape(-1) for i in range(s)]  # M2[i, :]
            cols = [k.select(axis, j).reshape(-1) for j in range(s)]  # M1[:, j]
            vals = [v.select(axis, j) for j in range(s)]  # M3[j, :]
            new = torch.empty_like(x)
            for i in range(s):
                logits = torch.tensor([float(rows[i] @ cols[j]) for j in range(s)], dtype=torch.float64)
                a = torch.exp(logits - logits.max())
                a = a / a.sum()  # A[i, :], Eq. 1
                agg = sum(a[j] * vals[j] for j in range(s))
                new.select(axis, i).copy_(block.alpha[step].double() * agg + x.select(axis, i))
            x = new
        out.append(x)
    return torch.stack(out)


@pytest.mark.parametrize("order", [PAPER_ORDER, ("coronal", "sagittal", "axial")])
def test_rsa_block_equals_slow_equations(order):
    """A float64 block equals the float64 element-by-element Eq. 1-2 to rounding (1e-10)."""
    torch.manual_seed(3)
    block = RSABlock(3, order=order).double()
    with torch.no_grad():
        block.alpha.copy_(torch.tensor([0.7, -0.4, 1.3], dtype=torch.float64))
        for conv in (block.query, block.key, block.value):
            conv.weight.mul_(0.3)  # keep the unscaled logits in a range where softmax is not one-hot
    m = torch.randn(2, 3, 4, 5, 3, dtype=torch.float64) * 0.5
    with torch.no_grad():
        fast = block(m)
    assert fast.dtype == torch.float64  # never downcast to float32
    slow = _slow_rsa(block, m)
    assert (fast - slow).abs().max().item() < 1e-10


def test_rsa_block_float32_is_close_to_the_float64_reference():
    torch.manual_seed(4)
    block = RSABlock(3)
    with torch.no_grad():
        block.alpha.copy_(torch.tensor([0.7, -0.4, 1.3]))
    m = torch.randn(1, 3, 4, 5, 3) * 0.5
    with torch.no_grad():
        fast = block(m)
    assert torch.allclose(fast.double(), _slow_rsa(block, m), atol=1e-5)


def test_attention_logits_are_float32_under_bf16_autocast():
    """Under bf16 autocast the query/key projections feeding the logits stay float32.

    The block's output under autocast must match a float32 run far better than a run whose
    query and key were rounded to bf16 before the product (the defect this guards against).
    """
    torch.manual_seed(5)
    block = RSABlock(16)
    with torch.no_grad():
        block.alpha.fill_(1.0)
        block.query.weight.mul_(4.0)  # large logits: the regime where bf16 rounding matters
    m = torch.randn(1, 16, 6, 8, 8)
    with torch.no_grad():
        ref = block(m)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = block(m)
    from rsanet.models import logit_dtype

    assert logit_dtype(torch.bfloat16) == torch.float32
    assert logit_dtype(torch.float64, torch.float32) == torch.float64
    # the value path may be bf16; the attention map itself must agree closely with float32
    assert torch.isfinite(got.float()).all()
    err = (got.float() - ref).abs().max().item()
    assert err < 0.05 * ref.abs().max().item()


@pytest.mark.parametrize("direction", ["axial", "coronal", "sagittal"])
def test_sa_step_is_equivariant_to_slice_permutation(direction):
    """Permuting the slices along the block's own axis permutes its output the same way."""
    block = SliceAttention(4, direction)
    with torch.no_grad():
        block.alpha.fill_(0.9)
    x = torch.randn(2, 4, 5, 6, 7) * 0.3
    axis = SLICE_AXIS[direction]
    perm = torch.randperm(x.shape[axis])
    with torch.no_grad():
        permuted_then = block(x.index_select(axis, perm))
        then_permuted = block(x).index_select(axis, perm)
    assert torch.allclose(permuted_then, then_permuted, atol=1e-5)


def test_slice_attention_rows_are_convex_combinations():
    """With identical slices the attention output is that slice (softmax rows sum to 1)."""
    one = torch.randn(1, 2, 1, 3, 4)
    v = one.expand(1, 2, 6, 3, 4).contiguous()
    q = torch.randn(1, 2, 6, 3, 4)
    out = slice_attention(q, q, v, "axial")
    assert torch.allclose(out, v, atol=1e-6)


def test_slice_attention_softmax_is_float32_under_half_inputs():
    """Large logits in bfloat16 inputs still give a finite, normalised result."""
    q = (torch.randn(1, 8, 6, 8, 8) * 30).bfloat16()
    out = slice_attention(q, q, q, "coronal")
    assert out.dtype == torch.bfloat16
    assert torch.isfinite(out.float()).all()


def test_non_local_block_matches_dense_formula():
    """In float64 (the GroupNorm amplifies float32 rounding, so compare in float64)."""
    torch.manual_seed(6)
    block = NonLocalBlock(4).double()
    with torch.no_grad():
        block.norm.weight.fill_(1.0)
    x = torch.randn(1, 4, 2, 3, 2, dtype=torch.float64)
    with torch.no_grad():
        got = block(x)
        def flat(conv):
            return conv(x).flatten(2)[0]  # (C/2, P)

        f = torch.softmax(flat(block.theta).T @ flat(block.phi), dim=-1)  # (P, P)
        y = (f @ flat(block.g).T).T.reshape(1, 2, 2, 3, 2)
        want = block.norm(block.out(y)) + x
    assert got.dtype == torch.float64
    assert (got - want).abs().max().item() < 1e-10


def test_placement_bits_put_blocks_where_the_paper_says():
    def kinds(variant):
        m = build_model(variant, widths=SMALL)
        return tuple(type(getattr(m, n)).__name__ for n in ("attn_encoder", "attn_bottom", "attn_decoder"))

    assert kinds("unet3d") == ("Identity", "Identity", "Identity")
    assert kinds("rsa-010") == ("Identity", "RSABlock", "Identity")
    assert kinds("rsa-101") == ("RSABlock", "Identity", "RSABlock")
    assert kinds("ncl-111") == ("NonLocalBlock",) * 3
    m = build_model("rsa-111", widths=SMALL)
    assert m.attn_bottom.query.in_channels == SMALL[-1]
    assert m.attn_encoder.query.in_channels == m.attn_decoder.query.in_channels == SMALL[-2]


def test_paper_backbone_parameter_counts():
    """The authors' backbone: 23.77 M for the U-Net, 24.55 M for RSA-010 (method notes)."""
    unet = count_parameters(build_model("unet3d"))
    assert abs(unet / 1e6 - 23.77) <= 0.01
    assert unet == 23_766_368 + 2  # the authors' network plus the output bias (docs/models.md, "The output bias")
    rsa_block = 3 * (512 * 512 + 512) + 3  # ~0.79 M, as the method notes say
    assert count_parameters(build_model("rsa-010")) - unet == rsa_block
    assert abs(count_parameters(build_model("rsa-010")) / 1e6 - 24.55) <= 0.01
    assert count_parameters(build_model("rsa-101")) - unet == 2 * (3 * (256 * 256 + 256) + 3)
    assert math.isclose(rsa_block / 1e6, 0.79, abs_tol=0.01)


def test_backbone_widens_in_the_level_block_not_in_the_down_convolution():
    m = build_model("unet3d")
    for i, down in enumerate(m.downs):
        assert down.in_channels == down.out_channels == PAPER_WIDTHS[i]
        assert down.stride == (2, 2, 2) and down.bias is None
        assert m.encoders[i + 1][0].in_channels == PAPER_WIDTHS[i]
        assert m.encoders[i + 1][0].out_channels == PAPER_WIDTHS[i + 1]
    assert all(up.reduce.bias is None for up in m.ups)
    assert m.head[0].bias is None and m.head[1].bias is not None  # the output bias (docs/models.md)


@pytest.mark.parametrize("widths", [(4, 8), SMALL, (4, 8, 8, 8)])
def test_gradients_reach_every_alpha_in_a_network(widths):
    model = build_model("rsa-111", widths=widths)
    with torch.no_grad():
        for block in (model.attn_encoder, model.attn_bottom, model.attn_decoder):
            block.alpha.fill_(0.1)
    model(torch.randn(1, 3, 16, 16, 16)).mean().backward()
    for block in (model.attn_encoder, model.attn_bottom, model.attn_decoder):
        assert block.alpha.grad is not None and block.alpha.grad.abs().sum() > 0


@pytest.mark.parametrize("layout", [torch.channels_last_3d, torch.contiguous_format])
def test_group_norm_equals_torchs_in_both_modes_and_keeps_layout(layout):
    """The CPU backward path (float32 NCDHW copy) computes the same norm and gradients as nn.GroupNorm."""
    ours, ref = GroupNorm(4, 8).double(), torch.nn.GroupNorm(4, 8).double()
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
        ours.bias.uniform_(-0.5, 0.5)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(2, 8, 3, 5, 4, dtype=torch.float64).contiguous(memory_format=layout).requires_grad_()
    y, y_ref = ours(x), ref(x)
    assert y.dtype == torch.float64 and y.is_contiguous(memory_format=layout)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-12)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, ours.weight, ours.bias], g)
    grads_ref = torch.autograd.grad(y_ref, [x, ref.weight, ref.bias], g)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    with torch.no_grad():  # inference: torch's own kernel
        torch.testing.assert_close(ours(x), y_ref, rtol=0, atol=1e-12)


def test_group_norm_under_bf16_autocast_returns_the_inputs_dtype():
    norm = GroupNorm(8, 8)
    x = torch.randn(2, 8, 4, 6, 6).contiguous(memory_format=torch.channels_last_3d)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = norm(x.to(torch.bfloat16).requires_grad_())
    assert y.dtype == torch.bfloat16 and y.is_contiguous(memory_format=torch.channels_last_3d)
    # statistics in float32: the bf16 output is the float32 norm rounded once
    torch.testing.assert_close(y.float(), torch.nn.functional.group_norm(x.to(torch.bfloat16).float(), 8),
                               rtol=1e-2, atol=1e-2)


def test_the_output_can_exceed_p_half_where_every_feature_is_off():
    """docs/models.md, "The output bias": the head used to be bias-free on ReLU features (>= 0), so a voxel with all
    features off had p = 0.5 exactly and short trainings marked lesions that way (an empty mask
    at p > 0.5). The output conv has a bias now, starting at the lesion prior: "all off" means
    background (p = 0.01), and the head alone, on an all-zero feature map, can learn p > 0.5."""
    from rsanet.models import LESION_PRIOR
    from rsanet.paper import CODE_SETTINGS

    model = build_model("unet3d", widths=(4, 8))
    last = model.head[-1]
    assert last.bias is not None and "0.01" in CODE_SETTINGS["model.output_bias"]
    features = torch.zeros(1, 4, 4, 8, 8)  # the decoder's output, all off
    target = torch.ones(1, 4, 8, 8, dtype=torch.long)
    p0 = torch.softmax(model.head(features), 1)[:, 1]
    assert torch.allclose(p0, torch.full_like(p0, LESION_PRIOR), atol=1e-6)
    opt = torch.optim.SGD(model.head.parameters(), lr=2.0)
    for _ in range(20):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model.head(features), target).backward()
        opt.step()
    p = torch.softmax(model.head(features), 1)[:, 1]
    assert (p > 0.6).all()
