"""Scale-out: the workstation and SLURM profiles, and the tiny study run on a real SLURM cluster.

The cluster tests use the ``slurm_cluster`` fixture (tests/slurm_cluster.py): a single-node SLURM
cluster on localhost started from Debian's packages (installed if missing; skipped with the
reason where that is impossible -- but never skipped when ``CI=true``).

The node has no GPU; it declares *stand-in GPUs* (null devices as the GRES files, see
tests/slurm_cluster.py), so ``--gpus=1`` is scheduled, counted and reflected in
``CUDA_VISIBLE_DEVICES`` exactly as on a GPU node, while the training itself runs on the CPU.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from workflow_rules import workflow_rules
from slurm_cluster import MIN_JOB_AGE_S, PLUGIN_INIT_WAIT_S, SlurmCluster, slurm_cluster, tool

__all__ = ["slurm_cluster"]  # the fixture, re-exported so pytest finds it in this module
# one pytest-xdist worker starts the test cluster and runs every test that talks to it
pytestmark = pytest.mark.xdist_group("slurm")

ROOT = Path(__file__).resolve().parents[1]
PROFILES = ROOT / "workflow" / "profiles"
SLURM_PROFILE = PROFILES / "slurm" / "config.yaml"
DEFAULT_PROFILE = PROFILES / "default" / "config.yaml"
GPU_RULES = ("train", "predict")
LIGHT_RULES = ("splits", "aggregate", "figures")  # must be `localrules` (they run on the login node)

#: the tiny study (config/test.yaml) shrunk further for the 2-CPU test node: the baseline only, one
#: training per split (every rule of the study still goes through SLURM; each SLURM job starts a
#: Snakemake of its own, so the jobs, not the variants, are what the test costs)
SHRINK = ["--config", "variants=[unet3d]", "figures={fig5_variants: [unet3d]}"]
STUDY_TIMEOUT_S = 20 * 60  # bound on the whole SLURM run of the tiny study
TEST_STATUS_WAIT_S = 10  # plugin's initial wait before the first status check, in the test
#: the tiny study's prediction jobs get too little memory at their first attempt: the cluster
#: kills them (OverMemoryKill) and the workflow resubmits them with the memory x the attempt
PREDICT_FIRST_MB = 300
PREDICT_RETRIES = 3


def snakefile() -> Path | None:
    for candidate in (ROOT / "workflow" / "Snakefile", ROOT / "Snakefile"):
        if candidate.is_file():
            return candidate
    return None


def study_config_file() -> Path:
    return ROOT / "config" / "test.yaml"


def load_profile(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def rules_and_localrules() -> tuple[set[str], set[str]]:
    """(rule names, localrules) of the workflow, as Snakemake parses it."""
    rules = workflow_rules()
    return set(rules), {name for name, r in rules.items() if r["local"]}


# ------------------------------------------------------------------------------------------
# the profiles (fast, no cluster)
# ------------------------------------------------------------------------------------------
def test_slurm_profile_takes_gpus_from_the_config():
    """train and predict request the config's `resources.*.gpus` (the rules' `gpu` resource): the
    profile sets no GPU of its own, so a CPU-only cluster (gpus 0) can use it as written."""
    prof = load_profile(SLURM_PROFILE)
    assert prof["executor"] == "slurm"
    for rule in GPU_RULES:
        res = prof["set-resources"][rule]
        assert not {"gpu", "gres", "gpus"} & set(res), f"{rule}: GPUs come from the config, not the profile"
        assert "FILL_IN" in str(res["slurm_partition"])  # the user's GPU (or CPU) partition
    # partition and account are the user's to fill in: clearly marked placeholders
    dr = prof["default-resources"]
    assert "FILL_IN" in str(dr["slurm_partition"]) and "FILL_IN" in str(dr["slurm_account"])
    assert int(dr["mem_mb"]) > 0 and int(dr["runtime"]) > 0


def test_slurm_profile_status_polling_works_without_accounting():
    prof = load_profile(SLURM_PROFILE)
    assert prof["slurm-status-command"] == "squeue"
    wait = int(prof["slurm-init-seconds-before-status-checks"])
    # squeue is only used while SLURM's MinJobAge >= 3x this wait; 300 s is SLURM's default
    assert 3 * wait <= 300 and wait <= PLUGIN_INIT_WAIT_S
    assert 3 * max(wait, TEST_STATUS_WAIT_S) <= MIN_JOB_AGE_S


def test_workstation_profile_limits_gpu_jobs():
    prof = load_profile(DEFAULT_PROFILE)
    assert int(prof["resources"]["gpu"]) >= 1
    # that the train and predict jobs claim the configured `gpu` (and mem_mb, runtime, threads):
    # a dry run, tests/test_deploy.py::test_heavy_rules_are_retried_with_the_configured_sizes
    assert prof["rerun-incomplete"] is True and int(prof["retries"]) >= 1
    assert "executor" not in prof  # local execution


def test_workstation_profile_is_picked_up_by_default(tmp_path):
    """A plain `snakemake` run from the repository root loads workflow/profiles/default.

    Snakemake looks for `profiles/default` in the working directory and next to the Snakefile:
    this needs workflow/Snakefile, or a `profiles -> workflow/profiles` link at the root.
    """
    sf = snakefile()
    assert sf is not None, "no Snakefile found"
    res = subprocess.run(
        [sys.executable, "-m", "snakemake", "-s", str(sf), "--directory", str(tmp_path),
         "--configfile", str(study_config_file()), "--dry-run", "--quiet", "all"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    m = re.search(r"workflow specific profile (\S+) for setting", res.stderr)
    assert m, "the workstation profile was not loaded:\n" + res.stderr[-2000:]
    assert (ROOT / m.group(1)).resolve() == DEFAULT_PROFILE.parent.resolve(), m.group(1)


def test_profiles_name_existing_rules_and_light_rules_run_locally():
    rules, local = rules_and_localrules()
    assert rules, "no rules found in workflow/rules"
    for path in (SLURM_PROFILE, DEFAULT_PROFILE):
        unknown = set(load_profile(path).get("set-resources", {})) - rules
        assert not unknown, f"{path.relative_to(ROOT)} sets resources of unknown rules {unknown}"
    assert not local & set(GPU_RULES), "GPU rules must be submitted, not run locally"
    missing = [r for r in LIGHT_RULES if r in rules and r not in local]
    assert not missing, f"declare light rules {missing} as `localrules` in the Snakefile"


# ------------------------------------------------------------------------------------------
# the cluster
# ------------------------------------------------------------------------------------------
def test_sbatch_wrap_runs_a_job(slurm_cluster: SlurmCluster, tmp_path):
    out = tmp_path / "hello.out"
    res = subprocess.run(
        [tool("sbatch"), "--parsable", "--wait", "-o", str(out),
         "--wrap", "echo hello from job $SLURM_JOB_ID on $(hostname -s)"],
        capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr + slurm_cluster.logs()
    job_id = res.stdout.strip().split(";")[0]
    assert out.read_text().strip() == f"hello from job {job_id} on {slurm_cluster.host}"


def test_each_gpu_job_sees_only_its_gpu(slurm_cluster: SlurmCluster, tmp_path):
    """Two concurrent --gpus=1 jobs each get one GPU, a different one, in CUDA_VISIBLE_DEVICES."""
    if slurm_cluster.gpus < 2:
        pytest.skip("the test node has a single GPU")
    jobs = []
    for i in range(2):
        out = tmp_path / f"gpu{i}.out"
        jobs.append((out, subprocess.Popen(
            [tool("sbatch"), "--parsable", "--wait", "--gpus=1", "--cpus-per-task=1",
             "--mem=100", "-o", str(out),
             "--wrap", "echo $CUDA_VISIBLE_DEVICES; sleep 3"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
    seen = []
    for out, proc in jobs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        seen.append(out.read_text().strip())
    assert all(re.fullmatch(r"\d+", s) for s in seen), seen  # exactly one device each
    assert len(set(seen)) == 2, f"both jobs were given the same GPU: {seen}"


class JobRecorder(threading.Thread):
    """Records every job slurmctld knows about (``scontrol -o show job``) while a run lasts.

    There is no accounting database (no ``sacct``): this history is the proof of what SLURM ran.
    """

    def __init__(self, period_s: float = 2.0):
        super().__init__(daemon=True)
        self.period_s = period_s
        self.jobs: dict[str, dict[str, str]] = {}
        self._done = threading.Event()

    def poll(self) -> None:
        res = subprocess.run([tool("scontrol"), "-o", "show", "job"], capture_output=True,
                             text=True, timeout=30)
        for line in res.stdout.splitlines():
            fields = dict(re.findall(r"(\w+(?:/\w+)?)=(\S*)", line))
            if "JobId" in fields:
                self.jobs[fields["JobId"]] = fields

    def run(self) -> None:
        while not self._done.is_set():
            try:
                self.poll()
            except (subprocess.SubprocessError, OSError):
                pass
            self._done.wait(self.period_s)

    def stop(self) -> None:
        self._done.set()
        self.join(timeout=60)
        self.poll()


def filled_in_resources(cluster: SlurmCluster) -> tuple[list[str], list[str]]:
    """The SLURM profile's resources with the user's placeholders filled in for the test cluster.

    ``FILL_IN`` partitions -> the test partition; no account (the run adds
    ``--slurm-no-account``). Everything else is passed on unchanged. Given on the command line these lists replace the profile's two keys
    as a whole, hence the full copy.
    """
    prof = load_profile(SLURM_PROFILE)

    def fill(res: dict) -> dict:
        out = {k: v for k, v in res.items() if k != "slurm_account"}
        if "slurm_partition" in out:
            out["slurm_partition"] = cluster.partition
        return out

    defaults = [f"{k}={v}" for k, v in fill(prof["default-resources"]).items()]
    per_rule = [f"{rule}:{k}={v}" for rule, res in prof["set-resources"].items()
                for k, v in fill(res).items()]
    return defaults, per_rule


def memory_mb(job: dict[str, str]) -> int:
    """The memory a SLURM job was given (``scontrol``'s ``MinMemoryNode``, e.g. ``200M``), in MB."""
    value, unit = re.fullmatch(r"(\d+)([MGT]?)", job["MinMemoryNode"]).groups()
    return int(value) * {"": 1, "M": 1, "G": 1024, "T": 1024**2}[unit]


def run_bounded(cmd: list[str], cwd: Path, log: Path, timeout_s: float) -> tuple[int, float]:
    """Run ``cmd`` with output to ``log``, bounded: on timeout send SIGINT, not SIGTERM
    (snakemake then cancels its SLURM jobs and exits); SIGKILL only if it ignores that.
    Returns (exit status, seconds)."""
    t0 = time.monotonic()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=fh, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=30)
            rc = None
    elapsed = time.monotonic() - t0
    if rc is None:
        pytest.fail(f"snakemake did not finish within {timeout_s}s (interrupted)\n"
                    + "\n".join(log.read_text(errors="replace").splitlines()[-60:]),
                    pytrace=False)
    return rc, elapsed


