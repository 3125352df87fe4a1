"""Linear co-registration of MR contrasts (T1, T2 onto FLAIR): FSL FLIRT when installed, SimpleITK otherwise.

Conventions (the one place they are fixed)
------------------------------------------
* Every transform this module returns or accepts is a 4×4 affine in **RAS world millimetres**
  (the NIfTI / nibabel ``img.affine`` space) called ``moving_to_fixed``: it maps a point of the
  moving scan's world space to the *same anatomical point* in the fixed scan's world space.
  A fixed voxel ``v`` is therefore sampled from the moving image at moving voxel
  ``inv(A_moving) @ inv(moving_to_fixed) @ A_fixed @ v``.
* ITK physical space is **LPS** (x and y negated with respect to RAS) and an ITK transform maps
  points of the **fixed** image to the **moving** image: ``y = M (x - c) + t + c``.  The converters
  :func:`itk_to_moving_to_fixed` and :func:`moving_to_fixed_to_itk` are the only places that
  cross between the two conventions.
* A FLIRT ``.mat`` maps FSL "scaled voxel" coordinates of the input (moving) image to those of
  the reference (fixed) image; fslpy's :func:`fsl.transform.flirt.fromFlirt` /
  :func:`~fsl.transform.flirt.toFlirt` convert it from / to ``moving_to_fixed``.

Engines
-------
``flirt``: FSL's ``flirt`` via :func:`fsl.wrappers.flirt` (used when ``$FSLDIR/bin/flirt`` exists).
``simpleitk``: Mattes mutual information, a Gaussian pyramid (6, 3, 1.5 mm), header or
centre-of-mass initialisation, a coarse rotation search screened by gradient descent, and
Powell refinement (FLIRT's optimiser) on the finer levels, with fixed random seeds and a fixed
thread count, so a result is reproducible.  ``auto`` picks FLIRT when
present; the choice is logged and recorded in :class:`RegistrationResult`.

Both engines are judged by the same engine-independent check: Mattes mutual information on the
3 mm pyramid level before and after registration (it must not get worse) and the displacement
of the moving brain (it must stay under ``max_displacement_mm``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Iterator, Literal, Mapping, Sequence

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from scipy import ndimage

log = logging.getLogger("rsanet.registration")  # also when run as __main__

EngineName = Literal["auto", "flirt", "simpleitk"]
Interpolation = Literal["linear", "nearest"]
PathLike = str | os.PathLike

#: RAS <-> LPS flip for homogeneous 4×4 matrices (its own inverse).
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])

FLIRT_COSTS = ("corratio", "mutualinfo", "normmi", "normcorr", "leastsq")


#: Fewer than this fraction of the moving head's voxels inside the fixed head: a collapsed result.
MIN_OVERLAP = 0.5
#: Mattes mutual information (nats) below which two images are taken to share no structure.
MIN_MUTUAL_INFORMATION = 0.05


class RegistrationError(RuntimeError):
    """Registration could not be done or gave an implausible result; the message names the file(s)."""


# ---------------------------------------------------------------------------------------------
# Settings and result
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SimpleITKSettings:
    """Tuning of the SimpleITK engine (the defaults meet the benchmark targets; docs/registration.md).

    ``level_spacings_mm``: isotropic target spacing of each pyramid level, coarse to fine (a level
    never upsamples an axis, so a 3 mm slice axis stays 3 mm; a level that would equal the next
    finer one is dropped).  ``samples_per_level``: Mattes MI samples drawn at random (``seed``)
    from the fixed head mask at each level; 0 = every voxel.  ``histogram_bins``: Mattes bins.
    Coarsest level: rotations on a grid of ``search_step_deg`` over ±``search_deg`` (see
    :func:`register`) about each axis, from the header and the centre-of-mass alignment; the
    ``search_keep`` best of each, and both starts, get ``screen_iterations`` of regular-step
    gradient descent, and the one with the best metric on the next finer level wins.  Finer
    levels: Powell's method (``powell_iterations`` sweeps, ``powell_line_iterations`` per line
    search, stopping at ``powell_step_tolerance`` voxels), as in FLIRT.  ``affine_levels``: for
    ``dof=12``, how many of the finest levels then refine a full affine.
    """

    level_spacings_mm: tuple[float, ...] = (6.0, 3.0, 1.5)
    samples_per_level: tuple[int, ...] = (0, 40_000, 60_000)
    histogram_bins: int = 32
    search_step_deg: float = 15.0
    search_keep: int = 3
    screen_iterations: int = 150
    powell_iterations: int = 4
    powell_line_iterations: int = 10
    powell_step_tolerance: float = 0.02
    affine_levels: int = 1
    seed: int = 1234

    def __post_init__(self) -> None:
        if not self.level_spacings_mm or len(self.samples_per_level) != len(self.level_spacings_mm):
            raise ValueError("level_spacings_mm and samples_per_level need one entry per level")


@dataclass(frozen=True, eq=False)
class RegistrationResult:
    """Outcome of :func:`register`.

    ``moving_to_fixed``: 4×4 affine, RAS world mm, moving world point -> same anatomical point in
    fixed world.  ``cost_before`` / ``cost_after``: negative Mattes mutual information (lower is
    better) on the finest pyramid level the optimiser used (``details["check_level_mm"]``) at the
    header alignment and at the returned transform, computed the same way for both engines;
    ``cost_after <= cost_before`` always (``details["kept"]`` says which one was returned).  ``displacement_mm``: largest displacement of a moving brain voxel
    caused by ``moving_to_fixed`` (mm).  ``seconds``: wall time of the registration.
    """

    moving: str
    fixed: str
    moving_to_fixed: np.ndarray
    engine: str
    dof: int
    cost_name: str
    cost_before: float
    cost_after: float
    displacement_mm: float
    seconds: float
    details: Mapping[str, object] = field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        """JSON-ready summary (the matrix as nested lists)."""
        out = asdict(self)
        out["moving_to_fixed"] = np.asarray(self.moving_to_fixed).tolist()
        out["details"] = dict(self.details)
        return out


# ---------------------------------------------------------------------------------------------
# Pure maths: conventions, rigid matrices, displacements, Otsu
# ---------------------------------------------------------------------------------------------
def rotation_matrix(angles_deg: Sequence[float]) -> np.ndarray:
    """3×3 rotation ``Rz @ Ry @ Rx`` for angles (degrees) about the x, y, z axes."""
    ax, ay, az = np.deg2rad(np.asarray(angles_deg, dtype=float))
    rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def rigid_matrix(
    angles_deg: Sequence[float], translation_mm: Sequence[float], center_mm: Sequence[float] = (0, 0, 0)
) -> np.ndarray:
    """4×4 rigid transform: rotate by ``angles_deg`` about ``center_mm``, then translate (mm)."""
    r = rotation_matrix(angles_deg)
    c = np.asarray(center_mm, dtype=float)
    m = np.eye(4)
    m[:3, :3] = r
    m[:3, 3] = c - r @ c + np.asarray(translation_mm, dtype=float)
    return m


def itk_to_moving_to_fixed(
    matrix: np.ndarray, translation: Sequence[float], center: Sequence[float]
) -> np.ndarray:
    """Convert an ITK affine (fixed LPS point -> moving LPS point, ``y = M(x-c)+t+c``) to ``moving_to_fixed`` (RAS)."""
    m = np.asarray(matrix, dtype=float).reshape(3, 3)
    c = np.asarray(center, dtype=float)
    fixed_to_moving_lps = np.eye(4)
    fixed_to_moving_lps[:3, :3] = m
    fixed_to_moving_lps[:3, 3] = np.asarray(translation, dtype=float) + c - m @ c
    return np.linalg.inv(RAS_TO_LPS @ fixed_to_moving_lps @ RAS_TO_LPS)


def moving_to_fixed_to_itk(
    moving_to_fixed: np.ndarray, center_lps: Sequence[float] = (0.0, 0.0, 0.0)
) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`itk_to_moving_to_fixed`: the ITK ``(matrix 3×3, translation)`` about ``center_lps``."""
    fixed_to_moving_lps = RAS_TO_LPS @ np.linalg.inv(np.asarray(moving_to_fixed, float)) @ RAS_TO_LPS
    m = fixed_to_moving_lps[:3, :3]
    c = np.asarray(center_lps, dtype=float)
    return m, fixed_to_moving_lps[:3, 3] - c + m @ c


