"""From per-subject metrics to the paper's Table 1, a lesion-wise/volume table and paired tests.

Per-subject rows come from :func:`rsanet.metrics.evaluate_case`; everything here is pandas on
those rows (no file I/O except the small writers at the end).

Table 1 convention (Section 3.2): for one variant and one split, the *sample* average is the
mean of the per-subject Dice (IoU) over the test subjects, the *voxel* average is one Dice (IoU)
from TP/FP/FN pooled over the test subjects; the table shows mean ± sd of these over splits,
in percent, like the paper.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
from scipy import stats

from .metrics import dice_from_counts, iou_from_counts
from .models import VARIANTS
from .files import staged

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
TABLE2_METRICS = ("ltpr", "lfpr", "lesion_f1", "hd95_mm", "assd_mm", "abs_volume_error_ml", "rel_volume_error",
                  "abs_rel_volume_error")
#: Table 2 metrics in their own unit (mm, ml); the others are fractions shown in percent.
_UNIT_METRICS = ("hd95_mm", "assd_mm", "abs_volume_error_ml")


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


def table1(rows: pd.DataFrame, health: pd.DataFrame | None = None) -> pd.DataFrame:
    """Table 1: per variant, mean and sd over splits of the four numbers, percent, with the paper's.

    With ``health`` (one row per training: ``variant, split, seed, learned``, see
    :func:`failed_trainings`), the columns ``n_trainings`` and ``n_failed`` say how many of the
    trainings behind each row failed their health check (their scores are included, not hidden).
    """
    out = _mean_sd_over_splits(mean_over_seeds(rows), {m: 100 for m in TABLE1_METRICS})
    for i, m in enumerate(TABLE1_METRICS):
        out[f"{m}_paper"] = [PAPER_TABLE1[v][i] for v in out.variant]
    order = ["variant", "method", "n_splits"]
    if health is not None:
        counts = failed_trainings(health).set_index("variant")
        out["n_trainings"] = [int(counts.n_trainings.get(v, 0)) for v in out.variant]
        out["n_failed"] = [int(counts.n_failed.get(v, 0)) for v in out.variant]
        order += ["n_trainings", "n_failed"]
        if "attention_inert" in health:
            att = attention_summary(health).set_index("variant")
            out["n_attention_inert"] = [int(att.n_inert.get(v, 0)) for v in out.variant]
            out["n_attention_checked"] = [int(att.n_checked.get(v, 0)) for v in out.variant]
            out["attention_off_delta_pp"] = [float(att.sample_dice_delta_pp.get(v, float("nan"))) for v in out.variant]
            order += ["n_attention_inert", "n_attention_checked", "attention_off_delta_pp"]
    return out[order + [f"{m}_{k}" for m in TABLE1_METRICS for k in ("mean", "sd", "paper")]]


def failed_trainings(health: pd.DataFrame) -> pd.DataFrame:
    """Per variant (Table 1 order): ``n_trainings``, ``n_failed`` and ``failed`` (the failed
    runs as ``"split k seed s"``, comma-separated) from one row per training with columns
    ``variant, split, seed, learned`` (bool)."""
    out = []
    for variant in _order(health.variant.unique()):
        g = health[health.variant == variant]
        bad = g[~g.learned.astype(bool)]
        out.append({"variant": variant, "method": VARIANTS[variant].display_name, "n_trainings": len(g),
                    "n_failed": len(bad),
                    "failed": ", ".join(f"split {int(a)} seed {int(b)}" for a, b in zip(bad.split, bad.seed))})
    return pd.DataFrame(out, columns=["variant", "method", "n_trainings", "n_failed", "failed"])


def attention_summary(health: pd.DataFrame) -> pd.DataFrame:
    """Per variant (Table 1 order) from one row per training (:func:`read_health`):
    ``n_checked`` (trainings with an attention check; 0 for the 3D U-Net), ``n_inert``, ``inert``
    (the inert runs as ``"split k seed s"``), and means over the checked trainings of
    ``changed_pct`` (predicted lesion voxels that change with the attention off, %),
    ``sample_dice_delta_pp`` (validation-patch sample Dice off minus on, points),
    ``dice_delta_pp`` (pooled hard Dice, off minus on) and ``scale_max`` (largest |scale|)."""
    out = []
    for variant in _order(health.variant.unique()):
        g = health[(health.variant == variant) & health.attention_inert.notna()]
        inert = g[g.attention_inert.astype(bool)]
        delta = lambda on, off: float(100 * (g[off].astype(float) - g[on].astype(float)).mean())  # NaN if none
        out.append({
            "variant": variant, "method": VARIANTS[variant].display_name, "n_checked": len(g), "n_inert": len(inert),
            "inert": ", ".join(f"split {int(a)} seed {int(b)}" for a, b in zip(inert.split, inert.seed)),
            "changed_pct": float(100 * g.attention_changed_share.astype(float).mean()),
            "sample_dice_delta_pp": delta("attention_sample_dice_on", "attention_sample_dice_off"),
            "dice_delta_pp": delta("attention_dice_on", "attention_dice_off"),
            "scale_max": float(g.attention_scale_max.astype(float).mean()),
        })
    return pd.DataFrame(out, columns=["variant", "method", "n_checked", "n_inert", "inert", "changed_pct",
                                      "sample_dice_delta_pp", "dice_delta_pp", "scale_max"])


def attention_summary_display(att: pd.DataFrame) -> pd.DataFrame:
    """:func:`attention_summary` as strings, one row per attention variant."""
    att = att[att.n_checked > 0]
    return pd.DataFrame({
        "Method": att.method,
        "Attention inert": [f"{a}/{b}" + (f" ({w})" if w else "") for a, b, w in zip(att.n_inert, att.n_checked, att.inert)],
        "changed voxels (%)": [f"{v:.1f}" for v in att.changed_pct],
        "Δ sample Dice, off (pp)": [f"{v:+.2f}" for v in att.sample_dice_delta_pp],
        "Δ pooled Dice, off (pp)": [f"{v:+.2f}" for v in att.dice_delta_pp],
        "largest |scale|": [f"{v:.3f}" for v in att.scale_max],
    })


def seeds_note(seed_counts: Mapping[str, int]) -> str:
    """How many training seeds each per-split score averages, for table notes ('' for one seed)."""
    counts = {v: int(n) for v, n in dict(seed_counts).items()}
    if not counts or max(counts.values()) <= 1:
        return ""
    if len(set(counts.values())) == 1:
        return f", each split the mean of {next(iter(counts.values()))} training seeds"
    more = ", ".join(f"{VARIANTS[v].display_name} {n}" for v, n in counts.items() if n > 1)
    return f", each split the mean of its training seeds ({more}; 1 for the others)"


def findings(t1: pd.DataFrame, tests: pd.DataFrame, attention: pd.DataFrame, n_failed: int, n_trainings: int,
             seeds: str = "", metric: str = "sample_dice", main: str = "rsa-111") -> str:
    """The headline of a run in Markdown, generated from its tables: Table 1's range, the
    failed and attention-inert trainings, and every comparison with the U-Net in words
    (:func:`comparison_reading`), the main one (``main`` against the 3D U-Net) first."""
    lines = ["# What this run found", ""]
    mean = t1[f"{metric}_mean"]
    lines.append(f"- Table 1, sample Dice: {mean.min():.2f}–{mean.max():.2f} % over the {len(t1)} variant{'s' if len(t1) != 1 else ''} "
                 f"(mean over {int(t1.n_splits.max())} splits{seeds}).")
    lines.append(f"- Trainings that failed their health check: {n_failed} of {n_trainings}.")
    checked = attention[attention.n_checked > 0]
    if len(checked):
        inert = int(checked.n_inert.sum())
        per = "; ".join(f"{m} {d:+.2f}" for m, d in zip(checked.method, checked.sample_dice_delta_pp))
        lines.append(f"- Attention inert (switching it off changes almost nothing): {inert} of "
                     f"{int(checked.n_checked.sum())} attention trainings. Validation-patch sample Dice with the "
                     f"attention switched off, minus on (points): {per}.")
        if inert:
            lines.append("  Variants whose attention is inert compare the 3D U-Net with itself.")
    rows = tests[tests.metric == metric]
    order = sorted(range(len(rows)), key=lambda i: rows.variant.iloc[i] != main)
    lines += ["", f"## Each variant against the 3D U-Net ({metric.replace('_', ' ')}, corrected resampled t-test)", ""]
    for i in order:
        r = rows.iloc[i]
        reading = comparison_reading(r.p, r.mean_difference_pp, r.detectable_pp, r.paper_difference_pp, r.power_for_paper)
        lines.append(f"- **{r.method}**: {r.mean_difference_pp:+.2f} points [{r.ci_low_pp:+.2f}, {r.ci_high_pp:+.2f}], "
                     f"p = {r.p:.3f}; {reading}.")
    if not order:
        lines.append("- None: this run trained no variant besides the 3D U-Net.")
    return "\n".join(lines) + "\n"


def findings_paragraph(markdown: str) -> str:
    """The opening paragraph of a run's report from its :func:`findings` (Markdown): the headline
    bullets and the main comparison (the first one listed), as one paragraph of sentences."""
    head, _, rest = markdown.partition("\n## ")
    bullets = [ln[2:].strip() for ln in head.splitlines() if ln.startswith("- ")]
    bullets += [ln.strip() for ln in head.splitlines() if ln.startswith("  ") and ln.strip()]
    main = next((ln[2:].strip() for ln in rest.splitlines() if ln.startswith("- ")), None)
    if main:
        bullets.append("Main comparison against the 3D U-Net: " + main.replace("**", ""))
    return " ".join(bullets)


class ReportOpening:
    """The report's opening paragraph (:func:`findings_paragraph` of ``path``), read when the
    report is rendered (``str()``), so a report built right after the run states what it found;
    empty while ``path`` does not exist."""

    def __init__(self, path: str | Path):
        self.path = str(path)

    def __str__(self) -> str:
        p = Path(self.path)
        return findings_paragraph(p.read_text()) if p.is_file() else ""


def markdown_to_html(text: str) -> str:
    """The small Markdown subset of :func:`findings` (headings, bullets, bold) as an HTML page."""
    import html
    import re

    out, in_list = ['<html><head><meta charset="utf-8"></head><body style="font-family: sans-serif">'], False
    for line in text.splitlines():
        body = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", html.escape(line.strip().lstrip("- ").strip()))
        is_item = line.startswith("- ")
        if in_list and not is_item and not line.startswith("  "):
            out.append("</ul>")
            in_list = False
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            out.append(f"<h{level}>{body.lstrip('#').strip()}</h{level}>")
        elif is_item:
            if not in_list:
                out.append("<ul>")
                in_list = True
            out.append(f"<li>{body}</li>")
        elif line.strip():
            out.append(f"<p>{body}</p>")
    if in_list:
        out.append("</ul>")
    return "\n".join(out + ["</body></html>"]) + "\n"


def table2(rows: pd.DataFrame) -> pd.DataFrame:
    """Lesion-wise detection and lesion-volume error per variant: mean and sd over splits."""
    scales = {m: 1 if m in _UNIT_METRICS else 100 for m in TABLE2_METRICS}
    return _mean_sd_over_splits(mean_over_seeds(rows), scales)


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


def corrected_resampled_ttest(
    differences: Sequence[float], n_train: int, n_test: int, confidence: float = 0.95
) -> dict[str, float]:
    """Nadeau & Bengio's corrected resampled t-test on per-split differences.

    Repeated random splits share subjects between their test sets and their training sets, so
    the per-split scores are not independent and the plain t-test's variance ``var(d) / J`` is
    too small. Nadeau & Bengio (Machine Learning 52:239-281, 2003) correct it to
    ``(1/J + n_test/n_train) * var(d)``:

    ``t = mean(d) / sqrt((1/J + n_test/n_train) * var(d))``, ``J - 1`` degrees of freedom,

    with ``var`` the sample variance (``ddof=1``) of the ``J`` differences ``d_j`` (e.g. a
    variant's Table 1 score minus the U-Net's on split ``j``).

    Args:
        differences: ``J`` per-split differences, in the metric's own unit.
        n_train: subjects each model was fitted on; n_test: test subjects per split.
        confidence: of the two-sided interval.

    Returns:
        ``mean``, ``ci_low``, ``ci_high`` (same unit as ``differences``), ``t``, ``dof``, ``p``
        (two-sided). With fewer than two splits, or differences that do not vary, ``t``/``p``/the
        interval are NaN (``p`` is NaN rather than 0 or 1: the test is undefined there).
    """
    d = np.asarray(differences, dtype=np.float64)
    j = len(d)
    nan = float("nan")
    mean = float(d.mean()) if j else nan
    out = {"mean": mean, "ci_low": nan, "ci_high": nan, "t": nan, "dof": float(j - 1), "p": nan}
    if j < 2 or n_train < 1:
        return out
    if np.ptp(d) == 0:  # no spread: the statistic is undefined
        return out
    var = float(d.var(ddof=1))
    se = math.sqrt((1.0 / j + n_test / n_train) * var)
    t = mean / se
    half = float(stats.t.ppf(0.5 + confidence / 2, j - 1)) * se
    out.update(t=t, p=float(2 * stats.t.sf(abs(t), j - 1)), ci_low=mean - half, ci_high=mean + half)
    return out


def corrected_ttest_power(difference: float, sd: float, n_splits: int, n_train: int, n_test: int,
                          alpha: float = 0.05) -> float:
    """Power of :func:`corrected_resampled_ttest` (two-sided, level ``alpha``) to detect a true
    mean per-split difference ``difference`` when the per-split differences have standard
    deviation ``sd`` (both in the same unit, e.g. percentage points).

    Under the test's own variance model the statistic is noncentral t with ``J - 1`` degrees of
    freedom and noncentrality ``difference / sqrt((1/J + n_test/n_train) * sd**2)``; the power is
    ``P(|T| > t_{1-alpha/2, J-1})``. NaN when ``sd`` is NaN or ``J < 2``; 1 when ``sd`` is 0 and
    ``difference`` is not. Assumptions (docs/metrics.md, "What a comparison could have seen"):
    the per-split differences are normal with a common ``sd`` and their correlation is the one
    Nadeau & Bengio's correction assumes.
    """
    j = int(n_splits)
    if j < 2 or n_train < 1 or not np.isfinite(sd) or not np.isfinite(difference):
        return float("nan")
    if sd == 0:
        return 1.0 if difference != 0 else float("nan")
    se = math.sqrt((1.0 / j + n_test / n_train)) * sd
    crit = float(stats.t.ppf(1 - alpha / 2, j - 1))
    ncp = difference / se
    # the far tail is below 1e-12 wherever scipy returns NaN for it (|ncp| large)
    far = float(np.nan_to_num(stats.nct.cdf(-crit, j - 1, abs(ncp)), nan=0.0))
    return float(stats.nct.sf(crit, j - 1, abs(ncp))) + far


def detectable_difference(sd: float, n_splits: int, n_train: int, n_test: int, alpha: float = 0.05,
                          power: float = 0.8) -> float:
    """The smallest true mean difference (same unit as ``sd``) that :func:`corrected_resampled_ttest`
    detects with probability ``power`` at level ``alpha`` (two-sided), i.e. the root of
    :func:`corrected_ttest_power` ``= power``. NaN where the power is undefined."""
    j = int(n_splits)
    if j < 2 or n_train < 1 or not np.isfinite(sd):
        return float("nan")
    if sd == 0:
        return 0.0
    se = math.sqrt((1.0 / j + n_test / n_train)) * sd
    from scipy.optimize import brentq

    hi = (float(stats.t.ppf(1 - alpha / 2, j - 1)) + float(stats.t.ppf(power, j - 1))) * se
    while corrected_ttest_power(hi, sd, j, n_train, n_test, alpha) < power:  # few splits: heavy tails
        hi *= 2.0
    return float(brentq(lambda d: corrected_ttest_power(d, sd, j, n_train, n_test, alpha) - power, 0.0, hi, xtol=1e-10))


#: The columns of :func:`paired_tests` (see there).
PAIRED_TEST_COLUMNS = ["variant", "method", "reference", "metric", "mean_difference_pp", "ci_low_pp", "ci_high_pp",
                       "t", "dof", "p", "splits_won", "n_splits", "n_train", "n_test", "sd_pp", "detectable_pp",
                       "paper_difference_pp", "power_for_paper"]


def paired_tests(per_split: pd.DataFrame, n_train: int, reference: str = "unet3d") -> pd.DataFrame:
    """Each variant against ``reference`` on every Table 1 metric, over splits.

    The unit of replication is the split (subjects recur across splits, so (split, subject)
    pairs would be pseudo-replicated): per split, the difference of the variant's Table 1 score
    and the reference's; then :func:`corrected_resampled_ttest` over the splits.

    Args:
        per_split: :func:`split_scores` rows (one per variant and split; where a study trains
            several seeds, average them per split first: :func:`mean_over_seeds`).
        n_train: subjects each model was fitted on (validation part excluded).

    Returns:
        One row per (variant, metric): ``mean_difference_pp``, ``ci_low_pp``, ``ci_high_pp``
        (percentage points, corrected 95 % interval), ``t``, ``dof``, ``p``, ``splits_won``,
        ``n_splits``, ``n_train``, ``n_test``; and what the comparison could have seen:
        ``sd_pp`` (sd of the per-split differences), ``detectable_pp`` (:func:`detectable_difference`
        at 80 % power, alpha 0.05), ``paper_difference_pp`` (the paper's Table 1 difference of the
        two methods) and ``power_for_paper`` (:func:`corrected_ttest_power` of that difference).
    """
    ref = per_split[per_split.variant == reference]
    records = []
    for variant in _order(per_split.variant.unique()):
        if variant == reference:
            continue
        other = per_split[per_split.variant == variant]
        for metric in TABLE1_METRICS:
            k = TABLE1_METRICS.index(metric)
            paper_diff = PAPER_TABLE1[variant][k] - PAPER_TABLE1[reference][k]  # percent
            records.append({
                "variant": variant, "method": VARIANTS[variant].display_name,
                "reference": VARIANTS[reference].display_name, "metric": metric,
                **compare_arms(other, ref, metric, n_train, paper_diff),
            })
    # a study of the reference alone has nothing to compare: no rows, the same columns
    return pd.DataFrame(records, columns=PAIRED_TEST_COLUMNS)


def compare_arms(arm: pd.DataFrame, reference: pd.DataFrame, metric: str, n_train: int,
                 paper_difference_pp: float = float("nan")) -> dict:
    """One paired comparison over splits: ``arm`` minus ``reference`` on ``metric``.

    Args:
        arm, reference: :func:`split_scores` rows (columns ``split``, ``n_test``, ``metric``) of
            the two arms; the splits both have are compared.
        metric: a fraction (e.g. ``"sample_dice"``); results are in percentage points.
        n_train: subjects each model was fitted on.
        paper_difference_pp: a difference to report the power for (the paper's; NaN: none).

    Returns:
        ``mean_difference_pp``, ``ci_low_pp``, ``ci_high_pp``, ``t``, ``dof``, ``p``,
        ``splits_won``, ``n_splits``, ``n_train``, ``n_test``, ``sd_pp``, ``detectable_pp``,
        ``paper_difference_pp``, ``power_for_paper`` (see :func:`paired_tests`).
    """
    a, b = arm.set_index("split"), reference.set_index("split")
    common = a.index.intersection(b.index)
    n_test = int(a.loc[common, "n_test"].min()) if len(common) else 0
    d = (a.loc[common, metric] - b.loc[common, metric]).to_numpy(dtype=float)
    res = corrected_resampled_ttest(d, n_train, n_test)
    sd = float(np.std(d, ddof=1)) if len(d) > 1 else float("nan")
    return {
        "mean_difference_pp": 100 * res["mean"], "ci_low_pp": 100 * res["ci_low"],
        "ci_high_pp": 100 * res["ci_high"], "t": res["t"], "dof": res["dof"], "p": res["p"],
        "splits_won": int((d > 0).sum()), "n_splits": len(d), "n_train": n_train, "n_test": n_test,
        "sd_pp": 100 * sd, "detectable_pp": 100 * detectable_difference(sd, len(d), n_train, n_test),
        "paper_difference_pp": paper_difference_pp,
        "power_for_paper": corrected_ttest_power(paper_difference_pp / 100, sd, len(d), n_train, n_test),
    }




def mean_over_seeds(rows: pd.DataFrame) -> pd.DataFrame:
    """Per-subject rows of several training seeds -> :func:`split_scores` averaged over seeds.

    Each seed's Table 1 numbers are computed on its own (sample and voxel averages per split and
    seed), then averaged over seeds per (variant, split). Rows without a ``seed`` column count
    as one seed.
    """
    if "seed" not in rows or rows["seed"].nunique() <= 1:
        return split_scores(rows)
    per_seed = pd.concat(
        [split_scores(g).assign(seed=s) for s, g in rows.groupby("seed", sort=True)], ignore_index=True
    )
    numeric = [c for c in per_seed.columns if c not in ("variant", "split", "seed")]
    out = per_seed.groupby(["variant", "split"], sort=False)[numeric].mean().reset_index()
    out["n_test"] = out["n_test"].round().astype(int)
    return out


def read_health(health_jsons: Sequence[str]) -> pd.DataFrame:
    """One row per training from its ``health.json``: variant, split, seed (index), learned, score,
    floor, source, stopped_at, and the attention check (``attention_*``: inert, the share of
    predicted lesion voxels that change with the attention off, the validation-patch hard Dice
    and sample Dice on and off (0-1), the largest learned scale; empty for the 3D U-Net)."""
    recs = [json.loads(Path(p).read_text()) for p in health_jsons]
    cols = ["variant", "split", "seed_index", "learned", "score", "floor", "source", "stopped_at"]
    checks = {"inert": "attention_inert", "changed_share": "attention_changed_share", "dice_on": "attention_dice_on",
              "dice_off": "attention_dice_off", "sample_dice_on": "attention_sample_dice_on",
              "sample_dice_off": "attention_sample_dice_off"}
    rows = []
    for r in recs:
        row = {c: r.get(c) for c in cols}
        check = r.get("attention") or {}
        row.update({name: check.get(key) for key, name in checks.items()})
        scales = [abs(v) for vs in check.get("scales", {}).values() for v in vs]
        row["attention_scale_max"] = max(scales) if scales else None
        rows.append(row)
    df = pd.DataFrame(rows, columns=cols + list(checks.values()) + ["attention_scale_max"])
    return df.rename(columns={"seed_index": "seed"})


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
    if "n_failed" in t1:
        out["Failed trainings"] = [f"{a}/{b}" for a, b in zip(t1.n_failed, t1.n_trainings)]
    if "n_attention_inert" in t1:
        out["Attention inert"] = ["—" if not b else f"{a}/{b}" for a, b in zip(t1.n_attention_inert, t1.n_attention_checked)]
        out["Δ attention off (pp)"] = ["—" if np.isnan(v) else f"{v:+.2f}" for v in t1.attention_off_delta_pp]
    for m, label in names.items():
        out[label] = [_pm(a, b, 2) for a, b in zip(t1[f"{m}_mean"], t1[f"{m}_sd"])]
        out[f"{label} (paper)"] = [f"{v:.3f}" for v in t1[f"{m}_paper"]]
    return out


def comparison_reading(p: float, mean_pp: float, detectable_pp: float, paper_pp: float, power_for_paper: float,
                       alpha: float = 0.05) -> str:
    """One comparison in words, never "no significant difference" alone: the verdict at ``alpha``
    with what the design could have detected (80 % power) and its power for the paper's difference."""
    if not np.isfinite(p):
        return "no test (fewer than 2 splits, or no spread)"
    seen = (f"detectable with 80 % power: ±{detectable_pp:.1f} points; power for the paper's "
            f"{paper_pp:+.2f}: {power_for_paper:.0%}")
    if p < alpha:
        return f"differs ({mean_pp:+.2f} points, p < {alpha:g}); {seen}"
    if detectable_pp > abs(paper_pp):
        return (f"no significant difference, and this study could not have seen the paper's difference "
                f"({seen})")
    return f"no significant difference, although the paper's difference was detectable ({seen})"


