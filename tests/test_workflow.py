"""The tiny study end to end through Snakemake: outputs, report, lint, reruns, bad input.

The tiny config (config/test.yaml) runs the same DAG as the real study: 6 demo subjects,
co-registration, 2 splits, all 7 variants trained for a few iterations, evaluation, tables,
figures. It takes a few minutes on 2 cores.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import matplotlib.image as mpimg
import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
TEST_CONFIG = ROOT / "config" / "test.yaml"
# the tiny study (conftest.study) is built once per session and shared by the workers; the tests that
# run Snakemake in its folder carry the `tiny_study` xdist group
pytestmark = pytest.mark.slow


def snakemake(workdir: Path, *args: str, timeout: int = 1200) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--directory", str(workdir),
           "--cores", "2", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


# The `study` fixture (the tiny study run once per test session) is in conftest.py.


def test_table1_has_seven_variants_with_metrics_in_range(study):
    t1 = pd.read_csv(study / "tables" / "table1.csv")
    assert t1.method.tolist() == ["3D U-Net", "NCL-010", "NCL-101", "NCL-111", "RSA-010", "RSA-101", "RSA-111"]
    for m in ("sample_dice", "voxel_dice", "sample_iou", "voxel_iou"):
        assert t1[f"{m}_mean"].between(0, 100).all()
        assert t1[f"{m}_sd"].notna().all()  # two splits -> an sd
    assert (t1.n_splits == 2).all()
    assert (t1.voxel_iou_mean <= t1.voxel_dice_mean + 1e-9).all()  # IoU <= Dice always
    md = (study / "tables" / "table1.md").read_text()
    assert md.count("\n|") >= 8 and "63.984" in md
    assert "not comparable with this run's numbers" in md  # the paper's columns beside the run's
    assert r"\toprule" in (study / "tables" / "table1.tex").read_text()
    assert "not comparable" in (study / "tables" / "table1.tex").read_text()
    by_size = (study / "tables" / "detection_by_size.md").read_text()
    assert "true lesions per split" not in by_size and "true per split)" in by_size  # counts in the headers
    assert by_size.count("\n|") == 1 + 7  # the header rule and the seven methods: no stray row
    tests = pd.read_csv(study / "tables" / "paired_tests.csv")
    assert len(tests) == 6 * 4 and (tests.reference == "3D U-Net").all()
    per_subject = pd.read_csv(study / "tables" / "per_subject_metrics.csv")
    # the corrected resampled t-tests are recomputable from the per-subject scores
    from rsanet import evaluation

    again = evaluation.paired_tests(evaluation.mean_over_seeds(per_subject), n_train=3)
    np.testing.assert_allclose(again.mean_difference_pp, tests.mean_difference_pp, rtol=1e-9)
    np.testing.assert_allclose(again.p.fillna(-1), tests.p.fillna(-1), rtol=1e-9)
    assert (tests.n_train == 3).all() and (tests.n_test == 2).all()
    # variants x splits x test subjects, and the 3D U-Net's second seed (train.seeds_by_variant)
    assert len(per_subject) == (7 + 1) * 2 * 2
    assert per_subject.groupby("variant").seed.nunique().to_dict() == {v: 2 if v == "unet3d" else 1 for v in t1.variant}
    # what each comparison could have seen, beside each test (docs/metrics.md, "What a comparison could have seen")
    assert tests[["sd_pp", "detectable_pp", "paper_difference_pp", "power_for_paper"]].notna().all().all()
    shown = (study / "tables" / "paired_tests.md").read_text()
    assert "detectable Δ, 80 % power" in shown and "power for paper's Δ" in shown
    assert per_subject[["dice", "iou", "ltpr", "lfpr", "lesion_f1"]].apply(lambda c: c.between(0, 1)).all().all()


def test_attention_check_reaches_health_table1_and_findings(study):
    """docs/models.md, "Attention that learns": every attention training records its attention check; training_health.md and
    Table 1 count the inert ones; findings.md states what the run found, generated from its tables."""
    health = pd.read_csv(study / "tables" / "training_health.csv")
    att = health[health.variant != "unet3d"]
    assert att.attention_inert.notna().all() and health[health.variant == "unet3d"].attention_inert.isna().all()
    assert att.attention_changed_share.between(0, 1).all()
    t1 = pd.read_csv(study / "tables" / "table1.csv").set_index("variant")
    assert t1.loc["unet3d", "n_attention_checked"] == 0
    assert (t1.drop(index="unet3d").n_attention_checked == 2).all()
    n_inert = int(att.attention_inert.astype(bool).sum())
    assert int(t1.n_attention_inert.sum()) == n_inert
    assert "## The attention check" in (study / "tables" / "training_health.md").read_text()
    assert "Attention inert" in (study / "tables" / "table1.md").read_text()
    findings = (study / "tables" / "findings.md").read_text()
    assert f"{n_inert} of {len(att)} attention trainings" in findings
    assert findings.count("**") == 2 * 6  # every variant's comparison, in words
    assert "no significant difference" not in findings.replace("no significant difference, and", "").replace(
        "no significant difference, although", "")  # never alone
    assert (study / "tables" / "findings.html").read_text().startswith("<html>")


def test_deviations_table_is_computed_from_the_config_that_ran(study):
    dev = pd.read_csv(study / "tables" / "deviations.csv").set_index("setting")
    assert dev.loc["train.iterations", "this_run"] == "4" and dev.loc["train.iterations", "status"] == "deviates"
    assert dev.loc["train.crop", "status"] == "not stated in the paper"
    assert dev.loc["splits.n_val", "this_run"] == "1"
    assert dev.loc["registration.engine", "this_run"] in ("simpleitk", "flirt")
    assert "deviate from the paper" in (study / "tables" / "deviations.md").read_text()


def test_splits_file_is_the_plan_the_workflow_used(study):
    """results/splits.json holds exactly the splits the input functions planned with."""
    from rsanet.demo import subject_id
    from rsanet.splits import make_splits

    cfg = yaml.safe_load(TEST_CONFIG.read_text())
    planned = make_splits([subject_id(i) for i in range(cfg["demo"]["n_subjects"])], cfg["splits"]["n_splits"],
                          cfg["splits"]["n_train"], cfg["splits"]["n_test"], cfg["splits"]["seed"], cfg["splits"]["n_val"])
    written = json.loads((study / "splits.json").read_text())
    assert written["splits"] == planned and written["n_val"] == 1 and written["n_train"] == 3
    log = (study.parent / "logs" / "train" / "unet3d" / "split0" / "seed0.log").read_text()
    line = next(x for x in log.splitlines() if "training on" in x)
    assert all(s in line for s in planned[0]["train"])
    assert not any(s in line for s in planned[0]["val"] + planned[0]["test"])  # never trained on


def test_figures_are_readable_images(study):
    for name in ("fig1", "fig5", "training_curves", "score_distributions", "registration_accuracy"):
        png = mpimg.imread(study / "figures" / f"{name}.png")
        assert png.ndim == 3 and png.shape[0] > 100 and png.shape[1] > 100, name
        assert png[..., :3].std() > 0.01, f"{name} is blank"
    for name in ("fig1", "fig5", "training_curves", "score_distributions"):
        assert (study / "figures" / f"{name}.pdf").read_bytes()[:5] == b"%PDF-"
    qc = sorted((study / "qc" / "registration").glob("*.png"))
    assert len(qc) == 6


def test_coregistration_recovers_the_known_motion(study):
    acc = pd.read_csv(study / "qc" / "registration_accuracy.csv")
    assert len(acc) == 12 and set(acc.contrast) == {"T1", "T2"}
    assert acc.mean_error_mm.median() < 1.0, acc
    assert set(acc.engine) == {"simpleitk"} or set(acc.engine) == {"flirt"}
    rec = json.loads((study / "registered" / "demo-001" / "registration.json").read_text())
    assert rec["reference"] == "FLAIR" and set(rec["results"]) == {"T1", "T2"}
    tdir = study / "registered" / "demo-001" / "transforms"
    assert (tdir / "T1_to_FLAIR.mat").exists() and (tdir / "T1_to_FLAIR.itk.txt").exists()
    flair = nib.load(study / "registered" / "demo-001" / "FLAIR.nii.gz")
    t1 = nib.load(study / "registered" / "demo-001" / "T1.nii.gz")
    assert t1.shape == flair.shape and np.allclose(t1.affine, flair.affine)


def test_predictions_are_binary_nifti_on_the_reference_grid(study):
    splits = json.loads((study / "splits.json").read_text())["splits"]
    subject = splits[0]["test"][0]
    pred = nib.load(study / "predictions" / "rsa-111" / "split0" / "seed0" / f"{subject}.nii.gz")
    data = np.asarray(pred.dataobj)
    assert set(np.unique(data)) <= {0, 1}
    ref = nib.as_closest_canonical(nib.load(study / "registered" / subject / "FLAIR.nii.gz"))
    assert pred.shape == ref.shape and np.allclose(pred.affine, ref.affine)


def test_provenance_records_versions_config_and_engine(study):
    prov = json.loads((study / "provenance.json").read_text())
    assert prov["registration_engines"] in (["simpleitk"], ["flirt"])
    assert prov["libraries"]["torch"] and prov["config"]["splits"]["n_splits"] == 2
    assert prov["device"] == "cpu" or prov["device"].startswith("cuda")
    assert prov["precision"] in ("bf16 autocast", "float32")


def test_training_logs_and_progress_lines(study):
    log_csv = pd.read_csv(study / "models" / "unet3d" / "split0" / "seed0" / "train_log.csv")
    assert log_csv.iteration.tolist() == [1, 2, 3, 4] and np.isfinite(log_csv.loss).all()
    log_text = (study.parent / "logs" / "train" / "unet3d" / "split0" / "seed0.log").read_text()
    assert "iter 4/4" in log_text
    assert not (study / "models" / "unet3d" / "split0" / "seed0" / "checkpoint.pt").exists()  # cleaned up
    pred_log = (study.parent / "logs" / "predict" / "unet3d" / "split0" / "seed0.log").read_text()
    assert "tiles of (16, 32, 32) voxels, overlap 0.25, gaussian blending" in pred_log
    assert "; bf16 autocast)" in pred_log or "; float32)" in pred_log


@pytest.mark.xdist_group("tiny_study")  # runs Snakemake in the shared study's folder
def test_rerun_has_nothing_to_do_and_report_builds(study):
    work = study.parent
    again = snakemake(work, "--configfile", str(TEST_CONFIG), "-n")
    assert again.returncode == 0 and "Nothing to be done" in again.stdout + again.stderr
    report = snakemake(work, "--configfile", str(TEST_CONFIG), "--report", "report.html", timeout=600)
    assert report.returncode == 0, report.stderr[-3000:]
    html = (work / "report.html").read_text(errors="replace")
    assert len(html) > 10_000 and "table1" in html and "fig5" in html
    # its opening paragraph: the run's findings, generated from its tables (findings.md)
    assert "What this run found" in html and "Trainings that failed their health check" in html
    assert "Main comparison against the 3D U-Net: RSA-111" in html
    # the shareable form: a zip of the report and its files (the single HTML holds everything inline)
    packed = snakemake(work, "--configfile", str(TEST_CONFIG), "--report", "report.zip", timeout=600)
    assert packed.returncode == 0, packed.stderr[-3000:]
    import zipfile

    with zipfile.ZipFile(work / "report.zip") as z:
        names = z.namelist()
        assert z.testzip() is None
    assert any(n.endswith("report.html") for n in names)
    assert any(n.endswith("table1.csv") for n in names) and any(n.endswith("fig5.png") for n in names)
    assert any(n.endswith("job_times.csv") for n in names)


@pytest.mark.xdist_group("tiny_study")  # runs Snakemake in the shared study's folder
def test_changing_job_sizes_plans_no_job_on_a_finished_study(study, tmp_path):
    """Threads, memory, runtime and GPUs are resources, not parameters: nothing reruns."""
    cfg = yaml.safe_load(TEST_CONFIG.read_text())
    cfg["resources"] = {"train": {"threads": 2, "mem_mb": 7000, "runtime": 99, "gpus": 1},
                        "predict": {"threads": 2, "mem_mb": 6000, "runtime": 77, "gpus": 1}}
    (tmp_path / "sizes.yaml").write_text(yaml.safe_dump(cfg))
    run = snakemake(study.parent, "--configfile", str(tmp_path / "sizes.yaml"), "-n", "--resources", "gpu=1")
    out = run.stdout + run.stderr
    assert run.returncode == 0 and "Nothing to be done" in out, out[-3000:]


def test_same_config_gives_identical_results(study, tmp_path):
    """Reproducibility: a second run of a subset of the same DAG (the cohort, its co-registration and
    preprocessing, one training and test prediction of the baseline and of RSA-111) gives
    byte-identical files."""
    scored = ["metrics/unet3d/split0/seed0.csv", "metrics/rsa-111/split1/seed0.csv"]
    args = derived_config(tmp_path / "config.yaml", variants=["unet3d", "rsa-111"])
    run = snakemake(tmp_path, *(f"results/{rel}" for rel in scored), *args)  # targets before --configfile
    assert run.returncode == 0, run.stderr[-3000:]
    second = tmp_path / "results"
    assert (second / "splits.json").read_bytes() == (study / "splits.json").read_bytes()
    for rel in ("demo/demo-003/FLAIR.nii.gz", "preprocessed/demo-003.npz", *scored):
        assert (second / rel).read_bytes() == (study / rel).read_bytes(), rel


def test_snakefmt_check_is_clean():
    """As the workflow catalogue checks it: snakefmt on workflow/ (and the top-level Snakefile)."""
    run = subprocess.run([sys.executable, "-m", "snakefmt", "--check", str(ROOT / "Snakefile"), str(ROOT / "workflow")],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr


@pytest.mark.parametrize("snakefile", ["Snakefile", "workflow/Snakefile"])
def test_lint_is_clean(snakefile):
    """`snakemake --lint` on the catalogue's entry point (workflow/Snakefile) and on the top-level
    one that includes it."""
    run = subprocess.run([sys.executable, "-m", "snakemake", "--lint", "-s", str(ROOT / snakefile)],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert run.returncode == 0 and "Lints for" not in run.stdout + run.stderr, run.stdout + run.stderr


def test_the_catalogue_file_names_the_current_deployment_keys():
    catalogue = yaml.safe_load((ROOT / ".snakemake-workflow-catalog.yml").read_text())
    assert set(catalogue["usage"]["software-stack-deployment"]) == {"conda", "apptainer", "apptainer+conda"}
    assert (ROOT / "workflow" / "Snakefile").is_file()


def test_trainings_are_scheduled_before_predictions(tmp_path):
    """Whenever a training and a prediction are both ready, the training starts first (rule
    priority): every health verdict comes early, and the study does not end on one training
    followed by its prediction with the other cores idle (docs/performance.md)."""
    run = snakemake(tmp_path, "--configfile", str(TEST_CONFIG), "-n")
    assert run.returncode == 0, run.stderr[-3000:]
    blocks = [b for b in (run.stdout + run.stderr).split("\n\n") if "rule train:" in b or "rule predict:" in b]
    train = [b for b in blocks if "rule train:" in b]
    predict = [b for b in blocks if "rule predict:" in b]
    assert len(train) == len(predict) == 16  # 7 variants x 2 splits, and a second seed of the 3D U-Net
    assert all("priority: 1" in b for b in train)
    assert not any("priority:" in b for b in predict)  # Snakemake prints only non-zero priorities


# --------------------------------------------------------------------------------------------
# Bad input: the run stops before any work, naming the subject and the file
# --------------------------------------------------------------------------------------------
def _user_cohort(root: Path, n: int = 2) -> Path:
    """``n`` subjects with plausible files; returns the sheet path."""
    rows = []
    for sid in (f"p{i + 1:02d}" for i in range(n)):
        d = root / sid
        d.mkdir(parents=True)
        img = np.zeros((16, 16, 8), np.float32)
        img[4:12, 4:12, 2:6] = 100
        mask = np.zeros((16, 16, 8), np.uint8)
        mask[6, 6, 3] = 1
        aff = np.diag([1.4, 1.4, 3.0, 1.0])
        for c in ("T1", "T2", "FLAIR"):
            nib.save(nib.Nifti1Image(img, aff), d / f"{c}.nii.gz")
        nib.save(nib.Nifti1Image(mask, aff), d / "lesions.nii.gz")
        rows.append(dict(subject=sid, t1=f"{sid}/T1.nii.gz", t2=f"{sid}/T2.nii.gz",
                         flair=f"{sid}/FLAIR.nii.gz", lesions=f"{sid}/lesions.nii.gz"))
    sheet = root / "subjects.tsv"
    pd.DataFrame(rows).to_csv(sheet, sep="\t", index=False)
    return sheet


def derived_config(path: Path, **overrides) -> list[str]:
    """The tiny config with top-level sections replaced, written to ``path``; CLI args to use it."""
    cfg = yaml.safe_load(TEST_CONFIG.read_text())
    cfg.update(overrides)
    path.write_text(yaml.safe_dump(cfg))
    return ["--configfile", str(path)]


def _bad_config(tmp_path: Path, sheet: Path, **overrides) -> list[str]:
    splits = {"n_splits": 1, "n_train": 1, "n_val": 0, "n_test": 1}
    return derived_config(tmp_path / "config.yaml", subjects=str(sheet), splits=splits, **overrides)


def test_own_sheet_alone_plans_the_paper_preset_and_names_it(tmp_path):
    """A config of `subjects:` and nothing else never runs on the demo's 2-core shortcuts: the dry
    run's log names the paper preset and the settings it plans (widths, iterations, the rotation
    search); `preset: cpu` names the CPU workstation preset instead."""
    sheet = _user_cohort(tmp_path / "data", n=43)
    (tmp_path / "mine.yaml").write_text(f"subjects: {sheet}\n")
    run = snakemake(tmp_path / "work", "--configfile", str(tmp_path / "mine.yaml"), "-n")
    assert run.returncode == 0, run.stderr[-3000:]
    line = next(ln for ln in run.stderr.splitlines() if ln.startswith("rsanet: preset"))
    assert "preset 'paper'" in line and "widths [32, 64, 128, 256, 512]" in line and "800 iterations" in line
    assert "search +/-30 deg" in line and "job GPUs: 1" in line
    (tmp_path / "cpu.yaml").write_text(f"subjects: {sheet}\npreset: cpu\n")
    run = snakemake(tmp_path / "work", "--configfile", str(tmp_path / "cpu.yaml"), "-n")
    line = next(ln for ln in run.stderr.splitlines() if ln.startswith("rsanet: preset"))
    assert "preset 'cpu'" in line and "widths [8, 16, 32, 64]" in line and "search +/-30 deg" in line
    assert "job GPUs: 0" in line
    assert not (tmp_path / "work" / "results").exists()


def test_4d_image_stops_the_run_naming_subject_and_file(tmp_path):
    sheet = _user_cohort(tmp_path / "data")
    bad = tmp_path / "data" / "p02" / "T2.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((16, 16, 8, 3), np.float32), np.eye(4)), bad)
    run = snakemake(tmp_path / "work", *_bad_config(tmp_path, sheet), "--retries", "0")
    assert run.returncode != 0
    log = (tmp_path / "work" / "logs" / "check_inputs.log").read_text()
    assert "'p02'" in log and str(bad) in log and "expected a 3D image" in log
    results = tmp_path / "work" / "results"
    assert not (results / "registered").exists() and not (results / "qc" / "input_checks.tsv").exists()


def test_missing_file_and_bad_config_are_reported_before_anything_runs(tmp_path):
    sheet = _user_cohort(tmp_path / "data")
    (tmp_path / "data" / "p01" / "FLAIR.nii.gz").unlink()
    bad_train = {"widths": [4], "crop": [8, 8, 8], "batch_size": 0, "iterations": 2}
    run = snakemake(tmp_path / "work", *_bad_config(tmp_path, sheet, train=bad_train))
    out = run.stdout + run.stderr
    assert run.returncode != 0
    assert "subject 'p01', FLAIR file" in out and "file not found" in out
    assert "batch_size" in out and "widths" in out  # every violation listed, not only the first
    assert not (tmp_path / "work" / "results").exists()


# --------------------------------------------------------------------------------------------
# Real-world orientations: predictions on the reference file's own grid
# --------------------------------------------------------------------------------------------
def _reorient(img: nib.Nifti1Image, codes) -> nib.Nifti1Image:
    from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, io_orientation, ornt_transform

    t = ornt_transform(io_orientation(img.affine), axcodes2ornt(codes))
    return nib.Nifti1Image(apply_orientation(np.asarray(img.dataobj), t), img.affine @ inv_ornt_aff(t, img.shape))


def _oblique(img: nib.Nifti1Image) -> nib.Nifti1Image:
    c, s = np.cos(np.radians(15.0)), np.sin(np.radians(15.0))
    rot = np.array([[1, 0, 0, 0], [0, c, -s, 0], [0, s, c, 0], [0, 0, 0, 1.0]])
    return nib.Nifti1Image(np.asarray(img.dataobj), rot @ img.affine)


def test_lps_las_and_oblique_copies_give_the_same_predictions_on_their_own_grids(registered_cohort, tmp_path):
    """The tiny cohort (already co-registered: registration.engine none) stored RAS, LPS, LAS and
    oblique: each prediction has its FLAIR file's exact shape and affine, and equals the RAS
    prediction voxel for voxel after mapping back."""
    subjects = sorted(p.name for p in (registered_cohort / "registered").iterdir())
    makers = {"RAS": lambda i: _reorient(i, ("R", "A", "S")), "LPS": lambda i: _reorient(i, ("L", "P", "S")),
              "LAS": lambda i: _reorient(i, ("L", "A", "S")), "oblique": lambda i: _oblique(_reorient(i, ("R", "A", "S")))}
    preds = {}
    for name, make in makers.items():
        data, rows = tmp_path / name / "data", []
        for s in subjects:
            (data / s).mkdir(parents=True)
            for f in ("T1", "T2", "FLAIR", "lesions"):
                nib.save(make(nib.load(registered_cohort / "registered" / s / f"{f}.nii.gz")), data / s / f"{f}.nii.gz")
            rows.append({"subject": s, **{k: f"{s}/{f}.nii.gz" for k, f in
                                          (("t1", "T1"), ("t2", "T2"), ("flair", "FLAIR"), ("lesions", "lesions"))}})
        pd.DataFrame(rows).to_csv(data / "subjects.tsv", sep="\t", index=False)
        cfg = yaml.safe_load(TEST_CONFIG.read_text())
        cfg.update(subjects=str(data / "subjects.tsv"), variants=["unet3d"],
                   splits={"n_splits": 1, "n_train": 4, "n_val": 1, "n_test": 2, "seed": 0},
                   figures={"fig5_variants": ["unet3d"]})
        cfg["registration"]["engine"] = "none"
        cfg["train"]["seeds_by_variant"] = {"unet3d": 1}  # one training: the orientation is the point
        cfg["predict"]["save_probabilities"] = True
        (tmp_path / name / "config.yaml").write_text(yaml.safe_dump(cfg))
        run = snakemake(tmp_path / name / "work", "--configfile", str(tmp_path / name / "config.yaml"), "--until", "predict")
        assert run.returncode == 0, name + run.stdout[-2000:] + run.stderr[-3000:]
        test = json.loads((tmp_path / name / "work" / "results" / "splits.json").read_text())["splits"][0]["test"]
        for s in test:
            pred = nib.load(tmp_path / name / "work" / "results" / "predictions" / "unet3d" / "split0" / "seed0" / f"{s}.nii.gz")
            flair = nib.load(data / s / "FLAIR.nii.gz")
            assert pred.shape == flair.shape and np.array_equal(pred.affine, flair.affine), (name, s)
            preds[(name, s)] = pred
    for (name, s), pred in preds.items():
        back = np.asarray(_reorient(pred, ("R", "A", "S")).dataobj)
        assert np.array_equal(back, np.asarray(preds[("RAS", s)].dataobj)), (name, s)
    # the probability maps (not only the thresholded masks, which may be empty at 4 iterations)
    for (name, s), pred in preds.items():
        prob = nib.load(tmp_path / name / "work" / "results" / "predictions" / "unet3d" / "split0" / "seed0" / f"{s}_prob.nii.gz")
        assert prob.shape == pred.shape and np.array_equal(prob.affine, pred.affine)
        ras = nib.load(tmp_path / "RAS" / "work" / "results" / "predictions" / "unet3d" / "split0" / "seed0" / f"{s}_prob.nii.gz")
        back = np.asarray(_reorient(prob, ("R", "A", "S")).dataobj)
        assert back.max() > 0 and np.array_equal(back, np.asarray(ras.dataobj)), (name, s)


def test_allow_empty_masks_runs_a_subject_without_lesions_to_the_report(registered_cohort, tmp_path):
    """preprocess.allow_empty_masks: a subject whose mask is empty is validated (warning),
    co-registered, preprocessed, trained on or scored with the empty-mask rules, and reported."""
    from rsanet.splits import make_splits

    subjects = sorted(p.name for p in (registered_cohort / "registered").iterdir())
    planned = make_splits(subjects, 2, 4, 2, 0, n_val=1)
    # one empty subject scored in a test set, one trained on (crops fall back to uniform sampling)
    empties = {planned[0]["test"][0], next(s for s in planned[0]["train"] if s != planned[0]["test"][0])}
    data, rows = tmp_path / "data", []
    for s in subjects:
        (data / s).mkdir(parents=True)
        for f in ("T1", "T2", "FLAIR", "lesions"):
            img = nib.load(registered_cohort / "registered" / s / f"{f}.nii.gz")
            if f == "lesions" and s in empties:
                img = nib.Nifti1Image(np.zeros(img.shape, np.uint8), img.affine)
            nib.save(img, data / s / f"{f}.nii.gz")
        rows.append({"subject": s, "t1": f"{s}/T1.nii.gz", "t2": f"{s}/T2.nii.gz", "flair": f"{s}/FLAIR.nii.gz",
                     "lesions": f"{s}/lesions.nii.gz"})
    pd.DataFrame(rows).to_csv(data / "subjects.tsv", sep="\t", index=False)
    cfg = yaml.safe_load(TEST_CONFIG.read_text())
    cfg.update(subjects=str(data / "subjects.tsv"), variants=["unet3d", "rsa-111"],
               splits={"n_splits": 2, "n_train": 4, "n_val": 1, "n_test": 2, "seed": 0},
               figures={"fig5_variants": ["rsa-111", "unet3d"]})
    cfg["registration"]["engine"] = "none"
    cfg["train"]["seeds_by_variant"] = {"unet3d": 1}
    cfg["preprocess"]["allow_empty_masks"] = True
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    work = tmp_path / "work"
    run = snakemake(work, "--configfile", str(tmp_path / "config.yaml"))
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert "the mask is empty" in (work / "logs" / "check_inputs.log").read_text()
    per_subject = pd.read_csv(work / "results" / "tables" / "per_subject_metrics.csv")
    assert json.loads((work / "results" / "splits.json").read_text())["splits"] == planned
    scored = per_subject[per_subject.subject == planned[0]["test"][0]]
    assert len(scored) >= 2  # both variants scored it
    for _, row in scored.iterrows():  # the empty-mask rules: no true lesions
        assert row.n_true_lesions == 0 and row.ltpr == 1.0 and row.volume_true_ml == 0
        assert np.isnan(row.rel_volume_error)
    report = snakemake(work, "--configfile", str(tmp_path / "config.yaml"), "--report", "report.html", timeout=600)
    assert report.returncode == 0, report.stderr[-3000:]
    assert (work / "report.html").stat().st_size > 10_000


@pytest.mark.xdist_group("tiny_study")  # runs Snakemake in the shared study's folder
def test_validation_target_scores_only_the_validation_parts(study):
    """`snakemake validation`: every trained model predicts its split's validation subjects."""
    run = snakemake(study.parent, "validation", "--configfile", str(TEST_CONFIG))  # target first
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    splits = json.loads((study / "splits.json").read_text())["splits"]
    rows = pd.concat([pd.read_csv(p) for p in (study / "validation" / "metrics").rglob("*.csv")])
    for k, s in enumerate(splits):
        assert set(rows[rows.split == k].subject) == set(s["val"])
    assert "Sample Dice" in (study / "validation" / "table1_validation.md").read_text()


