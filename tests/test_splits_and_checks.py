"""Splits, config validation (every violation listed) and subject-sheet/subject checks."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import yaml

from rsanet.splits import make_splits
from rsanet.checks import (
    InputCheckError,
    config_problems,
    sheet_problems,
    subject_problems,
    check_cohort,
)

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = ROOT / "workflow" / "schemas" / "config.schema.yaml"


def test_splits_are_seeded_disjoint_and_order_independent():
    ids = [f"s{i:02d}" for i in range(43)]
    a = make_splits(ids, 5, 20, 23, seed=0)
    assert a == make_splits(list(reversed(ids)), 5, 20, 23, seed=0)
    assert a != make_splits(ids, 5, 20, 23, seed=1)
    for s in a:
        assert len(s["train"]) == 20 and len(s["test"]) == 23
        assert not set(s["train"]) & set(s["test"])
    assert len({tuple(s["train"]) for s in a}) == 5
    with pytest.raises(ValueError, match="do not fit"):
        make_splits(ids, 5, 30, 20)


def test_validation_part_is_carved_out_of_the_training_subjects():
    ids = [f"s{i:02d}" for i in range(43)]
    paper = make_splits(ids, 5, 20, 23, seed=0)
    with_val = make_splits(ids, 5, 20, 23, seed=0, n_val=4)
    for p, v in zip(paper, with_val):
        assert v["test"] == p["test"]  # the test subjects do not move
        assert sorted(v["train"] + v["val"]) == p["train"]
        assert len(v["train"]) == 16 and len(v["val"]) == 4
        assert not set(v["val"]) & set(v["train"]) and not set(v["val"]) & set(v["test"])
    assert all(s["val"] == [] for s in paper)
    with pytest.raises(ValueError, match="n_val"):
        make_splits(ids, 5, 20, 23, n_val=20)


def test_sessions_of_one_participant_stay_on_one_side_of_every_split():
    people = [f"sub-{i:02d}" for i in range(12)]
    groups = {f"{p}_ses-{t}": p for p in people for t in ("a", "b", "c")[: 1 + int(p[-1]) % 3]}
    splits = make_splits(list(groups), 5, 6, 4, seed=3, n_val=2, groups=groups)
    by_people = make_splits(people, 5, 6, 4, seed=3, n_val=2)
    assert len({str(s) for s in splits}) == 5
    for split, plan in zip(splits, by_people):
        for part in ("train", "val", "test"):
            assert {groups[c] for c in split[part]} == set(plan[part])  # sizes count participants
            assert split[part] == sorted(c for c in groups if groups[c] in plan[part])  # all their sessions
    with pytest.raises(ValueError, match="sub-99"):
        make_splits([*groups, "sub-99"], 5, 6, 4, groups=groups)
    with pytest.raises(ValueError, match=r"count participants: 12 participants, 22 cases"):
        make_splits(list(groups), 5, 10, 4, groups=groups)  # 14 participants needed


def test_small_cohorts_give_distinct_splits_or_say_how_many_they_can():
    ids = ["patient07", "patient19", "patient26"]
    two = make_splits(ids, 2, 2, 1, seed=0)
    assert two[0] != two[1]  # the first draws of this cohort repeat: redrawn
    three = make_splits(ids, 3, 2, 1, seed=0)
    assert len({tuple(s["test"]) for s in three}) == 3
    with pytest.raises(ValueError, match="gives only 3 distinct splits"):
        make_splits(ids, 4, 2, 1, seed=0)


@pytest.mark.parametrize("name,preset", [("config.yaml", None), ("config.yaml", "paper"), ("config.yaml", "cpu"),
                                         ("test.yaml", None)])
def test_shipped_configs_and_presets_are_valid(name, preset):
    from rsanet.checks import load_config

    cfg = load_config(ROOT / "config" / name, SCHEMA, preset)
    assert cfg["preset"] == (preset or "demo")
    assert config_problems(cfg, SCHEMA, n_subjects=cfg["demo"]["n_subjects"]) == []


def test_config_problems_lists_every_violation():
    from rsanet.checks import load_config

    cfg = load_config(ROOT / "config" / "config.yaml", SCHEMA)
    cfg["variants"] = ["unet3d", "rsa-222"]
    cfg["train"]["iterations"] = -5
    cfg["splits"]["n_train"] = 40
    cfg["bogus"] = 1
    problems = config_problems(cfg, SCHEMA, n_subjects=43)
    text = "\n".join(problems)
    assert len(problems) == 4, text
    assert "rsa-222" in text and "iterations" in text and "bogus" in text and "needs 63 subjects" in text


def _write(path, data, affine=np.eye(4)):
    nib.save(nib.Nifti1Image(np.asarray(data), affine), path)
    return str(path)


def _subject(tmp_path, name="s1", mask=None, mask_affine=np.eye(4)):
    d = tmp_path / name
    d.mkdir()
    img = np.ones((4, 4, 4), np.float32)
    m = np.zeros((4, 4, 4), np.uint8)
    m[1, 1, 1] = 1
    return {
        "T1": _write(d / "t1.nii.gz", img), "T2": _write(d / "t2.nii.gz", img),
        "FLAIR": _write(d / "flair.nii.gz", img),
        "lesion mask": _write(d / "m.nii.gz", m if mask is None else mask, mask_affine),
    }


def test_subject_problems_good_and_bad(tmp_path):
    assert subject_problems("s1", _subject(tmp_path)) == ([], [])
    nonbinary = np.full((4, 4, 4), 2, np.uint8)
    errs, _ = subject_problems("s2", _subject(tmp_path, "s2", mask=nonbinary))
    assert len(errs) == 1 and "binary" in errs[0] and "s2" in errs[0]
    shifted = np.eye(4)
    shifted[0, 3] = 5.0
    errs, _ = subject_problems("s3", _subject(tmp_path, "s3", mask_affine=shifted))
    assert len(errs) == 1 and "geometry" in errs[0]
    empty = np.zeros((4, 4, 4), np.uint8)
    errs, warns = subject_problems("s4", _subject(tmp_path, "s4", mask=empty))
    assert errs and "empty" in errs[0]
    errs, warns = subject_problems("s4", _subject(tmp_path, "s5", mask=empty), allow_empty_mask=True)
    assert errs == [] and "empty" in warns[0]


def test_check_cohort_reports_all_subjects_at_once(tmp_path):
    good = _subject(tmp_path, "good")
    bad1 = _subject(tmp_path, "bad1", mask=np.full((4, 4, 4), 3, np.uint8))
    bad2 = dict(_subject(tmp_path, "bad2"), T1=str(tmp_path / "missing.nii.gz"))
    report = tmp_path / "qc" / "validation.tsv"
    with pytest.raises(InputCheckError) as err:
        check_cohort({"good": good, "bad1": bad1, "bad2": bad2}, report)
    assert "2 problem(s)" in str(err.value) and "bad1" in str(err.value) and "missing.nii.gz" in str(err.value)
    assert not report.exists()  # no output that a later step would trust
    failed = pd.read_csv(report.with_suffix(".failed.tsv"), sep="\t")
    assert sorted(failed.subject) == ["bad1", "bad2"]
    check_cohort({"good": good}, report)
    assert report.exists()


def test_sheet_problems(tmp_path):
    files = _subject(tmp_path)
    row = dict(t1=files["T1"], t2=files["T2"], flair=files["FLAIR"], lesions=files["lesion mask"])
    df = pd.DataFrame([dict(subject="a", **row), dict(subject="a", **row), dict(subject="b/../c", **row),
                       dict(subject="d", **{**row, "t2": "nope.nii.gz"})])
    text = "\n".join(sheet_problems(df))
    assert "'a' appears 2 times" in text and "not safe" in text and "nope.nii.gz" in text
    assert "missing column(s) lesions" in sheet_problems(df.drop(columns="lesions"))[0]


def test_dataclass_defaults_equal_the_schemas():
    """The JSON schema is the one home of the defaults; the package's dataclasses agree with it."""
    import dataclasses

    from rsanet.demo import DemoConfig
    from rsanet.training import TrainConfig
    from rsanet.checks import with_defaults

    schema = yaml.safe_load(SCHEMA.read_text())
    cfg = with_defaults({"subjects": "demo"}, schema)
    fields = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.name != "variant"}
    for name, default in fields.items():
        value = cfg["train"][name]
        assert (list(default) if isinstance(default, tuple) else default) == value, name
    # seeds, seeds_by_variant: how many trainings, not one run's setting
    assert set(cfg["train"]) - set(fields) == {"seeds", "seeds_by_variant"}
    demo = DemoConfig()
    names = {"n_subjects": "n_subjects", "seed": "seed", "grid_scale": "grid_scale",
             "max_rotation_deg": "max_rotation_deg", "max_translation_mm": "max_translation_mm"}
    for key, attr in names.items():
        assert cfg["demo"][key] == getattr(demo, attr), key
    from rsanet.registration import CoregistrationSettings

    registration = dataclasses.asdict(CoregistrationSettings())
    assert registration == {k: cfg["registration"][k] for k in registration}
    assert CoregistrationSettings.from_config(cfg["registration"]) == CoregistrationSettings()


