"""One function per workflow step: read the step's files, call the pure code, write atomically.

The Snakemake scripts under ``scripts/`` only unpack ``snakemake.input/output/params`` and call
one of these, so every step can also be run (and tested) without Snakemake.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Mapping, Sequence

import nibabel as nib
import numpy as np
import pandas as pd

# Heavy libraries (torch, matplotlib, SimpleITK) are imported inside the steps that need them,
# so light steps start in a fraction of a second.
from .metrics import evaluate_case
from .splits import make_splits
from .volumes import (
    InputError,
    Preprocessed,
    check_binary_mask,
    load_checked,
    preprocess_subject,
    ras_to_model,
    same_grid,
    save_json,
    save_nifti,
)

log = logging.getLogger(__name__)

CONTRASTS = ("T1", "T2", "FLAIR")


# ---------------------------------------------------------------------------------------------
# Preprocessing
# ---------------------------------------------------------------------------------------------
def preprocess_step(subject: str, images: Mapping[str, str], lesions: str, out: str, margin: int = 2) -> None:
    """Co-registered T1/T2/FLAIR + mask -> ``out`` (.npz, model layout, brain crop, z-scored)."""
    imgs = {c: load_checked(images[c], subject, c) for c in CONTRASTS}
    mask_img = load_checked(lesions, subject, "lesion mask")  # raises on a missing or empty mask
    ref = imgs["FLAIR"]
    for c, img in imgs.items():
        if not same_grid(img, ref):
            raise InputError(
                f"subject {subject!r}, {c} file {images[c]!r}: not on the reference grid after "
                "co-registration (shape or affine differs). Re-run the co-registration step."
            )
    if not same_grid(mask_img, ref):
        raise InputError(
            f"subject {subject!r}, lesion mask {lesions!r}: geometry {mask_img.shape} differs from "
            f"its reference image {images['FLAIR']!r} {ref.shape}. Masks must be on the reference grid."
        )
    mask = check_binary_mask(np.asarray(mask_img.dataobj), subject, lesions)
    mask_img = nib.Nifti1Image(mask, mask_img.affine)
    pre = preprocess_subject(imgs["T1"], imgs["T2"], imgs["FLAIR"], mask_img, margin=margin)
    log.info("%s: cropped to %s voxels of %s mm, %d lesion voxels",
             subject, pre.lesions.shape, tuple(round(s, 3) for s in pre.spacing), int(pre.lesions.sum()))
    pre.save(out)


# ---------------------------------------------------------------------------------------------
# Splits
# ---------------------------------------------------------------------------------------------
def splits_step(subjects: Sequence[str], out: str, n_splits: int, n_train: int, n_test: int | None, seed: int) -> None:
    """Write the seeded random splits as one JSON file (``{"seed":..., "splits": [...]}``)."""
    splits = make_splits(subjects, n_splits, n_train, n_test, seed)
    save_json({"seed": seed, "n_train": n_train, "n_test": len(splits[0]["test"]), "splits": splits}, out)
    log.info("%d splits of %d subjects: %d train / %d test", n_splits, len(subjects), n_train, len(splits[0]["test"]))


def read_split(splits_json: str, split: int) -> dict[str, list[str]]:
    return json.loads(Path(splits_json).read_text())["splits"][int(split)]


# ---------------------------------------------------------------------------------------------
# Training and prediction
# ---------------------------------------------------------------------------------------------
def train_step(
    variant: str, split: int, splits_json: str, preprocessed: Mapping[str, str], train_cfg: Mapping,
    out_model: str, out_log: str, checkpoint: str, threads: int = 1,
) -> None:
    """Train one variant on the training subjects of one split; resumes from ``checkpoint``."""
    from .training import TrainConfig, save_model, train, write_log_csv

    from .gpus import claim_gpu

    names = read_split(splits_json, split)["train"]
    subjects = [Preprocessed.load(preprocessed[s]) for s in names]
    cfg = TrainConfig.from_dict({**train_cfg, "variant": variant, "seed": int(train_cfg.get("seed", 0)) + int(split)})
    partial = Path(checkpoint).with_suffix(".partial.csv")
    with claim_gpu() if cfg.device != "cpu" else contextlib.nullcontext():
        result = train(cfg, subjects, checkpoint=checkpoint, partial_log=partial, threads=threads)
    save_model(result, cfg, out_model)
    write_log_csv(result.log_rows, out_log)
    for leftover in (Path(checkpoint), partial):
        leftover.unlink(missing_ok=True)
    log.info("%s split %d: saved %s", variant, split, out_model)


def predict_step(
    model_path: str, split: int, splits_json: str, preprocessed: Mapping[str, str], out_dir: str,
    out_csv: str, tile: Sequence[int] | str | None, overlap: float, threads: int = 1, device: str = "auto",
) -> None:
    """Predict every test subject of a split and score it.

    Writes ``out_dir/<subject>.nii.gz`` (0/1 on the subject's reference grid, RAS) and the
    per-subject metrics, one row per test subject, to ``out_csv`` (see :func:`evaluate_case`).
    Scoring happens here, on the mask just written, so the test volumes are loaded once.

    ``tile``: ``None`` tiles the volume with the training crop (so the attention blocks see the
    same extent as in training, and the non-local map stays the size it had in training),
    ``"whole"`` runs the whole volume in one pass, or an explicit ``(d, h, w)``.
    """
    import torch

    from .gpus import claim_gpu
    from .training import resolve_device

    torch.set_num_threads(threads)
    with claim_gpu() if device != "cpu" else contextlib.nullcontext():
        rows = _predict_all(model_path, split, splits_json, preprocessed, out_dir, tile, overlap, resolve_device(device))
    from . import evaluation

    evaluation.write_csv(pd.DataFrame(rows), out_csv)


def _predict_all(model_path, split, splits_json, preprocessed, out_dir, tile, overlap, dev) -> list[dict]:
    from .inference import predict_volume
    from .training import load_model

    model, cfg = load_model(model_path, dev)
    if tile is None:
        tile = cfg.crop
    elif tile == "whole":
        tile = None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = read_split(splits_json, split)["test"]
    rows = []
    for i, subject in enumerate(names, start=1):
        pre = Preprocessed.load(preprocessed[subject])
        prob = predict_volume(model, pre.image, tile=tile, overlap=overlap, device=dev)
        mask = (prob > 0.5).astype(np.uint8)
        save_nifti(pre.uncrop(mask), out / f"{subject}.nii.gz")
        scores = evaluate_case(mask > 0, pre.lesions > 0, pre.spacing)
        rows.append({"variant": cfg.variant, "split": int(split), "subject": subject, **scores})
        log.info("%s split %d: %d/%d %s, %d lesion voxels predicted, Dice %.3f", cfg.variant, split, i,
                 len(names), subject, int(mask.sum()), scores["dice"])
    return rows


# ---------------------------------------------------------------------------------------------
# Aggregation and figures
# ---------------------------------------------------------------------------------------------
def aggregate_step(metric_csvs: Sequence[str], outputs: Mapping[str, str]) -> None:
    """All per-subject metrics -> Table 1 (csv/md/tex), Table 2 (csv/md), paired tests, all rows."""
    from . import evaluation

    rows = pd.concat([pd.read_csv(p) for p in metric_csvs], ignore_index=True)
    t1, t2 = evaluation.table1(rows), evaluation.table2(rows)
    tests = evaluation.paired_tests(rows)
    evaluation.write_csv(rows, outputs["per_subject"])
    evaluation.write_csv(t1, outputs["table1_csv"])
    d1 = evaluation.table1_display(t1)
    note = (f"\nMean ± sd over {int(t1.n_splits.max())} splits, in percent; 'paper' columns are the paper's Table 1 "
            "(its private 43-patient cohort).\n")
    evaluation.write_text(evaluation.to_markdown(d1) + note, outputs["table1_md"])
    evaluation.write_text(evaluation.to_latex(d1, "Segmentation results (mean ± sd over splits), with the paper's Table 1.", "tab:table1"), outputs["table1_tex"])
    evaluation.write_csv(t2, outputs["table2_csv"])
    evaluation.write_text(evaluation.to_markdown(evaluation.table2_display(t2)), outputs["table2_md"])
    evaluation.write_csv(tests, outputs["tests_csv"])
    evaluation.write_text(evaluation.to_markdown(tests), outputs["tests_md"])
    log.info("Table 1:\n%s", evaluation.to_markdown(d1))


def figures_step(
    per_subject_csv: str, train_logs: Mapping[tuple[str, int], str], splits_json: str,
    preprocessed: Mapping[str, str], predictions: Mapping[str, str], stems: Mapping[str, str],
) -> None:
    """Fig. 1, Fig. 5, training curves and score distributions.

    Args:
        train_logs: ``(variant, split) -> train_log.csv``.
        predictions: variant -> prediction folder of split 0, for the variants shown in Fig. 5.
        stems: output stems for ``fig1``, ``fig5``, ``curves``, ``scores``.
    """
    from . import figures

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
        [pd.read_csv(p).assign(variant=v, split=s) for (v, s), p in train_logs.items()], ignore_index=True
    )
    figures.training_curves(logs, stems["curves"])
    figures.score_distributions(rows, stems["scores"])


# ---------------------------------------------------------------------------------------------
# Demo cohort and co-registration
# ---------------------------------------------------------------------------------------------
def demo_config(demo: Mapping) -> "object":
    """The workflow's ``demo:`` config section as a :class:`rsanet.demo.DemoConfig`."""
    from .demo import DemoConfig

    return DemoConfig(
        n_subjects=int(demo.get("n_subjects", 43)),
        seed=int(demo.get("seed", 0)),
        inplane_scale=float(demo.get("grid_scale", 1.0)),
        max_rotation_deg=float(demo.get("max_rotation_deg", 8.0)),
        max_translation_mm=float(demo.get("max_translation_mm", 8.0)),
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
    subject: str, images: Mapping[str, str], lesions: str, outputs: Mapping[str, str], reference: str = "FLAIR",
    engine: str = "auto", dof: int = 6, max_displacement_mm: float = 40.0, threads: int = 1,
    search_deg: float = 30.0,
) -> None:
    """Register every non-reference contrast onto ``reference``; resample it onto the reference grid.

    Writes the three contrasts and the mask on the reference grid, the transforms of each moving
    contrast (FLIRT ``.mat`` and ITK ``.txt``), ``registration.json`` (engine, costs, matrices)
    and, when ``outputs`` has ``"qc"``, the QC figure (registered edges over the reference).
    A failed registration raises before anything is written for the subject.
    """
    from .registration import RegistrationError, register, resample_to_fixed, write_transforms

    fixed_path = images[reference]
    fixed = load_checked(fixed_path, subject, reference)
    results, resampled = {}, {reference: fixed}
    for contrast in (c for c in CONTRASTS if c != reference):
        log.info("%s: registering %s -> %s", subject, contrast, reference)
        try:
            res = register(images[contrast], fixed_path, dof=dof, engine=engine, search_deg=search_deg,
                           max_displacement_mm=max_displacement_mm, threads=threads)
        except RegistrationError as err:
            raise InputError(f"subject {subject!r}: {err}") from err
        log.info("%s: %s -> %s with %s in %.1f s, cost %.4f -> %.4f", subject, contrast, reference,
                 res.engine, res.seconds, res.cost_before, res.cost_after)
        results[contrast] = res
        moving = load_checked(images[contrast], subject, contrast)
        resampled[contrast] = resample_to_fixed(moving, fixed, res.moving_to_fixed, "linear")
    mask = load_checked(lesions, subject, "lesion mask")
    if not same_grid(mask, fixed):
        raise InputError(
            f"subject {subject!r}, lesion mask {lesions!r}: not on the grid of its reference "
            f"{reference} image {fixed_path!r}; give the mask in {reference} space"
        )
    mask = nib.Nifti1Image(check_binary_mask(np.asarray(mask.dataobj), subject, lesions), fixed.affine)
    tdir = Path(outputs["transforms"])
    tdir.mkdir(parents=True, exist_ok=True)
    for contrast, res in results.items():
        write_transforms(res, images[contrast], fixed_path, tdir / f"{contrast}_to_{reference}.mat",
                         tdir / f"{contrast}_to_{reference}.itk.txt")
    for contrast in CONTRASTS:
        out_img = resampled[contrast]
        save_nifti(nib.Nifti1Image(np.asarray(out_img.dataobj, dtype=np.float32), fixed.affine), outputs[contrast.lower()])
    save_nifti(mask, outputs["lesions"])
    save_json({"subject": subject, "reference": reference,
               "results": {c: r.to_dict() for c, r in results.items()}}, outputs["record"])
    if "qc" in outputs:  # edges of the registered contrasts over the reference, three slices
        from .registration import registration_qc_figure

        others = {c: resampled[c] for c in CONTRASTS if c != reference}
        registration_qc_figure(resampled[reference], others, outputs["qc"], title=subject)


def registration_accuracy_step(records: Sequence[str], truths: Sequence[str], flairs: Sequence[str], out_csv: str, out_png: str) -> None:
    """Mean displacement error over the brain of each estimated transform against the demo's truth."""
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
    from importlib import metadata

    import torch

    from . import __version__

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    engines = sorted({r["engine"] for p in records for r in json.loads(Path(p).read_text())["results"].values()})
    versions = {}
    for pkg in ("torch", "numpy", "scipy", "nibabel", "SimpleITK", "fslpy", "nilearn", "pandas", "matplotlib", "snakemake"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    save_json({
        "rsanet_version": __version__, "git_commit": commit, "python": platform.python_version(),
        "platform": platform.platform(), "libraries": versions,
        "device": "cuda:" + torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "registration_engines": engines, "config": dict(config),
    }, out_json)
