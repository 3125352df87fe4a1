"""Tests for rsanet.metrics: hand-counted cases, empty-mask rules, independent formulas."""

from __future__ import annotations

import math
from collections import deque
from fractions import Fraction

import numpy as np
import pytest

from rsanet.metrics import (
    confusion,
    detection_by_size,
    dice,
    dice_from_counts,
    evaluate_case,
    iou,
    iou_from_counts,
    lesion_detection,
    lesion_volume_ml,
    remove_small_components,
    sample_average,
    size_bin_labels,
    surface_distances_mm,
    voxel_average,
    volume_errors,
)

ANISO = (3.0, 0.7, 0.7)  # (D, H, W) spacing in mm of the paper's data: 0.7 x 0.7 x 3.0 mm


# ----------------------------------------------------------------------------- helpers


def _coords(mask: np.ndarray) -> set[tuple[int, ...]]:
    return {tuple(int(i) for i in c) for c in np.argwhere(mask)}


def _components_bfs(mask: np.ndarray, full: bool) -> list[set[tuple[int, int, int]]]:
    """Independent connected components of a 3D mask by breadth-first search.

    full=True: 26-neighbourhood; False: 6-neighbourhood.
    """
    if full:
        offsets = [
            (a, b, c)
            for a in (-1, 0, 1)
            for b in (-1, 0, 1)
            for c in (-1, 0, 1)
            if (a, b, c) != (0, 0, 0)
        ]
    else:
        offsets = [(1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1)]
    todo = _coords(mask)
    comps = []
    while todo:
        seed = todo.pop()
        comp = {seed}
        queue = deque([seed])
        while queue:
            z, y, x = queue.popleft()
            for a, b, c in offsets:
                nb = (z + a, y + b, x + c)
                if nb in todo:
                    todo.remove(nb)
                    comp.add(nb)
                    queue.append(nb)
        comps.append(comp)
    return comps


# ----------------------------------------------------------------------------- confusion, Dice, IoU


def test_hand_counted_1d():
    pred = np.array([1, 1, 0, 0, 1])
    truth = np.array([1, 0, 1, 0, 1])
    # index 0, 4: TP; index 1: FP; index 2: FN; index 3: TN
    assert confusion(pred, truth) == (2, 1, 1)
    assert dice(pred, truth) == pytest.approx(4 / 6)
    assert iou(pred, truth) == pytest.approx(2 / 4)


def test_hand_counted_3d_bool():
    truth = np.zeros((2, 3, 3), dtype=bool)
    pred = np.zeros((2, 3, 3), dtype=bool)
    truth[0, 0, 0:3] = True  # 3 voxels
    truth[1, 1, 1] = True  # 1 voxel -> |T| = 4
    pred[0, 0, 1:3] = True  # 2 TP
    pred[1, 2, 2] = True  # 1 FP
    pred[0, 2, 0] = True  # 1 FP  -> |P| = 4
    tp, fp, fn = confusion(pred, truth)
    assert (tp, fp, fn) == (2, 2, 2)
    assert isinstance(tp, int) and isinstance(fp, int) and isinstance(fn, int)
    assert dice(pred, truth) == pytest.approx(2 * 2 / (4 + 4))
    assert iou(pred, truth) == pytest.approx(2 / 6)


def test_counts_formulas():
    assert dice_from_counts(3, 1, 2) == pytest.approx(6 / 9)
    assert iou_from_counts(3, 1, 2) == pytest.approx(3 / 6)
    with pytest.raises(ValueError):
        dice_from_counts(-1, 0, 0)


def test_empty_mask_rules():
    z = np.zeros((3, 4, 5), dtype=np.uint8)
    one = z.copy()
    one[1, 2, 3] = 1
    # both empty -> perfect agreement
    assert dice(z, z) == 1.0 and iou(z, z) == 1.0
    assert dice_from_counts(0, 0, 0) == 1.0 and iou_from_counts(0, 0, 0) == 1.0
    # exactly one empty -> 0
    assert dice(one, z) == 0.0 and iou(one, z) == 0.0  # prediction only
    assert dice(z, one) == 0.0 and iou(z, one) == 0.0  # truth only
    assert dice_from_counts(0, 5, 0) == 0.0 and iou_from_counts(0, 0, 7) == 0.0


