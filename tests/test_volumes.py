"""Layout, checks, crop/normalisation and atomic writes of rsanet.volumes."""

from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest

from rsanet.volumes import (
    InputError,
    Preprocessed,
    bounding_box,
    binarise_mask,
    load_checked,
    normalise_in_mask,
    preprocess_subject,
    ras_to_model,
)


def _img(data, affine=None):
    return nib.Nifti1Image(np.asarray(data, dtype=np.float32), np.diag([1.0, 1.0, 1.0, 1.0]) if affine is None else affine)


def test_model_layout_is_axial_coronal_sagittal_from_any_orientation():
    """A voxel that is superior, anterior and right ends up at high (d, h, w) indices."""
    data = np.zeros((4, 5, 6), np.float32)
    data[0, 0, 5] = 1.0  # in an LPS-ordered image: i=0 is most left... see affine below
    # Affine of an image stored L->R reversed (x decreases with i), P->A reversed, I->S.
    affine = np.array([[-2.0, 0, 0, 10], [0, -1.0, 0, 20], [0, 0, 3.0, -5], [0, 0, 0, 1]])
    arr, canon, spacing = ras_to_model(_img(data, affine))
    assert arr.shape == (6, 5, 4)  # (D=z, H=y, W=x)
    assert spacing == (3.0, 1.0, 2.0)
    d, h, w = np.argwhere(arr == 1.0)[0]
    # i=0 is the most *right* voxel (x decreases with i) -> w is the last index;
    # j=0 is the most anterior -> h last; k=5 is the most superior -> d last.
    assert (d, h, w) == (5, 4, 3)
    world = canon @ np.array([w, h, d, 1.0])
    assert np.allclose(world, affine @ np.array([0, 0, 5, 1.0]))


def test_bounding_box_and_margin_clip_at_edges():
    m = np.zeros((10, 10, 10), bool)
    m[2:4, 5, 8:10] = True
    assert bounding_box(m, 0) == (slice(2, 4), slice(5, 6), slice(8, 10))
    assert bounding_box(m, margin=3) == (slice(0, 7), slice(2, 9), slice(5, 10))


def test_normalise_in_mask_zscores_inside_and_zeroes_outside():
    rng = np.random.default_rng(0)
    img = rng.normal(100, 15, (8, 8, 8))
    mask = np.zeros_like(img, np.uint8)
    mask[2:6, 2:6, 2:6] = 1
    out = normalise_in_mask(img, mask)
    assert out.dtype == np.float32
    assert abs(out[mask > 0].mean()) < 1e-5 and abs(out[mask > 0].std() - 1) < 1e-4
    assert not out[mask == 0].any()


def _save_singular(path):
    """A NIfTI whose sform has a zero row (nibabel refuses to write one, so patch the bytes)."""
    nib.save(_img(np.ones((3, 3, 3))), path)
    raw = bytearray(path.read_bytes())
    raw[252:254] = np.int16(0).tobytes()  # qform_code = 0: the sform alone defines the affine
    raw[296:312] = np.zeros(4, np.float32).tobytes()  # srow_y = 0
    path.write_bytes(bytes(raw))


def _save_unoriented(path):
    """A NIfTI whose qform and sform codes are both 0 (no world orientation)."""
    img = _img(np.arange(27.0).reshape(3, 3, 3))
    img.set_qform(None, code=0)
    img.set_sform(None, code=0)
    nib.save(img, path)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda p: None, "file not found"),
        (lambda p: p.write_bytes(b"not a nifti at all"), "cannot be read as NIfTI"),
        (lambda p: nib.save(_img(np.ones((3, 3, 3, 2))), p), "expected a 3D image"),
        (lambda p: nib.save(_img(np.full((3, 3, 3), np.nan)), p), "NaN or infinite"),
        (lambda p: nib.save(_img(np.zeros((3, 3, 3))), p), "all zero"),
        (lambda p: _save_singular(p), "singular"),
        (lambda p: _save_unoriented(p), "no world orientation"),
    ],
)
def test_load_checked_names_subject_file_and_problem(tmp_path, make, match):
    path = tmp_path / "T1.nii"
    make(path)
    with pytest.raises(InputError, match=match) as err:
        load_checked(path, "sub-07", "T1")
    assert "sub-07" in str(err.value) and str(path) in str(err.value)


