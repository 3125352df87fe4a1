"""Segmentation metrics for the lesion class (RSANet, Section 3.2 of the paper).

All functions are pure and take numpy arrays; nothing here reads or writes files.

Conventions
-----------
* Masks are boolean arrays or numeric arrays holding only 0 and 1 (any other value, e.g. a
  probability map or a multi-label map, raises ``ValueError``: threshold first). ``pred`` and
  ``truth`` must have the same shape. Any number of dimensions is accepted by the overlap
  metrics; in this project volumes are 3D with axes ``(D, H, W)`` = (axial, coronal, sagittal).
* ``voxel_size_mm`` is the voxel spacing in millimetres, one value per array axis, in the same
  ``(D, H, W)`` order (only the product matters for volumes). Volumes are reported in
  millilitres (1 ml = 1000 mm^3).

Empty-mask rules (chosen so that "nothing predicted where there is nothing" is perfect)
------------------------------------------------------------------------------------------
* Dice / IoU, per image or from pooled counts: if prediction and truth are both empty
  (``tp + fp + fn == 0``) the score is **1.0**; if exactly one of them is empty the score is
  **0.0** (this follows from the formulas, since then ``tp == 0`` and the denominator is > 0).
* Lesion-wise detection: LTPR is **1.0** when there are no true lesions (no lesion can be
  missed); LFPR is **0.0** when there are no predicted lesions (no prediction can be false).
  F1 is the harmonic mean of LTPR and precision ``1 - LFPR``, and **0.0** when both are 0.
  Hence: no true and no predicted lesions -> ``ltpr=1, lfpr=0, f1=1``; no true lesions but
  some predicted -> ``ltpr=1, lfpr=1, f1=0``; true lesions but none predicted ->
  ``ltpr=0, lfpr=0, f1=0``.
* Relative volume error ``(Vp - Vt) / Vt`` is **NaN** when the true volume is 0.

Averages (paper, Section 3.2)
-----------------------------
* *Sample average*: the metric computed per test image, then the mean over images
  (:func:`sample_average`).
* *Voxel average*: TP, FP and FN pooled (summed) over all test images, then one Dice / IoU
  (:func:`voxel_average`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
from scipy import ndimage

__all__ = [
    "LesionDetection",
    "confusion",
    "dice",
    "dice_from_counts",
    "evaluate_case",
    "iou",
    "iou_from_counts",
    "lesion_detection",
    "lesion_volume_ml",
    "remove_small_components",
    "sample_average",
    "voxel_average",
    "volume_errors",
]

#: Neighbourhood name (3D convention) -> ``scipy.ndimage.generate_binary_structure`` rank.
_CONNECTIVITY_RANK = {6: 1, 18: 2, 26: 3}


# ---------------------------------------------------------------------------------------------
# Input handling
# ---------------------------------------------------------------------------------------------


def _as_mask(a: np.ndarray, name: str) -> np.ndarray:
    """Return ``a`` as a boolean array, checking that it holds only 0/1 (or bools)."""
    arr = np.asarray(a)
    if arr.dtype == bool:
        return arr
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise ValueError(f"{name}: expected a boolean or 0/1 numeric mask, got dtype {arr.dtype}")
    if not np.all((arr == 0) | (arr == 1)):
        raise ValueError(f"{name}: mask values must be 0 or 1 (threshold probability maps first)")
    return arr != 0


def _as_pair(pred: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate and convert a prediction/truth pair to boolean arrays of equal shape."""
    p = _as_mask(pred, "pred")
    t = _as_mask(truth, "truth")
    if p.shape != t.shape:
        raise ValueError(f"shape mismatch: pred {p.shape} vs truth {t.shape}")
    return p, t


def _check_counts(tp: int, fp: int, fn: int) -> None:
    if min(tp, fp, fn) < 0:
        raise ValueError(f"counts must be non-negative, got tp={tp}, fp={fp}, fn={fn}")


# ---------------------------------------------------------------------------------------------
# Overlap metrics
# ---------------------------------------------------------------------------------------------


