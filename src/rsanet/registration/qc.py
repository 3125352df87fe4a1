"""The registration QC figure: the moving image's edges over the fixed image, before and after."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping

import nibabel as nib
import numpy as np
from scipy import ndimage

from ..files import staged
from .core import (
    PathLike,
)
from .images import (
    foreground_mask,
)

log = logging.getLogger("rsanet.registration")


# ---------------------------------------------------------------------------------------------
# QC figure
# ---------------------------------------------------------------------------------------------
def _edges(data: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """Gradient magnitude (per mm) of a lightly smoothed volume."""
    smooth = ndimage.gaussian_filter(data.astype(np.float32), sigma=1.0 / spacing)
    grads = np.gradient(smooth, *spacing)
    return np.sqrt(sum(g * g for g in grads))


def registration_qc_figure(
    fixed: nib.Nifti1Image | PathLike,
    registered: Mapping[str, nib.Nifti1Image | PathLike],
    out_png: PathLike,
    *,
    title: str | None = None,
) -> Path:
    """Save a PNG with the fixed image on axial, coronal and sagittal slices through the brain
    centre and, over it, the strongest edges of each registered contrast (one colour each).

    All ``registered`` images must lie on the fixed grid (output of :func:`resample_to_fixed`).
    """
    from matplotlib.figure import (
        Figure,  # no pyplot: no global backend state, Agg for PNG
    )

    fixed_img = nib.as_closest_canonical(fixed if isinstance(fixed, nib.Nifti1Image) else nib.load(str(fixed)))
    f = np.asarray(fixed_img.dataobj, dtype=np.float32)
    spacing = np.linalg.norm(fixed_img.affine[:3, :3], axis=0)
    mask = foreground_mask(f)
    center = np.round(ndimage.center_of_mass(mask)).astype(int) if mask.any() else np.array(f.shape) // 2
    lo, hi = np.percentile(f[mask] if mask.any() else f, [1, 99.5])
    colors = ["#ff3b30", "#34c759", "#0a84ff", "#ffcc00", "#bf5af2"]
    views = [("axial", 2), ("coronal", 1), ("sagittal", 0)]
    fig = Figure(figsize=(12, 4.4), facecolor="black")
    axes = fig.subplots(1, 3)
    for ax, (name, axis) in zip(axes, views):
        sl = [slice(None)] * 3
        sl[axis] = int(center[axis])
        keep = [a for a in range(3) if a != axis]
        extent = (0, f.shape[keep[0]] * spacing[keep[0]], 0, f.shape[keep[1]] * spacing[keep[1]])
        ax.imshow(f[tuple(sl)].T, cmap="gray", vmin=lo, vmax=hi, origin="lower", extent=extent,
                  interpolation="nearest")
        for (label, img), color in zip(registered.items(), colors):
            im = img if isinstance(img, nib.Nifti1Image) else nib.load(str(img))
            im = nib.as_closest_canonical(im)
            r = np.asarray(im.dataobj, dtype=np.float32)
            if r.shape[:3] != f.shape:
                raise ValueError(f"QC: {label} is not on the fixed grid ({r.shape} vs {f.shape})")
            e = _edges(r, spacing)[tuple(sl)].T
            level = np.percentile(e[e > 0], 90) if np.any(e > 0) else 1.0
            ax.contour(e, levels=[level], colors=[color], linewidths=0.6, origin="lower", extent=extent)
            if axis == 2:
                ax.plot([], [], color=color, label=label)
        ax.set_title(f"{name} slice {int(center[axis])}", color="white", fontsize=9)
        ax.set_axis_off()
        ax.set_aspect("equal")
    handles = axes[0].get_legend_handles_labels()
    if handles[0]:
        axes[0].legend(loc="lower left", fontsize=7, framealpha=0.6)
    if title:
        fig.suptitle(title, color="white", fontsize=10)
    fig.tight_layout()
    out = Path(out_png)
    with staged([out]) as (tmp,):
        fig.savefig(tmp, dpi=110, facecolor="black")
    return out