def test_truncated_gzip_is_reported(tmp_path):
    good = tmp_path / "good.nii.gz"
    nib.save(_img(np.ones((20, 20, 20))), good)
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(good.read_bytes()[:200])
    with pytest.raises(InputError, match="cannot be read"):
        load_checked(bad, "s1", "FLAIR")
    assert gzip.open(good).read(4)  # the good file is fine


def test_non_binary_mask_lists_values():
    with pytest.raises(InputError, match="binary"):
        binarise_mask(np.array([0, 1, 2]), "s", "m.nii.gz")
    with pytest.raises(InputError, match="0.5"):
        binarise_mask(np.array([0.0, 0.5, 1.0]), "s", "m.nii.gz")  # a probability map, not a mask
    assert binarise_mask(np.array([0.0, 1.0]), "s", "m").dtype == np.uint8


def test_real_world_mask_encodings_are_accepted_and_logged(caplog):
    with caplog.at_level("INFO", logger="rsanet.volumes"):
        assert binarise_mask(np.array([0, 255, 255], np.uint8), "s", "m255.nii.gz").tolist() == [0, 1, 1]
        residue = np.array([0.0, 0.999, 1.0001, 0.002], np.float32)
        assert binarise_mask(residue, "s", "mres.nii.gz").tolist() == [0, 1, 1, 0]
    assert "m255.nii.gz" in caplog.text and "0/255" in caplog.text
    assert "mres.nii.gz" in caplog.text and "interpolation residue" in caplog.text


def test_non_finite_scaling_reads_unscaled_and_disagreeing_qform_sform_is_a_clear_error(tmp_path):
    data = np.ones((4, 4, 4), np.float32)
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "inf.nii")
    raw = bytearray((tmp_path / "inf.nii").read_bytes())
    raw[112:116] = np.float32(np.inf).tobytes()  # scl_slope sits at byte 112 of a NIfTI-1 header
    (tmp_path / "inf.nii").write_bytes(bytes(raw))
    # an infinite (or NaN) slope is "no scaling": the stored voxels, not infinities
    assert np.array_equal(np.asarray(load_checked(tmp_path / "inf.nii", "s1", "T1").dataobj), data)
    twisted = nib.Nifti1Image(data, np.eye(4))
    twisted.set_qform(np.diag([1.0, 1.0, 1.0, 1.0]), code=1)
    shifted = np.eye(4)
    shifted[:3, 3] = [5.0, 0, 0]
    twisted.set_sform(shifted, code=1)
    nib.save(twisted, tmp_path / "twisted.nii.gz")
    with pytest.raises(InputError, match="qform and sform disagree by up to 5.0 mm") as err:
        load_checked(tmp_path / "twisted.nii.gz", "s1", "FLAIR")
    assert "'s1'" in str(err.value) and "twisted.nii.gz" in str(err.value)
    nan_slope = nib.Nifti1Image(data, np.eye(4))  # nibabel writes NaN = "no scaling": accepted
    nib.save(nan_slope, tmp_path / "nan.nii.gz")
    assert np.isnan(float(nib.load(tmp_path / "nan.nii.gz").header["scl_slope"]))
    assert np.array_equal(np.asarray(load_checked(tmp_path / "nan.nii.gz", "s1", "T1").dataobj), data)


def _three_contrasts(seed: int, affine: np.ndarray, shape=(12, 14, 10)) -> list[nib.Nifti1Image]:
    """T1, T2, FLAIR stand-ins: random intensities inside a box-shaped brain, zero outside."""
    rng = np.random.default_rng(seed)
    brain = np.zeros(shape, bool)
    brain[2:10, 3:12, 2:8] = True
    return [_img(np.where(brain, rng.uniform(50, 100, shape), 0), affine) for _ in range(3)]


