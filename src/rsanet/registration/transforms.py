"""Rigid and affine transforms in RAS world millimetres, their ITK and FLIRT forms, and transform files.

The conventions are fixed in the package docstring (:mod:`rsanet.registration`)."""

from __future__ import annotations

import logging
import math
from typing import Sequence

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from ..files import staged
from .core import (
    RAS_TO_LPS,
    PathLike,
    RegistrationError,
    RegistrationResult,
)

log = logging.getLogger("rsanet.registration")


# ---------------------------------------------------------------------------------------------
# Pure maths: conventions, rigid matrices, displacements, Otsu
# ---------------------------------------------------------------------------------------------
def rotation_from_euler_deg(angles_deg: Sequence[float]) -> np.ndarray:
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
    r = rotation_from_euler_deg(angles_deg)
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
    with staged([flirt_mat_path, itk_path]) as (tmp_mat, tmp_itk):
        np.savetxt(tmp_mat, mat, fmt="%1.15g")
        tmp_itk.write_text(itk_text)


def _transform_files(moving_to_fixed: np.ndarray, moving: PathLike, fixed: PathLike) -> tuple[np.ndarray, str]:
    """Contents of the FLIRT matrix and the ITK text file for ``moving_to_fixed``."""
    itk_text = itk_transform_text(moving_to_fixed, image_center_lps(nib.load(str(fixed))))
    return flirt_matrix(moving_to_fixed, moving, fixed), itk_text


