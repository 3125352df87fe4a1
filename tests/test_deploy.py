"""Deploying the workflow: from another folder, as a Snakemake module, on a BIDS dataset."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import yaml

from rsanet.bids import bids_sheet
from rsanet.checks import InputCheckError, load_config
from test_workflow import ROOT, TEST_CONFIG, snakemake

#: The tiny study cut to the baseline, trained once per split, for the deployment tests (each a full run:
#: how the workflow is deployed, not what the variants learn, is their subject).
SMALL = {"variants": ["unet3d"], "figures": {"fig5_variants": ["unet3d"]}}


def small_config(**changes) -> dict:
    cfg = yaml.safe_load(TEST_CONFIG.read_text())
    cfg.update(SMALL, **changes)
    cfg["registration"]["engine"] = "none"
    cfg["train"]["seeds_by_variant"] = {"unet3d": 1}
    return cfg


@pytest.mark.slow
def test_runs_from_another_folder_with_a_config_of_only_subjects_and_splits(tmp_path):
    (tmp_path / "mine.yaml").write_text("subjects: demo\nsplits: {n_splits: 2, n_train: 20, n_test: 10, n_val: 2}\n")
    elsewhere = tmp_path / "study"
    run = subprocess.run(
        [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--directory", str(elsewhere),
         "--configfile", "mine.yaml", "--cores", "2", "-n"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    counts = dict(ln.split() for ln in run.stdout.splitlines() if len(ln.split()) == 2 and ln.split()[1].isdigit())
    defaults = load_config(ROOT / "config" / "config.yaml", ROOT / "workflow" / "schemas" / "config.schema.yaml")
    seeds = defaults["train"]["seeds_by_variant"]  # the demo's extra seeds for its main comparison
    assert int(counts["train"]) == 2 * sum(seeds.get(v, defaults["train"]["seeds"]) for v in defaults["variants"])
    assert not (elsewhere / "results").exists()  # a dry run writes nothing


@pytest.mark.slow
def test_the_workflow_runs_as_a_snakemake_module(tmp_path):
    """Another workflow includes this one (`module ... use rule * from rsanet as rsanet_*`)."""
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(small_config()))
    (tmp_path / "Snakefile").write_text(f"""\
configfile: "config.yaml"


module rsanet:
    snakefile:
        {str(ROOT / "Snakefile")!r}
    config:
        config


use rule * from rsanet as rsanet_*


rule all:
    default_target: True
    input:
        rules.rsanet_all.input,
