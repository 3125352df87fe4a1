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
from typing import Iterable, Mapping, Sequence

import numpy as np
from scipy import ndimage

__all__ = [
    "EvaluationSettings",
    "LesionDetection",
    "detection_by_size",
    "size_bin_labels",
    "surface_distances_mm",
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
    mask: np.ndarray, min_voxels: int, connectivity: int
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


#: animaSegPerfAnalyzer's defaults (MSSEG-2016; Commowick et al., Sci. Rep. 8:13650, 2018, Sec. 11).
MSSEG_ALPHA, MSSEG_BETA, MSSEG_GAMMA, MSSEG_MIN_LESION_MM3 = 0.10, 0.70, 0.65, 3.0
#: True-lesion volume bins (mm^3) of the detection-by-size table: [3, 10), [10, 50), ... [500, inf).
DEFAULT_SIZE_BINS_MM3: tuple[float, ...] = (3.0, 10.0, 50.0, 100.0, 500.0)


@dataclass(frozen=True)
class LesionDetection:
    """Lesion-wise (connected-component) detection result for one image.

    Attributes:
        n_true: true lesions (components of the reference mask above the size limit).
        n_pred: predicted lesions (components of the predicted mask above the size limit).
        n_detected: true lesions counted as detected by the rule.
        n_pred_true_positive: predicted lesions counted as true positives by the rule.
        n_false_positive: ``n_pred - n_pred_true_positive``.
        ltpr: lesion-wise true-positive rate (sensitivity), ``n_detected / n_true``
            (1.0 if ``n_true == 0``).
        lfpr: lesion-wise false-positive rate, ``n_false_positive / n_pred`` (0.0 if
            ``n_pred == 0``); ``1 - lfpr`` is the lesion-wise precision (Anima's PPVL).
        f1: harmonic mean of ``ltpr`` and ``1 - lfpr`` (0.0 if both are 0).
        true_volumes_mm3: volume of each true lesion (mm^3), label order.
        true_detected: whether each true lesion was detected, same order.
    """

    n_true: int
    n_pred: int
    n_detected: int
    n_pred_true_positive: int
    n_false_positive: int
    ltpr: float
    lfpr: float
    f1: float
    true_volumes_mm3: tuple[float, ...] = ()
    true_detected: tuple[bool, ...] = ()


def _components(mask: np.ndarray, connectivity: int, min_voxels: int) -> tuple[np.ndarray, int]:
    """Connected components labelled 1..n (consecutive), those of fewer than ``min_voxels`` removed."""
    labels, n = ndimage.label(mask, structure=_structure(mask.ndim, connectivity))
    if n == 0 or min_voxels <= 1:
        return labels, int(n)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    keep = sizes >= min_voxels
    keep[0] = False
    new_ids = np.zeros(n + 1, dtype=labels.dtype)
    new_ids[keep] = np.arange(1, int(keep.sum()) + 1)
    return new_ids[labels], int(keep.sum())


def _detected(row: np.ndarray, outside: np.ndarray, rule: str, alpha: float, beta: float, gamma: float) -> bool:
    """Whether one lesion is detected by the components of the other mask.

    Args:
        row: voxels of the lesion shared with each component of the other mask; ``row[0]`` are
            its voxels on the other mask's background, ``row[j]`` (j >= 1) those in component j.
        outside: for each component j of the other mask, the fraction of its voxels that lie on
            the background of this lesion's mask (``outside[0]`` unused).
    """
    overlap = row[1:].sum()
    if rule == "any-overlap":
        return bool(overlap > 0)
    size = row.sum()
    if size == 0 or overlap / size <= alpha:  # alpha: minimum fraction of the lesion covered
        return False
    # Candidates by decreasing overlap: each must not lie mostly outside the lesion's mask
    # (beta), until those checked account for a fraction gamma of the overlap.
    order = np.argsort(-row[1:], kind="stable") + 1
    covered = 0.0
    for j in order:
        if row[j] == 0:
            break
        if outside[j] > beta:
            return False
        covered += row[j] / overlap
        if covered >= gamma:
            return True
    return True  # all overlapping components checked (their weights sum to 1 >= gamma)


def lesion_detection(
    pred: np.ndarray,
    truth: np.ndarray,
    voxel_size_mm: Sequence[float],
    rule: str = "msseg",
    connectivity: int = 6,
    min_lesion_mm3: float = MSSEG_MIN_LESION_MM3,
    alpha: float = MSSEG_ALPHA,
    beta: float = MSSEG_BETA,
    gamma: float = MSSEG_GAMMA,
) -> LesionDetection:
    """Lesion-wise detection from connected components, with stated conventions.

    Lesions are connected components (``connectivity`` 6, 18 or 26; 6 by default: ITK's
    ``ConnectedComponentImageFilter`` default, hence animaSegPerfAnalyzer's and MSSEG-2016's).
    Components of at most ``min_lesion_mm3`` are removed from **both** masks first (their voxels
    become background), as animaSegPerfAnalyzer does (default 3 mm^3).

    Rules:

    * ``"msseg"`` (default; the MSSEG-2016 definition implemented by animaSegPerfAnalyzer,
      Commowick et al. 2018, Sec. 11): a true lesion is *detected* when (1) the predicted
      components cover more than ``alpha`` of its voxels and (2) going through the predicted
      components that overlap it by decreasing overlap, none lies for more than ``beta`` of its
      voxels outside the true mask, until the components checked make up ``gamma`` of the
      overlap (so one lesion split into several predictions still counts once, and a large
      prediction that merges several lesions or spreads far outside does not). A predicted
      lesion is a true positive by the same test with the masks swapped. (Anima's loop also
      stops after as many candidates as the reference has labels; that bound is not
      reproduced.)
    * ``"any-overlap"`` (ISBI-2015's LTPR/LFPR): a true lesion is detected if any predicted voxel
      overlaps it; a predicted lesion is a false positive if it overlaps no true voxel.

    Args:
        pred, truth: masks, boolean or 0/1, same shape ``(D, H, W)``.
        voxel_size_mm: spacing along the array axes (mm), for the size limit and volumes.

    Returns:
        A :class:`LesionDetection`; empty-mask rules in the module docstring.
    """
    p, t = _as_pair(pred, truth)
    if rule not in ("msseg", "any-overlap"):
        raise ValueError(f"rule must be 'msseg' or 'any-overlap', got {rule!r}")
    if min_lesion_mm3 < 0:
        raise ValueError("min_lesion_mm3 must be >= 0")
    voxel_mm3 = _voxel_volume_mm3(voxel_size_mm, p.ndim)
    min_voxels = int(np.floor(min_lesion_mm3 / voxel_mm3)) + 1 if min_lesion_mm3 > 0 else 0
    t_labels, n_true = _components(t, connectivity, min_voxels)
    p_labels, n_pred = _components(p, connectivity, min_voxels)

    # overlap[i, j]: voxels in true lesion i and predicted lesion j (0 = background of that mask)
    either = (t_labels > 0) | (p_labels > 0)
    flat = t_labels[either].astype(np.int64) * (n_pred + 1) + p_labels[either]
    overlap = np.bincount(flat, minlength=(n_true + 1) * (n_pred + 1)).reshape(n_true + 1, n_pred + 1)
    pred_sizes = overlap.sum(axis=0)  # voxels of each predicted lesion
    true_sizes = overlap.sum(axis=1)
    pred_outside = np.divide(overlap[0], pred_sizes, out=np.zeros(n_pred + 1), where=pred_sizes > 0)
    true_outside = np.divide(overlap[:, 0], true_sizes, out=np.zeros(n_true + 1), where=true_sizes > 0)

    detected = tuple(_detected(overlap[i], pred_outside, rule, alpha, beta, gamma) for i in range(1, n_true + 1))
    pred_tp = sum(_detected(overlap[:, j], true_outside, rule, alpha, beta, gamma) for j in range(1, n_pred + 1))
    n_detected = int(sum(detected))
    ltpr = 1.0 if n_true == 0 else n_detected / n_true
    lfpr = 0.0 if n_pred == 0 else (n_pred - pred_tp) / n_pred
    precision = 1.0 - lfpr
    f1 = 0.0 if ltpr + precision == 0 else 2.0 * ltpr * precision / (ltpr + precision)
    return LesionDetection(
        n_true=int(n_true), n_pred=int(n_pred), n_detected=n_detected, n_pred_true_positive=int(pred_tp),
        n_false_positive=int(n_pred - pred_tp), ltpr=float(ltpr), lfpr=float(lfpr), f1=float(f1),
        true_volumes_mm3=tuple(float(v) * voxel_mm3 for v in true_sizes[1:]), true_detected=detected,
    )


def size_bin_labels(edges_mm3: Sequence[float]) -> list[str]:
    """Labels of the lesion-volume bins ``[e0, e1), ..., [e_last, inf)``, e.g. ``"3-10"``, ``">500"``."""
    e = [float(x) for x in edges_mm3]
    fmt = lambda v: f"{v:g}"
    return [f"{fmt(a)}-{fmt(b)}" for a, b in zip(e[:-1], e[1:])] + [f">{fmt(e[-1])}"]


def detection_by_size(det: LesionDetection, edges_mm3: Sequence[float] = DEFAULT_SIZE_BINS_MM3) -> dict[str, tuple[int, int]]:
    """True lesions and detected true lesions per volume bin: ``label -> (n_true, n_detected)``.

    Bins are ``[edges[k], edges[k+1])`` mm^3 and ``[edges[-1], inf)``; lesions below ``edges[0]``
    are not counted (with the default 3 mm^3 size limit there are none).
    """
    e = np.asarray([float(x) for x in edges_mm3] + [np.inf])
    if np.any(np.diff(e) <= 0):
        raise ValueError(f"size bins must increase, got {list(edges_mm3)}")
    out = {}
    volumes = np.asarray(det.true_volumes_mm3, dtype=float)
    found = np.asarray(det.true_detected, dtype=bool)
    for label, lo, hi in zip(size_bin_labels(edges_mm3), e[:-1], e[1:]):
        inside = (volumes >= lo) & (volumes < hi)
        out[label] = (int(inside.sum()), int((inside & found).sum()))
    return out


# ---------------------------------------------------------------------------------------------
# Surface distances
# ---------------------------------------------------------------------------------------------


def _surface(mask: np.ndarray) -> np.ndarray:
    """Surface voxels: in the mask with a face neighbour outside it (``mask ^ erosion(mask)``)."""
    return mask ^ ndimage.binary_erosion(mask)


def surface_distances_mm(
    pred: np.ndarray, truth: np.ndarray, voxel_size_mm: Sequence[float], percentile: float = 95.0
) -> tuple[float, float]:
    """95th-percentile Hausdorff distance and average symmetric surface distance, in mm.

    Surfaces are the mask voxels with a face neighbour outside the mask; for each surface voxel
    of one mask, the Euclidean distance (``voxel_size_mm`` per axis) to the nearest surface voxel
    of the other. ``HD95 = max(P95(d(pred -> truth)), P95(d(truth -> pred)))`` (linear
    percentile); ``ASSD`` = mean of both sets of distances pooled. The same definitions as
    MONAI's ``compute_hausdorff_distance(percentile=95)`` and
    ``compute_average_surface_distance(symmetric=True)`` (cross-checked in the tests).

    Empty masks: both empty -> ``(0.0, 0.0)`` (perfect agreement); exactly one empty ->
    ``(nan, nan)`` (undefined: no surface to measure to; such subjects are left out of the means
    and counted in the tables).
    """
    p, t = _as_pair(pred, truth)
    spacing = [float(s) for s in voxel_size_mm]
    _voxel_volume_mm3(spacing, p.ndim)
    if not p.any() and not t.any():
        return 0.0, 0.0
    if not p.any() or not t.any():
        return float("nan"), float("nan")
    # Nearest-surface distances with a k-d tree over the surface voxels' positions in mm (exact
    # Euclidean nearest neighbours; far faster than a distance transform of the whole box when
    # predictions are scattered over the brain).
    from scipy.spatial import cKDTree

    sp_mm = np.argwhere(_surface(p)) * np.asarray(spacing)
    st_mm = np.argwhere(_surface(t)) * np.asarray(spacing)
    d_pt = cKDTree(st_mm).query(sp_mm)[0]
    d_tp = cKDTree(sp_mm).query(st_mm)[0]
    hd = max(float(np.percentile(d_pt, percentile)), float(np.percentile(d_tp, percentile)))
    return hd, float(np.concatenate([d_pt, d_tp]).mean())


# ---------------------------------------------------------------------------------------------
# Volumes
# ---------------------------------------------------------------------------------------------


def _voxel_volume_mm3(voxel_size_mm: Sequence[float], ndim: int) -> float:
    spacing = tuple(float(s) for s in voxel_size_mm)
    if len(spacing) != ndim:
        raise ValueError(f"voxel_size_mm has {len(spacing)} values for a {ndim}D mask")
    if any(not np.isfinite(s) or s <= 0 for s in spacing):
        raise ValueError(f"voxel sizes must be positive and finite, got {spacing}")
    return float(np.prod(spacing))


def lesion_volume_ml(mask: np.ndarray, voxel_size_mm: tuple[float, float, float]) -> float:
    """Lesion volume in millilitres.

    Args:
        mask: boolean or 0/1 mask, shape ``(D, H, W)``.
        voxel_size_mm: voxel spacing in mm along ``(D, H, W)``; one value per array axis.

    Returns:
        ``count(mask) * prod(voxel_size_mm) / 1000`` (mm^3 -> ml).
    """
    m = _as_mask(mask, "mask")
    return float(np.count_nonzero(m) * _voxel_volume_mm3(voxel_size_mm, m.ndim) / 1000.0)


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


@dataclass(frozen=True)
class EvaluationSettings:
    """How lesion-wise detection is scored (the workflow's ``evaluation:`` config section).

    Defaults: MSSEG-2016 as animaSegPerfAnalyzer computes it (6-connectivity, lesions above
    3 mm^3, alpha 0.10, beta 0.70, gamma 0.65); ``detection_rule="any-overlap"`` gives ISBI-2015's
    LTPR/LFPR instead.
    """

    detection_rule: str = "msseg"
    connectivity: int = 6
    min_lesion_mm3: float = MSSEG_MIN_LESION_MM3
    alpha: float = MSSEG_ALPHA
    beta: float = MSSEG_BETA
    gamma: float = MSSEG_GAMMA
    size_bins_mm3: tuple[float, ...] = DEFAULT_SIZE_BINS_MM3

    @classmethod
    def from_config(cls, section: Mapping) -> "EvaluationSettings":
        """From the validated ``evaluation:`` config section (lists become tuples)."""
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in section.items()})


