"""A real single-node SLURM cluster on localhost, started from Debian's packages for the tests.

Used by ``tests/test_slurm.py`` (``from slurm_cluster import slurm_cluster``). The fixture

1. installs ``slurmctld slurmd slurm-client munge`` with ``apt-get`` when the tools are missing
   (idempotent: nothing is installed when they are present; ``apt-get update`` only runs when the
   first install attempt fails, e.g. in a fresh container without package lists);
2. writes ``/etc/slurm/slurm.conf`` (+ ``gres.conf``) for one node named ``hostname -s`` on
   127.0.0.1, with no accounting database, ``select/cons_tres``, ``proctrack/pgid``, ``task/none``,
   memory enforced as on a real cluster (``jobacct_gather/linux`` with ``OverMemoryKill``: a job
   step above its ``--mem`` is killed within a second) and ``MinJobAge`` >= 3x the executor
   plugin's initial wait before its first status check;
3. makes sure a munge key exists, starts ``munged`` as the ``munge`` user (unless a working one
   is already running), then ``slurmctld`` and ``slurmd`` in the foreground as child processes;
4. waits (bounded) until ``sinfo`` reports the node idle, yields a :class:`SlurmCluster`;
5. on teardown cancels the jobs left on its own cluster and stops only the daemons it started.

Nothing of this happens unless asked: on CI (``CI=true``, set by ``.ci/run``) or with
``RSANET_TEST_SLURM=1``; otherwise the SLURM tests are skipped with that reason, and the suite
changes nothing on the machine outside the checkout and temporary folders.

Where the cluster cannot be provided (not root, no apt-get, a foreign SLURM installation that
must not be overwritten) the tests are *skipped* with the reason -- except when the environment
variable ``CI=true`` is set: CI must run these tests, so there the fixture *fails* instead.

Facts this module is built around (verified on Debian 12 containers):

* The executor plugin strips ``SLURM_CONF`` inside jobs, so the config must live at the default
  path ``/etc/slurm/slurm.conf``; an existing config not written by this module is never touched.
* Without accounting ``sacct`` fails, so the workflow must poll with ``squeue``. The plugin only
  uses ``squeue`` when ``MinJobAge >= 3 * init_seconds_before_status_checks`` (otherwise it
  silently falls back to ``sacct`` and the run hangs), hence ``MIN_JOB_AGE_S`` below.
* There is no GPU on the test machines, and SLURM refuses a ``gpu`` GRES without device files.
  Unless real ``/dev/nvidia<N>`` devices exist (then those are declared), the node declares
  *stand-in GPUs*: a ``gpu`` GRES whose device files are null devices made by this fixture
  (``/var/lib/rsanet-slurm-test/fake-gpu/nvidia<N>``, char 1:3 like ``/dev/null``). SLURM then
  schedules GPU jobs, counts GPUs and exports ``CUDA_VISIBLE_DEVICES``/``SLURM_JOB_GPUS`` exactly
  as on a GPU node -- but there is no CUDA device behind them: torch finds no GPU and computes on
  the CPU. The tests say so; nothing claims GPU computation happened.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
#: tools the fixture and the tests need, found on PATH or in /usr/sbin, /sbin
REQUIRED_TOOLS = (
    "slurmctld", "slurmd", "sinfo", "sbatch", "squeue", "scontrol", "scancel",
    "munged", "munge", "unmunge",
)
SLURM_CONF = Path("/etc/slurm/slurm.conf")
GRES_CONF = Path("/etc/slurm/gres.conf")
MUNGE_KEY = Path("/etc/munge/munge.key")
STATE_DIR = Path("/var/lib/rsanet-slurm-test")
LOCK_FILE = Path("/var/lib/rsanet-slurm-test.lock")
PIDS_FILE = STATE_DIR / "daemons.json"
MARKER = "# Written by rsanet tests/slurm_cluster.py: throwaway single-node test cluster."
PARTITION = "debug"
CTLD_PORT = 6817
SLURMD_PORT = 6818

#: the executor plugin's default ``--slurm-init-seconds-before-status-checks`` (also the value in
#: workflow/profiles/slurm/config.yaml); the tests may use a smaller one, never a larger one.
PLUGIN_INIT_WAIT_S = 40
#: SLURM forgets finished jobs after MinJobAge seconds; ``squeue`` status needs them to be visible
#: until the plugin's next status check: the plugin requires MinJobAge >= 3 x its initial wait.
MIN_JOB_AGE_S = 300
assert MIN_JOB_AGE_S >= 3 * PLUGIN_INIT_WAIT_S

INSTALL_TIMEOUT_S = 900
START_TIMEOUT_S = 60
STOP_TIMEOUT_S = 20
LOCK_TIMEOUT_S = 1800


# --------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------
def on_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"true", "1", "yes"}


#: Set to 1 to let the fixture change this machine (install packages, write /etc/slurm, start
#: daemons) outside CI; without it, and outside CI, the SLURM tests are skipped and the test
#: suite changes nothing outside the checkout and temporary folders.
ALLOW_ENV = "RSANET_TEST_SLURM"


def system_changes_allowed() -> bool:
    """Whether the fixture may install packages and write /etc/slurm: on CI, or when asked."""
    return on_ci() or os.environ.get(ALLOW_ENV, "").strip().lower() in {"true", "1", "yes"}


def unavailable(reason: str) -> None:
    """Skip with ``reason`` -- or fail when ``CI=true`` (CI must run the SLURM tests)."""
    if on_ci():
        pytest.fail(f"SLURM test cluster unavailable and CI=true forbids skipping: {reason}",
                    pytrace=False)
    pytest.skip(f"SLURM test cluster unavailable: {reason}")


def tool(name: str) -> str | None:
    """Absolute path of a SLURM/munge tool (daemons live in /usr/sbin, not always on PATH)."""
    found = shutil.which(name)
    if found:
        return found
    for d in ("/usr/sbin", "/sbin", "/usr/bin"):
        p = Path(d, name)
        if p.is_file() and os.access(p, os.X_OK):
            return str(p)
    return None


def run(cmd: list[str], timeout: float = 30, **kw) -> subprocess.CompletedProcess:
    """Run a command with a bounded wait; never raises on a non-zero exit or a timeout."""
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        err = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
        return subprocess.CompletedProcess(cmd, 124, out, err + f"\n[timed out after {timeout}s]")


def tail(text: str, n: int = 25) -> str:
    return "\n".join((text or "").strip().splitlines()[-n:])


def file_tail(path: Path, n: int = 25) -> str:
    try:
        return f"--- {path} ---\n" + tail(path.read_text(errors="replace"), n)
    except OSError:
        return f"--- {path}: (absent) ---"


def port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def proc_comm(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return None


def proc_start_ticks(pid: int) -> int | None:
    """Start time of a process in clock ticks since boot (field 22 of /proc/<pid>/stat)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def boot_ticks_now() -> int:
    uptime_s = float(Path("/proc/uptime").read_text().split()[0])
    return int(uptime_s * os.sysconf("SC_CLK_TCK"))


