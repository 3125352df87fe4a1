"""The export of a study's models for new patients: written by the workflow's ``export`` rule,
read by ``rsanet-segment``.

An export (``results/export/<variant>/``) holds the weights of one variant's models from every
split, ``export.json`` (the registration, preprocessing, inference and evaluation settings the
models were trained and scored with, versions, the training cohort's size and sheet hash, the
variant's Table 1 and Table 2 rows) and ``MODEL_CARD.md``. This module is the one place that
knows the layout: :func:`export_step` writes it, :func:`read_export` and :func:`load_predictor` read it.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Mapping, Sequence

import pandas as pd

if TYPE_CHECKING:
    from .inference import Predictor

from .volumes import save_json

log = logging.getLogger(__name__)

#: Version of the export layout; an export of another version is refused with a clear message.
EXPORT_FORMAT = 1


class ExportError(ValueError):
    """An export folder that cannot be used (missing, corrupted, or from an incompatible version)."""


def read_export(model_dir: str | os.PathLike) -> dict:
    """``export.json`` of an export folder, checked: format version, and every model file present."""
    folder = Path(model_dir)
    meta_path = folder / "export.json"
    if not meta_path.is_file():
        raise ExportError(f"{folder}: no export.json: not a model exported by `snakemake export`")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ExportError(f"{meta_path}: unreadable ({err}); re-export the model") from err
    if meta.get("format") != EXPORT_FORMAT:
        raise ExportError(f"{meta_path}: export format {meta.get('format')!r}, this rsanet reads format "
                          f"{EXPORT_FORMAT}; export the model again with this version, or install the rsanet "
                          f"version it was made with ({meta.get('rsanet_version')})")
    for name in meta.get("models", []):
        if not (folder / name).is_file():
            raise ExportError(f"{folder / name}: listed in export.json but missing; copy the whole export folder")
    if not meta.get("models"):
        raise ExportError(f"{meta_path}: lists no model")
    return meta


def load_predictor(folder: Path, meta: dict, device, mirror: bool = False, spacing: str | None = None) -> "Predictor":
    """The export's networks (in the order ``export.json`` lists them) as one
    :class:`rsanet.inference.Predictor`: the study's prediction policy and threshold (its
    ``predict:`` section, recorded in the export), on ``device``; ``mirror``: test-time mirroring;
    ``spacing``: ``"study"`` (predict at the training cohort's spacing) or ``"own"`` (each scan's
    grid); ``None``: the export's ``predict.spacing``."""
    from .inference import Predictor

    for key in ("threshold",) if spacing else ("threshold", "spacing"):
        if key not in meta["predict"]:
            raise ExportError(f"{folder / 'export.json'}: no predict.{key} (an export of an older version): export "
                              "the model again")
    spacing = meta["predict"]["spacing"] if spacing is None else spacing
    target = meta["training_data"].get("spacing_mm") if spacing == "study" else None
    if spacing == "study" and not target:
        raise ExportError(f"{folder / 'export.json'}: predict.spacing study, but no training_data.spacing_mm: export "
                          "the model again")
    try:
        return Predictor.from_model_files([folder / name for name in meta["models"]], meta["predict"], device,
                                          mirror=mirror, spacing_mm=target)
    except (RuntimeError, KeyError, ValueError) as err:
        raise ExportError(f"{folder}: a network cannot be loaded ({type(err).__name__}: {err}); the file is "
                          "corrupted or from an incompatible version: export the model again") from err


def study_spacing(preprocessed: Sequence[str]) -> list[float] | None:
    """The median ``(dz, dy, dx)`` mm voxel size of the study's preprocessed subjects (``None``
    without any)."""
    import numpy as np

    from .volumes import Preprocessed

    if not preprocessed:
        return None
    spacings = np.array([Preprocessed.load_lesions(p)[1] for p in preprocessed])
    return [float(s) for s in np.median(spacings, axis=0)]


def run_key(path: str | os.PathLike) -> tuple[int, int]:
    """``(split, seed)`` of a training's path: ``.../split<k>/seed<s>`` (a prediction folder) or
    ``.../split<k>/seed<s>/model.pt``."""
    import re

    parts = [p for p in Path(path).parts if re.fullmatch(r"(split|seed)\d+", p)]
    split, seed = (int(re.sub(r"\D", "", p)) for p in parts[-2:])
    return split, seed


