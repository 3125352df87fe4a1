"""rsanet.files.staged: the one way outputs are written (all or nothing, with the umask's permissions)."""

from __future__ import annotations

import os
import stat

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from rsanet import evaluation
from rsanet.files import staged
from rsanet.volumes import save_nifti


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_staged_leaves_nothing_on_failure(tmp_path):
    targets = [tmp_path / "a.csv", tmp_path / "b.nii.gz"]
    with pytest.raises(RuntimeError):
        with staged(targets) as temps:
            for t in temps:
                t.write_text("half")
            raise RuntimeError("crash")
    assert list(tmp_path.iterdir()) == []
    with staged(targets) as temps:
        assert [t.name.endswith(e) for t, e in zip(temps, (".csv", ".nii.gz"))] == [True, True]  # the same extension
        for t in temps:
            t.write_text("whole")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.csv", "b.nii.gz"]
    out = tmp_path / "folder"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with staged([out], folders=True) as (tmp,):
            (tmp / "new.txt").write_text("new")
            raise RuntimeError("crash")
    assert [p.name for p in out.iterdir()] == ["old.txt"]  # the old folder is untouched
    with staged([out], folders=True) as (tmp,):
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in out.iterdir()] == ["new.txt"]  # replaced as a whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.csv", "b.nii.gz", "folder"]


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_every_output_gets_the_permissions_of_the_users_umask(tmp_path, mask):
    """A colleague in the group reads the study (umask 0022 or 0002); a private umask stays private."""
    old = os.umask(mask)
    try:
        evaluation.write_csv(pd.DataFrame({"a": [1]}), tmp_path / "t.csv")
        evaluation.write_text("x", tmp_path / "t.md")
        save_nifti(nib.Nifti1Image(np.zeros((2, 2, 2), np.float32), np.eye(4)), tmp_path / "i.nii.gz")
        with staged([tmp_path / "seg"], folders=True) as (tmp,):
            (tmp / "inside.txt").write_text("x")
        (tmp_path / "plain.txt").write_text("x")  # what open() gives: the reference
        os.mkdir(tmp_path / "plain_dir")
    finally:
        os.umask(old)
    files = ["t.csv", "t.md", "i.nii.gz", "seg/inside.txt", "plain.txt"]
    assert {f: _mode(tmp_path / f) for f in files} == {f: 0o666 & ~mask for f in files}
    assert _mode(tmp_path / "seg") == _mode(tmp_path / "plain_dir") == 0o777 & ~mask
