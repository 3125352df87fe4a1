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

