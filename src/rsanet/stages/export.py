"""After the study (workflow/rules/export.smk): precision by agreement of the split ensembles, the cohort
of new subjects and the external test. The export itself: :func:`rsanet.export.export_step`.

Each step reads its files, calls the package's pure code and writes its outputs through
:func:`rsanet.files.staged`; a script of ``scripts/`` calls one of them.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

import nibabel as nib
import numpy as np

# Heavy libraries (torch, matplotlib, SimpleITK, pandas) are imported inside the steps that need
# them, so light steps start in a fraction of a second (pandas: 0.15-0.26 s for each of the demo's
# 164 synthesis, registration, preprocessing and training jobs, which do not use it).
from ..metrics import EvaluationSettings, evaluate_case
from ..volumes import (
    Preprocessed,
    binarise_mask,
    load_checked,
    load_probability_u8,
    require_same_grid,
)

if TYPE_CHECKING:
    import pandas as pd



log = logging.getLogger(__name__)


def lesion_confidence_step(
    variant: str, splits_json: str, predictions: Mapping[tuple[int, int], str], preprocessed: Mapping[str, str],
    segment_options: Mapping, threshold: float, connectivity: int, out_lesions: str, out_table: str,
) -> pd.DataFrame:
    """Is the ensemble's per-lesion agreement informative? Lesion-wise precision by agreement,
    measured on subjects the models never trained on.

    Each subject is segmented as ``rsanet-segment`` would (:func:`rsanet.segment.ensemble_lesions`,
    the study's ``threshold`` (``predict.threshold``), ``segment_options``' ``min_lesion_mm3``, no
    test-time mirroring) by the ensemble
    of the models (``predictions``: ``(split, seed)`` -> prediction folder of ``variant``) of the
    splits in whose *test* part it lies; subjects with fewer than two such models are left out. A
    predicted lesion is a true positive when it overlaps a true lesion. Writes every lesion to
    ``out_lesions`` (CSV) and :func:`rsanet.segment.precision_by_agreement` to ``out_table`` (CSV,
    with the variant and the counts of subjects and models); returns the latter.
    """
    import pandas as pd
    from .. import evaluation
    from ..segment import ensemble_lesions, precision_by_agreement

    splits = {int(k): part["test"] for k, part in enumerate(json.loads(Path(splits_json).read_text())["splits"])}
    tables, n_models = [], []
    for subject in sorted({s for names in splits.values() for s in names}):
        folders = [d for (split, _), d in sorted(predictions.items()) if subject in splits[split]]
        if len(folders) < 2:
            continue
        truth, spacing = Preprocessed.load_lesions(preprocessed[subject])
        probs = np.stack([load_probability_u8(Path(d) / f"{subject}_prob_u8.npz") for d in folders])
        _, _, table = ensemble_lesions(probs, np.diag([*spacing, 1.0]), connectivity,
                                       float(threshold), float(segment_options["min_lesion_mm3"]),
                                       truth=truth > 0)
        table.insert(0, "subject", subject)
        table.insert(1, "n_models", len(folders))
        tables.append(table)
        n_models.append(len(folders))
        log.info("%s: %s, %d models, %d lesions, %d true", variant, subject, len(folders), len(table),
                 int(table.true_positive.sum()))
    columns = ["subject", "n_models", "lesion", "volume_mm3", "agreement", "true_positive"]
    lesions = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=columns)
    summary = precision_by_agreement(lesions)
    summary.insert(0, "variant", variant)
    summary["subjects"] = len(tables)
    summary["models_per_subject"] = f"{min(n_models)}-{max(n_models)}" if n_models else "none"
    evaluation.write_csv(lesions, out_lesions)
    evaluation.write_csv(summary, out_table)
    if not tables:
        log.warning("%s: no subject lies in the test part of two or more splits; precision by agreement not measured",
                    variant)
    return summary


#: How the lesion-confidence calibration may ensemble a subject's models (docs/inference.md,
#: "Calibrated lesion confidence"): ``split``: the first seed of every split that held the subject
#: out; ``seed``: every seed of the first split that held it out (needs ``train.seeds`` >= 2).
ENSEMBLE_KINDS = ("split", "seed")


def ensemble_members(held_out: Sequence[int], folders: Mapping[tuple[int, int], str], kind: str) -> list[str]:
    """The prediction folders of one subject's ensemble of ``kind`` (:data:`ENSEMBLE_KINDS`).

    ``held_out``: the splits whose models never fitted the subject (it lies in their validation or
    test part), ascending; ``folders``: ``(split, seed)`` -> the folder holding that model's
    prediction of the subject. An ensemble of fewer than two models is empty (``[]``)."""
    from ..export import ensemble_runs

    members = [folders[run] for run in ensemble_runs([run for run in folders if run[0] in held_out], kind)]
    return members if len(members) >= 2 else []


def lesion_calibration_step(
    variant: str, splits_json: str, test_predictions: Mapping[tuple[int, int], str],
    val_predictions: Mapping[tuple[int, int], str], preprocessed: Mapping[str, str], segment_options: Mapping,
    threshold: float, connectivity: int, out_json: str, out_lesions: str, out_reliability: str, out_figure: str,
) -> dict:
    """Calibrate the per-lesion probability of being real on validation subjects; measure it on
    test subjects; compare a split ensemble with a seed ensemble of ``variant``.

    Subjects fall into two disjoint groups: *calibration* subjects (in some split's validation
    part) and *test* subjects (in some split's test part and in no validation part). Each subject
    is segmented as ``rsanet-segment`` would (:func:`rsanet.segment.ensemble_lesions`, the study's
    ``threshold``, ``segment_options``' ``min_lesion_mm3``) by each kind of ensemble
    (:func:`ensemble_members`) of models that never fitted it (``val_predictions`` and
    ``test_predictions``: ``(split, seed)`` -> prediction folder); only subjects every kind can
    segment are used, so the kinds are compared on the same subjects. A lesion is real when it
    overlaps a true lesion.

    Per kind: a :class:`rsanet.calibration.LesionCalibrator` fitted on all calibration lesions, its
    out-of-fold Brier score and ECE on them (folds by subject), and on the test lesions its ECE,
    Brier score and reliability table, beside the ECE of the raw agreement read as a probability.
    The kind to export is the one with the lower cross-validated Brier score: chosen on the
    validation subjects, never on the test subjects. Writes the whole record (``out_json``), every
    lesion (``out_lesions``), the test reliability tables (``out_reliability``) and their figure
    (``out_figure``, a stem); returns the record.
    """
    import pandas as pd
    from .. import calibration as cal
    from .. import evaluation, figures
    from ..segment import ensemble_lesions

    parts = json.loads(Path(splits_json).read_text())["splits"]
    calibration_subjects = sorted({s for part in parts for s in part.get("val", [])})
    test_subjects = sorted({s for part in parts for s in part["test"]} - set(calibration_subjects))
    n_seeds = max((sum(1 for (k2, _) in test_predictions if k2 == k) for k in range(len(parts))), default=0)
    kinds = [k for k in ENSEMBLE_KINDS if k == "split" or n_seeds >= 2]

    def folders_for(subject: str) -> tuple[list[int], dict[tuple[int, int], str]]:
        held, folders = [], {}
        for k, part in enumerate(parts):
            source = val_predictions if subject in part.get("val", []) else (
                test_predictions if subject in part["test"] else None)
            if source is None:
                continue
            runs = {key: d for key, d in source.items() if key[0] == k}
            if runs:
                held.append(k)
                folders.update(runs)
        return held, folders

    tables = []
    for role, subjects in (("calibration", calibration_subjects), ("test", test_subjects)):
        for subject in subjects:
            held, folders = folders_for(subject)
            members = {kind: ensemble_members(held, folders, kind) for kind in kinds}
            if not all(members.values()):
                continue
            truth, spacing = Preprocessed.load_lesions(preprocessed[subject])
            for kind, chosen in members.items():
                probs = np.stack([load_probability_u8(Path(d) / f"{subject}_prob_u8.npz") for d in chosen])
                _, _, table = ensemble_lesions(probs, np.diag([*spacing, 1.0]), connectivity, float(threshold),
                                               float(segment_options["min_lesion_mm3"]), truth=truth > 0)
                for i, (name, value) in enumerate((("subject", subject), ("role", role), ("ensemble", kind),
                                                   ("n_models", len(chosen)))):
                    table.insert(i, name, value)
                tables.append(table)
            log.info("%s: %s (%s), %s", variant, subject, role, ", ".join(f"{k}: {len(m)} models" for k, m in
                                                                         members.items()))
    columns = ["subject", "role", "ensemble", "n_models", "lesion", "volume_mm3", "agreement", "mean_probability",
               "true_positive"]
    lesions = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=columns)
    lesions["true_positive"] = lesions.true_positive.astype(bool)

    record: dict = {"variant": variant, "features": list(cal.FEATURES), "threshold": float(threshold),
                    "calibration_subjects": calibration_subjects, "test_subjects": test_subjects, "kinds": {},
                    "chosen": None, "chosen_by": None}
    reliability = []
    lesions["probability_real"] = np.nan
    for kind in kinds:
        sel = lesions.ensemble == kind
        fit, test = lesions[sel & (lesions.role == "calibration")], lesions[sel & (lesions.role == "test")]
        entry: dict = {
            "models_per_subject": (f"{int(lesions[sel].n_models.min())}-{int(lesions[sel].n_models.max())}"
                                   if sel.any() else "none"),
            "calibration": {"subjects": int(fit.subject.nunique()), "lesions": len(fit),
                            "real_pct": 100.0 * float(fit.true_positive.mean()) if len(fit) else None},
            "test": {"subjects": int(test.subject.nunique()), "lesions": len(test),
                     "real_pct": 100.0 * float(test.true_positive.mean()) if len(test) else None},
            "calibrator": None,
        }
        if fit.subject.nunique() >= 2 and fit.true_positive.nunique() == 2:
            oof = cal.cross_validated_probability(fit, fit.subject.to_numpy())
            entry["calibration"].update(cv_brier=cal.brier_score(oof, fit.true_positive),
                                        cv_ece=cal.expected_calibration_error(oof, fit.true_positive))
            model = cal.fit_calibrator(fit, n_subjects=int(fit.subject.nunique()))
            entry["calibrator"] = model.to_dict()
            lesions.loc[sel, "probability_real"] = model.probability(lesions[sel])
            if len(test):
                p = model.probability(test)
                entry["test"].update(ece=cal.expected_calibration_error(p, test.true_positive),
                                     brier=cal.brier_score(p, test.true_positive),
                                     ece_agreement=cal.expected_calibration_error(test.agreement, test.true_positive))
                for score, values in (("calibrated", p), ("agreement", test.agreement.to_numpy(float))):
                    t = cal.reliability_table(values, test.true_positive.to_numpy(float))
                    if score == "calibrated":
                        entry["test"]["reliability"] = t.to_dict(orient="records")
                    t.insert(0, "score", score)
                    t.insert(0, "ensemble", kind)
                    reliability.append(t)
        record["kinds"][kind] = entry
    fitted = {k: e for k, e in record["kinds"].items() if e["calibrator"] is not None}
    if fitted:
        record["chosen"] = min(fitted, key=lambda k: (fitted[k]["calibration"]["cv_brier"], ENSEMBLE_KINDS.index(k)))
        record["chosen_by"] = ("the lower cross-validated Brier score on the validation subjects' lesions (folds by "
                               "subject; not the test subjects)" if len(fitted) > 1 else
                               "the only kind calibrated: this variant trained one seed per split, so there is no "
                               "seed ensemble to compare (train.seeds_by_variant)")
        log.info("%s: the %s ensemble, chosen by %s", variant, record["chosen"], record["chosen_by"])
    else:
        log.warning("%s: no calibration: fewer than two validation subjects with true and false lesions "
                    "(splits.n_val: 0, or too few lesions)", variant)
    reliability = (pd.concat(reliability, ignore_index=True) if reliability else
                   pd.DataFrame(columns=["ensemble", "score", "bin", "lesions", "mean_predicted", "observed"]))
    evaluation.write_csv(lesions, out_lesions)
    evaluation.write_csv(reliability, out_reliability)
    figures.reliability_diagram(reliability, record, out_figure)
    evaluation.write_text(json.dumps(record, indent=2) + "\n", out_json)
    return record


def cohort_step(folders: Sequence[str], size_bins_mm3: Sequence[float], out_csv: str, out_png: str,
                out_json: str) -> None:
    """Segmented subjects (``results/segment/<subject>/``) -> one cohort table, its column
    sidecar (``out_json``: description and unit of each column) and its figure."""
    import pandas as pd
    from .. import evaluation, figures

    summaries = {Path(f).name: json.loads((Path(f) / "summary.json").read_text()) for f in folders}
    lesions = {Path(f).name: pd.read_csv(Path(f) / "lesions.csv") for f in folders}
    table = evaluation.cohort_table(summaries, lesions, size_bins_mm3)
    evaluation.write_csv(table, out_csv)
    evaluation.write_text(json.dumps(evaluation.cohort_columns(table), indent=2) + "\n", out_json)
    figures.cohort_load(table, str(Path(out_png).with_suffix("")))
    flagged = table[table.warnings != ""] if len(table) else table
    log.info("cohort of %d subjects: %d lesions, %.1f ml in all; %d with warnings", len(table),
             int(table.lesion_count.sum()) if len(table) else 0, float(table.total_volume_mm3.sum()) / 1000.0 if len(table) else 0.0,
             len(flagged))
    for row in flagged.itertuples(index=False):
        log.warning("%s: %s", row.subject, row.warnings)


def external_test_step(masks: Mapping[str, str], segmented: Sequence[str], evaluation: Mapping, out_csv: str,
                       out_md: str) -> None:
    """Score new subjects' ``lesions.nii.gz`` (results/segment/<subject>/) against their masks."""
    import pandas as pd
    from .. import evaluation as ev
    from ..volumes import voxel_sizes_mm

    settings = EvaluationSettings.from_config(evaluation)
    rows = []
    for folder in segmented:
        subject = Path(folder).name
        if subject not in masks:
            continue
        pred = nib.load(str(Path(folder) / "lesions.nii.gz"))
        truth = load_checked(masks[subject], subject, "lesion mask", allow_empty=True)
        require_same_grid(truth, pred, subject, "lesion mask", masks[subject], Path(folder) / "lesions.nii.gz")
        t = binarise_mask(np.asarray(truth.dataobj), subject, masks[subject]) > 0
        scores = evaluate_case(np.asarray(pred.dataobj) > 0, t, tuple(voxel_sizes_mm(pred)), settings)
        variant = json.loads((Path(folder) / "summary.json").read_text())["model"]["variant"]
        rows.append({"subject": subject, "variant": variant, **scores})
    table = pd.DataFrame(rows)
    ev.write_csv(table, out_csv)
    cols = ["subject", "variant", "dice", "iou", "hd95_mm", "assd_mm", "ltpr", "lfpr", "lesion_f1", "n_true_lesions",
            "n_pred_lesions", "volume_true_ml", "volume_pred_ml"]
    shown = table[cols].copy()
    for c in ("dice", "iou", "ltpr", "lfpr", "lesion_f1"):
        shown[c] = (100 * shown[c]).round(1)
    ev.write_text(ev.to_markdown(shown) + "\nDice, IoU, LTPR, LFPR, F1 in percent; distances in mm; volumes in ml.\n",
                  out_md)
    log.info("external test set: %d subjects, mean Dice %.3f", len(table), table.dice.mean() if len(table) else float("nan"))

