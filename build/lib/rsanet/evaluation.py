"""From per-subject metrics to the paper's Table 1, a lesion-wise/volume table and paired tests.

Per-subject rows come from :func:`rsanet.metrics.evaluate_case`; everything here is pandas on
those rows (no file I/O except the small writers at the end).

Table 1 convention (Section 3.2): for one variant and one split, the *sample* average is the
mean of the per-subject Dice (IoU) over the test subjects, the *voxel* average is one Dice (IoU)
from TP/FP/FN pooled over the test subjects; the table shows mean ± sd of these over splits,
in percent, like the paper.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import pandas as pd
from scipy import stats

from .metrics import dice_from_counts, iou_from_counts
from .models import VARIANTS
from .volumes import atomic_path

#: The paper's Table 1 (their private 43-patient data), in percent.
PAPER_TABLE1: dict[str, tuple[float, float, float, float]] = {
    "unet3d": (63.984, 69.640, 48.754, 53.506),
    "ncl-010": (64.346, 70.473, 49.231, 54.500),
    "ncl-101": (64.069, 70.121, 49.103, 54.090),
    "ncl-111": (64.074, 70.185, 48.833, 54.170),
    "rsa-010": (65.300, 70.207, 50.248, 54.200),
    "rsa-101": (65.949, 71.589, 50.896, 55.847),
    "rsa-111": (66.011, 71.054, 50.917, 55.201),
}
TABLE1_METRICS = ("sample_dice", "voxel_dice", "sample_iou", "voxel_iou")
TABLE2_METRICS = ("ltpr", "lfpr", "lesion_f1", "abs_volume_error_ml", "rel_volume_error")


def split_scores(rows: pd.DataFrame) -> pd.DataFrame:
    """One row per (variant, split) with the four Table 1 numbers and the Table 2 means.

    Args:
        rows: per-subject metrics with columns ``variant, split, subject, tp, fp, fn, dice,
            iou`` and the lesion-wise/volume columns.

    Returns:
        Columns ``variant, split, n_test`` + :data:`TABLE1_METRICS` (fractions, not percent)
        + :data:`TABLE2_METRICS` (per-split means over subjects, NaN-aware).
    """
    out = []
    for (variant, split), g in rows.groupby(["variant", "split"], sort=False):
        tp, fp, fn = int(g.tp.sum()), int(g.fp.sum()), int(g.fn.sum())
        rec = {
            "variant": variant, "split": int(split), "n_test": len(g),
            "sample_dice": g.dice.mean(), "voxel_dice": dice_from_counts(tp, fp, fn),
            "sample_iou": g.iou.mean(), "voxel_iou": iou_from_counts(tp, fp, fn),
        }
        for m in TABLE2_METRICS:
            rec[m] = float(np.nanmean(g[m])) if g[m].notna().any() else float("nan")
        out.append(rec)
    return pd.DataFrame(out)


def _order(variants: Sequence[str]) -> list[str]:
    return [v for v in VARIANTS if v in set(variants)]


def table1(rows: pd.DataFrame) -> pd.DataFrame:
    """Table 1: per variant, mean and sd over splits of the four numbers, percent, with the paper's."""
    out = _mean_sd_over_splits(split_scores(rows), {m: 100 for m in TABLE1_METRICS})
    for i, m in enumerate(TABLE1_METRICS):
        out[f"{m}_paper"] = [PAPER_TABLE1[v][i] for v in out.variant]
    order = ["variant", "method", "n_splits"] + [f"{m}_{k}" for m in TABLE1_METRICS for k in ("mean", "sd", "paper")]
    return out[order]


def table2(rows: pd.DataFrame) -> pd.DataFrame:
    """Lesion-wise detection and lesion-volume error per variant: mean and sd over splits."""
    scales = {m: 1 if m == "abs_volume_error_ml" else 100 for m in TABLE2_METRICS}
    return _mean_sd_over_splits(split_scores(rows), scales)


def _mean_sd_over_splits(per_split: pd.DataFrame, scales: dict[str, float]) -> pd.DataFrame:
    """Per variant (Table 1 order): ``<metric>_mean`` and ``<metric>_sd`` over splits, scaled."""
    records = []
    for variant in _order(per_split.variant.unique()):
        g = per_split[per_split.variant == variant]
        rec = {"variant": variant, "method": VARIANTS[variant].display_name, "n_splits": len(g)}
        for m, scale in scales.items():
            rec[f"{m}_mean"] = scale * g[m].mean()
            rec[f"{m}_sd"] = scale * g[m].std(ddof=1) if len(g) > 1 else float("nan")
        records.append(rec)
    return pd.DataFrame(records)


