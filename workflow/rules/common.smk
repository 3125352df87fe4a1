# Shared by all stages: config and subject-sheet validation, the subject table, wildcard
# constraints and every input function.
import os
import re
import sys
from pathlib import Path

import pandas as pd
from snakemake.utils import validate

# The `rsanet` package must be installed in the environment that runs Snakemake (`pip install .`
# or ./run.sh): this file imports it, on the submitting host and in every cluster job. With
# `--sdm conda` the rules' jobs run in envs/rsanet.yaml, which installs this checkout editable
# (pip expands RSANET_WORKFLOW_DIR, the checkout's folder, set here for local workflows).
_CHECKOUT = Path(workflow.current_basedir.get_path_or_uri(secret_free=False)).parents[1]
if (_CHECKOUT / "pyproject.toml").is_file():
    os.environ.setdefault("RSANET_WORKFLOW_DIR", str(_CHECKOUT))
from rsanet.bids import bids_sheet
from rsanet.bids_app import bids_cases, case_folder
from rsanet.evaluation import ReportOpening
from rsanet.splits import make_splits
from rsanet.checks import (
    InputCheckError,
    config_problems,
    read_sheet,
    settings_line,
    sheet_problems,
    with_preset,
)

# Found relative to this file, also where the workflow is used as a module.
CONFIG_SCHEMA = workflow.source_path("../schemas/config.schema.yaml")
SUBJECTS_SCHEMA = workflow.source_path("../schemas/subjects.schema.yaml")
ENV = "../../envs/rsanet.yaml"


def _demo_sheet(cfg):
    from rsanet.demo import subject_id

    ids = [subject_id(i) for i in range(cfg["demo"]["n_subjects"])]
    return pd.DataFrame(
        {
            "subject": ids,
            "t1": [f"results/demo/{s}/T1.nii.gz" for s in ids],
            "t2": [f"results/demo/{s}/T2.nii.gz" for s in ids],
            "flair": [f"results/demo/{s}/FLAIR.nii.gz" for s in ids],
            "lesions": [f"results/demo/{s}/lesions.nii.gz" for s in ids],
        }
    )


def _stop(where, problems):
    """Every problem listed at once, then a plain exit: a user's mistake, never a traceback."""
    print(
        f"{len(problems)} problem(s) {where}; fix them all and rerun:\n"
        + "\n".join(f"  - {p}" for p in problems),
        file=sys.stderr,
    )
    sys.exit(1)


# --- The preset under the user's config (config/presets/<name>.yaml; `auto`: demo for the demo
# --- cohort, paper for one's own subjects), named in the log and in deviations.md.
config.update(with_preset(config, _CHECKOUT / "config" / "presets"))
# --- Validate the config (every violation listed at once; the schema's defaults applied) and
# --- the subject sheet. Rules read the validated config only: the schema is the one home of
# --- every default.
_issues = config_problems(config, CONFIG_SCHEMA)
if not _issues:
    validate(config, CONFIG_SCHEMA)
# "demo", a sheet's path or a BIDS mapping (None when missing: reported above)
COHORT = config.get("subjects")
DEMO = COHORT == "demo"
SHEET = pd.DataFrame(columns=["subject"])
if DEMO and not _issues:
    SHEET = _demo_sheet(config)
elif isinstance(COHORT, dict) and not _issues:
    SHEET = bids_sheet(**COHORT)  # lists every incomplete case at once
elif isinstance(COHORT, str) and not DEMO:
    try:
        SHEET = read_sheet(COHORT)
        _issues += sheet_problems(SHEET, f"subject sheet {COHORT}")
    except InputCheckError as err:
        _issues.append(str(err))
# Cases of one participant (BIDS sessions, or the sheet's optional column; blank = the subject
# itself) share a split side.
if "participant" in SHEET:
    SHEET["participant"] = SHEET.participant.where(
        SHEET.participant != "", SHEET.subject
    )