def apply_affine(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply a 4×4 affine to an ``(N, 3)`` array of points."""
    return points @ matrix[:3, :3].T + matrix[:3, 3]


def displacement_mm(a: np.ndarray, b: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Per-point distance (mm) between the images of ``points`` (N×3, mm) under affines ``a`` and ``b``."""
    return np.linalg.norm(apply_affine(a, points) - apply_affine(b, points), axis=1)


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
# Input checks
# ---------------------------------------------------------------------------------------------
def load_volume(path: PathLike, role: str = "image") -> nib.Nifti1Image:
    """Load a 3D NIfTI volume and check it can be registered; raise :class:`RegistrationError` if not.

    Trailing singleton dimensions (``X×Y×Z×1``) are dropped.  Rejected: files that cannot be read,
    images with more than 3 non-singleton dimensions, no world orientation (qform and sform codes
    both 0), a non-finite or singular affine, non-finite voxels, and empty (constant) images.
    """
    p = Path(path)
    try:
        img = nib.load(str(p))
    except Exception as exc:  # nibabel raises many types
        raise RegistrationError(f"{role} {p}: cannot be read as NIfTI ({exc}).") from exc
    shape = img.shape
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) != 3:
        raise RegistrationError(
            f"{role} {p}: expected a 3D volume, got shape {img.shape}; extract one volume "
            "(e.g. the first, or the mean of a 4D series) before registering."
        )
    affine = np.asarray(img.affine, dtype=float)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise RegistrationError(
            f"{role} {p}: the voxel-to-world affine is non-finite or singular; fix the header "
            "(qform/sform) before registering."
        )
    header = img.header
    if int(header["qform_code"]) == 0 and int(header["sform_code"]) == 0:
        raise RegistrationError(
            f"{role} {p}: no world orientation (qform_code and sform_code are both 0); set a "
            "scanner/aligned qform or sform before registering."
        )
    data = np.asarray(img.dataobj, dtype=np.float32).reshape(shape)
    if not np.all(np.isfinite(data)):
        raise RegistrationError(
            f"{role} {p}: {int(np.count_nonzero(~np.isfinite(data)))} voxels are NaN or infinite; "
            "replace them (e.g. by 0) before registering."
        )
    if float(data.max()) == float(data.min()):
        raise RegistrationError(
            f"{role} {p}: the image is empty (every voxel is {float(data.max())}); check the "
            "conversion from DICOM or the previous step."
        )
    return nib.Nifti1Image(data, affine, header=header)


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


# ---------------------------------------------------------------------------------------------
# SimpleITK plumbing
# ---------------------------------------------------------------------------------------------
def to_sitk(data: np.ndarray, affine: np.ndarray) -> sitk.Image:
    """A SimpleITK image (LPS physical space) with the same voxels and world geometry as ``(data, affine)``."""
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(data, (2, 1, 0))))
    image.SetSpacing([float(s) for s in spacing])
    lps = RAS_TO_LPS[:3, :3]
    image.SetOrigin([float(x) for x in lps @ affine[:3, 3]])
    image.SetDirection([float(x) for x in (lps @ affine[:3, :3] / spacing).ravel()])
    return image


