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
from typing import Mapping, Sequence

import pandas as pd

from .checks import InputCheckError

log = logging.getLogger(__name__)

#: BIDS suffix of each contrast the study needs.
CONTRASTS = {"t1": "T1w", "t2": "T2w", "flair": "FLAIR"}
_NIFTI = [".nii.gz", ".nii"]


def find_cases(layout, wanted: Mapping[str, str], label: str = "lesion", participants: Sequence[str] | None = None,
               sessions: Sequence[str] | None = None) -> tuple[list[dict], list[tuple[str, str]]]:
    """The cases (one per subject and session) of a pybids ``layout`` and their files.

    Args:
        layout: a ``bids.BIDSLayout`` of the raw dataset (with the lesion derivatives if
            ``wanted`` names ``lesions``).
        wanted: row key -> BIDS suffix (``T1w``, ``T2w``, ``FLAIR``) or ``label-<label>_mask``
            for the lesion mask in the derivatives.
        participants, sessions: keep only these labels (with or without ``sub-``/``ses-``).

    Returns:
        ``rows``: per case whose every wanted file was found exactly once, ``{"subject": case,
        "participant": "sub-<s>", "session": "<t>" or None, key: absolute path, ...}`` (a case is
        ``sub-<s>`` or ``sub-<s>_ses-<t>``); ``problems``: ``(case, message)`` for each case with a
        file missing or found more than once (the message names the files).
    """
    from bids.layout import Query

    keep_sub = {p.removeprefix("sub-") for p in participants} if participants else None
    keep_ses = {s.removeprefix("ses-") for s in sessions} if sessions else None
    rows, problems = [], []
    for subject in sorted(layout.get_subjects(scope="raw")):
        if keep_sub is not None and subject not in keep_sub:
            continue
        for session in sorted(layout.get_sessions(subject=subject, scope="raw")) or [None]:
            if keep_ses is not None and session not in keep_ses:
                continue
            case = f"sub-{subject}" + (f"_ses-{session}" if session else "")
            where = {"subject": subject, "session": session if session else Query.NONE}
            row = {"subject": case, "participant": f"sub-{subject}", "session": session}
            missing = []
            for key, suffix in wanted.items():
                if key == "lesions":
                    files = layout.get(scope="derivatives", suffix="mask", label=label, extension=_NIFTI,
                                       return_type="filename", **where)
                else:
                    files = layout.get(scope="raw", datatype="anat", suffix=suffix, extension=_NIFTI,
                                       return_type="filename", **where)
                if not files:
                    missing.append(key)
                    problems.append((case, f"no _{suffix} image" + (" in the derivatives" if key == "lesions" else "")))
                elif len(files) > 1:
                    names = ", ".join(Path(f).name for f in sorted(files))
                    missing.append(key)
                    problems.append((case, f"{len(files)} _{suffix} images ({names}); keep one per session"))
                else:
                    row[key] = str(files[0])
            if not missing:
                rows.append(row)
    return rows, problems


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

    rows, problems = find_cases(layout, {**CONTRASTS, "lesions": f"label-{label}_mask"}, label=label)
    problems = [f"{case}: {p}" for case, p in problems]
    if problems:
        raise InputCheckError(
            f"{len(problems)} problem(s) in the BIDS dataset {str(root)!r} (masks from {str(derivatives)!r}):\n"
            + "\n".join(f"  - {p}" for p in problems)
        )
    if not rows:
        raise InputCheckError(f"subjects.bids: no subjects found in {str(root)!r}")
    sheet = pd.DataFrame(rows, columns=["subject", "participant", "t1", "t2", "flair", "lesions"])
    log.info("BIDS dataset %s: %d cases of %d participants", root, len(sheet), sheet.participant.nunique())
    return sheet
