"""Suite-wide test settings.

Every test starts from the same random state (torch, NumPy's legacy global generator, Python's
``random``), so no test depends on an unseeded input: a tolerance that holds for one draw and
fails for another on a different CPU's kernels is a failing test. Tests that need their own
stream still seed their own generators.
"""

from __future__ import annotations

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


@pytest.fixture(scope="session")
def study(tmp_path_factory):
    """The tiny study (config/test.yaml) run once through Snakemake; its ``results`` folder.

    Shared by the workflow and the segmentation tests (a few minutes on 2 cores).
    """
    from test_workflow import TEST_CONFIG, snakemake

    work = tmp_path_factory.mktemp("tiny_study")
    run = snakemake(work, "--configfile", str(TEST_CONFIG))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    return work / "results"


@pytest.fixture(scope="module")
def export(study, tmp_path_factory) -> Path:
    """The tiny study's export, copied to a folder of its own (as on a machine that never ran the study)."""
    folders = [p for p in (study / "export").iterdir() if p.is_dir()]
    assert len(folders) == 1
    dest = tmp_path_factory.mktemp("elsewhere") / folders[0].name
    shutil.copytree(folders[0], dest)
    return dest
