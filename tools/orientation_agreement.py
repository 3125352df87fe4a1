"""Does a scan's storage order change rsanet-segment's result? One patient, several copies.

    python tools/orientation_agreement.py --model results/export/<variant> --patient ../shared/data/open_ms_data/patients_mni/patient07

Writes copies of the patient's T1, T2 and FLAIR stored RAS, LPS, LAS, with the first two axes
swapped, and oblique (the world frame rotated 15 degrees about x, the voxels as they are), runs
``rsanet-segment`` (the export's own registration) on each, maps every mask back to the RAS
voxel order and prints its Dice, voxel difference and lesion count against the copy stored RAS,
with the seconds each stage took (``summary.json``).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, io_orientation, ornt_transform

from rsanet.evaluation import to_markdown
from rsanet.metrics import dice_from_counts
from rsanet.segment import segment


def reorient(img: nib.Nifti1Image, codes: tuple[str, str, str]) -> nib.Nifti1Image:
    """The same scan stored in the voxel order ``codes`` (an exact permutation and flip)."""
    t = ornt_transform(io_orientation(img.affine), axcodes2ornt(codes))
    return nib.Nifti1Image(apply_orientation(np.asarray(img.dataobj), t), img.affine @ inv_ornt_aff(t, img.shape))


def oblique(img: nib.Nifti1Image, degrees: float = 15.0) -> nib.Nifti1Image:
    """The same voxels with the world frame rotated about x: a scan acquired obliquely."""
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    rot = np.array([[1, 0, 0, 0], [0, c, -s, 0], [0, s, c, 0], [0, 0, 0, 1.0]])
    return nib.Nifti1Image(np.asarray(img.dataobj), rot @ img.affine)


COPIES = {
    "RAS": lambda i: reorient(i, ("R", "A", "S")),
    "LPS": lambda i: reorient(i, ("L", "P", "S")),
    "LAS": lambda i: reorient(i, ("L", "A", "S")),
    "axes swapped (ARS)": lambda i: reorient(i, ("A", "R", "S")),
    "oblique (15 degrees)": lambda i: oblique(reorient(i, ("R", "A", "S"))),
}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--patient", required=True, help="folder with T1.nii.gz, T2.nii.gz, FLAIR.nii.gz")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    rows, base = [], None
    with tempfile.TemporaryDirectory() as tmp:
        for name, make in COPIES.items():
            d = Path(tmp) / name.split()[0]
            d.mkdir()
            files = {}
            for c in ("T1", "T2", "FLAIR"):
                files[c] = d / f"{c}.nii.gz"
                nib.save(make(nib.load(str(Path(args.patient) / f"{c}.nii.gz"))), files[c])
            summary = segment(args.model, str(files["T1"]), str(files["T2"]), str(files["FLAIR"]), d / "out",
                              device="cpu", threads=args.threads)
            mask = np.asarray(reorient(nib.load(str(d / "out" / "lesions.nii.gz")), ("R", "A", "S")).dataobj) > 0
            base = mask if base is None else base
            tp = int((mask & base).sum())
            rows.append({"copy": name, "Dice to RAS": round(dice_from_counts(tp, int(mask.sum()) - tp, int(base.sum()) - tp), 5),
                         "voxels differing": int((mask != base).sum()), "lesions": summary["lesion_count"],
                         "volume (ml)": round(summary["total_lesion_volume_ml"], 3),
                         **{f"{k} (s)": v for k, v in summary["seconds"].items()}})
            print(json.dumps(rows[-1]), flush=True)
    print(to_markdown(pd.DataFrame(rows)))


if __name__ == "__main__":
    main()
