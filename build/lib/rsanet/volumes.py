"""Loading, checking, reorienting, cropping and normalising volumes; atomic file writes.

The one place where the array layout is fixed: NIfTI images are reoriented to RAS+ (nibabel's
closest canonical orientation) and their ``(x, y, z)`` voxel arrays are transposed to
``(z, y, x)``, i.e. ``(D axial, H coronal, W sagittal)``, the layout of :mod:`rsanet.models`.
Spacings that go with such arrays are ``(dz, dy, dx)`` in millimetres.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import nibabel as nib
import numpy as np


class InputError(ValueError):
    """A problem with a user's input file; the message names the subject and the file."""


# ---------------------------------------------------------------------------------------------
# Atomic writes: a crash never leaves a half-written file that a later step would trust
# ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only on success.

    The temporary name keeps the suffix(es) of ``path`` so writers that infer the format from
    the extension (nibabel, matplotlib, numpy) behave the same.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name.split('.')[0]}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def save_nifti(img: nib.Nifti1Image, path: str | os.PathLike) -> None:
    """Write a NIfTI image atomically."""
    with atomic_path(path) as tmp:
        nib.save(img, tmp)


def save_json(obj: object, path: str | os.PathLike) -> None:
    """Write JSON atomically (indented, keys in insertion order)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------
# Loading with checks
# ---------------------------------------------------------------------------------------------
def load_checked(path: str | os.PathLike, subject: str, role: str) -> nib.Nifti1Image:
    """Load a 3D NIfTI image and check it is usable, or raise :class:`InputError`.

    Checks: the file exists and is a readable NIfTI; it is 3D (a trailing singleton 4th axis is
    squeezed); voxels and affine are finite; the affine is invertible; the image is not all
    zero. ``role`` is a word such as ``"T1"`` or ``"lesion mask"`` used in messages.
    """
    path = Path(path)
    where = f"subject {subject!r}, {role} file {str(path)!r}"
    if not path.is_file():
        raise InputError(f"{where}: file not found. Fix the path in the subject sheet.")
    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
    except Exception as err:  # nibabel raises several types for bad or truncated files
        raise InputError(
            f"{where}: cannot be read as NIfTI ({type(err).__name__}: {err}). "
            "Is it a complete .nii/.nii.gz file?"
        ) from err
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
    if not np.any(data):
        raise InputError(f"{where}: the image is all zero.")
    return nib.Nifti1Image(data, affine, img.header)


def check_binary_mask(data: np.ndarray, subject: str, path: str | os.PathLike) -> np.ndarray:
    """Return the mask as uint8 0/1, or raise :class:`InputError` if it holds other values."""
    values = np.unique(data)
    if not np.all(np.isin(values, (0, 1))):
        shown = ", ".join(f"{v:g}" for v in values[:6]) + (" ..." if values.size > 6 else "")
        raise InputError(
            f"subject {subject!r}, lesion mask {str(path)!r}: expected a binary mask (0/1), "
            f"found values {shown}. Threshold or binarise the mask."
        )
    return data.astype(np.uint8)


def same_grid(a: nib.Nifti1Image, b: nib.Nifti1Image, atol_mm: float = 1e-3) -> bool:
    """True when two images share the voxel grid (shape and affine within ``atol_mm``)."""
    return a.shape[:3] == b.shape[:3] and np.allclose(a.affine, b.affine, atol=atol_mm)


# ---------------------------------------------------------------------------------------------
# Reorientation to the model layout
# ---------------------------------------------------------------------------------------------
def ras_to_model(img: nib.Nifti1Image) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """Reorient to RAS+ and return ``(array (D, H, W), canonical affine, spacing (dz, dy, dx) mm)``.

    ``array[d, h, w]`` is the canonical voxel ``(x=w, y=h, z=d)``: D runs inferior->superior,
    H posterior->anterior, W left->right.
    """
    canonical = nib.as_closest_canonical(img)
    data = np.asarray(canonical.dataobj).transpose(2, 1, 0)  # (x, y, z) -> (z, y, x)
    zooms = canonical.header.get_zooms()[:3]
    return np.ascontiguousarray(data), canonical.affine, (float(zooms[2]), float(zooms[1]), float(zooms[0]))


def model_to_nifti(array_dhw: np.ndarray, canonical_affine: np.ndarray) -> nib.Nifti1Image:
    """Inverse of :func:`ras_to_model` for an array on the full canonical grid."""
    return nib.Nifti1Image(np.ascontiguousarray(array_dhw.transpose(2, 1, 0)), canonical_affine)


# ---------------------------------------------------------------------------------------------
# Brain crop and normalisation (pure functions)
# ---------------------------------------------------------------------------------------------
def bounding_box(mask: np.ndarray, margin: int = 0) -> tuple[slice, ...]:
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
    """

    image: np.ndarray
    lesions: np.ndarray
    brain: np.ndarray
    spacing: tuple[float, float, float]
    bbox: np.ndarray
    full_shape: tuple[int, int, int]
    affine: np.ndarray

    def save(self, path: str | os.PathLike) -> None:
        """Write an uncompressed ``.npz`` (fast to load for random crops), atomically."""
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as fh:
                np.savez(
                    fh, image=self.image, lesions=self.lesions, brain=self.brain,
                    spacing=np.asarray(self.spacing), bbox=self.bbox,
                    full_shape=np.asarray(self.full_shape), affine=self.affine,
                )

    @staticmethod
    def load(path: str | os.PathLike) -> "Preprocessed":
        with np.load(path) as z:
            return Preprocessed(
                image=z["image"], lesions=z["lesions"], brain=z["brain"],
                spacing=tuple(float(s) for s in z["spacing"]), bbox=z["bbox"],
                full_shape=tuple(int(s) for s in z["full_shape"]), affine=z["affine"],
            )

    def uncrop(self, array_dhw: np.ndarray) -> nib.Nifti1Image:
        """Put a cropped ``(D, H, W)`` array back on the full canonical grid as NIfTI."""
        full = np.zeros(self.full_shape, dtype=array_dhw.dtype)
        full[tuple(slice(a, b) for a, b in self.bbox)] = array_dhw
        return model_to_nifti(full, self.affine)


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
    arrays = [ras_to_model(img) for img in (t1, t2, flair, lesions)]
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
    )