@pytest.mark.parametrize("seed", range(5))
def test_random_masks_against_set_formula(seed):
    rng = np.random.default_rng(seed)
    shape = (4, 6, 7)
    pred = rng.random(shape) < rng.uniform(0.05, 0.6)
    truth = rng.random(shape) < rng.uniform(0.05, 0.6)
    a, b = _coords(pred), _coords(truth)
    expected_dice = 2 * len(a & b) / (len(a) + len(b))
    expected_iou = len(a & b) / len(a | b)
    assert confusion(pred, truth) == (len(a & b), len(a - b), len(b - a))
    d, j = dice(pred, truth), iou(pred, truth)
    assert d == pytest.approx(expected_dice, rel=1e-12)
    assert j == pytest.approx(expected_iou, rel=1e-12)
    assert d == pytest.approx(2 * j / (1 + j), rel=1e-12)  # Dice-Jaccard identity
    # 0/1 float input gives the same answer as bool input
    assert dice(pred.astype(np.float32), truth.astype(np.int64)) == pytest.approx(d)


def test_input_checks():
    with pytest.raises(ValueError, match="shape"):
        dice(np.zeros((2, 2)), np.zeros((2, 3)))
    with pytest.raises(ValueError, match="0 or 1"):
        dice(np.full((2, 2), 0.7), np.zeros((2, 2)))  # probability map, not thresholded
    with pytest.raises(ValueError, match="0 or 1"):
        confusion(np.array([0, 2]), np.array([0, 1]))  # multi-label map


# ----------------------------------------------------------------------------- averages


def test_voxel_average_differs_from_sample_average():
    # Image 1: one true voxel, prediction of 2 voxels (1 TP, 1 FP) -> Dice 2/3, IoU 1/2.
    t1 = np.zeros((2, 2, 2), bool)
    p1 = np.zeros((2, 2, 2), bool)
    t1[0, 0, 0] = True
    p1[0, 0, 0] = p1[0, 0, 1] = True
    # Image 2: 10 true voxels, perfectly predicted -> Dice 1, IoU 1.
    t2 = np.zeros((2, 5, 5), bool)
    t2[0, 0, :] = True
    t2[1, 0, :] = True
    p2 = t2.copy()
    c1, c2 = confusion(p1, t1), confusion(p2, t2)
    assert c1 == (1, 1, 0) and c2 == (10, 0, 0)

    s_dice = sample_average([dice(p1, t1), dice(p2, t2)])
    s_iou = sample_average([iou(p1, t1), iou(p2, t2)])
    v = voxel_average([c1, c2])
    assert s_dice == pytest.approx(float((Fraction(2, 3) + 1) / 2))  # 5/6
    assert s_iou == pytest.approx(0.75)
    # pooled: TP 11, FP 1, FN 0
    assert v["dice"] == pytest.approx(22 / 23)
    assert v["iou"] == pytest.approx(11 / 12)
    assert v["dice"] != pytest.approx(s_dice)
    assert set(v) == {"dice", "iou"}


def test_average_edge_cases():
    with pytest.raises(ValueError):
        sample_average([])
    with pytest.raises(ValueError):
        voxel_average([])
    assert voxel_average([(0, 0, 0), (0, 0, 0)]) == {"dice": 1.0, "iou": 1.0}
    assert math.isnan(sample_average([0.5, float("nan")]))
    assert sample_average(iter([0.2, 0.4])) == pytest.approx(0.3)


# ----------------------------------------------------------------------------- lesion-wise


def _constructed_case() -> tuple[np.ndarray, np.ndarray]:
    """Two true lesions (A detected, B missed) and two predicted components (one FP)."""
    truth = np.zeros((5, 10, 10), bool)
    pred = np.zeros((5, 10, 10), bool)
    truth[1:3, 1:3, 1:3] = True  # lesion A, 8 voxels
    truth[1:3, 6:8, 6:8] = True  # lesion B, 8 voxels, not predicted
    pred[2:4, 2:4, 2:4] = True  # overlaps A in one voxel (2, 2, 2); 8 voxels
    pred[0, 7:9, 0:2] = True  # false-positive component, 4 voxels, far from both
    return pred, truth


