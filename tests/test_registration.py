"""Tests for rsanet.registration: conventions, resampling, both engines, files, bad input, CLI, QC.

The synthetic 'head' is analytic (soft ellipsoids with asymmetric inner structures), so a moving
image under a known rigid motion is sampled exactly, without a resampling step, and the true
``moving_to_fixed`` is known.  Volumes are 4 mm so every registration takes about a second.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import textwrap
from dataclasses import replace
from pathlib import Path

import matplotlib.image as mpimg
import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from fsl.data.image import Image as FslImage
from fsl.transform.flirt import fromFlirt, readFlirt, toFlirt

from rsanet import registration as reg
from rsanet.stages.coregister import main as register_cli
from rsanet.registration import (
    RegistrationError,
    RegistrationResult,
    SimpleITKSettings,
    itk_to_moving_to_fixed,
    moving_to_fixed_to_itk,
    read_itk_transform,
    register,
    registration_qc_figure,
    resample_to_fixed,
    rigid_matrix,
    write_transforms,
)

# Small pyramid for the phantom (4 mm voxels): 8 mm then 4 mm.
FAST = SimpleITKSettings(level_spacings_mm=(8.0, 4.0), samples_per_level=(0, 0), screen_iterations=100,
                         search_keep=2, powell_iterations=3)
CENTER = np.array([2.0, -10.0, 8.0])  # phantom centre, RAS mm
TRUE_MOTION = rigid_matrix((9.0, -7.0, 12.0), (8.0, -10.0, 6.0), CENTER)  # moving world -> fixed world


# ----------------------------------------------------------------------------- phantom
def _soft_ellipsoid(p: np.ndarray, center, axes, width_mm: float = 2.5) -> np.ndarray:
    r = np.sqrt((((p - np.asarray(center)) / np.asarray(axes)) ** 2).sum(axis=1))
    return 1.0 / (1.0 + np.exp(np.clip((r - 1.0) * np.mean(axes) / width_mm, -50, 50)))


_rng = np.random.default_rng(7)
#: Inner structures: centre offset (mm), semi-axes (mm), tissue class 0-2 (with different
#: intensities in the two contrasts, not related by a monotonic function).
BLOBS = [(_rng.uniform(-45, 45, 3) * [1.0, 1.1, 0.8], _rng.uniform(5, 14, 3), int(_rng.integers(0, 3)))
         for _ in range(24)]
T1_CLASS, T2_CLASS = (0.45, -0.35, 0.25), (-0.2, 0.5, 0.3)


def phantom_values(p: np.ndarray, contrast: str) -> np.ndarray:
    """Intensities of the analytic head at RAS points ``p`` (N×3, mm) in its own world."""
    c = CENTER
    head = _soft_ellipsoid(p, c, (70, 85, 62))
    brain = _soft_ellipsoid(p, c + [0, 3, 4], (60, 74, 52))
    if contrast == "t1":
        tissue = 0.35 * (head - brain) + 0.6 * brain
    else:  # T2-like: different tissue ordering, dim scalp
        tissue = 0.15 * (head - brain) + 0.45 * brain
    classes = T1_CLASS if contrast == "t1" else T2_CLASS
    for offset, axes, cls in BLOBS:
        tissue = tissue + classes[cls] * brain * _soft_ellipsoid(p, c + offset, axes, width_mm=2.0)
    return np.clip(tissue, 0, None) * 1000.0


def grid_affine(shape, spacing, center, rotation=None) -> np.ndarray:
    axes = np.diag(spacing) if rotation is None else rotation @ np.diag(spacing)
    aff = np.eye(4)
    aff[:3, :3] = axes
    aff[:3, 3] = np.asarray(center) - axes @ ((np.asarray(shape) - 1) / 2)
    return aff


def sample_phantom(shape, affine, contrast, moving_to_fixed=np.eye(4)) -> nib.Nifti1Image:
    """Image on grid (shape, affine) of the phantom seen through ``moving_to_fixed`` (phantom world = fixed)."""
    ijk = np.indices(shape).reshape(3, -1).T.astype(float)
    world = reg.apply_affine(moving_to_fixed @ affine, ijk)
    data = phantom_values(world, contrast).reshape(shape).astype(np.float32)
    return nib.Nifti1Image(data, affine)


pytestmark = pytest.mark.xdist_group("registration")  # the module's fixtures are built once, in one worker


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path, np.ndarray]:
    """A T1-like fixed image and a T2-like moving image moved by TRUE_MOTION, on different grids."""
    d = tmp_path_factory.mktemp("pair")
    fixed = sample_phantom((48, 56, 40), grid_affine((48, 56, 40), (4.0, 4.0, 4.0), CENTER), "t1")
    tilt = reg.rotation_from_euler_deg((0.0, 0.0, 3.0))
    m_aff = grid_affine((44, 52, 36), (4.0, 4.0, 4.5), CENTER + [3.0, -2.0, 1.0], tilt)
    moving = sample_phantom((44, 52, 36), m_aff, "t2", TRUE_MOTION)
    nib.save(fixed, d / "fixed.nii.gz")
    nib.save(moving, d / "moving.nii.gz")
    return d / "moving.nii.gz", d / "fixed.nii.gz", TRUE_MOTION


def mean_error_mm(estimate: np.ndarray, truth: np.ndarray, fixed_path: Path) -> float:
    img = nib.load(str(fixed_path))
    pts = reg.voxel_points_mm(np.asarray(img.dataobj) > 100, img.affine)
    return float(reg.displacement_mm(np.linalg.inv(estimate), np.linalg.inv(truth), pts).mean())


@pytest.fixture(scope="module")
def sitk_result(pair) -> RegistrationResult:
    moving, fixed, _ = pair
    return register(moving, fixed, engine="simpleitk", settings=FAST)


# ----------------------------------------------------------------------------- conventions
def test_itk_conversion_matches_simpleitk_point_mapping():
    """An ITK transform maps fixed LPS points to moving LPS points; ours maps moving RAS to fixed RAS."""
    tx = sitk.Euler3DTransform()
    tx.SetCenter((10.0, -20.0, 30.0))
    tx.SetRotation(0.2, -0.1, 0.3)
    tx.SetTranslation((5.0, -7.0, 2.0))
    m2f = itk_to_moving_to_fixed(np.array(tx.GetMatrix()), tx.GetTranslation(), tx.GetCenter())
    for fixed_lps in [(0.0, 0.0, 0.0), (40.0, -12.0, 7.5), (-33.0, 80.0, -5.0)]:
        moving_lps = np.array(tx.TransformPoint(fixed_lps))
        moving_ras = moving_lps * [-1, -1, 1]
        fixed_ras = np.array(fixed_lps) * [-1, -1, 1]
        np.testing.assert_allclose(reg.apply_affine(m2f, moving_ras[None])[0], fixed_ras, atol=1e-9)
    m, t = moving_to_fixed_to_itk(m2f, tx.GetCenter())
    np.testing.assert_allclose(m.ravel(), tx.GetMatrix(), atol=1e-12)
    np.testing.assert_allclose(t, tx.GetTranslation(), atol=1e-9)


def test_rigid_matrix_rotates_about_center():
    m = rigid_matrix((0, 0, 90), (1, 2, 3), (10, 0, 0))
    np.testing.assert_allclose(reg.apply_affine(m, np.array([[10.0, 0, 0], [11.0, 0, 0]])),
                               [[11, 2, 3], [11, 3, 3]], atol=1e-12)


# ----------------------------------------------------------------------------- resampling
def test_resample_identity_returns_the_same_voxels():
    rng = np.random.default_rng(0)
    data = rng.random((12, 10, 8)).astype(np.float32)
    labels = (data > 0.7).astype(np.uint8) * 3
    aff = grid_affine((12, 10, 8), (1.5, 1.5, 3.0), (0, 0, 0), reg.rotation_from_euler_deg((5, 0, 10)))
    out = resample_to_fixed(nib.Nifti1Image(data, aff), nib.Nifti1Image(data, aff), np.eye(4))
    np.testing.assert_allclose(np.asarray(out.dataobj), data, atol=1e-5)
    np.testing.assert_allclose(out.affine, aff)
    lab = resample_to_fixed(nib.Nifti1Image(labels, aff), nib.Nifti1Image(data, aff), np.eye(4), "nearest")
    assert lab.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asarray(lab.dataobj), labels)


def test_resample_with_known_transform_restores_the_fixed_view():
    shape, f_aff = (40, 46, 34), grid_affine((40, 46, 34), (4.0, 4.0, 4.0), CENTER)
    m_aff = grid_affine((40, 46, 36), (4.0, 4.0, 4.0), CENTER + [2.0, 1.0, -3.0])
    fixed = sample_phantom(shape, f_aff, "t1")
    moving = sample_phantom((40, 46, 36), m_aff, "t1", TRUE_MOTION)
    back = np.asarray(resample_to_fixed(moving, fixed, TRUE_MOTION).dataobj)
    f = np.asarray(fixed.dataobj)
    brain = f > 300
    err_true = np.abs(back - f)[brain].mean()
    err_identity = np.abs(np.asarray(resample_to_fixed(moving, fixed, np.eye(4)).dataobj) - f)[brain].mean()
    assert err_true < 0.06 * f[brain].mean()  # only linear-interpolation error is left
    assert err_identity > 4 * err_true
    # nearest keeps labels and their dtype; a translation by one voxel shifts the mask by one voxel
    labels = (f > 500).astype(np.int16)
    shifted = resample_to_fixed(nib.Nifti1Image(labels, f_aff), fixed, rigid_matrix((0, 0, 0), (4.0, 0, 0)), "nearest")
    out = np.asarray(shifted.dataobj)
    assert out.dtype == np.int16 and set(np.unique(out)) <= {0, 1}
    np.testing.assert_array_equal(out[1:], labels[:-1])


# ----------------------------------------------------------------------------- SimpleITK engine
def test_simpleitk_recovers_rigid_motion_across_contrasts(pair, sitk_result):
    moving, fixed, truth = pair
    assert sitk_result.engine == "simpleitk"
    assert sitk_result.dof == 6
    assert mean_error_mm(sitk_result.moving_to_fixed, truth, fixed) < 1.0  # voxels are 4 mm
    assert sitk_result.cost_after < sitk_result.cost_before - 0.1
    r = sitk_result.moving_to_fixed[:3, :3]
    np.testing.assert_allclose(r @ r.T, np.eye(3), atol=1e-6)  # 6 dof: a rotation
    assert 10 < sitk_result.displacement_mm < 60


def test_simpleitk_is_reproducible(pair, sitk_result):
    """Fixed seeds and thread count: the same answer again (up to rounding in threaded sums)."""
    moving, fixed, _ = pair
    again = register(moving, fixed, engine="simpleitk", settings=FAST)
    assert mean_error_mm(again.moving_to_fixed, sitk_result.moving_to_fixed, fixed) < 0.01
    assert again.details["initialisation"] == sitk_result.details["initialisation"]


def test_simpleitk_affine_12_dof(pair):
    moving, fixed, truth = pair
    res = register(moving, fixed, engine="simpleitk", dof=12, settings=replace(FAST, affine_levels=1))
    assert res.dof == 12
    assert mean_error_mm(res.moving_to_fixed, truth, fixed) < 1.5
    assert not np.allclose(res.moving_to_fixed[:3, :3] @ res.moving_to_fixed[:3, :3].T, np.eye(3), atol=1e-6)


# ----------------------------------------------------------------------------- transform files
def test_written_itk_and_flirt_files_agree_with_moving_to_fixed(pair, tmp_path):
    moving, fixed, truth = pair
    mat_path, itk_path = tmp_path / "out" / "m2f.mat", tmp_path / "out" / "m2f.itk.txt"
    write_transforms(truth, moving, fixed, mat_path, itk_path)
    np.testing.assert_allclose(read_itk_transform(itk_path), truth, atol=1e-9)
    src, ref = FslImage(str(moving)), FslImage(str(fixed))
    np.testing.assert_allclose(fromFlirt(readFlirt(str(mat_path)), src, ref, "world", "world"), truth, atol=1e-9)
    # SimpleITK itself maps a fixed LPS point to where moving_to_fixed says it came from
    tx = sitk.ReadTransform(str(itk_path))
    fixed_ras = np.array([[20.0, -30.0, 15.0]])
    moving_ras = reg.apply_affine(np.linalg.inv(truth), fixed_ras)[0]
    np.testing.assert_allclose(tx.TransformPoint(tuple(fixed_ras[0] * [-1, -1, 1])), moving_ras * [-1, -1, 1], atol=1e-9)
    assert sorted(p.name for p in mat_path.parent.iterdir()) == ["m2f.itk.txt", "m2f.mat"]  # no temp files


def test_reads_the_datasets_matrixoffset_itk_format(tmp_path):
    text = textwrap.dedent("""\
        #Insight Transform File V1.0
        #Transform 0
        Transform: MatrixOffsetTransformBase_double_3_3
        Parameters: 1 0 0 0 1 0 0 0 1 2 -3 4
        FixedParameters: 1.5 9.9 23.7
        """)
    (tmp_path / "t.itk.txt").write_text(text)
    # fixed LPS x -> moving LPS x + (2, -3, 4), so moving RAS q -> fixed RAS q - (-2, 3, 4)
    np.testing.assert_allclose(read_itk_transform(tmp_path / "t.itk.txt"), rigid_matrix((0, 0, 0), (2, -3, -4)), atol=1e-12)


# ----------------------------------------------------------------------------- FLIRT engine
STAND_IN = """\
#!/bin/sh
# Test stand-in for FSL's flirt: records its arguments, writes a known matrix to -omat.
printf '%s\\n' "$@" > "{log}"
while [ $# -gt 0 ]; do
  case "$1" in
    -omat) cp "{matrix}" "$2"; shift 2 ;;
    -out) cp "{image}" "$2"; shift 2 ;;
    *) shift ;;
  esac
