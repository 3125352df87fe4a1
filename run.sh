#!/usr/bin/env bash
# One entry point for a fresh clone: creates/reuses .venv, installs the package (editable; with
# its test extras for `test`), runs.
#   ./run.sh study [snakemake args...]   the whole study (demo cohort by default) + HTML report
#   ./run.sh test  [pytest args...]      the test suite
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}

if [ ! -x .venv/bin/python ]; then
  echo "[run.sh] creating virtual environment .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
cmd=${1:-}
[ $# -gt 0 ] && shift
# The study needs the package only; the tests also need the `test` extras (pytest, MONAI, snakefmt).
extras="" stamp=.venv/.rsanet-installed
if [ "$cmd" = test ]; then extras="[test]" stamp=.venv/.rsanet-test-installed; fi
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "[run.sh] installing rsanet$extras and its dependencies into .venv (first run takes a few minutes)"
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -e ".$extras"
  touch "$stamp"
  [ -z "$extras" ] || touch .venv/.rsanet-installed
fi
export PATH="$PWD/.venv/bin:$PATH"

case "$cmd" in
  study)
    # the report in the same run: one Snakemake start fewer, and it is written while Snakemake
    # waits out its last scheduling timer (docs/performance.md, "The end of the run")
    snakemake --cores "${CORES:-all}" --report results/report.html --report-after-run "$@"
    echo "[run.sh] done: results/tables/table1.md, results/figures/, results/report.html"
    ;;
  test)
    # pytest-xdist: one worker per core plus one (TEST_WORKERS to change it): the SLURM test mostly
    # waits on the cluster's polling, and the extra worker fills those cores meanwhile. Tests that
    # share an expensive fixture are kept in one worker (xdist_group marks: the SLURM test cluster,
    # the tests that run Snakemake in the tiny study's folder); see tests/conftest.py
    exec python -m pytest -n "${TEST_WORKERS:-$(( $(nproc) + 1 ))}" --dist loadgroup "$@"
    ;;
  *)
    echo "usage: ./run.sh study [snakemake args...] | ./run.sh test [pytest args...]" >&2
    exit 2
    ;;
esac
