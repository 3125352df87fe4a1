"""BIDS datasets as the study's input: one case per subject and session, masks from derivatives.

A BIDS dataset holds the raw scans (``sub-<label>[/ses-<label>]/anat/..._T1w.nii.gz``, ``_T2w``,
``_FLAIR``); the expert lesion masks are a derivative (``<derivatives folder>/sub-<label>/
[ses-<label>/]anat/..._label-lesion_mask.nii.gz``, the BIDS convention for masks). The files are
found with pybids, not by globbing. :func:`bids_sheet` turns them into the subject sheet the
workflow reads: one row (a *case*) per subject and session, with the ``participant`` it belongs to,
so that every session of one person lands on the same side of every split.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pandas as pd

from .checks import InputCheckError

log = logging.getLogger(__name__)

#: BIDS suffix of each contrast the study needs.
CONTRASTS = {"t1": "T1w", "t2": "T2w", "flair": "FLAIR"}
_NIFTI = [".nii.gz", ".nii"]


def bids_sheet(bids: str | os.PathLike, lesions: str, label: str = "lesion") -> pd.DataFrame:
    """The subject sheet of a BIDS dataset: columns subject, participant, t1, t2, flair, lesions.

    Args:
        bids: root folder of the BIDS dataset (has ``dataset_description.json``); a relative path
            is taken from the working directory (Snakemake's ``--directory``).
        lesions: the derivatives folder with the lesion masks, relative to ``bids`` or absolute
            (a BIDS derivatives dataset: its own ``dataset_description.json`` with ``GeneratedBy``).
        label: the ``label-`` entity of the masks (``..._label-<label>_mask.nii.gz``).

    A case is ``sub-<s>`` (no sessions) or ``sub-<s>_ses-<t>``; ``participant`` is ``sub-<s>``.
    Paths are absolute.

    Raises:
        InputCheckError: the dataset cannot be read, or some cases lack a contrast or a mask, or
            have more than one candidate file; every such case is listed in one message.
    """
    from bids import BIDSLayout
    from bids.layout import Query

    root = Path(bids).expanduser().resolve()
    derivatives = Path(lesions).expanduser()
    derivatives = derivatives.resolve() if derivatives.is_absolute() else (root / derivatives).resolve()
    for folder, what in ((root, "BIDS dataset"), (derivatives, "lesion derivatives folder")):
        if not (folder / "dataset_description.json").is_file():
            raise InputCheckError(
                f"subjects.bids: the {what} {str(folder)!r} has no dataset_description.json; "
                "point subjects.bids / subjects.lesions at a BIDS dataset and its derivatives"
            )
    try:
        layout = BIDSLayout(str(root), derivatives=[str(derivatives)], validate=True)
    except Exception as err:  # pybids raises several kinds for unreadable datasets
        raise InputCheckError(f"subjects.bids: pybids cannot read the dataset {str(root)!r} or its lesion "
                              f"derivatives {str(derivatives)!r}: {err}") from err

    rows, problems = [], []
    for subject in sorted(layout.get_subjects(scope="raw")):
        sessions = sorted(layout.get_sessions(subject=subject, scope="raw")) or [None]
        for session in sessions:
            case = f"sub-{subject}" + (f"_ses-{session}" if session else "")
            where = {"subject": subject, "session": session if session else Query.NONE}
            row = {"subject": case, "participant": f"sub-{subject}"}
            found = {
                key: layout.get(scope="raw", datatype="anat", suffix=suffix, extension=_NIFTI,
                                return_type="filename", **where)
                for key, suffix in CONTRASTS.items()
            }
            found["lesions"] = layout.get(scope="derivatives", suffix="mask", label=label, extension=_NIFTI,
                                          return_type="filename", **where)
            for key, files in found.items():
                what = f"_label-{label}_mask" if key == "lesions" else f"_{CONTRASTS[key]}"
                if not files:
                    problems.append(f"{case}: no {what} image" + (" in the derivatives" if key == "lesions" else ""))
                elif len(files) > 1:
                    names = ", ".join(Path(f).name for f in sorted(files))
                    problems.append(f"{case}: {len(files)} {what} images ({names}); keep one per session")
                else:
                    row[key] = str(files[0])
            rows.append(row)
    if not rows:
        raise InputCheckError(f"subjects.bids: no subjects found in {str(root)!r}")
    if problems:
        raise InputCheckError(
            f"{len(problems)} problem(s) in the BIDS dataset {str(root)!r} (masks from {str(derivatives)!r}):\n"
            + "\n".join(f"  - {p}" for p in problems)
        )
    sheet = pd.DataFrame(rows, columns=["subject", "participant", "t1", "t2", "flair", "lesions"])
    log.info("BIDS dataset %s: %d cases of %d participants", root, len(sheet), sheet.participant.nunique())
    return sheet
