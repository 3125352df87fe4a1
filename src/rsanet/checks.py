"""Catch every input problem up front, in one pass, with messages that say what to fix.

Three levels:
* :func:`config_problems` - the config against its JSON schema (all violations, not the first)
  plus checks a schema cannot express (split sizes against the cohort size).
* :func:`sheet_problems` - the subject sheet: columns, duplicate or unsafe ids, missing files.
* :func:`subject_problems` - each subject's images opened and checked (3D, finite, non-empty,
  binary mask on its reference grid); :func:`check_cohort` runs it for all subjects and
  writes a TSV report of every problem found.
"""

from __future__ import annotations

import io
import json
import logging

import re
from pathlib import Path
from typing import Mapping, Sequence

import jsonschema
import numpy as np
import pandas as pd
import yaml

from .files import staged
from .volumes import InputError, binarise_mask, load_checked, require_same_grid

log = logging.getLogger(__name__)

SHEET_COLUMNS = ("subject", "t1", "t2", "flair", "lesions")
SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
ROLE_COLUMNS = {"T1": "t1", "T2": "t2", "FLAIR": "flair", "lesion mask": "lesions"}


class InputCheckError(ValueError):
    """Raised with every problem found, one per line."""


def config_problems(config: Mapping, schema_path: str | Path, n_subjects: int | None = None) -> list[str]:
    """All schema violations of ``config`` plus cross-field checks, as readable lines."""
    schema = yaml.safe_load(Path(schema_path).read_text())
    validator = jsonschema.Draft202012Validator(schema)
    problems = []
    for err in sorted(validator.iter_errors(dict(config)), key=lambda e: list(e.absolute_path)):
        for e in _specific(err):
            where = ".".join(str(p) for p in e.absolute_path) or "(top level)"
            problems.append(f"config {where}: {e.message}")
    splits = config.get("splits", {}) if isinstance(config.get("splits"), Mapping) else {}
    n_train, n_test, n_val = splits.get("n_train"), splits.get("n_test"), splits.get("n_val")
    if isinstance(n_train, int) and isinstance(n_val, int) and not isinstance(n_val, bool) and n_val >= n_train:
        problems.append(
            f"config splits: n_val={n_val} of the n_train={n_train} training subjects are held out for "
            f"validation, which leaves none to fit on; set splits.n_val below splits.n_train"
        )
    if n_subjects is not None and isinstance(n_train, int):
        need = n_train + (n_test if isinstance(n_test, int) else 1)
        if need > n_subjects:
            problems.append(
                f"config splits: n_train={n_train} + n_test={n_test} needs {need} subjects, "
                f"but the cohort has {n_subjects}"
            )
    return problems


def _specific(err: jsonschema.ValidationError) -> list[jsonschema.ValidationError]:
    """For a ``oneOf`` failure, the errors of the alternative whose type the value has (e.g. a
    BIDS mapping's unknown or missing keys) instead of "is not valid under any of the given schemas"."""
    if err.validator != "oneOf" or not err.context:
        return [err]
    typed = [e for e in err.context if e.validator != "type" and
             not any(c.validator == "type" and c.relative_schema_path[0] == e.relative_schema_path[0] and
                     not c.relative_path for c in err.context)]
    return typed or [err]


def with_defaults(config: Mapping, schema: Mapping) -> dict:
    """``config`` with every missing key that the schema gives a ``default`` filled in, recursively.

    The JSON schema is the one home of the defaults; this does for the package what
    ``snakemake.utils.validate(..., set_default=True)`` does for the workflow (local
    ``#/$defs/...`` references followed). Returns a new dict; ``config`` is not changed.
    """
    import copy

    def resolve(node: Mapping) -> Mapping:
        ref = node.get("$ref")
        if ref and ref.startswith("#/"):
            target: Mapping = schema
            for part in ref[2:].split("/"):
                target = target[part]
            return {**target, **{k: v for k, v in node.items() if k != "$ref"}}
        return node

    def fill(value: object, node: Mapping) -> object:
        node = resolve(node)
        if not isinstance(value, Mapping) or "properties" not in node:
            return value
        out = dict(value)
        for key, sub in node["properties"].items():
            sub = resolve(sub)
            if key not in out and "default" in sub:
                out[key] = copy.deepcopy(sub["default"])
            if key in out:
                out[key] = fill(out[key], sub)
        return out

    return fill(dict(config), schema)  # type: ignore[return-value]


