"""Lesion counts of an export predicting on each scan's own grid against predicting at the study's
spacing (docs/inference.md, "Predicting at the study's spacing").

    python tools/study_spacing.py --model results/export/<variant> [--spacing DZ DY DX] [--out FILE.md]

Cases: the three real patients of open_ms_data (1 mm isotropic, expert masks) and three new demo
subjects (a demo seed no study used, so no training subject) acquired on three grids each: the
demo study's 1.4 x 1.4 x 3 mm, the paper-like 0.7 x 0.7 x 3 mm and 1 mm isotropic. Each case is
prepared as rsanet-segment prepares it (the export's registration and preprocessing) and
predicted twice by the same ensemble: on its own grid, and resampled to the study's spacing
(``--spacing``, ``(dz, dy, dx)`` mm; default: the export's ``training_data.spacing_mm``) with the
probabilities mapped back. Lesions: connected components of the final mask (the export's
connectivity, lesions of at most ``min_lesion_mm3`` removed), the true ones counted the same way
on the mask's grid. Prints a Markdown table (and writes it to ``--out``).
"""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import torch

from rsanet.demo import DemoConfig, make_subject, write_subject
from rsanet.evaluation import to_markdown
from rsanet.export import load_predictor, read_export
from rsanet.metrics import remove_small_components
from rsanet.segment import ensemble_lesions, lesion_labels, prepare_patient

REPO = Path(__file__).resolve().parents[1]
OPEN_MS_DATA = REPO.parent / "shared" / "data" / "open_ms_data" / "patients_mni"
PATIENTS = ("patient07", "patient19", "patient26")
#: the demo acquisitions: name -> DemoConfig changes (FLAIR, T1, T2 spacing (x, y, z) mm)
GRIDS = {
    "1.4x1.4x3": {"grid_scale": 2.0},
    "0.7x0.7x3": {"grid_scale": 1.0},
    "1x1x1": {"grid_scale": 1.0, "flair_spacing_mm": (1.0, 1.0, 1.0), "t1_spacing_mm": (1.0, 1.0, 1.0),
              "t2_spacing_mm": (1.0, 1.0, 1.0)},
}
DEMO_SEED = 9001  # a cohort no study of this repository draws (the demo's default seed is 0)


def head_commit() -> str:
    """The repository's short commit, for the generated tables' header."""
    return subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip()


def cases(workdir: Path, n_demo: int) -> list[dict]:
    """The real patients and the new demo subjects on each grid: name, grid, file paths."""
    out = [{"case": p, "grid": "1x1x1 (real)", **{k: OPEN_MS_DATA / p / f"{k}.nii.gz"
                                                  for k in ("T1", "T2", "FLAIR", "lesions")}} for p in PATIENTS]
    for grid, changes in GRIDS.items():
        config = dataclasses.replace(DemoConfig(), seed=DEMO_SEED, **changes)
        for i in range(n_demo):
            paths = write_subject(make_subject(i, config), workdir / f"demo{i}_{grid}")
            out.append({"case": f"new demo {i}", "grid": grid, **{k: paths[k] for k in ("T1", "T2", "FLAIR", "lesions")}})
    return out


def measure(case: dict, own, at, meta: dict) -> dict:
    """One case predicted both ways: true and found lesion counts, volumes (ml), voxel Dice."""
    reg, pre = prepare_patient(meta, str(case["T1"]), str(case["T2"]), str(case["FLAIR"]), threads=2, subject=case["case"])
    fixed = reg.images[reg.reference]
    truth_img = nib.load(case["lesions"])
    assert truth_img.shape[:3] == fixed.shape[:3], f"{case['lesions']}: not on the FLAIR's grid"
    truth = np.asarray(truth_img.dataobj) > 0
    connectivity = int(meta["evaluation"]["connectivity"])
    min_mm3 = 3.0
    voxel_mm3 = float(abs(np.linalg.det(fixed.affine[:3, :3])))
    truth = remove_small_components(truth, int(np.floor(min_mm3 / voxel_mm3)) + 1, connectivity)
    row = {"case": case["case"], "grid (mm)": case["grid"],
           "true lesions": int(lesion_labels(truth, connectivity).max()),
           "true volume ml": round(truth.sum() * voxel_mm3 / 1000, 2)}
    for name, predictor in (("own grid", own), ("study spacing", at)):
        t0 = time.perf_counter()
        per = predictor.per_model(pre.image, pre.spacing)
        models_ref = np.stack([np.asarray(pre.uncrop(p).dataobj, dtype=np.float32) for p in per])
        mask, _, table = ensemble_lesions(models_ref, fixed.affine, connectivity, predictor.threshold, min_mm3)
        inter = float((mask & truth).sum())
        row[f"{name}: lesions"] = int(len(table))
        row[f"{name}: volume ml"] = round(float(table.volume_mm3.sum()) / 1000, 2)
        row[f"{name}: Dice"] = round(2 * inter / max(mask.sum() + truth.sum(), 1), 3)
        row[f"{name}: s"] = round(time.perf_counter() - t0, 1)
    print(row, file=sys.stderr, flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="export folder")
    p.add_argument("--spacing", type=float, nargs=3, help="the study's (dz, dy, dx) mm (default: the export's)")
    p.add_argument("--demo-subjects", type=int, default=3)
    p.add_argument("--out", help="also write the Markdown table here")
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    folder = Path(args.model)
    meta = read_export(folder)
    spacing = tuple(args.spacing) if args.spacing else tuple(meta["training_data"]["spacing_mm"])
    own = load_predictor(folder, meta, torch.device("cpu"), spacing="own")
    at = dataclasses.replace(own, spacing_mm=spacing)
    with tempfile.TemporaryDirectory() as tmp:
        rows = [measure(c, own, at, meta) for c in cases(Path(tmp), args.demo_subjects)]
    table = pd.DataFrame(rows)
    err = {name: (table[f"{name}: lesions"] - table["true lesions"]).abs() for name in ("own grid", "study spacing")}
    commit = head_commit()
    lines = [f"<!-- generated by: python tools/study_spacing.py --model {args.model}"
             + (f" --spacing {' '.join(f'{s:g}' for s in spacing)}" if args.spacing else "")
             + f" (commit {commit}, export variant {meta['variant']}) -->", "",
             f"Study spacing (dz, dy, dx): {' x '.join(f'{s:g}' for s in spacing)} mm.", "",
             to_markdown(table), ""]
    for subset, rows_ in (("all cases", table.index), ("real patients", table.index[:len(PATIENTS)]),
                          ("new demo subjects", table.index[len(PATIENTS):])):
        lines.append(f"Mean |found - true| lesion count, {subset}: own grid {err['own grid'][rows_].mean():.1f}, "
                     f"study spacing {err['study spacing'][rows_].mean():.1f}; mean Dice: own grid "
                     f"{table.loc[rows_, 'own grid: Dice'].mean():.3f}, study spacing "
                     f"{table.loc[rows_, 'study spacing: Dice'].mean():.3f}.")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
