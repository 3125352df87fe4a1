"""The BIDS App of a study's export: ``rsanet-bids bids_dir output_dir participant|group``.

The convention of BIDS Apps (fMRIPrep and others): the raw dataset, an output folder, the level.

``participant`` finds every subject's (and session's) T1w, T2w and FLAIR with pybids, segments each
case with :func:`rsanet.segment.segment` (the study's registration, preprocessing, prediction
policy, ensemble and threshold, all from the export), and writes a BIDS-Derivatives dataset::

    output_dir/dataset_description.json                 DatasetType derivative, GeneratedBy rsanet
    output_dir/sub-<s>/[ses-<t>/]anat/
        sub-<s>[_ses-<t>]_label-lesion_probseg.nii.gz   the ensemble's lesion probability (+ .json)
        sub-<s>[_ses-<t>]_label-lesion_mask.nii.gz      the lesion mask; its .json: the model, the
                                                        export's hash, the threshold, the agreement
                                                        definition, the source files, lesion count
                                                        and volume, warnings, timings
        sub-<s>[_ses-<t>]_desc-lesions_dseg.nii.gz      lesion k of the table has value k (+ .json)
        sub-<s>[_ses-<t>]_lesions.tsv                   one row per lesion (+ .json: columns, units)
    output_dir/sub-<s>/[ses-<t>/]figures/sub-<s>[_ses-<t>]_qc.png

Every image lies on the case's own FLAIR grid (shape, affine, voxel order). A case that cannot be
segmented (a contrast missing or twice, a 4D or unreadable image) is named with its file and
reason; the other cases are segmented, nothing of the failed one is written, and the exit code is 1.

``group`` reads the participants' outputs and writes the cohort table (``cohort.tsv``, one row per
subject and session, with ``cohort.json`` describing its columns) and ``figures/cohort.png``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Sequence

import pandas as pd

from .bids import CONTRASTS, find_cases
from .checks import InputCheckError
from .export import ExportError, read_export
from .files import staged
from .segment import LESION_COLUMNS, segment
from .volumes import InputError

log = logging.getLogger(__name__)

BIDS_VERSION = "1.9.0"

#: rsanet-segment's output -> the derivative's name after the case's entities (``sub-<s>[_ses-<t>]``).
DERIVATIVES = {
    "lesion_prob.nii.gz": "label-lesion_probseg.nii.gz",
    "lesions.nii.gz": "label-lesion_mask.nii.gz",
    "lesion_labels.nii.gz": "desc-lesions_dseg.nii.gz",
}


def export_sha256(folder: Path, meta: dict) -> str:
    """One hash of an export: sha256 over ``export.json`` and the model files it lists, in order."""
    h = hashlib.sha256()
    for name in ["export.json", *meta["models"]]:
        h.update(hashlib.sha256((folder / name).read_bytes()).digest())
    return h.hexdigest()


def write_dataset_description(out: Path, bids_dir: Path, export: Path, meta: dict) -> None:
    """``out/dataset_description.json`` of the derivatives (BIDS-Derivatives: ``DatasetType``,
    ``GeneratedBy``, ``SourceDatasets``)."""
    from . import __version__

    description = {
        "Name": f"rsanet lesion segmentation ({meta['variant']})",
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "derivative",
        "GeneratedBy": [{"Name": "rsanet", "Version": __version__,
                         "Description": f"rsanet-bids with an export of variant {meta['variant']} (ExportSHA256 "
                                        f"{export_sha256(export, meta)}); research use, not a medical device"}],
        "SourceDatasets": [{"URL": bids_dir.resolve().as_uri()}],
        "DatasetLinks": {"raw": bids_dir.resolve().as_uri()},
    }
    with staged([out / "dataset_description.json"]) as (tmp,):
        tmp.write_text(json.dumps(description, indent=2) + "\n")


def _sources(bids_dir: Path, row: dict) -> list[str]:
    return [f"bids:raw:{Path(row[k]).relative_to(bids_dir.resolve())}" for k in CONTRASTS]


def write_case(seg: Path, case_dir: Path, row: dict, bids_dir: Path, summary: dict, export_hash: str) -> None:
    """Rename one case's rsanet-segment outputs (folder ``seg``) into ``case_dir`` with BIDS names
    and sidecars. ``row``: the case (:func:`rsanet.bids.find_cases`)."""
    anat = case_dir / "anat"
    anat.mkdir(parents=True)
    (case_dir / "figures").mkdir()
    stem = row["subject"]
    relative = f"{case_folder(row)}/anat"
    sources = _sources(bids_dir, row)
    threshold = summary["settings"]["threshold"]
    for name, suffix in DERIVATIVES.items():
        shutil.move(seg / name, anat / f"{stem}_{suffix}")
    # the table as TSV (BIDS tables), its columns described beside it
    pd.read_csv(seg / "lesions.csv").to_csv(anat / f"{stem}_lesions.tsv", sep="\t", index=False, na_rep="n/a")
    shutil.move(seg / "qc.png", case_dir / "figures" / f"{stem}_qc.png")
    sidecars = {
        "label-lesion_probseg": {
            "Description": "lesion probability: the mean over the export's models of each model's sigmoid output",
            "Sources": sources, "Model": summary["model"], "ExportSHA256": export_hash},
        "label-lesion_mask": {
            "Type": "Lesion",
            "Description": f"MS lesions: the ensemble's probability above {threshold:g} (the study's predict.threshold "
                           f"unless overridden), lesions of at most {summary['settings']['min_lesion_mm3']:g} mm^3 "
                           "removed; lesion_count and total_lesion_volume_ml are of this mask",
            "Sources": sources, "Threshold": threshold, "ExportSHA256": export_hash,
            "AgreementDefinition": LESION_COLUMNS["agreement"]["Description"], **summary},
        "desc-lesions_dseg": {
            "Description": f"the lesions of {stem}_label-lesion_mask.nii.gz numbered: value k = row 'lesion' k of "
                           f"{stem}_lesions.tsv (1 = largest), 0 = background",
            "Sources": [f"bids::{relative}/{stem}_label-lesion_mask.nii.gz"]},
    }
    for key, sidecar in sidecars.items():
        (anat / f"{stem}_{key}.json").write_text(json.dumps(sidecar, indent=2) + "\n")
    columns = json.loads((seg / "lesions.json").read_text())
    (anat / f"{stem}_lesions.json").write_text(json.dumps(columns, indent=2) + "\n")


def case_folder(row: dict) -> str:
    """The case's folder in the derivatives: ``sub-<s>`` or ``sub-<s>/ses-<t>``."""
    return row["participant"] + (f"/ses-{row['session']}" if row["session"] else "")


