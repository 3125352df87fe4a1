"""The benchmark's counting and measuring functions on tiny shapes (no timing assertions)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from rsanet.benchmarks import counting, report, timing
from rsanet.kernels import PointwiseConv3d
from rsanet.models import PAPER_WIDTHS, RSABlock, slice_attention


@pytest.mark.parametrize("shape", [(2, 3, 4), (1, 4, 4), (3, 5, 2)])
def test_map_entries_are_the_analytic_counts(shape):
    d, h, w = shape
    assert counting.map_entries("ncl", shape) == (d * h * w) ** 2
    assert counting.map_entries("rsa", shape) == d * d + h * h + w * w
    with pytest.raises(ValueError):
        counting.map_entries("other", shape)


@pytest.mark.parametrize("kind", ["ncl", "rsa"])
@pytest.mark.parametrize("channels, shape", [(4, (2, 3, 4)), (6, (3, 2, 5)), (8, (1, 4, 4))])
def test_flop_counter_gives_the_formulas(kind, channels, shape):
    """torch.utils.flop_counter on the real blocks == 4(C/2)P² / 4CP(D+H+W), projections too."""
    counted = counting.block_flops(kind, channels, shape)
    assert counted["maps"] == counting.map_flops(kind, channels, shape)
    assert counted["projections"] == counting.projection_flops(kind, channels, shape)
    assert counted["total"] == counted["maps"] + counted["projections"]


def test_hand_counted_example():
    # NCL, C=4 (inner 2), P=2*3*4=24: theta^T phi and f g are 24x24x2 each -> 2 * 2*24*24*2
    assert counting.map_flops("ncl", 4, (2, 3, 4)) == 2 * (2 * 24 * 24 * 2)
    # RSA, C=4, P=24: per direction S: QK^T is S x S x (4*24/S) -> 2*S*4*24, twice (apply)
    assert counting.map_flops("rsa", 4, (2, 3, 4)) == sum(2 * (2 * s * 4 * 24) for s in (2, 3, 4))


def test_paper_example_is_counted_without_allocating():
    """The paper's 512x512x256 map (67,108,864 squared entries) is counted on fake tensors."""
    c, shape = counting.feature_shape((256, 512, 512), PAPER_WIDTHS, "input resolution")
    assert (c, shape) == (32, (256, 512, 512))
    assert counting.map_entries("ncl", shape) == 67_108_864**2
    counted = counting.block_flops("ncl", c, shape)
    assert counted["maps"] == 4 * 16 * 67_108_864**2


def test_feature_shapes_follow_the_unet_padding():
    assert counting.feature_shape((54, 130, 110), counting.DEMO_WIDTHS, "second-bottom") == (32, (14, 34, 28))
    assert counting.feature_shape((54, 130, 110), counting.DEMO_WIDTHS, "bottom") == (64, (7, 17, 14))
    assert counting.feature_shape((48, 320, 256), PAPER_WIDTHS, "bottom") == (512, (3, 20, 16))
    assert counting.feature_shape((48, 320, 256), PAPER_WIDTHS, "second-bottom") == (256, (6, 40, 32))
    assert counting.feature_shape((16, 64, 64), counting.DEMO_WIDTHS, "input resolution") == (8, (16, 64, 64))


def test_cpu_peak_counts_live_bytes():
    def fn():
        a = torch.empty(250_000)  # 1 MB
        b = torch.empty(500_000)  # 2 MB, both alive
        del a
        c = torch.empty(125_000)  # 0.5 MB after a is freed
        del b, c

    assert timing.cpu_peak_bytes(fn) == 3_000_000


def test_non_local_map_dominates_its_measured_peak():
    peak_mib, _, source = timing.measure_block("ncl", 4, (4, 8, 8), rounds=0)
    map_mib = 4 * counting.map_entries("ncl", (4, 8, 8)) / counting.MIB
    assert source == "cpu profiler allocations"
    assert map_mib <= peak_mib < 6 * map_mib


def test_rsa_network_materialises_only_slice_maps():
    widths, crop = (2, 4, 8), (4, 8, 12)
    shapes = timing.rsa_softmax_shapes("rsa-111", widths, crop, 1)
    assert len(shapes) == 9  # three blocks, three directions each
    sizes = set()
    for place in ("bottom", "second-bottom"):
        sizes |= set(counting.feature_shape(crop, widths, place)[1])
    assert all(s[-1] == s[-2] and s[-1] in sizes for s in shapes)