def test_every_schema_key_has_a_description_and_a_default():
    schema = yaml.safe_load(SCHEMA.read_text())

    def walk(node, path):
        if "$ref" in node:
            node = schema["$defs"][node["$ref"].split("/")[-1]]
        for key, sub in node.get("properties", {}).items():
            here = f"{path}.{key}" if path else key
            target = schema["$defs"][sub["$ref"].split("/")[-1]] if "$ref" in sub else sub
            assert "description" in sub or "description" in target, f"{here} has no description"
            if here != "subjects":
                assert "default" in sub, f"{here} has no default"
            walk(sub, here)

    walk(schema, "")


def test_a_config_with_only_subjects_is_complete_after_defaults():
    from rsanet.checks import config_problems, with_defaults

    schema = yaml.safe_load(SCHEMA.read_text())
    cfg = with_defaults({"subjects": "demo", "splits": {"n_splits": 2}}, schema)
    assert config_problems(cfg, SCHEMA) == []
    assert cfg["splits"] == {"n_splits": 2, "n_train": 20, "n_val": 0, "n_test": None, "seed": 0}
    assert cfg["resources"]["train"]["gpus"] == 0 and cfg["predict"]["blending"] == "gaussian"


def test_a_comma_separated_sheet_is_read_and_a_missing_sheet_names_where_it_was_looked_for(
        tmp_path, caplog, monkeypatch):
    """The README lists the sheet's columns with commas: a CSV sheet is read as such (and logged);
    a sheet not found names the absolute path tried and the working directory it came from."""
    from rsanet.checks import read_sheet

    rows = "subject,t1,t2,flair,lesions\np01,a/T1.nii.gz,a/T2.nii.gz,a/FLAIR.nii.gz,a/m.nii.gz\n"
    for name in ("subjects.csv", "subjects.tsv"):  # by its name, or by a header of commas only
        (tmp_path / name).write_text(rows)
        with caplog.at_level("INFO", logger="rsanet.checks"):
            df = read_sheet(tmp_path / name)
        assert list(df.columns) == ["subject", "t1", "t2", "flair", "lesions"], name
        assert df.flair[0] == str(tmp_path / "a" / "FLAIR.nii.gz")
    assert "comma-separated" in caplog.text
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputCheckError) as err:
        read_sheet("config/subjects.tsv")
    assert str(tmp_path / "config" / "subjects.tsv") in str(err.value)
    assert "working directory" in str(err.value) and str(tmp_path) in str(err.value)


