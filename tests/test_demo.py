"""Tests of the embedded demo cohort (rsanet.demo), on a coarse grid so they run in seconds."""

from __future__ import annotations

import dataclasses
import json
from importlib import resources
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from scipy import ndimage as ndi

from rsanet import demo
from rsanet.demo import CONTRASTS, DemoConfig, make_cohort, make_subject

# 2.1 x 2.1 x 3 mm (FLAIR): same code paths as the paper-like grid, ~10x fewer voxels
COARSE = DemoConfig(n_subjects=2, grid_scale=3.0)
# Same subjects without head motion and with every contrast on the FLAIR grid: the "truth"
STILL = dataclasses.replace(COARSE, max_rotation_deg=0.0, max_translation_mm=0.0,
                            t1_spacing_mm=COARSE.flair_spacing_mm,
                            t2_spacing_mm=COARSE.flair_spacing_mm)


def _array(img: nib.Nifti1Image) -> np.ndarray:
    return np.asarray(img.dataobj)


pytestmark = pytest.mark.xdist_group("demo")  # the module's fixtures are built once, in one worker


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pd.DataFrame]:
    out = tmp_path_factory.mktemp("demo")
    return out, make_cohort(out, COARSE)


@pytest.fixture(scope="module")
def still0() -> dict:
    return make_subject(0, STILL)


def _load(folder: Path, sid: str) -> dict:
    subject = {c: nib.load(folder / sid / f"{c}.nii.gz") for c in (*CONTRASTS, "lesions")}
    subject["truth"] = json.loads((folder / sid / "truth.json").read_text())
    return subject


def test_config_grids() -> None:
    cfg = DemoConfig()
    assert cfg.spacing("FLAIR") == pytest.approx((0.7, 0.7, 3.0))
    assert DemoConfig(grid_scale=2.0).spacing("FLAIR") == pytest.approx((1.4, 1.4, 3.0))
    assert len({cfg.spacing(c) for c in CONTRASTS}) == 3  # each contrast on its own grid
    assert cfg.shape("FLAIR") == (257, 320, 54)  # paper: 230-260 x 320 x 44-60
    with pytest.raises(ValueError):
        DemoConfig(grid_scale=0)
    with pytest.raises(ValueError):
        cfg.spacing("PD")


def test_cohort_layout_and_sheet(cohort: tuple[Path, pd.DataFrame]) -> None:
    out, sheet = cohort
    assert list(sheet.columns) == ["subject", "t1", "t2", "flair", "lesions"]
    on_disk = pd.read_csv(out / "subjects.tsv", sep="\t")
    pd.testing.assert_frame_equal(on_disk, sheet)
    assert list(sheet.subject) == ["demo-001", "demo-002"]
    for _, row in sheet.iterrows():
        for col in ("t1", "t2", "flair", "lesions"):
            assert not Path(row[col]).is_absolute()  # relative to the sheet's folder
            assert (out / row[col]).is_file()
        assert (out / row.subject / "truth.json").is_file()
    assert "doi:10.1007/s12021-017-9348-7" in (out / "ATTRIBUTION.md").read_text()
    absolute = demo.subject_sheet(COARSE, out, absolute_paths=True)
    assert all(Path(p).is_file() for p in absolute.flair)


def test_grids_as_configured(cohort: tuple[Path, pd.DataFrame]) -> None:
    out, _ = cohort
    subject = _load(out, "demo-001")
    for c in CONTRASTS:
        img = subject[c]
        assert img.shape == COARSE.shape(c)
        assert img.header.get_zooms() == pytest.approx(COARSE.spacing(c), abs=1e-5)
        assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
        assert img.get_data_dtype() == np.int16
        data = _array(img)
        assert data.min() == 0 and data.max() > 500  # skull-stripped, zero background
    lesions = subject["lesions"]
    assert lesions.get_data_dtype() == np.uint8
    assert lesions.shape == subject["FLAIR"].shape
    np.testing.assert_allclose(lesions.affine, subject["FLAIR"].affine)
    mask = _array(lesions)
    assert set(np.unique(mask)) == {0, 1}
    assert mask.sum() == subject["truth"]["lesion_voxels"] > 0
    assert np.all(_array(subject["FLAIR"])[mask > 0] > 0)  # lesions inside the brain


def test_same_seed_is_bit_identical(cohort: tuple[Path, pd.DataFrame], tmp_path: Path) -> None:
    out, _ = cohort
    # a different cohort size and a separate call must not change a subject
    again = make_subject(1, dataclasses.replace(COARSE, n_subjects=7))
    demo.write_subject(again, tmp_path / "demo-002")
    for name in ("T1.nii.gz", "T2.nii.gz", "FLAIR.nii.gz", "lesions.nii.gz", "truth.json"):
        assert (tmp_path / "demo-002" / name).read_bytes() == (out / "demo-002" / name).read_bytes()