@pytest.mark.slow
def test_tiny_study_runs_through_slurm(slurm_cluster: SlurmCluster, tmp_path):
    sf = snakefile()
    test_config = study_config_file()
    if sf is None or not test_config.is_file():
        pytest.fail("the workflow (Snakefile, config/test.yaml) is missing", pytrace=False)
    workdir = tmp_path / "study"
    workdir.mkdir()
    defaults, per_rule = filled_in_resources(slurm_cluster)
    too_small = tmp_path / "predict_too_small.yaml"  # merged over config/test.yaml
    # a GPU cluster's configuration: one GPU per training and prediction job, from the config
    too_small.write_text(yaml.safe_dump(
        {"resources": {"predict": {"mem_mb": PREDICT_FIRST_MB, "gpus": 1}, "train": {"gpus": 1},
                       "retries": PREDICT_RETRIES},
         "train": {"seeds_by_variant": {"unet3d": 1}}}))
    cmd = [sys.executable, "-m", "snakemake",
           "--snakefile", str(sf), "--directory", str(workdir),
           # the SLURM profile as users run it (replaces the workstation profile)
           "--workflow-profile", str(SLURM_PROFILE.parent),
           "--configfile", str(test_config), str(too_small),
           *SHRINK,
           # the profile's FILL_IN placeholders filled in for this cluster (GPU requests as is)
           "--default-resources", *defaults,
           "--set-resources", *per_rule,
           "--slurm-no-account",
           "--slurm-init-seconds-before-status-checks", str(TEST_STATUS_WAIT_S),
           "--retries", "0"]
    print("command:", " ".join(cmd))
    recorder = JobRecorder()
    recorder.start()
    try:
        rc, elapsed = run_bounded(cmd, workdir, tmp_path / "snakemake.log", STUDY_TIMEOUT_S)
    finally:
        recorder.stop()
    log = (tmp_path / "snakemake.log").read_text(errors="replace")
    print(f"SLURM study run: {elapsed:.0f} s (cluster start {slurm_cluster.start_seconds:.1f} s)")
    assert rc == 0, "\n".join(log.splitlines()[-80:]) + "\n" + slurm_cluster.logs()

    # outputs of the study
    for out in ("results/tables/table1.csv", "results/tables/table1.md",
                "results/figures/fig5.png", "results/provenance.json"):
        assert (workdir / out).is_file(), f"missing {out}"
    for variant in ("unet3d",):
        for split in (0, 1):
            assert (workdir / f"results/models/{variant}/split{split}/seed0/model.pt").is_file()

    # the jobs really went through SLURM: ids announced by the plugin ...
    announced = re.findall(
        r"Job \d+ has been submitted with SLURM jobid (\d+) \(log: (\S+)\)\.", log)
    submitted = {sid: Path(logfile) for sid, logfile in announced}
    assert submitted, "no job was submitted to SLURM\n" + log[-3000:]
    # ... each with its SLURM log in .snakemake/slurm_logs/rule_<rule>/.../<jobid>.log ...
    logdir = workdir / ".snakemake" / "slurm_logs"
    for sid, logfile in submitted.items():
        assert logfile.is_file() and logfile.is_relative_to(logdir), (sid, logfile)
    # ... and seen by slurmctld, completed, with the GPU requested by the profile
    history = recorder.jobs
    assert set(submitted) <= set(history), set(submitted) - set(history)
    attempts: dict[str, list[str]] = {}  # the plugin's comment (rule + wildcards) -> job ids
    for sid in sorted(submitted, key=int):
        attempts.setdefault(history[sid]["Comment"], []).append(sid)
    by_rule: dict[str, list[dict[str, str]]] = {}
    for comment, sids in attempts.items():
        rule = re.match(r"rule_([A-Za-z0-9_]+?)(?:_wildcards_|$)", comment).group(1)
        *killed, last = (history[sid] for sid in sids)
        assert last["JobState"] == "COMPLETED" and last["ExitCode"] == "0:0", last
        # memory grows with the attempt (attempt_scaled); only a job given too little memory
        # was resubmitted, and only after SLURM killed it for exceeding its memory
        first_mb = memory_mb(history[sids[0]])
        assert [memory_mb(history[sid]) for sid in sids] == [first_mb * k for k in range(1, len(sids) + 1)], sids
        for job in killed:
            # the rules sized by resources.predict: the test and the validation predictions
            assert rule in ("predict", "predict_validation") and job["JobState"] != "COMPLETED", job
            text = submitted[job["JobId"]].read_text(errors="replace")
            assert "exceeded memory limit" in text, job
            # the retry is a new SLURM job with more memory, never a restart inside the same allocation
            assert "Trying to restart" not in text, job
        by_rule.setdefault(rule, []).append(last)
    # every prediction job's first attempt was killed for memory, and a later one completed
    predict_attempts = [sids for comment, sids in attempts.items() if comment.startswith("rule_predict_")]
    assert predict_attempts and all(memory_mb(history[sids[0]]) == PREDICT_FIRST_MB and len(sids) > 1
                                    for sids in predict_attempts), predict_attempts
    for rule in GPU_RULES:
        assert rule in by_rule, f"no {rule} job went through SLURM: {sorted(by_rule)}"
        for job in by_rule[rule]:
            assert "gpu:1" in job.get("TresPerJob", "") + job.get("TresPerNode", ""), job
    _, local = rules_and_localrules()
    assert not local & set(by_rule), f"local rules were submitted: {local & set(by_rule)}"

    # the same profile on a CPU-only cluster: gpus 0 in the config -> a training job without a GPU
    cpu_only = tmp_path / "cpu_only.yaml"
    cpu_only.write_text(yaml.safe_dump({"resources": {"train": {"gpus": 0}, "predict": {"gpus": 0}}}))
    model = "results/models/unet3d/split0/seed0/model.pt"
    cpu_cmd = [*cmd[:cmd.index("--configfile") + 2], str(cpu_only), *cmd[cmd.index("--configfile") + 3:],
               model, "--forcerun", "train"]  # the target first: --forcerun takes every word after it
    recorder = JobRecorder()
    recorder.start()
    try:
        rc, _ = run_bounded(cpu_cmd, workdir, tmp_path / "snakemake_cpu.log", 5 * 60)
    finally:
        recorder.stop()
    cpu_log = (tmp_path / "snakemake_cpu.log").read_text(errors="replace")
    assert rc == 0, "\n".join(cpu_log.splitlines()[-60:])
    cpu_jobs = re.findall(r"Job \d+ has been submitted with SLURM jobid (\d+)", cpu_log)
    assert len(cpu_jobs) == 1, cpu_log[-3000:]
    job = recorder.jobs[cpu_jobs[0]]
    assert job["Comment"].startswith("rule_train") and job["JobState"] == "COMPLETED", job
    assert "gpu" not in job.get("TresPerJob", "") + job.get("TresPerNode", ""), job

    # where the time went (printed; see docs/scaling.md)
    def seconds(job: dict[str, str]) -> float:
        t = [time.mktime(time.strptime(job[k], "%Y-%m-%dT%H:%M:%S"))
             for k in ("StartTime", "EndTime")]
        return t[1] - t[0]

    busy = {rule: sum(seconds(j) for j in jobs) for rule, jobs in by_rule.items()}
    print(f"{len(submitted)} SLURM jobs, " + ", ".join(
        f"{rule} {len(by_rule[rule])} ({busy[rule]:.0f} s)" for rule in sorted(by_rule))
        + f"; job run time in total {sum(busy.values()):.0f} s, wall {elapsed:.0f} s")


def test_the_cluster_fixture_changes_the_system_only_on_ci_or_when_asked(monkeypatch):
    """Outside CI, without RSANET_TEST_SLURM=1, the fixture skips before installing packages or
    writing /etc/slurm: `./run.sh test` on a workstation changes nothing outside the checkout."""
    import slurm_cluster as sc

    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv(sc.ALLOW_ENV, raising=False)
    assert not sc.system_changes_allowed()
    monkeypatch.setenv(sc.ALLOW_ENV, "1")
    assert sc.system_changes_allowed()
    monkeypatch.delenv(sc.ALLOW_ENV)
    monkeypatch.setenv("CI", "true")
    assert sc.system_changes_allowed()
    # and a test that needs the cluster, run as on a workstation, is skipped with that reason
    env = {k: v for k, v in os.environ.items() if k not in ("CI", sc.ALLOW_ENV)}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                          f"{__file__}::test_sbatch_wrap_runs_a_job"], env=env, capture_output=True, text=True,
                         timeout=120, cwd=Path(__file__).parent)
    assert "1 skipped" in run.stdout and "RSANET_TEST_SLURM=1" in run.stdout, run.stdout[-2000:]