@contextlib.contextmanager
def _sitk_threads(n: int) -> Iterator[None]:
    old = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(int(n))
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(old)


@dataclass(frozen=True)
class _Level:
    """One pyramid level: images and fixed-image head mask as SimpleITK images, and the moving
    image's head voxels as RAS points (mm) for the displacement check."""

    spacing_mm: float
    fixed: sitk.Image
    moving: sitk.Image
    fixed_mask: sitk.Image
    mask_voxels: int
    moving_head_mm: np.ndarray
    samples: int


def _clip_intensities(data: np.ndarray) -> np.ndarray:
    """Clip to the 0.1–99.9th percentiles of the non-zero voxels (bright vessels flatten MI histograms)."""
    nz = data[data != 0]
    lo, hi = np.percentile(nz if nz.size else data, [0.1, 99.9])
    return np.clip(data, lo, hi).astype(np.float32)


def _pyramid(moving: nib.Nifti1Image, fixed: nib.Nifti1Image, settings: SimpleITKSettings) -> list[_Level]:
    """Pyramid levels, coarse to fine, each built from the next finer one.

    A level whose grids would equal those of the next finer level (both images already coarser
    than its spacing) is dropped; the finer level keeps its sampling setting.
    """
    spec = sorted(zip(settings.level_spacings_mm, settings.samples_per_level), key=lambda t: t[0])
    levels: list[_Level] = []
    m_data, m_aff = _clip_intensities(np.asarray(moving.dataobj, np.float32)), moving.affine
    f_data, f_aff = _clip_intensities(np.asarray(fixed.dataobj, np.float32)), fixed.affine
    for spacing, samples in spec:
        new_m, new_m_aff = downsample_grid(m_data, m_aff, spacing)
        new_f, new_f_aff = downsample_grid(f_data, f_aff, spacing)
        same = (new_m.shape == m_data.shape and new_f.shape == f_data.shape
                and np.allclose(new_m_aff, m_aff) and np.allclose(new_f_aff, f_aff))
        if levels and same:
            continue
        m_data, m_aff, f_data, f_aff = new_m, new_m_aff, new_f, new_f_aff
        mask = ndimage.binary_dilation(foreground_mask(f_data), iterations=1)
        levels.append(_Level(
            spacing_mm=float(spacing),
            fixed=to_sitk(f_data, f_aff),
            moving=to_sitk(m_data, m_aff),
            fixed_mask=to_sitk(mask.astype(np.uint8), f_aff),
            mask_voxels=int(mask.sum()),
            moving_head_mm=voxel_points_mm(foreground_mask(m_data), m_aff),
            samples=int(samples),
        ))
    return levels[::-1]


def _method(level: _Level, samples: int, bins: int, seed: int, threads: int) -> sitk.ImageRegistrationMethod:
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=bins)
    fraction = 1.0 if samples <= 0 else min(1.0, samples / max(level.mask_voxels, 1))
    if fraction >= 1.0:
        reg.SetMetricSamplingStrategy(reg.NONE)
    else:
        reg.SetMetricSamplingStrategy(reg.RANDOM)
        reg.SetMetricSamplingPercentage(fraction, seed)
    reg.SetMetricFixedMask(level.fixed_mask)
    reg.SetInterpolator(sitk.sitkLinear)
    # The default moving-image gradient filter (recursive Gaussian on the whole image) gives
    # derivatives that disagree with the metric on thick-slice scans and sends gradient descent
    # uphill; central differences at the sample points are consistent with the linear interpolator.
    reg.SetMetricUseMovingImageGradientFilter(False)
    reg.SetMetricUseFixedImageGradientFilter(False)
    reg.SetNumberOfThreads(threads)
    return reg


def _sitk_transform_to_moving_to_fixed(tx: sitk.Transform) -> np.ndarray:
    return itk_to_moving_to_fixed(np.array(tx.GetMatrix()), tx.GetTranslation(), tx.GetCenter())


def _affine_from_moving_to_fixed(moving_to_fixed: np.ndarray, center_lps: Sequence[float]) -> sitk.AffineTransform:
    m, t = moving_to_fixed_to_itk(moving_to_fixed, center_lps)
    tx = sitk.AffineTransform(3)
    tx.SetCenter([float(x) for x in center_lps])
    tx.SetMatrix([float(x) for x in m.ravel()])
    tx.SetTranslation([float(x) for x in t])
    return tx


def _metric_value(level: _Level, moving_to_fixed: np.ndarray, bins: int, threads: int) -> float:
    """Negative Mattes MI over every fixed head voxel of ``level`` at ``moving_to_fixed``."""
    reg = _method(level, 0, bins, 0, threads)
    tx = _affine_from_moving_to_fixed(moving_to_fixed, (0.0, 0.0, 0.0))
    reg.SetInitialTransform(tx, inPlace=False)
    return float(reg.MetricEvaluate(level.fixed, level.moving))


def _head_overlap(level: _Level, moving_to_fixed: np.ndarray) -> float:
    """Fraction of the moving head's points (world mm) that ``moving_to_fixed`` puts in the fixed head mask."""
    points = level.moving_head_mm
    if not len(points):
        return 0.0
    mask = sitk.GetArrayFromImage(level.fixed_mask).transpose(2, 1, 0) > 0  # (x, y, z) voxel order
    affine = _sitk_affine_ras(level.fixed_mask)
    ijk = np.rint(apply_affine(np.linalg.inv(affine), apply_affine(moving_to_fixed, points))).astype(int)
    inside = np.all((ijk >= 0) & (ijk < np.array(mask.shape)), axis=1)
    hits = np.zeros(len(ijk), dtype=bool)
    hits[inside] = mask[tuple(ijk[inside].T)]
    return float(hits.mean())