def test_different_seed_differs(cohort: tuple[Path, pd.DataFrame]) -> None:
    out, _ = cohort
    first = _load(out, "demo-001")
    other = make_subject(0, dataclasses.replace(COARSE, seed=1))
    for c in CONTRASTS:
        assert not np.array_equal(_array(other[c]), _array(first[c]))
    assert other["truth"]["moving_to_fixed"] != first["truth"]["moving_to_fixed"]


def test_subjects_differ(cohort: tuple[Path, pd.DataFrame]) -> None:
    out, _ = cohort
    a, b = _load(out, "demo-001"), _load(out, "demo-002")
    assert a["truth"]["lesion_sources"] != b["truth"]["lesion_sources"]
    assert not np.array_equal(_array(a["FLAIR"]), _array(b["FLAIR"]))
    assert a["truth"]["anatomy"]["size_scale"] != b["truth"]["anatomy"]["size_scale"]


def test_mirrored_mask_is_reflected() -> None:
    """The mirrored mask is the original reflected about the MNI mid-sagittal plane x = 0."""
    plain = demo._lesion_on_template(1, False)
    mirrored = demo._lesion_on_template(1, True)
    anatomy = demo.load_anatomy()
    assert plain.sum() > 0 and not np.array_equal(plain, mirrored)
    xyz = nib.affines.apply_affine(anatomy.affine, np.argwhere(plain > 0))
    xyz[:, 0] *= -1
    ijk = np.rint(nib.affines.apply_affine(np.linalg.inv(anatomy.affine), xyz)).astype(int)
    inside = np.all((ijk >= 0) & (ijk < plain.shape), axis=1)
    assert mirrored[tuple(ijk[inside].T)].mean() > 0.95


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


@pytest.mark.slow
def test_no_collage_is_closer_to_another_subject_than_two_real_patients() -> None:
    """docs/demo_cohort.md: no subject built from a collage is more alike (Dice of the template-space
    masks; plain, or mirrored where the other is a real mask) to any other demo subject, collage
    or real, than the two most alike different real patients are to each other. Every pair is
    checked, so it holds in any split: a collage in the test part is never a near copy of a
    training subject."""
    import yaml

    cfg = yaml.safe_load((Path(__file__).parents[1] / "config" / "presets" / "demo.yaml").read_text())
    n, seed = cfg["demo"]["n_subjects"], cfg["demo"]["seed"]
    masks = [demo.lesion_template(i, seed) > 0 for i in range(n)]
    plain = {p: demo._lesion_on_template(p, False) > 0 for p in range(1, demo.N_LESION_MASKS + 1)}
    mirrored = {p: demo._lesion_on_template(p, True) > 0 for p in range(1, demo.N_LESION_MASKS + 1)}
    natural = max(max(_dice(plain[p], plain[q]), _dice(plain[p], mirrored[q]))
                  for p in plain for q in plain if p != q)
    assert 0.1 < natural < 0.5  # different patients' lesions overlap, periventricular above all
    assert all(m.any() for m in masks)
    k = len(demo.DEMO_PATIENTS)

    def alike(i: int, j: int) -> float:
        both = [_dice(masks[i], masks[j])]
        for a, b in ((i, j), (j, i)):
            if b < k:  # a real mask may also sit mirrored in the other subject
                both.append(_dice(masks[a], mirrored[demo.DEMO_PATIENTS[b]]))
        return max(both)

    pairs = [(i, j) for i in range(n) for j in range(i + 1, n) if i >= k or j >= k]
    assert len(pairs) == 16 * 27 + 16 * 15 // 2  # 16 collages against the 27 real masks and each other
    worst = max(alike(i, j) for i, j in pairs)
    assert worst < natural, (worst, natural)