# --------------------------------------------------------------------------------------------
# installation
# --------------------------------------------------------------------------------------------
def missing_tools() -> list[str]:
    return [t for t in REQUIRED_TOOLS if tool(t) is None]


def ensure_packages() -> None:
    """apt-get install the SLURM and munge packages if (and only if) tools are missing."""
    missing = missing_tools()
    if not missing:
        return
    what = f"missing {', '.join(missing)} (Debian packages {' '.join(PACKAGES)})"
    if os.geteuid() != 0:
        unavailable(f"{what}; installing them needs root, this is uid {os.geteuid()}")
    apt = shutil.which("apt-get")
    if apt is None:
        unavailable(f"{what}; no apt-get on this system to install them")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = [apt, "install", "-y", "-qq", "--no-install-recommends",
               "-o", "Dpkg::Use-Pty=0", *PACKAGES]
    res = run(install, timeout=INSTALL_TIMEOUT_S, env=env)
    if res.returncode != 0:
        # fresh containers ship without package lists: refresh them once, then retry
        upd = run([apt, "update", "-qq"], timeout=INSTALL_TIMEOUT_S, env=env)
        res = run(install, timeout=INSTALL_TIMEOUT_S, env=env)
        if res.returncode != 0:
            unavailable(f"{what}; `{' '.join(install)}` failed (after apt-get update, "
                        f"rc={upd.returncode}):\n{tail(res.stdout + res.stderr)}")
    still = missing_tools()
    if still:
        unavailable(f"after installing {' '.join(PACKAGES)} still missing: {', '.join(still)}")


