"""The SimpleITK engine: Mattes mutual information on a Gaussian pyramid, a coarse rotation search, Powell refinement."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass
from typing import Iterator, Sequence

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from .core import (
    RAS_TO_LPS,
    SimpleITKSettings,
)
from .images import (
    downsample_grid,
    foreground_mask,
    voxel_points_mm,
)
from .transforms import (
    apply_affine,
    itk_to_moving_to_fixed,
    moving_to_fixed_to_itk,
)

log = logging.getLogger("rsanet.registration")


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