def paired_tests_display(tests: pd.DataFrame) -> pd.DataFrame:
    """The corrected resampled t-tests as strings: difference [95 % CI] in points, p (3 significant
    digits), splits won, what the comparison could have detected, and the reading in words."""
    names = {"sample_dice": "Sample Dice", "voxel_dice": "Voxel Dice", "sample_iou": "Sample IoU", "voxel_iou": "Voxel IoU"}
    fmt = lambda v, d=2: "n/a" if np.isnan(v) else f"{v:+.{d}f}"
    return pd.DataFrame({
        "Method": tests.method, "Metric": [names[m] for m in tests.metric],
        f"Δ vs {tests.reference.iloc[0] if len(tests) else 'reference'} (pp)": [fmt(v) for v in tests.mean_difference_pp],
        "95 % CI (corrected)": [f"[{fmt(a)}, {fmt(b)}]" for a, b in zip(tests.ci_low_pp, tests.ci_high_pp)],
        "p": ["n/a" if np.isnan(p) else f"{p:.3f}" for p in tests.p],
        "splits won": [f"{w}/{n}" for w, n in zip(tests.splits_won, tests.n_splits)],
        "detectable Δ, 80 % power (pp)": ["n/a" if np.isnan(v) else f"{v:.2f}" for v in tests.detectable_pp],
        "paper's Δ (pp)": [f"{v:+.2f}" for v in tests.paper_difference_pp],
        "power for paper's Δ": ["n/a" if np.isnan(v) else f"{v:.0%}" for v in tests.power_for_paper],
        "reading": [comparison_reading(*a) for a in zip(tests.p, tests.mean_difference_pp, tests.detectable_pp,
                                                         tests.paper_difference_pp, tests.power_for_paper)],
    })