def segment_case(row: dict, bids_dir: str | os.PathLike, out: str | os.PathLike, model: str | os.PathLike,
                 device: str = "auto", threads: int = 1, tta: bool = False, threshold: float | None = None,
                 min_lesion_mm3: float = 3.0, spacing: str | None = None) -> dict:
    """Segment one case (a row of :func:`rsanet.bids.find_cases`) of ``bids_dir`` into its folder of
    the derivatives ``out`` (:func:`case_folder`), written as a whole or not at all; returns
    rsanet-segment's summary. Raises :class:`InputError` naming the case and the file."""
    folder = Path(model)
    meta = read_export(folder)
    case_dir = Path(out) / case_folder(row)
    try:
        with staged([case_dir], folders=True) as (tmp,):
            seg = tmp.parent / f".{tmp.name}.segment"
            try:
                summary = segment(folder, row["t1"], row["t2"], row["flair"], seg, device=device,
                                  threshold=threshold, min_lesion_mm3=min_lesion_mm3, tta=tta, threads=threads,
                                  subject=row["subject"], spacing=spacing)
                write_case(seg, tmp, row, Path(bids_dir).resolve(), summary, export_sha256(folder, meta))
            finally:
                shutil.rmtree(seg, ignore_errors=True)
    except InputError:
        if row["session"] and case_dir.parent.is_dir() and not any(case_dir.parent.iterdir()):
            case_dir.parent.rmdir()  # a participant folder left empty by its only, failed session
        raise
    return summary


