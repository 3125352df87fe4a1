"""Table 1 / Table 2 aggregation, paired tests and writers, on hand-made per-subject rows."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from rsanet import evaluation
from rsanet.metrics import dice_from_counts


def _rows():
    # two variants, two splits, two subjects each; counts chosen by hand
    recs = []
    counts = {
        ("unet3d", 0): [(8, 2, 2), (1, 1, 0)],
        ("unet3d", 1): [(6, 4, 0), (0, 0, 4)],
        ("rsa-111", 0): [(9, 1, 1), (1, 0, 0)],
        ("rsa-111", 1): [(7, 1, 0), (2, 1, 2)],
    }
    for (variant, split), cases in counts.items():
        for k, (tp, fp, fn) in enumerate(cases):
            d = dice_from_counts(tp, fp, fn)
            recs.append(dict(variant=variant, split=split, subject=f"s{split}{k}", tp=tp, fp=fp, fn=fn,
                             dice=d, iou=d / (2 - d), ltpr=1.0, lfpr=0.0, lesion_f1=1.0,
                             abs_volume_error_ml=0.5, rel_volume_error=np.nan if k else 0.1))
    return pd.DataFrame(recs)


def test_sample_and_voxel_averages_per_split():
    s = evaluation.split_scores(_rows()).set_index(["variant", "split"])
    # unet3d split 0: per-image dice 16/20 and 2/3; pooled tp=9 fp=3 fn=2 -> 18/23
    assert s.loc[("unet3d", 0), "sample_dice"] == pytest.approx((0.8 + 2 / 3) / 2)
    assert s.loc[("unet3d", 0), "voxel_dice"] == pytest.approx(18 / 23)
    assert s.loc[("unet3d", 0), "voxel_iou"] == pytest.approx(9 / 14)
    # NaN relative errors are ignored in the mean
    assert s.loc[("unet3d", 0), "rel_volume_error"] == pytest.approx(0.1)


def test_table1_is_percent_mean_sd_over_splits_with_paper_numbers():
    t = evaluation.table1(_rows()).set_index("variant")
    assert list(t.index) == ["unet3d", "rsa-111"]  # Table 1 order
    per_split = evaluation.split_scores(_rows())
    u = per_split[per_split.variant == "unet3d"].voxel_dice
    assert t.loc["unet3d", "voxel_dice_mean"] == pytest.approx(100 * u.mean())
    assert t.loc["unet3d", "voxel_dice_sd"] == pytest.approx(100 * u.std(ddof=1))
    assert t.loc["rsa-111", "sample_dice_paper"] == 66.011
    shown = evaluation.table1_display(evaluation.table1(_rows()))
    assert shown.Method.tolist() == ["3D U-Net", "RSA-111"]
    assert "±" in shown["Voxel Dice"][0]


def test_paired_tests_against_unet():
    t = evaluation.paired_tests(_rows())
    assert t.variant.tolist() == ["rsa-111"]
    r = _rows()
    diff = r[r.variant == "rsa-111"].dice.to_numpy() - r[r.variant == "unet3d"].dice.to_numpy()
    assert t.mean_difference_pp[0] == pytest.approx(100 * diff.mean())
    assert t.n_pairs[0] == 4 and t.splits_won[0] == 2
    assert 0 < t.wilcoxon_p[0] <= 1


def test_markdown_and_latex_writers():
    df = evaluation.table1_display(evaluation.table1(_rows()))
    md = evaluation.to_markdown(df)
    assert md.count("\n") == 2 + len(df) and md.startswith("| Method |")
    tex = evaluation.to_latex(df, "Cap 5%", "tab:x")
    assert r"\begin{tabular}" in tex and r"$\pm$" in tex and r"5\%" in tex