def _sitk_affine_ras(image: sitk.Image) -> np.ndarray:
    """Voxel (i, j, k) -> RAS world mm affine of a SimpleITK image (which stores LPS geometry)."""
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    lps = np.eye(4)
    lps[:3, :3] = direction * np.asarray(image.GetSpacing(), dtype=float)
    lps[:3, 3] = image.GetOrigin()
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def _center_of_mass_lps(image: sitk.Image, mask: sitk.Image | None = None) -> np.ndarray:
    arr = sitk.GetArrayViewFromImage(image).astype(np.float64)  # (z, y, x)
    if mask is not None:
        arr = arr * (sitk.GetArrayViewFromImage(mask) > 0)
    arr = np.clip(arr, 0, None)
    com_zyx = np.array(ndimage.center_of_mass(arr))
    return np.array(image.TransformContinuousIndexToPhysicalPoint([float(x) for x in com_zyx[::-1]]))


def _optimise(
    level: _Level, tx: sitk.Transform, *, settings: SimpleITKSettings, threads: int, optimizer: str
) -> float:
    """Refine ``tx`` in place at one level with ``rsgd`` (regular-step gradient descent, for the
    coarse screening) or ``powell`` (for the final levels); returns the final metric value."""
    reg = _method(level, level.samples, settings.histogram_bins, settings.seed, threads)
    # With physical-shift scales, a unit step moves the farthest voxel by about one voxel.
    if optimizer == "rsgd":
        reg.SetOptimizerAsRegularStepGradientDescent(
            learningRate=1.0, minStep=0.005, numberOfIterations=settings.screen_iterations,
            relaxationFactor=0.6, gradientMagnitudeTolerance=1e-8,
        )
    elif optimizer == "powell":
        reg.SetOptimizerAsPowell(
            numberOfIterations=settings.powell_iterations,
            maximumLineIterations=settings.powell_line_iterations,
            stepLength=1.0, stepTolerance=settings.powell_step_tolerance, valueTolerance=1e-5,
        )
    else:
        raise ValueError(f"optimizer must be 'powell' or 'rsgd', got {optimizer!r}")
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetInitialTransform(tx, inPlace=True)
    reg.Execute(level.fixed, level.moving)
    log.debug("level %.1f mm: %s", level.spacing_mm, reg.GetOptimizerStopConditionDescription())
    return float(reg.GetMetricValue())


def _rotation_search(
    level: _Level,
    start: sitk.Euler3DTransform,
    *,
    search_deg: float,
    settings: SimpleITKSettings,
    threads: int,
) -> list[tuple[float, tuple[float, ...]]]:
    """Metric on a grid of rotations (±search_deg about each axis) around ``start``; best first."""
    steps = int(math.floor(search_deg / settings.search_step_deg + 1e-9)) if settings.search_step_deg > 0 else 0
    if steps == 0:
        return [(float("nan"), tuple(start.GetParameters()))]
    reg = _method(level, 0, settings.histogram_bins, settings.seed, threads)
    reg.SetOptimizerAsExhaustive([steps, steps, steps, 0, 0, 0], stepLength=math.radians(settings.search_step_deg))
    reg.SetOptimizerScales([1.0] * 6)
    tx = sitk.Euler3DTransform(start)
    reg.SetInitialTransform(tx, inPlace=True)
    seen: list[tuple[float, tuple[float, ...]]] = []
    reg.AddCommand(
        sitk.sitkIterationEvent,
        lambda: seen.append((float(reg.GetMetricValue()), tuple(reg.GetOptimizerPosition()))),
    )
    reg.Execute(level.fixed, level.moving)
    return sorted(seen, key=lambda s: s[0])


def _register_simpleitk(
    levels: list[_Level],
    *,
    dof: int,
    search_deg: float,
    settings: SimpleITKSettings,
    threads: int,
) -> tuple[np.ndarray, dict[str, object]]:
    """The SimpleITK engine on prepared pyramid levels; returns ``(moving_to_fixed, details)``."""
    t0 = time.perf_counter()
    coarse, judge = levels[0], levels[min(1, len(levels) - 1)]
    center = _center_of_mass_lps(coarse.fixed, coarse.fixed_mask)
    moments_shift = _center_of_mass_lps(coarse.moving) - center  # fixed->moving, LPS
    starts = {"header": np.zeros(3), "moments": moments_shift}
    candidates: list[tuple[str, tuple[float, ...]]] = []
    for name, shift in starts.items():
        tx = sitk.Euler3DTransform()
        tx.SetCenter([float(x) for x in center])
        tx.SetTranslation([float(x) for x in shift])
        candidates.append((name, tuple(tx.GetParameters())))
        for _, params in _rotation_search(
            coarse, tx, search_deg=search_deg, settings=settings, threads=threads
        )[: settings.search_keep]:
            if not any(np.allclose(params, c[1]) for c in candidates):
                candidates.append((f"{name}+search", params))
    # Each candidate is refined at the coarsest level and judged at the next finer one: the
    # coarsest level alone can prefer a wrong pose on thick-slice slabs.
    best: tuple[float, str, sitk.Euler3DTransform] | None = None
    for name, params in candidates:
        tx = sitk.Euler3DTransform()
        tx.SetCenter([float(x) for x in center])
        tx.SetParameters(params)
        _optimise(coarse, tx, settings=settings, threads=threads, optimizer="rsgd")
        value = _metric_value(judge, _sitk_transform_to_moving_to_fixed(tx), settings.histogram_bins, threads)
        if best is None or value < best[0]:
            best = (value, name, tx)
    assert best is not None
    rigid = best[2]
    trace: list[dict[str, object]] = []

    def record(stage: str, spacing: float, value: float) -> None:
        nonlocal t0
        now = time.perf_counter()
        trace.append({"stage": stage, "level_mm": spacing, "metric": value, "seconds": round(now - t0, 3)})
        t0 = now

    record("search+select", judge.spacing_mm, best[0])
    for level in levels[1:] or levels:
        value = _optimise(level, rigid, settings=settings, threads=threads, optimizer="powell")
        record("rigid", level.spacing_mm, value)
    moving_to_fixed = _sitk_transform_to_moving_to_fixed(rigid)
    if dof == 12:
        affine = _affine_from_moving_to_fixed(moving_to_fixed, center)
        for level in levels[-settings.affine_levels:] if settings.affine_levels > 0 else []:
            value = _optimise(level, affine, settings=settings, threads=threads, optimizer="powell")
            record("affine", level.spacing_mm, value)
        moving_to_fixed = _sitk_transform_to_moving_to_fixed(affine)
    details = {
        "initialisation": best[1],
        "search_candidates": len(candidates),
        "stages": trace,
        "threads": threads,
        "seed": settings.seed,
    }
    return moving_to_fixed, details


