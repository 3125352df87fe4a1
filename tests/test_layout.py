"""The repository's layout: rule scripts apart from hand-run tools, measurement code apart from
the runtime package, and the package imported without editing ``sys.path``."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from workflow_rules import workflow_rules

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "rsanet"


def rule_scripts() -> set[str]:
    """File names of the rules' ``script:``, as Snakemake parses the workflow."""
    return {Path(r["script"]).name for r in workflow_rules().values() if r["script"]}


def imported_modules(path: Path) -> set[str]:
    """Absolute names of the modules ``path`` imports (relative imports resolved in the package)."""
    tree = ast.parse(path.read_text())
    package = ".".join(path.relative_to(ROOT / "src").with_suffix("").parts[:-1]) if PACKAGE in path.parents else ""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.add(mod)
            out |= {f"{mod}.{a.name}" for a in node.names}
    return out


def test_scripts_holds_only_the_scripts_rules_call():
    files = {p.name for p in (ROOT / "scripts").iterdir() if p.is_file()}
    assert files == rule_scripts(), (files - rule_scripts(), rule_scripts() - files)


def test_the_runtime_imports_nothing_from_the_benchmark_code():
    runtime = [p for p in PACKAGE.rglob("*.py") if "benchmarks" not in p.relative_to(PACKAGE).parts]
    runtime += [p for p in (ROOT / "scripts").glob("*.py") if p.name != "benchmark.py"]
    offenders = [str(p.relative_to(ROOT)) for p in runtime
                 if any(m == "rsanet.benchmarks" or m.startswith("rsanet.benchmarks.") for m in imported_modules(p))]
    assert not offenders
    assert {"rsanet.benchmarks.run.run_benchmark"} <= imported_modules(ROOT / "scripts" / "benchmark.py")


def test_no_file_of_the_workflow_or_package_edits_sys_path():
    files = [ROOT / "Snakefile", ROOT / "workflow" / "Snakefile", *(ROOT / "workflow").rglob("*.smk"), *(ROOT / "scripts").glob("*.py"),
             *PACKAGE.rglob("*.py"), *(ROOT / "tools").glob("*.py")]
    assert not [str(p.relative_to(ROOT)) for p in files if "sys.path" in p.read_text() and p.name != "test_layout.py"]


def test_registration_is_a_subpackage_with_register_where_it_was():
    from rsanet.registration import register
    from rsanet.stages.coregister import main

    assert (PACKAGE / "registration" / "__init__.py").is_file()
    assert {p.stem for p in (PACKAGE / "registration").glob("*.py")} >= {"flirt", "simpleitk", "transforms", "qc"}
    assert register.__module__ == "rsanet.registration" and main.__module__ == "rsanet.stages.coregister"


def test_ruff_finds_nothing_in_the_package_the_tools_and_the_tests():
    """The linter (its rules in pyproject.toml: pyflakes and pycodestyle errors) is clean."""
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "src", "tools", "tests"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]


def test_no_file_explains_itself_by_an_issue_number():
    """A reader of the repository has no tracker: choices are explained in words and by their
    docs/ section, never as "issue N"."""
    pattern = re.compile(r"\bissues? #?\d+", re.IGNORECASE)
    found = []
    for folder in ("src", "workflow", "scripts", "tests", "docs", "tools", "config"):
        for path in sorted((ROOT / folder).rglob("*")):
            if path.is_file() and path.suffix in {".py", ".md", ".smk", ".rst", ".yaml", ".csv", ".txt", ""}:
                text = path.read_text(errors="replace")
                found += [f"{path.relative_to(ROOT)}: {m.group(0)}" for m in pattern.finditer(text)]
    found += [f"README.md: {m.group(0)}" for m in pattern.finditer((ROOT / "README.md").read_text())]
    assert not found, "\n".join(found)


def test_the_readme_and_the_report_captions_state_no_result_of_a_run():
    """Figures of a run live in the pages generated from it (docs/demo_results.md, the report's
    tables): the README types none (no durations, no scores), and a report caption describes
    its figure or table, never what a run found (a caption once said "Small lesions are where
    methods differ most" of a run in which every variant scored the same on them)."""
    readme = (ROOT / "README.md").read_text()
    assert not re.findall(r"\b\d+(?:\.\d+)?\s*(?:min|s|h|ms)\b", readme)
    assert not re.findall(r"\d+(?:\.\d+)?\s*%\s*(?:sample |voxel )?Dice", readme)
    claims = re.compile(r"differ most|outperform|better than|worse than|is best|the best variant", re.IGNORECASE)
    found = [f"{p.name}: {m.group(0)}" for p in sorted((ROOT / "workflow" / "report").glob("*.rst"))
             for m in claims.finditer(p.read_text())]
    assert not found, found