def ensemble_runs(runs: Iterable[tuple[int, int]], kind: str | None) -> list[tuple[int, int]]:
    """The ``(split, seed)`` runs of an ensemble kind (:data:`rsanet.stages.export.ENSEMBLE_KINDS`),
    ascending: ``"split"``: the first seed of every split; ``"seed"``: every seed of the first split
    with two or more (none if no split has two); ``None``: all of them."""
    by_split: dict[int, list[tuple[int, int]]] = {}
    for run in sorted(runs):
        by_split.setdefault(run[0], []).append(run)
    if kind == "split":
        return [group[0] for group in by_split.values()]
    if kind == "seed":
        return next((group for group in by_split.values() if len(group) >= 2), [])
    return [run for group in by_split.values() for run in group]


def ensemble_models(paths: Sequence[str], kind: str | None) -> list[str]:
    """The model files (``.../split<k>/seed<s>/model.pt``) of an ensemble kind (:func:`ensemble_runs`)."""
    by_run = {run_key(p): p for p in paths}
    return [by_run[run] for run in ensemble_runs(by_run, kind)]


def best_variant(health: pd.DataFrame) -> tuple[str, str]:
    """The variant to export under ``export.variant: best``, chosen without the test subjects: the
    highest mean final health-check score over the variant's trainings (hard Dice of the splits'
    validation patches; training batches where a split has no validation part).

    ``health``: one row per training with ``variant``, ``score`` (0-1) and ``source`` columns
    (:func:`rsanet.evaluation.read_health`). Returns ``(variant, how it was chosen)``; ties go to the
    variant met first."""
    means = health.groupby("variant", sort=False).score.mean()
    sources = " and ".join(sorted(set(health.source)))
    return str(means.idxmax()), f"highest mean health-check Dice of the {sources} (not the test subjects)"


def export_step(
    choice: str, table1_csv: str, table2_csv: str, models: Mapping[str, Sequence[str]], config: Mapping,
    subjects: Sequence[str], out_dir: str, health: Sequence[str] = (), confidence: Mapping[str, str] | None = None,
    registration_records: Sequence[str] = (), preprocessed: Sequence[str] = (),
    calibration: Mapping[str, str] | None = None,
) -> str:
    """Write ``out_dir/<variant>/``: that variant's models of every split, ``export.json`` and
    ``MODEL_CARD.md``. ``choice``: a variant id or ``"best"`` (:func:`best_variant` over the
    trainings' ``health`` JSON files: chosen on validation subjects, never on the test subjects
    that Table 1 scores). ``confidence``: variant -> its precision-by-agreement CSV
    (:func:`rsanet.stages.export.lesion_confidence_step`), shown in the card. ``registration_records``: the
    study's ``registration.json`` files: the engine that ran goes into export.json
    (``registration.engine_ran``) and the card's deviations. ``preprocessed``: the study's
    preprocessed subjects (``.npz``): their median voxel size is the study's spacing
    (``training_data.spacing_mm``, ``(dz, dy, dx)`` mm; ``predict.spacing``). ``calibration``:
    variant -> its lesion-calibration record (:func:`rsanet.stages.export.lesion_calibration_step`):
    the export holds the ensemble kind chosen there (:func:`ensemble_models`) and its calibrator,
    which gives every lesion of ``rsanet-segment`` its ``probability_real``; without a calibrated
    kind, every model of the variant and no calibrator. Returns the variant exported."""
    import hashlib
    import shutil

    from . import __version__, evaluation
    from .paper import deviations
    from .registration import engines_that_ran

    engines = engines_that_ran(registration_records)

    t1 = pd.read_csv(table1_csv).set_index("variant")
    t2 = pd.read_csv(table2_csv).set_index("variant")
    if choice == "best":
        if not health:
            raise ValueError("export.variant best needs the trainings' health.json files")
        variant, chosen_by = best_variant(evaluation.read_health(health))
    else:
        variant, chosen_by = choice, "export.variant"
    if variant not in models:
        raise ValueError(f"export.variant {choice!r}: no trained models of {variant!r} (variants: {', '.join(models)})")
    record = json.loads(Path(calibration[variant]).read_text()) if calibration and variant in calibration else None
    kind = record["chosen"] if record else None
    out = Path(out_dir) / variant
    out.mkdir(parents=True, exist_ok=True)
    names = []
    for path in ensemble_models(models[variant], kind):
        p = Path(path)  # results/models/<variant>/split<k>/seed<s>/model.pt
        name = f"model_{p.parent.parent.name}_{p.parent.name}.pt"
        shutil.copyfile(p, out / name)
        names.append(name)
    sheet = config["subjects"]
    if not isinstance(sheet, str) or sheet == "demo":  # the demo cohort or a BIDS dataset
        sheet_hash = hashlib.sha256("\n".join(sorted(subjects)).encode()).hexdigest()
    else:
        sheet_hash = hashlib.sha256(Path(sheet).read_bytes()).hexdigest()
    row1 = {k: float(v) for k, v in t1.loc[variant].items() if k.endswith(("_mean", "_sd"))}
    row2 = {k: float(v) for k, v in t2.loc[variant].items() if k.endswith(("_mean", "_sd"))}
    meta = {
        "format": EXPORT_FORMAT, "rsanet_version": __version__, "variant": variant,
        "chosen_by": chosen_by,
        "models": names, "registration": {**config["registration"], "engine_ran": "+".join(engines) or None},
        "preprocess": dict(config["preprocess"]),
        "predict": dict(config["predict"]), "train": dict(config["train"]), "evaluation": dict(config["evaluation"]),
        "training_data": {"subjects": sheet, "n_subjects": len(subjects), "subject_ids_or_sheet_sha256": sheet_hash,
                          "splits": dict(config["splits"]), "spacing_mm": study_spacing(preprocessed)},
        "table1": row1, "table2": row2,
    }
    if confidence and variant in confidence:
        meta["lesion_confidence"] = pd.read_csv(confidence[variant]).to_dict(orient="records")
    if kind:
        meta["lesion_calibration"] = {
            "ensemble": kind, "chosen_by": record["chosen_by"], "features": record["features"],
            "calibrator": record["kinds"][kind]["calibrator"], "threshold": record["threshold"],
            "measured": {k: {"models_per_subject": e["models_per_subject"], "calibration": e["calibration"],
                             "test": e["test"]} for k, e in record["kinds"].items()}}
    save_json(meta, out / "export.json")
    dev = deviations(config, engines)
    card = _model_card(meta, dev[dev.status != "as in the paper"], evaluation)
    evaluation.write_text(card, out / "MODEL_CARD.md")
    log.info("exported %s (%d models) to %s", variant, len(names), out)
    return variant