# --------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class SlurmCluster:
    """What the tests need to know about the running test cluster."""

    host: str
    cpus: int
    mem_mb: int  # RealMemory of the node
    partition: str
    gpus: int  # GRES gpu count of the node
    gpu_devices: list[str]  # device files behind the GRES
    stand_in_gpus: bool  # True: the "GPUs" are null devices (no GPU on this machine)
    min_job_age_s: int
    conf: Path
    state_dir: Path
    start_seconds: float  # time from launching the daemons to the node being idle

    def logs(self) -> str:
        return "\n".join(file_tail(self.state_dir / f) for f in
                         ("slurmctld.log", "slurmd.log", "slurmctld.out", "slurmd.out"))


def node_memory_mb() -> int:
    """RealMemory for the node: MemTotal with a margin (10 %, at least 512 MB) left to the OS."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            total_mb = int(line.split()[1]) // 1024
            return max(256, total_mb - max(512, total_mb // 10))
    return 1024


def real_gpu_devices() -> list[str]:
    return sorted(str(p) for p in Path("/dev").glob("nvidia[0-9]*"))


def stand_in_gpu_devices(n: int) -> list[str]:
    """``n`` null character devices (major 1, minor 3) to declare as the files of stand-in GPUs."""
    folder = STATE_DIR / "fake-gpu"
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(n):
        f = folder / f"nvidia{i}"
        try:
            os.mknod(f, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        except OSError:  # no CAP_MKNOD (some containers): fall back to existing null devices
            return ["/dev/null", "/dev/zero"][:n]
        files.append(str(f))
    return files


def write_config(host: str, cpus: int, mem_mb: int, devices: list[str], stand_in: bool) -> None:
    """Write slurm.conf and gres.conf for one node with ``len(devices)`` GPUs."""
    SLURM_CONF.parent.mkdir(parents=True, exist_ok=True)
    SLURM_CONF.write_text(f"""{MARKER}