# ---------------------------------------------------------------------------------------------
# FLIRT engine
# ---------------------------------------------------------------------------------------------
def flirt_executable() -> Path | None:
    """``$FSLDIR/bin/flirt`` if it exists and is executable, else None."""
    fsldir = os.environ.get("FSLDIR")
    if not fsldir:
        return None
    exe = Path(fsldir) / "bin" / "flirt"
    return exe if exe.is_file() and os.access(exe, os.X_OK) else None


def _register_flirt(
    moving_path: Path, fixed_path: Path, *, dof: int, cost: str, search_deg: float, workdir: Path
) -> tuple[np.ndarray, dict[str, object]]:
    """Run FSL FLIRT through fslpy and read its matrix back as ``moving_to_fixed`` (RAS mm)."""
    from fsl.data.image import Image
    from fsl.transform.flirt import fromFlirt, readFlirt
    from fsl.wrappers import flirt as fsl_flirt

    omat = workdir / "moving_to_fixed.mat"
    s = float(search_deg)
    kwargs: dict[str, object] = {
        "omat": str(omat),
        "dof": int(dof),
        "cost": cost,
        "searchcost": cost,
    }
    if s > 0:
        kwargs.update(searchrx=(-s, s), searchry=(-s, s), searchrz=(-s, s))
    else:
        kwargs["nosearch"] = True
    try:
        fsl_flirt(str(moving_path), str(fixed_path), log={"tee": False}, **kwargs)
    except Exception as exc:  # fslpy raises RuntimeError / CalledProcessError / FileNotFoundError
        raise RegistrationError(
            f"FLIRT failed registering {moving_path} to {fixed_path}: {exc}. Check the images, "
            "or rerun with --engine simpleitk."
        ) from exc
    if not omat.is_file():
        raise RegistrationError(
            f"FLIRT wrote no matrix registering {moving_path} to {fixed_path}; rerun with "
            "--engine simpleitk or check the FSL installation."
        )
    flirt_mat = readFlirt(str(omat))
    src = Image(str(moving_path))
    ref = Image(str(fixed_path))
    moving_to_fixed = fromFlirt(flirt_mat, src, ref, from_="world", to="world")
    return np.asarray(moving_to_fixed, dtype=float), {"flirt": str(flirt_executable()), "flirt_mat": flirt_mat.tolist()}


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------
def choose_engine(engine: EngineName) -> str:
    """Resolve ``auto`` to ``flirt`` (``$FSLDIR/bin/flirt`` present) or ``simpleitk``; log the choice."""
    if engine not in ("auto", "flirt", "simpleitk"):
        raise ValueError(f"engine must be 'auto', 'flirt' or 'simpleitk', got {engine!r}")
    if engine == "flirt" and flirt_executable() is None:
        raise RegistrationError(
            "engine 'flirt' requested but $FSLDIR/bin/flirt was not found; install FSL and set "
            "FSLDIR, or use --engine simpleitk / auto."
        )
    if engine == "auto":
        chosen = "flirt" if flirt_executable() is not None else "simpleitk"
        log.info("registration engine: %s (auto: $FSLDIR/bin/flirt %s)", chosen,
                 "found" if chosen == "flirt" else "not found")
        return chosen
    log.info("registration engine: %s (requested)", engine)
    return engine


def header_alignment(moving: PathLike, fixed: PathLike, dof: int = 6) -> RegistrationResult:
    """The result of trusting the headers (``registration.engine: none``): the identity in world mm.

    For contrasts that are already co-registered (e.g. data distributed in a template space);
    they are then only resampled onto the reference grid (exactly, where the grids coincide).
    """
    return RegistrationResult(
        moving=str(moving), fixed=str(fixed), moving_to_fixed=np.eye(4), engine="none", dof=dof,
        cost_name="none", cost_before=float("nan"), cost_after=float("nan"), displacement_mm=0.0,
        seconds=0.0, details={"kept": "header"},
    )