GROUPS = dict(zip(SHEET.subject, SHEET.participant)) if "participant" in SHEET else None
if not _issues:
    _issues = config_problems(
        config, CONFIG_SCHEMA, n_subjects=len(set(GROUPS.values()) if GROUPS else SHEET)
    )
if _issues:
    _stop("in the configuration or subject sheet", _issues)
validate(SHEET, SUBJECTS_SCHEMA)
SHEET = SHEET.set_index("subject", drop=False)
SUBJECTS = list(SHEET.subject)

if workflow.is_main_process:
    print(settings_line(config), file=sys.stderr)
# The report's opening paragraph (workflow/report/workflow.rst): the run's findings, read from
# results/tables/findings.md when the report is rendered. Not a setting: no job's params hold it.
config["report_opening"] = ReportOpening("results/tables/findings.md")

VARIANT_IDS = list(config["variants"])
try:
    SPLITS = make_splits(
        SUBJECTS,
        config["splits"]["n_splits"],
        config["splits"]["n_train"],
        config["splits"]["n_test"],
        config["splits"]["seed"],
        config["splits"]["n_val"],
        groups=GROUPS,
    )
except ValueError as err:  # splits that cannot be drawn from this cohort
    _stop("in the splits: section", [str(err)])
SPLIT_IDS = list(range(len(SPLITS)))


def seed_count(variant):
    """Trainings of one variant per split: train.seeds_by_variant, else train.seeds."""
    return config["train"]["seeds_by_variant"].get(variant, config["train"]["seeds"])


# Every training of the study: (variant, split, seed index).
RUNS = [(v, k, s) for v in VARIANT_IDS for k in SPLIT_IDS for s in range(seed_count(v))]


def runs(pattern, variant=None):
    """``pattern`` (with {variant}, {split}, {seed}) filled in for every training (of ``variant``)."""
    return [
        pattern.format(variant=v, split=k, seed=s)
        for v, k, s in RUNS
        if variant is None or v == variant
    ]


REFERENCE = config["registration"]["reference"]
MOVING = [c for c in ("T1", "T2", "FLAIR") if c != REFERENCE]


# New subjects to segment with the exported model (`snakemake segment`): a sheet (subject, t1, t2,
# flair, optional lesions; their ids have their own wildcard, apart from the study's subjects), or
# a BIDS dataset ({bids: <root>}), segmented into BIDS-Derivatives as rsanet-bids does.
_SEGMENT = config["segment_subjects"]
BIDS_CASES = {}
if isinstance(_SEGMENT, dict):
    try:
        _rows, _problems = bids_cases(
            _SEGMENT["bids"],
            _SEGMENT.get("participant_label"),  # the schema's default: null, all
            _SEGMENT.get("session_label"),
        )
    except InputCheckError as err:
        _rows, _problems = [], [("segment_subjects.bids", str(err))]
    if _problems:
        _stop(
            "in the segment_subjects BIDS dataset", [f"{c}: {m}" for c, m in _problems]
        )
    BIDS_CASES = {r["subject"]: r for r in _rows}
NEW_SHEET = (
    read_sheet(_SEGMENT, optional=("lesions",))
    if isinstance(_SEGMENT, str)
    else pd.DataFrame(columns=["subject", "t1", "t2", "flair", "lesions"])
)
if isinstance(_SEGMENT, str):
    _new_issues = sheet_problems(
        NEW_SHEET,
        f"segment_subjects sheet {config['segment_subjects']}",
        optional=("lesions",),
    )
    if _new_issues:
        _stop("in the segment_subjects sheet", _new_issues)
NEW_SHEET = NEW_SHEET.set_index("subject", drop=False)
NEW_SUBJECTS = list(NEW_SHEET.subject)


