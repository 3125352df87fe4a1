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

Modules: :mod:`.core` (types, limits, the result), :mod:`.transforms` (matrices and transform
files), :mod:`.images` (foreground, resampling), :mod:`.simpleitk` and :mod:`.flirt` (the engines),
:mod:`.qc` (the QC figure); ``rsanet-register`` is :func:`rsanet.stages.coregister.main`. :func:`register` is here.

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

import logging
import tempfile
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import nibabel as nib
import numpy as np

from ..volumes import CONTRASTS, InputError, load_checked
from .core import (
    FLIRT_COSTS,
    MIN_MUTUAL_INFORMATION,
    MIN_OVERLAP,
    RAS_TO_LPS,
    EngineName,
    PathLike,
    RegistrationError,
    RegistrationResult,
    SimpleITKSettings,
)
from .flirt import _register_flirt, flirt_executable
from .images import (
    MIN_COVERAGE,
    downsample_grid,
    field_of_view_coverage,
    foreground_mask,
    otsu_threshold,
    resample_to_fixed,
    voxel_points_mm,
)
from .qc import registration_qc_figure
from .simpleitk import (
    _head_overlap,
    _metric_value,
    _pyramid,
    _register_simpleitk,
    _sitk_threads,
)
from .transforms import (
    apply_affine,
    displacement_mm,
    flirt_matrix,
    image_center_lps,
    itk_to_moving_to_fixed,
    itk_transform_text,
    moving_to_fixed_to_itk,
    read_itk_transform,
    rigid_matrix,
    rotation_from_euler_deg,
    write_transforms,
)

__all__ = [
    "CONTRASTS", "Coregistered", "CoregistrationSettings", "coregister_contrasts", "FLIRT_COSTS", "MIN_COVERAGE", "MIN_MUTUAL_INFORMATION", "MIN_OVERLAP", "RAS_TO_LPS", "RegistrationError",
    "RegistrationResult", "SimpleITKSettings", "apply_affine", "choose_engine", "displacement_mm",
    "downsample_grid", "engines_that_ran", "field_of_view_coverage", "flirt_executable", "flirt_matrix", "foreground_mask",
    "header_alignment", "image_center_lps", "itk_to_moving_to_fixed", "itk_transform_text",
    "moving_to_fixed_to_itk", "otsu_threshold", "read_itk_transform", "register", "registration_qc_figure",
    "resample_to_fixed", "rigid_matrix", "rotation_from_euler_deg", "voxel_points_mm",
    "write_transforms",
]

