"""The study's figures: Fig. 1 and Fig. 5 of the paper, training curves, score distributions,
detection by lesion size and predicted against true lesion load.

Every function takes arrays or tables and one output path stem, and writes ``stem.png`` and
``stem.pdf`` atomically. Image arrays are in the model layout ``(D, H, W)``; slices shown are
axial (``array[d]``), displayed with anterior up and the patient's right on the left of the
picture (radiological convention).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from .models import VARIANTS  # noqa: E402
from .files import staged  # noqa: E402

LESION_RED = (1.0, 0.1, 0.1)


def save_figure(fig: plt.Figure, stem: str | os.PathLike) -> list[Path]:
    """Save ``fig`` as ``stem.png`` (150 dpi) and ``stem.pdf``, atomically; close it."""
    paths = []
    for ext in ("png", "pdf"):
        path = Path(f"{stem}.{ext}")
        with staged([path]) as (tmp,):
            fig.savefig(tmp, dpi=150, bbox_inches="tight")
        paths.append(path)
    plt.close(fig)
    return paths


def axial_view(slice_hw: np.ndarray) -> np.ndarray:
    """An axial slice ``(H, W)`` oriented for display: anterior up, radiological left-right."""
    return np.flipud(slice_hw)[:, ::-1]


def most_lesioned_slice(lesions: np.ndarray) -> int:
    """Index ``d`` of the axial slice with the most lesion voxels (middle slice if none)."""
    counts = lesions.reshape(lesions.shape[0], -1).sum(axis=1)
    return int(np.argmax(counts)) if counts.any() else lesions.shape[0] // 2


def _overlay(ax: plt.Axes, background: np.ndarray, mask: np.ndarray | None, title: str) -> None:
    # Preprocessed images are exactly 0 outside the brain: show that background black.
    shown = np.ma.masked_equal(background, 0.0)
    lo, hi = np.percentile(shown.compressed(), [1, 99.5]) if shown.count() else (0.0, 1.0)
    cmap = matplotlib.colormaps["gray"].with_extremes(bad="black")
    ax.imshow(axial_view(shown), cmap=cmap, vmin=lo, vmax=hi, interpolation="nearest", aspect="auto")
    if mask is not None:
        rgba = np.zeros(mask.shape + (4,))
        rgba[mask > 0] = (*LESION_RED, 0.85)
        ax.imshow(axial_view(rgba), interpolation="nearest", aspect="auto")
    ax.set_title(title, fontsize=10)
    ax.axis("off")


def _aspect(spacing: Sequence[float]) -> float:
    """Height/width ratio of an axial (H, W) pixel from spacing ``(dz, dy, dx)``."""
    return spacing[1] / spacing[2]


def figure1(image: np.ndarray, lesions: np.ndarray, spacing: Sequence[float], subject: str, stem: str) -> list[Path]:
    """Fig. 1: one subject's T1, T2, FLAIR and the FLAIR with the lesion mask in red.

    Args:
        image: ``(3, D, H, W)`` T1, T2, FLAIR. lesions: ``(D, H, W)``. spacing: ``(dz, dy, dx)`` mm.
    """
    d = most_lesioned_slice(lesions)
    fig, axes = plt.subplots(1, 4, figsize=(12, 3.6))
    for ax, channel, name in zip(axes[:3], image, ("T1", "T2", "T2-FLAIR")):
        _overlay(ax, channel[d], None, name)
    _overlay(axes[3], image[2, d], lesions[d], "Lesion mask (red)")
    for ax in axes:
        ax.set_box_aspect(_aspect(spacing) * image.shape[2] / image.shape[3])
    fig.suptitle(f"{subject}, axial slice {d}", fontsize=10)
    return save_figure(fig, stem)


def figure5(
    flair: np.ndarray, truth: np.ndarray, predictions: Mapping[str, np.ndarray],
    spacing: Sequence[float], subject: str, stem: str, d: int | None = None,
) -> list[Path]:
    """Fig. 5: one test slice, ground truth and each variant's prediction in red over the FLAIR.

    ``predictions`` maps variant id -> ``(D, H, W)`` mask, shown in the given order.
    """
    d = most_lesioned_slice(truth) if d is None else d
    panels = [("Ground truth", truth)] + [(VARIANTS[v].display_name, p) for v, p in predictions.items()]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.6))
    for ax, (name, mask) in zip(np.atleast_1d(axes), panels):
        _overlay(ax, flair[d], mask[d], name)
        ax.set_box_aspect(_aspect(spacing) * flair.shape[1] / flair.shape[2])
    fig.suptitle(f"{subject}, axial slice {d}", fontsize=10)
    return save_figure(fig, stem)


def training_curves(logs: pd.DataFrame, stem: str, smooth: int = 10, floor: float | None = None) -> list[Path]:
    """Every training's loss and health-check scores, one panel per variant (row) and split
    (column), one colour per training seed.

    ``logs`` has columns ``variant, split, seed, iteration, loss`` (the loss the run optimised)
    and, from the health check, ``health_score`` (NaN except at check points); ``learned``
    (bool, optional) draws failed runs dashed. ``floor`` is drawn as the health floor. In each
    panel the loss (smoothed over ``smooth`` iterations, log scale) is on the left axis and the
    health check's hard Dice (points) on the right one, 0-1.
    """
    variants = [v for v in VARIANTS if v in set(logs.variant)]
    splits = sorted(logs.split.unique())
    seeds = sorted(logs.seed.unique())
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, axes = plt.subplots(len(variants), len(splits), figsize=(2.5 * len(splits) + 1, 1.9 * len(variants) + 0.8),
                             sharex=True, sharey=True, squeeze=False)
    for r, variant in enumerate(variants):
        for c, split in enumerate(splits):
            ax = axes[r][c]
            hx = ax.twinx()
            hx.set_ylim(0, 1)
            if floor is not None:
                hx.axhline(floor, color="k", ls=":", lw=0.8)
            for (seed,), run in logs[(logs.variant == variant) & (logs.split == split)].groupby(["seed"]):
                run = run.sort_values("iteration")
                style = "-" if bool(run.get("learned", pd.Series([True])).iloc[0]) else "--"
                colour = colours[seeds.index(seed) % len(colours)]
                ax.plot(run.iteration, run.loss.rolling(smooth, min_periods=1).mean(), style, color=colour, lw=0.9)
                if "health_score" in run:
                    checks = run[run.health_score.notna()]
                    hx.plot(checks.iteration, checks.health_score, "o", color=colour, ms=3, alpha=0.8)
            ax.set_yscale("log")
            ax.grid(alpha=0.3)
            if c < len(splits) - 1:
                hx.set_yticklabels([])
            else:
                hx.set_ylabel("health Dice", fontsize=7)
            if r == 0:
                ax.set_title(f"split {split}", fontsize=9)
            if c == 0:
                ax.set_ylabel(f"{VARIANTS[variant].display_name}\nloss", fontsize=8)
            if r == len(variants) - 1:
                ax.set_xlabel("iteration", fontsize=8)
    handles = [plt.Line2D([], [], color=colours[i % len(colours)], label=f"seed index {s}") for i, s in enumerate(seeds)]
    handles += [plt.Line2D([], [], color="grey", ls="--", label="failed health check"),
                plt.Line2D([], [], color="grey", marker="o", ls="", label="health check (right axis)")]
    if floor is not None:
        handles.append(plt.Line2D([], [], color="k", ls=":", label=f"health floor {floor:g}"))
    fig.legend(handles=handles, loc="upper center", ncol=len(handles), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.5 / fig.get_figheight()))
    return save_figure(fig, stem)


def score_distributions(rows: pd.DataFrame, stem: str, metrics: Sequence[str] = ("dice", "iou")) -> list[Path]:
    """Per-subject scores per variant (all splits pooled): box plots with the points on top."""
    variants = [v for v in VARIANTS if v in set(rows.variant)]
    fig, axes = plt.subplots(1, len(metrics), figsize=(6 * len(metrics), 4), squeeze=False)
    rng = np.random.default_rng(0)
    for ax, metric in zip(axes[0], metrics):
        data = [rows.loc[rows.variant == v, metric].to_numpy() * 100 for v in variants]
        ax.boxplot(data, showfliers=False)
        ax.set_xticks(range(1, len(variants) + 1), [VARIANTS[v].display_name for v in variants], rotation=30)
        for i, values in enumerate(data, start=1):
            ax.scatter(i + rng.uniform(-0.15, 0.15, len(values)), values, s=6, alpha=0.5, color="tab:red")
        ax.set_ylabel(f"per-subject {'IoU' if metric == 'iou' else metric.capitalize()} (%)")
        ax.set_ylim(-2, 102)
        ax.grid(axis="y", alpha=0.3)
    return save_figure(fig, stem)


def detection_by_size(table: pd.DataFrame, stem: str) -> list[Path]:
    """Lesion-wise TPR against true-lesion volume bin, one line per variant (mean ± sd over splits).

    ``table``: :func:`rsanet.evaluation.detection_by_size`.
    """
    bins = list(dict.fromkeys(table.bin))
    fig, ax = plt.subplots(figsize=(7, 4))
    x = np.arange(len(bins))
    variants = [v for v in VARIANTS if v in set(table.variant)]
    for k, variant in enumerate(variants):
        g = table[table.variant == variant].set_index("bin").loc[bins]
        offset = (k - (len(variants) - 1) / 2) * 0.04
        ax.errorbar(x + offset, g.ltpr_mean, yerr=g.ltpr_sd.fillna(0), marker="o", ms=4, capsize=2,
                    label=VARIANTS[variant].display_name)
    counts = table.drop_duplicates("bin").set_index("bin").n_true_per_split.loc[bins]
    ax.set_xticks(x, [f"{b}\n(n≈{c:.0f})" for b, c in zip(bins, counts)])
    ax.set_xlabel("true lesion volume (mm³), true lesions per split")
    ax.set_ylabel("lesion-wise TPR (%)")
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    return save_figure(fig, stem)


def lesion_load(rows: pd.DataFrame, stem: str) -> list[Path]:
    """Predicted against true total lesion volume per test subject (ml), identity line; one panel
    per variant, all splits pooled (log axes: loads span orders of magnitude)."""
    variants = [v for v in VARIANTS if v in set(rows.variant)]
    cols = min(4, len(variants))
    nrows = int(np.ceil(len(variants) / cols))
    fig, axes = plt.subplots(nrows, cols, figsize=(3.2 * cols, 3.2 * nrows), squeeze=False)
    positive = rows[(rows.volume_true_ml > 0)]
    lo = max(float(positive.volume_true_ml.min()) if len(positive) else 1e-3, 1e-3) / 2
    hi = max(float(rows.volume_true_ml.max()), float(rows.volume_pred_ml.max()), lo * 4) * 2
    for ax, variant in zip(axes.ravel(), variants):
        g = rows[rows.variant == variant]
        ax.scatter(g.volume_true_ml.clip(lower=lo), g.volume_pred_ml.clip(lower=lo), s=8, alpha=0.6)
        ax.plot([lo, hi], [lo, hi], color="k", lw=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        ax.set_title(VARIANTS[variant].display_name, fontsize=9)
        ax.set_xlabel("true lesion load (ml)", fontsize=8)
        ax.set_ylabel("predicted (ml)", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in axes.ravel()[len(variants):]:
        ax.axis("off")
    fig.tight_layout()
    return save_figure(fig, stem)


def segmentation_qc(flair: np.ndarray, mask: np.ndarray, spacing: Sequence[float], summary: Mapping, stem: str) -> list[Path]:
    """A new patient's lesion mask in red over three axial FLAIR slices (the most lesioned one and
    two around it); ``flair``, ``mask``: ``(D, H, W)`` brain crops."""
    centre = most_lesioned_slice(mask) if mask.any() else mask.shape[0] // 2
    picks = sorted({int(np.clip(centre + k, 0, mask.shape[0] - 1)) for k in (-3, 0, 3)})
    fig, axes = plt.subplots(1, len(picks), figsize=(4 * len(picks), 4.4), squeeze=False)
    for ax, d in zip(axes[0], picks):
        _overlay(ax, flair[d], mask[d], f"axial slice {d}")
        ax.set_aspect(_aspect(spacing))
    fig.suptitle(f"{summary['lesion_count']} lesions, {summary['total_lesion_volume_ml']:.2f} ml "
                 f"({summary['model']['variant']}, ensemble of {summary['model']['n_models']}); research use only",
                 fontsize=9)
    return save_figure(fig, stem)


def cohort_load(table: pd.DataFrame, stem: str) -> list[Path]:
    """Lesion load of every subject of a cohort, sorted (``evaluation.cohort_table``): one bar per
    subject (total lesion volume, ml), coloured by the mean agreement of the models on its lesions."""
    t = table.sort_values("total_volume_mm3", kind="stable")
    fig, ax = plt.subplots(figsize=(7, max(2.5, 0.28 * len(t) + 1.2)))
    colours = plt.cm.viridis(np.nan_to_num(t.mean_agreement.to_numpy(dtype=float), nan=0.0))
    ml = t.total_volume_mm3 / 1000.0
    ax.barh(t.subject.astype(str), ml, color=colours)
    for y, (n, v) in enumerate(zip(t.lesion_count, ml)):
        ax.text(v, y, f" {n} lesions", va="center", fontsize=8)
    ax.set_xlabel("total lesion volume (ml)")
    ax.set_title(f"Lesion load of {len(t)} subjects (colour: mean agreement of the models, 0-1)")
    sm = plt.cm.ScalarMappable(cmap="viridis", norm=plt.Normalize(0, 1))
    fig.colorbar(sm, ax=ax, label="mean lesion agreement")
    fig.tight_layout()
    return save_figure(fig, stem)


def registration_errors(table: pd.DataFrame, stem: str) -> list[Path]:
    """Registration error against the known truth (demo cohort): one box per contrast.

    ``table`` has columns ``contrast`` and ``mean_error_mm``.
    """
    contrasts = sorted(table.contrast.unique())
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.boxplot([table.loc[table.contrast == c, "mean_error_mm"] for c in contrasts], showfliers=True)
    ax.set_xticks(range(1, len(contrasts) + 1), [f"{c} -> reference" for c in contrasts])
    ax.set_ylabel("mean displacement error over the brain (mm)")
    ax.grid(axis="y", alpha=0.3)
    return save_figure(fig, stem)


def reliability_diagram(table: pd.DataFrame, record: Mapping, stem: str) -> list[Path]:
    """Per-lesion reliability on the test subjects, one panel per ensemble kind: the fraction of
    lesions that are real against the predicted probability (bins of
    :func:`rsanet.calibration.reliability_table`; ``table`` has ``ensemble``, ``score``
    (``calibrated`` or ``agreement``), ``mean_predicted``, ``observed``, ``lesions``), the
    diagonal being perfect calibration. ``record``: the calibration record (ECE per kind)."""
    kinds = list(record["kinds"]) or ["split"]
    fig, axes = plt.subplots(1, len(kinds), figsize=(4.2 * len(kinds), 4.0), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        ax.plot([0, 1], [0, 1], color="0.6", lw=1, ls="--", label="calibrated perfectly")
        test = record["kinds"].get(kind, {}).get("test", {})
        for score, colour, label in (("calibrated", "C0", f"calibrated (ECE {test.get('ece', float('nan')):.3f})"),
                                     ("agreement", "C1", "raw agreement (ECE "
                                      f"{test.get('ece_agreement', float('nan')):.3f})")):
            rows = table[(table.ensemble == kind) & (table.score == score)] if len(table) else table
            if len(rows):
                ax.plot(rows.mean_predicted, rows.observed, "o-", color=colour, label=label, ms=3)
                ax.scatter(rows.mean_predicted, rows.observed, s=8 + 60 * rows.lesions / rows.lesions.max(),
                           color=colour, alpha=0.4)
        if not len(table) or not (table.ensemble == kind).any():
            ax.text(0.5, 0.5, "not measured\n(no calibration or test lesions)", ha="center", va="center",
                    transform=ax.transAxes)
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="predicted probability that the lesion is real",
               ylabel="fraction of lesions that are real",
               title=f"{record['variant']}, {kind} ensemble: {test.get('lesions', 0)} test lesions")
        ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    return save_figure(fig, stem)