def register(
    moving: PathLike,
    fixed: PathLike,
    *,
    dof: int = 6,
    engine: EngineName = "auto",
    cost: str = "corratio",
    search_deg: float = 30.0,
    max_displacement_mm: float = 60.0,
    threads: int = 2,
    settings: SimpleITKSettings | None = None,
) -> RegistrationResult:
    """Linearly register the NIfTI volume ``moving`` to ``fixed``.

    ``dof``: 6 (rigid, default) or 12 (affine).  ``engine``: ``flirt``, ``simpleitk`` or ``auto``
    (FLIRT if ``$FSLDIR/bin/flirt`` exists).  ``cost``: FLIRT's cost function (``corratio`` default,
    ``mutualinfo``, ``normmi``...); the SimpleITK engine always uses Mattes mutual information.
    ``search_deg``: rotations up to ± this many degrees about each axis are searched (0 = none).
    ``max_displacement_mm``: a result moving any moving-image brain voxel further than this is
    rejected.  ``threads``: CPU threads for SimpleITK.  ``settings``: SimpleITK engine tuning.

    Images that are already aligned are not a failure: the header alignment (identity) and the
    optimised transform are compared with the same cost (negative Mattes MI) on the finest
    pyramid level the optimiser used, and the better of the two is returned
    (``details["kept"]``: ``"optimised"`` or ``"header"``, logged).

    Raises :class:`RegistrationError` (naming the files) on unusable input or an implausible
    result: the displacement limit exceeded, a collapsed overlap (fewer than
    :data:`MIN_OVERLAP` of the moving head's voxels land in the fixed head), or a very low
    similarity (mutual information below :data:`MIN_MUTUAL_INFORMATION` nats).
    """
    t0 = time.perf_counter()
    if dof not in (6, 12):
        raise ValueError(f"dof must be 6 or 12, got {dof}")
    if engine == "flirt" or (engine == "auto" and flirt_executable() is not None):
        if cost not in FLIRT_COSTS:
            raise ValueError(f"cost must be one of {FLIRT_COSTS}, got {cost!r}")
    settings = settings or SimpleITKSettings()
    moving_path, fixed_path = Path(moving), Path(fixed)
    moving_img = load_volume(moving_path, "moving image")
    fixed_img = load_volume(fixed_path, "fixed image")
    chosen = choose_engine(engine)
    with _sitk_threads(threads):
        # FLIRT needs only the 3 mm level, for the engine-independent cost check.
        levels = _pyramid(moving_img, fixed_img, settings if chosen == "simpleitk" else
                          replace(settings, level_spacings_mm=(3.0,), samples_per_level=(0,)))
        # The finest level the optimiser used (FLIRT: the 3 mm level built for this check).
        check_level = levels[-1]
        bins = settings.histogram_bins
        identity = np.eye(4)
        cost_before = _metric_value(check_level, identity, bins, threads)
        try:
            if chosen == "flirt":
                with tempfile.TemporaryDirectory(prefix="rsanet-flirt-") as tmp:
                    moving_to_fixed, details = _register_flirt(
                        moving_path, fixed_path, dof=dof, cost=cost, search_deg=search_deg, workdir=Path(tmp)
                    )
            else:
                moving_to_fixed, details = _register_simpleitk(
                    levels, dof=dof, search_deg=search_deg,
                    settings=settings, threads=threads,
                )
            cost_optimised = _metric_value(check_level, moving_to_fixed, bins, threads)
        except RuntimeError as exc:
            if isinstance(exc, RegistrationError):
                raise
            raise RegistrationError(
                f"{chosen} registration of {moving_path} to {fixed_path} failed: {exc}. Check that "
                "both images show the same head and overlap in world space."
            ) from exc
    if not np.all(np.isfinite(moving_to_fixed)):
        raise RegistrationError(f"{chosen} registration of {moving_path} to {fixed_path} gave a non-finite matrix.")
    details = dict(details)
    if cost_optimised <= cost_before:
        details["kept"] = "optimised"
        cost_after = cost_optimised
    else:  # already aligned better than the optimiser's result: keep the header alignment
        log.info("%s -> %s: kept the header alignment (cost %.4f) over the optimised transform (%.4f) "
                 "on the %.1f mm level", moving_path.name, fixed_path.name, cost_before, cost_optimised,
                 check_level.spacing_mm)
        details["kept"] = "header"
        details["cost_optimised"] = cost_optimised
        moving_to_fixed, cost_after = identity, cost_before
    details["check_level_mm"] = check_level.spacing_mm
    brain = check_level.moving_head_mm
    moved = float(displacement_mm(moving_to_fixed, identity, brain).max()) if len(brain) else 0.0
    if moved > max_displacement_mm:
        raise RegistrationError(
            f"{chosen} registration of {moving_path} to {fixed_path} failed: the result moves the "
            f"brain by up to {moved:.1f} mm (limit {max_displacement_mm:.1f} mm). Check the image "
            "headers, or raise max_displacement_mm if such a motion is genuine."
        )
    overlap = _head_overlap(check_level, moving_to_fixed)
    details["head_overlap"] = overlap
    if overlap < MIN_OVERLAP:
        raise RegistrationError(
            f"{chosen} registration of {moving_path} to {fixed_path} failed: only {100 * overlap:.0f} % of the "
            f"moving head lands inside the fixed head (minimum {100 * MIN_OVERLAP:.0f} %). Check that both "
            "images show the same head and that their fields of view overlap."
        )
    if -cost_after < MIN_MUTUAL_INFORMATION:
        raise RegistrationError(
            f"{chosen} registration of {moving_path} to {fixed_path} failed: mutual information "
            f"{-cost_after:.3f} nats is below {MIN_MUTUAL_INFORMATION} (the images hardly share structure). "
            "Check that both files are scans of the same head."
        )
    seconds = time.perf_counter() - t0
    log.info("registered %s -> %s with %s (%d dof) in %.1f s; cost %.4f -> %.4f; max shift %.1f mm",
             moving_path.name, fixed_path.name, chosen, dof, seconds, cost_before, cost_after, moved)
    return RegistrationResult(
        moving=str(moving_path),
        fixed=str(fixed_path),
        moving_to_fixed=moving_to_fixed,
        engine=chosen,
        dof=dof,
        cost_name="neg_mattes_mi",
        cost_before=cost_before,
        cost_after=cost_after,
        displacement_mm=moved,
        seconds=seconds,
        details=details,
    )


