"""Segmenting new patients with a study's export: the export, rsanet-segment on a real patient
(outputs on the input FLAIR's own grid, LPS and oblique copies agreeing voxel for voxel), bad
inputs and bad exports (clear error, nothing left in the output folder), and `snakemake segment`
on the three real patients as an external test set."""

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

from real_data import MNI_PATIENTS, open_ms_data
from test_workflow import TEST_CONFIG, _oblique, _reorient, snakemake

pytestmark = pytest.mark.slow
OUTPUTS = {"lesion_prob.nii.gz", "lesion_prob_sd.nii.gz", "lesions.nii.gz", "lesion_labels.nii.gz", "lesions.csv",
           "lesions.json", "summary.json", "qc.png"}


def segment_cli(model: Path, inputs: dict, out: Path, cwd: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "rsanet.segment", "--model", str(model), "--t1", str(inputs["T1"]),
           "--t2", str(inputs["T2"]), "--flair", str(inputs["FLAIR"]), "--out", str(out), "--device", "cpu", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, timeout=900)


def _no_registration(export: Path, tmp_path: Path) -> Path:
    """A copy of the export that trusts the headers (registration.engine none): the MNI patients are
    co-registered already, and without a registration every orientation gives identical inputs."""
    copy = tmp_path / "export-none"
    shutil.copytree(export, copy)
    meta = json.loads((copy / "export.json").read_text())
    meta["registration"]["engine"] = "none"
    (copy / "export.json").write_text(json.dumps(meta))
    return copy


def test_export_holds_the_best_variant_its_models_and_a_model_card(study, export):
    # `export.variant: best` is chosen on the validation subjects (the health check), not on Table 1
    health = pd.DataFrame([json.loads(p.read_text()) for p in sorted((study / "models").rglob("health.json"))])
    means = health.groupby("variant").score.mean()
    assert means[export.name] == means.max()
    meta = json.loads((export / "export.json").read_text())
    assert "not the test subjects" in meta["chosen_by"]
    n_models = int(health[health.variant == export.name].shape[0])  # one per split and seed (train.seeds_by_variant)
    assert n_models in (2, 4) and meta["variant"] == export.name and len(meta["models"]) == n_models
    assert meta["training_data"]["n_subjects"] == 6 and len(meta["training_data"]["subject_ids_or_sheet_sha256"]) == 64
    # the study's spacing for new patients: the median voxel size of its preprocessed subjects
    spacings = np.array([np.load(p)["spacing"] for p in sorted((study / "preprocessed").glob("*.npz"))])
    assert np.allclose(meta["training_data"]["spacing_mm"], np.median(spacings, axis=0))
    assert meta["predict"]["spacing"] == "study"
    card = (export / "MODEL_CARD.md").read_text()
    for heading in ("## Intended use", "## Training data", "## Evaluation", "## Per-lesion confidence",
                    "## Deviations from the paper", "## Limitations"):
        assert heading in card
    # precision by agreement, measured in the study on subjects tested in both splits (or said to be unmeasured)
    conf = pd.read_csv(study / "tables" / "lesion_confidence" / f"{export.name}.csv")
    assert list(conf.agreement) == ["< 0.4", "0.4 to < 0.8", ">= 0.8"]
    lesions = pd.read_csv(study / "tables" / "lesion_confidence" / f"{export.name}_lesions.csv")
    assert conf.lesions.sum() == len(lesions) and conf.true_positives.sum() == lesions.true_positive.sum()
    if conf.subjects[0]:
        # the models of the splits that test a subject: both splits, or one split with two seeds
        assert set(lesions.n_models) <= ({2} if n_models == 2 else {2, 4})
        assert "Lesion-wise precision by agreement" in card
    else:
        assert "Not measured for this export" in card
    assert "Not a medical device" in card.replace("**", "")
    # the calibrated lesion confidence: the tiny study has a single validation subject held out by
    # both splits, too few to calibrate on (tests/test_calibration.py covers a calibrated export);
    # the export then keeps every model and gives no probability_real
    record = json.loads((study / "tables" / "lesion_calibration" / f"{export.name}.json").read_text())
    assert record["calibration_subjects"] and record["chosen"] is None and "lesion_calibration" not in meta
    assert "No calibrated lesion probability" in card
    assert (study / "figures" / "lesion_reliability" / f"{export.name}.png").is_file()
    # the card and export.json state what ran: the engine `auto` became, the subjects fitted on
    ran = {r["engine"] for p in (study / "registered").glob("*/registration.json")
           for r in json.loads(p.read_text())["results"].values()}
    assert meta["registration"]["engine"] == "auto" and meta["registration"]["engine_ran"] == "+".join(sorted(ran))
    dev_rows = {ln.split("|")[1].strip(): ln for ln in card.splitlines() if ln.startswith("| ")}
    assert "+".join(sorted(ran)) in dev_rows["registration.engine"] and "auto" not in dev_rows["registration.engine"]
    assert "(3 fitted + 1 validation)" in dev_rows["splits.n_train"]


