"""rsanet-bids, the BIDS App of a study's export: a BIDS dataset (the three real patients, demo subjects with
two sessions, and four cases that cannot be segmented) through the participant and group levels
into a BIDS-Derivatives dataset that pybids reads back, every mask on its own FLAIR's grid; the
workflow's `snakemake segment` with `segment_subjects: {bids: ...}` writes the same files."""

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

from real_data import MNI_PATIENTS, open_ms_data
from test_workflow import TEST_CONFIG, snakemake

pytestmark = pytest.mark.slow


def _put(root: Path, sub: str, ses: str | None, files: dict[str, Path]) -> Path:
    """Copy ``files`` (BIDS suffix -> source) into ``sub-<sub>[/ses-<ses>]/anat``; returns that folder."""
    anat = root / f"sub-{sub}" / (f"ses-{ses}" if ses else "") / "anat"
    anat.mkdir(parents=True, exist_ok=True)
    stem = f"sub-{sub}" + (f"_ses-{ses}" if ses else "")
    for suffix, src in files.items():
        shutil.copyfile(src, anat / f"{stem}_{suffix}.nii.gz")
    return anat


def _contrasts(folder: Path) -> dict[str, Path]:
    return {"T1w": folder / "T1.nii.gz", "T2w": folder / "T2.nii.gz", "FLAIR": folder / "FLAIR.nii.gz"}


def bids_app(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rsanet.bids_app", *map(str, args)], capture_output=True, text=True,
                          timeout=900)