done
"""


def flirt_matrix_of(moving_to_fixed: np.ndarray, moving: Path, fixed: Path) -> np.ndarray:
    """Independent conversion (fslpy directly) of a world transform to a FLIRT matrix."""
    return toFlirt(moving_to_fixed, FslImage(str(moving)), FslImage(str(fixed)), "world", "world")


def install_flirt_stand_in(root: Path, flirt_matrix: np.ndarray, image: Path) -> Path:
    (root / "bin").mkdir(parents=True)
    np.savetxt(root / "known.mat", flirt_matrix)
    exe = root / "bin" / "flirt"
    exe.write_text(STAND_IN.format(log=root / "args.txt", matrix=root / "known.mat", image=image))
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    return root / "args.txt"


def test_flirt_engine_runs_flirt_and_reads_its_matrix(pair, tmp_path, monkeypatch, caplog):
    moving, fixed, truth = pair
    known = flirt_matrix_of(truth, moving, fixed)
    args_log = install_flirt_stand_in(tmp_path / "fsl", known, fixed)
    monkeypatch.setenv("FSLDIR", str(tmp_path / "fsl"))
    with caplog.at_level(logging.INFO, logger="rsanet.registration"):
        res = register(moving, fixed, dof=12, cost="mutualinfo", search_deg=20)
    assert res.engine == "flirt"
    assert "registration engine: flirt" in caplog.text
    np.testing.assert_allclose(res.moving_to_fixed, truth, atol=1e-6)
    argv = args_log.read_text().split("\n")
    assert argv[:4] == ["-in", str(moving), "-ref", str(fixed)]
    cmd = " ".join(argv)
    for option in ("-dof 12", "-cost mutualinfo", "-searchcost mutualinfo", "-searchrx -20.0 20.0",
                   "-searchry -20.0 20.0", "-searchrz -20.0 20.0", "-omat "):
        assert option in cmd
    assert res.cost_after < res.cost_before


def test_flirt_result_worse_than_the_header_alignment_keeps_the_header(pair, tmp_path, monkeypatch, caplog):
    """Scans already aligned by their headers; a FLIRT answer 12 degrees off scores worse than
    the start: being already aligned is not a failure, the header alignment is kept and logged."""
    _, fixed, _ = pair
    fixed_img = nib.load(str(fixed))
    aligned = tmp_path / "aligned_t2.nii.gz"
    nib.save(sample_phantom(fixed_img.shape, fixed_img.affine, "t2"), aligned)
    wrong = rigid_matrix((0, 0, 12), (0, 0, 0), CENTER)
    known = flirt_matrix_of(wrong, aligned, fixed)
    install_flirt_stand_in(tmp_path / "fsl", known, fixed)
    monkeypatch.setenv("FSLDIR", str(tmp_path / "fsl"))
    with caplog.at_level(logging.INFO, logger="rsanet.registration"):
        res = register(aligned, fixed, engine="flirt")
    np.testing.assert_allclose(res.moving_to_fixed, np.eye(4))
    assert res.details["kept"] == "header" and res.details["cost_optimised"] > res.cost_before
    assert res.cost_after == res.cost_before
    assert "kept the header alignment" in caplog.text


def test_images_of_different_heads_are_rejected_as_implausible(pair, tmp_path):
    """A moving image that shares no structure with the fixed one: low MI or a collapsed overlap."""
    _, fixed, _ = pair
    img = nib.load(str(fixed))
    noise = np.random.default_rng(0).uniform(0, 1000, img.shape).astype(np.float32)
    nib.save(nib.Nifti1Image(noise, img.affine), tmp_path / "noise.nii.gz")
    with pytest.raises(RegistrationError, match="mutual information|moving head lands"):
        register(tmp_path / "noise.nii.gz", fixed, engine="simpleitk", settings=FAST, search_deg=0)


def test_auto_engine_choice(tmp_path, monkeypatch, caplog):
    monkeypatch.delenv("FSLDIR", raising=False)
    with caplog.at_level(logging.INFO, logger="rsanet.registration"):
        assert reg.choose_engine("auto") == "simpleitk"
    assert "flirt not found" in caplog.text
    with pytest.raises(RegistrationError, match="FSLDIR"):
        reg.choose_engine("flirt")
    install_flirt_stand_in(tmp_path / "fsl", np.eye(4), tmp_path)
    monkeypatch.setenv("FSLDIR", str(tmp_path / "fsl"))
    assert reg.choose_engine("auto") == "flirt"


# ----------------------------------------------------------------------------- bad input
def _save(tmp_path: Path, name: str, data: np.ndarray, affine=np.eye(4) * [4, 4, 4, 1]) -> Path:
    path = tmp_path / name
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


def test_bad_inputs_raise_a_clear_error(pair, tmp_path):
    _, fixed, _ = pair
    good = np.asarray(nib.load(str(fixed)).dataobj)
    four_d = _save(tmp_path, "four_d.nii.gz", np.stack([good, good], axis=-1))
    empty = _save(tmp_path, "empty.nii.gz", np.zeros((20, 20, 20), np.float32))
    nan = good.copy()
    nan[10, 10, 10] = np.nan
    nan_path = _save(tmp_path, "nan.nii.gz", nan)
    hdr = nib.Nifti1Image(good, np.eye(4)).header.copy()
    hdr["srow_x"], hdr["sform_code"], hdr["qform_code"] = [np.inf, 0, 0, 0], 1, 0
    nib.save(nib.Nifti1Image(good, None, header=hdr), tmp_path / "bad_affine.nii.gz")
    cases = {four_d: "3D image", empty: "all zero", nan_path: "NaN", tmp_path / "bad_affine.nii.gz": "affine"}
    for path, what in cases.items():
        with pytest.raises(RegistrationError, match=what) as exc:
            register(path, fixed, engine="simpleitk", settings=FAST)
        assert str(path) in str(exc.value)


def test_a_result_beyond_the_displacement_limit_is_rejected(pair, tmp_path, monkeypatch):
    """The true motion moves the brain by up to ~30 mm: fine by default, rejected with a 5 mm limit."""
    moving, fixed, truth = pair
    install_flirt_stand_in(tmp_path / "fsl", flirt_matrix_of(truth, moving, fixed), fixed)
    monkeypatch.setenv("FSLDIR", str(tmp_path / "fsl"))
    assert 10 < register(moving, fixed).displacement_mm < 40  # the default limit: registration.max_displacement_mm
    with pytest.raises(RegistrationError, match="moves the brain") as exc:
        register(moving, fixed, max_displacement_mm=5.0)
    assert str(moving) in str(exc.value)


# ----------------------------------------------------------------------------- CLI and QC
def test_cli_coregisters_a_subject_as_the_study_does(pair, tmp_path):
    """rsanet-register runs the study's coregister step (SimpleITK here): the contrasts on the
    reference grid, their transforms, the record and the QC figure."""
    moving, fixed, truth = pair
    out = tmp_path / "sub-01"
    code = register_cli(["--t1", str(moving), "--t2", str(moving), "--flair", str(fixed), "--out", str(out),
                         "--engine", "simpleitk", "--threads", "2"])
    assert code == 0
    record = json.loads((out / "registration.json").read_text())
    assert record["subject"] == "sub-01" and record["reference"] == "FLAIR" and set(record["results"]) == {"T1", "T2"}
    for contrast in ("T1", "T2"):
        res = record["results"][contrast]
        assert res["engine"] == "simpleitk" and res["dof"] == 6
        np.testing.assert_allclose(read_itk_transform(out / "transforms" / f"{contrast}_to_FLAIR.itk.txt"),
                                   res["moving_to_fixed"], atol=1e-6)
    fixed_img = nib.load(str(fixed))
    img = nib.load(str(out / "T2.nii.gz"))
    assert img.shape == fixed_img.shape
    np.testing.assert_allclose(img.affine, fixed_img.affine, atol=1e-6)
    # the resampled T2 matches the T2 phantom drawn directly on the fixed grid
    expected = np.asarray(sample_phantom(fixed_img.shape, fixed_img.affine, "t2").dataobj)
    inside = np.asarray(fixed_img.dataobj) > 100
    assert np.abs(np.asarray(img.dataobj) - expected)[inside].mean() < 0.05 * expected[inside].mean()
    assert sorted(p.name for p in out.iterdir()) == ["FLAIR.nii.gz", "T1.nii.gz", "T2.nii.gz", "qc.png",
                                                     "registration.json", "transforms"]


def test_cli_defaults_are_the_studys(monkeypatch, tmp_path):
    """No default of its own: rsanet-register's options default to the schema's registration section."""
    import yaml

    from rsanet.checks import with_defaults
    from rsanet.stages import coregister

    seen = {}

    def step(subject, images, lesions, outputs, settings, threads):  # records what the step would be given
        seen.update(settings=settings)
        Path(outputs["record"]).parent.mkdir(parents=True)
        Path(outputs["record"]).write_text('{"results": {}}')

    monkeypatch.setattr(coregister, "coregister_step", step)
    assert register_cli(["--t1", "a", "--t2", "b", "--flair", "c", "--out", str(tmp_path / "o")]) == 0
    schema = yaml.safe_load((Path(__file__).parents[1] / "workflow" / "schemas" / "config.schema.yaml").read_text())
    section = with_defaults({"subjects": "demo", "registration": {}}, schema)["registration"]
    assert {k: v for k, v in vars(seen["settings"]).items()} == {k: section[k] for k in vars(seen["settings"])}


def test_cli_bad_input_exits_2_and_writes_nothing(pair, tmp_path, capsys):
    _, fixed, _ = pair
    empty = _save(tmp_path, "empty.nii.gz", np.zeros((20, 20, 20), np.float32))
    out = tmp_path / "out"
    code = register_cli(["--t1", str(empty), "--t2", str(empty), "--flair", str(fixed), "--out", str(out),
                         "--engine", "simpleitk"])
    assert code == 2
    assert str(empty) in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())


def test_qc_figure_shows_edges_of_each_contrast(pair, sitk_result, tmp_path):
    moving, fixed, _ = pair
    fixed_img = nib.load(str(fixed))
    t2 = resample_to_fixed(nib.load(str(moving)), fixed_img, sitk_result.moving_to_fixed)
    png = registration_qc_figure(fixed_img, {"T2": t2, "T1": fixed_img}, tmp_path / "qc" / "sub-01.png", title="sub-01")
    rgb = mpimg.imread(str(png))[..., :3]
    assert rgb.shape[0] > 300 and rgb.shape[1] > 900
    red = (rgb[..., 0] > 0.8) & (rgb[..., 1] < 0.4) & (rgb[..., 2] < 0.4)   # first contour colour
    green = (rgb[..., 1] > 0.6) & (rgb[..., 0] < 0.4) & (rgb[..., 2] < 0.5)  # second
    assert red.sum() > 200 and green.sum() > 200
    assert os.listdir(png.parent) == ["sub-01.png"]


# ----------------------------------------------------------------------------- real scans
def _moved_header(src: Path, dst: Path, motion: np.ndarray) -> None:
    """The same voxels with ``motion`` applied to the header: the image moves by ``motion`` in world."""
    img = nib.load(str(src))
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj, np.float32), motion @ img.affine), dst)


@pytest.mark.parametrize("patient", ["patient07", "patient19", "patient26"])
def test_real_already_aligned_patients_register_near_identity_and_recover_a_motion(patient, tmp_path):
    """The MNI-space patients are co-registered: T1/T2 -> FLAIR must stay within 1 mm of
    identity, without error; with a 10 degree / 10 mm motion in the header it must be undone to 1 mm."""
    from real_data import open_ms_data

    folder = open_ms_data() / "patients_mni" / patient
    flair = folder / "FLAIR.nii.gz"
    img = nib.load(str(flair))
    brain = reg.voxel_points_mm(reg.foreground_mask(np.asarray(img.dataobj)), img.affine, step=3)
    centre = brain.mean(axis=0)
    motion = rigid_matrix((10.0, 0.0, 0.0), (10.0, 0.0, 0.0), centre)  # moving world -> moved world
    for contrast in ("T1", "T2"):
        res = register(folder / f"{contrast}.nii.gz", flair, engine="simpleitk", search_deg=0, threads=2)
        err = reg.displacement_mm(res.moving_to_fixed, np.eye(4), brain).mean()
        assert err <= 1.0, f"{patient} {contrast}: {err:.2f} mm from identity ({res.details['kept']})"
        moved = tmp_path / f"{contrast}_moved.nii.gz"
        _moved_header(folder / f"{contrast}.nii.gz", moved, motion)
        res = register(moved, flair, engine="simpleitk", search_deg=0, threads=2)
        truth = np.linalg.inv(motion)  # moved world -> original (= FLAIR) world
        err = reg.displacement_mm(np.linalg.inv(res.moving_to_fixed), np.linalg.inv(truth), brain).mean()
        assert err <= 1.0, f"{patient} {contrast} with motion: {err:.2f} mm"


def test_finest_level_drops_the_finer_pyramid_levels():
    base = SimpleITKSettings()
    assert base.finest_level(1.5) == base
    coarse = base.finest_level(3.0)
    assert coarse.level_spacings_mm == (6.0, 3.0) and coarse.samples_per_level == base.samples_per_level[:2]
    assert base.finest_level(10.0).level_spacings_mm == (6.0,)  # the coarsest level always stays


# ------------------------------------------------- one co-registration: the study and rsanet-segment
def test_the_study_and_segment_prepare_a_real_patient_identically(tmp_path):
    """The study's coregister + preprocess steps and rsanet-segment's preparation of a new patient
    run the same code with the same settings (the export's record of registration: and
    preprocess:): equal transforms and an equal preprocessed array, here with the demo's 3 mm
    pyramid (a setting segment used to ignore) and T1/T2 moved in their headers."""
    from dataclasses import asdict

    from real_data import open_ms_data
    from rsanet.segment import prepare_patient
    from rsanet.stages.coregister import coregister_step
    from rsanet.stages.preprocess import preprocess_step
    from rsanet.volumes import Preprocessed

    folder = open_ms_data() / "patients_mni" / "patient07"
    flair = folder / "FLAIR.nii.gz"
    brain = reg.voxel_points_mm(reg.foreground_mask(np.asarray(nib.load(str(flair)).dataobj)), nib.load(str(flair)).affine, step=3)
    centre = brain.mean(axis=0)
    images = {"FLAIR": str(flair)}
    for contrast, (angles, shift) in {"T1": ((6.0, 0.0, 0.0), (5.0, 0.0, 0.0)), "T2": ((0.0, 5.0, 0.0), (0.0, -4.0, 3.0))}.items():
        images[contrast] = str(tmp_path / f"{contrast}_moved.nii.gz")
        _moved_header(folder / f"{contrast}.nii.gz", Path(images[contrast]), rigid_matrix(angles, shift, centre))
    settings = reg.CoregistrationSettings(engine="simpleitk", search_deg=0, finest_level_mm=3.0)

    study = tmp_path / "study"
    outputs = {c.lower(): str(study / f"{c}.nii.gz") for c in ("T1", "T2", "FLAIR")}
    outputs.update(lesions=str(study / "lesions.nii.gz"), transforms=str(study / "transforms"),
                   record=str(study / "registration.json"))
    coregister_step("patient07", images, str(folder / "lesions.nii.gz"), outputs, settings, threads=1)
    preprocess_step("patient07", {c: outputs[c.lower()] for c in ("T1", "T2", "FLAIR")}, outputs["lesions"],
                    str(study / "pre.npz"), margin=2)
    record = json.loads((study / "registration.json").read_text())["results"]

    meta = {"registration": asdict(settings), "preprocess": {"margin": 2}}
    seconds: dict[str, float] = {}
    new, pre = prepare_patient(meta, images["T1"], images["T2"], images["FLAIR"], threads=1, seconds=seconds)
    assert set(seconds) == {"registration", "preprocessing"}
    for contrast in ("T1", "T2"):
        assert np.array_equal(np.asarray(record[contrast]["moving_to_fixed"]), new.results[contrast].moving_to_fixed), contrast
        # and the registration did its work: the header motion is undone to within a millimetre
        assert reg.displacement_mm(new.results[contrast].moving_to_fixed,
                                   np.linalg.inv(nib.load(images[contrast]).affine @ np.linalg.inv(
                                       nib.load(str(folder / f"{contrast}.nii.gz")).affine)), brain).mean() <= 1.0
    assert new.results["T1"].cost_after == record["T1"]["cost_after"]  # the same optimisation, metric for metric
    assert [st["metric"] for st in new.results["T1"].details["stages"]] == [st["metric"] for st in record["T1"]["details"]["stages"]]
    saved = Preprocessed.load(study / "pre.npz")
    assert saved.image.shape == pre.image.shape and np.array_equal(saved.image, pre.image)
    assert np.array_equal(saved.bbox, pre.bbox)


def test_segment_prepares_on_the_study_reference_grid(tmp_path):
    """registration.reference is honoured for new patients too: with the T1 as reference (headers
    trusted), every prepared contrast lies on the T1's grid."""
    from real_data import open_ms_data
    from rsanet.segment import prepare_patient

    folder = open_ms_data() / "patients_mni" / "patient19"
    t1 = nib.load(str(folder / "T1.nii.gz"))
    coarse = tmp_path / "T1_coarse.nii.gz"  # a T1 on a grid of its own (2 mm), so the grids differ
    nib.save(nib.Nifti1Image(np.asarray(t1.dataobj, np.float32)[::2, ::2, ::2], t1.affine @ np.diag([2, 2, 2, 1])), coarse)
    meta = {"registration": {"reference": "T1", "engine": "none", "dof": 6}, "preprocess": {"margin": 2}}
    new, pre = prepare_patient(meta, str(coarse), str(folder / "T2.nii.gz"), str(folder / "FLAIR.nii.gz"))
    assert new.reference == "T1" and set(new.results) == {"T2", "FLAIR"}
    for contrast, img in new.images.items():
        assert img.shape == nib.load(str(coarse)).shape and np.allclose(img.affine, nib.load(str(coarse)).affine), contrast
        assert img.get_data_dtype() == np.float32
    assert pre.image.shape[0] == 3