def test_subject_sheet_with_bom_and_crlf_is_read_and_logged(tmp_path, caplog):
    from rsanet.checks import read_sheet

    text = "subject\tt1\tt2\tflair\tlesions\r\np01\ta/T1.nii.gz\ta/T2.nii.gz\ta/FLAIR.nii.gz\ta/m.nii.gz\r\n"
    sheet = tmp_path / "subjects.tsv"
    sheet.write_bytes(b"\xef\xbb\xbf" + text.encode())
    with caplog.at_level("INFO", logger="rsanet.checks"):
        df = read_sheet(sheet)
    assert list(df.columns) == ["subject", "t1", "t2", "flair", "lesions"]
    assert df.subject.tolist() == ["p01"] and df.lesions[0] == str(tmp_path / "a" / "m.nii.gz")
    assert "byte-order mark" in caplog.text and "CRLF" in caplog.text


def _keys(d, prefix=""):
    out = set()
    for k, v in d.items():
        # a config section is walked into; a mapping value (train.seeds_by_variant) is one setting
        section = isinstance(v, dict) and k != "seeds_by_variant"
        out |= _keys(v, f"{prefix}{k}.") if section else {f"{prefix}{k}"}
    return out


def test_every_preset_sets_every_setting_the_demo_preset_sets():
    """A preset is layered over the schema's defaults only: none may leave a setting the demo
    changes to a default (the cpu preset has no demo cohort to describe)."""
    presets = ROOT / "config" / "presets"
    demo = _keys(yaml.safe_load((presets / "demo.yaml").read_text()))
    assert demo - _keys(yaml.safe_load((presets / "paper.yaml").read_text())) == set()
    cpu = _keys(yaml.safe_load((presets / "cpu.yaml").read_text()))
    assert {k for k in demo - cpu} == {k for k in demo if k.startswith("demo.")}


