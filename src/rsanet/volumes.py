"""Loading, checking, reorienting, cropping and normalising volumes (written through :func:`rsanet.files.staged`).

The one place where the array layout is fixed: NIfTI images are reoriented to RAS+ (nibabel's
closest canonical orientation) and their ``(x, y, z)`` voxel arrays are transposed to
``(z, y, x)``, i.e. ``(D axial, H coronal, W sagittal)``, the layout of :mod:`rsanet.models`.
Spacings that go with such arrays are ``(dz, dy, dx)`` in millimetres.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from .files import staged

#: The three MR contrasts of a subject, in the model's channel order.
CONTRASTS: tuple[str, ...] = ("T1", "T2", "FLAIR")


class InputError(ValueError):
    """A problem with a user's input file; the message names the subject and the file."""


def save_nifti(img: nib.Nifti1Image, path: str | os.PathLike) -> None:
    """Write a NIfTI image atomically."""
    with staged([path]) as (tmp,):
        nib.save(img, tmp)


def save_probability_u8(prob: np.ndarray, path: str | os.PathLike) -> None:
    """Write a probability map (float in [0, 1], any shape) compactly and atomically: rounded to
    steps of 1/255 as uint8 and deflated (zlib level 1) into an ``.npz`` holding ``prob``: small
    and fast to write (docs/external_test.md). Read back with :func:`load_probability_u8`
    (error <= 1/510)."""
    import zipfile

    q = np.rint(np.clip(prob, 0.0, 1.0) * 255.0).astype(np.uint8)
    with staged([path]) as (tmp,):
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
            with zf.open("prob.npy", "w") as fh:
                np.lib.format.write_array(fh, q, allow_pickle=False)


def load_probability_u8(path: str | os.PathLike) -> np.ndarray:
    """A map written by :func:`save_probability_u8`, as float32 in [0, 1]."""
    with np.load(path) as data:
        return data["prob"].astype(np.float32) / np.float32(255.0)