def confusion(pred: np.ndarray, truth: np.ndarray) -> tuple[int, int, int]:
    """Voxel counts of the lesion class.

    Args:
        pred: predicted mask, any shape, boolean or 0/1.
        truth: reference mask, same shape as ``pred``.

    Returns:
        ``(tp, fp, fn)`` as Python ints (numbers of voxels): lesion in both, lesion only in
        ``pred``, lesion only in ``truth``.
    """
    p, t = _as_pair(pred, truth)
    tp = int(np.count_nonzero(p & t))
    fp = int(np.count_nonzero(p & ~t))
    fn = int(np.count_nonzero(~p & t))
    return tp, fp, fn


def dice_from_counts(tp: int, fp: int, fn: int) -> float:
    """Dice = 2 TP / (2 TP + FP + FN); 1.0 when ``tp + fp + fn == 0`` (both masks empty)."""
    _check_counts(tp, fp, fn)
    denom = 2 * tp + fp + fn
    return 1.0 if denom == 0 else 2.0 * tp / denom


def iou_from_counts(tp: int, fp: int, fn: int) -> float:
    """IoU (Jaccard) = TP / (TP + FP + FN); 1.0 when ``tp + fp + fn == 0`` (both masks empty)."""
    _check_counts(tp, fp, fn)
    denom = tp + fp + fn
    return 1.0 if denom == 0 else tp / denom


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice of one image's lesion masks (same shape, any dimension), in [0, 1].

    Both masks empty -> 1.0; exactly one empty -> 0.0.
    """
    return dice_from_counts(*confusion(pred, truth))


def iou(pred: np.ndarray, truth: np.ndarray) -> float:
    """IoU (Jaccard) of one image's lesion masks (same shape, any dimension), in [0, 1].

    Both masks empty -> 1.0; exactly one empty -> 0.0.
    """
    return iou_from_counts(*confusion(pred, truth))


def sample_average(per_image_scores: Iterable[float]) -> float:
    """Paper's "sample average": the arithmetic mean of per-image scores.

    Args:
        per_image_scores: one score (e.g. Dice) per test image. A NaN score propagates.

    Raises:
        ValueError: if there are no scores.
    """
    scores = np.asarray(list(per_image_scores), dtype=np.float64)
    if scores.size == 0:
        raise ValueError("sample_average of zero images is undefined")
    return float(scores.mean())


def voxel_average(counts: Iterable[Sequence[int]]) -> dict[str, float]:
    """Paper's "voxel average": pool TP, FP, FN over images, then one Dice and one IoU.

    Args:
        counts: one ``(tp, fp, fn)`` triple per test image (as from :func:`confusion`).

    Returns:
        ``{"dice": float, "iou": float}`` computed from the summed counts (empty rule as in
        :func:`dice_from_counts`).

    Raises:
        ValueError: if there are no images.
    """
    tp = fp = fn = 0
    n = 0
    for c in counts:
        a, b, d = (int(x) for x in c)
        _check_counts(a, b, d)
        tp, fp, fn, n = tp + a, fp + b, fn + d, n + 1
    if n == 0:
        raise ValueError("voxel_average of zero images is undefined")
    return {"dice": dice_from_counts(tp, fp, fn), "iou": iou_from_counts(tp, fp, fn)}


# ---------------------------------------------------------------------------------------------
# Lesion-wise detection
# ---------------------------------------------------------------------------------------------


def _structure(ndim: int, connectivity: int) -> np.ndarray:
    """Structuring element for ``connectivity`` in {6, 18, 26} (named for 3D).

    For arrays with fewer than 3 dimensions the rank is capped at ``ndim`` (in 2D, 6 -> 4-
    connectivity, 18 and 26 -> 8-connectivity).
    """
    if connectivity not in _CONNECTIVITY_RANK:
        raise ValueError(f"connectivity must be 6, 18 or 26, got {connectivity}")
    if ndim < 1:
        raise ValueError("lesion detection needs an array with at least one dimension")
    rank = min(_CONNECTIVITY_RANK[connectivity], ndim)
    return ndimage.generate_binary_structure(ndim, rank)


def remove_small_components(
    mask: np.ndarray, min_voxels: int, connectivity: int = 26
) -> np.ndarray:
    """Drop connected components with fewer than ``min_voxels`` voxels.

    Args:
        mask: boolean or 0/1 mask, any shape (3D ``(D, H, W)`` in practice).
        min_voxels: components of strictly fewer voxels are removed; ``<= 1`` keeps everything.
        connectivity: 6, 18 or 26 (face, face+edge, face+edge+corner neighbours).

    Returns:
        A new boolean mask of the same shape.
    """
    m = _as_mask(mask, "mask")
    if min_voxels <= 1 or not m.any():
        return m.copy()
    labels, n = ndimage.label(m, structure=_structure(m.ndim, connectivity))
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    keep = sizes >= min_voxels
    keep[0] = False
    return keep[labels]


@dataclass(frozen=True)
class LesionDetection:
    """Lesion-wise (connected-component) detection result for one image.

    Attributes:
        n_true: number of true lesions (components of the reference mask).
        n_pred: number of predicted lesions (components of the predicted mask).
        n_detected: true lesions overlapping at least one predicted voxel.
        n_false_positive: predicted components overlapping no true-lesion voxel.
        ltpr: lesion-wise true-positive rate, ``n_detected / n_true`` (1.0 if ``n_true == 0``).
        lfpr: lesion-wise false-positive rate, ``n_false_positive / n_pred``
            (0.0 if ``n_pred == 0``).
        f1: lesion-wise F1, harmonic mean of ``ltpr`` and precision ``1 - lfpr``
            (0.0 if both are 0).
    """

    n_true: int
    n_pred: int
    n_detected: int
    n_false_positive: int
    ltpr: float
    lfpr: float
    f1: float


def lesion_detection(
    pred: np.ndarray,
    truth: np.ndarray,
    connectivity: int = 26,
    min_lesion_voxels: int = 0,
) -> LesionDetection:
    """Lesion-wise detection from connected components (``scipy.ndimage.label``).

    A true lesion (component of ``truth``) is *detected* if it overlaps any predicted voxel; a
    predicted component is a *false positive* if it overlaps no true-lesion voxel. One
    predicted component may detect several true lesions and vice versa.

    Args:
        pred: predicted mask, boolean or 0/1, shape ``(D, H, W)`` (any dimension accepted).
        truth: reference mask, same shape.
        connectivity: 6, 18 or 26 neighbourhood for components (default 26, the usual choice
            for lesion counting: diagonally touching voxels belong to the same lesion).
        min_lesion_voxels: components with fewer voxels are removed from **both** masks before
            counting and matching (so a removed tiny prediction cannot detect a lesion either).
            Default 0 = keep every component, so results do not depend on an arbitrary size
            threshold and are comparable with the voxel metrics; pass e.g. 3 to ignore
            specks (3 voxels of 0.7x0.7x3.0 mm = 4.4 mm^3).

    Returns:
        A :class:`LesionDetection`; see the module docstring for the empty-mask rules.
    """
    p, t = _as_pair(pred, truth)
    if min_lesion_voxels < 0:
        raise ValueError("min_lesion_voxels must be >= 0")
    structure = _structure(p.ndim, connectivity)
    if min_lesion_voxels > 1:
        p = remove_small_components(p, min_lesion_voxels, connectivity)
        t = remove_small_components(t, min_lesion_voxels, connectivity)

    t_labels, n_true = ndimage.label(t, structure=structure)
    p_labels, n_pred = ndimage.label(p, structure=structure)

    # True lesions touched by any predicted voxel; predicted components touched by any truth.
    detected_ids = np.unique(t_labels[p & t])
    n_detected = int(np.count_nonzero(detected_ids))  # label 0 cannot occur here, but be safe
    hit_pred_ids = np.unique(p_labels[p & t])
    n_false_positive = int(n_pred - np.count_nonzero(hit_pred_ids))

    ltpr = 1.0 if n_true == 0 else n_detected / n_true
    lfpr = 0.0 if n_pred == 0 else n_false_positive / n_pred
    precision = 1.0 - lfpr
    f1 = 0.0 if ltpr + precision == 0 else 2.0 * ltpr * precision / (ltpr + precision)
    return LesionDetection(
        n_true=int(n_true),
        n_pred=int(n_pred),
        n_detected=n_detected,
        n_false_positive=n_false_positive,
        ltpr=float(ltpr),
        lfpr=float(lfpr),
        f1=float(f1),
    )


# ---------------------------------------------------------------------------------------------
# Volumes
# ---------------------------------------------------------------------------------------------


def lesion_volume_ml(mask: np.ndarray, voxel_size_mm: tuple[float, float, float]) -> float:
    """Lesion volume in millilitres.

    Args:
        mask: boolean or 0/1 mask, shape ``(D, H, W)``.
        voxel_size_mm: voxel spacing in mm along ``(D, H, W)``; one value per array axis.

    Returns:
        ``count(mask) * prod(voxel_size_mm) / 1000`` (mm^3 -> ml).
    """
    m = _as_mask(mask, "mask")
    spacing = tuple(float(s) for s in voxel_size_mm)
    if len(spacing) != m.ndim:
        raise ValueError(f"voxel_size_mm has {len(spacing)} values for a {m.ndim}D mask")
    if any(not np.isfinite(s) or s <= 0 for s in spacing):
        raise ValueError(f"voxel sizes must be positive and finite, got {spacing}")
    return float(np.count_nonzero(m) * float(np.prod(spacing)) / 1000.0)


def volume_errors(
    pred: np.ndarray, truth: np.ndarray, voxel_size_mm: tuple[float, float, float]
) -> tuple[float, float]:
    """Volume errors of a predicted lesion mask.

    Args:
        pred: predicted mask, shape ``(D, H, W)``.
        truth: reference mask, same shape.
        voxel_size_mm: voxel spacing in mm along ``(D, H, W)``.

    Returns:
        ``(absolute_error_ml, relative_error)``: ``|Vp - Vt|`` in ml, and the signed, unitless
        ``(Vp - Vt) / Vt`` (positive = over-segmentation); the relative error is NaN when
        ``Vt == 0``.
    """
    p, t = _as_pair(pred, truth)
    vp = lesion_volume_ml(p, voxel_size_mm)
    vt = lesion_volume_ml(t, voxel_size_mm)
    rel = float("nan") if vt == 0 else (vp - vt) / vt
    return abs(vp - vt), float(rel)


# ---------------------------------------------------------------------------------------------
# One test case
# ---------------------------------------------------------------------------------------------


def evaluate_case(
    pred: np.ndarray,
    truth: np.ndarray,
    voxel_size_mm: tuple[float, float, float],
    connectivity: int = 26,
    min_lesion_voxels: int = 0,
) -> dict[str, float | int]:
    """All per-image numbers for one test subject (one CSV row).

    Args:
        pred: predicted mask, boolean or 0/1, shape ``(D, H, W)``.
        truth: reference mask, same shape.
        voxel_size_mm: voxel spacing in mm along ``(D, H, W)``.
        connectivity: neighbourhood for lesion components (6, 18 or 26).
        min_lesion_voxels: size filter for lesion-wise detection only (see
            :func:`lesion_detection`); voxel metrics and volumes always use the full masks.

    Returns:
        Dict with keys ``tp, fp, fn`` (voxels, int), ``dice, iou`` ([0, 1]),
        ``ltpr, lfpr, lesion_f1`` ([0, 1]), ``n_true_lesions, n_pred_lesions`` (int),
        ``volume_true_ml, volume_pred_ml, abs_volume_error_ml`` (ml) and
        ``rel_volume_error`` (signed fraction, NaN if the true volume is 0).
    """
    p, t = _as_pair(pred, truth)
    tp, fp, fn = confusion(p, t)
    det = lesion_detection(p, t, connectivity=connectivity, min_lesion_voxels=min_lesion_voxels)
    abs_err, rel_err = volume_errors(p, t, voxel_size_mm)
    return {
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "dice": dice_from_counts(tp, fp, fn),
        "iou": iou_from_counts(tp, fp, fn),
        "ltpr": det.ltpr,
        "lfpr": det.lfpr,
        "lesion_f1": det.f1,
        "n_true_lesions": det.n_true,
        "n_pred_lesions": det.n_pred,
        "volume_true_ml": lesion_volume_ml(t, voxel_size_mm),
        "volume_pred_ml": lesion_volume_ml(p, voxel_size_mm),
        "abs_volume_error_ml": abs_err,
        "rel_volume_error": rel_err,
    }
