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
            recs.append({**dict(variant=variant, split=split, subject=f"s{split}{k}", tp=tp, fp=fp, fn=fn,
                                dice=d, iou=d / (2 - d), ltpr=1.0, lfpr=0.0, lesion_f1=1.0, hd95_mm=2.0 + k,
                                assd_mm=1.0, abs_volume_error_ml=0.5, rel_volume_error=np.nan if k else 0.1,
                                abs_rel_volume_error=np.nan if k else 0.1),
                         "n_true_lesions[3-10]": 2, "n_detected_lesions[3-10]": 1 + (variant == "rsa-111"),
                         "n_true_lesions[>10]": 0, "n_detected_lesions[>10]": 0})
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


def test_corrected_resampled_ttest_by_hand():
    """Nadeau & Bengio's corrected t on d = (1, 2, 3), n_train 20, n_test 23, computed by hand."""
    d = [0.01, 0.02, 0.03]
    res = evaluation.corrected_resampled_ttest(d, n_train=20, n_test=23)
    # mean 0.02, var (ddof=1) 1e-4; corrected variance (1/3 + 23/20) * 1e-4 = 1.48333e-4
    se = np.sqrt((1 / 3 + 23 / 20) * 1e-4)
    assert res["mean"] == pytest.approx(0.02)
    assert res["t"] == pytest.approx(0.02 / se)  # 1.642142
    assert res["t"] == pytest.approx(1.642142, abs=1e-6)
    assert res["dof"] == 2
    # two-sided p of t = 1.642142 with 2 dof: 1 - t / sqrt(2 + t^2) (closed form for 2 dof)
    t = res["t"]
    assert res["p"] == pytest.approx(1 - t / np.sqrt(2 + t**2), rel=1e-9)
    # 95 % interval: mean +/- t_{0.975, 2} se with t_{0.975, 2} = 4.302653
    assert res["ci_low"] == pytest.approx(0.02 - 4.302653 * se, rel=1e-6)
    assert res["ci_high"] == pytest.approx(0.02 + 4.302653 * se, rel=1e-6)
    # the uncorrected test would be far more confident: the correction widens the interval
    assert (1 / 3 + 23 / 20) / (1 / 3) > 4


def test_power_and_detectable_difference_by_hand():
    """docs/metrics.md, "What a comparison could have seen": the power of the corrected test. With no correction term (n_test = 0) it is the
    one-sample t-test, whose power tables give 0.4014 for n = 5 and 0.8031 for n = 10 at an effect
    of one sd (two-sided, alpha 0.05; Cohen 1988, G*Power)."""
    assert evaluation.corrected_ttest_power(1.0, 1.0, 5, 10**9, 0) == pytest.approx(0.4014, abs=2e-4)
    assert evaluation.corrected_ttest_power(1.0, 1.0, 10, 10**9, 0) == pytest.approx(0.8031, abs=2e-4)
    # The hand computation: paired sd 0.85 points over 5 splits, 16 training and 23 test
    # subjects: se = 0.85 sqrt(1/5 + 23/16) = 1.0877; (t_.975,4 + t_.8,4) se = (2.776 + 0.941) se
    # = 4.04 points by the normal-shift approximation; the exact noncentral-t root is 4.09.
    se = 0.85 * np.sqrt(1 / 5 + 23 / 16)
    assert se == pytest.approx(1.0877, abs=1e-4)
    mde = evaluation.detectable_difference(0.85, 5, 16, 23)
    assert (2.776 + 0.941) * se < mde < 4.2 and mde == pytest.approx(4.09, abs=0.01)
    assert evaluation.corrected_ttest_power(mde, 0.85, 5, 16, 23) == pytest.approx(0.8, abs=1e-6)
    assert evaluation.corrected_ttest_power(2.0, 0.85, 5, 16, 23) == pytest.approx(0.29, abs=0.01)
    # power is symmetric in the sign of the difference and grows with it
    assert evaluation.corrected_ttest_power(-2.0, 0.85, 5, 16, 23) == pytest.approx(
        evaluation.corrected_ttest_power(2.0, 0.85, 5, 16, 23))
    assert evaluation.corrected_ttest_power(20.0, 0.85, 5, 16, 23) == pytest.approx(1.0, abs=1e-9)
    assert np.isnan(evaluation.corrected_ttest_power(2.0, float("nan"), 5, 16, 23))


def test_reading_never_says_no_difference_alone():
    blind = evaluation.comparison_reading(0.6, 0.3, 4.1, 2.03, 0.29)
    assert blind.startswith("no significant difference, and this study could not have seen")
    assert "4.1" in blind and "29%" in blind
    seeing = evaluation.comparison_reading(0.6, 0.3, 1.5, 2.03, 0.93)
    assert "although the paper's difference was detectable" in seeing
    assert evaluation.comparison_reading(0.01, 3.0, 1.5, 2.03, 0.93).startswith("differs (+3.00 points")