def participant(bids_dir: str | os.PathLike, out: str | os.PathLike, model: str | os.PathLike,
                participants: Sequence[str] | None = None, sessions: Sequence[str] | None = None,
                **options) -> list[str]:
    """Segment every selected case of ``bids_dir`` into the derivatives dataset ``out``
    (:func:`segment_case`; ``options``: its device, threads, tta, threshold, min_lesion_mm3).

    Returns one message per case that failed (naming the case and the file); every other case
    is written. Raises :class:`ExportError` for an unusable export and :class:`InputCheckError`
    for a folder pybids cannot read or one without a selected case.
    """
    root, out, folder = Path(bids_dir).resolve(), Path(out).resolve(), Path(model)
    meta = read_export(folder)
    rows, problems = bids_cases(root, participants, sessions)
    failed = [f"{case}: {message}" for case, message in problems]
    out.mkdir(parents=True, exist_ok=True)
    write_dataset_description(out, root, folder, meta)
    for i, row in enumerate(rows, 1):
        log.info("case %d/%d: %s", i, len(rows), row["subject"])
        try:
            segment_case(row, root, out, folder, **options)
        except InputError as err:
            failed.append(str(err))  # names the case (the subject) and the file
            log.error("%s", err)
    return failed


def bids_cases(bids_dir: str | os.PathLike, participants: Sequence[str] | None = None,
               sessions: Sequence[str] | None = None) -> tuple[list[dict], list[tuple[str, str]]]:
    """The cases of a raw BIDS dataset with their T1w, T2w and FLAIR (:func:`rsanet.bids.find_cases`).

    Raises:
        InputCheckError: not a BIDS dataset, unreadable by pybids, or no case selected.
    """
    from bids import BIDSLayout

    root = Path(bids_dir).resolve()
    if not (root / "dataset_description.json").is_file():
        raise InputCheckError(f"{root}: not a BIDS dataset (no dataset_description.json)")
    try:
        layout = BIDSLayout(str(root), validate=False)
    except Exception as err:  # pybids raises several kinds for unreadable datasets
        raise InputCheckError(f"{root}: pybids cannot read the dataset: {err}") from err
    rows, problems = find_cases(layout, CONTRASTS, participants=participants, sessions=sessions)
    if not rows and not problems:
        raise InputCheckError(f"{root}: no case (subject/session) matches participant label(s) {participants or 'any'}"
                              f" and session label(s) {sessions or 'any'}")
    return rows, problems


def case_outputs(out: Path) -> dict[str, tuple[dict, pd.DataFrame]]:
    """The participants' outputs in the derivatives ``out``: case -> (mask sidecar, lesion table)."""
    cases = {}
    for sidecar in sorted(out.glob("sub-*/**/anat/*_label-lesion_mask.json")):
        case = sidecar.name.removesuffix("_label-lesion_mask.json")
        table = pd.read_csv(sidecar.with_name(f"{case}_lesions.tsv"), sep="\t", na_values="n/a")
        cases[case] = (json.loads(sidecar.read_text()), table)
    return cases


def group(out: str | os.PathLike, size_bins_mm3: Sequence[float]) -> pd.DataFrame:
    """The cohort of the derivatives ``out``: ``cohort.tsv`` (+ ``cohort.json``) and
    ``figures/cohort.png`` from every case the participant level wrote; returns the table."""
    from . import evaluation, figures

    out = Path(out)
    cases = case_outputs(out)
    if not cases:
        raise InputCheckError(f"{out}: no participant output (*_label-lesion_mask.json); run the participant level "
                              "first")
    table = evaluation.cohort_table({c: s for c, (s, _) in cases.items()}, {c: t for c, (_, t) in cases.items()},
                                    size_bins_mm3)
    entities = table.subject.str.extract(r"^(sub-[^_]+)(?:_(ses-[^_]+))?$")
    table.insert(1, "participant_id", entities[0])
    table.insert(2, "session_id", entities[1].fillna("n/a"))
    columns = evaluation.cohort_columns(table)
    columns["subject"] = {"Description": "the case: sub-<label>[_ses-<label>], the prefix of its files", "Units": "n/a"}
    columns["participant_id"] = {"Description": "BIDS participant", "Units": "n/a"}
    columns["session_id"] = {"Description": "BIDS session (n/a: the dataset has no sessions)", "Units": "n/a"}
    with staged([out / "cohort.tsv", out / "cohort.json"]) as (tsv, sidecar):
        table.to_csv(tsv, sep="\t", index=False, na_rep="n/a")
        sidecar.write_text(json.dumps(columns, indent=2) + "\n")
    (out / "figures").mkdir(exist_ok=True)
    figures.cohort_load(table, str(out / "figures" / "cohort"))
    (out / "figures" / "cohort.pdf").unlink(missing_ok=True)
    return table


