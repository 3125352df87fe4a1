"""The FSL FLIRT engine (fslpy's wrapper), used when ``$FSLDIR/bin/flirt`` exists."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from .core import (
    RegistrationError,
)

log = logging.getLogger("rsanet.registration")


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


