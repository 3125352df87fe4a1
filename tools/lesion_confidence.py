"""Is the ensemble's per-lesion agreement informative? Lesion-wise precision by agreement.

    python tools/lesion_confidence.py --results results --variant unet3d --out docs/tuning/lesion_confidence.md

``rsanet-segment`` reports, per lesion, the fraction of the export's models that detect it on
their own (``agreement`` in ``lesions.csv``). This measures what that number is worth, on
subjects the models never trained on: each demo subject is predicted by the models of the splits
in whose *test* part it lies (seed 0; 2-5 models, subjects with fewer are left out), with the
study's prediction policy; the models' mean probability > 0.5, lesions of at most 3 mm³ removed
(rsanet-segment's defaults), gives the lesions, and :func:`rsanet.segment.lesion_table` their
agreement. A predicted lesion is a true positive when it overlaps a true lesion. Printed and
written: precision per agreement bin, and the lesions' count.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy import ndimage

from rsanet.evaluation import to_markdown
from rsanet.inference import PredictionPolicy
from rsanet.metrics import _structure, remove_small_components
from rsanet.segment import lesion_table
from rsanet.training import load_model
from rsanet.volumes import Preprocessed

BINS = [(0.0, 0.4, "< 0.4"), (0.4, 0.8, "0.4 to < 0.8"), (0.8, 1.01, ">= 0.8")]


def subject_lesions(models: list, policy: PredictionPolicy, pre: Preprocessed, min_mm3: float = 3.0) -> pd.DataFrame:
    """The ensemble's lesions of one subject with their agreement and whether each is true."""
    per_model = np.stack([policy.predict(m, pre.image) for m in models])  # (M, D, H, W)
    prob = per_model.mean(axis=0)
    voxel_mm3 = float(np.prod(pre.spacing))
    mask = remove_small_components(prob > 0.5, int(np.floor(min_mm3 / voxel_mm3)) + 1, 6)
    table = lesion_table(mask, prob, np.diag([*pre.spacing, 1.0]), 6, model_probs=per_model, threshold=0.5)
    labels, _ = ndimage.label(mask, structure=_structure(3, 6))
    truth = pre.lesions > 0
    # lesion_table numbers lesions by decreasing volume; match them back through their voxel counts
    sizes = ndimage.sum_labels(np.ones_like(labels), labels, index=np.arange(1, labels.max() + 1))
    hits = ndimage.maximum(truth, labels, index=np.arange(1, labels.max() + 1)) if labels.max() else []
    order = np.argsort(-np.asarray(sizes), kind="stable")
    table["true_positive"] = [bool(hits[i]) for i in order]
    table["n_models"] = len(models)
    return table


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default="results")
    p.add_argument("--variant", default="unet3d")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the table (Markdown) and a CSV beside it")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    results = Path(args.results)
    splits = json.loads((results / "splits.json").read_text())["splits"]
    loaded = [load_model(results / "models" / args.variant / f"split{k}" / f"seed{args.seed}" / "model.pt")
              for k in range(len(splits))]
    cfg = loaded[0][1]
    config = json.loads((results / "provenance.json").read_text()).get("config", {}) \
        if (results / "provenance.json").is_file() else {}
    policy = PredictionPolicy.from_config(config.get("predict", {"tile": None}), cfg.crop, amp=cfg.amp)
    subjects = sorted({s for sp in splits for s in sp["test"]})
    tables = []
    for subject in subjects:
        models = [loaded[k][0] for k, sp in enumerate(splits) if subject in sp["test"]]
        if len(models) < 2:
            continue
        t = subject_lesions(models, policy, Preprocessed.load(results / "preprocessed" / f"{subject}.npz"))
        t.insert(0, "subject", subject)
        tables.append(t)
        print(f"{subject}: {len(models)} models, {len(t)} lesions, {int(t.true_positive.sum())} true", flush=True)
    lesions = pd.concat(tables, ignore_index=True)
    rows = []
    for lo, hi, label in BINS:
        sel = lesions[(lesions.agreement >= lo) & (lesions.agreement < hi)]
        rows.append({"agreement": label, "lesions": len(sel), "true positives": int(sel.true_positive.sum()),
                     "precision %": round(100 * sel.true_positive.mean(), 1) if len(sel) else float("nan")})
    table = pd.DataFrame(rows)
    text = (f"Lesion-wise precision by ensemble agreement: {args.variant} (seed {args.seed}), each demo subject "
            f"predicted by the models of the splits where it is a test subject ({len(tables)} subjects with 2-5 "
            f"models; {len(lesions)} predicted lesions); policy: {policy.describe()}; "
            f"`python tools/lesion_confidence.py --results {args.results} --variant {args.variant}`\n\n"
            + to_markdown(table))
    print(text)
    if args.out:
        Path(args.out).write_text(text)
        lesions.to_csv(Path(args.out).with_suffix(".csv"), index=False)


if __name__ == "__main__":
    main()