log = logging.getLogger("rsanet.registration")


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------
def _load(path: Path, role: str) -> nib.Nifti1Image:
    """The checked volume (:func:`rsanet.volumes.load_checked`) as float32, or :class:`RegistrationError`.

    Registration also needs contrast: a constant image is refused.
    """
    try:
        img = load_checked(path, None, role)
    except InputError as err:
        raise RegistrationError(str(err)) from err
    data = np.asarray(img.dataobj, dtype=np.float32)
    if data.min() == data.max():
        raise RegistrationError(f"{role} file {str(path)!r}: every voxel is {data.flat[0]}, nothing to register; "
                                "check the conversion from DICOM or the previous step.")
    return nib.Nifti1Image(data, img.affine, img.header)


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
    max_displacement_mm: float = 40.0,
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
    moving_img = _load(moving_path, "moving image")
    fixed_img = _load(fixed_path, "fixed image")
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
# One subject's contrasts onto the reference: the study's coregister rule and rsanet-segment
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CoregistrationSettings:
    """The config's ``registration:`` section (its defaults: workflow/schemas/config.schema.yaml).

    ``reference``: the contrast every other one is registered and resampled onto; ``engine``:
    ``auto``, ``flirt``, ``simpleitk`` or ``none`` (already co-registered: the headers are
    trusted, the contrasts only resampled); ``dof``, ``search_deg`` (degrees),
    ``max_displacement_mm`` (mm): see :func:`register`; ``finest_level_mm`` (mm): see
    :meth:`SimpleITKSettings.finest_level`.
    """

    reference: str = "FLAIR"
    engine: str = "auto"
    dof: int = 6
    max_displacement_mm: float = 40.0
    search_deg: float = 30.0
    finest_level_mm: float = 1.5

    @classmethod
    def from_config(cls, section: Mapping[str, Any]) -> "CoregistrationSettings":
        """From a validated ``registration:`` section (or an export's record of it); other keys ignored."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in section.items() if k in names})


@dataclass(frozen=True, eq=False)
class Coregistered:
    """One subject's contrasts on the reference grid.

    ``images``: contrast name -> float32 image on the reference's grid (the reference's affine);
    ``results``: moving contrast name -> its :class:`RegistrationResult`; ``reference``: its name.
    """

    images: dict[str, nib.Nifti1Image]
    results: dict[str, RegistrationResult]
    reference: str


#: The grid (mm) that :func:`canonical_copy` rounds an image's origin to.
ORIGIN_STEP_MM = 0.01


def canonical_copy(img: nib.Nifti1Image, origin_step_mm: float = ORIGIN_STEP_MM) -> nib.Nifti1Image:
    """The closest-canonical (RAS+) copy of ``img`` (an exact permutation and flip of its voxels)
    with the origin of its affine rounded to ``origin_step_mm``.

    Why the rounding: a file stores its affine in float32, so the same scan written in another
    voxel order (LPS instead of RAS) has a canonical origin that differs in the last bits
    (~1e-5 mm), and an optimising registration follows that difference. Rounded to 0.01 mm, both
    copies get the same geometry (unless the two values straddle a rounding boundary: about 0.1 %
    of coordinates), and the image moves by at most 0.005 mm. The linear part is left as it is:
    reordering the axes only permutes and negates its float32 entries, which is exact.
    """
    canonical = nib.as_closest_canonical(img)
    affine = np.array(canonical.affine, dtype=np.float64)
    affine[:3, 3] = np.round(affine[:3, 3] / origin_step_mm) * origin_step_mm
    return nib.Nifti1Image(canonical.dataobj, affine, canonical.header)


def coregister_contrasts(
    images: Mapping[str, PathLike], settings: CoregistrationSettings, subject: str, threads: int = 1,
) -> Coregistered:
    """Register every contrast of ``images`` (T1, T2, FLAIR -> file) onto ``settings.reference``
    and resample it (linear) onto the reference's grid.

    The one co-registration of the project: the study's ``coregister`` rule and ``rsanet-segment``
    both call it, so a new patient's inputs are prepared exactly as the training subjects' were.
    Whatever voxel order the files are stored in (RAS, LPS, LAS, axes permuted), the work is done
    on their closest-canonical (RAS+) copies, an exact permutation and flip of the voxels, and the
    results are put back, exactly, on the reference file's own grid: the same scan stored in
    another order gives the same result. ``subject`` names the subject in messages; ``threads``:
    CPU threads for the SimpleITK engine (the job's threads). Raises
    :class:`rsanet.volumes.InputError` (naming the subject, the file and what to do) for a failed
    registration or a contrast whose field of view misses most of the reference's head.
    """
    from ..volumes import model_to_reference

    reference = settings.reference
    fixed_path = images[reference]
    originals = {c: load_checked(images[c], subject, c) for c in CONTRASTS if c in images}
    fixed = originals[reference]
    canonical = {c: canonical_copy(img) for c, img in originals.items()}
    results: dict[str, RegistrationResult] = {}
    resampled = {reference: canonical[reference]}
    sitk_settings = SimpleITKSettings().finest_level(settings.finest_level_mm)
    with tempfile.TemporaryDirectory(prefix="rsanet-canonical-") as tmp:
        paths = {c: Path(tmp) / f"{c}.nii" for c in canonical}  # the engines read files (FLIRT)
        if settings.engine != "none":  # only a registration reads them
            for c, img in canonical.items():
                nib.save(img, str(paths[c]))
        for contrast in (c for c in CONTRASTS if c != reference):
            if settings.engine == "none":  # already co-registered: the headers' alignment, resampled only
                log.info("%s: %s -> %s by the header alignment (registration.engine: none)", subject, contrast,
                         reference)
                res = header_alignment(images[contrast], fixed_path, settings.dof)
            else:
                log.info("%s: registering %s -> %s", subject, contrast, reference)
                try:
                    res = register(paths[contrast], paths[reference], dof=settings.dof, engine=settings.engine,
                                   search_deg=settings.search_deg, max_displacement_mm=settings.max_displacement_mm,
                                   threads=threads, settings=sitk_settings)
                except RegistrationError as err:
                    message = str(err).replace(str(paths[contrast]), str(images[contrast]))
                    raise InputError(f"subject {subject!r}: {message.replace(str(paths[reference]), str(fixed_path))}") from err
                # world mm to world mm: the same transform for the files as stored
                res = replace(res, moving=str(images[contrast]), fixed=str(fixed_path))
            log.info("%s: %s -> %s with %s in %.1f s, cost %.4f -> %.4f", subject, contrast, reference,
                     res.engine, res.seconds, res.cost_before, res.cost_after)
            results[contrast] = res
            coverage = field_of_view_coverage(canonical[contrast], canonical[reference], res.moving_to_fixed)
            if coverage < MIN_COVERAGE:
                raise InputError(
                    f"subject {subject!r}, {contrast} file {str(images[contrast])!r}: after co-registration its field "
                    f"of view covers only {100 * coverage:.0f} % of the {reference} image's head {str(fixed_path)!r} "
                    f"(minimum {100 * MIN_COVERAGE:.0f} %). Give a {contrast} scan that covers the brain."
                )
            resampled[contrast] = resample_to_fixed(canonical[contrast], canonical[reference], res.moving_to_fixed,
                                                    "linear")
    on_reference = {}
    for c in CONTRASTS:
        if c in resampled:
            xyz = np.asarray(resampled[c].dataobj, dtype=np.float32)  # canonical (x, y, z)
            back = model_to_reference(xyz.transpose(2, 1, 0), fixed.affine)  # exactly the reference file's grid
            on_reference[c] = nib.Nifti1Image(np.asarray(back.dataobj, dtype=np.float32), fixed.affine)
    return Coregistered(images=on_reference, results=results, reference=reference)


def engines_that_ran(records: "Sequence[str | Path]") -> list[str]:
    """The registration engines named in subjects' ``registration.json`` records (what ``auto``
    became, or ``none``), sorted: what deviations.md and the model card report."""
    import json

    return sorted({r["engine"] for p in records for r in json.loads(Path(p).read_text())["results"].values()})