wildcard_constraints:
    subject="|".join(re.escape(s) for s in SUBJECTS),
    variant="|".join(re.escape(v) for v in VARIANT_IDS),
    split=r"\d+",
    seed=r"\d+",
    new_subject="|".join(re.escape(s) for s in NEW_SUBJECTS) or "(?!)",
    bids_case="|".join(re.escape(s) for s in BIDS_CASES) or "(?!)",
    bids_folder=r"sub-[^/_]+(/ses-[^/_]+)?",
    contrast="T1|T2|FLAIR",


# --- Input functions ---------------------------------------------------------------------------
def raw_images(wildcards):
    """The subject's raw T1, T2, FLAIR and lesion mask (from the sheet or the demo cohort)."""
    row = SHEET.loc[wildcards.subject]
    return {"t1": row.t1, "t2": row.t2, "flair": row.flair, "lesions": row.lesions}


def new_subject_images(wildcards):
    row = NEW_SHEET.loc[wildcards.new_subject]
    return {"t1": row.t1, "t2": row.t2, "flair": row.flair}


def new_subject_masks():
    """New subject -> lesion mask path, for those of the segment sheet that have one."""
    if "lesions" not in NEW_SHEET:
        return {}
    return {
        s: p
        for s, p in zip(NEW_SHEET.subject, NEW_SHEET.lesions)
        if isinstance(p, str) and p
    }


def bids_case_images(wildcards):
    row = BIDS_CASES[wildcards.bids_case]
    return {"t1": row["t1"], "t2": row["t2"], "flair": row["flair"]}


def bids_case_outputs(pattern):
    """``pattern`` (with {bids_folder} and {bids_case}) for every BIDS case to segment."""
    return [
        pattern.format(bids_folder=case_folder(r), bids_case=c)
        for c, r in BIDS_CASES.items()
    ]


def segment_outputs():
    out = expand("results/segment/{new_subject}/summary.json", new_subject=NEW_SUBJECTS)
    if BIDS_CASES:
        out += ["results/derivatives/rsanet/cohort.tsv"]
    if NEW_SUBJECTS:
        out += ["results/segment/cohort.csv", "results/figures/cohort.png"]
    if new_subject_masks():
        out += ["results/tables/external_test.md"]
    return out


def all_models():
    return runs("results/models/{variant}/split{split}/seed{seed}/model.pt")


def all_raw_files():
    return [p for col in ("t1", "t2", "flair", "lesions") for p in SHEET[col]]


def preprocessed_all():
    return {s: f"results/preprocessed/{s}.npz" for s in SUBJECTS}


def split_preprocessed(part):
    """Input function: the preprocessed files of one part ("train", "val", "test") of a split."""

    def inputs(wildcards):
        return [
            f"results/preprocessed/{s}.npz" for s in SPLITS[int(wildcards.split)][part]
        ]

    return inputs


def stable(value):
    """A config section with its keys sorted, recursively: a job's params then do not depend on
    the order in which a config file lists its keys (reordering a file reruns nothing).
    """
    if isinstance(value, dict):
        return {k: stable(value[k]) for k in sorted(value)}
    if isinstance(value, list):
        return [stable(v) for v in value]
    return value


def section(name):
    """A validated config section as a job parameter (keys sorted, see `stable`)."""
    return stable(config[name])


def train_params():
    """The `train:` section as the training jobs' params, without `seeds` (how many trainings
    there are, not how one runs: adding a seed must not rerun the others)."""
    return stable(
        {
            k: v
            for k, v in config["train"].items()
            if k not in ("seeds", "seeds_by_variant")
        }
    )


def study_config():
    """The config without job sizes and without what only `snakemake segment` reads: what the
    study's results depend on (params of the record rules)."""
    return stable(
        {
            k: v
            for k, v in config.items()
            if k not in ("resources", "segment_subjects", "segment", "report_opening")
        }
    )


def job_resources(rule_name):
    """Threads, memory (MB), runtime (min) and GPUs of one rule's jobs, from `resources:`."""
    return config["resources"][rule_name]