def _model_card(meta: Mapping, dev: pd.DataFrame, evaluation) -> str:
    t1, t2, tr = meta["table1"], meta["table2"], meta["training_data"]
    def fmt(m: str) -> str:
        return f"{t1[m + '_mean']:.2f} ± {t1[m + '_sd']:.2f}" if m + "_mean" in t1 else "n/a"

    lines = [
        f"# Model card: RSANet study, {meta['variant']}", "",
        "## Intended use",
        "Research on multiple sclerosis lesion segmentation from co-registered T1, T2 and FLAIR MRI. **Not a medical "
        "device**: not for diagnosis or treatment decisions. Apply with `rsanet-segment --model <this folder> ...`.", "",
        "## Model",
        f"{meta['variant']} of the paper's Table 1 (Zhang et al., MICCAI 2019), an ensemble of {len(meta['models'])} "
        f"networks (one per random split and seed), widths {meta['train']['widths']}, trained on {meta['train']['crop']} "
        f"crops for {meta['train']['iterations']} iterations; chosen by: {meta['chosen_by']}. Inference: "
        f"{meta['predict']}; the lesion probabilities of the networks are averaged. " + _spacing_sentence(meta), "",
        "## Training data",
        f"Cohort: `{tr['subjects']}` ({tr['n_subjects']} subjects; {'the synthetic demo cohort built from 30 real lesion masks, CC-BY' if tr['subjects'] == 'demo' else 'the user sheet'}); "
        f"sha256 of the subject ids / sheet: `{tr['subject_ids_or_sheet_sha256']}`; splits {tr['splits']}.", "",
        "## Evaluation (the study's own test splits)",
        f"Table 1 (percent, mean ± sd over splits): sample Dice {fmt('sample_dice')}, voxel Dice {fmt('voxel_dice')}, "
        f"sample IoU {fmt('sample_iou')}, voxel IoU {fmt('voxel_iou')}.",
        "Lesion-wise (" + f"{meta['evaluation']['detection_rule']} rules, {meta['evaluation']['connectivity']}-connectivity, "
        f"> {meta['evaluation']['min_lesion_mm3']} mm³): " + ", ".join(
            f"{m} {t2[m + '_mean']:.2f} ± {t2[m + '_sd']:.2f}" for m in ("ltpr", "lfpr", "lesion_f1", "hd95_mm")
            if m + "_mean" in t2) + " (percent; HD95 in mm).", "",
        "## Per-lesion confidence",
        *_confidence_section(meta, evaluation), "",
        *_calibration_section(meta, evaluation), "",
        "## Deviations from the paper",
        evaluation.to_markdown(dev[["setting", "paper", "this_run", "status"]]) if len(dev) else "none", "",
        "## Limitations",
        "- Trained on the cohort above only; scanners, resolutions and populations unlike it (and the synthetic demo "
        "cohort above all) can give much worse results: check the QC figure of every patient.",
        "- Inputs must be skull-stripped like the training data; the other contrasts are registered (linearly) onto "
        f"the {meta['registration']['reference']}, as in the study.",
        "- Every training's health verdict is in the study's results/tables/training_health.md; a Table 1 with "
        "failed trainings measures those failures, not the variants.",
        f"- Exported by rsanet {meta['rsanet_version']}; the export format is {meta['format']}.", "",
    ]
    return "\n".join(lines)


