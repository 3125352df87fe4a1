#!/usr/bin/env python
"""Accuracy and speed of :func:`rsanet.registration.register` (the registration benchmark of docs/registration.md).

(a) synthetic: nilearn's MNI152 brain sampled on a 0.7×0.7×3 mm axial grid (3 mm slice profile)
    as the fixed image, and as the moving image a T2-like contrast (inverted, bias field, noise)
    under a known rigid motion (rotations and translations up to 15° and 15 mm per axis):
    mean displacement error over brain voxels (target ≤ 0.5 mm);
(b) real: open_ms_data's raw patient12_study1 session, T1W and T2W registered to FLAIR and
    compared with the dataset authors' reference ITK transforms: mean displacement over FLAIR
    head voxels (target ≤ 1 mm);
(c) seconds per pair on ``--threads`` threads (target ≤ 30 s on 2 cores), plus the time of
    one synthetic pair at 1.4×1.4×3 mm.

Usage: ``python tools/benchmark_registration.py [--out results/benchmarks/registration.csv]
[--data ../shared/data/open_ms_data] [--engine simpleitk] [--dof 6] [--threads 2]``.
The error of a transform ``E`` against the truth ``T`` (both moving_to_fixed, RAS mm) is
``|E⁻¹ p − T⁻¹ p|`` over the fixed brain points ``p``: how far apart the two transforms put the
moving-image sample for each fixed voxel.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

REPO = Path(__file__).resolve().parents[1]

from rsanet.registration import (  # noqa: E402
    RegistrationError,
    displacement_mm,
    foreground_mask,
    read_itk_transform,
    register,
    rigid_matrix,
    voxel_points_mm,
)

# Motions for the synthetic cases: (rotations about x, y, z in degrees, translation in mm).
SYNTHETIC_MOTIONS: list[tuple[tuple[float, float, float], tuple[float, float, float]]] = [
    ((0.0, 0.0, 0.0), (0.0, 0.0, 0.0)),
    ((15.0, 0.0, 0.0), (0.0, 15.0, 0.0)),
    ((0.0, -15.0, 0.0), (15.0, 0.0, 0.0)),
    ((0.0, 0.0, 15.0), (0.0, 0.0, -15.0)),
    ((-15.0, 15.0, -15.0), (15.0, -15.0, 15.0)),
    ((7.0, -11.0, 4.0), (-6.0, 9.0, 12.0)),
]


@dataclass(frozen=True)
class Row:
    """One benchmark line."""

    case: str
    grid_mm: str
    engine: str
    dof: int
    mean_error_mm: float
    max_error_mm: float
    seconds: float
    cpu_seconds: float
    target_mm: float

    @property
    def ok(self) -> bool:
        return self.mean_error_mm <= self.target_mm and self.seconds <= 30.0


def axial_grid(spacing: tuple[float, float, float], fov_mm: tuple[float, float, float],
               center_mm: np.ndarray, rotation: np.ndarray | None = None) -> tuple[tuple[int, int, int], np.ndarray]:
    """Shape and RAS affine of an axial grid of ``spacing`` mm covering ``fov_mm`` about ``center_mm``."""
    shape = tuple(int(round(f / s)) for f, s in zip(fov_mm, spacing))
    axes = np.diag(spacing) if rotation is None else rotation @ np.diag(spacing)
    affine = np.eye(4)
    affine[:3, :3] = axes
    affine[:3, 3] = center_mm - axes @ ((np.array(shape) - 1) / 2)
    return shape, affine


def sample_thick_slices(template: np.ndarray, template_affine: np.ndarray, shape: tuple[int, int, int],
                        affine: np.ndarray, world_to_template_world: np.ndarray) -> np.ndarray:
    """Sample ``template`` on a grid, averaging 5 points across each slice's thickness (slice profile)."""
    out = np.zeros(shape, dtype=np.float32)
    vox_to_tvox = np.linalg.inv(template_affine) @ world_to_template_world @ affine
    for dz in np.linspace(-0.4, 0.4, 5):
        shift = vox_to_tvox[:3, :3] @ np.array([0.0, 0.0, dz]) + vox_to_tvox[:3, 3]
        out += ndimage.affine_transform(template, vox_to_tvox[:3, :3], offset=shift, output_shape=shape,
                                        order=1, mode="constant", cval=0.0)
    return out / 5