@pytest.mark.slow
def test_the_same_scan_stored_in_any_voxel_order_is_coregistered_and_preprocessed_identically(tmp_path):
    """A real patient stored RAS, LPS, LAS and with its first two axes swapped (T1 moved in its
    header, so the registration has work to do): the co-registration runs on the closest-canonical
    copies with their origins rounded to 0.01 mm (:func:`rsanet.registration.canonical_copy`), so
    every storage order gives the same transforms and the same preprocessed array, bit for bit;
    the outputs lie on each reference file's own grid."""
    from real_data import open_ms_data
    from rsanet.volumes import preprocess_subject
    from test_workflow import _reorient

    folder = open_ms_data() / "patients_mni" / "patient19"
    flair = nib.load(str(folder / "FLAIR.nii.gz"))
    brain = reg.voxel_points_mm(reg.foreground_mask(np.asarray(flair.dataobj)), flair.affine, step=3)
    moved = tmp_path / "T1_moved.nii.gz"
    _moved_header(folder / "T1.nii.gz", moved, rigid_matrix((5.0, 0.0, 4.0), (4.0, -3.0, 0.0), brain.mean(axis=0)))
    sources = {"T1": moved, "T2": folder / "T2.nii.gz", "FLAIR": folder / "FLAIR.nii.gz"}
    settings = reg.CoregistrationSettings(engine="simpleitk", search_deg=0, finest_level_mm=3.0)
    arrays, transforms = {}, {}
    for name, codes in {"RAS": ("R", "A", "S"), "LPS": ("L", "P", "S"), "LAS": ("L", "A", "S"),
                        "axes swapped": ("A", "R", "S")}.items():
        d = tmp_path / name.replace(" ", "_")
        d.mkdir()
        copies = {}
        for c, src in sources.items():
            copies[c] = d / f"{c}.nii.gz"
            nib.save(_reorient(nib.load(str(src)), codes), copies[c])
        out = reg.coregister_contrasts(copies, settings, f"patient19 {name}", threads=1)
        ref = nib.load(str(copies["FLAIR"]))
        for c, img in out.images.items():
            assert img.shape == ref.shape and np.allclose(img.affine, ref.affine), (name, c)
        empty = nib.Nifti1Image(np.zeros(ref.shape, np.uint8), ref.affine)
        arrays[name] = preprocess_subject(out.images["T1"], out.images["T2"], out.images["FLAIR"], empty).image
        transforms[name] = {c: r.moving_to_fixed for c, r in out.results.items()}
    for name in arrays:
        # Bit for bit: before the origin was rounded, the LPS copy (whose file stores its affine in
        # float32) differed by up to 0.0002 mm in the T1 transform and in 0.8 % of the values.
        assert np.array_equal(arrays[name], arrays["RAS"]), name
        for c in ("T1", "T2"):
            assert np.array_equal(transforms[name][c], transforms["RAS"][c]), (name, c)