def evaluate_case(
    pred: np.ndarray,
    truth: np.ndarray,
    voxel_size_mm: tuple[float, float, float],
    settings: EvaluationSettings = EvaluationSettings(),
) -> dict[str, float | int]:
    """All per-image numbers for one test subject (one CSV row).

    Args:
        pred: predicted mask, boolean or 0/1, shape ``(D, H, W)``.
        truth: reference mask, same shape.
        voxel_size_mm: voxel spacing in mm along ``(D, H, W)``.
        settings: the lesion-wise conventions (:class:`EvaluationSettings`).

    Returns:
        Dict with keys ``tp, fp, fn`` (voxels, int), ``dice, iou`` ([0, 1]), ``hd95_mm,
        assd_mm`` (mm; :func:`surface_distances_mm`), ``ltpr, lfpr, lesion_f1`` ([0, 1]),
        ``n_true_lesions, n_pred_lesions, n_detected_lesions`` (int), ``volume_true_ml,
        volume_pred_ml, abs_volume_error_ml`` (ml), ``rel_volume_error`` (signed fraction, NaN
        if the true volume is 0), ``abs_rel_volume_error`` (its absolute value), and per true-
        lesion volume bin ``n_true_lesions[<bin>]``, ``n_detected_lesions[<bin>]``.
    """
    p, t = _as_pair(pred, truth)
    tp, fp, fn = confusion(p, t)
    det = lesion_detection(p, t, voxel_size_mm, rule=settings.detection_rule, connectivity=settings.connectivity,
                           min_lesion_mm3=settings.min_lesion_mm3, alpha=settings.alpha, beta=settings.beta,
                           gamma=settings.gamma)
    hd95, assd = surface_distances_mm(p, t, voxel_size_mm)
    abs_err, rel_err = volume_errors(p, t, voxel_size_mm)
    row: dict[str, float | int] = {
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "dice": dice_from_counts(tp, fp, fn),
        "iou": iou_from_counts(tp, fp, fn),
        "hd95_mm": hd95,
        "assd_mm": assd,
        "ltpr": det.ltpr,
        "lfpr": det.lfpr,
        "lesion_f1": det.f1,
        "n_true_lesions": det.n_true,
        "n_pred_lesions": det.n_pred,
        "n_detected_lesions": det.n_detected,
        "volume_true_ml": lesion_volume_ml(t, voxel_size_mm),
        "volume_pred_ml": lesion_volume_ml(p, voxel_size_mm),
        "abs_volume_error_ml": abs_err,
        "rel_volume_error": rel_err,
        "abs_rel_volume_error": abs(rel_err),
    }
    for label, (n, found) in detection_by_size(det, settings.size_bins_mm3).items():
        row[f"n_true_lesions[{label}]"] = n
        row[f"n_detected_lesions[{label}]"] = found
    return row