def test_segment_a_real_patient_on_its_own_grid_lps_and_oblique_agree(export, tmp_path):
    patient = open_ms_data() / "patients_mni" / MNI_PATIENTS[0]
    inputs = {c: patient / f"{c}.nii.gz" for c in ("T1", "T2", "FLAIR")}
    # 1. as shipped, with the export's registration (SimpleITK here)
    run = segment_cli(export, inputs, tmp_path / "out", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert {p.name for p in (tmp_path / "out").iterdir()} == OUTPUTS
    flair = nib.load(inputs["FLAIR"])
    for name in ("lesion_prob.nii.gz", "lesions.nii.gz"):
        img = nib.load(tmp_path / "out" / name)
        assert img.shape == flair.shape and np.allclose(img.affine, flair.affine, atol=1e-5), name
    prob = np.asarray(nib.load(tmp_path / "out" / "lesion_prob.nii.gz").dataobj)
    assert prob.dtype == np.float32 and prob.min() >= 0 and prob.max() <= 1
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["settings"]["registration"]["engine_ran"] in ("simpleitk", "flirt")  # what `auto` became
    assert set(summary["seconds"]) >= {"registration", "preprocessing", "prediction", "writing"}
    lesions = pd.read_csv(tmp_path / "out" / "lesions.csv")
    assert summary["lesion_count"] == len(lesions)
    # the ensemble's disagreement: per lesion (agreement of the 2 models: 0, 0.5 or 1) and per voxel
    assert {"mean_probability", "max_probability", "agreement"} <= set(lesions.columns)
    assert lesions.agreement.isin([0.0, 0.5, 1.0]).all()
    assert (lesions.mean_probability <= lesions.max_probability + 1e-6).all()
    # the labelled map: row k of lesions.csv is the voxels of value k (volume and centroid, RAS mm)
    labels_img = nib.load(tmp_path / "out" / "lesion_labels.nii.gz")
    labels = np.asarray(labels_img.dataobj)
    assert labels.shape == flair.shape and np.allclose(labels_img.affine, flair.affine, atol=1e-5)
    assert np.array_equal(labels > 0, np.asarray(nib.load(tmp_path / "out" / "lesions.nii.gz").dataobj) > 0)
    assert labels.max() == len(lesions)
    voxel_mm3 = abs(np.linalg.det(flair.affine[:3, :3]))
    for row in lesions.itertuples():
        ijk = np.argwhere(labels == row.lesion)
        assert len(ijk) * voxel_mm3 == pytest.approx(row.volume_mm3)
        centre = flair.affine[:3, :3] @ ijk.mean(axis=0) + flair.affine[:3, 3]
        assert centre == pytest.approx([row.centroid_x_mm, row.centroid_y_mm, row.centroid_z_mm], abs=1e-3)
    sidecar = json.loads((tmp_path / "out" / "lesions.json").read_text())
    assert list(sidecar) == list(lesions.columns) and sidecar["volume_mm3"]["Units"] == "mm^3"
    sd = nib.load(tmp_path / "out" / "lesion_prob_sd.nii.gz")
    assert sd.shape == flair.shape and np.asarray(sd.dataobj).min() >= 0 and np.asarray(sd.dataobj).max() <= 0.5
    # 2. the header alignment only: the input, an LPS copy and an oblique copy, voxel for voxel
    plain = _no_registration(export, tmp_path)
    results = {}
    for name, make in {"LAS": lambda i: i, "LPS": lambda i: _reorient(i, ("L", "P", "S")), "oblique": _oblique}.items():
        d = tmp_path / name
        d.mkdir()
        copies = {c: d / f"{c}.nii.gz" for c in inputs}
        for c, p in inputs.items():
            nib.save(make(nib.load(p)), copies[c])
        run = segment_cli(plain, copies, d / "out", cwd=d)
        assert run.returncode == 0, name + run.stderr[-3000:]
        mask = nib.load(d / "out" / "lesions.nii.gz")
        ref = nib.load(copies["FLAIR"])
        assert mask.shape == ref.shape and np.allclose(mask.affine, ref.affine, atol=1e-5), name
        results[name] = (mask, nib.load(d / "out" / "lesion_prob.nii.gz"))
    base_mask = np.asarray(_reorient(results["LAS"][0], ("R", "A", "S")).dataobj)
    base_prob = np.asarray(_reorient(results["LAS"][1], ("R", "A", "S")).dataobj)
    assert base_prob.max() > 0
    for name, (mask, prob) in results.items():
        assert np.array_equal(np.asarray(_reorient(mask, ("R", "A", "S")).dataobj), base_mask), name
        assert np.array_equal(np.asarray(_reorient(prob, ("R", "A", "S")).dataobj), base_prob), name
    # 3. with the export's registration: RAS and LPS copies and one with the first two axes swapped
    #    give the shipped (LAS) patient's masks and lesion table exactly (the work runs in canonical
    #    order)
    shipped = np.asarray(_reorient(nib.load(tmp_path / "out" / "lesions.nii.gz"), ("R", "A", "S")).dataobj)
    for name, codes in {"RAS-registered": ("R", "A", "S"), "LPS-registered": ("L", "P", "S"),
                        "swapped-registered": ("A", "R", "S")}.items():
        d = tmp_path / name
        d.mkdir()
        copies = {c: d / f"{c}.nii.gz" for c in inputs}
        for c, p in inputs.items():
            nib.save(_reorient(nib.load(p), codes), copies[c])
        run = segment_cli(export, copies, d / "out", cwd=d)
        assert run.returncode == 0, name + run.stderr[-3000:]
        mask = np.asarray(_reorient(nib.load(d / "out" / "lesions.nii.gz"), ("R", "A", "S")).dataobj)
        assert np.array_equal(mask, shipped), f"{name}: {int((mask != shipped).sum())} voxels differ"
        other = pd.read_csv(d / "out" / "lesions.csv")
        assert len(other) == len(lesions), name
        assert np.allclose(other.volume_mm3.to_numpy(dtype=float), lesions.volume_mm3.to_numpy(dtype=float)), name


def _tiny_inputs(tmp_path: Path) -> dict:
    """Small valid inputs (registration engine none in the export used with them)."""
    patient = open_ms_data() / "patients_mni" / MNI_PATIENTS[0]
    return {c: patient / f"{c}.nii.gz" for c in ("T1", "T2", "FLAIR")}


@pytest.mark.parametrize("case", ["missing", "4d", "no-overlap", "empty-flair"])
def test_bad_inputs_give_a_clear_error_and_leave_nothing(export, tmp_path, case):
    plain = _no_registration(export, tmp_path)
    inputs = dict(_tiny_inputs(tmp_path))
    flair = nib.load(inputs["FLAIR"])
    if case == "missing":
        inputs["T2"] = tmp_path / "absent_T2.nii.gz"
        bad, expect = inputs["T2"], "file not found"
    elif case == "4d":
        bad = tmp_path / "T1_4d.nii.gz"
        nib.save(nib.Nifti1Image(np.zeros((8, 8, 8, 3), np.float32) + 1, flair.affine), bad)
        inputs["T1"], expect = bad, "expected a 3D image"
    elif case == "no-overlap":
        bad = tmp_path / "T1_far.nii.gz"
        moved = flair.affine.copy()
        moved[:3, 3] += 500.0  # 50 cm away: no overlap with the FLAIR at all
        nib.save(nib.Nifti1Image(np.asarray(nib.load(inputs["T1"]).dataobj), moved), bad)
        inputs["T1"], expect = bad, "field of view covers only"
    else:
        bad = tmp_path / "FLAIR_empty.nii.gz"
        nib.save(nib.Nifti1Image(np.zeros(flair.shape, np.float32), flair.affine), bad)
        inputs["FLAIR"], expect = bad, "all zero"
    run = segment_cli(plain, inputs, tmp_path / "out", cwd=tmp_path)
    assert run.returncode == 2, run.stderr[-2000:]
    assert expect in run.stderr and str(bad) in run.stderr
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # no temporary folder left


def test_corrupted_or_incompatible_exports_are_refused(export, tmp_path):
    inputs = _tiny_inputs(tmp_path)
    broken = tmp_path / "broken"
    shutil.copytree(export, broken)
    model = broken / json.loads((broken / "export.json").read_text())["models"][0]
    model.write_bytes(model.read_bytes()[:1000])
    run = segment_cli(broken, inputs, tmp_path / "out", cwd=tmp_path)
    assert run.returncode == 2 and "cannot be loaded" in run.stderr and str(model) in run.stderr
    old = tmp_path / "old"
    shutil.copytree(export, old)
    meta = json.loads((old / "export.json").read_text())
    meta["format"] = 0
    (old / "export.json").write_text(json.dumps(meta))
    run = segment_cli(old, inputs, tmp_path / "out", cwd=tmp_path)
    assert run.returncode == 2 and "export format 0" in run.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.xdist_group("tiny_study")  # runs Snakemake in the shared study's folder
def test_snakemake_segment_scores_the_real_patients_as_an_external_test_set(study, tmp_path):
    """A cohort of the three real patients and one demo subject: every subject segmented, the
    masked ones scored, and one cohort table and figure for all of them."""
    data = open_ms_data() / "patients_mni"
    rows = [{"subject": p, "t1": str(data / p / "T1.nii.gz"), "t2": str(data / p / "T2.nii.gz"),
             "flair": str(data / p / "FLAIR.nii.gz"), "lesions": str(data / p / "lesions.nii.gz")} for p in MNI_PATIENTS]
    demo = sorted((study / "demo").iterdir())[0]  # a demo subject of the tiny study, as a new patient
    rows.append({"subject": "demo-new", "t1": str(demo / "T1.nii.gz"), "t2": str(demo / "T2.nii.gz"),
                 "flair": str(demo / "FLAIR.nii.gz"), "lesions": ""})
    sheet = tmp_path / "new.tsv"
    pd.DataFrame(rows).to_csv(sheet, sep="\t", index=False)
    work = study.parent
    # the target before --config (whose values would otherwise swallow it)
    run = snakemake(work, "segment", "--configfile", str(TEST_CONFIG), "--config", f"segment_subjects={sheet}")
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    for p in [*MNI_PATIENTS, "demo-new"]:
        assert {x.name for x in (study / "segment" / p).iterdir()} == OUTPUTS
    cohort = pd.read_csv(study / "segment" / "cohort.csv")
    assert sorted(cohort.subject) == sorted([*MNI_PATIENTS, "demo-new"])
    assert list(cohort.total_volume_mm3) == sorted(cohort.total_volume_mm3, reverse=True)
    bins = [c for c in cohort.columns if c.startswith("volume_mm3[")]
    assert len(bins) >= 3 and np.allclose(cohort[bins].sum(axis=1), cohort.total_volume_mm3)
    assert "volume_mm3[<3]" not in cohort  # lesions of at most 3 mm3 are removed: no column that is always 0
    assert list(json.loads((study / "segment" / "cohort.json").read_text())) == list(cohort.columns)
    assert cohort.mean_agreement.dropna().between(0, 1).all() and (cohort.seconds_prediction > 0).all()
    for p in cohort.subject:
        lesions = pd.read_csv(study / "segment" / p / "lesions.csv")
        assert cohort.set_index("subject").loc[p, "lesion_count"] == len(lesions)
    assert (study / "figures" / "cohort.png").stat().st_size > 10_000
    table = pd.read_csv(study / "tables" / "external_test.csv")
    assert sorted(table.subject) == sorted(MNI_PATIENTS) and table.dice.between(0, 1).all()
    assert "| patient07 |" in (study / "tables" / "external_test.md").read_text()
    again = snakemake(work, "--configfile", str(TEST_CONFIG), "-n")  # the study itself is untouched
    assert "Nothing to be done" in again.stdout + again.stderr