def test_preprocess_roundtrip_and_uncrop(tmp_path):
    shape = (12, 14, 10)
    affine = np.diag([0.7, 0.7, 3.0, 1.0])
    imgs = _three_contrasts(1, affine, shape)
    les = np.zeros(shape, np.uint8)
    les[5, 6, 4] = 1
    pre = preprocess_subject(*imgs, nib.Nifti1Image(les, affine), margin=1)
    assert pre.image.shape == (3,) + pre.lesions.shape
    assert np.allclose(pre.spacing, (3.0, 0.7, 0.7))
    pre.save(tmp_path / "s.npz")
    back = Preprocessed.load(tmp_path / "s.npz")
    assert np.array_equal(back.image, pre.image) and back.spacing == pre.spacing
    full = back.uncrop(back.lesions)
    assert np.array_equal(np.asarray(full.dataobj), les)
    assert np.allclose(full.affine, affine)


def _reoriented(img: nib.Nifti1Image, codes: tuple[str, str, str]) -> nib.Nifti1Image:
    """The same image stored in another voxel order (exact: axes permuted/flipped)."""
    from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, io_orientation, ornt_transform

    t = ornt_transform(io_orientation(img.affine), axcodes2ornt(codes))
    data = apply_orientation(np.asarray(img.dataobj), t)
    return nib.Nifti1Image(data, img.affine @ inv_ornt_aff(t, img.shape))


def _oblique(img: nib.Nifti1Image, degrees: float = 20.0) -> nib.Nifti1Image:
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    rot = np.array([[c, -s, 0, 0], [s, c, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]])
    return nib.Nifti1Image(np.asarray(img.dataobj), rot @ img.affine)


@pytest.mark.parametrize("make", [lambda i: _reoriented(i, ("L", "P", "S")), lambda i: _reoriented(i, ("L", "A", "S")),
                                  lambda i: _reoriented(i, ("P", "S", "R")), _oblique])
def test_uncrop_returns_to_the_reference_files_own_grid(make):
    """Preprocess on an LPS / LAS / permuted / oblique reference, uncrop: the reference's exact grid."""
    shape = (12, 14, 10)
    affine = np.diag([0.9, 1.1, 3.0, 1.0])
    ras = _three_contrasts(2, affine, shape)
    les = np.zeros(shape, np.uint8)
    les[5, 6, 4] = les[6, 6, 4] = 1
    ras_mask = nib.Nifti1Image(les, affine)
    ref = [make(i) for i in ras]
    ref_mask = make(ras_mask)
    pre_ras = preprocess_subject(*ras, ras_mask, margin=1)
    pre = preprocess_subject(*ref, ref_mask, margin=1)
    assert np.array_equal(pre.image, pre_ras.image) and np.allclose(pre.spacing, pre_ras.spacing)
    out = pre.uncrop(pre.lesions)
    assert out.shape == ref_mask.shape and np.allclose(out.affine, ref_mask.affine, atol=1e-6)
    assert np.array_equal(np.asarray(out.dataobj), np.asarray(ref_mask.dataobj))  # voxel for voxel


def test_spacing_comes_from_the_affine_and_pixdim_disagreement_is_logged(caplog):
    data = np.ones((4, 5, 6), np.float32)
    img = nib.Nifti1Image(data, np.diag([0.5, 0.8, 2.0, 1.0]))
    img.header.set_zooms((1.0, 1.0, 1.0))  # a converter that wrote pixdim and sform differently
    with caplog.at_level("WARNING", logger="rsanet.volumes"):
        _, _, spacing = ras_to_model(img, "subject 'x', FLAIR")
    assert spacing == (2.0, 0.8, 0.5)
    assert "subject 'x', FLAIR" in caplog.text and "differ from the affine" in caplog.text
