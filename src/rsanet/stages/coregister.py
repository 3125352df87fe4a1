"""Co-registration steps (workflow/rules/coregister.smk): T1 and T2 onto the reference, and the
registration's accuracy against the demo's known motion.

Each step reads its files, calls the package's pure code and writes its outputs through
:func:`rsanet.files.staged`; a script of ``scripts/`` calls one of them.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

import nibabel as nib
import numpy as np

# Heavy libraries (torch, matplotlib, SimpleITK, pandas) are imported inside the steps that need
# them, so light steps start in a fraction of a second (pandas: 0.15-0.26 s for each of the demo's
# 164 synthesis, registration, preprocessing and training jobs, which do not use it).
from ..volumes import (
    CONTRASTS,
    binarise_mask,
    load_checked,
    require_same_grid,
    save_json,
    save_nifti,
)

if TYPE_CHECKING:

    from ..registration import CoregistrationSettings


log = logging.getLogger(__name__)


def coregister_step(
    subject: str, images: Mapping[str, str], lesions: str | None, outputs: Mapping[str, str],
    settings: "CoregistrationSettings", threads: int = 1, allow_empty_mask: bool = False,
) -> None:
    """Register every non-reference contrast onto ``settings.reference`` and resample it onto the
    reference grid (:func:`rsanet.registration.coregister_contrasts`, also used by ``rsanet-segment``).

    Writes the three contrasts and the mask (``lesions``; ``None``: no mask) on the reference grid,
    the transforms of each moving
    contrast (FLIRT ``.mat`` and ITK ``.txt``), ``registration.json`` (engine, costs, matrices)
    and, when ``outputs`` has ``"qc"``, the QC figure (registered edges over the reference).
    A failed registration, or a contrast whose field of view misses most of the reference's
    head, raises before anything is written for the subject.
    """
    from ..registration import coregister_contrasts, registration_qc_figure, write_transforms

    reg = coregister_contrasts(images, settings, subject, threads=threads)
    reference, fixed_path = reg.reference, images[reg.reference]
    fixed = reg.images[reference]
    if lesions is not None:
        mask = load_checked(lesions, subject, "lesion mask", allow_empty=allow_empty_mask)
        require_same_grid(mask, fixed, subject, "lesion mask", lesions, fixed_path)
        mask = nib.Nifti1Image(binarise_mask(np.asarray(mask.dataobj), subject, lesions), fixed.affine)
    tdir = Path(outputs["transforms"])
    tdir.mkdir(parents=True, exist_ok=True)
    for contrast, res in reg.results.items():
        write_transforms(res, images[contrast], fixed_path, tdir / f"{contrast}_to_{reference}.mat",
                         tdir / f"{contrast}_to_{reference}.itk.txt")
    for contrast in CONTRASTS:
        save_nifti(reg.images[contrast], outputs[contrast.lower()])
    if lesions is not None:
        save_nifti(mask, outputs["lesions"])
    save_json({"subject": subject, "reference": reference,
               "results": {c: r.to_dict() for c, r in reg.results.items()}}, outputs["record"])
    if "qc" in outputs:  # edges of the registered contrasts over the reference, three slices
        others = {c: reg.images[c] for c in CONTRASTS if c != reference}
        registration_qc_figure(reg.images[reference], others, outputs["qc"], title=subject)


def registration_accuracy_step(records: Sequence[str], truths: Sequence[str], flairs: Sequence[str], out_csv: str, out_png: str) -> None:
    """Mean displacement error over the brain of each estimated transform against the demo's truth."""
    import pandas as pd
    from .. import evaluation, figures
    from ..registration import displacement_mm, foreground_mask, voxel_points_mm

    rows = []
    for rec_path, truth_path, flair_path in zip(records, truths, flairs):
        rec, truth = json.loads(Path(rec_path).read_text()), json.loads(Path(truth_path).read_text())
        flair = nib.load(flair_path)
        points = voxel_points_mm(foreground_mask(np.asarray(flair.dataobj)), flair.affine, step=2)
        for contrast, res in rec["results"].items():
            # truth["to_flair"][c]: scan c world -> FLAIR world; any reference R via inv(to_flair[R]).
            to_ref = np.linalg.inv(np.asarray(truth["to_flair"][rec["reference"]]))
            true_m2f = to_ref @ np.asarray(truth["to_flair"][contrast])
            est_m2f = np.asarray(res["moving_to_fixed"])
            # Points of the reference brain, mapped back into the moving scan by each inverse.
            err = displacement_mm(np.linalg.inv(est_m2f), np.linalg.inv(true_m2f), points)
            rows.append({"subject": rec["subject"], "contrast": contrast, "engine": res["engine"],
                         "mean_error_mm": float(err.mean()), "max_error_mm": float(err.max()),
                         "seconds": res["seconds"]})
    table = pd.DataFrame(rows)
    evaluation.write_csv(table, out_csv)
    figures.registration_errors(table, str(Path(out_png).with_suffix("")))
    log.info("registration error (mm): median %.3f, max %.3f", table.mean_error_mm.median(), table.mean_error_mm.max())


