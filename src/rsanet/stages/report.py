"""The study's tables, figures and records (workflow/rules/report.smk): Table 1 and 2, tests, findings,
deviations, job times, provenance.

Each step reads its files, calls the package's pure code and writes its outputs through
:func:`rsanet.files.staged`; a script of ``scripts/`` calls one of them.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Mapping, Sequence

import nibabel as nib

# Heavy libraries (torch, matplotlib, SimpleITK, pandas) are imported inside the steps that need
# them, so light steps start in a fraction of a second (pandas: 0.15-0.26 s for each of the demo's
# 164 synthesis, registration, preprocessing and training jobs, which do not use it).
from ..volumes import (
    Preprocessed,
    ras_to_model,
    save_json,
)



from .splits import read_split

log = logging.getLogger(__name__)


def job_times_step(benchmarks: Mapping[str, Sequence[str]], out_csv: str, out_md: str) -> None:
    """Snakemake benchmark files (stage -> one TSV per job) -> the time table per stage (csv, md)."""
    import pandas as pd
    from .. import evaluation

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
    from .. import evaluation

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
    from .. import evaluation
    from ..paper import deviations

    from ..registration import engines_that_ran

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
    from .. import evaluation

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
    from .. import evaluation, figures

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
    from .. import evaluation

    figures.detection_by_size(evaluation.detection_by_size(rows), stems["by_size"])
    figures.lesion_load(rows, stems["load"])


def provenance_step(config: Mapping, records: Sequence[str], out_json: str) -> None:
    """What produced the results: versions, git commit, resolved config, device, engines."""
    import platform
    import subprocess

    import torch

    from .. import __version__
    from ..devices import precision, resolve_device
    from ..files import library_versions

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    from ..registration import engines_that_ran

    engines = engines_that_ran(records)
    versions = library_versions()
    save_json({
        "rsanet_version": __version__, "git_commit": commit, "python": platform.python_version(),
        "platform": platform.platform(), "libraries": versions,
        "device": "cuda:" + torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "precision": precision(config["train"]["amp"], resolve_device(config["train"]["device"])),
        "registration_engines": engines, "config": dict(config),
    }, out_json)