def paired_tests(rows: pd.DataFrame, reference: str = "unet3d", metric: str = "dice") -> pd.DataFrame:
    """Each variant against ``reference`` on the same (split, subject) pairs.

    Reports the mean paired difference (percentage points), the Wilcoxon signed-rank test over
    all (split, subject) pairs (subjects recur across splits, so pairs are not independent:
    read the p-value as descriptive), and how many splits the variant wins on sample average.
    """
    key = ["split", "subject"]
    ref = rows[rows.variant == reference].set_index(key)[metric]
    records = []
    for variant in _order(rows.variant.unique()):
        if variant == reference:
            continue
        other = rows[rows.variant == variant].set_index(key)[metric]
        both = pd.concat([other, ref], axis=1, keys=["v", "r"], join="inner").dropna()
        diff = both.v - both.r
        if len(diff) and np.any(diff != 0):
            p = float(stats.wilcoxon(both.v, both.r).pvalue)
        else:
            p = float("nan")
        by_split = both.groupby(level="split").mean()
        records.append({
            "variant": variant, "method": VARIANTS[variant].display_name, "reference": VARIANTS[reference].display_name,
            "metric": metric, "n_pairs": len(diff), "mean_difference_pp": 100 * diff.mean() if len(diff) else float("nan"),
            "wilcoxon_p": p, "splits_won": int((by_split.v > by_split.r).sum()), "n_splits": len(by_split),
        })
    return pd.DataFrame(records)


# ---------------------------------------------------------------------------------------------
# Writers
# ---------------------------------------------------------------------------------------------
def _pm(mean: float, sd: float, digits: int) -> str:
    if np.isnan(mean):
        return "n/a"
    return f"{mean:.{digits}f}" if np.isnan(sd) else f"{mean:.{digits}f} ± {sd:.{digits}f}"


def table1_display(t1: pd.DataFrame) -> pd.DataFrame:
    """Table 1 as strings: 'ours mean ± sd' next to the paper's number for each metric."""
    names = {"sample_dice": "Sample Dice", "voxel_dice": "Voxel Dice", "sample_iou": "Sample IoU", "voxel_iou": "Voxel IoU"}
    out = pd.DataFrame({"Method": t1.method})
    for m, label in names.items():
        out[label] = [_pm(a, b, 2) for a, b in zip(t1[f"{m}_mean"], t1[f"{m}_sd"])]
        out[f"{label} (paper)"] = [f"{v:.3f}" for v in t1[f"{m}_paper"]]
    return out


def table2_display(t2: pd.DataFrame) -> pd.DataFrame:
    names = {
        "ltpr": "Lesion TPR (%)", "lfpr": "Lesion FPR (%)", "lesion_f1": "Lesion F1 (%)",
        "abs_volume_error_ml": "|ΔV| (ml)", "rel_volume_error": "ΔV/V (%)",
    }
    out = pd.DataFrame({"Method": t2.method})
    for m, label in names.items():
        out[label] = [_pm(a, b, 2) for a, b in zip(t2[f"{m}_mean"], t2[f"{m}_sd"])]
    return out


def to_markdown(df: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table (no extra dependency)."""
    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for row in df.itertuples(index=False):
        lines.append("| " + " | ".join(_fmt(v) for v in row) + " |")
    return "\n".join(lines) + "\n"


def to_latex(df: pd.DataFrame, caption: str, label: str) -> str:
    """A booktabs LaTeX table."""
    esc = lambda s: str(s).replace("%", r"\%").replace("±", r"$\pm$").replace("_", r"\_").replace("Δ", r"$\Delta$")
    cols = "l" + "r" * (len(df.columns) - 1)
    lines = [r"\begin{table}[t]", r"\centering", rf"\caption{{{esc(caption)}}}", rf"\label{{{label}}}",
             rf"\begin{{tabular}}{{{cols}}}", r"\toprule", " & ".join(esc(c) for c in df.columns) + r" \\", r"\midrule"]
    lines += [" & ".join(esc(_fmt(v)) for v in row) + r" \\" for row in df.itertuples(index=False)]
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return "n/a" if np.isnan(v) else f"{v:.4g}"
    return str(v)


def write_text(text: str, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_csv(df: pd.DataFrame, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)
