"""Image maths for registration: Otsu foreground, point clouds, coarse grids, resampling, field-of-view coverage."""

from __future__ import annotations

import logging
import math

import nibabel as nib
import numpy as np
from scipy import ndimage

from .core import (
    Interpolation,
)
from .transforms import (
    apply_affine,
)

log = logging.getLogger("rsanet.registration")


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of a set of intensities (maximises the between-class variance)."""
    v = np.asarray(values, dtype=float).ravel()
    v = v[np.isfinite(v)]
    hist, edges = np.histogram(v, bins=bins)
    centers = 0.5 * (edges[:-1] + edges[1:])
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centers)
    mu0 = m0 / np.maximum(w0, 1)
    mu1 = (m0[-1] - m0) / np.maximum(w1, 1)
    between = w0 * w1 * (mu0 - mu1) ** 2
    return float(centers[int(np.argmax(between[:-1]))])


def foreground_mask(data: np.ndarray) -> np.ndarray:
    """Head/brain mask of an MR volume: above Otsu's threshold, holes filled, largest component."""
    d = np.asarray(data, dtype=np.float32)
    positive = d[d > 0]
    if positive.size == 0:
        return np.zeros(d.shape, dtype=bool)
    mask = d > otsu_threshold(positive)
    labels, n = ndimage.label(mask)
    if n > 1:
        sizes = ndimage.sum(mask, labels, index=np.arange(1, n + 1))
        mask = labels == (1 + int(np.argmax(sizes)))
    return ndimage.binary_fill_holes(mask)


def voxel_points_mm(mask: np.ndarray, affine: np.ndarray, step: int = 1) -> np.ndarray:
    """World coordinates (N×3, mm) of the voxels of ``mask`` (every ``step``-th voxel along each axis)."""
    sub = np.zeros_like(mask, dtype=bool)
    sub[::step, ::step, ::step] = mask[::step, ::step, ::step]
    return apply_affine(affine, np.argwhere(sub).astype(float))


def downsample_grid(
    data: np.ndarray, affine: np.ndarray, spacing_mm: float
) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian-smooth and resample a volume to spacing ``max(spacing_mm, native)`` per axis.

    The new grid covers the same field of view with the same axis directions.  The Gaussian's
    sigma is ``0.5 * sqrt(new² - native²)`` mm per axis (none on axes that are not downsampled).
    Returns ``(data, affine)``.
    """
    native = np.linalg.norm(affine[:3, :3], axis=0)
    new = np.maximum(native, spacing_mm)
    sigma_vox = 0.5 * np.sqrt(np.maximum(new**2 - native**2, 0.0)) / native
    smoothed = ndimage.gaussian_filter(data.astype(np.float32), sigma=sigma_vox, mode="nearest")
    factor = new / native
    shape = tuple(int(max(1, math.ceil(n / f - 1e-6))) for n, f in zip(data.shape, factor))
    offset = 0.5 * (factor - 1.0)
    out = ndimage.affine_transform(
        smoothed, np.diag(factor), offset=offset, output_shape=shape, order=1, mode="nearest"
    )
    new_affine = affine.copy()
    new_affine[:3, :3] = affine[:3, :3] * factor
    new_affine[:3, 3] = affine[:3, :3] @ offset + affine[:3, 3]
    return out.astype(np.float32), new_affine




# ---------------------------------------------------------------------------------------------
# Resampling
# ---------------------------------------------------------------------------------------------
#: A moving contrast whose field of view covers less than this fraction of the reference's head is refused.
MIN_COVERAGE = 0.5


def field_of_view_coverage(moving_img: nib.Nifti1Image, fixed_img: nib.Nifti1Image, moving_to_fixed: np.ndarray) -> float:
    """Fraction of the fixed image's head voxels that fall inside the moving image's field of view."""
    head = foreground_mask(np.asarray(fixed_img.dataobj, dtype=np.float32))
    ijk = np.argwhere(head)[::7].astype(float)  # every 7th head voxel: plenty for a fraction
    if not len(ijk):
        return 0.0
    fixed_to_moving_vox = np.linalg.inv(moving_img.affine) @ np.linalg.inv(moving_to_fixed) @ fixed_img.affine
    m = apply_affine(fixed_to_moving_vox, ijk)
    shape = np.asarray(moving_img.shape[:3])
    return float(np.all((m >= -0.5) & (m <= shape - 0.5), axis=1).mean())
def resample_to_fixed(
    moving_img: nib.Nifti1Image,
    fixed_img: nib.Nifti1Image,
    moving_to_fixed: np.ndarray,
    interpolation: Interpolation = "linear",
) -> nib.Nifti1Image:
    """Resample ``moving_img`` onto the grid of ``fixed_img`` through ``moving_to_fixed`` (RAS mm).

    ``linear`` (images, float32 output) or ``nearest`` (masks and labels, the moving dtype kept).
    Voxels that fall outside the moving image are 0.  The output has the fixed image's affine.
    """
    if interpolation not in ("linear", "nearest"):
        raise ValueError(f"interpolation must be 'linear' or 'nearest', got {interpolation!r}")
    fixed_vox_to_moving_vox = (
        np.linalg.inv(moving_img.affine) @ np.linalg.inv(moving_to_fixed) @ fixed_img.affine
    )
    data = np.asanyarray(moving_img.dataobj)
    if data.ndim > 3:
        data = data.reshape(data.shape[:3])
    if interpolation == "linear":
        src, order = data.astype(np.float32), 1
    else:
        src, order = data, 0
    if data.shape[:3] == tuple(fixed_img.shape[:3]) and np.allclose(fixed_vox_to_moving_vox, np.eye(4), rtol=0, atol=1e-6):
        # the same grid (e.g. registration.engine: none on co-registered scans): the voxels as
        # they are, not an interpolation through a transform that is the identity up to rounding
        out = np.array(src, copy=True)
    else:
        out = ndimage.affine_transform(
            src,
            fixed_vox_to_moving_vox[:3, :3],
            offset=fixed_vox_to_moving_vox[:3, 3],
            output_shape=tuple(fixed_img.shape[:3]),
            order=order,
            mode="grid-constant",  # outside the moving grid is 0, blended linearly at its border
            cval=0.0,
        )
    result = nib.Nifti1Image(out, fixed_img.affine)
    result.set_qform(fixed_img.affine, code=1)
    result.set_sform(fixed_img.affine, code=1)
    return result