def _spacing_sentence(meta: Mapping) -> str:
    """The card's statement of where a new patient is predicted (``predict.spacing``)."""
    target = meta["training_data"].get("spacing_mm")
    if meta["predict"].get("spacing") == "study" and target:
        return ("A new patient is predicted at the training cohort's voxel size, " + " x ".join(f"{s:g}" for s in target)
                + " mm (dz, dy, dx: the median of its subjects), and the probabilities mapped back onto the patient's "
                "own grid (`predict.spacing: study`; `rsanet-segment --spacing own` predicts on the patient's grid).")
    return "A new patient is predicted on its own grid (`predict.spacing: own`)."


def _confidence_section(meta: Mapping, evaluation) -> list[str]:
    """The model card's lines on what ``agreement`` in rsanet-segment's ``lesions.csv`` is worth."""
    head = ("`rsanet-segment` gives every lesion its `agreement`: the fraction of these models that detect it "
            "on their own. ")
    rows = meta.get("lesion_confidence")
    if not rows or rows[0].get("subjects", 0) == 0:
        return [head + "Not measured for this export: no subject of the study lay in the test part of two or more "
                "splits."]
    table = pd.DataFrame(rows)
    r = rows[0]
    return [
        head + f"Measured in the study, on subjects the models never trained on: each of {r['subjects']} subjects "
        f"segmented by the ensemble of the models ({r['models_per_subject']}) of the splits in whose test part it "
        "lies, as rsanet-segment does (no test-time mirroring); a lesion is a true positive when it overlaps a true "
        "lesion (results/tables/lesion_confidence/). Lesion-wise precision by agreement:", "",
        evaluation.to_markdown(table[["agreement", "lesions", "true_positives", "precision_pct"]].round(1)),
    ]


def _calibration_section(meta: Mapping, evaluation) -> list[str]:
    """The model card's lines on ``probability_real`` (the calibrated lesion confidence)."""
    cal = meta.get("lesion_calibration")
    if not cal:
        return ["No calibrated lesion probability: the study had no validation subjects with both real and false "
                "lesions to fit it on (`splits.n_val`); `probability_real` is absent from `lesions.csv`."]
    rows = []
    for kind, m in cal["measured"].items():
        c, t = m["calibration"], m["test"]
        rows.append({"ensemble": kind + (" (exported)" if kind == cal["ensemble"] else ""),
                     "models per subject": m["models_per_subject"],
                     "validation subjects / lesions": f"{c['subjects']} / {c['lesions']}",
                     "CV Brier (validation)": c.get("cv_brier"),
                     "test subjects / lesions": f"{t['subjects']} / {t['lesions']}",
                     "real (%)": t.get("real_pct"), "ECE calibrated": t.get("ece"),
                     "ECE raw agreement": t.get("ece_agreement"), "Brier (test)": t.get("brier")})
    chosen = cal["measured"][cal["ensemble"]]["test"]
    lines = [
        "`lesions.csv`'s `probability_real`: the probability that the lesion is real (overlaps a lesion an expert "
        f"would mark), a logistic map of its {', '.join(cal['features'])} fitted on the lesions of the study's "
        "validation subjects only. Measured on the study's test subjects (those in no validation part) for a split "
        "ensemble (one model per split that held the subject out) and a seed ensemble (the seeds of one split); "
        f"exported: the **{cal['ensemble']} ensemble** ({len(meta['models'])} networks); chosen by "
        f"{cal['chosen_by']}. "
        "ECE: expected calibration error over ten probability bins (0 = calibrated):", "",
        evaluation.to_markdown(pd.DataFrame(rows).round(3)), "",
    ]
    if chosen.get("reliability"):
        table = pd.DataFrame(chosen["reliability"]).round(3)
        lines += [f"Reliability of the exported {cal['ensemble']} ensemble on the test subjects:", "",
                  evaluation.to_markdown(table), ""]
    lines.append("Calibrated on the study's own cohort: on scans unlike it (other scanners, resolutions, populations) "
                 "the probabilities can be far too high; check them against a few expert masks of your own first.")
    return lines