# ---------------------------------------------------------------------------------------------
# Transform files
# ---------------------------------------------------------------------------------------------
def itk_transform_text(moving_to_fixed: np.ndarray, center_lps: Sequence[float] = (0.0, 0.0, 0.0)) -> str:
    """ITK ``AffineTransform_double_3_3`` text (fixed LPS -> moving LPS) for ``moving_to_fixed``."""
    m, t = moving_to_fixed_to_itk(moving_to_fixed, center_lps)
    params = " ".join(f"{x:.17g}" for x in list(m.ravel()) + list(t))
    fixed_params = " ".join(f"{x:.17g}" for x in center_lps)
    return (
        "#Insight Transform File V1.0\n#Transform 0\nTransform: AffineTransform_double_3_3\n"
        f"Parameters: {params}\nFixedParameters: {fixed_params}\n"
    )


def read_itk_transform(path: PathLike) -> np.ndarray:
    """Read a 3D affine ITK transform file (``AffineTransform``, ``MatrixOffsetTransformBase``,
    ``Euler3DTransform``...; fixed LPS -> moving LPS) and return it as ``moving_to_fixed`` (RAS mm).

    The matrix is recovered by mapping probe points through the transform, so any affine ITK type
    (also one wrapped in a composite) is read the same way; a non-affine one is rejected.
    """
    try:
        tx = sitk.ReadTransform(str(path))
    except RuntimeError as exc:
        raise RegistrationError(f"{path}: cannot be read as an ITK transform ({exc}).") from exc
    probes = np.array([[0, 0, 0], [100, 0, 0], [0, 100, 0], [0, 0, 100], [37, -61, 23]], dtype=float)
    mapped = np.array([tx.TransformPoint([float(x) for x in q]) for q in probes])
    fixed_to_moving_lps = np.eye(4)
    fixed_to_moving_lps[:3, :3] = (mapped[1:4] - mapped[0]).T / 100.0
    fixed_to_moving_lps[:3, 3] = mapped[0]
    if not np.allclose(apply_affine(fixed_to_moving_lps, probes[4:]), mapped[4:], atol=1e-6):
        raise RegistrationError(f"{path}: not an affine transform ({tx.GetName()}).")
    return np.linalg.inv(RAS_TO_LPS @ fixed_to_moving_lps @ RAS_TO_LPS)


def flirt_matrix(moving_to_fixed: np.ndarray, moving: PathLike, fixed: PathLike) -> np.ndarray:
    """The FLIRT matrix (input = ``moving``, reference = ``fixed``) equivalent to ``moving_to_fixed``."""
    from fsl.data.image import Image
    from fsl.transform.flirt import toFlirt

    src = Image(str(moving))
    ref = Image(str(fixed))
    return np.asarray(toFlirt(np.asarray(moving_to_fixed, float), src, ref, from_="world", to="world"))


@contextlib.contextmanager
def staged_outputs(paths: Sequence[PathLike]) -> Iterator[list[Path]]:
    """Yield temporary paths (same folder and suffixes) for ``paths``; move them all into place only
    if the block succeeds, so a failure leaves none of the outputs behind."""
    final = [Path(p) for p in paths]
    temps: list[Path] = []
    try:
        for p in final:
            p.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix="".join(p.suffixes), dir=p.parent)
            os.close(fd)
            temps.append(Path(tmp))
        yield temps
        for tmp, p in zip(temps, final):
            os.replace(tmp, p)
    finally:
        for tmp in temps:
            tmp.unlink(missing_ok=True)


def image_center_lps(img: nib.Nifti1Image) -> np.ndarray:
    """Physical (LPS, mm) centre of an image's voxel grid: the centre written into ITK files."""
    center_vox = (np.array(img.shape[:3], dtype=float) - 1.0) / 2.0
    return (RAS_TO_LPS @ img.affine @ np.append(center_vox, 1.0))[:3]


def write_transforms(
    result: RegistrationResult | np.ndarray,
    moving: PathLike,
    fixed: PathLike,
    flirt_mat_path: PathLike,
    itk_path: PathLike,
) -> None:
    """Write ``moving_to_fixed`` (a result or a 4×4 array) as a FLIRT ``.mat`` (input ``moving``,
    reference ``fixed``, via ``fsl.transform.flirt.toFlirt``) and as an ITK text transform (fixed
    LPS -> moving LPS, centred at the fixed grid's centre); both or neither are written."""
    m2f = result.moving_to_fixed if isinstance(result, RegistrationResult) else np.asarray(result, float)
    mat, itk_text = _transform_files(m2f, moving, fixed)
    with staged_outputs([flirt_mat_path, itk_path]) as (tmp_mat, tmp_itk):
        np.savetxt(tmp_mat, mat, fmt="%1.15g")
        tmp_itk.write_text(itk_text)


def _transform_files(moving_to_fixed: np.ndarray, moving: PathLike, fixed: PathLike) -> tuple[np.ndarray, str]:
    """Contents of the FLIRT matrix and the ITK text file for ``moving_to_fixed``."""
    itk_text = itk_transform_text(moving_to_fixed, image_center_lps(nib.load(str(fixed))))
    return flirt_matrix(moving_to_fixed, moving, fixed), itk_text