def save_json(obj: object, path: str | os.PathLike) -> None:
    """Write JSON atomically (indented, keys in insertion order)."""
    with staged([path]) as (tmp,):
        tmp.write_text(json.dumps(obj, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------
# Loading with checks
# ---------------------------------------------------------------------------------------------
def load_checked(path: str | os.PathLike, subject: str | None, role: str, allow_empty: bool = False) -> nib.Nifti1Image:
    """Load a 3D NIfTI image and check it is usable, or raise :class:`InputError`.

    The one loader of user images (the workflow's steps, ``rsanet-segment`` and registration).
    Checks: the file exists and is a readable NIfTI; it is 3D (a trailing singleton 4th axis is
    squeezed); it has a world orientation (qform or sform code set); qform and sform, where
    both are set, agree (tools differ in which one they read); voxels and affine are finite; the
    affine is invertible; the image is not all zero (unless ``allow_empty``, for lesion masks of
    subjects without lesions). ``subject`` (or ``None``) and ``role``, a
    word such as ``"T1"`` or ``"lesion mask"``, name the file in messages. Non-finite scaling
    factors (``scl_slope`` NaN or infinite) mean "no scaling": nibabel reads such files unscaled,
    as the NIfTI convention says for a slope of 0.
    """
    path = Path(path)
    where = (f"subject {subject!r}, " if subject is not None else "") + f"{role} file {str(path)!r}"
    if not path.is_file():
        raise InputError(f"{where}: file not found. Fix the path in the subject sheet.")
    try:
        img = nib.load(str(path))
    except Exception as err:  # nibabel raises several types for bad or truncated files
        raise InputError(
            f"{where}: cannot be read as NIfTI ({type(err).__name__}: {err}). "
            "Is it a complete .nii/.nii.gz file?"
        ) from err
    qform, qcode = img.get_qform(coded=True)
    sform, scode = img.get_sform(coded=True)
    if not qcode and not scode:
        raise InputError(
            f"{where}: no world orientation (qform_code and sform_code are both 0). Set a scanner or "
            "aligned qform/sform (the converter from DICOM normally does)."
        )
    if qcode and scode and qform is not None and sform is not None:
        corners = np.array([[i, j, k, 1.0] for i in (0, img.shape[0]) for j in (0, img.shape[1]) for k in (0, img.shape[2])])
        gap = float(np.abs((qform - sform) @ corners.T).max())
        if gap > 1.0:
            raise InputError(
                f"{where}: the header's qform and sform disagree by up to {gap:.1f} mm, and tools differ in which "
                "one they use. Fix the header so that both hold the intended geometry "
                "(e.g. `fslorient -copysform2qform`, or nibabel's set_qform(img.get_sform()))."
            )
    try:
        data = np.asanyarray(img.dataobj)
    except Exception as err:
        raise InputError(f"{where}: the voxel data cannot be read ({type(err).__name__}: {err}).") from err
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise InputError(
            f"{where}: expected a 3D image, got shape {data.shape}. "
            "Split 4D series and give one volume per contrast."
        )
    affine = img.affine
    if affine is None or not np.isfinite(affine).all():
        raise InputError(f"{where}: the image affine is missing or not finite. Repair the header.")
    if abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise InputError(f"{where}: the image affine is singular (zero voxel size?). Repair the header.")
    data = np.asarray(data)
    if not np.isfinite(data).all():
        n_bad = int((~np.isfinite(data)).sum())
        raise InputError(f"{where}: {n_bad} voxels are NaN or infinite. Re-export the image.")
    if not allow_empty and not np.any(data):
        raise InputError(f"{where}: the image is all zero.")
    return nib.Nifti1Image(data, affine, img.header)


def binarise_mask(data: np.ndarray, subject: str, path: str | os.PathLike) -> np.ndarray:
    """A lesion mask as uint8 0/1, accepting the encodings real cohorts bring, or :class:`InputError`.

    Accepted (and logged): 0/1 in any dtype; 0/255 (8-bit masks); 0/1 stored as float with
    interpolation residue (every value within 0.01 of 0 or 1, e.g. 0.999). Anything else
    (labels 0/1/2, probabilities) is an error naming the subject and the file.
    """
    values = np.unique(data)
    where = f"subject {subject!r}, lesion mask {str(path)!r}"
    if np.all(np.isin(values, (0, 1))):
        return (data > 0).astype(np.uint8)
    if np.all(np.isin(values, (0, 255))):
        logging.getLogger(__name__).info("%s: values 0/255 read as a binary mask (255 = lesion)", where)
        return (data > 0).astype(np.uint8)
    near = np.minimum(np.abs(values - 0.0), np.abs(values - 1.0))
    if np.issubdtype(values.dtype, np.floating) and np.all(near <= 0.01):
        logging.getLogger(__name__).info(
            "%s: float values within 0.01 of 0/1 (interpolation residue, largest deviation %.4g) rounded to 0/1",
            where, float(near.max()))
        return (data > 0.5).astype(np.uint8)
    shown = ", ".join(f"{v:g}" for v in values[:6]) + (" ..." if values.size > 6 else "")
    raise InputError(
        f"{where}: expected a binary mask (0/1, or 0/255), found values {shown}. Threshold or binarise the mask."
    )


def require_same_grid(img: nib.Nifti1Image, reference: nib.Nifti1Image, subject: str, role: str,
                      path: str | os.PathLike, reference_path: str | os.PathLike) -> None:
    """Raise :class:`InputError` unless ``img`` lies on ``reference``'s voxel grid (shape and affine)."""
    if not same_grid(img, reference):
        raise InputError(
            f"subject {subject!r}, {role} {str(path)!r}: geometry {img.shape[:3]} differs from its reference image "
            f"{str(reference_path)!r} {reference.shape[:3]} (shape or affine); it must be on the reference grid"
        )


def same_grid(a: nib.Nifti1Image, b: nib.Nifti1Image, atol_mm: float = 1e-3) -> bool:
    """True when two images share the voxel grid (shape and affine within ``atol_mm``)."""
    return a.shape[:3] == b.shape[:3] and np.allclose(a.affine, b.affine, atol=atol_mm)


# ---------------------------------------------------------------------------------------------
# Reorientation to the model layout
# ---------------------------------------------------------------------------------------------
def voxel_sizes_mm(img: nib.Nifti1Image, context: str = "") -> np.ndarray:
    """Voxel sizes (mm) of ``img``'s own axes, from its affine (what resampling uses).

    ``pixdim`` in the header can disagree with the sform/qform affine (some converters write
    one and not the other); lesion volumes must follow the affine. A disagreement above 1 % is
    logged as a warning naming ``context``.
    """
    sizes = nib.affines.voxel_sizes(img.affine)
    zooms = np.asarray(img.header.get_zooms()[:3], dtype=float)
    if zooms.shape == sizes.shape and np.any(np.abs(zooms - sizes) > 0.01 * sizes):
        logging.getLogger(__name__).warning(
            "%s: voxel sizes in the header's pixdim %s differ from the affine's %s by more than 1 %%; "
            "using the affine's", context or "image", tuple(round(float(z), 4) for z in zooms),
            tuple(round(float(v), 4) for v in sizes))
    return sizes


def ras_to_model(img: nib.Nifti1Image, context: str = "") -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """Reorient to RAS+ and return ``(array (D, H, W), canonical affine, spacing (dz, dy, dx) mm)``.

    ``array[d, h, w]`` is the canonical voxel ``(x=w, y=h, z=d)``: D runs inferior->superior,
    H posterior->anterior, W left->right. The reorientation only permutes and flips axes (no
    resampling, also for oblique affines), so :func:`model_to_reference` undoes it exactly.
    Spacing comes from the affine (:func:`voxel_sizes_mm`), not from ``pixdim``.
    """
    canonical = nib.as_closest_canonical(img)
    data = np.asarray(canonical.dataobj).transpose(2, 1, 0)  # (x, y, z) -> (z, y, x)
    sizes = voxel_sizes_mm(canonical, context)
    return np.ascontiguousarray(data), canonical.affine, (float(sizes[2]), float(sizes[1]), float(sizes[0]))


def model_to_reference(array_dhw: np.ndarray, reference_affine: np.ndarray) -> nib.Nifti1Image:
    """Inverse of :func:`ras_to_model`: a full-grid ``(D, H, W)`` array onto the reference's own grid.

    The result has exactly the reference file's voxel order, shape and affine (LPS, LAS,
    oblique... alike), so it compares voxel for voxel with any image on that grid. Used for
    every image the workflow writes on a reference grid (predictions, new-patient outputs).
    """
    ornt = nib.orientations.io_orientation(reference_affine)
    xyz = array_dhw.transpose(2, 1, 0)  # canonical (x, y, z)
    to_ref = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt(("R", "A", "S")), ornt)
    data = nib.orientations.apply_orientation(xyz, to_ref)
    affine = np.asarray(reference_affine, dtype=float)
    out = nib.Nifti1Image(np.ascontiguousarray(data), affine)
    out.set_qform(affine, code=1)  # both qform and sform: tools that read either agree
    out.set_sform(affine, code=1)
    return out


# ---------------------------------------------------------------------------------------------
# Brain crop and normalisation (pure functions)
# ---------------------------------------------------------------------------------------------
def bounding_box(mask: np.ndarray, margin: int) -> tuple[slice, ...]:
    """Slices of the smallest box holding all non-zero voxels of ``mask``, grown by ``margin``."""
    coords = np.nonzero(mask)
    if coords[0].size == 0:
        raise ValueError("bounding_box of an empty mask")
    return tuple(
        slice(max(int(c.min()) - margin, 0), min(int(c.max()) + 1 + margin, size))
        for c, size in zip(coords, mask.shape)
    )


def normalise_in_mask(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Z-score ``image`` with the mean and sd of the voxels inside ``mask``; zero outside.

    Returns float32 of the same shape. A constant image inside the mask gives zeros.
    """
    values = image[mask > 0].astype(np.float64)
    mean, sd = values.mean(), values.std()
    out = (image.astype(np.float64) - mean) / (sd if sd > 0 else 1.0)
    out[mask == 0] = 0.0
    return out.astype(np.float32)


@dataclass(frozen=True)
class Preprocessed:
    """One subject ready for training: arrays in the model layout, cropped to the brain.

    Attributes:
        image: ``(3, D, H, W)`` float32, channels T1, T2, FLAIR, z-scored inside the brain.
        lesions: ``(D, H, W)`` uint8 0/1.
        brain: ``(D, H, W)`` uint8 0/1.
        spacing: ``(dz, dy, dx)`` mm.
        bbox: ``(3, 2)`` int, start/stop of the crop in the canonical full grid (D, H, W).
        full_shape: ``(D, H, W)`` of the canonical full grid.
        affine: 4x4 canonical (RAS+) affine of the full grid.
        reference_affine: 4x4 affine of the reference image's own grid (the file as given), to
            which :meth:`uncrop` returns.
    """

    image: np.ndarray
    lesions: np.ndarray
    brain: np.ndarray
    spacing: tuple[float, float, float]
    bbox: np.ndarray
    full_shape: tuple[int, int, int]
    affine: np.ndarray
    reference_affine: np.ndarray | None = None

    def save(self, path: str | os.PathLike) -> None:
        """Write an uncompressed ``.npz`` (fast to load for random crops), atomically."""
        with staged([path]) as (tmp,):
            with open(tmp, "wb") as fh:
                np.savez(
                    fh, image=self.image, lesions=self.lesions, brain=self.brain,
                    spacing=np.asarray(self.spacing), bbox=self.bbox,
                    full_shape=np.asarray(self.full_shape), affine=self.affine,
                    reference_affine=self.affine if self.reference_affine is None else self.reference_affine,
                )

    @staticmethod
    def load(path: str | os.PathLike) -> "Preprocessed":
        with np.load(path) as z:
            return Preprocessed(
                image=z["image"], lesions=z["lesions"], brain=z["brain"],
                spacing=tuple(float(s) for s in z["spacing"]), bbox=z["bbox"],
                full_shape=tuple(int(s) for s in z["full_shape"]), affine=z["affine"],
                reference_affine=z["reference_affine"] if "reference_affine" in z else z["affine"],
            )

    @staticmethod
    def load_lesions(path: str | os.PathLike) -> tuple[np.ndarray, tuple[float, float, float]]:
        """Only the ``(D, H, W)`` uint8 lesion mask and the ``(dz, dy, dx)`` mm spacing of a saved
        subject (the image is not read)."""
        with np.load(path) as z:
            return z["lesions"], tuple(float(s) for s in z["spacing"])

    def uncrop(self, array_dhw: np.ndarray) -> nib.Nifti1Image:
        """Put a cropped ``(D, H, W)`` array back on the reference image's own grid as NIfTI."""
        full = np.zeros(self.full_shape, dtype=array_dhw.dtype)
        full[tuple(slice(a, b) for a, b in self.bbox)] = array_dhw
        ref = self.affine if self.reference_affine is None else self.reference_affine
        return model_to_reference(full, ref)


def preprocess_subject(
    t1: nib.Nifti1Image,
    t2: nib.Nifti1Image,
    flair: nib.Nifti1Image,
    lesions: nib.Nifti1Image,
    margin: int = 2,
    brain_threshold: float = 0.0,
) -> Preprocessed:
    """Reorient co-registered images to the model layout, crop to the brain and normalise.

    All four images must share one grid (that of the registration reference). The brain mask
    is where the reference-space images are all above ``brain_threshold`` (the inputs are
    expected skull-stripped, as in the paper); the crop is its bounding box plus ``margin``
    voxels; each contrast is z-scored inside the brain.
    """
    arrays = [ras_to_model(img, name) for img, name in zip((t1, t2, flair, lesions), ("T1", "T2", "FLAIR", "lesion mask"))]
    (a_t1, affine, spacing), (a_t2, _, _), (a_fl, _, _), (a_les, _, _) = arrays
    brain = (a_t1 > brain_threshold) & (a_t2 > brain_threshold) & (a_fl > brain_threshold)
    brain |= a_les > 0  # never crop a lesion away
    box = bounding_box(brain, margin)
    brain_c = brain[box].astype(np.uint8)
    image = np.stack([normalise_in_mask(a[box], brain_c) for a in (a_t1, a_t2, a_fl)])
    return Preprocessed(
        image=image,
        lesions=(a_les[box] > 0).astype(np.uint8),
        brain=brain_c,
        spacing=spacing,
        bbox=np.array([[s.start, s.stop] for s in box], dtype=np.int64),
        full_shape=tuple(int(s) for s in a_t1.shape),
        affine=affine,
        reference_affine=np.asarray(flair.affine, dtype=float),
    )
