"""The preprocessing step (workflow/rules/preprocess.smk): crop to the brain, z-score, one file per subject.

Each step reads its files, calls the package's pure code and writes its outputs through
:func:`rsanet.files.staged`; a script of ``scripts/`` calls one of them.
"""

from __future__ import annotations

import logging
from typing import Mapping

import nibabel as nib
import numpy as np

# Heavy libraries (torch, matplotlib, SimpleITK, pandas) are imported inside the steps that need
# them, so light steps start in a fraction of a second (pandas: 0.15-0.26 s for each of the demo's
# 164 synthesis, registration, preprocessing and training jobs, which do not use it).
from ..volumes import (
    CONTRASTS,
    binarise_mask,
    load_checked,
    preprocess_subject,
    require_same_grid,
)



log = logging.getLogger(__name__)


def preprocess_step(subject: str, images: Mapping[str, str], lesions: str, out: str, margin: int = 2,
                    allow_empty_mask: bool = False) -> None:
    """Co-registered T1/T2/FLAIR + mask -> ``out`` (.npz, model layout, brain crop, z-scored).

    ``allow_empty_mask``: accept an all-zero mask (a subject without lesions).
    """
    imgs = {c: load_checked(images[c], subject, c) for c in CONTRASTS}
    mask_img = load_checked(lesions, subject, "lesion mask", allow_empty=allow_empty_mask)
    ref = imgs["FLAIR"]
    for c, img in imgs.items():
        require_same_grid(img, ref, subject, f"{c} file", images[c], images["FLAIR"])
    require_same_grid(mask_img, ref, subject, "lesion mask", lesions, images["FLAIR"])
    mask_img = nib.Nifti1Image(binarise_mask(np.asarray(mask_img.dataobj), subject, lesions), mask_img.affine)
    pre = preprocess_subject(imgs["T1"], imgs["T2"], imgs["FLAIR"], mask_img, margin=margin)
    log.info("%s: cropped to %s voxels of %s mm, %d lesion voxels",
             subject, pre.lesions.shape, tuple(round(s, 3) for s in pre.spacing), int(pre.lesions.sum()))
    pre.save(out)