def make_synthetic_pair(template_img: nib.Nifti1Image, angles_deg, translation_mm, spacing, workdir: Path,
                        seed: int = 0) -> tuple[Path, Path, np.ndarray, np.ndarray]:
    """Write a fixed (T1-like) and a moved, T2-like moving image; return paths, true moving_to_fixed,
    and the fixed brain points (N×3 mm)."""
    rng = np.random.default_rng(seed)
    t = np.asarray(template_img.dataobj, dtype=np.float32)
    brain = t > 0.05
    centre = voxel_points_mm(brain, template_img.affine, step=4).mean(axis=0)
    fov = (224.0, 224.0, 180.0)
    f_shape, f_aff = axial_grid(spacing, fov, centre)
    true = rigid_matrix(angles_deg, translation_mm, centre)  # moving world -> fixed (= template) world
    m_shape, m_aff = axial_grid(spacing, fov, centre + rng.uniform(-5, 5, 3))
    fixed = sample_thick_slices(t, template_img.affine, f_shape, f_aff, np.eye(4))
    # T2-like contrast: CSF bright, WM dark, smooth bias field, noise.
    t2 = np.where(brain, (1.15 - t) ** 1.5, 0.0).astype(np.float32)
    moving = sample_thick_slices(t2, template_img.affine, m_shape, m_aff, true)
    ijk = np.indices(m_shape, dtype=np.float32)
    bias = 1.0 + 0.15 * (ijk[0] / m_shape[0] - 0.5) - 0.1 * (ijk[2] / m_shape[2] - 0.5)
    moving = moving * bias
    fixed = fixed + rng.normal(0, 0.02 * fixed.max(), fixed.shape).astype(np.float32)
    moving = moving + rng.normal(0, 0.02 * moving.max(), moving.shape).astype(np.float32)
    fixed_path, moving_path = workdir / "fixed.nii.gz", workdir / "moving.nii.gz"
    nib.save(nib.Nifti1Image(np.clip(fixed, 0, None) * 1000, f_aff), fixed_path)
    nib.save(nib.Nifti1Image(np.clip(moving, 0, None) * 1000, m_aff), moving_path)
    f_brain = sample_thick_slices(brain.astype(np.float32), template_img.affine, f_shape, f_aff, np.eye(4)) > 0.5
    return moving_path, fixed_path, true, voxel_points_mm(f_brain, f_aff, step=2)


def errors(estimate: np.ndarray, truth: np.ndarray, points: np.ndarray) -> tuple[float, float]:
    d = displacement_mm(np.linalg.inv(estimate), np.linalg.inv(truth), points)
    return float(d.mean()), float(d.max())


def run_synthetic(args: argparse.Namespace) -> list[Row]:
    from nilearn.datasets import load_mni152_template

    template = load_mni152_template(resolution=1)
    rows: list[Row] = []
    cases = [(a, t, (0.7, 0.7, 3.0)) for a, t in SYNTHETIC_MOTIONS]
    cases.append((SYNTHETIC_MOTIONS[5][0], SYNTHETIC_MOTIONS[5][1], (1.4, 1.4, 3.0)))
    for i, (angles, shift, spacing) in enumerate(cases):
        with tempfile.TemporaryDirectory() as tmp:
            moving, fixed, truth, points = make_synthetic_pair(template, angles, shift, spacing, Path(tmp), seed=i)
            t0, c0 = time.perf_counter(), time.process_time()
            res = register(moving, fixed, dof=args.dof, engine=args.engine, threads=args.threads,
                           max_displacement_mm=120.0)
            seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        mean, worst = errors(res.moving_to_fixed, truth, points)
        name = "synthetic rot({:g},{:g},{:g})deg shift({:g},{:g},{:g})mm".format(*angles, *shift)
        rows.append(Row(name, "x".join(f"{s:g}" for s in spacing), res.engine, args.dof, mean, worst, seconds, cpu, 0.5))
        print(f"  {name} grid {spacing} mm: mean {mean:.3f} mm, max {worst:.3f} mm, {seconds:.1f} s", flush=True)
    return rows