def group_step(bids_dir: str | os.PathLike, out: str | os.PathLike, model: str | os.PathLike,
               size_bins_mm3: Sequence[float]) -> None:
    """The workflow's ``bids_group`` rule: the derivatives' ``dataset_description.json`` (as the
    participant level writes it) and the group level (:func:`group`)."""
    folder = Path(model)
    write_dataset_description(Path(out), Path(bids_dir), folder, read_export(folder))
    table = group(out, size_bins_mm3)
    log.info("cohort of %d cases -> %s", len(table), Path(out) / "cohort.tsv")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rsanet-bids", description="BIDS App: segment MS lesions of a BIDS dataset "
                                "with an exported RSANet-study model (research use, not a medical device).")
    p.add_argument("bids_dir", help="the BIDS dataset (T1w, T2w and FLAIR per subject/session in anat/)")
    p.add_argument("output_dir", help="the derivatives dataset to write (created if needed)")
    p.add_argument("analysis_level", choices=["participant", "group"])
    p.add_argument("--model", help="export folder (results/export/<variant>); needed at the participant level (the "
                   "group level takes its lesion-volume bins, by default from the export that wrote the outputs)")
    p.add_argument("--participant-label", nargs="+", help="only these participants (with or without sub-)")
    p.add_argument("--session-label", nargs="+", help="only these sessions (with or without ses-)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--threads", type=int, default=1, help="CPU threads for registration and prediction")
    p.add_argument("--tta", action="store_true", help="also average mirrored copies along each axis")
    p.add_argument("--threshold", type=float, default=None,
                   help="lesion where the ensemble's probability exceeds it (default: the study's predict.threshold)")
    p.add_argument("--min-lesion-mm3", type=float, default=3.0)
    p.add_argument("--spacing", choices=["study", "own"], default=None, help="predict at the study's voxel size "
                   "(mapped back onto each scan's grid) or on the scan's own grid (default: the export's predict.spacing)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Console script ``rsanet-bids``: 0 when every case is done, 1 when some case failed (the
    others are done), 2 on a usage error, an unusable export or an unreadable dataset."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.analysis_level == "group":
            meta = read_export(Path(args.model)) if args.model else _first_export(Path(args.output_dir))
            table = group(args.output_dir, meta["evaluation"]["size_bins_mm3"])
            print(f"rsanet-bids: cohort of {len(table)} cases -> {Path(args.output_dir) / 'cohort.tsv'}")
            return 0
        if not args.model:
            print("rsanet-bids: error: the participant level needs --model EXPORT", file=sys.stderr)
            return 2
        failed = participant(args.bids_dir, args.output_dir, args.model, args.participant_label, args.session_label,
                             device=args.device, threads=args.threads, tta=args.tta, threshold=args.threshold,
                             min_lesion_mm3=args.min_lesion_mm3, spacing=args.spacing)
    except (ExportError, InputCheckError) as err:
        print(f"rsanet-bids: error: {err}", file=sys.stderr)
        return 2
    for message in failed:
        print(f"rsanet-bids: error: {message}", file=sys.stderr)
    print(f"rsanet-bids: {'%d case(s) failed, ' % len(failed) if failed else ''}outputs in {args.output_dir}")
    return 1 if failed else 0


def _first_export(out: Path) -> dict:
    """The export that wrote the derivatives ``out`` (its path is in every mask sidecar)."""
    cases = case_outputs(out)
    if not cases:
        raise InputCheckError(f"{out}: no participant output (*_label-lesion_mask.json); run the participant level "
                              "first")
    return read_export(Path(next(iter(cases.values()))[0]["model"]["export"]))


if __name__ == "__main__":
    sys.exit(main())