def test_canonical_copies_of_the_same_scan_in_any_stored_order_have_the_same_geometry(tmp_path):
    """A scan with an oblique, off-grid header saved as RAS and as LPS files (affines stored in
    float32, so the LPS file's origin is rounded differently): their canonical copies hold the same
    voxels and the same affine, and the rounding moves the origin by at most 0.005 mm."""
    from test_workflow import _reorient

    rng = np.random.default_rng(3)
    data = rng.random((23, 31, 17), dtype=np.float32)
    rot = rigid_matrix((7.0, -3.0, 11.0), (0.0, 0.0, 0.0), np.zeros(3))
    affine = rot @ np.diag([0.7, 0.9, 3.1, 1.0])
    affine[:3, 3] = (-81.123456, -97.654321, -55.5555)
    copies = {}
    for codes in (("R", "A", "S"), ("L", "P", "S"), ("A", "R", "S")):
        path = tmp_path / ("".join(codes) + ".nii.gz")
        nib.save(_reorient(nib.Nifti1Image(data, affine), codes), path)
        copies[codes] = reg.canonical_copy(nib.load(str(path)))
    ras = copies[("R", "A", "S")]
    exact = nib.as_closest_canonical(nib.load(str(tmp_path / "RAS.nii.gz")))
    assert np.abs(ras.affine[:3, 3] - exact.affine[:3, 3]).max() <= 0.005 + 1e-9
    for codes, img in copies.items():
        assert np.array_equal(img.affine, ras.affine), codes
        assert np.array_equal(np.asarray(img.dataobj), np.asarray(ras.dataobj)), codes
