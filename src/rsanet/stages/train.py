"""Training and prediction steps (workflow/rules/train.smk): one training per variant, split and seed;
its test (or validation) subjects predicted and scored.

Each step reads its files, calls the package's pure code and writes its outputs through
:func:`rsanet.files.staged`; a script of ``scripts/`` calls one of them.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Mapping

import numpy as np

# Heavy libraries (torch, matplotlib, SimpleITK, pandas) are imported inside the steps that need
# them, so light steps start in a fraction of a second (pandas: 0.15-0.26 s for each of the demo's
# 164 synthesis, registration, preprocessing and training jobs, which do not use it).
from ..metrics import EvaluationSettings, evaluate_case
from ..volumes import (
    Preprocessed,
    save_json,
    save_nifti,
    save_probability_u8,
)



from .splits import read_split

log = logging.getLogger(__name__)


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
    from ..training import TrainConfig, TrainingFailed, save_model, train, write_log_csv

    from ..gpus import claim_gpu

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
    (:class:`rsanet.inference.Predictor`: tile, overlap, blending, batch size, threshold).
    ``evaluation``: the validated ``evaluation:`` section, the lesion-wise conventions
    (:class:`rsanet.metrics.EvaluationSettings` fields). ``memory_limit_mb``: the job's memory; a
    pass whose attention maps alone would exceed it is refused with a message naming what to set.
    ``save_probabilities``: also write ``out_dir/<subject>_prob.nii.gz`` (float32 in [0, 1]).
    """
    import pandas as pd
    import torch

    from ..gpus import claim_gpu
    from ..devices import resolve_device

    torch.set_num_threads(threads)
    with claim_gpu() if device != "cpu" else contextlib.nullcontext():
        rows = _predict_all(model_path, split, splits_json, preprocessed, out_dir, predict, resolve_device(device),
                            memory_limit_mb, part, seed, save_probabilities, EvaluationSettings.from_config(evaluation))
    from .. import evaluation

    evaluation.write_csv(pd.DataFrame(rows), out_csv)


def _predict_all(model_path, split, splits_json, preprocessed, out_dir, predict, dev, memory_limit_mb, part, seed,
                 save_probabilities, settings) -> list[dict]:
    from ..inference import Predictor
    from ..devices import precision

    predictor = Predictor.from_model_files([model_path], predict, dev)
    policy, cfg = predictor.policy, predictor.config
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
            prob = predictor.probability(pre.image)
        except (MemoryError, RuntimeError) as err:
            if isinstance(err, MemoryError) or "out of memory" in str(err).lower():
                log.error("%s split %d, subject %s: out of memory while predicting (attention maps ~%.0f MiB "
                          "per pass); %s", cfg.variant, split, subject, need_mb, hint)
            raise
        mask = predictor.lesions(prob).astype(np.uint8)
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