def table2_display(t2: pd.DataFrame) -> pd.DataFrame:
    names = {
        "ltpr": "Lesion TPR (%)", "lfpr": "Lesion FPR (%)", "lesion_f1": "Lesion F1 (%)",
        "hd95_mm": "HD95 (mm)", "assd_mm": "ASSD (mm)",
        "abs_volume_error_ml": "|ΔV| (ml)", "rel_volume_error": "ΔV/V (%)", "abs_rel_volume_error": "|ΔV|/V (%)",
    }
    out = pd.DataFrame({"Method": t2.method})
    for m, label in names.items():
        out[label] = [_pm(a, b, 2) for a, b in zip(t2[f"{m}_mean"], t2[f"{m}_sd"])]
    return out


def detection_by_size(rows: pd.DataFrame) -> pd.DataFrame:
    """Lesion-wise TPR per true-lesion volume bin, per variant: mean and sd over splits.

    Per (variant, split[, seed]) the true and detected lesions of a bin are pooled over the test
    subjects (columns ``n_true_lesions[<bin>]`` / ``n_detected_lesions[<bin>]`` of
    :func:`rsanet.metrics.evaluate_case`), giving one LTPR per split (NaN where the split has
    no lesion of that size); seeds are averaged per split, then mean and sd over splits.

    Returns:
        Columns ``variant, method, bin, n_true_per_split`` (mean count of true lesions of that
        size per split), ``ltpr_mean, ltpr_sd`` (percent), ``n_splits``.
    """
    bins = [c[len("n_true_lesions["):-1] for c in rows.columns if c.startswith("n_true_lesions[")]
    keys = ["variant", "split"] + (["seed"] if "seed" in rows else [])
    records = []
    for variant in _order(rows.variant.unique()):
        g = rows[rows.variant == variant]
        for b in bins:
            pooled = g.groupby(keys)[[f"n_true_lesions[{b}]", f"n_detected_lesions[{b}]"]].sum()
            n_true, n_found = pooled.iloc[:, 0], pooled.iloc[:, 1]
            ltpr = (n_found / n_true.where(n_true > 0)).groupby(level="split").mean()
            counts = n_true.groupby(level="split").mean()
            valid = ltpr.dropna()
            records.append({
                "variant": variant, "method": VARIANTS[variant].display_name, "bin": b,
                "n_true_per_split": float(counts.mean()),
                "ltpr_mean": 100 * float(valid.mean()) if len(valid) else float("nan"),
                "ltpr_sd": 100 * float(valid.std(ddof=1)) if len(valid) > 1 else float("nan"),
                "n_splits": int(len(valid)),
            })
    return pd.DataFrame(records)