def test_corrected_ttest_undefined_cases_are_nan():
    assert np.isnan(evaluation.corrected_resampled_ttest([0.1], 20, 23)["p"])
    constant = evaluation.corrected_resampled_ttest([0.1, 0.1, 0.1], 20, 23)
    assert constant["mean"] == pytest.approx(0.1) and np.isnan(constant["p"])


def test_paired_tests_are_over_splits_on_every_table1_metric():
    per_split = evaluation.split_scores(_rows())
    t = evaluation.paired_tests(per_split, n_train=2)
    assert t.variant.unique().tolist() == ["rsa-111"]
    assert t.metric.tolist() == list(evaluation.TABLE1_METRICS)
    ps = per_split.set_index(["variant", "split"])
    for _, row in t.iterrows():
        d = [ps.loc[("rsa-111", k), row.metric] - ps.loc[("unet3d", k), row.metric] for k in (0, 1)]
        want = evaluation.corrected_resampled_ttest(d, n_train=2, n_test=2)
        assert row.mean_difference_pp == pytest.approx(100 * np.mean(d))
        assert row.ci_low_pp == pytest.approx(100 * want["ci_low"])
        assert row.p == pytest.approx(want["p"])
        assert row.splits_won == sum(x > 0 for x in d) and row.n_splits == 2
    shown = evaluation.paired_tests_display(t)
    assert shown.Metric.tolist() == ["Sample Dice", "Voxel Dice", "Sample IoU", "Voxel IoU"]


def test_a_study_of_the_baseline_alone_has_no_comparison_and_says_so():
    """One variant (e.g. `variants: [unet3d]`): no paired test, the tables and findings still written."""
    rows = _rows()
    rows = rows[rows.variant == "unet3d"]
    t = evaluation.paired_tests(evaluation.split_scores(rows), n_train=2)
    assert t.empty and list(t.columns) == evaluation.PAIRED_TEST_COLUMNS
    assert evaluation.paired_tests_display(t).empty
    attention = pd.DataFrame({"method": [], "n_checked": [], "n_inert": [], "sample_dice_delta_pp": []})
    text = evaluation.findings(evaluation.table1(rows), t, attention, 0, 2)
    assert "over the 1 variant " in text and "None: this run trained no variant besides the 3D U-Net." in text


def test_seeds_are_averaged_per_split_before_tables_and_tests():
    a, b = _rows().assign(seed=0), _rows().assign(seed=1)
    b["dice"] = b["dice"] * 0.5
    both = pd.concat([a, b], ignore_index=True)
    m = evaluation.mean_over_seeds(both).set_index(["variant", "split"])
    s0 = evaluation.split_scores(a).set_index(["variant", "split"])
    s1 = evaluation.split_scores(b).set_index(["variant", "split"])
    assert m.loc[("unet3d", 0), "sample_dice"] == pytest.approx((s0.loc[("unet3d", 0), "sample_dice"] + s1.loc[("unet3d", 0), "sample_dice"]) / 2)
    assert len(m) == 4 and (m.n_test == 2).all()
    t = evaluation.table1(both).set_index("variant")
    assert t.loc["unet3d", "n_splits"] == 2


def test_detection_by_size_pools_subjects_per_split_then_averages_splits():
    t = evaluation.detection_by_size(_rows()).set_index(["variant", "bin"])
    # unet3d: per split 2 subjects x (1 of 2) -> 50 % in both splits; rsa-111 detects both
    assert t.loc[("unet3d", "3-10"), "ltpr_mean"] == pytest.approx(50.0)
    assert t.loc[("rsa-111", "3-10"), "ltpr_mean"] == pytest.approx(100.0)
    assert t.loc[("unet3d", "3-10"), "n_true_per_split"] == 4
    assert np.isnan(t.loc[("unet3d", ">10"), "ltpr_mean"])  # no lesion of that size: undefined
    shown = evaluation.detection_by_size_display(evaluation.detection_by_size(_rows()))
    assert shown.Method.tolist() == ["3D U-Net", "RSA-111"]  # one row per method, nothing else
    assert "3-10 mm³ (4.0 true per split)" in shown.columns


def test_markdown_and_latex_writers():
    df = evaluation.table1_display(evaluation.table1(_rows()))
    md = evaluation.to_markdown(df)
    assert md.count("\n") == 2 + len(df) and md.startswith("| Method |")
    tex = evaluation.to_latex(df, "Cap 5%", "tab:x")
    assert r"\begin{tabular}" in tex and r"$\pm$" in tex and r"5\%" in tex


