"""Layout, checks, crop/normalisation and atomic writes of rsanet.volumes."""

from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest

from rsanet.volumes import (
    InputError,
    Preprocessed,
    atomic_path,
    bounding_box,
    check_binary_mask,
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
    assert bounding_box(m) == (slice(2, 4), slice(5, 6), slice(8, 10))
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


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda p: None, "file not found"),
        (lambda p: p.write_bytes(b"not a nifti at all"), "cannot be read as NIfTI"),
        (lambda p: nib.save(_img(np.ones((3, 3, 3, 2))), p), "expected a 3D image"),
        (lambda p: nib.save(_img(np.full((3, 3, 3), np.nan)), p), "NaN or infinite"),
        (lambda p: nib.save(_img(np.zeros((3, 3, 3))), p), "all zero"),
        (lambda p: _save_singular(p), "singular"),
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
        check_binary_mask(np.array([0, 1, 2]), "s", "m.nii.gz")
    assert check_binary_mask(np.array([0.0, 1.0]), "s", "m").dtype == np.uint8


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.csv"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash")
    assert list(tmp_path.iterdir()) == []
    with atomic_path(target) as tmp:
        tmp.write_text("whole")
    assert target.read_text() == "whole" and len(list(tmp_path.iterdir())) == 1


def test_preprocess_roundtrip_and_uncrop(tmp_path):
    rng = np.random.default_rng(1)
    shape = (12, 14, 10)
    brain = np.zeros(shape, bool)
    brain[2:10, 3:12, 2:8] = True
    affine = np.diag([0.7, 0.7, 3.0, 1.0])
    imgs = [_img(np.where(brain, rng.uniform(50, 100, shape), 0), affine) for _ in range(3)]
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
