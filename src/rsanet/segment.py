"""Segment new patients with a study's exported models: ``rsanet-segment``.

An *export* (``results/export/<variant>/``, :mod:`rsanet.export`) holds one variant's models of
every split and the settings the study trained and scored them with.

:func:`segment` applies it to one patient: its contrasts co-registered and preprocessed by the
study's own functions with the settings the export records (:func:`prepare_patient`), every split
model predicting with the study's tiling policy (optionally with mirrored copies), the lesion
probabilities averaged (the ensemble), thresholded, lesions of at most ``min_lesion_mm3`` removed.
The models' disagreement is kept: the voxel-wise sd of their probabilities
(``lesion_prob_sd.nii.gz``) and, per lesion, the fraction of models that detect it on their own
(``agreement`` in ``lesions.csv``).
Every output lies on the grid of the study's registration reference (the FLAIR by default): the
shape, affine and voxel order of that file. Outputs are written to a temporary folder next to
``out`` and renamed at the end, so a failure leaves nothing in ``out``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import nibabel as nib
import numpy as np
import pandas as pd
from scipy import ndimage

from .export import ExportError, load_predictor, read_export
from .volumes import InputError, preprocess_subject

if TYPE_CHECKING:
    from .calibration import LesionCalibrator
    from .registration import Coregistered
    from .volumes import Preprocessed

log = logging.getLogger(__name__)

OUTPUTS = ("lesion_prob.nii.gz", "lesion_prob_sd.nii.gz", "lesions.nii.gz", "lesion_labels.nii.gz", "lesions.csv",
           "lesions.json", "summary.json", "qc.png")


#: ``lesions.csv``'s columns: description and unit, written beside it as ``lesions.json``
#: (a BIDS-style sidecar: column -> {Description, Units}).
LESION_COLUMNS: dict[str, dict[str, str]] = {
    "lesion": {"Description": "lesion number, 1 = largest; the voxels of lesion k have value k in "
                              "lesion_labels.nii.gz", "Units": "1"},
    "volume_mm3": {"Description": "lesion volume (its voxel count times the voxel volume)", "Units": "mm^3"},
    "centroid_x_mm": {"Description": "centre of the lesion's voxels, world x (RAS: towards the patient's right = "
                                     "negative, left = positive), the images' scanner frame", "Units": "mm"},
    "centroid_y_mm": {"Description": "centre of the lesion's voxels, world y (RAS: anterior positive)", "Units": "mm"},
    "centroid_z_mm": {"Description": "centre of the lesion's voxels, world z (RAS: superior positive)", "Units": "mm"},
    "mean_probability": {"Description": "the ensemble's lesion probability (mean over the models), averaged over "
                                        "the lesion's voxels", "Units": "1"},
    "max_probability": {"Description": "the ensemble's highest lesion probability inside the lesion", "Units": "1"},
    "agreement": {"Description": "fraction of the ensemble's models that detect the lesion on their own (their "
                                 "own probability above the threshold somewhere in it); precision by agreement, "
                                 "measured in the study: the export's MODEL_CARD.md", "Units": "1"},
    "probability_real": {"Description": "calibrated probability that the lesion is real (overlaps a lesion an "
                                        "expert would mark): a logistic map of agreement, mean_probability and "
                                        "log10 volume fitted on the study's validation subjects; its reliability "
                                        "on the study's test subjects: the export's MODEL_CARD.md", "Units": "1"},
    "true_positive": {"Description": "whether the lesion overlaps a lesion of the reference mask", "Units": "bool"},
}


def lesion_labels(mask: np.ndarray, connectivity: int = 6) -> np.ndarray:
    """Number the lesions (connected components) of ``mask``: ``(X, Y, Z)`` bool -> int32 of the
    same shape, 0 outside lesions and 1..n by decreasing volume (ties in scan order): the numbers
    of :func:`lesion_table`'s ``lesion`` column."""
    from .metrics import _structure

    labels, n = ndimage.label(mask, structure=_structure(mask.ndim, connectivity))
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    remap = np.zeros(n + 1, np.int32)
    remap[np.argsort(-sizes, kind="stable") + 1] = np.arange(1, n + 1, dtype=np.int32)
    return remap[labels]