def detection_by_size_display(table: pd.DataFrame) -> pd.DataFrame:
    """Detection by size as a wide table: one row per variant, one column per bin (LTPR %), the
    bin's true lesions per split (mean) in its header."""
    bins = list(dict.fromkeys(table.bin))
    counts = table.drop_duplicates("bin").set_index("bin").n_true_per_split
    out = {"Method": list(dict.fromkeys(table.method))}
    for b in bins:
        sub = table[table.bin == b]
        out[f"{b} mm³ ({counts[b]:.1f} true per split)"] = [_pm(a, c, 1) for a, c in zip(sub.ltpr_mean, sub.ltpr_sd)]
    return pd.DataFrame(out)


def cohort_table(summaries: Mapping[str, Mapping], lesions: Mapping[str, pd.DataFrame],
                 size_bins_mm3: Sequence[float]) -> pd.DataFrame:
    """One row per segmented subject of a cohort (``rsanet-segment``'s ``summary.json`` and
    ``lesions.csv`` per subject, keyed by subject id). Every volume in mm³, as in ``lesions.csv``.

    Columns: ``subject``, ``variant``, ``lesion_count``, ``total_volume_mm3``,
    ``volume_mm3[<bin>]`` for each lesion-volume bin of ``size_bins_mm3`` (mm³; a ``<first edge``
    bin only when some subject kept lesions that small: ``min_lesion_mm3`` below the first edge),
    ``mean_agreement`` and ``mean_probability`` (over the subject's lesions; NaN without lesions),
    ``seconds_<stage>`` (the stage timings, s), ``warnings`` (``"; "``-joined). Sorted by total
    volume, largest first. :func:`cohort_columns` describes them.
    """
    from .metrics import size_bin_labels

    edges = [float(e) for e in size_bins_mm3]
    smallest_kept = min((float(s.get("settings", {}).get("min_lesion_mm3", 0.0)) for s in summaries.values()),
                        default=0.0)
    labels = [f"<{edges[0]:g}"] + size_bin_labels(edges)
    bounds = [-np.inf] + edges + [np.inf]
    if smallest_kept >= edges[0]:  # lesions below the first edge were removed: no such column
        labels, bounds = labels[1:], bounds[1:]
    rows = []
    for subject, summary in summaries.items():
        t = lesions[subject]
        row = {"subject": subject, "variant": summary.get("model", {}).get("variant"),
               "lesion_count": int(len(t)), "total_volume_mm3": float(t.volume_mm3.sum())}
        for label, lo, hi in zip(labels, bounds[:-1], bounds[1:]):
            inside = (t.volume_mm3 >= lo) & (t.volume_mm3 < hi)
            row[f"volume_mm3[{label}]"] = float(t.volume_mm3[inside].sum())
        row["mean_agreement"] = float(t.agreement.mean()) if "agreement" in t and len(t) else float("nan")
        row["mean_probability"] = float(t.mean_probability.mean()) if "mean_probability" in t and len(t) else float("nan")
        for stage, sec in summary.get("seconds", {}).items():
            row[f"seconds_{stage}"] = float(sec)
        row["warnings"] = "; ".join(summary.get("warnings", []))
        rows.append(row)
    table = pd.DataFrame(rows)
    if len(table):
        table = table.sort_values(["total_volume_mm3", "subject"], ascending=[False, True], kind="stable")
    return table.reset_index(drop=True)