def config_reference(schema: Mapping) -> str:
    """Markdown reference of every config key (type, default, description), from the schema.

    ``config/README.md`` is this text (a test keeps it current); regenerate it with
    ``python tools/config_reference.py > config/README.md``.
    """

    def resolve(node: Mapping) -> Mapping:
        ref = node.get("$ref")
        if ref and ref.startswith("#/$defs/"):
            return {**schema["$defs"][ref.split("/")[-1]], **{k: v for k, v in node.items() if k != "$ref"}}
        return node

    def kind(node: Mapping) -> str:
        if "enum" in node:
            return " \\| ".join(f"`{v}`" for v in node["enum"])
        if "oneOf" in node:
            return " or ".join(kind(n) if "const" not in n else f"`{n['const']}`" for n in node["oneOf"])
        t = node.get("type", "")
        return " or ".join(t) if isinstance(t, list) else str(t)

    def show(v: object) -> str:
        return "`" + json.dumps(v) + "`" if not isinstance(v, dict) else ""

    lines = ["# Configuration reference", "",
             "Generated from `workflow/schemas/config.schema.yaml` (`python tools/config_reference.py > "
             "config/README.md`); a test keeps it current. A config file needs only the keys it changes: "
             "the workflow loads `config/config.yaml` first and your `--configfile` over it; what neither sets "
             "comes from the preset (`preset:`, a file of `config/presets/`: `demo`, `paper` or `cpu`), "
             "then from the schema's defaults (below).",
             "", "| key | type | default | description |", "|---|---|---|---|"]

    def walk(node: Mapping, prefix: str) -> None:
        for key, sub in resolve(node).get("properties", {}).items():
            sub = resolve(sub)
            name = f"{prefix}{key}"
            desc = str(sub.get("description", "")).replace("|", "\\|")
            if "properties" in sub:
                lines.append(f"| **`{name}`** | section | | {desc} |")
                walk(sub, name + ".")
            else:
                default = show(sub["default"]) if "default" in sub else "required"
                lines.append(f"| `{name}` | {kind(sub)} | {default} | {desc} |")

    walk(schema, "")
    return "\n".join(lines) + "\n"


#: The named settings a config is layered over (``preset:``): files ``config/presets/<name>.yaml``.
PRESETS = ("demo", "paper", "cpu")


def presets_folder(schema_path: str | Path) -> Path:
    """``config/presets/`` of the checkout whose ``workflow/schemas/`` holds ``schema_path``."""
    return Path(schema_path).resolve().parents[2] / "config" / "presets"


def preset_name(config: Mapping) -> str:
    """The preset a config runs on: its ``preset:``; ``auto`` (or none) means ``demo`` for the
    demo cohort and ``paper`` for a user's own subjects, so a sheet alone never runs on the demo's
    2-core shortcuts."""
    name = config.get("preset", "auto")
    if name == "auto":
        return "demo" if config.get("subjects", "demo") == "demo" else "paper"
    return name


def _merged(base: Mapping, over: Mapping) -> dict:
    """``over`` on top of ``base``; mappings merge key by key (Snakemake's own config layering)."""
    out = dict(base)
    for key, value in over.items():
        out[key] = _merged(out[key], value) if isinstance(value, Mapping) and isinstance(out.get(key), Mapping) else value
    return out