# ---------------------------------------------------------------------------------------------
# QC figure
# ---------------------------------------------------------------------------------------------
def _edges(data: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """Gradient magnitude (per mm) of a lightly smoothed volume."""
    smooth = ndimage.gaussian_filter(data.astype(np.float32), sigma=1.0 / spacing)
    grads = np.gradient(smooth, *spacing)
    return np.sqrt(sum(g * g for g in grads))


def registration_qc_figure(
    fixed: nib.Nifti1Image | PathLike,
    registered: Mapping[str, nib.Nifti1Image | PathLike],
    out_png: PathLike,
    *,
    title: str | None = None,
) -> Path:
    """Save a PNG with the fixed image on axial, coronal and sagittal slices through the brain
    centre and, over it, the strongest edges of each registered contrast (one colour each).

    All ``registered`` images must lie on the fixed grid (output of :func:`resample_to_fixed`).
    """
    from matplotlib.figure import Figure  # no pyplot: no global backend state, Agg for PNG

    fixed_img = nib.as_closest_canonical(fixed if isinstance(fixed, nib.Nifti1Image) else nib.load(str(fixed)))
    f = np.asarray(fixed_img.dataobj, dtype=np.float32)
    spacing = np.linalg.norm(fixed_img.affine[:3, :3], axis=0)
    mask = foreground_mask(f)
    center = np.round(ndimage.center_of_mass(mask)).astype(int) if mask.any() else np.array(f.shape) // 2
    lo, hi = np.percentile(f[mask] if mask.any() else f, [1, 99.5])
    colors = ["#ff3b30", "#34c759", "#0a84ff", "#ffcc00", "#bf5af2"]
    views = [("axial", 2), ("coronal", 1), ("sagittal", 0)]
    fig = Figure(figsize=(12, 4.4), facecolor="black")
    axes = fig.subplots(1, 3)
    for ax, (name, axis) in zip(axes, views):
        sl = [slice(None)] * 3
        sl[axis] = int(center[axis])
        keep = [a for a in range(3) if a != axis]
        extent = (0, f.shape[keep[0]] * spacing[keep[0]], 0, f.shape[keep[1]] * spacing[keep[1]])
        ax.imshow(f[tuple(sl)].T, cmap="gray", vmin=lo, vmax=hi, origin="lower", extent=extent,
                  interpolation="nearest")
        for (label, img), color in zip(registered.items(), colors):
            im = img if isinstance(img, nib.Nifti1Image) else nib.load(str(img))
            im = nib.as_closest_canonical(im)
            r = np.asarray(im.dataobj, dtype=np.float32)
            if r.shape[:3] != f.shape:
                raise ValueError(f"QC: {label} is not on the fixed grid ({r.shape} vs {f.shape})")
            e = _edges(r, spacing)[tuple(sl)].T
            level = np.percentile(e[e > 0], 90) if np.any(e > 0) else 1.0
            ax.contour(e, levels=[level], colors=[color], linewidths=0.6, origin="lower", extent=extent)
            if axis == 2:
                ax.plot([], [], color=color, label=label)
        ax.set_title(f"{name} slice {int(center[axis])}", color="white", fontsize=9)
        ax.set_axis_off()
        ax.set_aspect("equal")
    handles = axes[0].get_legend_handles_labels()
    if handles[0]:
        axes[0].legend(loc="lower left", fontsize=7, framealpha=0.6)
    if title:
        fig.suptitle(title, color="white", fontsize=10)
    fig.tight_layout()
    out = Path(out_png)
    with staged_outputs([out]) as (tmp,):
        fig.savefig(tmp, dpi=110, facecolor="black")
    return out


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rsanet-register",
        description="Linearly register MOVING to FIXED (FSL FLIRT if $FSLDIR/bin/flirt exists, "
        "else SimpleITK); write the resampled image and the transform as FLIRT .mat and ITK text.",
    )
    p.add_argument("moving", help="moving NIfTI volume (e.g. T1 or T2)")
    p.add_argument("fixed", help="fixed/reference NIfTI volume (e.g. FLAIR)")
    p.add_argument("--out-image", required=True, help="moving image resampled onto the fixed grid (.nii.gz)")
    p.add_argument("--out-mat", required=True, help="FLIRT matrix (moving = -in, fixed = -ref)")
    p.add_argument("--out-itk", required=True, help="ITK text transform (fixed LPS -> moving LPS)")
    p.add_argument("--out-json", help="optional JSON record: engine, dof, costs, matrix, timing")
    p.add_argument("--dof", type=int, choices=(6, 12), default=6)
    p.add_argument("--engine", choices=("auto", "flirt", "simpleitk"), default="auto")
    p.add_argument("--cost", choices=FLIRT_COSTS, default="corratio", help="FLIRT cost (SimpleITK: Mattes MI)")
    p.add_argument("--interpolation", choices=("linear", "nearest"), default="linear")
    p.add_argument("--search-deg", type=float, default=30.0, help="rotation search range ± degrees")
    p.add_argument("--max-displacement-mm", type=float, default=60.0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("-q", "--quiet", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Console script ``rsanet-register``; exit code 0 on success, 2 on a registration error."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        result = register(
            args.moving, args.fixed, dof=args.dof, engine=args.engine, cost=args.cost,
            search_deg=args.search_deg, max_displacement_mm=args.max_displacement_mm, threads=args.threads,
        )
        # nibabel's own loading keeps the moving dtype (for --interpolation nearest).
        out_img = resample_to_fixed(nib.load(args.moving), nib.load(args.fixed), result.moving_to_fixed,
                                    args.interpolation)
        mat, itk_text = _transform_files(result.moving_to_fixed, args.moving, args.fixed)
        outputs = [args.out_image, args.out_mat, args.out_itk] + ([args.out_json] if args.out_json else [])
        with staged_outputs(outputs) as temps:
            nib.save(out_img, str(temps[0]))
            np.savetxt(temps[1], mat, fmt="%1.15g")
            temps[2].write_text(itk_text)
            if args.out_json:
                temps[3].write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    except RegistrationError as exc:
        print(f"rsanet-register: error: {exc}", file=sys.stderr)
        return 2
    print(f"rsanet-register: {Path(args.moving).name} -> {Path(args.fixed).name}: engine={result.engine} "
          f"dof={result.dof} cost {result.cost_before:.4f} -> {result.cost_after:.4f} "
          f"({result.seconds:.1f} s)")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