def cohort_columns(table: pd.DataFrame) -> dict[str, dict[str, str]]:
    """A BIDS-style sidecar for :func:`cohort_table`'s columns: column -> {Description, Units}."""
    known = {
        "subject": ("the subject (the name of its results/segment/ folder)", "n/a"),
        "variant": ("the exported variant that segmented it", "n/a"),
        "lesion_count": ("lesions found (connected components above segment.min_lesion_mm3)", "1"),
        "total_volume_mm3": ("volume of all its lesions", "mm^3"),
        "mean_agreement": ("mean over its lesions of the fraction of models that detect each lesion", "1"),
        "mean_probability": ("mean over its lesions of the ensemble's mean lesion probability", "1"),
        "warnings": ("rsanet-segment's warnings for it, '; '-joined", "n/a"),
    }
    out = {}
    for c in table.columns:
        if c in known:
            desc, unit = known[c]
        elif c.startswith("volume_mm3["):
            desc, unit = f"volume of its lesions whose own volume lies in {c[len('volume_mm3['):-1]} mm^3", "mm^3"
        elif c.startswith("seconds_"):
            desc, unit = f"wall time of rsanet-segment's {c[len('seconds_'):]} stage", "s"
        else:
            desc, unit = c, "n/a"
        out[c] = {"Description": desc, "Units": unit}
    return out