@pytest.mark.slow
def test_no_demo_subject_carries_an_external_test_lesion() -> None:
    """docs/external_test.md: the lesion masks of the external test patients (open_ms_data 07, 19, 26) enter the
    demo cohort neither whole nor as collage pieces: no subject's sources name them, and no
    subject's mask is more alike to theirs (plain or mirrored) than real patients are to each other."""
    assert set(demo.EXTERNAL_TEST_PATIENTS) == {7, 19, 26}
    assert not set(demo.DEMO_PATIENTS) & set(demo.EXTERNAL_TEST_PATIENTS)
    n, seed = 43, 0
    for i in range(n):
        assert not {src["patient"] for src in demo.lesion_sources(i, seed)} & set(demo.EXTERNAL_TEST_PATIENTS)
    external = [demo._lesion_on_template(p, f) > 0 for p in demo.EXTERNAL_TEST_PATIENTS for f in (False, True)]
    closest = max(_dice(demo.lesion_template(i, seed) > 0, e) for i in range(n) for e in external)
    assert closest < 0.288, closest  # the closest pair of distinct real masks (test above): 0.288
    # and the collages hold none of their lesions: far below any real overlap
    collages = [demo.lesion_template(i, seed) > 0 for i in range(len(demo.DEMO_PATIENTS), n)]
    assert max(_dice(c, e) for c in collages for e in external) < 0.15


def test_lesion_sources_are_seeded_and_distinct() -> None:
    assert demo.lesion_sources(0, 0) == [{"patient": 1, "flip_lr": False, "components": None}]
    collage = demo.lesion_sources(30, 0)
    assert collage == demo.lesion_sources(30, 0) and collage != demo.lesion_sources(30, 1)
    assert len(collage) > 5 and all(src["components"] for src in collage)
    assert collage != demo.lesion_sources(31, 0)


def test_lesion_contrast(still0: dict) -> None:
    """Lesions are brighter than white matter on FLAIR and T2 and darker on T1."""
    t1, t2, flair = (_array(still0[c]).astype(float) for c in CONTRASTS)
    lesion = _array(still0["lesions"]) > 0
    brain = (flair > 0) & ~ndi.binary_dilation(lesion, iterations=2)
    wm = brain & (t1 > np.percentile(t1[brain], 65))  # T1-bright tissue: white matter
    assert t1[lesion].mean() < 0.8 * t1[wm].mean()
    assert t2[lesion].mean() > 1.3 * t2[wm].mean()
    assert flair[lesion].mean() > 1.3 * flair[wm].mean()
    csf = brain & (t2 > np.percentile(t2[brain], 95))  # T2-bright tissue: CSF
    assert flair[csf].mean() < 0.7 * flair[wm].mean()  # CSF is suppressed on FLAIR


def test_true_transform_aligns(cohort: tuple[Path, pd.DataFrame], still0: dict) -> None:
    """Resampling a moved scan with its recorded moving_to_fixed recovers the unmoved scan."""
    out, _ = cohort
    moved = _load(out, "demo-001")
    for c in ("T1", "T2"):
        m2f = np.asarray(moved["truth"]["moving_to_fixed"][c])
        assert m2f.shape == (4, 4)
        np.testing.assert_allclose(m2f[:3, :3] @ m2f[:3, :3].T, np.eye(3), atol=1e-9)
        reference = _array(still0[c]).astype(float)
        fixed_affine = still0[c].affine  # world of the unmoved scan = FLAIR world

        def correlation(transform: np.ndarray) -> float:
            vox = np.linalg.inv(moved[c].affine) @ np.linalg.inv(transform) @ fixed_affine
            warped = ndi.affine_transform(_array(moved[c]).astype(float), vox[:3, :3],
                                          offset=vox[:3, 3], output_shape=reference.shape,
                                          order=1)
            keep = (reference > 0) | (warped > 0)
            return float(np.corrcoef(warped[keep], reference[keep])[0, 1])

        np.testing.assert_allclose(moved["truth"]["to_flair"][c], m2f)
        with_truth, without = correlation(m2f), correlation(np.eye(4))
        assert with_truth > 0.85
        assert with_truth > without + 0.1
    np.testing.assert_array_equal(moved["truth"]["to_flair"]["FLAIR"], np.eye(4))


def test_licence_and_citation_ship_with_masks() -> None:
    folder = resources.files("rsanet").joinpath("data", "lesion_masks_mni")
    assert "Creative-Commons" in folder.joinpath("LICENSE.txt").read_text()
    readme = folder.joinpath("README.md").read_text(encoding="utf-8")
    assert "doi:10.1007/s12021-017-9348-7" in readme and "Lesjak" in readme
    files = demo.lesion_mask_files()
    assert len(files) == demo.N_LESION_MASKS == 30
    img = nib.load(files[-1])
    assert img.shape == (182, 218, 182)
    assert set(np.unique(np.asarray(img.dataobj))) == {0, 1}


def test_template_maps_match_nilearn_api() -> None:
    """The fast read of nilearn's bundled files equals nilearn's public loaders."""
    fast = demo.mni152_maps()
    public = demo.mni152_maps(use_nilearn_api=True)
    for a, b in zip(fast, public):
        np.testing.assert_array_equal(a, b)
