"""``rsanet-register``: register one moving image to a fixed one from the command line."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np

from . import register
from ..files import staged
from .core import (
    FLIRT_COSTS,
    RegistrationError,
)
from .images import (
    resample_to_fixed,
)
from .transforms import (
    _transform_files,
)

log = logging.getLogger("rsanet.registration")


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
        with staged(outputs) as temps:
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
