"""Conda environments (envs/*.yaml, for `snakemake --sdm conda`): valid, used, and in step with
pyproject.toml."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from workflow_rules import workflow_rules

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
ENVS = sorted((ROOT / "envs").glob("*.yaml"))
MAIN_ENV = ROOT / "envs" / "rsanet.yaml"


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def load_env(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def pip_requirements(env: dict) -> list[Requirement]:
    """The pip section's requirements (editable ``-e`` lines, the local package, left out)."""
    reqs = []
    for dep in env["dependencies"]:
        if isinstance(dep, dict) and "pip" in dep:
            reqs += [Requirement(r) for r in dep["pip"] if not r.startswith("-e ")]
    return reqs


def conda_python_version(env: dict) -> str | None:
    for dep in env["dependencies"]:
        if isinstance(dep, str):
            m = re.fullmatch(r"python\s*=+\s*([\d.]+)\*?", dep.strip())
            if m:
                return m.group(1)
    return None


def test_there_is_an_env_for_the_python_rules():
    assert MAIN_ENV.is_file()


@pytest.mark.parametrize("path", ENVS, ids=[p.name for p in ENVS])
def test_env_file_is_valid(path):
    env = load_env(path)
    assert isinstance(env, dict) and set(env) <= {"name", "channels", "dependencies"}, env
    assert env.get("channels"), "pin the channels (conda-forge) for reproducible solves"
    assert "defaults" not in env["channels"]
    deps = env["dependencies"]
    assert isinstance(deps, list) and deps
    for dep in deps:
        assert isinstance(dep, str) or (isinstance(dep, dict) and set(dep) == {"pip"}), dep
    if pip_requirements(env):
        assert "pip" in [d for d in deps if isinstance(d, str)], "pip section without pip"
    version = conda_python_version(env)
    assert version, "the env must pin python"
    assert SpecifierSet(pyproject()["requires-python"]).contains(version), version


def test_rules_with_scripts_or_shell_use_existing_env_files():
    """Every rule that runs code names an env of envs/ (as Snakemake resolves its ``conda:``)."""
    rules = workflow_rules()
    assert rules, "no rules found"
    problems = []
    for name, rule in rules.items():
        if not (rule["script"] or rule["shell"]):
            continue
        if rule["conda"] is None:
            problems.append(f"rule {name} has no conda: directive")
        elif not Path(rule["conda"]).is_file():
            problems.append(f"rule {name}: conda env {rule['conda']} missing")
        elif Path(rule["conda"]).parent != (ROOT / "envs").resolve():
            problems.append(f"rule {name}: env {rule['conda']} is not in envs/")
    assert not problems, "\n".join(problems)


def test_main_env_agrees_with_pyproject():
    """envs/rsanet.yaml pip-installs exactly pyproject's dependencies, same specifiers, and the
    package itself from the workflow's checkout."""
    wanted = {canonicalize_name(r.name): r for r in map(Requirement, pyproject()["dependencies"])}
    got = {canonicalize_name(r.name): r for r in pip_requirements(load_env(MAIN_ENV))}
    pip = [d for d in load_env(MAIN_ENV)["dependencies"] if isinstance(d, dict)][0]["pip"]
    assert [r for r in pip if r.startswith("-e ")] == ["-e ${RSANET_WORKFLOW_DIR}"]
    assert sorted(got) == sorted(wanted), (
        f"only in pyproject: {sorted(set(wanted) - set(got))}; "
        f"only in {MAIN_ENV.name}: {sorted(set(got) - set(wanted))}")
    for name, req in wanted.items():
        assert got[name].specifier == req.specifier, (name, str(got[name]), str(req))
        assert got[name].extras == req.extras and got[name].marker == req.marker, name


@pytest.mark.parametrize("path", ENVS, ids=[p.name for p in ENVS])
def test_every_env_agrees_with_pyproject(path):
    """No env pins a package of pyproject's dependencies to a different version range."""
    wanted = {canonicalize_name(r.name): r for r in map(Requirement, pyproject()["dependencies"])}
    for req in pip_requirements(load_env(path)):
        name = canonicalize_name(req.name)
        if name in wanted:
            assert req.specifier == wanted[name].specifier, (path.name, str(req))


def test_main_env_installs_the_workflows_own_version_of_rsanet(tmp_path):
    """pip, given the env's pip line as conda passes it (a requirements file), installs this
    checkout, editable, at pyproject's version; the file names that version too."""
    import json
    import os
    import subprocess
    import sys

    text = MAIN_ENV.read_text()
    assert f"rsanet {pyproject()['version']}" in text  # a new version changes the env file
    pip = [d for d in load_env(MAIN_ENV)["dependencies"] if isinstance(d, dict)][0]["pip"]
    (tmp_path / "requirements.txt").write_text("\n".join(r for r in pip if r.startswith("-e ")) + "\n")
    run = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "--no-build-isolation", "--quiet",
         "--report", str(tmp_path / "report.json"), "-r", str(tmp_path / "requirements.txt")],
        capture_output=True, text=True, timeout=600, env={**os.environ, "RSANET_WORKFLOW_DIR": str(ROOT)})
    assert run.returncode == 0, run.stderr[-2000:]
    (installed,) = json.loads((tmp_path / "report.json").read_text())["install"]
    assert installed["metadata"]["name"] == "rsanet"
    assert installed["metadata"]["version"] == pyproject()["version"]
    assert installed["download_info"]["url"] == ROOT.as_uri()
    assert installed["download_info"]["dir_info"]["editable"] is True  # jobs run the checkout's code