""")
    run = subprocess.run([sys.executable, "-m", "snakemake", "--cores", "2"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=1500)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert "rule rsanet_train:" in run.stdout + run.stderr
    table = pd.read_csv(tmp_path / "results" / "tables" / "table1.csv")
    assert table.method.tolist() == ["3D U-Net"]
    assert (tmp_path / "logs" / "check_inputs.log").is_file()


def write_bids(root: Path, cases: dict[tuple[str, str | None], Path]) -> None:
    """A BIDS dataset with masks in derivatives/lesions from folders of T1/T2/FLAIR/lesions files."""
    deriv = root / "derivatives" / "lesions"
    for (sub, ses), src in cases.items():
        stem = f"sub-{sub}" + (f"_ses-{ses}" if ses else "")
        rel = Path(f"sub-{sub}") / (f"ses-{ses}" if ses else "") / "anat"
        for base, name, suffix in ((root, "T1", "T1w"), (root, "T2", "T2w"), (root, "FLAIR", "FLAIR"),
                                   (deriv, "lesions", "label-lesion_mask")):
            (base / rel).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src / f"{name}.nii.gz", base / rel / f"{stem}_{suffix}.nii.gz")
    (root / "dataset_description.json").write_text(json.dumps({"Name": "tiny demo", "BIDSVersion": "1.9.0"}))
    (deriv / "dataset_description.json").write_text(json.dumps(
        {"Name": "lesion masks", "BIDSVersion": "1.9.0", "DatasetType": "derivative",
         "GeneratedBy": [{"Name": "rsanet demo"}]}))


@pytest.mark.slow
def test_bids_dataset_with_two_sessions_runs_the_tiny_study_sessions_kept_together(registered_cohort, tmp_path):
    demo = registered_cohort / "demo"
    # five participants; sub-01 was scanned twice (two demo subjects stand in for its sessions)
    cases = {("01", "1"): demo / "demo-001", ("01", "2"): demo / "demo-002"}
    cases.update({(f"{i:02d}", None): demo / f"demo-{i + 1:03d}" for i in range(2, 6)})
    write_bids(tmp_path / "bids", cases)
    cfg = small_config(subjects={"bids": str(tmp_path / "bids"), "lesions": "derivatives/lesions"},
                       splits={"n_splits": 2, "n_train": 3, "n_val": 1, "n_test": 2, "seed": 0})
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    work = tmp_path / "work"
    run = snakemake(work, "--configfile", str(tmp_path / "config.yaml"))
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    splits = json.loads((work / "results" / "splits.json").read_text())["splits"]
    assert len(splits) == 2
    for split in splits:
        sides = [part for part in ("train", "val", "test") if {"sub-01_ses-1", "sub-01_ses-2"} & set(split[part])]
        assert len(sides) == 1, split  # both sessions of sub-01 on one side
        assert {"sub-01_ses-1", "sub-01_ses-2"} <= set(split[sides[0]])
    per_subject = pd.read_csv(work / "results" / "tables" / "per_subject_metrics.csv")
    tested = {c for s in splits for c in s["test"]}
    assert set(per_subject.subject) == tested
    pred = next((work / "results" / "predictions").rglob("sub-*.nii.gz"))
    case = pred.name.removesuffix(".nii.gz")
    flair = nib.load(bids_sheet(tmp_path / "bids", "derivatives/lesions").set_index("subject").flair[case])
    assert np.allclose(nib.load(pred).affine, flair.affine) and nib.load(pred).shape == flair.shape


def test_bids_cases_missing_a_contrast_or_mask_are_listed_in_one_error(tmp_path):
    img = tmp_path / "src"
    img.mkdir()
    for name in ("T1", "T2", "FLAIR", "lesions"):
        nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.uint8), np.eye(4)), img / f"{name}.nii.gz")
    root = tmp_path / "bids"
    write_bids(root, {("01", None): img, ("02", "a"): img, ("02", "b"): img, ("03", None): img})
    sheet = bids_sheet(root, "derivatives/lesions")
    assert sheet.subject.tolist() == ["sub-01", "sub-02_ses-a", "sub-02_ses-b", "sub-03"]
    assert sheet.participant.tolist() == ["sub-01", "sub-02", "sub-02", "sub-03"]
    assert all(Path(p).is_file() for c in ("t1", "t2", "flair", "lesions") for p in sheet[c])
    (root / "sub-01" / "anat" / "sub-01_FLAIR.nii.gz").unlink()
    (root / "derivatives/lesions/sub-02/ses-b/anat/sub-02_ses-b_label-lesion_mask.nii.gz").unlink()
    shutil.copyfile(img / "T1.nii.gz", root / "sub-03" / "anat" / "sub-03_run-2_T1w.nii.gz")
    with pytest.raises(InputCheckError) as err:
        bids_sheet(root, "derivatives/lesions")
    message = str(err.value)
    assert "3 problem(s)" in message
    assert "sub-01: no _FLAIR image" in message
    assert "sub-02_ses-b: no _label-lesion_mask image in the derivatives" in message
    assert "sub-03: 2 _T1w images" in message
    with pytest.raises(InputCheckError, match="dataset_description.json"):
        bids_sheet(root, "derivatives/missing")


@pytest.mark.slow
def test_a_mistyped_bids_mapping_is_listed_with_the_other_config_problems(tmp_path):
    (tmp_path / "mine.yaml").write_text("subjects: {bids: /nowhere, lesion: derivatives/x}\nsplits: {n_splits: 0}\n")
    run = snakemake(tmp_path / "work", "--configfile", str(tmp_path / "mine.yaml"), "-n")
    assert run.returncode != 0
    out = run.stdout + run.stderr
    assert "3 problem(s) in the configuration" in out, out[-2000:]
    assert "('lesion' was unexpected)" in out and "'lesions' is a required property" in out
    assert "config splits.n_splits" in out


@pytest.mark.slow
def test_a_partial_config_from_another_folder_with_no_subject_left_to_fit_is_a_listed_problem(tmp_path):
    """splits.n_val equal to splits.n_train leaves no training subject: one listed problem that
    says what to set, not a Python traceback (it used to end in a ValueError from common.smk)."""
    (tmp_path / "mine.yaml").write_text("subjects: demo\nsplits: {n_splits: 2, n_train: 4, n_val: 4, n_test: 10}\n")
    run = subprocess.run(
        [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--directory", str(tmp_path / "study"),
         "--configfile", "mine.yaml", "--cores", "1", "-n"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300)
    out = run.stdout + run.stderr
    assert run.returncode != 0
    assert "1 problem(s) in the configuration" in out, out[-2000:]
    assert "set splits.n_val below splits.n_train" in out
    assert "Traceback" not in out and "Error in file" not in out and 'File "' not in out, out[-2000:]


@pytest.mark.slow
def test_heavy_rules_are_retried_with_the_configured_sizes(tmp_path):
    """A dry run with resources.retries 2 and job sizes of its own: the training and prediction
    jobs get the config's mem_mb and runtime at their first attempt (attempt_scaled in
    common.smk multiplies them by the attempt number), its threads (SLURM's --cpus-per-task; at most --cores, 2 here)
    and its gpus as the `gpu` resource (what the workstation profile limits and the SLURM
    profile turns into --gpus)."""
    cfg = small_config(resources={"train": {"mem_mb": 1234, "runtime": 7, "threads": 2, "gpus": 1},
                                  "predict": {"mem_mb": 999, "runtime": 5, "threads": 2, "gpus": 1}, "retries": 2})
    (tmp_path / "mine.yaml").write_text(yaml.safe_dump(cfg))
    run = snakemake(tmp_path / "work", "--configfile", str(tmp_path / "mine.yaml"), "-n", "--forceall")
    assert run.returncode == 0, run.stderr[-3000:]
    jobs = run.stdout.split("\nrule ")
    train = [j for j in jobs if j.startswith("train:")]
    predict = [j for j in jobs if j.startswith("predict:")]
    assert train and predict
    assert all("mem_mb=1234" in j and "runtime=7" in j and "gpu=1" in j and "threads: 2" in j for j in train)
    assert all("mem_mb=999" in j and "runtime=5" in j and "gpu=1" in j and "threads: 2" in j for j in predict)