def job_retries():
    """How often a failed training, prediction or segment job is resubmitted: `resources.retries`
    on the submitting host; 0 inside a cluster job (remote mode), where a retry would run in the
    same allocation, with the same memory, and be killed again.
    """
    return 0 if workflow.remote_exec else config["resources"]["retries"]


def attempt_scaled(rule_name, key):
    """`resources.<rule_name>.<key>` (mem_mb or runtime) times the attempt number: a job killed
    for memory or time is resubmitted (`resources.retries` times) with twice, three times... as much.
    """
    base = job_resources(rule_name)[key]
    return lambda wildcards, attempt: base * attempt


def metric_csvs():
    return runs("results/metrics/{variant}/split{split}/seed{seed}.csv")


def validation_metric_csvs():
    return runs("results/validation/metrics/{variant}/split{split}/seed{seed}.csv")


def train_logs():
    return runs("results/models/{variant}/split{split}/seed{seed}/train_log.csv")


def variant_predictions(wildcards):
    """Input function: every prediction folder of one variant (all splits and seeds)."""
    return runs(
        "results/predictions/{variant}/split{split}/seed{seed}", wildcards.variant
    )


def all_test_preprocessed():
    """The preprocessed files of every subject in some split's test part."""
    names = sorted({s for part in SPLITS for s in part["test"]})
    return [f"results/preprocessed/{s}.npz" for s in names]


def lesion_confidence_tables():
    return expand("results/tables/lesion_confidence/{variant}.csv", variant=VARIANT_IDS)


def variant_validation_predictions(wildcards):
    """Input function: every validation-part prediction folder of one variant (none without
    splits.n_val)."""
    if not config["splits"]["n_val"]:
        return []
    return runs(
        "results/validation/predictions/{variant}/split{split}/seed{seed}",
        wildcards.variant,
    )


def held_out_preprocessed():
    """The preprocessed files of every subject in some split's validation or test part."""
    names = sorted({s for part in SPLITS for s in part["test"] + part.get("val", [])})
    return [f"results/preprocessed/{s}.npz" for s in names]


def lesion_calibration_records():
    return expand(
        "results/tables/lesion_calibration/{variant}.json", variant=VARIANT_IDS
    )


def health_files():
    return runs("results/models/{variant}/split{split}/seed{seed}/health.json")


def job_benchmarks(stage):
    """The Snakemake `benchmark:` files of one heavy stage of the study (coregister, train, predict)."""
    if stage == "coregister":
        return expand(
            "results/benchmarks/jobs/coregister/{subject}.tsv", subject=SUBJECTS
        )
    return runs(
        f"results/benchmarks/jobs/{stage}/{{variant}}/split{{split}}/seed{{seed}}.tsv"
    )


def fig5_variants():
    wanted = config["figures"]["fig5_variants"]
    return [v for v in wanted if v in VARIANT_IDS] or VARIANT_IDS[:3]


def fig5_predictions():
    return [f"results/predictions/{v}/split0/seed0" for v in fig5_variants()]


def qc_figures():
    return expand("results/qc/registration/{subject}.png", subject=SUBJECTS)


def all_outputs():
    out = [
        "results/tables/table1.csv",
        "results/tables/table1.md",
        "results/tables/table1.tex",
        "results/tables/table2.md",
        "results/tables/paired_tests.md",
        "results/tables/deviations.md",
        "results/export",
        "results/tables/detection_by_size.md",
        "results/figures/detection_by_size.png",
        "results/figures/lesion_load.png",
        "results/figures/fig1.png",
        "results/figures/fig5.png",
        "results/figures/training_curves.png",
        "results/figures/score_distributions.png",
        "results/provenance.json",
        "results/tables/job_times.md",
    ] + qc_figures()
    if DEMO:
        out += [
            "results/qc/registration_accuracy.csv",
            "results/figures/registration_accuracy.png",
        ]
    return out