def lesion_table(mask: np.ndarray, prob: np.ndarray, affine: np.ndarray, connectivity: int = 6,
                 model_probs: np.ndarray | None = None, threshold: float | None = None,
                 truth: np.ndarray | None = None) -> pd.DataFrame:
    """One row per lesion (connected component) of ``mask`` (voxel arrays of the same grid).

    Args:
        mask: ``(X, Y, Z)`` bool, the final lesion mask.
        prob: ``(X, Y, Z)`` float, the ensemble's lesion probability.
        affine: the grid's voxel -> world (RAS mm) affine.
        connectivity: 6, 18 or 26 (what makes a lesion one component).
        model_probs: ``(M, X, Y, Z)``, each model's own probability (optional).
        threshold: a model detects a lesion when its own ``p > threshold`` somewhere in it (needed
            with ``model_probs``).
        truth: ``(X, Y, Z)`` bool, a reference lesion mask (optional).

    Returns:
        Columns ``lesion`` (1..n, by decreasing volume: :func:`lesion_labels`), ``volume_mm3``, ``centroid_x_mm``,
        ``centroid_y_mm``, ``centroid_z_mm`` (world RAS mm), ``mean_probability`` and
        ``max_probability`` (the ensemble's, over the lesion's voxels), and with ``model_probs``
        ``agreement``: the fraction of the M models that detect the lesion on their own (in [0, 1]),
        and with ``truth`` ``true_positive``: whether the lesion overlaps a reference lesion.
    """
    labels = lesion_labels(mask, connectivity)
    voxel_mm3 = float(abs(np.linalg.det(affine[:3, :3])))
    columns = ["volume_mm3", "centroid_x_mm", "centroid_y_mm", "centroid_z_mm", "mean_probability",
               "max_probability"] + (["agreement"] if model_probs is not None else []) \
        + (["true_positive"] if truth is not None else [])
    rows = []
    for k, box in enumerate(ndimage.find_objects(labels), start=1):
        inside = labels[box] == k
        ijk = np.argwhere(inside) + np.array([b.start for b in box])
        centre = affine[:3, :3] @ ijk.mean(axis=0) + affine[:3, 3]
        p = prob[box][inside]
        row = {"volume_mm3": len(ijk) * voxel_mm3, "centroid_x_mm": centre[0], "centroid_y_mm": centre[1],
               "centroid_z_mm": centre[2], "mean_probability": float(p.mean()), "max_probability": float(p.max())}
        if model_probs is not None:
            detected = [(m[box][inside] > threshold).any() for m in model_probs]
            row["agreement"] = float(np.mean(detected))
        if truth is not None:
            row["true_positive"] = bool(truth[box][inside].any())
        rows.append(row)
    table = pd.DataFrame(rows, columns=columns)
    table.insert(0, "lesion", np.arange(1, len(table) + 1))
    return table