def with_preset(config: Mapping, presets: str | Path) -> dict:
    """``config`` layered over its preset (:func:`preset_name`); ``preset`` set to the name that ran.

    A preset name that is not one of :data:`PRESETS` is left for the schema check to report.
    """
    name = preset_name(config)
    if name not in PRESETS:
        return dict(config)
    settings = yaml.safe_load((Path(presets) / f"{name}.yaml").read_text()) or {}
    return {**_merged(settings, config), "preset": name}


def settings_line(config: Mapping) -> str:
    """One line for the run's log: the preset that ran and the settings that size the study."""
    t, r = config["train"], config["registration"]
    return (f"rsanet: preset '{config['preset']}' (config/presets/{config['preset']}.yaml) under your config, "
            f"subjects: {config['subjects']}; train: widths {t['widths']}, crop {t['crop']}, batch {t['batch_size']}, "
            f"{t['iterations']} iterations; registration: {r['engine']}, search +/-{r['search_deg']} deg, "
            f"finest level {r['finest_level_mm']} mm; job GPUs: {config['resources']['train']['gpus']}")


def load_config(path: str | Path, schema_path: str | Path, preset: str | None = None) -> dict:
    """Read a workflow config file, layer it over its preset (``preset`` to name another than the
    file's), check it against the schema and apply the schema's defaults."""
    schema = yaml.safe_load(Path(schema_path).read_text())
    raw = yaml.safe_load(Path(path).read_text()) or {}
    if preset is not None:
        raw["preset"] = preset
    raw = with_preset(raw, presets_folder(schema_path))
    config = with_defaults(raw, schema)
    problems = config_problems(config, schema_path)
    if problems:
        raise InputCheckError(f"{path}:\n" + "\n".join(f"  - {p}" for p in problems))
    return config


def read_sheet(path: str | Path, optional: Sequence[str] = ()) -> pd.DataFrame:
    """Read a subject sheet as strings; relative image paths resolve against the sheet's folder.

    Tab-separated (the documented form); a comma-separated sheet (a ``.csv`` name, or a header
    with commas and no tab) is read too, and the log says so. The sheet's own path, if relative,
    is relative to the working directory (Snakemake's ``--directory``), as every workflow path is.

    ``optional``: columns that may be absent or empty (e.g. ``lesions`` of new subjects to segment).
    """
    path = Path(path)
    if not path.is_file():
        raise InputCheckError(
            f"subject sheet {str(path)!r} not found: looked for {path.absolute()} (a relative `subjects:` "
            f"path is taken from the working directory, {Path.cwd()}, not from the config file's folder); "
            "give its absolute path, or a path relative to that directory")
    raw = path.read_bytes()
    notes = []
    if raw.startswith(b"\xef\xbb\xbf"):
        notes.append("a UTF-8 byte-order mark")
    if b"\r\n" in raw:
        notes.append("Windows (CRLF) line endings")
    if notes:
        logging.getLogger(__name__).info("subject sheet %s: %s, accepted", path, " and ".join(notes))
    text = raw.decode("utf-8-sig").replace("\r\n", "\n").replace("\r", "\n")
    header = text.split("\n", 1)[0]
    sep = "," if path.suffix.lower() == ".csv" or ("," in header and "\t" not in header) else "\t"
    if sep == ",":
        logging.getLogger(__name__).info("subject sheet %s: comma-separated, read as such", path)
    df = pd.read_csv(io.StringIO(text), sep=sep, dtype=str, keep_default_na=False)
    df.columns = [c.strip() for c in df.columns]
    df = df.apply(lambda col: col.str.strip())
    for col in SHEET_COLUMNS[1:]:
        if col in df:
            df[col] = [str(p) if not p or Path(p).is_absolute() else str(path.parent / p) for p in df[col]]
    return df


