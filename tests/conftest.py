"""Suite-wide test settings.

Every test starts from the same random state (torch, NumPy's legacy global generator, Python's
``random``), so no test depends on an unseeded input: a tolerance that holds for one draw and
fails for another on a different CPU's kernels is a failing test. Tests that need their own
stream still seed their own generators.

The tiny study is run once per test session, by whichever pytest-xdist worker needs it first
(under a file lock; the other workers wait and reuse it), so the tests that only read it spread
over every worker. The tests that run Snakemake in its folder share the ``tiny_study``
``xdist_group`` (one worker, one after the other: Snakemake locks a working directory). The SLURM
group comes first in the collection, so a worker takes it at the start: its run waits on the
cluster's polling most of the time, beside the other workers' tests.
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    """The SLURM cluster's tests first (stable order otherwise): see the module's docstring."""
    def in_slurm_group(item) -> bool:
        group = item.get_closest_marker("xdist_group")
        return group is not None and group.args[:1] == ("slurm",)

    items.sort(key=lambda item: not in_slurm_group(item))


def _run_once(tmp_path_factory, name: str, *args: str) -> Path:
    """``snakemake --configfile config/test.yaml *args`` in the folder ``name``, run once per test
    session by whichever pytest-xdist worker asks first (under a file lock; the others wait and
    reuse it); returns its ``results`` folder. A failed run is recorded, so the other workers fail
    at once with its output instead of running it again."""
    from test_workflow import TEST_CONFIG, snakemake

    base = tmp_path_factory.getbasetemp()
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    shared = base.parent if worker else base  # the parent of the workers' own base folders
    work, outcome = shared / name, shared / f"{name}.json"
    with open(shared / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not outcome.is_file():
            work.mkdir(exist_ok=True)
            run = snakemake(work, "--configfile", str(TEST_CONFIG), *args)
            outcome.write_text(json.dumps({"returncode": run.returncode, "by": worker or "pytest",
                                           "output": run.stdout[-3000:] + run.stderr[-5000:]}))
    ran = json.loads(outcome.read_text())
    assert ran["returncode"] == 0, f"{name} (run by {ran['by']}) failed:\n" + ran["output"]
    return work / "results"


@pytest.fixture(scope="session")
def study(tmp_path_factory) -> Path:
    """The tiny study (config/test.yaml) run once through Snakemake (a few minutes on 2 cores); its
    ``results`` folder."""
    return _run_once(tmp_path_factory, "tiny_study")


@pytest.fixture(scope="session")
def registered_cohort(tmp_path_factory) -> Path:
    """The tiny study's cohort, co-registered onto each subject's FLAIR grid (``--until coregister``,
    in a folder of its own): ``registered/<subject>/{T1,T2,FLAIR,lesions}.nii.gz`` and
    ``demo/<subject>/``, for the tests that need these images but not the study."""
    return _run_once(tmp_path_factory, "registered_cohort", "--until", "coregister")


@pytest.fixture(scope="module")
def export(study, tmp_path_factory) -> Path:
    """The tiny study's export, copied to a folder of its own (as on a machine that never ran the study)."""
    folders = [p for p in (study / "export").iterdir() if p.is_dir()]
    assert len(folders) == 1
    dest = tmp_path_factory.mktemp("elsewhere") / folders[0].name
    shutil.copytree(folders[0], dest)
    return dest