def main(argv: Sequence[str] | None = None) -> int:
    """``rsanet-register``: one subject's T1, T2 and FLAIR co-registered exactly as the study's
    ``coregister`` rule does (:func:`coregister_step`: canonical copies, field-of-view coverage
    check, the displacement limit), into ``--out``: the three contrasts on the reference grid,
    ``transforms/`` (FLIRT ``.mat``, ITK ``.txt``), ``registration.json`` and ``qc.png``.
    Exit code 0, or 2 with the problem named (subject, file) and nothing written."""
    import argparse
    import dataclasses
    import sys

    from ..registration import CoregistrationSettings, RegistrationError
    from ..volumes import InputError

    defaults = CoregistrationSettings()  # the schema's registration defaults (a test keeps them equal)
    p = argparse.ArgumentParser(prog="rsanet-register", description="Co-register a subject's T1, T2 and FLAIR "
                                "as the study does (FSL FLIRT if $FSLDIR/bin/flirt exists, else SimpleITK).")
    for contrast in CONTRASTS:
        p.add_argument(f"--{contrast.lower()}", required=True, help=f"{contrast} NIfTI volume")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--subject", help="the subject's name in messages and records (default: the --out folder's)")
    p.add_argument("--reference", choices=CONTRASTS, default=defaults.reference, help="contrast registered onto")
    p.add_argument("--engine", choices=("auto", "flirt", "simpleitk", "none"), default=defaults.engine)
    p.add_argument("--dof", type=int, choices=(6, 12), default=defaults.dof)
    p.add_argument("--search-deg", type=float, default=defaults.search_deg, help="rotation search, +/- degrees")
    p.add_argument("--max-displacement-mm", type=float, default=defaults.max_displacement_mm)
    p.add_argument("--finest-level-mm", type=float, default=defaults.finest_level_mm, help="SimpleITK pyramid")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    settings = dataclasses.replace(defaults, reference=args.reference, engine=args.engine, dof=args.dof,
                                   search_deg=args.search_deg, max_displacement_mm=args.max_displacement_mm,
                                   finest_level_mm=args.finest_level_mm)
    out = Path(args.out)
    subject = args.subject or out.name
    images = {c: getattr(args, c.lower()) for c in CONTRASTS}
    outputs = {**{c.lower(): str(out / f"{c}.nii.gz") for c in CONTRASTS}, "transforms": str(out / "transforms"),
               "record": str(out / "registration.json"), "qc": str(out / "qc.png")}
    try:
        coregister_step(subject, images, None, outputs, settings, threads=args.threads)
    except (RegistrationError, InputError) as exc:
        print(f"rsanet-register: error: {exc}", file=sys.stderr)
        return 2
    record = json.loads((out / "registration.json").read_text())
    print(f"rsanet-register: {subject} -> {out}: " + ", ".join(
        f"{c} {r['engine']} ({r['seconds']:.1f} s)" for c, r in record["results"].items()))
    return 0