ISO = (1.0, 1.0, 1.0)


def test_lesion_detection_constructed_any_overlap():
    pred, truth = _constructed_case()
    det = lesion_detection(pred, truth, ISO, rule="any-overlap", connectivity=26, min_lesion_mm3=0)
    assert (det.n_true, det.n_pred, det.n_detected, det.n_false_positive) == (2, 2, 1, 1)
    assert (det.ltpr, det.lfpr, det.f1) == (0.5, 0.5, 0.5)
    with pytest.raises(Exception):  # frozen dataclass
        det.ltpr = 1.0  # type: ignore[misc]


def test_msseg_one_lesion_split_in_two_predictions_counts_once():
    truth = np.zeros((4, 4, 10), bool)
    truth[1:3, 1:3, 1:7] = True  # one 24-voxel bar
    pred = np.zeros_like(truth)
    pred[1:3, 1:3, 1:3] = pred[1:3, 1:3, 5:7] = True  # its two ends, 8 voxels each
    for rule in ("msseg", "any-overlap"):
        det = lesion_detection(pred, truth, ISO, rule=rule)
        assert (det.n_true, det.n_pred, det.n_detected, det.n_pred_true_positive) == (1, 2, 1, 2), rule
        assert (det.ltpr, det.lfpr, det.f1) == (1.0, 0.0, 1.0)


def test_msseg_two_lesions_merged_into_one_prediction():
    truth = np.zeros((4, 4, 10), bool)
    truth[1:3, 1:3, 1:3] = truth[1:3, 1:3, 5:7] = True  # two cubes, a 2-voxel gap
    pred = np.zeros_like(truth)
    pred[1:3, 1:3, 1:7] = True  # one bar over both and the gap: a third of it outside
    det = lesion_detection(pred, truth, ISO)
    assert (det.n_true, det.n_pred, det.n_detected, det.n_pred_true_positive) == (2, 1, 2, 1)
    # a prediction lying mostly outside the lesions (beta): detects nothing under MSSEG rules
    blob = np.zeros((6, 8, 8), bool)
    blob[1:3, 1:3, 1:3] = True  # 8 voxels
    huge = np.zeros_like(blob)
    huge[0:4, 0:6, 0:6] = True  # 144 voxels, 136 outside (94 % > beta = 70 %)
    msseg = lesion_detection(huge, blob, ISO)
    assert (msseg.n_detected, msseg.n_pred_true_positive, msseg.ltpr, msseg.lfpr) == (0, 0, 0.0, 1.0)
    isbi = lesion_detection(huge, blob, ISO, rule="any-overlap")
    assert (isbi.n_detected, isbi.n_pred_true_positive, isbi.ltpr, isbi.lfpr) == (1, 1, 1.0, 0.0)


def test_msseg_size_limit_is_in_mm3_and_strict():
    truth = np.zeros((5, 10, 10), bool)
    truth[0, 0, 0:3] = True  # 3 mm^3 at 1 mm: removed (lesions must exceed 3 mm^3)
    truth[2, 0, 0:4] = True  # 4 mm^3: kept
    det = lesion_detection(truth, truth, ISO)
    assert det.n_true == 1 and det.true_volumes_mm3 == (4.0,)
    assert lesion_detection(truth, truth, ISO, min_lesion_mm3=0).n_true == 2
    # anisotropic 3 x 0.7 x 0.7 mm (1.47 mm^3 per voxel): 2 voxels = 2.94 mm^3 removed, 3 kept
    aniso = np.zeros((5, 10, 10), bool)
    aniso[0, 0, 0:2] = True
    aniso[2, 0, 0:3] = True
    got = lesion_detection(aniso, aniso, ANISO)
    assert got.n_true == 1 and got.true_volumes_mm3 == pytest.approx((3 * 1.47,))
    # a prediction speck below the limit cannot detect a lesion either
    speck = np.zeros_like(truth)
    speck[2, 0, 0:3] = True  # 3 voxels inside the 4-voxel lesion
    assert lesion_detection(speck, truth, ISO).n_detected == 0