@pytest.mark.xdist_group("tiny_study")  # runs Snakemake in the shared study's folder
def test_participant_then_group_write_derivatives_pybids_reads_and_refuse_bad_cases(study, export, tmp_path):
    from bids import BIDSLayout

    demo = study / "demo"
    root = tmp_path / "bids"
    good = {("01", "1"): demo / "demo-001", ("01", "2"): demo / "demo-002", ("02", "a"): demo / "demo-003",
            ("02", "b"): demo / "demo-004",
            # the three real patients (1 mm isotropic, another grid than the tiny study's)
            **{(p[-2:], None): open_ms_data() / "patients_mni" / p for p in MNI_PATIENTS}}
    for (sub, ses), folder in good.items():
        _put(root, sub, ses, _contrasts(folder))
    files = _contrasts(demo / "demo-005")
    _put(root, "90", None, {k: v for k, v in files.items() if k != "FLAIR"})  # no FLAIR
    two = _put(root, "91", None, files)  # two FLAIRs in one session
    shutil.copyfile(files["FLAIR"], two / "sub-91_acq-2_FLAIR.nii.gz")
    anat = _put(root, "92", None, files)  # a 4D T1
    t1 = nib.load(anat / "sub-92_T1w.nii.gz")
    nib.save(nib.Nifti1Image(np.stack([np.asarray(t1.dataobj)] * 2, -1), t1.affine), anat / "sub-92_T1w.nii.gz")
    anat = _put(root, "93", "x", files)  # an unreadable T2 (its participant's only session)
    (anat / "sub-93_ses-x_T2w.nii.gz").write_bytes(b"not an image")
    (root / "dataset_description.json").write_text(json.dumps({"Name": "test", "BIDSVersion": "1.9.0"}))
    out = tmp_path / "derivatives" / "rsanet"

    run = bids_app(root, out, "participant", "--model", export, "--device", "cpu")
    assert run.returncode == 1, run.stderr[-3000:]
    errors = [line for line in run.stderr.splitlines() if line.startswith("rsanet-bids: error:")]
    assert len(errors) == 4, run.stderr[-3000:]
    assert "sub-90: no _FLAIR image" in run.stderr
    assert "sub-91: 2 _FLAIR images (sub-91_FLAIR.nii.gz, sub-91_acq-2_FLAIR.nii.gz)" in run.stderr
    assert "'sub-92'" in run.stderr and "sub-92_T1w.nii.gz" in run.stderr and "4D" in run.stderr
    assert "'sub-93_ses-x'" in run.stderr and "sub-93_ses-x_T2w.nii.gz" in run.stderr and "cannot be read" in run.stderr
    # nothing of a failed case, no temporary folder left
    assert sorted(p.name for p in out.iterdir()) == sorted(["dataset_description.json", "sub-01", "sub-02",
                                                             *(f"sub-{p[-2:]}" for p in MNI_PATIENTS)])
    assert not [p for p in out.rglob(".*")]
    description = json.loads((out / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative" and description["GeneratedBy"][0]["Name"] == "rsanet"

    layout = BIDSLayout(str(root), derivatives=[str(out)], validate=False)
    masks = layout.get(scope="derivatives", suffix="mask", label="lesion", extension=".nii.gz")
    assert {(m.entities["subject"], m.entities.get("session")) for m in masks} == set(good)
    export_meta = json.loads((export / "export.json").read_text())
    for mask in masks:
        where = {"subject": mask.entities["subject"], "session": mask.entities.get("session")}
        flair = layout.get(scope="raw", suffix="FLAIR", extension=".nii.gz", **{k: v for k, v in where.items() if v})[0]
        source = nib.load(flair.path)
        for suffix, extra in (("mask", {"label": "lesion"}), ("probseg", {"label": "lesion"}), ("dseg", {"desc": "lesions"})):
            image = layout.get(scope="derivatives", suffix=suffix, extension=".nii.gz", **extra,
                               **{k: v for k, v in where.items() if v})
            assert len(image) == 1
            img = nib.load(image[0].path)
            assert img.shape == source.shape and np.allclose(img.affine, source.affine), image[0].path
        meta = mask.get_metadata()
        assert meta["Type"] == "Lesion" and meta["Threshold"] == export_meta["predict"]["threshold"]
        assert len(meta["ExportSHA256"]) == 64 and meta["AgreementDefinition"]
        assert meta["Sources"][2] == f"bids:raw:{Path(flair.path).relative_to(root)}"
        table = layout.get(scope="derivatives", suffix="lesions", extension=".tsv",
                           **{k: v for k, v in where.items() if v})[0]
        lesions = pd.read_csv(table.path, sep="\t")
        labels = np.asarray(nib.load(layout.get(scope="derivatives", suffix="dseg", extension=".nii.gz",
                                                **{k: v for k, v in where.items() if v})[0].path).dataobj)
        assert meta["lesion_count"] == len(lesions) == labels.max()
        assert (np.asarray(nib.load(mask.path).dataobj) > 0).sum() == (labels > 0).sum()

    run = bids_app(root, out, "group")
    assert run.returncode == 0, run.stderr[-3000:]
    cohort = pd.read_csv(out / "cohort.tsv", sep="\t", keep_default_na=False)
    cases = {f"sub-{s}" + (f"_ses-{t}" if t else "") for s, t in good}
    assert set(cohort.subject) == cases and len(cohort) == len(cases)
    assert set(cohort.session_id) == {"ses-1", "ses-2", "ses-a", "ses-b", "n/a"}
    columns = json.loads((out / "cohort.json").read_text())
    assert set(columns) == set(cohort.columns) and (out / "figures" / "cohort.png").is_file()

    # the selection flags: one participant's one session
    one = tmp_path / "one"
    run = bids_app(root, one, "participant", "--model", export, "--device", "cpu", "--participant-label", "sub-01",
                   "--session-label", "2")
    assert run.returncode == 0, run.stderr[-3000:]
    assert [p.relative_to(one).as_posix() for p in one.rglob("*_mask.nii.gz")] == [
        "sub-01/ses-2/anat/sub-01_ses-2_label-lesion_mask.nii.gz"]

    # the demo participants through the workflow (segment_subjects: {bids: ...}): the same files (the
    # real patients go through `snakemake segment` in test_segment's external test)
    labels = ["01", "02"]
    (tmp_path / "bids.yaml").write_text(yaml.safe_dump({"segment_subjects": {"bids": str(root),
                                                                             "participant_label": labels}}))
    run = snakemake(study.parent, "segment", "--configfile", str(TEST_CONFIG), str(tmp_path / "bids.yaml"))
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    workflow_out = study / "derivatives" / "rsanet"

    def cases_files(root: Path) -> list[Path]:  # the two participants' files (the group level's cohort differs)
        return sorted(p.relative_to(root) for p in root.rglob("*")
                      if p.is_file() and p.relative_to(root).parts[0] in {"dataset_description.json", "sub-01", "sub-02"})

    app_files = cases_files(out)
    assert len(app_files) > 10 and app_files == cases_files(workflow_out)
    for rel in app_files:
        a, b = out / rel, workflow_out / rel
        if rel.name.endswith(".nii.gz"):
            ia, ib = nib.load(a), nib.load(b)
            assert np.array_equal(ia.dataobj, ib.dataobj) and np.array_equal(ia.affine, ib.affine), rel
        elif rel.suffix == ".json":
            ja, jb = (json.loads(p.read_text()) for p in (a, b))
            for j in (ja, jb):  # run-specific: the stage timings and where the export lay
                j.pop("seconds", None)
                for key in ("model", "Model"):
                    j.get(key, {}).pop("export", None)
            assert ja == jb, rel
        elif rel.suffix == ".tsv":
            ta, tb = (pd.read_csv(p, sep="\t").filter(regex="^(?!seconds_)") for p in (a, b))
            pd.testing.assert_frame_equal(ta, tb)
