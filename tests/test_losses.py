"""Tests for rsanet.losses: the paper's exponentially weighted cross-entropy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rsanet.losses import ExpWeightedCrossEntropy, class_weights, lesion_fraction

R_PAPER = 5.15e-4


def test_class_weights_paper_value_closed_form():
    r = R_PAPER
    w = class_weights(r)
    assert w.shape == (2,) and w.dtype == torch.float32
    expected_bg = math.exp(1 - r) / (math.exp(r) + math.exp(1 - r))
    expected_les = math.exp(r) / (math.exp(r) + math.exp(1 - r))
    assert w[0].item() == pytest.approx(expected_bg, rel=1e-6)
    assert w[1].item() == pytest.approx(expected_les, rel=1e-6)
    # equivalent logistic form: lesion weight = 1 / (1 + e^(1 - 2r)) ~ 0.2691
    assert w[1].item() == pytest.approx(1 / (1 + math.exp(1 - 2 * r)), rel=1e-6)
    assert w[1].item() == pytest.approx(0.26910, abs=1e-4)
    assert w.sum().item() == pytest.approx(1.0, abs=1e-6)
    # As printed in the paper: for small r the lesion weight is BELOW the background weight.
    assert w[1] < 0.5 < w[0]


def test_class_weights_special_values():
    assert torch.allclose(class_weights(0.5), torch.tensor([0.5, 0.5]))
    e = math.e
    assert torch.allclose(class_weights(0.0), torch.tensor([e / (1 + e), 1 / (1 + e)]))
    assert torch.allclose(class_weights(1.0), torch.tensor([1 / (1 + e), e / (1 + e)]))
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError):
            class_weights(bad)


def test_lesion_fraction_is_mean_of_per_image_fractions():
    a = np.zeros((2, 2, 2), bool)
    a[0, 0, :] = True  # 2 / 8 = 0.25
    b = np.zeros((1, 2, 2), np.uint8)  # 0 / 4 = 0
    assert lesion_fraction([a, b]) == pytest.approx(0.125)  # pooled would be 2/12
    assert lesion_fraction(iter([a])) == pytest.approx(0.25)  # any iterable
    with pytest.raises(ValueError):
        lesion_fraction([])


def _manual_weighted_ce(
    logits: torch.Tensor, target: torch.Tensor, w: torch.Tensor
) -> torch.Tensor:
    """sum_i w[y_i] * (-log p_i[y_i]) / sum_i w[y_i], computed in float64 by hand."""
    x = logits.double()
    logp = x - torch.logsumexp(x, dim=1, keepdim=True)  # (N, 2, D, H, W)
    nll = -logp.gather(1, target.long().unsqueeze(1)).squeeze(1)  # (N, D, H, W)
    wi = w.double()[target.long()]
    return (wi * nll).sum() / wi.sum()


def test_loss_matches_manual_weighted_ce():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 2, 3, 4, 5, generator=g) * 3
    target = (torch.rand(2, 3, 4, 5, generator=g) < 0.3).long()
    r = 0.2
    loss_fn = ExpWeightedCrossEntropy(r)
    loss = loss_fn(logits, target)
    assert loss.shape == () and loss.dtype == torch.float32
    expected = _manual_weighted_ce(logits, target, class_weights(r))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    # the weights matter: differs from the unweighted CE on a mixed-label target
    assert abs(loss.item() - F.cross_entropy(logits, target).item()) > 1e-4
    # sum and none reductions are consistent with the per-voxel weighted NLL
    per_voxel = ExpWeightedCrossEntropy(r, reduction="none")(logits, target)
    assert per_voxel.shape == target.shape
    total = ExpWeightedCrossEntropy(r, reduction="sum")(logits, target)
    assert total.item() == pytest.approx(per_voxel.sum().item(), rel=1e-5)
    w = class_weights(r)[target]
    assert loss.item() == pytest.approx((per_voxel.sum() / w.sum()).item(), rel=1e-5)


def test_single_class_target_weighted_mean_equals_plain_ce():
    # PyTorch's weighted mean divides by sum of target weights, so with one class only the
    # weight cancels: documents the normalisation.
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(1, 2, 2, 3, 3, generator=g)
    target = torch.zeros(1, 2, 3, 3, dtype=torch.long)
    loss = ExpWeightedCrossEntropy(R_PAPER)(logits, target)
    assert loss.item() == pytest.approx(F.cross_entropy(logits, target).item(), rel=1e-6)


def test_half_precision_logits_finite_and_float32():
    g = torch.Generator().manual_seed(2)
    logits32 = torch.randn(2, 2, 4, 4, 4, generator=g) * 20
    logits16 = logits32.half().requires_grad_(True)
    target = (torch.rand(2, 4, 4, 4, generator=g) < 0.1).long()
    loss_fn = ExpWeightedCrossEntropy(R_PAPER)
    loss = loss_fn(logits16, target)
    assert loss.dtype == torch.float32
    assert torch.isfinite(loss)
    ref = _manual_weighted_ce(logits16.detach().float(), target, class_weights(R_PAPER))
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    loss.backward()
    assert logits16.grad is not None and logits16.grad.dtype == torch.float16
    assert torch.isfinite(logits16.grad).all()


def test_module_buffer_and_shape_checks():
    loss_fn = ExpWeightedCrossEntropy(R_PAPER)
    assert "weight" in loss_fn.state_dict()
    assert torch.allclose(loss_fn.weight, class_weights(R_PAPER))
    assert "lesion 0.2691" in repr(loss_fn)
    # module.double() casts the buffer; the loss is still float32
    logits = torch.randn(1, 2, 2, 2, 2, dtype=torch.float64)
    target = torch.ones(1, 2, 2, 2, dtype=torch.long)
    assert loss_fn.double()(logits, target).dtype == torch.float32
    with pytest.raises(ValueError):
        loss_fn(torch.randn(1, 3, 2, 2, 2), target)  # 3 classes
    with pytest.raises(ValueError):
        loss_fn(torch.randn(1, 2, 2, 2, 3), target)  # spatial mismatch
    with pytest.raises(ValueError):
        ExpWeightedCrossEntropy(R_PAPER, reduction="mean_over_batch")


def test_lesion_weight_override_replaces_the_paper_weights():
    import torch

    from rsanet.losses import ExpWeightedCrossEntropy

    loss = ExpWeightedCrossEntropy(5.15e-4, lesion_weight=0.9)
    assert torch.allclose(loss.weight, torch.tensor([0.1, 0.9]))
    paper = ExpWeightedCrossEntropy(5.15e-4)
    assert paper.weight[1] < paper.weight[0]  # as printed: the background weighs more
    logits = torch.zeros(1, 2, 2, 2, 2)
    target = torch.ones(1, 2, 2, 2, dtype=torch.long)
    assert torch.isclose(loss(logits, target), torch.log(torch.tensor(2.0)))
    with pytest.raises(ValueError, match="lesion_weight"):
        ExpWeightedCrossEntropy(0.01, lesion_weight=1.5)


def test_soft_dice_loss_values_and_gradient():
    from rsanet.losses import soft_dice_loss

    target = torch.zeros(2, 4, 4, 4, dtype=torch.long)
    target[0, 1:3, 1:3, 1:3] = 1  # 8 lesion voxels in the first item, none in the second
    perfect = torch.where(target.bool(), 20.0, -20.0)
    logits = torch.stack([-perfect, perfect], dim=1)  # (2, 2, 4, 4, 4): class 1 where lesion
    assert float(soft_dice_loss(logits, target)) == pytest.approx(0.0, abs=1e-6)
    # inverted: lesion predicted on the 120 other voxels, none on the 8: (0 + 1) / (120 + 8 + 1)
    assert float(soft_dice_loss(-logits, target)) == pytest.approx(1 - 1 / 129, abs=1e-6)
    # uniform 0.5 everywhere: 2 * 0.5 * 8 / (0.5 * 128 + 8) with smoothing 1
    half = torch.zeros(2, 2, 4, 4, 4, requires_grad=True)
    loss = soft_dice_loss(half, target)
    assert float(loss.detach()) == pytest.approx(1 - (8 + 1) / (64 + 8 + 1), abs=1e-6)
    loss.backward()
    g = half.grad[:, 1]
    assert (g[target.bool()] < 0).all() and (g[~target.bool()] > 0).all()  # raise lesion, lower the rest
    with pytest.raises(ValueError):
        soft_dice_loss(torch.zeros(2, 3, 4, 4, 4), target)


def test_dice_weight_adds_the_dice_term_to_training():
    """dice_weight=0 is the paper's loss; a positive weight changes the first loss by exactly it."""
    import numpy as np

    from rsanet.training import TrainConfig, train
    from rsanet.volumes import Preprocessed

    rng = np.random.default_rng(0)
    shape = (8, 16, 16)
    les = np.zeros(shape, np.uint8)
    les[3:5, 6:10, 6:10] = 1
    subj = [Preprocessed(rng.normal(0, 1, (3,) + shape).astype(np.float32), les, np.ones(shape, np.uint8),
                         (3.0, 1.0, 1.0), np.array([[0, s] for s in shape]), shape, np.eye(4))]
    base = dict(variant="unet3d", widths=(4, 8), crop=(8, 16, 16), batch_size=1, iterations=1,
                device="cpu", deterministic=True, lesion_weight=0.9)
    plain = train(TrainConfig(**base), subj).log_rows[0]["loss"]
    both = train(TrainConfig(**base, dice_weight=1.0), subj).log_rows[0]["loss"]
    assert 0 < both - plain < 1.0
    with pytest.raises(ValueError, match="dice_weight"):
        TrainConfig(variant="unet3d", dice_weight=-1.0)


def test_printed_and_swapped_class_weights_by_name():
    """config/presets/paper.yaml's choice between the paper's weights as printed and swapped (docs/models.md)."""
    from rsanet.losses import ExpWeightedCrossEntropy, class_weights

    printed, swapped = class_weights(5.15e-4, "printed"), class_weights(5.15e-4, "swapped")
    assert printed[1] == pytest.approx(0.2691, abs=1e-4) and swapped[1] == pytest.approx(0.7309, abs=1e-4)
    assert torch.equal(printed.flip(0), swapped)
    assert torch.equal(ExpWeightedCrossEntropy(5.15e-4, lesion_weight="swapped").weight, swapped)
    assert torch.equal(ExpWeightedCrossEntropy(5.15e-4).weight, printed)  # the paper's text by default
    with pytest.raises(ValueError, match="printed"):
        class_weights(0.01, "inverted")