def test_msseg_alpha_minimum_overlap_and_the_symmetric_precision():
    truth = np.zeros((4, 7, 7), bool)
    truth[1:3, 1:6, 1:6] = True  # 50 voxels
    at_alpha = np.zeros_like(truth)
    at_alpha[1, 1, 1:6] = True  # 5 voxels = 10 %: not more than alpha
    above = at_alpha.copy()
    above[2, 1, 1] = True  # 6 voxels = 12 %
    assert lesion_detection(at_alpha, truth, ISO).n_detected == 0
    det = lesion_detection(above, truth, ISO)
    assert det.n_detected == 1 and det.ltpr == 1.0
    # the same test with the masks swapped: 88 % of the true lesion lies outside the small
    # prediction (> beta), so that prediction is not a true positive of the lesion-wise precision
    assert det.n_pred_true_positive == 0 and det.lfpr == 1.0 and det.f1 == 0.0
    assert lesion_detection(at_alpha, truth, ISO, rule="any-overlap").ltpr == 1.0


def test_lesion_detection_empty_rules():
    z = np.zeros((3, 3, 3), bool)
    one = z.copy()
    one[1, 1, 1] = True
    kw = dict(voxel_size_mm=ISO, min_lesion_mm3=0)
    for rule in ("msseg", "any-overlap"):
        d = lesion_detection(z, z, rule=rule, **kw)  # nothing anywhere -> perfect
        assert (d.n_true, d.n_pred, d.ltpr, d.lfpr, d.f1) == (0, 0, 1.0, 0.0, 1.0)
        d = lesion_detection(one, z, rule=rule, **kw)  # only predictions -> all false positives
        assert (d.n_true, d.n_pred, d.n_false_positive, d.ltpr, d.lfpr, d.f1) == (0, 1, 1, 1.0, 1.0, 0.0)
        d = lesion_detection(z, one, rule=rule, **kw)  # only truth -> nothing detected
        assert (d.n_true, d.n_pred, d.n_detected, d.ltpr, d.lfpr, d.f1) == (1, 0, 0, 0.0, 0.0, 0.0)


def test_connectivity_diagonal_components():
    corner = np.zeros((2, 2, 2), bool)
    corner[0, 0, 0] = corner[1, 1, 1] = True  # touch only at a corner
    edge = np.zeros((2, 2, 2), bool)
    edge[0, 0, 0] = edge[0, 1, 1] = True  # touch along an edge
    only_first = np.zeros((2, 2, 2), bool)
    only_first[0, 0, 0] = True
    kw = dict(voxel_size_mm=ISO, min_lesion_mm3=0, rule="any-overlap")
    assert lesion_detection(corner, corner, connectivity=26, **kw).n_true == 1
    assert lesion_detection(corner, corner, connectivity=18, **kw).n_true == 2
    assert lesion_detection(corner, corner, connectivity=6, **kw).n_true == 2
    assert lesion_detection(edge, edge, connectivity=18, **kw).n_true == 1
    assert lesion_detection(edge, edge, connectivity=6, **kw).n_true == 2
    assert lesion_detection(corner, corner, **kw).n_true == 2  # default 6 (ITK's, Anima's)
    # predicting one voxel detects the whole diagonal lesion under 26, half of it under 6
    assert lesion_detection(only_first, corner, connectivity=26, **kw).ltpr == 1.0
    assert lesion_detection(only_first, corner, connectivity=6, **kw).ltpr == 0.5
    with pytest.raises(ValueError):
        lesion_detection(corner, corner, connectivity=8, **kw)