def test_network_flops_forward_and_training():
    fwd = counting.network_flops("unet3d", (2, 4), (4, 8, 8), 1, train=False)
    train = counting.network_flops("unet3d", (2, 4), (4, 8, 8), 1, train=True)
    assert fwd > 0 and 2 * fwd < train <= 3 * fwd


def test_paired_ratio_and_interleaving():
    calls = []
    times = timing.interleaved_times({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, rounds=3, warmup=1)
    assert calls == ["a", "b"] * 4 and all(len(v) == 3 for v in times.values())
    assert timing.paired_ratio({"x": [2.0, 4.0, 9.0], "u": [1.0, 2.0, 3.0]}, "x", "u") == 2.0


def test_ncl_prediction_memory_need():
    # demo network, paper-sized volume: NCL-101's second-bottom map has (12*80*64)^2 entries
    need = timing.ncl_prediction_bytes("ncl-101", counting.DEMO_WIDTHS, (48, 320, 256))
    assert need == 2 * 4 * (12 * 80 * 64) ** 2
    assert timing.ncl_prediction_bytes("rsa-111", counting.DEMO_WIDTHS, (48, 320, 256)) == 0


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last_3d])
def test_pointwise_conv_is_the_1x1x1_convolution(layout):
    torch.manual_seed(0)
    conv = PointwiseConv3d(5, 3)
    x = torch.randn(2, 5, 3, 4, 6).contiguous(memory_format=layout).requires_grad_()
    y = conv(x)
    ref = F.conv3d(x, conv.weight, conv.bias)
    torch.testing.assert_close(y, ref)
    g = torch.randn_like(ref)
    grads = torch.autograd.grad(y, [x, conv.weight, conv.bias], g)
    ref_grads = torch.autograd.grad(ref, [x, conv.weight, conv.bias], g)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)
    assert y.is_contiguous(memory_format=layout)


def test_rsa_fast_path_equals_slice_attention_in_both_layouts():
    torch.manual_seed(1)
    block = RSABlock(3)
    with torch.no_grad():
        block.alpha.copy_(torch.tensor([0.3, -0.2, 0.5]))
    x = torch.randn(2, 3, 4, 5, 6) * 0.3
    m = x
    for step, d in enumerate(block.order):  # the reference: Eq. 1-2 as written
        m = block.alpha[step] * slice_attention(block.query(m), block.key(m), block.value(m), d) + m
    for layout in (torch.contiguous_format, torch.channels_last_3d):
        torch.testing.assert_close(block(x.contiguous(memory_format=layout)), m, rtol=1e-5, atol=1e-5)


def test_writers(tmp_path):
    rows = []
    for placement in ("bottom", "second-bottom"):
        c, shape = counting.feature_shape((8, 16, 16), (2, 4, 8), placement)
        fl = {k: counting.block_flops(k, c, shape) for k in ("ncl", "rsa")}
        rows.append(timing.AttentionRow(
            network="tiny", input="8x16x16", placement=placement, channels=c, feature="x".join(map(str, shape)),
            positions=math.prod(shape), ncl_entries=counting.map_entries("ncl", shape), rsa_entries=counting.map_entries("rsa", shape),
            ncl_map_mib=1.0, rsa_map_mib=0.1, ncl_map_gflop=fl["ncl"]["maps"] / 1e9, rsa_map_gflop=fl["rsa"]["maps"] / 1e9,
            ncl_block_gflop=fl["ncl"]["total"] / 1e9, rsa_block_gflop=fl["rsa"]["total"] / 1e9, formula_matches=True,
            ncl_peak_mib=2.0 if placement == "bottom" else None, rsa_peak_mib=1.0 if placement == "bottom" else None,
        ))
    lines = report.verdict(rows)
    assert len(lines) == 2 and "28x" in lines[0] and "100x" in lines[0]
    table = report.markdown_table([r.as_dict() for r in rows], report.ATTENTION_COLUMNS)
    assert table.count("\n") == 3 and "| tiny |" in table
    report.write_csv([r.as_dict() for r in rows], tmp_path / "a.csv")
    assert (tmp_path / "a.csv").read_text().startswith("network,input,placement")
    report.write_figure(rows, tmp_path / "fig.png")
    assert (tmp_path / "fig.png").stat().st_size > 10_000 and (tmp_path / "fig.pdf").exists()
