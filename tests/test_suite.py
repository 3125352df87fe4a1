"""The suite's own machinery: tests that share a costly fixture or folder (the SLURM test cluster,
the tiny study's folder that some tests run Snakemake in) are kept in one pytest-xdist worker by
their ``xdist_group`` mark (``--dist loadgroup``, as ./run.sh runs the suite). pytest 9.2 silently broke that
(https://github.com/pytest-dev/pytest-xdist/issues/1386): every worker built its own tiny study
and SLURM cluster. This runs a small suite the same way and
checks that a group stays in one worker."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

CONFTEST = '''
import os
import pytest

@pytest.fixture(scope="session")
def costly():
    with open(os.path.join(os.path.dirname(__file__), "built_" + os.environ["PYTEST_XDIST_WORKER"]), "a") as f:
        f.write("built\\n")
'''

GROUPED = '''
import pytest
pytestmark = pytest.mark.xdist_group("shared")

@pytest.mark.parametrize("i", range(6))
def test_uses_the_fixture(costly, i):
    pass
'''

UNGROUPED = '''
import pytest

@pytest.mark.parametrize("i", range(6))
def test_free(i):
    pass

@pytest.mark.xdist_group("shared")
def test_also_in_the_group(costly):
    pass
'''


def test_an_xdist_group_runs_in_one_worker(tmp_path: Path):
    (tmp_path / "conftest.py").write_text(CONFTEST)
    (tmp_path / "test_grouped.py").write_text(GROUPED)
    (tmp_path / "test_ungrouped.py").write_text(UNGROUPED)
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "2",
                          "--dist", "loadgroup", str(tmp_path)], capture_output=True, text=True, cwd=tmp_path,
                         timeout=300)
    assert run.returncode == 0 and "13 passed" in run.stdout, run.stdout[-2000:] + run.stderr[-2000:]
    built = sorted(p.name for p in tmp_path.glob("built_*"))
    assert len(built) == 1, f"the group's fixture was built by {built}: --dist loadgroup no longer groups"