def test_detection_by_size_bins():
    truth = np.zeros((6, 20, 20), bool)
    truth[0, 0, 0:5] = True  # 5 mm^3 -> 3-10
    truth[2, 0:4, 0:5] = True  # 20 mm^3 -> 10-50
    truth[4, 5:15, 5:15] = True  # 100 mm^3 -> 100-500
    pred = np.zeros_like(truth)
    pred[2, 0:4, 0:5] = True
    det = lesion_detection(pred, truth, ISO)
    by = detection_by_size(det)
    assert by == {"3-10": (1, 0), "10-50": (1, 1), "50-100": (0, 0), "100-500": (1, 0), ">500": (0, 0)}
    assert size_bin_labels((3, 10)) == ["3-10", ">10"]


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("connectivity", [6, 26])
def test_any_overlap_rule_random_against_bfs(seed, connectivity):
    rng = np.random.default_rng(100 + seed)
    shape = (4, 6, 6)
    pred = rng.random(shape) < 0.12
    truth = rng.random(shape) < 0.12
    t_comps = _components_bfs(truth, full=connectivity == 26)
    p_comps = _components_bfs(pred, full=connectivity == 26)
    p_set, t_set = _coords(pred), _coords(truth)
    n_det = sum(1 for c in t_comps if c & p_set)
    n_fp = sum(1 for c in p_comps if not c & t_set)
    det = lesion_detection(pred, truth, ISO, rule="any-overlap", connectivity=connectivity, min_lesion_mm3=0)
    assert (det.n_true, det.n_pred) == (len(t_comps), len(p_comps))
    assert (det.n_detected, det.n_false_positive) == (n_det, n_fp)
    assert det.ltpr == pytest.approx(n_det / len(t_comps))
    assert det.lfpr == pytest.approx(n_fp / len(p_comps))
    prec, rec = 1 - n_fp / len(p_comps), n_det / len(t_comps)
    assert det.f1 == pytest.approx(2 * prec * rec / (prec + rec) if prec + rec else 0.0)


def test_remove_small_components():
    truth = np.zeros((4, 8, 8), bool)
    truth[0:2, 0:2, 0:2] = True
    truth[3, 7, 7] = True
    kept = remove_small_components(truth, 2, 26)
    assert kept.sum() == 8 and not kept[3, 7, 7]


def test_surface_distances_by_hand_and_empty_rules():
    a = np.zeros((1, 1, 10), bool)
    b = np.zeros_like(a)
    a[0, 0, 2] = True
    b[0, 0, 5] = True
    hd, assd = surface_distances_mm(a, b, (1.0, 1.0, 2.0))  # 3 voxels apart along W at 2 mm
    assert hd == pytest.approx(6.0) and assd == pytest.approx(6.0)
    z = np.zeros_like(a)
    assert surface_distances_mm(z, z, ISO) == (0.0, 0.0)
    assert all(math.isnan(v) for v in surface_distances_mm(a, z, ISO))


# ----------------------------------------------------------------------------- volumes


def test_volume_anisotropic_voxels():
    m = np.zeros((4, 5, 5), bool)
    m[1, 0, :] = True
    m[2, 0, :] = True  # 10 voxels
    # 0.7 * 0.7 * 3.0 = 1.47 mm^3 per voxel -> 14.7 mm^3 -> 0.0147 ml
    assert lesion_volume_ml(m, ANISO) == pytest.approx(0.0147, rel=1e-12)
    assert lesion_volume_ml(m, (0.7, 0.7, 3.0)) == pytest.approx(0.0147, rel=1e-12)
    assert lesion_volume_ml(np.zeros((2, 2, 2)), ANISO) == 0.0
    with pytest.raises(ValueError):
        lesion_volume_ml(m, (1.0, 1.0))  # wrong number of spacings
    with pytest.raises(ValueError):
        lesion_volume_ml(m, (1.0, 0.0, 1.0))


def test_volume_errors():
    truth = np.zeros((3, 5, 5), bool)
    truth[0, 0:2, :] = True  # 10 voxels = 0.0147 ml
    over = truth.copy()
    over[1, 0, :] = True  # 15 voxels = 0.02205 ml
    under = np.zeros_like(truth)
    under[0, 0, :] = True  # 5 voxels
    abs_e, rel_e = volume_errors(over, truth, ANISO)
    assert abs_e == pytest.approx(5 * 1.47 / 1000)
    assert rel_e == pytest.approx(0.5)
    abs_e, rel_e = volume_errors(under, truth, ANISO)
    assert abs_e == pytest.approx(5 * 1.47 / 1000)
    assert rel_e == pytest.approx(-0.5)  # signed: under-segmentation is negative
    abs_e, rel_e = volume_errors(over, np.zeros_like(truth), ANISO)
    assert abs_e == pytest.approx(15 * 1.47 / 1000)
    assert math.isnan(rel_e)  # true volume 0


