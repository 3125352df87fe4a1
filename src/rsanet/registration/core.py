"""Types, limits and errors shared by the registration engines, and the result they return."""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field, replace
from typing import Literal, Mapping

import numpy as np

log = logging.getLogger("rsanet.registration")


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

    def finest_level(self, finest_mm: float) -> "SimpleITKSettings":
        """These settings without the pyramid levels finer than ``finest_mm`` (the coarsest is always kept).

        E.g. ``3.0`` for images whose reference has 3 mm slices: about 2.7x faster on the demo
        cohort, with mean errors of 0.1-0.5 mm instead of 0.1-0.2 mm (docs/registration.md).
        """
        keep = [i for i, s in enumerate(self.level_spacings_mm) if s >= finest_mm - 1e-9] or [0]
        return replace(self, level_spacings_mm=tuple(self.level_spacings_mm[i] for i in keep),
                       samples_per_level=tuple(self.samples_per_level[i] for i in keep))


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