def test_own_subjects_alone_run_on_the_paper_preset_never_on_the_demo_shortcuts(tmp_path):
    """A sheet and nothing else: the paper's settings; `preset: cpu` names the CPU workstation
    preset; the demo's 2-core shortcuts only for the demo cohort or when named."""
    from rsanet.checks import load_config, preset_name

    assert preset_name({"subjects": "demo"}) == "demo"
    assert preset_name({"subjects": "mine.tsv"}) == "paper"
    assert preset_name({"subjects": {"bids": "x", "lesions": "y"}, "preset": "auto"}) == "paper"
    (tmp_path / "mine.yaml").write_text("subjects: mine.tsv\n")
    own = load_config(tmp_path / "mine.yaml", SCHEMA)
    assert own["preset"] == "paper"
    assert own["train"]["widths"] == [32, 64, 128, 256, 512] and own["train"]["iterations"] == 800
    assert own["registration"]["search_deg"] == 30
    (tmp_path / "cpu.yaml").write_text("subjects: mine.tsv\npreset: cpu\ntrain: {iterations: 200}\n")
    cpu = load_config(tmp_path / "cpu.yaml", SCHEMA)
    assert cpu["preset"] == "cpu" and cpu["train"]["widths"] == [8, 16, 32, 64]
    assert cpu["train"]["iterations"] == 200 and cpu["train"]["lr"] == 1e-3  # the user's key wins, the rest kept
    assert cpu["registration"]["search_deg"] == 30 and cpu["registration"]["finest_level_mm"] == 1.5
    (tmp_path / "bad.yaml").write_text("subjects: mine.tsv\npreset: laptop\n")
    with pytest.raises(InputCheckError, match="preset"):
        load_config(tmp_path / "bad.yaml", SCHEMA)


def test_config_readme_is_generated_from_the_schema_and_current():
    from rsanet.checks import config_reference

    want = config_reference(yaml.safe_load(SCHEMA.read_text()))
    assert (ROOT / "config" / "README.md").read_text() == want, (
        "config/README.md is stale: python tools/config_reference.py > config/README.md")
    assert "`train.lr`" in want and "`resources.train.gpus`" in want


def test_config_problems_lists_a_validation_part_that_leaves_nothing_to_fit():
    from rsanet.checks import config_problems

    schema = Path(__file__).resolve().parents[1] / "workflow" / "schemas" / "config.schema.yaml"
    problems = config_problems({"subjects": "demo", "splits": {"n_splits": 2, "n_train": 4, "n_val": 4}}, schema)
    assert any("n_val=4" in p and "set splits.n_val below splits.n_train" in p for p in problems)
    assert not any("n_val" in p for p in config_problems(
        {"subjects": "demo", "splits": {"n_splits": 2, "n_train": 4, "n_val": 3}}, schema))


def test_a_retried_job_logs_its_attempt_and_on_the_last_one_what_to_set(caplog):
    from rsanet.logs import log_attempt

    sizes = {"train": {"threads": 1, "mem_mb": 3000, "runtime": 60, "gpus": 0}, "retries": 1}
    with caplog.at_level("INFO", logger="rsanet"):
        assert log_attempt("train", {"mem_mb": 3000, "runtime": 60}, sizes) == 1
        assert "last attempt" not in caplog.text and "attempt 1 of at most 2" in caplog.text
        assert log_attempt("train", {"mem_mb": 6000, "runtime": 120}, sizes) == 2
    assert "last attempt" in caplog.text and "raise resources.train.mem_mb (now 3000 MB" in caplog.text


