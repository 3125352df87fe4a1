"""The embedded demo cohort: synthetic T1/T2/FLAIR scans with real MS lesion masks.

Everything is made from data that ships with the installed packages, so nothing is downloaded:

* anatomy: the ICBM 2009a MNI152 grey- and white-matter probability maps and brain mask inside
  nilearn's wheel (``nilearn.datasets.load_mni152_{gm,wm}_template``, ``load_mni152_brain_mask``);
  CSF is the brain mask minus GM and WM;
* lesions: the consensus lesion masks of 30 MS patients in MNI space shipped in
  ``rsanet/data/lesion_masks_mni`` (CC-BY, Lesjak et al., Neuroinformatics 16:51-63 (2018),
  doi:10.1007/s12021-017-9348-7; see the README and LICENSE there).

Subject ``index`` (0-based; subject id ``demo-{index + 1:03d}``) uses the lesion mask
``DEMO_PATIENTS[index]`` for the first 27 subjects: all masks but those of the three external
test patients 07, 19 and 26 (:data:`EXTERNAL_TEST_PATIENTS`), which the demo never uses. Every
further subject gets a lesion *collage* of its own (:func:`lesion_sources`): each lesion of each
of the 27 masks, mirrored left-right or not (one draw per mask), may be taken (small lesions
only, each by one collage at most), so no two subjects share a lesion layout, mirrored or not (``tests/test_demo.py`` measures it against the splits). Each subject
gets its own head pose, global size jitter and smooth random deformation (applied to anatomy and
lesions alike), its own tissue intensities per contrast, and each contrast is "acquired" on its
own anisotropic grid (thick axial slices) with its own rigid head motion relative to the FLAIR,
a smooth multiplicative bias field and Rician noise. Everything is drawn from random generators
seeded by ``(config.seed, index, purpose)`` alone, so a subject can be generated in its own job
and the same seed always gives a bit-identical cohort.

Conventions
-----------
* Images are written in RAS+ voxel order (``x`` = left→right, ``y`` = posterior→anterior,
  ``z`` = inferior→superior, axial slices along ``z``), ``int16`` intensities in arbitrary units
  (roughly 0-1500, 0 outside the brain: skull-stripped like the paper's data); ``lesions.nii.gz``
  is ``uint8`` 0/1 on the FLAIR grid.
* ``truth.json`` records, for T1 and T2, ``moving_to_fixed``: the 4×4 affine in RAS world
  millimetres mapping a point of that scan's world space to the same anatomical point of the
  FLAIR's world space (the convention of :mod:`rsanet.registration`). The scan headers are
  axis-aligned and centred on the same point, so this head motion is invisible to the headers and
  has to be recovered by co-registration.
* ``subjects.tsv`` (columns ``subject, t1, t2, flair, lesions``) holds paths relative to the
  folder of the sheet itself (``demo-001/T1.nii.gz`` …) unless ``absolute_paths=True``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import time
import zlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

from .files import staged
from .volumes import CONTRASTS

if TYPE_CHECKING:
    import pandas as pd  # the cohort sheet; imported where used, so one subject's job skips it

__all__ = [
    "CONTRASTS",
    "N_LESION_MASKS",
    "DEMO_PATIENTS",
    "EXTERNAL_TEST_PATIENTS",
    "DemoConfig",
    "Anatomy",
    "lesion_mask_files",
    "lesion_sources",
    "lesion_template",
    "load_anatomy",
    "mni152_maps",
    "make_cohort",
    "make_subject",
    "rotation_from_rotvec",
    "subject_id",
    "subject_sheet",
    "tissue_means",
    "write_attribution",
    "write_subject",
    "write_subject_sheet",
    "REFERENCE",
    "SHEET_COLUMNS",
    "SUBJECT_FILES",
    "main",
]

REFERENCE = "FLAIR"
"""The contrast whose grid and world space the lesion mask and the true transforms refer to."""

N_LESION_MASKS = 30
"""Number of real lesion masks shipped in ``rsanet/data/lesion_masks_mni``."""
#: The open_ms_data patients whose complete scans (``patients_mni/patient07, 19, 26``) are the
#: external test set (docs/external_test.md): their masks are kept out of the demo cohort.
EXTERNAL_TEST_PATIENTS: tuple[int, ...] = (7, 19, 26)
#: The masks the demo cohort is built from (1-based patient numbers).
DEMO_PATIENTS: tuple[int, ...] = tuple(p for p in range(1, N_LESION_MASKS + 1) if p not in EXTERNAL_TEST_PATIENTS)

LESION_PACKAGE = "rsanet"
LESION_FOLDER = "lesion_masks_mni"

# Mean intensity per tissue and contrast, relative to the brightest tissue of that contrast
# (partial-volume voxels mix these linearly). T1: WM > GM > CSF, lesions hypointense ("black
# holes" between GM and CSF). T2: CSF brightest, lesions bright, WM darkest. FLAIR: CSF
# suppressed (dark), lesions brightest, GM brighter than WM.
_TISSUE_MEANS: dict[str, dict[str, float]] = {
    "T1": {"csf": 0.22, "gm": 0.62, "wm": 1.00, "lesion": 0.42},
    "T2": {"csf": 1.00, "gm": 0.58, "wm": 0.40, "lesion": 0.82},
    "FLAIR": {"csf": 0.12, "gm": 0.62, "wm": 0.48, "lesion": 1.00},
}
_OUTPUT_SCALE = 1000.0  # intensity of the brightest tissue, before jitter and bias
_BRAIN_THRESHOLD = 0.5  # brain fraction above which a scan voxel is foreground
_LESION_THRESHOLD = 0.5  # lesion fraction above which a FLAIR voxel is labelled lesion
_DISPLACEMENT_STEP_MM = 6.0  # grid step of the smooth displacement field after upsampling


@dataclass(frozen=True)
class DemoConfig:
    """How the demo cohort is synthesised (all lengths in millimetres, angles in degrees).

    Attributes:
        n_subjects: number of subjects (the paper had 43).
        seed: master seed; subject ``i`` depends on ``(seed, i)`` only.
        flair_spacing_mm, t1_spacing_mm, t2_spacing_mm: voxel size ``(x, y, z)`` of each
            contrast's acquisition grid before ``grid_scale``; ``z`` is the slice thickness
            (slices are contiguous, thickness = spacing).
        grid_scale: multiplies the in-plane ``(x, y)`` spacings of all contrasts (slice
            thickness unchanged): 1.0 gives the paper-like 0.7×0.7×3.0 mm grid, 2.0 the CPU demo's
            1.4×1.4×3.0 mm.
        fov_mm: field of view ``(x, y, z)`` of every acquisition, centred on the brain.
        max_rotation_deg, max_translation_mm: upper bounds of the rigid head motion of T1 and T2
            relative to FLAIR (rotation angle about a random axis through the brain centre, and
            length of a random translation; both drawn uniformly in ``[0, max]``).
        head_pose_deg, head_pose_mm: same for the pose of the subject's head in the FLAIR
            scanner relative to MNI space.
        size_jitter: global head-size factor drawn uniformly in ``[1 - j, 1 + j]`` (plus a third
            of that independently per axis).
        deformation_mm: standard deviation of each component of the smooth random displacement
            field at its control points.
        deformation_spacing_mm: control-point spacing of that field (larger = smoother).
        intensity_jitter: relative standard deviation of the per-subject tissue intensities.
        lesion_heterogeneity: lesions keep between ``1 - h`` and all of their contrast to the
            surrounding tissue, varying smoothly across and within lesions (some lesions are
            faint); on T1 the kept fraction is squared (many T2 lesions are nearly T1-isointense).
        bias_strength: amplitude of the log bias field (0.15 gives roughly ±15 % shading).
        noise_level: Rician noise standard deviation relative to the brightest tissue.
    """

    n_subjects: int = 43
    seed: int = 0
    flair_spacing_mm: tuple[float, float, float] = (0.7, 0.7, 3.0)
    t1_spacing_mm: tuple[float, float, float] = (0.75, 0.75, 3.0)
    t2_spacing_mm: tuple[float, float, float] = (0.65, 0.65, 3.3)
    grid_scale: float = 1.0
    fov_mm: tuple[float, float, float] = (180.0, 224.0, 162.0)
    max_rotation_deg: float = 8.0
    max_translation_mm: float = 8.0
    head_pose_deg: float = 4.0
    head_pose_mm: float = 4.0
    size_jitter: float = 0.06
    deformation_mm: float = 2.5
    deformation_spacing_mm: float = 40.0
    intensity_jitter: float = 0.05
    lesion_heterogeneity: float = 0.6
    bias_strength: float = 0.15
    noise_level: float = 0.03

    def __post_init__(self) -> None:
        if self.n_subjects < 1:
            raise ValueError(f"n_subjects must be >= 1, got {self.n_subjects}")
        for name in ("flair_spacing_mm", "t1_spacing_mm", "t2_spacing_mm", "fov_mm"):
            value = tuple(float(v) for v in getattr(self, name))
            if len(value) != 3 or min(value) <= 0:
                raise ValueError(f"{name} must be three positive numbers, got {value}")
            object.__setattr__(self, name, value)
        if self.grid_scale <= 0:
            raise ValueError(f"grid_scale must be positive, got {self.grid_scale}")
        for name in (
            "max_rotation_deg", "max_translation_mm", "head_pose_deg", "head_pose_mm",
            "deformation_mm", "intensity_jitter", "bias_strength", "noise_level",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.lesion_heterogeneity <= 1:
            raise ValueError(
                f"lesion_heterogeneity must be in [0, 1], got {self.lesion_heterogeneity}")
        if not 0 <= self.size_jitter < 0.5:
            raise ValueError(f"size_jitter must be in [0, 0.5), got {self.size_jitter}")
        if self.deformation_spacing_mm <= 0:
            raise ValueError("deformation_spacing_mm must be positive")

    def spacing(self, contrast: str) -> tuple[float, float, float]:
        """Voxel size ``(x, y, z)`` in mm of ``contrast``'s grid, ``grid_scale`` applied."""
        base = {"FLAIR": self.flair_spacing_mm, "T1": self.t1_spacing_mm,
                "T2": self.t2_spacing_mm}[_check_contrast(contrast)]
        return (base[0] * self.grid_scale, base[1] * self.grid_scale, base[2])

    def shape(self, contrast: str) -> tuple[int, int, int]:
        """Voxel array shape ``(nx, ny, nz)`` of ``contrast``'s grid: FOV / spacing, rounded."""
        return tuple(  # type: ignore[return-value]
            max(1, int(round(f / s))) for f, s in zip(self.fov_mm, self.spacing(contrast))
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict of all fields."""
        return {k: list(v) if isinstance(v, tuple) else v
                for k, v in dataclasses.asdict(self).items()}


def _check_contrast(contrast: str) -> str:
    if contrast not in CONTRASTS:
        raise ValueError(f"unknown contrast {contrast!r}; expected one of {CONTRASTS}")
    return contrast


# ---------------------------------------------------------------------------------------------
# Pure helpers: naming, random streams, geometry
# ---------------------------------------------------------------------------------------------
def subject_id(index: int) -> str:
    """Subject id of 0-based ``index``: ``demo-001`` for 0, ``demo-043`` for 42."""
    if index < 0:
        raise ValueError(f"subject index must be >= 0, got {index}")
    return f"demo-{index + 1:03d}"


#: A collage takes no lesion larger than this share of its source mask's lesion volume.
_MAX_COLLAGE_SHARE = 0.1
#: Expected number of patients' worth of (small) lesions a collage takes.
_COLLAGE_TAKE = 2.0


def lesion_sources(index: int, seed: int) -> list[dict[str, Any]]:
    """Where the lesions of subject ``index`` come from, for cohort seed ``seed``.

    Only the masks of :data:`DEMO_PATIENTS` are used: the masks of
    :data:`EXTERNAL_TEST_PATIENTS` (the open_ms_data patients whose complete scans are the
    external test) never enter the demo cohort, whole or in pieces.

    The first ``len(DEMO_PATIENTS)`` subjects use one real mask each, as it is:
    ``[{"patient": DEMO_PATIENTS[index], "flip_lr": False, "components": None}]`` (``None``: all
    lesions). Every further subject is a collage: for each demo mask a seeded draw decides
    whether it is mirrored left-right, and each of its lesions (26-connected components on the
    template grid) is taken with probability ``2 / len(DEMO_PATIENTS)`` unless it holds more than
    10 % of that mask's lesion volume (it would carry the patient's layout along) or an earlier
    collage already took it (mirrored the same way): no lesion appears in two collages, so two
    collages share no lesion layout. A collage holds about a typical patient's lesion load spread
    over many patients' lesions. Returned as one entry per mask that contributes,
    ``components`` listing the chosen component labels (1-based, in
    :func:`scipy.ndimage.label` order).
    """
    if index < 0:
        raise ValueError(f"subject index must be >= 0, got {index}")
    if index < len(DEMO_PATIENTS):
        return [{"patient": DEMO_PATIENTS[index], "flip_lr": False, "components": None}]
    return [dict(src, components=list(src["components"])) for src in _collages(seed, index)[-1]]


@functools.lru_cache(maxsize=None)
def _collages(seed: int, last: int) -> tuple[tuple[dict[str, Any], ...], ...]:
    """The lesion sources of collage subjects ``len(DEMO_PATIENTS) .. last``, drawn in index order:
    each collage draws from the lesions that no earlier collage took (see :func:`lesion_sources`)."""
    first = len(DEMO_PATIENTS)
    earlier = _collages(seed, last - 1) if last > first else ()
    taken_before: set[tuple[int, bool, int]] = {
        (src["patient"], src["flip_lr"], c) for collage in earlier for src in collage for c in src["components"]
    }
    rng = _rng(seed, last, "lesion-collage")
    sources = []
    for patient in DEMO_PATIENTS:
        flip = bool(rng.random() < 0.5)
        labels, n = _lesion_components(patient, flip)
        taken = rng.random(n) < _COLLAGE_TAKE / len(DEMO_PATIENTS)
        sizes = _component_sizes(patient, flip)
        free = np.array([(patient, flip, c) not in taken_before for c in range(1, n + 1)], dtype=bool)
        # a lesion holding much of its patient's load would carry that patient's layout along
        chosen = np.flatnonzero(taken & free & (sizes <= _MAX_COLLAGE_SHARE * sizes.sum())) + 1
        if len(chosen):
            sources.append({"patient": patient, "flip_lr": flip, "components": tuple(int(c) for c in chosen)})
    return earlier + (tuple(sources),)


def lesion_template(index: int, seed: int) -> np.ndarray:
    """Lesion mask of subject ``index`` on the cropped template grid (float32 0/1, read-only),
    made from :func:`lesion_sources`."""
    out = np.zeros(load_anatomy().brain.shape, dtype=np.float32)
    for src in lesion_sources(index, seed):
        if src["components"] is None:
            out = np.maximum(out, _lesion_on_template(src["patient"], src["flip_lr"]))
        else:
            labels = _lesion_components(src["patient"], src["flip_lr"])[0]
            out[np.isin(labels, src["components"])] = 1.0
    out.setflags(write=False)
    return out


def tissue_means() -> dict[str, dict[str, float]]:
    """Nominal relative tissue intensities ``{contrast: {csf, gm, wm, lesion}}`` (a copy)."""
    return {c: dict(m) for c, m in _TISSUE_MEANS.items()}


def _rng(seed: int, index: int, purpose: str) -> np.random.Generator:
    """Independent, platform-stable random stream for one purpose of one subject."""
    return np.random.default_rng([seed, index, zlib.crc32(purpose.encode())])


def rotation_from_rotvec(rotvec_rad: Sequence[float]) -> np.ndarray:
    """3×3 rotation matrix of a rotation vector (axis × angle in radians; Rodrigues)."""
    r = np.asarray(rotvec_rad, dtype=float)
    angle = float(np.linalg.norm(r))
    if angle == 0.0:
        return np.eye(3)
    k = r / angle
    kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + np.sin(angle) * kx + (1 - np.cos(angle)) * kx @ kx


def _random_rigid(rng: np.random.Generator, max_deg: float, max_mm: float,
                  centre: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
    """Random rigid 4×4 affine (rotation about ``centre``) and its parameters.

    The four uniform draws are made whatever the bounds, so a zero bound changes nothing else.
    """
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    angle_deg = rng.uniform(0.0, 1.0) * max_deg
    direction = rng.normal(size=3)
    direction /= np.linalg.norm(direction)
    shift = direction * rng.uniform(0.0, 1.0) * max_mm
    rot = rotation_from_rotvec(axis * np.deg2rad(angle_deg))
    aff = np.eye(4)
    aff[:3, :3] = rot
    aff[:3, 3] = centre - rot @ centre + shift
    params = {"rotation_axis": axis.tolist(), "rotation_deg": float(angle_deg),
              "translation_mm": shift.tolist(), "centre_mm": np.asarray(centre).tolist()}
    return aff, params


def _grid_affine(shape: Sequence[int], spacing: Sequence[float], centre: np.ndarray) -> np.ndarray:
    """Axis-aligned RAS voxel-to-world affine of a grid whose centre lies at ``centre`` (mm)."""
    aff = np.diag([*map(float, spacing), 1.0])
    aff[:3, 3] = np.asarray(centre) - aff[:3, :3] @ ((np.asarray(shape) - 1) / 2.0)
    return aff


def _box_kernel(width: float) -> np.ndarray:
    """1-D weights of a box of ``width`` voxels sampled on a unit grid (sums to 1)."""
    if width <= 1.0:
        return np.ones(1)
    half = width / 2.0
    n = int(np.ceil(half - 0.5))
    k = np.arange(-n, n + 1, dtype=float)
    w = np.clip(np.minimum(k + 0.5, half) - np.maximum(k - 0.5, -half), 0.0, None)
    return w / w.sum()


def _acquisition_blur(vol: np.ndarray, voxel: Sequence[float]) -> np.ndarray:
    """Average ``vol`` (on a 1 mm grid) over a box the size of an acquisition voxel.

    ``voxel`` is the acquisition voxel size expressed in source voxels along each array axis;
    for thick slices this is the slice-profile averaging (approximate under the small rotations
    between scanner and template axes).
    """
    out = vol
    for axis, width in enumerate(voxel):
        kernel = _box_kernel(width)
        if kernel.size > 1:
            out = ndi.correlate1d(out, kernel, axis=axis, mode="constant")
    return out


def _bias_field(rng: np.random.Generator, shape: Sequence[int], strength: float) -> np.ndarray:
    """Smooth positive multiplicative field ``exp(strength * P(x, y, z))``, float32 ``shape``.

    ``P`` is a random second-order polynomial of the normalised scanner coordinates in
    ``[-1, 1]`` with unit-variance coefficients divided by the number of terms' square root.
    """
    axes = [np.linspace(-1.0, 1.0, n, dtype=np.float32) for n in shape]
    x = axes[0][:, None, None]
    y = axes[1][None, :, None]
    z = axes[2][None, None, :]
    terms = [x, y, z, x * x - 1 / 3, y * y - 1 / 3, z * z - 1 / 3, x * y, x * z, y * z]
    coef = rng.normal(size=len(terms)) / np.sqrt(len(terms))
    log_field = np.zeros(tuple(shape), dtype=np.float32)
    for c, t in zip(coef, terms):
        log_field += np.float32(c * strength) * t
    return np.exp(log_field)


# ---------------------------------------------------------------------------------------------
# Shipped inputs (cached): template anatomy and lesion masks
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Anatomy:
    """Template tissue maps on a cropped 1 mm MNI grid.

    Attributes:
        csf, gm, wm: probability maps, float32 ``(nx, ny, nz)`` in RAS voxel order, zero outside
            the brain; ``csf + gm + wm`` is 1 inside the brain mask.
        brain: brain mask as float32 0/1, same shape.
        affine: 4×4 voxel-to-MNI-world affine (mm).
        centre_mm: centroid of the brain mask in MNI world (mm), shape (3,).
    """

    csf: np.ndarray
    gm: np.ndarray
    wm: np.ndarray
    brain: np.ndarray
    affine: np.ndarray
    centre_mm: np.ndarray


# nilearn's bundled ICBM 2009a files (what load_mni152_{template,gm_template,wm_template} read)
_NILEARN_FILES: dict[str, str] = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}
_NILEARN_MASK_THRESHOLD = 0.2  # nilearn's load_mni152_brain_mask default


def mni152_maps(use_nilearn_api: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                         np.ndarray]:
    """nilearn's bundled MNI152 maps at 1 mm: ``(gm, wm, brain, affine)``; never downloads.

    ``gm`` and ``wm`` are float32 in ``[0, 1]`` (each divided by its maximum), ``brain`` is bool
    (template T1 / max > 0.2), all of shape (197, 233, 189) in RAS order; ``affine`` is 4×4.
    Identical to ``nilearn.datasets.load_mni152_{gm_template,wm_template,brain_mask}()``, but by
    default read straight from the files inside nilearn's wheel, which avoids importing
    ``nilearn.datasets`` (1-2 s); falls back to that public API when the files are not found.
    """
    folder = resources.files("nilearn").joinpath("datasets", "data")
    paths = {k: Path(str(folder.joinpath(v))) for k, v in _NILEARN_FILES.items()}
    if use_nilearn_api or not all(p.is_file() for p in paths.values()):
        from nilearn import datasets

        imgs = {"gm": datasets.load_mni152_gm_template(resolution=1),
                "wm": datasets.load_mni152_wm_template(resolution=1),
                "brain": datasets.load_mni152_brain_mask(resolution=1,
                                                         threshold=_NILEARN_MASK_THRESHOLD)}
        arrays = {k: np.asarray(img.dataobj) for k, img in imgs.items()}
        affines = [np.asarray(img.affine, dtype=float) for img in imgs.values()]
        gm = arrays["gm"].astype(np.float32)
        wm = arrays["wm"].astype(np.float32)
        brain = arrays["brain"] > 0
    else:
        imgs = {k: nib.load(p) for k, p in paths.items()}
        arrays = {k: np.asarray(img.dataobj).astype(np.float32) for k, img in imgs.items()}
        affines = [np.asarray(img.affine, dtype=float) for img in imgs.values()]
        gm = arrays["gm"] / arrays["gm"].max()
        wm = arrays["wm"] / arrays["wm"].max()
        brain = arrays["t1"] / arrays["t1"].max() > _NILEARN_MASK_THRESHOLD
    if not (gm.shape == wm.shape == brain.shape
            and all(np.allclose(a, affines[0]) for a in affines)):
        raise RuntimeError("nilearn's MNI152 GM/WM maps and brain mask are not on one grid")
    return gm, wm, brain, affines[0]


@functools.lru_cache(maxsize=1)
def load_anatomy(margin_vox: int = 6) -> Anatomy:
    """nilearn's bundled MNI152 tissue maps (no download), cropped to the brain + margin.

    CSF is the brain mask minus GM and WM; GM and WM are rescaled where they sum above 1.
    """
    gm, wm, brain, affine = mni152_maps()
    idx = np.argwhere(brain)
    lo = np.maximum(idx.min(axis=0) - margin_vox, 0)
    hi = np.minimum(idx.max(axis=0) + margin_vox + 1, brain.shape)
    crop = tuple(slice(a, b) for a, b in zip(lo, hi))
    brain_c = brain[crop].astype(np.float32)
    gm_c = np.clip(gm[crop], 0, 1) * brain_c
    wm_c = np.clip(wm[crop], 0, 1) * brain_c
    total = gm_c + wm_c
    scale = np.where(total > 1, 1 / np.maximum(total, 1e-6), 1).astype(np.float32)
    gm_c, wm_c = gm_c * scale, wm_c * scale
    csf_c = np.clip(brain_c - gm_c - wm_c, 0, 1)
    cropped_affine = affine.copy()
    cropped_affine[:3, 3] = affine[:3, :3] @ lo + affine[:3, 3]
    centre = nib.affines.apply_affine(affine, idx.mean(axis=0))
    arrays = [np.ascontiguousarray(a, dtype=np.float32) for a in (csf_c, gm_c, wm_c, brain_c)]
    for a in arrays:
        a.setflags(write=False)
    return Anatomy(*arrays, affine=cropped_affine, centre_mm=centre)


@functools.lru_cache(maxsize=4)
def _blurred_brain(voxel: tuple[float, ...]) -> np.ndarray:
    """Template brain mask averaged over an acquisition voxel of nominal (unscaled) size.

    Only its 0.5 level is used (the foreground of a scan), so the subject's size jitter is
    ignored here, which lets subjects share the result.
    """
    out = _acquisition_blur(load_anatomy().brain, voxel)
    out.setflags(write=False)
    return out


def lesion_mask_files() -> list[Path]:
    """Paths of the 30 shipped lesion masks ``patient01.nii.gz`` … ``patient30.nii.gz``."""
    folder = resources.files(LESION_PACKAGE).joinpath("data", LESION_FOLDER)
    files = [Path(str(folder.joinpath(f"patient{i:02d}.nii.gz")))
             for i in range(1, N_LESION_MASKS + 1)]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"lesion masks missing from the installed package: {missing}")
    return files


def _nearest_resample(src: np.ndarray, out_to_src: np.ndarray,
                      shape: tuple[int, ...]) -> np.ndarray:
    """Nearest-neighbour resampling of ``src`` onto a grid of ``shape`` (zeros outside).

    ``out_to_src`` is the 4×4 output-voxel-to-source-voxel affine. When it only flips and
    shifts axes by whole voxels (the FSL and nilearn MNI grids), this is exact index copying.
    """
    lin, off = out_to_src[:3, :3], out_to_src[:3, 3]
    signs = np.diag(lin)
    if not (np.allclose(lin, np.diag(signs)) and np.allclose(np.abs(signs), 1)
            and np.allclose(off, np.rint(off))):
        return ndi.affine_transform(src, lin, offset=off, output_shape=shape, order=0, cval=0.0)
    # output index i reads source index sign * i + offset: per axis a contiguous run of valid
    # indices, copied as one (possibly reversed) slice
    out_box, src_box = [], []
    for sg, n, o, n_src in zip(signs, shape, off, src.shape):
        index = np.rint(sg * np.arange(n) + o).astype(int)
        valid = np.flatnonzero((index >= 0) & (index < n_src))
        if not len(valid):
            return np.zeros(shape, dtype=src.dtype)
        first, last = index[valid[0]], index[valid[-1]]
        step = 1 if sg > 0 else -1
        out_box.append(slice(valid[0], valid[-1] + 1))
        src_box.append(slice(first, last + step if last + step >= 0 else None, step))
    out = np.zeros(shape, dtype=src.dtype)
    out[tuple(out_box)] = src[tuple(src_box)]
    return out


@functools.lru_cache(maxsize=2 * N_LESION_MASKS)
def _lesion_components(patient: int, flip_lr: bool) -> tuple[np.ndarray, int]:
    """26-connected lesions of mask ``patient`` on the template grid: ``(labels int32, count)``."""
    mask = _lesion_on_template(patient, flip_lr) > 0
    labels = np.zeros(mask.shape, dtype=np.int32)
    n = 0
    if mask.any():
        # labelled inside the lesions' bounding box: the same labels (numbered in raster order)
        # for less work, and every collage subject labels all 30 masks (docs/performance.md)
        box = tuple(slice(int(i.min()), int(i.max()) + 1) for i in np.nonzero(mask))
        labels[box], n = ndi.label(mask[box], structure=np.ones((3, 3, 3)))
    labels.setflags(write=False)
    return labels, int(n)


@functools.lru_cache(maxsize=2 * N_LESION_MASKS)
def _component_sizes(patient: int, flip_lr: bool) -> np.ndarray:
    """Voxel counts of the lesions of :func:`_lesion_components` (index k-1: lesion k)."""
    labels, n = _lesion_components(patient, flip_lr)
    return np.bincount(labels.ravel(), minlength=n + 1)[1:]


@functools.lru_cache(maxsize=4)
def _lesion_on_template(patient: int, flip_lr: bool) -> np.ndarray:
    """Lesion mask ``patient`` (1-based) on the cropped template grid, float32 0/1.

    Mirroring is about the MNI mid-sagittal plane ``x = 0`` (the template is symmetric).
    """
    anatomy = load_anatomy()
    img = nib.load(lesion_mask_files()[patient - 1])
    data = (np.asarray(img.dataobj) > 0).astype(np.uint8)  # resampled as bytes: 4x less to copy
    les_affine = np.asarray(img.affine, dtype=float)
    if flip_lr:
        les_affine = np.diag([-1.0, 1.0, 1.0, 1.0]) @ les_affine
    vox = np.linalg.inv(les_affine) @ anatomy.affine  # template voxel -> lesion voxel
    out = _nearest_resample(data, vox, anatomy.brain.shape) * anatomy.brain  # float32 0/1
    out.setflags(write=False)
    return out


# ---------------------------------------------------------------------------------------------
# One subject
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _SubjectWarp:
    """Pull-back from the subject's FLAIR world (mm) to MNI world (mm).

    ``mni = centre + linear @ (p - centre - shift) + displacement(p)``, the displacement being
    trilinear on a regular grid (``field`` float32 ``(3, gx, gy, gz)``, voxel-to-world
    ``field_affine``).
    """

    centre: np.ndarray
    linear: np.ndarray
    shift: np.ndarray
    field: np.ndarray
    field_affine: np.ndarray
    params: dict[str, Any]


def _subject_warp(config: DemoConfig, index: int, centre: np.ndarray) -> _SubjectWarp:
    """Draw subject ``index``'s head pose, size jitter and smooth deformation (``centre`` mm)."""
    rng = _rng(config.seed, index, "anatomy")
    pose, pose_params = _random_rigid(rng, config.head_pose_deg, config.head_pose_mm, centre)
    global_scale = 1.0 + rng.uniform(-1, 1) * config.size_jitter
    axis_scale = 1.0 + rng.uniform(-1, 1, size=3) * config.size_jitter / 3
    scale = global_scale * axis_scale
    # subject p = pose(centre + diag(scale) (mni - centre))  =>  invert for the pull-back
    rot = pose[:3, :3]
    linear = np.diag(1.0 / scale) @ rot.T
    shift = pose[:3, 3] - (centre - rot @ centre)

    # smooth displacement: Gaussian control points, cubic-spline upsampled to a 6 mm grid that
    # covers the FOV plus room for the rigid motions
    margin = 40.0
    extent = np.asarray(config.fov_mm) + 2 * margin
    n_ctrl = np.maximum(np.ceil(extent / config.deformation_spacing_mm).astype(int) + 1, 2)
    ctrl = rng.normal(size=(3, *n_ctrl)) * config.deformation_mm
    n_fine = np.ceil(extent / _DISPLACEMENT_STEP_MM).astype(int) + 1
    field = np.stack([_upsample(c, tuple(n_fine)) for c in ctrl]).astype(np.float32)
    step = extent / (n_fine - 1)
    field_affine = np.diag([*step, 1.0])
    field_affine[:3, 3] = centre - extent / 2
    rms = float(np.sqrt(np.mean(np.sum(field.astype(float) ** 2, axis=0))))
    params = {"head_pose": pose_params, "size_scale": scale.tolist(),
              "deformation_rms_mm": rms, "deformation_control_points": n_ctrl.tolist()}
    return _SubjectWarp(centre, linear, shift, field, field_affine, params)