# ----------------------------------------------------------------------------- evaluate_case


def test_evaluate_case_row():
    pred, truth = _constructed_case()
    row = evaluate_case(pred, truth, ANISO)
    assert {"tp", "fp", "fn", "dice", "iou", "hd95_mm", "assd_mm", "ltpr", "lfpr", "lesion_f1", "n_true_lesions",
            "n_pred_lesions", "n_detected_lesions", "volume_true_ml", "volume_pred_ml", "abs_volume_error_ml",
            "rel_volume_error", "abs_rel_volume_error", "n_true_lesions[3-10]", "n_detected_lesions[>500]"} <= set(row)
    # truth 16 voxels, pred 12 voxels, overlap 1 voxel
    assert (row["tp"], row["fp"], row["fn"]) == (1, 11, 15)
    assert row["dice"] == pytest.approx(2 / 28)
    assert row["iou"] == pytest.approx(1 / 27)
    # MSSEG rules, 6-connectivity, > 3 mm^3 (1.47 mm^3 voxels: components of >= 3 voxels):
    # lesion A (8 voxels) is touched in 1 voxel (12.5 % > alpha) by a prediction lying 7/8
    # outside it (> beta): not detected; lesion B not predicted; both predictions false.
    assert (row["n_true_lesions"], row["n_pred_lesions"], row["n_detected_lesions"]) == (2, 2, 0)
    assert (row["ltpr"], row["lfpr"], row["lesion_f1"]) == (0.0, 1.0, 0.0)
    assert row["volume_true_ml"] == pytest.approx(16 * 1.47 / 1000)
    assert row["volume_pred_ml"] == pytest.approx(12 * 1.47 / 1000)
    assert row["abs_volume_error_ml"] == pytest.approx(4 * 1.47 / 1000)
    assert row["rel_volume_error"] == pytest.approx(-0.25) and row["abs_rel_volume_error"] == pytest.approx(0.25)
    assert row["n_true_lesions[10-50]"] == 2  # 8 voxels x 1.47 = 11.8 mm^3 each


def test_evaluate_case_both_empty():
    z = np.zeros((2, 3, 4), np.uint8)
    row = evaluate_case(z, z, ANISO)
    assert row["dice"] == 1.0 and row["iou"] == 1.0 and row["lesion_f1"] == 1.0
    assert row["abs_volume_error_ml"] == 0.0 and math.isnan(row["rel_volume_error"])


def test_lesion_table_gives_each_lesion_its_probability_and_the_models_agreement():
    """Per lesion: the ensemble's mean and max probability, and the fraction of models whose own
    mask (p > threshold) touches it; by decreasing volume, centroids in world mm."""
    from rsanet.segment import lesion_table

    mask = np.zeros((10, 10, 10), bool)
    mask[1:4, 1:4, 1:4] = True   # 27 voxels: lesion 1
    mask[7:9, 7:9, 7] = True     # 4 voxels: lesion 2
    models = np.zeros((4, 10, 10, 10), np.float32)
    models[:, 1:4, 1:4, 1:4] = 0.9          # all four models see the large lesion
    models[0, 7, 7, 7] = 0.8                # one model sees one voxel of the small one
    models[1, 8, 8, 7] = 0.4                # below the threshold: not a detection
    prob = models.mean(axis=0)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    table = lesion_table(mask, prob, affine, connectivity=6, model_probs=models, threshold=0.5)
    assert list(table.lesion) == [1, 2] and np.allclose(table.volume_mm3, [27 * 8.0, 4 * 8.0])
    assert list(table.agreement) == [1.0, 0.25]
    assert np.isclose(table.max_probability[0], 0.9) and np.isclose(table.mean_probability[0], 0.9)
    assert np.isclose(table.max_probability[1], 0.2) and np.isclose(table.mean_probability[1], (0.2 + 0.1) / 4)
    assert np.allclose(table.loc[0, ["centroid_x_mm", "centroid_y_mm", "centroid_z_mm"]].astype(float), [4.0, 4.0, 4.0])
    assert "agreement" not in lesion_table(mask, prob, affine).columns
    truth = np.zeros_like(mask)
    truth[2, 2, 2] = True  # inside lesion 1 only
    assert list(lesion_table(mask, prob, affine, truth=truth).true_positive) == [True, False]