def test_demo_results_page_is_generated_from_the_run(study, tmp_path):
    """tools/demo_results.py builds docs/demo_results.md from a finished study's own tables."""
    intro = tmp_path / "intro.md"
    intro.write_text("# Demo results\n\nWhat ran, where, how long.\n")
    run = subprocess.run([sys.executable, str(ROOT / "tools" / "demo_results.py"), "--results", str(study),
                          "--intro", str(intro)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    page = run.stdout
    assert page.startswith("# Demo results\n")
    for part in ("table1.md", "training_health.md", "paired_tests.md", "table2.md", "job_times.md"):
        assert (study / "tables" / part).read_text().strip() in page, part
    # precision by agreement: one row per variant and agreement bin, from the lesion_confidence rule
    block = page.split("lesion-wise precision by ensemble agreement")[1].split("## Per-lesion confidence: calibrated")[0]
    rows = [line for line in block.splitlines() if line.startswith("| ") and not line.startswith("| variant")]
    assert len(rows) == 7 * 3, block
    assert all(line.split(" | ")[1] in ("< 0.4", "0.4 to < 0.8", ">= 0.8") for line in rows), rows
    # the calibrated confidence: one row per variant and ensemble kind, from the lesion_calibration rule
    block = page.split("## Per-lesion confidence: calibrated")[1].split("## Where the time went")[0]
    rows = [line for line in block.splitlines() if line.startswith("| ") and not line.startswith("| variant")]
    kinds = [json.loads(p.read_text())["kinds"] for p in (study / "tables" / "lesion_calibration").glob("*.json")]
    assert len(kinds) == 7 and len(rows) == sum(len(k) for k in kinds), block