# Safe to delete. One node on localhost, no accounting database (sacct does not work: the
# workflow uses the executor plugin's `squeue` status command).
ClusterName=rsanettest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={CTLD_PORT}
SlurmdPort={SLURMD_PORT}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
MailProg=/bin/true
ProctrackType=proctrack/pgid
TaskPlugin=task/none
# memory enforced as on a real cluster: a step above its --mem is killed (OUT_OF_MEMORY)
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=task=1
JobAcctGatherParams=OverMemoryKill
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=512
ReturnToService=2
# trust the node definition below (CPUs from nproc, memory with a margin) over detection
SlurmdParameters=config_overrides
# keep finished jobs visible to `squeue` >= 3x the plugin's initial status-check wait
MinJobAge={MIN_JOB_AGE_S}
StateSaveLocation={STATE_DIR}/slurmctld
SlurmdSpoolDir={STATE_DIR}/slurmd
SlurmctldPidFile={STATE_DIR}/slurmctld.pid
SlurmdPidFile={STATE_DIR}/slurmd.pid
SlurmctldLogFile={STATE_DIR}/slurmctld.log
SlurmdLogFile={STATE_DIR}/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
GresTypes=gpu
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={mem_mb} Gres=gpu:{len(devices)} State=UNKNOWN
PartitionName={PARTITION} Nodes={host} Default=YES MaxTime=INFINITE State=UP
""")
    note = ("# STAND-IN GPUs: null devices, no CUDA device behind them (see tests/slurm_cluster.py)\n"
            if stand_in else "")
    lines = [f"NodeName={host} Name=gpu File={d}" for d in devices]
    GRES_CONF.write_text(MARKER + "\n" + note + "AutoDetect=off\n" + "\n".join(lines) + "\n")


def ensure_munge_key() -> None:
    munge_user = pwd.getpwnam("munge")
    MUNGE_KEY.parent.mkdir(parents=True, exist_ok=True)
    if not MUNGE_KEY.exists():
        mungekey = tool("mungekey")
        created = False
        if mungekey:
            created = run([mungekey, "--create", "--keyfile", str(MUNGE_KEY)]).returncode == 0
        if not created:
            MUNGE_KEY.write_bytes(os.urandom(1024))
    os.chown(MUNGE_KEY, munge_user.pw_uid, munge_user.pw_gid)
    os.chmod(MUNGE_KEY, 0o400)
    # munged runs as `munge` and insists on owning its socket, log and state folders
    for d, mode in (("/run/munge", 0o755), ("/var/log/munge", 0o700),
                    ("/var/lib/munge", 0o700), ("/etc/munge", 0o700)):
        Path(d).mkdir(parents=True, exist_ok=True)
        os.chown(d, munge_user.pw_uid, munge_user.pw_gid)
        os.chmod(d, mode)


def munge_works() -> bool:
    munge, unmunge = tool("munge"), tool("unmunge")
    if not (munge and unmunge):
        return False
    cred = run([munge, "-n"], timeout=10)
    if cred.returncode != 0:
        return False
    return run([unmunge], timeout=10, input=cred.stdout).returncode == 0


# --------------------------------------------------------------------------------------------
# daemons
# --------------------------------------------------------------------------------------------
def stop_process(proc: subprocess.Popen, name: str) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=STOP_TIMEOUT_S)


def stop_stale_daemons() -> None:
    """Stop daemons recorded by an earlier run of this fixture that was killed before teardown."""
    try:
        recorded = json.loads(PIDS_FILE.read_text())
    except (OSError, ValueError):
        return
    for name, pid in recorded.items():
        if proc_comm(pid) == name[:15]:
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + STOP_TIMEOUT_S
            while proc_comm(pid) == name[:15] and time.monotonic() < deadline:
                time.sleep(0.2)
            if proc_comm(pid) == name[:15]:
                os.kill(pid, signal.SIGKILL)
    PIDS_FILE.unlink(missing_ok=True)


def cancel_all_jobs(deadline_s: float = 30) -> None:
    """Cancel every job left on the test cluster and wait (bounded) until they are gone."""
    squeue, scancel = tool("squeue"), tool("scancel")
    ids = run([squeue, "-h", "-o", "%i"], timeout=10).stdout.split()
    if ids:
        run([scancel, "--quiet", *ids], timeout=10)
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        active = run([squeue, "-h", "-t", "PD,R,CG,S", "-o", "%i"], timeout=10)
        if active.returncode != 0 or not active.stdout.strip():
            return
        time.sleep(0.5)


def kill_orphan_stepds(since_ticks: int) -> None:
    """Kill slurmstepd processes started by our slurmd (after ``since_ticks``) that outlived it."""
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        pid = int(p.name)
        if proc_comm(pid) == "slurmstepd" and (proc_start_ticks(pid) or 0) >= since_ticks:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    if not system_changes_allowed():
        unavailable(f"the SLURM test cluster installs Debian packages, writes /etc/slurm and starts daemons, "
                    f"which a test run on a workstation must not do unasked; it runs on CI (CI=true) or "
                    f"with {ALLOW_ENV}=1")
    if not (Path("/etc/debian_version").exists() or shutil.which("apt-get") or not missing_tools()):
        unavailable("not a Debian-like system and no SLURM tools installed")
    ensure_packages()
    if os.geteuid() != 0:
        unavailable("starting slurmctld/slurmd/munged and writing /etc/slurm needs root")
    if SLURM_CONF.exists() and MARKER not in SLURM_CONF.read_text(errors="replace"):
        unavailable(f"{SLURM_CONF} exists and was not written by this fixture: refusing to "
                    "overwrite a real SLURM configuration (the plugin needs this exact path)")

    # one test cluster per machine at a time: serialise concurrent test sessions (bounded)
    LOCK_FILE.parent.mkdir(parents=True, exist_ok=True)
    lock = open(LOCK_FILE, "w")
    deadline = time.monotonic() + LOCK_TIMEOUT_S
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() > deadline:
                lock.close()
                unavailable(f"another test session held {LOCK_FILE} for {LOCK_TIMEOUT_S}s")
            time.sleep(2)

    started: dict[str, subprocess.Popen] = {}
    logs: list = []
    since_ticks = boot_ticks_now()
    try:
        stop_stale_daemons()
        for port in (CTLD_PORT, SLURMD_PORT):
            if port_open(port):
                unavailable(f"port {port} is already in use: a SLURM daemon not started by this "
                            "fixture is running; stop it or run the tests elsewhere")

        host = socket.gethostname().split(".")[0]
        cpus = len(os.sched_getaffinity(0))
        mem_mb = node_memory_mb()
        if STATE_DIR.exists():
            shutil.rmtree(STATE_DIR)
        for sub in ("slurmctld", "slurmd"):
            (STATE_DIR / sub).mkdir(parents=True)
        devices = real_gpu_devices()
        stand_in = not devices
        if stand_in:  # two stand-ins let the tests see two GPU jobs get different GPUs
            devices = stand_in_gpu_devices(2 if cpus >= 2 else 1)
        write_config(host, cpus, mem_mb, devices, stand_in)

        ensure_munge_key()
        t0 = time.monotonic()

        def launch(name: str, argv: list[str], **kw) -> None:
            out = open(STATE_DIR / f"{name}.out", "w")
            logs.append(out)
            started[name] = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL, start_new_session=True,
                                             **kw)
            PIDS_FILE.write_text(json.dumps({n: p.pid for n, p in started.items()}))

        if not munge_works():
            launch("munged", [tool("munged"), "--foreground", "--force"],
                   user="munge", group="munge", extra_groups=[])
            _wait(munge_works, 15, "munged to answer `munge -n | unmunge`",
                  lambda: file_tail(STATE_DIR / "munged.out") + "\n"
                  + file_tail(Path("/var/log/munge/munged.log")))

        launch("slurmctld", [tool("slurmctld"), "-D", "-c", "-f", str(SLURM_CONF)])
        launch("slurmd", [tool("slurmd"), "-D", "-N", host, "-f", str(SLURM_CONF)])
        cluster = SlurmCluster(host=host, cpus=cpus, mem_mb=mem_mb, partition=PARTITION,
                               gpus=len(devices), gpu_devices=devices, stand_in_gpus=stand_in,
                               min_job_age_s=MIN_JOB_AGE_S,
                               conf=SLURM_CONF, state_dir=STATE_DIR, start_seconds=0.0)
        sinfo = tool("sinfo")

        def node_idle() -> bool:
            for name, p in started.items():
                if p.poll() is not None:
                    pytest.fail(f"{name} exited with {p.returncode} during start-up\n"
                                + cluster.logs(), pytrace=False)
            res = run([sinfo, "-h", "-N", "-o", "%N %t"], timeout=10)
            return res.returncode == 0 and f"{host} idle" in res.stdout

        _wait(node_idle, START_TIMEOUT_S, f"node {host} to be idle in sinfo", cluster.logs)
        cluster.start_seconds = time.monotonic() - t0
        yield cluster
    finally:
        try:
            if "slurmctld" in started:
                cancel_all_jobs()
            for name in ("slurmd", "slurmctld", "munged"):
                if name in started:
                    stop_process(started[name], name)
            if "slurmd" in started:
                kill_orphan_stepds(since_ticks)
            PIDS_FILE.unlink(missing_ok=True)
            # the configuration goes with the cluster: a client configured for a stopped controller
            # makes every later `snakemake` start wait 9 s (the SLURM plugin's `scontrol show config`
            # at import; docs/performance.md), the other workers' tests and the user's runs alike
            for conf in (SLURM_CONF, GRES_CONF):
                if conf.is_file() and MARKER in conf.read_text(errors="replace"):
                    conf.unlink()
        finally:
            for f in logs:
                f.close()
            fcntl.flock(lock, fcntl.LOCK_UN)
            lock.close()


def _wait(predicate, timeout_s: float, what: str, diagnostics) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.25)
    pytest.fail(f"timed out after {timeout_s}s waiting for {what}\n{diagnostics()}",
                pytrace=False)