def test_table1_counts_the_failed_trainings_per_variant():
    """A failed training is never averaged in silently: Table 1 says how many failed."""
    health = pd.DataFrame({"variant": ["unet3d", "unet3d", "rsa-111", "rsa-111"], "split": [0, 1, 0, 1],
                           "seed": [0, 0, 0, 0], "learned": [True, False, True, True]})
    failed = evaluation.failed_trainings(health).set_index("variant")
    assert failed.loc["unet3d", "n_failed"] == 1 and failed.loc["unet3d", "failed"] == "split 1 seed 0"
    assert failed.loc["rsa-111", "n_failed"] == 0 and failed.loc["rsa-111", "failed"] == ""
    t = evaluation.table1(_rows(), health)
    shown = evaluation.table1_display(t)
    assert shown["Failed trainings"].tolist() == ["1/2", "0/2"]
    # the scores are the same with or without the count: nothing is dropped
    assert t.sample_dice_mean.tolist() == evaluation.table1(_rows()).sample_dice_mean.tolist()


def test_job_time_table_sums_each_stage_from_snakemake_benchmark_files(tmp_path):
    """The time table is computed from the jobs' benchmark files (Snakemake's TSV columns)."""
    from rsanet.stages.report import job_times_step

    header = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"
    files = {}
    for stage, seconds in {"coregister": [4.0, 6.0], "train": [30.0, 40.0, 50.0], "predict": [10.0]}.items():
        files[stage] = []
        for i, s in enumerate(seconds):
            path = tmp_path / f"{stage}{i}.tsv"
            path.write_text(header + f"{s}\t0:00:{int(s):02d}\t{100 + 10 * i}\t1\t1\t1\t0\t0\t90\t{s - 1}\n")
            files[stage].append(str(path))
    job_times_step(files, str(tmp_path / "t.csv"), str(tmp_path / "t.md"))
    table = pd.read_csv(tmp_path / "t.csv").set_index("stage")
    assert list(table.index) == ["coregister", "train", "predict", "all"]
    assert table.loc["train", "jobs"] == 3 and table.loc["train", "total_s"] == 120 and table.loc["train", "median_s"] == 40
    assert table.loc["train", "max_s"] == 50 and table.loc["train", "cpu_s"] == 117 and table.loc["train", "max_rss_mb"] == 120
    assert table.loc["all", "jobs"] == 6 and table.loc["all", "total_s"] == 140
    assert "| train | 3 | 120 |" in (tmp_path / "t.md").read_text()


def test_cohort_table_one_row_per_subject_volume_by_size_class_sorted_by_load():
    summaries = {
        "a": {"model": {"variant": "unet3d"}, "seconds": {"registration": 3.0, "prediction": 10.0}, "warnings": []},
        "b": {"model": {"variant": "unet3d"}, "seconds": {"registration": 2.0, "prediction": 9.0},
              "warnings": ["no lesion found"]},
        "c": {"model": {"variant": "unet3d"}, "seconds": {"registration": 4.0, "prediction": 11.0}, "warnings": []},
    }
    lesions = {
        "a": pd.DataFrame({"volume_mm3": [5.0, 50.0, 600.0], "mean_probability": [0.6, 0.7, 0.9],
                           "agreement": [0.2, 0.6, 1.0]}),
        "b": pd.DataFrame({"volume_mm3": [], "mean_probability": [], "agreement": []}),
        "c": pd.DataFrame({"volume_mm3": [2000.0], "mean_probability": [0.8], "agreement": [0.8]}),
    }
    table = evaluation.cohort_table(summaries, lesions, size_bins_mm3=[3, 10, 100, 500])
    assert list(table.subject) == ["c", "a", "b"]  # by total lesion volume
    a = table.set_index("subject").loc["a"]
    assert a.lesion_count == 3 and np.isclose(a.total_volume_mm3, 655.0)  # every volume in mm3
    assert np.isclose(a["volume_mm3[3-10]"], 5.0) and np.isclose(a["volume_mm3[10-100]"], 50.0)
    assert np.isclose(a["volume_mm3[100-500]"], 0.0) and np.isclose(a["volume_mm3[>500]"], 600.0)
    assert np.isclose(a.mean_agreement, 0.6) and a.seconds_prediction == 10.0 and a.warnings == ""
    b = table.set_index("subject").loc["b"]
    assert b.lesion_count == 0 and b.total_volume_mm3 == 0 and np.isnan(b.mean_agreement) and b.warnings == "no lesion found"
    bins = [c for c in table.columns if c.startswith("volume_mm3[")]
    assert np.allclose(table[bins].sum(axis=1), table.total_volume_mm3)
    # no summary says how small a kept lesion may be: the "<3" bin stays; min_lesion_mm3 3 removes it
    assert "volume_mm3[<3]" in table
    kept3 = {k: {**v, "settings": {"min_lesion_mm3": 3.0}} for k, v in summaries.items()}
    assert "volume_mm3[<3]" not in evaluation.cohort_table(kept3, lesions, size_bins_mm3=[3, 10, 100, 500])
    sidecar = evaluation.cohort_columns(table)
    assert list(sidecar) == list(table.columns)
    assert {sidecar[c]["Units"] for c in bins + ["total_volume_mm3"]} == {"mm^3"}
    assert sidecar["seconds_prediction"]["Units"] == "s" and "3-10 mm^3" in sidecar["volume_mm3[3-10]"]["Description"]