def test_ensemble_lesions_and_precision_by_agreement():
    """The ensemble (mean probability > threshold, small lesions removed) and its lesions' agreement
    and truth, then precision per agreement bin: counted by hand."""
    from rsanet.segment import ensemble_lesions, precision_by_agreement

    models = np.zeros((5, 12, 12, 12), np.float32)
    models[:, 1:4, 1:4, 1:4] = 0.9        # lesion A: all 5 models, true
    models[:3, 7:10, 1:4, 1:4] = 0.95     # lesion B: 3 of 5 (mean 0.57), false
    models[:, 7:10, 7:10, 7:10] = 0.6     # lesion C: all 5, false
    models[:, 1, 10, 10] = 0.99           # one voxel (1 mm^3): removed as smaller than 3 mm^3
    truth = np.zeros((12, 12, 12), bool)
    truth[2, 2, 2] = True
    truth[1, 10, 10] = True
    mask, prob, table = ensemble_lesions(models, np.eye(4), connectivity=6, threshold=0.5, min_lesion_mm3=3.0,
                                         truth=truth)
    assert not mask[1, 10, 10] and mask.sum() == 3 * 27 and prob.dtype == np.float32
    assert sorted(zip(table.agreement, table.true_positive)) == [(0.6, False), (1.0, False), (1.0, True)]
    bins = precision_by_agreement(table).set_index("agreement")
    assert bins.loc["< 0.4", "lesions"] == 0 and np.isnan(bins.loc["< 0.4", "precision_pct"])
    assert bins.loc["0.4 to < 0.8", "lesions"] == 1 and bins.loc["0.4 to < 0.8", "true_positives"] == 0
    assert bins.loc[">= 0.8", "lesions"] == 2 and bins.loc[">= 0.8", "precision_pct"] == 50.0


def test_probability_maps_stored_as_uint8_come_back_within_half_a_step(tmp_path):
    from rsanet.volumes import load_probability_u8, save_probability_u8

    prob = np.random.default_rng(0).random((7, 9, 11)).astype(np.float32)
    prob[0, 0, :3] = (0.0, 1.0, 0.5)
    save_probability_u8(prob, tmp_path / "p.npz")
    back = load_probability_u8(tmp_path / "p.npz")
    assert back.shape == prob.shape and back.dtype == np.float32
    assert np.abs(back - prob).max() <= 1 / 510 + 1e-7
    assert back[0, 0, 0] == 0.0 and back[0, 0, 1] == 1.0


def test_lesion_labels_number_the_rows_of_the_lesion_table():
    """lesion_labels' value k is lesions.csv's row k: same volume and centroid (RAS mm), largest first."""
    from rsanet.segment import lesion_labels, lesion_table

    mask = np.zeros((12, 10, 8), bool)
    mask[1:3, 1:3, 1:3] = True  # 8 voxels
    mask[6:10, 5:9, 2:5] = True  # 48 voxels: lesion 1
    mask[0, 9, 7] = True  # 1 voxel
    mask[9, 0, 0:2] = True  # 2 voxels
    affine = np.array([[-0.7, 0, 0, 90], [0, 0.8, 0, -120], [0, 0, 3.0, -60], [0, 0, 0, 1]])
    labels = lesion_labels(mask, 6)
    table = lesion_table(mask, mask.astype(np.float32), affine, 6)
    assert labels.dtype == np.int32 and set(np.unique(labels)) == {0, 1, 2, 3, 4}
    assert list(table.lesion) == [1, 2, 3, 4] and list(table.volume_mm3 / (0.7 * 0.8 * 3)) == pytest.approx([48, 8, 2, 1])
    for row in table.itertuples():
        ijk = np.argwhere(labels == row.lesion)
        centre = affine[:3, :3] @ ijk.mean(axis=0) + affine[:3, 3]
        assert len(ijk) * 0.7 * 0.8 * 3 == pytest.approx(row.volume_mm3)
        assert centre == pytest.approx([row.centroid_x_mm, row.centroid_y_mm, row.centroid_z_mm])
    assert not lesion_labels(np.zeros((3, 3, 3), bool)).any()