def sheet_problems(df: pd.DataFrame, sheet: str = "subject sheet", optional: Sequence[str] = ()) -> list[str]:
    """Missing columns, duplicate ids, ids unsafe in file names, paths that do not exist.

    ``optional``: columns that may be absent, or empty for some subjects.
    """
    problems = []
    missing = [c for c in SHEET_COLUMNS if c not in df.columns and c not in optional]
    if missing:
        return [f"{sheet}: missing column(s) {', '.join(missing)}; expected {', '.join(SHEET_COLUMNS)}"]
    for sid, count in df.subject.value_counts().items():
        if count > 1:
            problems.append(f"{sheet}: subject id {sid!r} appears {count} times; ids must be unique")
    for _, row in df.iterrows():
        sid = row.subject
        if not SAFE_ID.match(sid):
            problems.append(
                f"{sheet}: subject id {sid!r} is not safe in file names; use letters, digits, '_' and '-'"
            )
        for role, col in ROLE_COLUMNS.items():
            if col in optional and (col not in row or not row[col]):
                continue
            p = row[col]
            if not p or not Path(p).is_file():
                problems.append(f"subject {sid!r}, {role} file {p!r}: file not found")
    return problems


def subject_problems(
    subject: str, files: Mapping[str, str], reference: str = "FLAIR", allow_empty_mask: bool = False
) -> tuple[list[str], list[str]]:
    """Open and check one subject's images. Returns ``(errors, warnings)``.

    ``files`` maps ``"T1"``, ``"T2"``, ``"FLAIR"``, ``"lesion mask"`` to paths. The mask must be
    binary and on the grid of the ``reference`` contrast; an empty mask is an error unless
    ``allow_empty_mask`` (then a warning).
    """
    errors, warnings, images = [], [], {}
    for role in ("T1", "T2", "FLAIR"):
        try:
            images[role] = load_checked(files[role], subject, role)
        except InputError as err:
            errors.append(str(err))
    mask_path = files["lesion mask"]
    try:
        mask_img = load_checked(mask_path, subject, "lesion mask", allow_empty=True)
        mask = binarise_mask(np.asarray(mask_img.dataobj), subject, mask_path)
        ref = images.get(reference)
        if ref is not None:
            require_same_grid(mask_img, ref, subject, "lesion mask", mask_path, files[reference])
        if not mask.any():
            (warnings if allow_empty_mask else errors).append(
                f"subject {subject!r}, lesion mask {mask_path!r}: the mask is empty"
                + ("" if allow_empty_mask else " (set preprocess.allow_empty_masks: true to accept)")
            )
    except InputError as err:
        errors.append(str(err))
    return errors, warnings


def check_cohort(
    subjects: Mapping[str, Mapping[str, str]], report: str | Path, reference: str = "FLAIR",
    allow_empty_masks: bool = False,
) -> None:
    """Check every subject, write ``report`` (TSV: subject, level, message), raise if any error.

    The report is written in all cases, so a user fixes every problem in one pass.
    """
    rows = []
    for sid, files in subjects.items():
        errors, warnings = subject_problems(sid, files, reference, allow_empty_masks)
        rows += [{"subject": sid, "level": "error", "message": m} for m in errors]
        rows += [{"subject": sid, "level": "warning", "message": m} for m in warnings]
        log.info("%s: %d error(s), %d warning(s)", sid, len(errors), len(warnings))
        for message in warnings:
            log.warning("%s", message)
    table = pd.DataFrame(rows, columns=["subject", "level", "message"])
    n_err = int((table.level == "error").sum())
    if n_err:
        failed = Path(report).with_suffix(".failed.tsv")
        with staged([failed]) as (tmp,):
            table.to_csv(tmp, sep="\t", index=False)
        raise InputCheckError(
            f"{n_err} problem(s) in the input data (all listed in {failed}):\n"
            + "\n".join(f"  - {m}" for m in table[table.level == "error"].message)
        )
    with staged([report]) as (tmp,):
        table.to_csv(tmp, sep="\t", index=False)
    log.info("all %d subjects passed the input checks (%d warnings)", len(subjects), len(table))