def test_deviations_state_how_many_subjects_the_models_were_fitted_on():
    """With a validation part, splits.n_train's subjects are not all fitted on; the
    deviations table says so (16 fitted + 4 validation) instead of 'as in the paper'. The attention
    settings and the per-variant seeds of the demo are deviations too."""
    from rsanet.paper import deviations

    from rsanet.checks import load_config

    demo = load_config(ROOT / "config" / "config.yaml", SCHEMA)
    d = deviations(demo).set_index("setting")
    assert d.loc["preset", "this_run"] == "demo" and d.loc["preset", "status"] == "deviates"
    assert deviations({**demo, "preset": "paper"}).set_index("setting").loc["preset", "status"] == "as in the paper"
    assert d.loc["splits.n_train", "this_run"] == "20 (16 fitted + 4 validation)"
    assert d.loc["splits.n_train", "status"] == "deviates"
    for key in ("train.attention_init", "train.attention_lr", "train.seeds_by_variant"):
        assert d.loc[key, "status"] == "deviates", key
    paper = {**demo, "splits": {**demo["splits"], "n_val": 0}}
    assert deviations(paper).set_index("setting").loc["splits.n_train", "status"] == "as in the paper"


#: Parameters of the package that share a config key's name but are not that setting.
HOMONYMS = {
    "device": "a function's torch device (train.device 'auto' is resolved before)",
    "seed": "the seed of one call (SimpleITK's sampling, one prediction), not demo/splits/train.seed",
    "seeds": "a note's text about the seeds of a table",
    "threads": "the threads of one call (a job's are resources.*.threads)",
    "reference": "the reference variant of a comparison (registration.reference is a contrast)",
    "alpha": "the significance level of a test (evaluation.alpha is MSSEG's detection overlap)",
    "n_subjects": "the cohort size a check compares split sizes with",
    "preset": "load_config's override of the file's preset",
}


def test_no_code_default_disagrees_with_the_schema():
    """The schema is the one home of every default: a parameter or dataclass field of the package
    named like a config key either has no default or has the schema's (the disagreements this
    found: predict.overlap 0.5 in the schema against the measured 0.25, register()'s 60 mm
    displacement limit against 40, connectivity 26 and margin 0 in generic functions)."""
    import dataclasses
    import importlib
    import inspect
    import pkgutil

    import rsanet
    from rsanet.checks import with_defaults

    schema = yaml.safe_load(SCHEMA.read_text())
    defaults: dict[str, list] = {}

    def walk(node, prefix=""):
        for k, v in node.items():
            if isinstance(v, dict) and k != "seeds_by_variant":
                walk(v, f"{prefix}{k}.")
            else:
                defaults.setdefault(k, []).append(v)

    walk(with_defaults({"subjects": "demo"}, schema))
    empty = inspect.Parameter.empty
    checked, wrong = 0, []
    for info in pkgutil.walk_packages(rsanet.__path__, "rsanet."):
        if ".benchmarks" in info.name:
            continue
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if getattr(obj, "__module__", None) != module.__name__:
                continue
            params = []
            if inspect.isclass(obj) and dataclasses.is_dataclass(obj):
                params += [(f"{name}.{f.name}", f.name, f.default) for f in dataclasses.fields(obj)
                           if f.default is not dataclasses.MISSING]
            functions = [obj] if inspect.isfunction(obj) else [
                m for m in vars(obj).values() if inspect.isfunction(m)] if inspect.isclass(obj) else []
            for fn in functions:
                params += [(f"{name}.{fn.__name__}({p.name})", p.name, p.default)
                           for p in inspect.signature(fn).parameters.values() if p.default is not empty]
            for where, key, value in params:
                if key not in defaults or key in HOMONYMS or value is None:
                    continue  # None: no default of its own, the caller's setting (e.g. the export's) applies
                checked += 1
                if not any(value == d or (isinstance(d, list) and tuple(d) == value) for d in defaults[key]):
                    wrong.append(f"{info.name}.{where} = {value!r}; the schema's: {defaults[key]}")
    assert checked > 10 and not wrong, "\n".join(wrong)