def ensemble_lesions(
    model_probs: np.ndarray, affine: np.ndarray, connectivity: int, threshold: float,
    min_lesion_mm3: float, truth: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    """The ensemble's lesions, as ``rsanet-segment`` finds them.

    Args:
        model_probs: ``(M, X, Y, Z)`` float, each model's lesion probability on one grid.
        affine: that grid's voxel -> world (mm) affine.
        connectivity: 6, 18 or 26.
        threshold: lesion where the models' mean probability exceeds it.
        min_lesion_mm3: lesions of at most this volume (mm³) are removed.
        truth: ``(X, Y, Z)`` bool reference mask (optional; adds ``true_positive``).

    Returns:
        ``mask (X, Y, Z)`` bool, ``prob (X, Y, Z)`` float32 (the mean, accumulated in float64) and
        the :func:`lesion_table` with ``agreement``.
    """
    from .metrics import remove_small_components

    from .inference import ensemble_probability

    prob = ensemble_probability(model_probs)
    voxel_mm3 = float(abs(np.linalg.det(affine[:3, :3])))
    min_voxels = int(np.floor(min_lesion_mm3 / voxel_mm3)) + 1 if min_lesion_mm3 > 0 else 0
    mask = remove_small_components(prob > threshold, min_voxels, connectivity)
    table = lesion_table(mask, prob, affine, connectivity, model_probs=model_probs, threshold=threshold, truth=truth)
    return mask, prob, table


#: Agreement bins of :func:`precision_by_agreement`: ``(low, high, label)``, low <= a < high.
AGREEMENT_BINS = ((0.0, 0.4, "< 0.4"), (0.4, 0.8, "0.4 to < 0.8"), (0.8, 1.01, ">= 0.8"))


def precision_by_agreement(lesions: pd.DataFrame) -> pd.DataFrame:
    """Lesion-wise precision per agreement bin (:data:`AGREEMENT_BINS`) of a table with
    ``agreement`` and ``true_positive`` columns (one row per predicted lesion).

    Returns columns ``agreement`` (the bin), ``lesions``, ``true_positives``, ``precision_pct``
    (NaN for an empty bin).
    """
    rows = []
    for lo, hi, label in AGREEMENT_BINS:
        sel = lesions[(lesions.agreement >= lo) & (lesions.agreement < hi)]
        tp = int(sel.true_positive.sum())
        rows.append({"agreement": label, "lesions": len(sel), "true_positives": tp,
                     "precision_pct": 100.0 * tp / len(sel) if len(sel) else float("nan")})
    return pd.DataFrame(rows)


def lesion_calibrator(meta: dict) -> "LesionCalibrator | None":
    """The export's lesion calibrator (``export.json``'s ``lesion_calibration``), or ``None``."""
    from .calibration import LesionCalibrator

    cal = meta.get("lesion_calibration")
    return LesionCalibrator.from_dict(cal["calibrator"]) if cal and cal.get("calibrator") else None


def prepare_patient(meta: dict, t1: str, t2: str, flair: str, threads: int = 1, subject: str = "new patient",
                    seconds: dict[str, float] | None = None) -> tuple["Coregistered", "Preprocessed"]:
    """A new patient's inputs prepared exactly as the study prepared its subjects.

    Co-registration by :func:`rsanet.registration.coregister_contrasts` with the registration
    settings the export records (reference, engine, dof, search, pyramid), then
    :func:`rsanet.volumes.preprocess_subject` with the export's preprocessing settings: the same
    two functions the study's ``coregister`` and ``preprocess`` rules call. ``threads``: CPU
    threads of the registration (the job's threads). ``seconds``, if given, gets the wall time of
    ``"registration"`` and ``"preprocessing"`` (s).
    """
    from .registration import CoregistrationSettings, coregister_contrasts

    seconds = {} if seconds is None else seconds
    t0 = time.perf_counter()
    settings = CoregistrationSettings.from_config(meta["registration"])
    reg = coregister_contrasts({"T1": t1, "T2": t2, "FLAIR": flair}, settings, subject, threads=threads)
    seconds["registration"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    fixed = reg.images[reg.reference]
    empty = nib.Nifti1Image(np.zeros(fixed.shape[:3], np.uint8), fixed.affine)
    pre = preprocess_subject(reg.images["T1"], reg.images["T2"], reg.images["FLAIR"], empty,
                             margin=meta["preprocess"]["margin"])
    seconds["preprocessing"] = time.perf_counter() - t0
    return reg, pre


def segment(
    model_dir: str | os.PathLike, t1: str, t2: str, flair: str, out: str | os.PathLike, device: str = "auto",
    threshold: float | None = None, min_lesion_mm3: float = 3.0, tta: bool = False, threads: int = 1,
    subject: str = "new patient", spacing: str | None = None,
) -> dict:
    """Segment one patient; returns the summary written to ``out/summary.json``.

    The outputs lie on the grid of the study's registration reference (the FLAIR unless the study
    set ``registration.reference``), in the voxel order of that file. ``threads``: CPU threads
    for registration and prediction. ``threshold``: ``None`` = the study's (``predict.threshold``
    in the export). ``subject``: its name in error messages. ``spacing``: ``"study"`` = predict at
    the training cohort's voxel size, the probabilities mapped back; ``"own"`` = on the scan's
    grid; ``None`` = the export's ``predict.spacing``.

    Raises:
        InputError: a missing, 4D, empty or non-overlapping input (the message names the file).
        ExportError: an unusable export.
    """
    import torch

    from .devices import resolve_device

    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    folder = Path(model_dir)
    meta = read_export(folder)
    dev = resolve_device(device)
    if dev.type == "cpu":
        torch.set_num_threads(max(int(threads), 1))
    predictor = load_predictor(folder, meta, dev, mirror=tta, spacing=spacing)
    threshold = predictor.threshold if threshold is None else float(threshold)
    seconds["load_models"] = time.perf_counter() - t0

    reg, pre = prepare_patient(meta, t1, t2, flair, threads=threads, subject=subject, seconds=seconds)
    fixed = reg.images[reg.reference]

    t0 = time.perf_counter()
    log.info("predicting with %d models (%s)", len(predictor.models), predictor.policy.describe())
    per_model = predictor.per_model(pre.image, pre.spacing)  # (M, D, H, W), on the scan's grid
    spread = per_model.std(axis=0).astype(np.float32)  # the models' disagreement, voxel-wise
    seconds["prediction"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    sd_img = pre.uncrop(spread)  # on the reference file's own grid
    models_ref = np.stack([np.asarray(pre.uncrop(p).dataobj, dtype=np.float32) for p in per_model])
    connectivity = int(meta["evaluation"]["connectivity"])
    mask, prob_ref, table = ensemble_lesions(models_ref, fixed.affine, connectivity, threshold, min_lesion_mm3)
    calibrator = lesion_calibrator(meta)
    if calibrator is not None:
        table["probability_real"] = calibrator.probability(table)
    prob_img = nib.Nifti1Image(prob_ref, sd_img.affine, sd_img.header)
    mask_img = nib.Nifti1Image(mask.astype(np.uint8), prob_img.affine, prob_img.header)
    mask_img.set_data_dtype(np.uint8)
    warnings = []
    if not len(table):
        warnings.append("no lesion found")
    elif len(predictor.models) > 1 and table.agreement.mean() < 0.5:
        warnings.append(f"the models disagree: mean lesion agreement {table.agreement.mean():.2f} (below 0.5)")
    for contrast, res in reg.results.items():
        if res.engine != "none" and res.details.get("kept") == "header":
            warnings.append(f"{contrast}: the registration kept the header alignment (check the QC image)")
    for w in warnings:
        log.warning("%s", w)
    summary = {
        "lesion_count": int(len(table)), "total_lesion_volume_ml": float(table.volume_mm3.sum() / 1000.0),
        "mean_lesion_agreement": float(table.agreement.mean()) if len(table) else None,
        # the calibrated expectation of the number of real lesions (None without a calibrator)
        "expected_real_lesions": float(table.probability_real.sum()) if calibrator is not None else None,
        "model": {"variant": meta["variant"], "export": str(folder.resolve()), "n_models": len(predictor.models),
                  "model_card_sha256": _sha256(folder / "MODEL_CARD.md")},
        "inputs": {"t1": str(t1), "t2": str(t2), "flair": str(flair)},
        "settings": {"threshold": threshold, "min_lesion_mm3": min_lesion_mm3, "tta": tta,
                     "connectivity": connectivity, "policy": meta["predict"],
                     "registration": {**meta["registration"], "engine_ran": "+".join(
                         sorted({res.engine for res in reg.results.values()}))},
                     "reference": reg.reference,
                     "prediction_spacing_mm": list(predictor.spacing_mm) if predictor.spacing_mm else "own grid",
                     "scan_spacing_mm": [float(x) for x in pre.spacing]},
        "versions": _versions(), "device": str(dev), "warnings": warnings,
    }
    _write_outputs(Path(out), prob_img, sd_img, mask_img, table, summary, seconds, pre, t0)
    return summary


def _sha256(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def _versions() -> dict:
    from . import __version__
    from .files import library_versions

    return {"rsanet": __version__, **library_versions(("torch", "numpy", "nibabel", "SimpleITK"))}


def _write_outputs(out: Path, prob_img, sd_img, mask_img, table, summary, seconds, pre, t0) -> None:
    """Write the outputs (:data:`OUTPUTS`) into a temporary folder beside ``out``, then move it to
    ``out`` (:func:`rsanet.files.staged`): an error leaves nothing in ``out``."""
    from . import figures
    from .files import staged

    with staged([out], folders=True) as (tmp,):
        nib.save(prob_img, str(tmp / "lesion_prob.nii.gz"))
        nib.save(sd_img, str(tmp / "lesion_prob_sd.nii.gz"))
        nib.save(mask_img, str(tmp / "lesions.nii.gz"))
        labels = lesion_labels(np.asarray(mask_img.dataobj) > 0, summary["settings"]["connectivity"])
        labels_img = nib.Nifti1Image(labels, mask_img.affine, mask_img.header)
        labels_img.set_data_dtype(np.int32)
        nib.save(labels_img, str(tmp / "lesion_labels.nii.gz"))
        table.to_csv(tmp / "lesions.csv", index=False)
        (tmp / "lesions.json").write_text(json.dumps({c: LESION_COLUMNS[c] for c in table.columns}, indent=2) + "\n")
        from .volumes import ras_to_model

        flair_dhw = pre.image[2]
        mask_dhw = ras_to_model(mask_img)[0][tuple(slice(a, b) for a, b in pre.bbox)]
        figures.segmentation_qc(flair_dhw, mask_dhw, pre.spacing, summary, str(tmp / "qc"))
        (tmp / "qc.pdf").unlink(missing_ok=True)
        seconds["writing"] = time.perf_counter() - t0
        summary["seconds"] = {k: round(v, 2) for k, v in seconds.items()}
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rsanet-segment", description="Segment MS lesions of one patient with an "
                                "exported RSANet-study model (research use, not a medical device).")
    p.add_argument("--model", required=True, help="export folder (results/export/<variant>)")
    p.add_argument("--t1", required=True)
    p.add_argument("--t2", required=True)
    p.add_argument("--flair", required=True, help="outputs lie on this file's grid (on the T1's or T2's if the "
                   "study registered onto that contrast: registration.reference)")
    p.add_argument("--out", required=True, help="output folder (replaced if it exists)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--threshold", type=float, default=None,
                   help="lesion where the ensemble's probability exceeds it (default: the study's predict.threshold)")
    p.add_argument("--min-lesion-mm3", type=float, default=3.0)
    p.add_argument("--tta", action="store_true", help="also average mirrored copies along each axis")
    p.add_argument("--threads", type=int, default=1, help="CPU threads for registration and prediction")
    p.add_argument("--spacing", choices=["study", "own"], default=None, help="predict at the study's voxel size "
                   "(mapped back onto the scan's grid) or on the scan's own grid (default: the export's predict.spacing)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Console script ``rsanet-segment``: exit code 0 on success, 2 on bad input or an unusable export."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        summary = segment(args.model, args.t1, args.t2, args.flair, args.out, device=args.device,
                          threshold=args.threshold, min_lesion_mm3=args.min_lesion_mm3, tta=args.tta,
                          threads=args.threads, spacing=args.spacing)
    except (InputError, ExportError) as err:
        print(f"rsanet-segment: error: {err}", file=sys.stderr)
        return 2
    print(f"rsanet-segment: {summary['lesion_count']} lesions, {summary['total_lesion_volume_ml']:.2f} ml -> {args.out}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