def _upsample(coarse: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Cubic-spline interpolation of ``coarse`` onto ``shape`` with matching corners."""
    grids = [np.linspace(0, n - 1, m) for n, m in zip(coarse.shape, shape)]
    coords = np.meshgrid(*grids, indexing="ij")
    return ndi.map_coordinates(coarse, coords, order=3, mode="nearest")


def _jittered_means(config: DemoConfig, index: int) -> dict[str, dict[str, float]]:
    rng = _rng(config.seed, index, "intensity")
    out: dict[str, dict[str, float]] = {}
    for contrast in CONTRASTS:
        gain = 1.0 + rng.uniform(-0.2, 0.2)
        tissues = _TISSUE_MEANS[contrast]
        jitter = 1.0 + rng.normal(size=len(tissues)) * config.intensity_jitter
        out[contrast] = {t: float(_OUTPUT_SCALE * gain * m * j)
                         for (t, m), j in zip(tissues.items(), jitter)}
    return out


def _lesion_strength(config: DemoConfig, index: int, lesion: np.ndarray) -> np.ndarray:
    """Fraction of its full contrast each lesion voxel keeps, float32 like ``lesion``.

    ``1 - h * v`` with ``v`` in ``[0, 1]`` a smooth random field (cubic spline through uniform
    values on a 12 mm control grid), evaluated at lesion voxels only; zero elsewhere.
    """
    rng = _rng(config.seed, index, "lesion")
    step = 12.0
    ctrl = rng.uniform(0.0, 1.0, size=tuple(int(np.ceil(n / step)) + 2 for n in lesion.shape))
    idx = np.nonzero(lesion)
    v = ndi.map_coordinates(ctrl, np.stack(idx) / step + 0.5, order=3, mode="nearest")
    out = np.zeros_like(lesion, dtype=np.float32)
    out[idx] = 1.0 - config.lesion_heterogeneity * np.clip(v, 0.0, 1.0)
    return out


def _template_image(anatomy: Anatomy, lesion_weight: np.ndarray,
                    means: dict[str, float]) -> np.ndarray:
    """Noise-free 1 mm template-space image: tissue mixture, lesions pulling it to their mean.

    ``lesion_weight`` in ``[0, 1]``: 1 replaces the tissue by the lesion mean, 0 leaves it.
    """
    tissue = (anatomy.csf * np.float32(means["csf"]) + anatomy.gm * np.float32(means["gm"])
              + anatomy.wm * np.float32(means["wm"]))
    return tissue + lesion_weight * (np.float32(means["lesion"]) * anatomy.brain - tissue)


def _scan_to_template_coords(shape: Sequence[int], scan_affine: np.ndarray,
                             scan_to_flair: np.ndarray, warp: _SubjectWarp,
                             template_affine: np.ndarray) -> np.ndarray:
    """Template voxel coordinates, float64 ``(3, nx, ny, nz)``, of every scan voxel centre."""
    to_flair = scan_to_flair @ scan_affine  # scan voxel -> FLAIR world
    # displacement field sampled at every scan voxel (affine index map -> fast path)
    to_field = np.linalg.inv(warp.field_affine) @ to_flair
    disp = np.stack([
        ndi.affine_transform(c, to_field[:3, :3], offset=to_field[:3, 3],
                             output_shape=tuple(shape), order=1, mode="nearest")
        for c in warp.field
    ])
    # affine part: template vox = inv(T) [centre + L (p - centre - shift)] + inv(T) disp
    lin = np.eye(4)
    lin[:3, :3] = warp.linear
    lin[:3, 3] = warp.centre - warp.linear @ (warp.centre + warp.shift)
    tmpl_inv = np.linalg.inv(template_affine)
    full = tmpl_inv @ lin @ to_flair
    coords = np.empty((3, *shape), dtype=np.float64)
    grid = [np.arange(n, dtype=np.float64) for n in shape]
    for r in range(3):
        coords[r] = (full[r, 0] * grid[0][:, None, None] + full[r, 1] * grid[1][None, :, None]
                     + full[r, 2] * grid[2][None, None, :] + full[r, 3])
    coords += np.tensordot(tmpl_inv[:3, :3], disp, axes=1)
    return coords


def _nifti(data: np.ndarray, affine: np.ndarray) -> nib.Nifti1Image:
    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    return img


def make_subject(index: int, config: DemoConfig = DemoConfig()) -> dict[str, Any]:
    """Synthesise subject ``index`` (0-based) of the demo cohort, in memory.

    Deterministic in ``(config, index)``; independent of ``config.n_subjects`` and of the other
    subjects, so subjects can be made in parallel jobs.

    Returns:
        ``{"T1", "T2", "FLAIR"}``: ``nib.Nifti1Image`` int16, each on its own grid
        ``config.shape(c)`` with spacing ``config.spacing(c)`` (RAS, mm);
        ``"lesions"``: ``nib.Nifti1Image`` uint8 0/1 on the FLAIR grid;
        ``"truth"``: JSON-serialisable dict with ``subject``, ``index``, ``seed``, ``reference``
        (``"FLAIR"``), ``moving_to_fixed`` (``{"T1": 4×4, "T2": 4×4}`` nested lists, RAS mm,
        scan world → FLAIR world), ``to_flair`` (the same for all three contrasts, identity for
        FLAIR: for another reference ``R``, contrast ``c`` maps by
        ``inv(to_flair[R]) @ to_flair[c]``), ``motion`` (rotation axis/angle, translation, centre per
        contrast), ``lesion_sources`` (:func:`lesion_sources`, with files), ``anatomy`` (head pose,
        size scale, deformation RMS), ``tissue_means``, ``grids`` (shape and spacing per contrast),
        ``lesion_voxels``, ``lesion_volume_ml`` and ``config`` (all fields but ``n_subjects``, so
        a subject's files do not depend on the cohort size).
    """
    if index < 0:
        raise ValueError(f"subject index must be >= 0, got {index}")
    anatomy = load_anatomy()
    centre = anatomy.centre_mm
    sources = lesion_sources(index, config.seed)
    lesion = lesion_template(index, config.seed)
    strength = _lesion_strength(config, index, lesion)
    warp = _subject_warp(config, index, centre)
    means = _jittered_means(config, index)
    mean_scale = float(np.mean(warp.params["size_scale"]))
    template_step = np.abs(np.diag(anatomy.affine)[:3])

    images: dict[str, nib.Nifti1Image] = {}
    motion: dict[str, Any] = {}
    moving_to_fixed: dict[str, list[list[float]]] = {}
    lesion_img: nib.Nifti1Image | None = None
    for contrast in CONTRASTS:
        shape = config.shape(contrast)
        spacing = config.spacing(contrast)
        scan_affine = _grid_affine(shape, spacing, centre)
        motion_rng = _rng(config.seed, index, f"motion-{contrast}")
        if contrast == REFERENCE:
            to_flair = np.eye(4)
        else:
            to_flair, params = _random_rigid(motion_rng, config.max_rotation_deg,
                                             config.max_translation_mm, centre)
            motion[contrast] = params
            moving_to_fixed[contrast] = to_flair.tolist()

        coords = _scan_to_template_coords(shape, scan_affine, to_flair, warp, anatomy.affine)
        voxel_in_template = np.asarray(spacing) / (mean_scale * template_step)
        weight = strength * strength if contrast == "T1" else strength
        clean_t = _acquisition_blur(_template_image(anatomy, weight, means[contrast]),
                                    voxel_in_template)
        brain_t = _blurred_brain(tuple(float(v) for v in np.asarray(spacing) / template_step))
        clean = ndi.map_coordinates(clean_t, coords, order=1, prefilter=False, cval=0.0)
        brain = ndi.map_coordinates(brain_t, coords, order=1, prefilter=False, cval=0.0)
        if contrast == REFERENCE:
            lesion_t = _acquisition_blur(lesion, voxel_in_template)
            frac = ndi.map_coordinates(lesion_t, coords, order=1, prefilter=False, cval=0.0)
            mask = ((frac >= _LESION_THRESHOLD) & (brain >= _BRAIN_THRESHOLD)).astype(np.uint8)
            lesion_img = _nifti(mask, scan_affine)
        del coords

        noise_rng = _rng(config.seed, index, f"noise-{contrast}")
        bias = _bias_field(noise_rng, shape, config.bias_strength)
        sigma = np.float32(config.noise_level * max(means[contrast].values()))
        signal = clean * bias
        n1 = noise_rng.standard_normal(size=shape, dtype=np.float32)
        n2 = noise_rng.standard_normal(size=shape, dtype=np.float32)
        noisy = np.sqrt((signal + sigma * n1) ** 2 + (sigma * n2) ** 2)
        noisy[brain < _BRAIN_THRESHOLD] = 0
        data = np.clip(np.rint(noisy), 0, np.iinfo(np.int16).max).astype(np.int16)
        images[contrast] = _nifti(data, scan_affine)

    assert lesion_img is not None
    n_lesion = int(np.asarray(lesion_img.dataobj).sum())
    flair_spacing = config.spacing(REFERENCE)
    truth = {
        "subject": subject_id(index),
        "index": index,
        "seed": config.seed,
        "reference": REFERENCE,
        "convention": "moving_to_fixed: 4x4 RAS-mm affine mapping a point of the scan's world "
                      "to the same anatomical point of the FLAIR world",
        "moving_to_fixed": moving_to_fixed,
        "to_flair": {c: moving_to_fixed.get(c, np.eye(4).tolist()) for c in CONTRASTS},
        "motion": motion,
        "lesion_sources": [{**src, "file": f"{LESION_FOLDER}/patient{src['patient']:02d}.nii.gz"}
                           for src in sources],
        "lesion_citation": "Lesjak et al., Neuroinformatics 16:51-63 (2018), "
                           "doi:10.1007/s12021-017-9348-7 (CC-BY)",
        "anatomy": warp.params,
        "tissue_means": means,
        "grids": {c: {"shape": list(config.shape(c)), "spacing_mm": list(config.spacing(c))}
                  for c in CONTRASTS},
        "lesion_voxels": n_lesion,
        "lesion_volume_ml": n_lesion * float(np.prod(flair_spacing)) / 1000.0,
        "config": {k: v for k, v in config.to_dict().items() if k != "n_subjects"},
    }
    return {**images, "lesions": lesion_img, "truth": truth}


# ---------------------------------------------------------------------------------------------
# Writing (I/O at the edges)
# ---------------------------------------------------------------------------------------------
SUBJECT_FILES: dict[str, str] = {"T1": "T1.nii.gz", "T2": "T2.nii.gz", "FLAIR": "FLAIR.nii.gz",
                                 "lesions": "lesions.nii.gz", "truth": "truth.json"}
"""File name of each item of a subject folder."""

SHEET_COLUMNS: tuple[str, ...] = ("subject", "t1", "t2", "flair", "lesions")


def write_subject(subject: dict[str, Any], subject_dir: str | os.PathLike) -> dict[str, Path]:
    """Write a :func:`make_subject` result as ``subject_dir/{T1,T2,FLAIR,lesions}.nii.gz`` and
    ``truth.json`` (each file atomically). Returns ``{item: path}``."""
    subject_dir = Path(subject_dir)
    paths: dict[str, Path] = {}
    for key, name in SUBJECT_FILES.items():
        path = subject_dir / name
        with staged([path]) as (tmp,):
            if key == "truth":
                tmp.write_text(json.dumps(subject[key], indent=2) + "\n")
            else:
                nib.save(subject[key], tmp)
        paths[key] = path
    return paths


def subject_sheet(config: DemoConfig, root: str | os.PathLike = ".",
                  absolute_paths: bool = False) -> pd.DataFrame:
    """The subject sheet of the cohort (columns ``subject, t1, t2, flair, lesions``).

    Paths are ``demo-001/T1.nii.gz`` etc., relative to ``root`` (the sheet's folder), or
    absolute (``root`` resolved) when ``absolute_paths``. Needs no image to exist.
    """
    import pandas as pd
    base = Path(root).resolve() if absolute_paths else Path()
    rows = []
    for index in range(config.n_subjects):
        sid = subject_id(index)
        rows.append({"subject": sid,
                     **{col: str(base / sid / SUBJECT_FILES[key])
                        for col, key in zip(SHEET_COLUMNS[1:], ("T1", "T2", "FLAIR", "lesions"))}})
    return pd.DataFrame(rows, columns=list(SHEET_COLUMNS))


def write_subject_sheet(sheet: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write ``sheet`` as a tab-separated file (atomically)."""
    path = Path(path)
    with staged([path]) as (tmp,):
        sheet.to_csv(tmp, sep="\t", index=False)
    return path


def make_cohort(out_dir: str | os.PathLike, config: DemoConfig = DemoConfig(), *,
                absolute_paths: bool = False, verbose: bool = False) -> pd.DataFrame:
    """Generate the whole cohort serially into ``out_dir`` and return its subject sheet.

    Writes ``out_dir/demo-NNN/{T1,T2,FLAIR,lesions}.nii.gz, truth.json`` for every subject,
    ``out_dir/subjects.tsv`` (see :func:`subject_sheet`) and ``out_dir/ATTRIBUTION.md`` (the
    lesion masks' citation and licence, which the derived data inherits).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for index in range(config.n_subjects):
        start = time.perf_counter()
        write_subject(make_subject(index, config), out_dir / subject_id(index))
        if verbose:
            print(f"{subject_id(index)}: {time.perf_counter() - start:.1f} s", flush=True)
    write_attribution(out_dir)
    sheet = subject_sheet(config, out_dir, absolute_paths)
    write_subject_sheet(sheet, out_dir / "subjects.tsv")
    return sheet


def write_attribution(out_dir: str | os.PathLike) -> Path:
    """Write ``out_dir/ATTRIBUTION.md``: what the cohort is, and the lesion masks' citation."""
    text = (
        "# rsanet demo cohort\n\n"
        "Synthetic T1/T2/FLAIR scans generated by `rsanet.demo` from nilearn's MNI152 templates "
        "and the real lesion masks of 27 of its 30 MS patients (not patients 07, 19, 26).\n\n"
        "The lesion masks are released under CC-BY; data derived from them must cite:\n\n"
        "> Lesjak Ž, Galimzianova A, Koren A, Lukin M, Pernuš F, Likar B, Špiclin Ž. \"A Novel "
        "Public MR Image Dataset of Multiple Sclerosis Patients With Lesion Segmentations Based "
        "on Multi-rater Consensus\", Neuroinformatics 16:51–63 (2018), "
        "doi:10.1007/s12021-017-9348-7.\n\n"
        "Licence text: `rsanet/data/lesion_masks_mni/LICENSE.txt` in the installed package.\n"
    )
    path = Path(out_dir) / "ATTRIBUTION.md"
    with staged([path]) as (tmp,):
        tmp.write_text(text, encoding="utf-8")
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m rsanet.demo OUT_DIR [--n-subjects N] [--seed S] [--grid-scale F]``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--n-subjects", type=int, default=DemoConfig.n_subjects)
    parser.add_argument("--seed", type=int, default=DemoConfig.seed)
    parser.add_argument("--grid-scale", type=float, default=DemoConfig.grid_scale)
    parser.add_argument("--absolute-paths", action="store_true")
    args = parser.parse_args(argv)
    config = DemoConfig(n_subjects=args.n_subjects, seed=args.seed,
                        grid_scale=args.grid_scale)
    make_cohort(args.out_dir, config, absolute_paths=args.absolute_paths, verbose=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
