"""Cross-check of the project's Dice, IoU, HD95 and ASSD against MONAI (a well-kept peer).

On random blobs, and on the 30 real MS lesion masks shipped with the package against shifted
and eroded copies of themselves, with anisotropic spacing. Agreement to 1e-6 relative.
"""

from __future__ import annotations

from importlib import resources

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage

import monai.metrics as monai_metrics  # a test dependency (pip install -e .[test])
import monai.metrics.utils as monai_utils

from rsanet.metrics import dice, iou, surface_distances_mm

SPACINGS = [(1.0, 1.0, 1.0), (3.0, 0.7, 0.7), (1.2, 0.9, 2.5)]
MASKS = sorted(p.name for p in resources.files("rsanet").joinpath("data", "lesion_masks_mni").iterdir()
               if p.name.endswith(".nii.gz"))


def monai_scores(pred: np.ndarray, truth: np.ndarray, spacing, top_level: bool = True) -> dict[str, float]:
    """MONAI's numbers for one pair of binary masks (one channel).

    MONAI's top-level HD95/ASSD return float32 (its quantile interpolates in float32, ~1e-5
    off); for the 1e-6 comparison the surface distances come from MONAI's own
    ``get_edge_surface_distance`` and are reduced in float64 with MONAI's definitions (95th
    percentile, linear interpolation, max of both directions; ASSD = mean of both sets pooled).
    The float32 top-level results are checked too, to 1e-4.
    """
    yp = torch.from_numpy(pred[None, None].astype(np.float64))
    yt = torch.from_numpy(truth[None, None].astype(np.float64))
    sp = [float(s) for s in spacing]
    _, (d_pt, d_tp), _ = monai_utils.get_edge_surface_distance(
        torch.from_numpy(pred), torch.from_numpy(truth), distance_metric="euclidean", spacing=sp, symmetric=True)
    d_pt, d_tp = d_pt.double().numpy(), d_tp.double().numpy()
    out = {}
    if top_level:
        out["hd95_float32"] = float(monai_metrics.compute_hausdorff_distance(
            yp, yt, include_background=True, percentile=95, spacing=sp)[0, 0])
        out["assd_float32"] = float(monai_metrics.compute_average_surface_distance(
            yp, yt, include_background=True, symmetric=True, spacing=sp)[0, 0])
    return out | {
        "dice": float(monai_metrics.compute_dice(yp, yt, include_background=True)[0, 0]),
        "iou": float(monai_metrics.compute_iou(yp, yt, include_background=True)[0, 0]),
        "hd95": max(float(np.percentile(d_pt, 95)), float(np.percentile(d_tp, 95))),
        "assd": float(np.concatenate([d_pt, d_tp]).mean()),
    }


def ours(pred: np.ndarray, truth: np.ndarray, spacing) -> dict[str, float]:
    hd95, assd = surface_distances_mm(pred, truth, spacing)
    return {"dice": dice(pred, truth), "iou": iou(pred, truth), "hd95": hd95, "assd": assd}


def assert_agree(pred, truth, spacing, what, top_level=True):
    a, b = ours(pred, truth, spacing), monai_scores(pred, truth, spacing, top_level)
    for key in a:
        assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-9), f"{what}: {key} ours {a[key]} MONAI {b[key]}"
    for key in ("hd95", "assd") if top_level else ():
        assert a[key] == pytest.approx(b[f"{key}_float32"], rel=1e-4), f"{what}: {key} vs MONAI's float32 API"


@pytest.mark.parametrize("seed", range(6))
def test_random_blobs_agree_with_monai(seed):
    rng = np.random.default_rng(seed)
    shape = (12, 24, 20)
    pred = ndimage.binary_opening(rng.random(shape) < 0.35)
    truth = ndimage.binary_opening(rng.random(shape) < 0.35)
    assert pred.any() and truth.any()
    assert_agree(pred, truth, SPACINGS[seed % 3], f"seed {seed}")


@pytest.mark.parametrize("name", MASKS)
def test_real_lesion_masks_against_shifted_and_eroded_copies(name):
    path = resources.files("rsanet").joinpath("data", "lesion_masks_mni", name)
    with resources.as_file(path) as f:
        mask = np.asarray(nib.load(str(f)).dataobj) > 0
    box = tuple(slice(max(int(lo) - 4, 0), int(hi) + 5) for lo, hi in zip(np.argwhere(mask).min(0), np.argwhere(mask).max(0)))
    mask = mask[box]  # the lesions' region: same metrics, much faster
    shifted = np.roll(mask, (1, -2, 1), axis=(0, 1, 2))
    eroded = ndimage.binary_erosion(mask)
    spacing = SPACINGS[MASKS.index(name) % 3]
    assert_agree(shifted, mask, spacing, f"{name} shifted", top_level=False)
    if eroded.any():
        assert_agree(eroded, mask, spacing, f"{name} eroded", top_level=False)