def run_real(args: argparse.Namespace) -> list[Row]:
    session = Path(args.data) / "raw_unregistered" / "patient12_study1"
    if not (session / "FLAIR.nii.gz").is_file():
        print(f"  real data not found at {session}: skipping (b). Pass --data to point at open_ms_data.")
        return []
    flair = nib.load(str(session / "FLAIR.nii.gz"))
    head = foreground_mask(np.asarray(flair.dataobj, dtype=np.float32))
    points = voxel_points_mm(head, flair.affine, step=2)
    rows: list[Row] = []
    for contrast in ("T1W", "T2W"):
        reference = read_itk_transform(session / f"{contrast}_to_FLAIR.itk.txt")
        t0, c0 = time.perf_counter(), time.process_time()
        res = register(session / f"{contrast}.nii.gz", session / "FLAIR.nii.gz", dof=args.dof,
                       engine=args.engine, threads=args.threads)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        mean, worst = errors(res.moving_to_fixed, reference, points)
        header_mean, _ = errors(np.eye(4), reference, points)
        zooms = "x".join(f"{z:.2f}" for z in nib.load(str(session / f"{contrast}.nii.gz")).header.get_zooms()[:3])
        rows.append(Row(f"real patient12 {contrast}->FLAIR", zooms, res.engine, args.dof, mean, worst, seconds, cpu, 1.0))
        print(f"  {contrast}->FLAIR: mean {mean:.3f} mm (header alone {header_mean:.3f} mm), max {worst:.3f} mm, "
              f"{seconds:.1f} s", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(REPO / "results" / "benchmarks" / "registration.csv"))
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "open_ms_data"),
                   help="open_ms_data folder (default: ../shared/data/open_ms_data beside the repo)")
    p.add_argument("--engine", default="simpleitk", choices=("auto", "flirt", "simpleitk"))
    p.add_argument("--dof", type=int, default=6, choices=(6, 12))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip-synthetic", action="store_true")
    p.add_argument("--skip-real", action="store_true")
    args = p.parse_args(argv)

    print(f"threads={args.threads}, engine={args.engine}, dof={args.dof}, "
          f"load average at start {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs", flush=True)
    rows: list[Row] = []
    try:
        if not args.skip_synthetic:
            print("(a) synthetic MNI152 pairs", flush=True)
            rows += run_synthetic(args)
        if not args.skip_real:
            print("(b) real session open_ms_data/raw_unregistered/patient12_study1", flush=True)
            rows += run_real(args)
    except RegistrationError as exc:
        print(f"registration failed: {exc}", file=sys.stderr)
        return 1

    header = (f"{'case':46s} {'grid mm':>14s} {'engine':>9s} {'dof':>3s} {'mean mm':>8s} {'max mm':>7s} "
              f"{'target':>6s} {'wall s':>6s} {'cpu s':>6s} ok")
    print("\n" + header + "\n" + "-" * len(header))
    for r in rows:
        print(f"{r.case:46s} {r.grid_mm:>14s} {r.engine:>9s} {r.dof:>3d} {r.mean_error_mm:8.3f} "
              f"{r.max_error_mm:7.3f} {r.target_mm:6.1f} {r.seconds:6.1f} {r.cpu_seconds:6.1f} {'yes' if r.ok else 'NO'}")
    for kind in ("synthetic", "real"):
        sel = [r for r in rows if r.case.startswith(kind)]
        if sel:
            print(f"{kind}: mean error {np.mean([r.mean_error_mm for r in sel]):.3f} mm "
                  f"(worst case {max(r.mean_error_mm for r in sel):.3f} mm), "
                  f"{np.mean([r.seconds for r in sel]):.1f} s per pair (max {max(r.seconds for r in sel):.1f} s; "
                  f"cpu {np.mean([r.cpu_seconds for r in sel]):.1f} s), threads={args.threads}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["case", "grid_mm", "engine", "dof", "mean_error_mm", "max_error_mm", "target_mm", "seconds",
                    "cpu_seconds", "threads", "ok"])
        for r in rows:
            w.writerow([r.case, r.grid_mm, r.engine, r.dof, f"{r.mean_error_mm:.4f}", f"{r.max_error_mm:.4f}",
                        r.target_mm, f"{r.seconds:.2f}", f"{r.cpu_seconds:.2f}", args.threads, r.ok])
    print(f"wrote {out}")
    return 0 if all(r.ok for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