def test_lesion_confidence_ensembles_each_subject_over_the_splits_that_test_it(tmp_path):
    """The study's precision-by-agreement step on files: a subject tested in two splits is segmented
    by those two models' stored probabilities; a subject tested once is left out."""
    import json

    from rsanet.stages.export import lesion_confidence_step
    from rsanet.volumes import Preprocessed, save_probability_u8

    shape = (6, 8, 8)
    lesions = np.zeros(shape, np.uint8)
    lesions[1:3, 1:3, 1:3] = 1
    pre = {}
    for s in ("a", "b"):
        pre[s] = str(tmp_path / f"{s}.npz")
        Preprocessed(np.zeros((3, *shape), np.float32), lesions, np.ones(shape, np.uint8), (1.0, 1.0, 1.0),
                     np.array([[0, 6], [0, 8], [0, 8]]), shape, np.eye(4)).save(pre[s])
    (tmp_path / "splits.json").write_text(json.dumps({"splits": [{"train": [], "test": ["a", "b"]},
                                                                 {"train": [], "test": ["a"]}]}))
    predictions = {}
    for split in (0, 1):
        d = tmp_path / f"split{split}"
        prob = np.zeros(shape, np.float32)
        prob[1:3, 1:3, 1:3] = 0.9                 # the true lesion: both models
        prob[4:6, 5:7, 5:7] = 0.9 if split == 0 else 0.3  # a false one: model 0 only (mean 0.6)
        save_probability_u8(prob, d / "a_prob_u8.npz")
        save_probability_u8(prob, d / "b_prob_u8.npz")
        predictions[(split, 0)] = str(d)
    table = lesion_confidence_step("unet3d", str(tmp_path / "splits.json"), predictions, pre,
                                   {"min_lesion_mm3": 3.0}, 0.5, 6, str(tmp_path / "lesions.csv"),
                                   str(tmp_path / "table.csv")).set_index("agreement")
    found = pd.read_csv(tmp_path / "lesions.csv")
    assert list(found.subject) == ["a", "a"] and set(found.n_models) == {2}
    assert table.loc[">= 0.8", "lesions"] == 1 and table.loc[">= 0.8", "precision_pct"] == 100.0
    assert table.loc["0.4 to < 0.8", "lesions"] == 1 and table.loc["0.4 to < 0.8", "precision_pct"] == 0.0
    assert (table.subjects == 1).all() and (table.models_per_subject == "2-2").all()


def test_best_variant_is_chosen_on_the_health_check_not_on_the_test_subjects():
    from rsanet.export import best_variant

    health = pd.DataFrame({"variant": ["unet3d", "unet3d", "rsa-111", "rsa-111", "ncl-010", "ncl-010"],
                           "score": [0.60, 0.70, 0.66, 0.66, 0.70, 0.60],
                           "source": ["validation patches"] * 6})
    variant, how = best_variant(health)
    assert variant == "rsa-111" and "validation patches" in how and "not the test subjects" in how
    # a tie goes to the variant met first (Table 1's order in the workflow)
    assert best_variant(health.assign(score=0.5))[0] == "unet3d"


def test_the_reports_opening_paragraph_is_the_runs_findings(tmp_path):
    """ReportOpening reads findings.md when the report is rendered: its headline bullets and the
    main comparison as one paragraph; nothing while the run has not written it."""
    md = ("# What this run found\n\n- Table 1, sample Dice: 60.00–63.20 %.\n- Trainings that failed their health "
          "check: 0 of 65.\n- Attention inert: 8 of 45.\n  Variants whose attention is inert compare the 3D U-Net "
          "with itself.\n\n## Each variant against the 3D U-Net\n\n- **RSA-111**: +0.15 points, p = 0.940; no "
          "significant difference.\n- **NCL-010**: -1.00 points.\n")
    text = evaluation.findings_paragraph(md)
    assert text.startswith("Table 1, sample Dice: 60.00–63.20 %. Trainings that failed")
    assert "8 of 45" in text and "compare the 3D U-Net with itself" in text
    assert text.endswith("Main comparison against the 3D U-Net: RSA-111: +0.15 points, p = 0.940; no significant difference.")
    assert "NCL-010" not in text and "**" not in text
    opening = evaluation.ReportOpening(tmp_path / "findings.md")
    assert str(opening) == ""
    (tmp_path / "findings.md").write_text(md)
    assert str(opening) == text
