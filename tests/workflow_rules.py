"""The workflow's rules as Snakemake itself parses them (its API, in a child process): what the
layout, env and profile tests check, instead of reading the rule files' text."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_DUMP = r"""
import json, sys, tempfile
from pathlib import Path
from snakemake.api import SnakemakeApi
from snakemake.settings.types import ConfigSettings, OutputSettings, ResourceSettings

snakefile, configfile = Path(sys.argv[1]), Path(sys.argv[2])
with tempfile.TemporaryDirectory() as work, SnakemakeApi(OutputSettings(quiet={"all"})) as api:
    wf = api.workflow(resource_settings=ResourceSettings(cores=1), snakefile=snakefile, workdir=Path(work),
                      config_settings=ConfigSettings(configfiles=[configfile]))._workflow
    rules = {}
    for r in wf.rules:
        base = Path(r.snakefile.get_path_or_uri() if hasattr(r.snakefile, "get_path_or_uri") else r.snakefile).parent
        rules[r.name] = {
            "file": str(base),
            "script": str((base / r.script).resolve()) if r.script else None,
            "shell": r.shellcmd is not None,
            "conda": str((base / r.conda_env).resolve()) if isinstance(r.conda_env, str) else None,
            "local": r.name in wf._localrules,
            "log": bool(r.log),
            "resources": sorted(k for k in r.resources if not k.startswith("_")),
        }
print("RULES=" + json.dumps(rules))
"""


@functools.lru_cache(maxsize=None)
def workflow_rules(snakefile: Path = ROOT / "Snakefile", configfile: Path = ROOT / "config" / "test.yaml") -> dict:
    """Rule name -> ``{script, shell, conda, local, log, resources}`` (paths absolute)."""
    run = subprocess.run([sys.executable, "-c", _DUMP, str(snakefile), str(configfile)], capture_output=True,
                         text=True, timeout=300, cwd=ROOT)
    line = next((ln for ln in run.stdout.splitlines() if ln.startswith("RULES=")), None)
    assert line, run.stderr[-3000:]
    return json.loads(line[len("RULES="):])