def job_time_table(benchmarks: Mapping[str, Sequence[pd.DataFrame]]) -> pd.DataFrame:
    """Wall time per stage from Snakemake ``benchmark:`` tables (one per job; columns ``s``,
    ``cpu_time`` in seconds, ``max_rss`` in MB, as Snakemake writes them).

    Returns one row per stage: ``stage, jobs, total_s, median_s, max_s, cpu_s, max_rss_mb``
    (the sums add up the jobs, which may have run in parallel), and a last row ``all`` over every job.
    """
    rows = []
    everything = []
    for stage, frames in benchmarks.items():
        if not frames:
            continue
        jobs = pd.concat([f.iloc[[0]] for f in frames], ignore_index=True)  # one repeat per job
        everything.append(jobs)
        rows.append(_time_row(stage, jobs))
    if everything:
        rows.append(_time_row("all", pd.concat(everything, ignore_index=True)))
    return pd.DataFrame(rows, columns=["stage", "jobs", "total_s", "median_s", "max_s", "cpu_s", "max_rss_mb"])


def _time_row(stage: str, jobs: pd.DataFrame) -> dict:
    def column(name: str) -> pd.Series:  # Snakemake writes "NA" where it could not measure
        return pd.to_numeric(jobs[name], errors="coerce") if name in jobs else pd.Series(dtype=float)

    rss, cpu = column("max_rss"), column("cpu_time")
    return {"stage": stage, "jobs": len(jobs), "total_s": round(float(jobs.s.sum()), 1),
            "median_s": round(float(jobs.s.median()), 1), "max_s": round(float(jobs.s.max()), 1),
            "cpu_s": round(float(cpu.sum()), 1) if cpu.notna().any() else float("nan"),
            "max_rss_mb": round(float(rss.max()), 1) if rss.notna().any() else float("nan")}


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
    with staged([path]) as (tmp,):
        tmp.write_text(text)


def write_csv(df: pd.DataFrame, path: str | os.PathLike) -> None:
    with staged([path]) as (tmp,):
        df.to_csv(tmp, index=False)
