"""One function per workflow step: read the step's files, call the pure code, write atomically.

The Snakemake scripts under ``scripts/`` only unpack ``snakemake.input/output/params`` and call
one of these, so every step can also be run (and tested) without Snakemake.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

import nibabel as nib
import numpy as np

# Heavy libraries (torch, matplotlib, SimpleITK, pandas) are imported inside the steps that need
# them, so light steps start in a fraction of a second (pandas: 0.15-0.26 s for each of the demo's
# 164 synthesis, registration, preprocessing and training jobs, which do not use it).
from .metrics import EvaluationSettings, evaluate_case
from .volumes import (
    CONTRASTS,
    Preprocessed,
    binarise_mask,
    load_checked,
    load_probability_u8,
    preprocess_subject,
    ras_to_model,
    require_same_grid,
    save_json,
    save_nifti,
    save_probability_u8,
)

if TYPE_CHECKING:
    import pandas as pd

    from .registration import CoregistrationSettings

log = logging.getLogger(__name__)



# ---------------------------------------------------------------------------------------------
# Preprocessing
# ---------------------------------------------------------------------------------------------
def preprocess_step(subject: str, images: Mapping[str, str], lesions: str, out: str, margin: int = 2,
                    allow_empty_mask: bool = False) -> None:
    """Co-registered T1/T2/FLAIR + mask -> ``out`` (.npz, model layout, brain crop, z-scored).

    ``allow_empty_mask``: accept an all-zero mask (a subject without lesions).
    """
    imgs = {c: load_checked(images[c], subject, c) for c in CONTRASTS}
    mask_img = load_checked(lesions, subject, "lesion mask", allow_empty=allow_empty_mask)
    ref = imgs["FLAIR"]
    for c, img in imgs.items():
        require_same_grid(img, ref, subject, f"{c} file", images[c], images["FLAIR"])
    require_same_grid(mask_img, ref, subject, "lesion mask", lesions, images["FLAIR"])
    mask_img = nib.Nifti1Image(binarise_mask(np.asarray(mask_img.dataobj), subject, lesions), mask_img.affine)
    pre = preprocess_subject(imgs["T1"], imgs["T2"], imgs["FLAIR"], mask_img, margin=margin)
    log.info("%s: cropped to %s voxels of %s mm, %d lesion voxels",
             subject, pre.lesions.shape, tuple(round(s, 3) for s in pre.spacing), int(pre.lesions.sum()))
    pre.save(out)


# ---------------------------------------------------------------------------------------------
# Splits
# ---------------------------------------------------------------------------------------------
def splits_step(splits: Sequence[Mapping[str, Sequence[str]]], out: str, seed: int) -> None:
    """Write the splits the workflow planned with (``common.smk`` draws them once, at parse time)
    as one JSON file: ``{"seed": ..., "n_train": ..., "n_val": ..., "n_test": ..., "splits": [...]}``.

    The jobs read this file and the input functions use the same list, so the two cannot drift.
    """
    splits = [{part: list(s[part]) for part in ("train", "val", "test")} for s in splits]
    first = splits[0]
    save_json({"seed": seed, "n_train": len(first["train"]), "n_val": len(first["val"]),
               "n_test": len(first["test"]), "splits": splits}, out)
    log.info("%d splits: %d train / %d validation / %d test subjects", len(splits), len(first["train"]),
             len(first["val"]), len(first["test"]))


def read_split(splits_json: str, split: int) -> dict[str, list[str]]:
    return json.loads(Path(splits_json).read_text())["splits"][int(split)]


# ---------------------------------------------------------------------------------------------
# Training and prediction
# ---------------------------------------------------------------------------------------------
def train_step(
    variant: str, split: int, splits_json: str, preprocessed: Mapping[str, str], train_cfg: Mapping,
    out_model: str, out_log: str, out_health: str, checkpoint: str, threads: int = 1, seed_index: int = 0,
) -> None:
    """Train one variant on the training subjects of one split; resumes from ``checkpoint``.

    The validation part of the split is never fitted on: the health check scores fixed patches
    of it (``preprocessed`` holds the training and the validation files). The verdict goes into
    the model file and ``out_health`` (JSON). The run's seed is ``train.seed + split + 1000 *
    seed_index``: each split and each repeat (``train.seeds``) has its own.
    """
    from .training import TrainConfig, TrainingFailed, save_model, train, write_log_csv

    from .gpus import claim_gpu

    parts = read_split(splits_json, split)
    names = parts["train"]
    subjects = [Preprocessed.load(preprocessed[s]) for s in names]
    validation = [Preprocessed.load(preprocessed[s]) for s in parts.get("val", [])]
    log.info("%s split %d: training on %d subjects: %s; health check on %d validation subjects",
             variant, split, len(names), ", ".join(names), len(validation))
    seed = int(train_cfg["seed"]) + int(split) + 1000 * int(seed_index)
    cfg = TrainConfig.from_dict({**train_cfg, "variant": variant, "seed": seed})
    partial = Path(checkpoint).with_suffix(".partial.csv")
    try:
        with claim_gpu() if cfg.device != "cpu" else contextlib.nullcontext():
            result = train(cfg, subjects, checkpoint=checkpoint, partial_log=partial, threads=threads,
                           validation=validation)
    except TrainingFailed as err:
        raise TrainingFailed(f"split {split}, seed index {seed_index}: {err}") from None
    save_model(result, cfg, out_model)
    write_log_csv(result.log_rows, out_log)
    save_json({**result.health, "variant": variant, "split": int(split), "seed": seed,
                "seed_index": int(seed_index)}, out_health)
    for leftover in (Path(checkpoint), partial):
        leftover.unlink(missing_ok=True)
    log.info("%s split %d seed %d: saved %s", variant, split, seed, out_model)


def predict_step(
    model_path: str, split: int, splits_json: str, preprocessed: Mapping[str, str], out_dir: str,
    out_csv: str, predict: Mapping, evaluation: Mapping, threads: int = 1, device: str = "auto",
    memory_limit_mb: float | None = None, part: str = "test", seed: int | None = None,
    save_probabilities: bool = False,
) -> None:
    """Predict every subject of one part (``"test"``; ``"val"`` for choosing settings) of a split
    and score it.

    Writes ``out_dir/<subject>.nii.gz`` (0/1 on the subject's reference grid),
    ``out_dir/<subject>_prob_u8.npz`` (the lesion probability on the preprocessed crop, see
    :func:`rsanet.volumes.save_probability_u8`) and the per-subject metrics, one row per subject,
    to ``out_csv`` (see :func:`evaluate_case`).
    Scoring happens here, on the mask just written, so the volumes are loaded once.

    ``predict``: the validated ``predict:`` section, the inference policy
    (:meth:`rsanet.inference.PredictionPolicy.from_config`: tile, overlap, blending, batch size).
    ``evaluation``: the validated ``evaluation:`` section, the lesion-wise conventions
    (:class:`rsanet.metrics.EvaluationSettings` fields). ``memory_limit_mb``: the job's memory; a
    pass whose attention maps alone would exceed it is refused with a message naming what to set.
    ``save_probabilities``: also write ``out_dir/<subject>_prob.nii.gz`` (float32 in [0, 1]).
    """
    import pandas as pd
    import torch

    from .gpus import claim_gpu
    from .devices import resolve_device

    torch.set_num_threads(threads)
    with claim_gpu() if device != "cpu" else contextlib.nullcontext():
        rows = _predict_all(model_path, split, splits_json, preprocessed, out_dir, predict, resolve_device(device),
                            memory_limit_mb, part, seed, save_probabilities, evaluation_settings(evaluation))
    from . import evaluation

    evaluation.write_csv(pd.DataFrame(rows), out_csv)


def evaluation_settings(section: Mapping) -> EvaluationSettings:
    """The validated ``evaluation:`` config section as :class:`rsanet.metrics.EvaluationSettings`."""
    kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in section.items()}
    return EvaluationSettings(**kw)


def _predict_all(model_path, split, splits_json, preprocessed, out_dir, predict, dev, memory_limit_mb, part, seed,
                 save_probabilities, settings) -> list[dict]:
    from .inference import PredictionPolicy
    from .devices import precision
    from .training import load_model

    model, cfg = load_model(model_path, dev)
    policy = PredictionPolicy.from_config(predict, cfg.crop, amp=cfg.amp)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = read_split(splits_json, split)[part]
    log.info("%s split %d: predicting %d %s subjects (%s; %s)", cfg.variant, split, len(names), part,
             policy.describe(), precision(cfg.amp, dev))
    rows = []
    for i, subject in enumerate(names, start=1):
        pre = Preprocessed.load(preprocessed[subject])
        need_mb = policy.pass_bytes(cfg.variant, cfg.widths, pre.image.shape[1:]) / 2**20
        hint = ("set predict.tile to the training crop (null) or smaller tiles, or predict.batch_size lower, "
                "or give the job more memory (resources)")
        if memory_limit_mb and need_mb > memory_limit_mb:
            raise MemoryError(
                f"{cfg.variant} split {split}, subject {subject!r}: the non-local attention maps of one pass over "
                f"{tuple(pre.image.shape[1:])} voxels ({policy.describe()}) need {need_mb:,.0f} MiB, more than the "
                f"job's {memory_limit_mb:,.0f} MiB; {hint}"
            )
        try:
            prob = policy.predict(model, pre.image, dev)
        except (MemoryError, RuntimeError) as err:
            if isinstance(err, MemoryError) or "out of memory" in str(err).lower():
                log.error("%s split %d, subject %s: out of memory while predicting (attention maps ~%.0f MiB "
                          "per pass); %s", cfg.variant, split, subject, need_mb, hint)
            raise
        mask = (prob > 0.5).astype(np.uint8)
        save_nifti(pre.uncrop(mask), out / f"{subject}.nii.gz")
        # for the ensemble's per-lesion confidence (lesion_confidence_step): on the cropped grid, 1/255 steps
        save_probability_u8(prob, out / f"{subject}_prob_u8.npz")
        if save_probabilities:
            save_nifti(pre.uncrop(prob.astype(np.float32)), out / f"{subject}_prob.nii.gz")
        scores = evaluate_case(mask > 0, pre.lesions > 0, pre.spacing, settings)
        row = {"variant": cfg.variant, "split": int(split), "subject": subject}
        if seed is not None:
            row["seed"] = int(seed)
        rows.append({**row, **scores})
        log.info("%s split %d: %d/%d %s, %d lesion voxels predicted, Dice %.3f", cfg.variant, split, i,
                 len(names), subject, int(mask.sum()), scores["dice"])
    return rows


def lesion_confidence_step(
    variant: str, splits_json: str, predictions: Mapping[tuple[int, int], str], preprocessed: Mapping[str, str],
    segment_options: Mapping, connectivity: int, out_lesions: str, out_table: str,
) -> pd.DataFrame:
    """Is the ensemble's per-lesion agreement informative? Lesion-wise precision by agreement,
    measured on subjects the models never trained on.

    Each subject is segmented as ``rsanet-segment`` would (:func:`rsanet.segment.ensemble_lesions`,
    ``segment_options``' threshold and ``min_lesion_mm3``, no test-time mirroring) by the ensemble
    of the models (``predictions``: ``(split, seed)`` -> prediction folder of ``variant``) of the
    splits in whose *test* part it lies; subjects with fewer than two such models are left out. A
    predicted lesion is a true positive when it overlaps a true lesion. Writes every lesion to
    ``out_lesions`` (CSV) and :func:`rsanet.segment.precision_by_agreement` to ``out_table`` (CSV,
    with the variant and the counts of subjects and models); returns the latter.
    """
    import pandas as pd
    from . import evaluation
    from .segment import ensemble_lesions, precision_by_agreement

    splits = {int(k): part["test"] for k, part in enumerate(json.loads(Path(splits_json).read_text())["splits"])}
    tables, n_models = [], []
    for subject in sorted({s for names in splits.values() for s in names}):
        folders = [d for (split, _), d in sorted(predictions.items()) if subject in splits[split]]
        if len(folders) < 2:
            continue
        truth, spacing = Preprocessed.load_lesions(preprocessed[subject])
        probs = np.stack([load_probability_u8(Path(d) / f"{subject}_prob_u8.npz") for d in folders])
        _, _, table = ensemble_lesions(probs, np.diag([*spacing, 1.0]), connectivity,
                                       float(segment_options["threshold"]), float(segment_options["min_lesion_mm3"]),
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


# ---------------------------------------------------------------------------------------------
# Aggregation and figures
# ---------------------------------------------------------------------------------------------
def job_times_step(benchmarks: Mapping[str, Sequence[str]], out_csv: str, out_md: str) -> None:
    """Snakemake benchmark files (stage -> one TSV per job) -> the time table per stage (csv, md)."""
    import pandas as pd
    from . import evaluation

    table = evaluation.job_time_table({stage: [pd.read_csv(p, sep="\t") for p in paths]
                                       for stage, paths in benchmarks.items()})
    evaluation.write_csv(table, out_csv)
    evaluation.write_text(
        evaluation.to_markdown(table) + "\nSeconds of wall time per job (Snakemake `benchmark:` files, "
        "results/benchmarks/jobs/); jobs ran in parallel, so totals exceed the study's wall time. "
        "cpu_s: CPU seconds; max_rss_mb: the largest resident memory of one job.\n", out_md)
    for row in table.itertuples(index=False):
        log.info("%s: %d jobs, %.0f s in all (median %.1f s, longest %.1f s)", row.stage, row.jobs, row.total_s,
                 row.median_s, row.max_s)


def aggregate_step(metric_csvs: Sequence[str], health_jsons: Sequence[str], splits_json: str,
                   outputs: Mapping[str, str]) -> None:
    """All per-subject metrics and training verdicts -> Table 1 (csv/md/tex; with the failed
    trainings per variant), the training-health table, Table 2 (csv/md), paired tests, all rows."""
    import pandas as pd
    from . import evaluation

    rows = pd.concat([pd.read_csv(p) for p in metric_csvs], ignore_index=True)
    health = evaluation.read_health(health_jsons)
    n_train = json.loads(Path(splits_json).read_text())["n_train"]
    t1, t2 = evaluation.table1(rows, health), evaluation.table2(rows)
    failed = evaluation.failed_trainings(health)
    attention = evaluation.attention_summary(health)
    evaluation.write_csv(health, outputs["health_csv"])
    n_bad = int(failed.n_failed.sum())
    n_inert = int(attention.n_inert.sum())
    evaluation.write_text(
        evaluation.to_markdown(failed.drop(columns="variant")) +
        f"\n{n_bad} of {len(health)} trainings failed their health check ({health.source.iloc[0] if len(health) else ''}"
        f": hard Dice at the last check below train.health_floor = {health.floor.iloc[0] if len(health) else ''}). "
        "Their scores are included in Table 1 as they came.\n\n## The attention check\n\n"
        + evaluation.to_markdown(evaluation.attention_summary_display(attention)) +
        f"\nEvery attention training, at its end, scores the validation patches of the health check with its "
        f"attention as trained and switched off (RSA alpha, NCL output norm set to 0; rsanet.models.attention_off). "
        f"'inert': switching it off changes fewer than train.attention_inert_below of the predicted lesion voxels; "
        f"{n_inert} of {int(attention.n_checked.sum())} attention trainings are inert. Δ off: the validation-patch "
        "sample Dice with the attention off minus on (points, mean over trainings); a variant whose attention is "
        "inert compares the 3D U-Net with itself in Table 1.\n", outputs["health_md"])
    if n_inert:
        log.warning("%d of %d attention trainings are ATTENTION INERT (switching the attention off changes almost "
                    "no predicted voxel): %s", n_inert, int(attention.n_checked.sum()),
                    "; ".join(f"{m}: {i}" for m, i in zip(attention.method, attention.inert) if i))
    if n_bad:
        log.warning("%d of %d trainings failed their health check: %s", n_bad, len(health),
                    "; ".join(f"{m}: {f}" for m, f in zip(failed.method, failed.failed) if f))
    tests = evaluation.paired_tests(evaluation.mean_over_seeds(rows), n_train=n_train)
    seed_counts = health.groupby("variant").seed.nunique() if len(health) else pd.Series(dtype=int)
    evaluation.write_csv(rows, outputs["per_subject"])
    evaluation.write_csv(t1, outputs["table1_csv"])
    d1 = evaluation.table1_display(t1)
    seeds = evaluation.seeds_note(seed_counts)
    note = (f"\nMean ± sd over {int(t1.n_splits.max())} splits{seeds}, in percent; 'Failed trainings': how many of "
            f"the variant's trainings failed their health check (training_health.md; {n_bad} in all), included as "
            "they came; 'Attention inert': how many of its trainings have attention that switching off changes "
            f"(almost) nothing ({n_inert} in all; such a row is the 3D U-Net again), and 'Δ attention off' the "
            "validation-patch sample Dice lost when it is switched off (points); 'paper' columns are the paper's "
            "Table 1 (its private 43-patient cohort, other settings: not comparable with this run's numbers). The sd is descriptive: the splits' test sets overlap, so "
            "it is not the standard error of an independent sample (see paired_tests.md for the corrected test).\n")
    evaluation.write_text(evaluation.to_markdown(d1) + note, outputs["table1_md"])
    evaluation.write_text(evaluation.to_latex(d1, "Segmentation results (mean ± sd over splits), beside the paper's Table 1 (its private cohort and settings: not comparable).", "tab:table1"), outputs["table1_tex"])
    evaluation.write_csv(t2, outputs["table2_csv"])
    t2_note = ("\nMean ± sd over splits of the per-split means over test subjects. Lesion-wise numbers follow the "
               "config's evaluation conventions (README, Metrics); HD95/ASSD leave out subjects where exactly one "
               "mask is empty (undefined).\n")
    evaluation.write_text(evaluation.to_markdown(evaluation.table2_display(t2)) + t2_note, outputs["table2_md"])
    by_size = evaluation.detection_by_size(rows)
    evaluation.write_csv(by_size, outputs["size_csv"])
    evaluation.write_text(evaluation.to_markdown(evaluation.detection_by_size_display(by_size)) +
                          "\nLesion-wise TPR (%) per true-lesion volume bin: true and detected lesions pooled over the "
                          "test subjects of a split, mean ± sd over splits.\n", outputs["size_md"])
    evaluation.write_csv(tests, outputs["tests_csv"])
    n_test = int(tests.n_test.min()) if len(tests) else 0
    tests_note = (
        f"\nEach variant minus the 3D U-Net, per split, on each Table 1 metric (percentage points); mean over "
        f"{int(tests.n_splits.max()) if len(tests) else 0} splits with the corrected resampled t-test of Nadeau & "
        f"Bengio (2003): variance (1/J + n_test/n_train)·var(d), J − 1 degrees of freedom, n_train = {n_train}, "
        f"n_test = {n_test}. The split, not the (split, subject) pair, is the unit: subjects recur across splits.\n"
    )
    tests_note += (
        "'detectable Δ': the smallest true difference this design detects with 80 % power at α = 0.05 under the same "
        "corrected test, from the observed sd of the per-split differences; 'power for paper's Δ': its power for the "
        "difference the paper's Table 1 reports between the two methods (docs/metrics.md, 'What a comparison could "
        "have seen'). A comparison whose detectable Δ exceeds the paper's cannot confirm or refute the paper.\n")
    evaluation.write_text(evaluation.to_markdown(evaluation.paired_tests_display(tests)) + tests_note, outputs["tests_md"])
    findings = evaluation.findings(t1, tests, attention, n_bad, len(health), seeds)
    evaluation.write_text(findings, outputs["findings_md"])
    evaluation.write_text(evaluation.markdown_to_html(findings), outputs["findings_html"])
    log.info("Table 1:\n%s", evaluation.to_markdown(d1))
    log.info("Findings:\n%s", findings)


def deviations_step(config: Mapping, records: Sequence[str], out_csv: str, out_md: str) -> None:
    """The run's settings against the paper's (:func:`rsanet.paper.deviations`), csv and Markdown."""
    from . import evaluation
    from .paper import deviations

    from .registration import engines_that_ran

    table = deviations(config, engines_that_ran(records))
    evaluation.write_csv(table, out_csv)
    n_dev = int((table.status == "deviates").sum())
    note = (f"\n{n_dev} setting(s) deviate from the paper, {int((table.status == 'not stated in the paper').sum())} "
            "are not stated there (choices of this workflow).\n")
    head = (f"This run's settings: preset `{config['preset']}` (config/presets/{config['preset']}.yaml) "
            "with the run's own config over it.\n\n")
    evaluation.write_text(head + evaluation.to_markdown(table) + note, out_md)
    log.info("preset %s; %d deviations from the paper's settings", config["preset"], n_dev)


def validation_step(metric_csvs: Sequence[str], out_csv: str, out_md: str) -> None:
    """Table 1 numbers on the validation parts (``splits.n_val`` subjects per split)."""
    import pandas as pd
    from . import evaluation

    rows = pd.concat([pd.read_csv(p) for p in metric_csvs], ignore_index=True)
    t = evaluation.table1(rows)
    evaluation.write_csv(t, out_csv)
    shown = evaluation.table1_display(t)[["Method", "Sample Dice", "Voxel Dice", "Sample IoU", "Voxel IoU"]]
    note = (f"\nValidation subjects only ({rows.subject.nunique()} distinct, "
            f"{len(rows) // max(rows.variant.nunique(), 1)} scored per variant): mean ± sd over splits, percent.\n")
    evaluation.write_text(evaluation.to_markdown(shown) + note, out_md)
    log.info("validation Table 1:\n%s", evaluation.to_markdown(shown))


def figures_step(
    per_subject_csv: str, train_logs: Mapping[tuple[str, int, int], str], splits_json: str,
    preprocessed: Mapping[str, str], predictions: Mapping[str, str], stems: Mapping[str, str],
    health_jsons: Sequence[str] = (),
) -> None:
    """Fig. 1, Fig. 5, training curves and score distributions.

    Args:
        train_logs: ``(variant, split, seed) -> train_log.csv``.
        health_jsons: the trainings' ``health.json`` (failed runs drawn dashed, the floor shown).
        predictions: variant -> prediction folder of split 0, for the variants shown in Fig. 5.
        stems: output stems for ``fig1``, ``fig5``, ``curves``, ``scores``.
    """
    import pandas as pd
    from . import evaluation, figures

    rows = pd.read_csv(per_subject_csv)
    split0 = read_split(splits_json, 0)
    # Fig. 1: the test subject with the largest lesion load in split 0.
    loads = {s: int(Preprocessed.load(preprocessed[s]).lesions.sum()) for s in split0["test"]}
    subject = max(loads, key=loads.get)
    pre = Preprocessed.load(preprocessed[subject])
    figures.figure1(pre.image, pre.lesions, pre.spacing, subject, stems["fig1"])
    box = tuple(slice(a, b) for a, b in pre.bbox)
    preds = {v: ras_to_model(nib.load(str(Path(d) / f"{subject}.nii.gz")))[0][box] for v, d in predictions.items()}
    figures.figure5(pre.image[2], pre.lesions, preds, pre.spacing, subject, stems["fig5"])
    logs = pd.concat(
        [pd.read_csv(p).assign(variant=v, split=s, seed=k) for (v, s, k), p in train_logs.items()], ignore_index=True
    )
    floor = None
    if health_jsons:
        health = evaluation.read_health(health_jsons)
        logs = logs.merge(health[["variant", "split", "seed", "learned"]], on=["variant", "split", "seed"], how="left")
        floor = float(health.floor.iloc[0])
    figures.training_curves(logs, stems["curves"], floor=floor)
    figures.score_distributions(rows, stems["scores"])
    from . import evaluation

    figures.detection_by_size(evaluation.detection_by_size(rows), stems["by_size"])
    figures.lesion_load(rows, stems["load"])


# ---------------------------------------------------------------------------------------------
# Demo cohort and co-registration
# ---------------------------------------------------------------------------------------------
def demo_config(demo: Mapping) -> "object":
    """The workflow's validated ``demo:`` config section as a :class:`rsanet.demo.DemoConfig`."""
    from .demo import DemoConfig

    return DemoConfig(
        n_subjects=int(demo["n_subjects"]),
        seed=int(demo["seed"]),
        grid_scale=float(demo["grid_scale"]),
        max_rotation_deg=float(demo["max_rotation_deg"]),
        max_translation_mm=float(demo["max_translation_mm"]),
    )


def demo_subject_step(subject: str, demo: Mapping, outputs: Mapping[str, str]) -> None:
    """Synthesise demo subject ``demo-NNN`` into the folder of ``outputs``."""
    from .demo import make_subject, subject_id, write_subject

    index = int(subject.split("-")[-1]) - 1
    if subject_id(index) != subject:
        raise ValueError(f"{subject!r} is not a demo subject id (demo-001, demo-002, ...)")
    written = write_subject(make_subject(index, demo_config(demo)), Path(outputs["flair"]).parent)
    log.info("%s written: %s", subject, ", ".join(str(p) for p in written.values()))


def coregister_step(
    subject: str, images: Mapping[str, str], lesions: str, outputs: Mapping[str, str],
    settings: "CoregistrationSettings", threads: int = 1, allow_empty_mask: bool = False,
) -> None:
    """Register every non-reference contrast onto ``settings.reference`` and resample it onto the
    reference grid (:func:`rsanet.registration.coregister_contrasts`, also used by ``rsanet-segment``).

    Writes the three contrasts and the mask on the reference grid, the transforms of each moving
    contrast (FLIRT ``.mat`` and ITK ``.txt``), ``registration.json`` (engine, costs, matrices)
    and, when ``outputs`` has ``"qc"``, the QC figure (registered edges over the reference).
    A failed registration, or a contrast whose field of view misses most of the reference's
    head, raises before anything is written for the subject.
    """
    from .registration import coregister_contrasts, registration_qc_figure, write_transforms

    reg = coregister_contrasts(images, settings, subject, threads=threads)
    reference, fixed_path = reg.reference, images[reg.reference]
    fixed = reg.images[reference]
    mask = load_checked(lesions, subject, "lesion mask", allow_empty=allow_empty_mask)
    require_same_grid(mask, fixed, subject, "lesion mask", lesions, fixed_path)
    mask = nib.Nifti1Image(binarise_mask(np.asarray(mask.dataobj), subject, lesions), fixed.affine)
    tdir = Path(outputs["transforms"])
    tdir.mkdir(parents=True, exist_ok=True)
    for contrast, res in reg.results.items():
        write_transforms(res, images[contrast], fixed_path, tdir / f"{contrast}_to_{reference}.mat",
                         tdir / f"{contrast}_to_{reference}.itk.txt")
    for contrast in CONTRASTS:
        save_nifti(reg.images[contrast], outputs[contrast.lower()])
    save_nifti(mask, outputs["lesions"])
    save_json({"subject": subject, "reference": reference,
               "results": {c: r.to_dict() for c, r in reg.results.items()}}, outputs["record"])
    if "qc" in outputs:  # edges of the registered contrasts over the reference, three slices
        others = {c: reg.images[c] for c in CONTRASTS if c != reference}
        registration_qc_figure(reg.images[reference], others, outputs["qc"], title=subject)


def registration_accuracy_step(records: Sequence[str], truths: Sequence[str], flairs: Sequence[str], out_csv: str, out_png: str) -> None:
    """Mean displacement error over the brain of each estimated transform against the demo's truth."""
    import pandas as pd
    from . import evaluation, figures
    from .registration import displacement_mm, foreground_mask, voxel_points_mm

    rows = []
    for rec_path, truth_path, flair_path in zip(records, truths, flairs):
        rec, truth = json.loads(Path(rec_path).read_text()), json.loads(Path(truth_path).read_text())
        flair = nib.load(flair_path)
        points = voxel_points_mm(foreground_mask(np.asarray(flair.dataobj)), flair.affine, step=2)
        for contrast, res in rec["results"].items():
            # truth["to_flair"][c]: scan c world -> FLAIR world; any reference R via inv(to_flair[R]).
            to_ref = np.linalg.inv(np.asarray(truth["to_flair"][rec["reference"]]))
            true_m2f = to_ref @ np.asarray(truth["to_flair"][contrast])
            est_m2f = np.asarray(res["moving_to_fixed"])
            # Points of the reference brain, mapped back into the moving scan by each inverse.
            err = displacement_mm(np.linalg.inv(est_m2f), np.linalg.inv(true_m2f), points)
            rows.append({"subject": rec["subject"], "contrast": contrast, "engine": res["engine"],
                         "mean_error_mm": float(err.mean()), "max_error_mm": float(err.max()),
                         "seconds": res["seconds"]})
    table = pd.DataFrame(rows)
    evaluation.write_csv(table, out_csv)
    figures.registration_errors(table, str(Path(out_png).with_suffix("")))
    log.info("registration error (mm): median %.3f, max %.3f", table.mean_error_mm.median(), table.mean_error_mm.max())


def provenance_step(config: Mapping, records: Sequence[str], out_json: str) -> None:
    """What produced the results: versions, git commit, resolved config, device, engines."""
    import platform
    import subprocess

    import torch

    from . import __version__
    from .devices import precision, resolve_device
    from .files import library_versions

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    from .registration import engines_that_ran

    engines = engines_that_ran(records)
    versions = library_versions()
    save_json({
        "rsanet_version": __version__, "git_commit": commit, "python": platform.python_version(),
        "platform": platform.platform(), "libraries": versions,
        "device": "cuda:" + torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "precision": precision(config["train"]["amp"], resolve_device(config["train"]["device"])),
        "registration_engines": engines, "config": dict(config),
    }, out_json)


def cohort_step(folders: Sequence[str], size_bins_mm3: Sequence[float], out_csv: str, out_png: str,
                out_json: str) -> None:
    """Segmented subjects (``results/segment/<subject>/``) -> one cohort table, its column
    sidecar (``out_json``: description and unit of each column) and its figure."""
    import pandas as pd
    from . import evaluation, figures

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
    from . import evaluation as ev
    from .volumes import voxel_sizes_mm

    settings = evaluation_settings(evaluation)
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
