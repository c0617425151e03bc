"""Fixtures for tests against the local single-node SLURM cluster (cluster/dev/slurm_up.sh).

`pytest tests/slurm` on a fresh machine starts the cluster itself (installing the Debian packages as root) and
leaves it running for the next session (stop it with `make slurm-down`). A machine that cannot run SLURM makes
these tests FAIL, never skip; set CRATESCALE_NO_SLURM=1 to skip them on purpose.
Run pytest with the venv's python: submitit starts jobs with sys.executable.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import cloudpickle
import pytest

import slurm_helpers
from cratescale.launch import slurm_tools

REPO = Path(__file__).resolve().parents[2]
UP_SCRIPT = REPO / "cluster" / "dev" / "slurm_up.sh"
PARTITIONS = ("debug", "high")   # what slurm_up.sh configures; cluster/profiles/local.yaml names them


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.path).parents:
            item.add_marker(pytest.mark.slurm)
            # Test modules are not importable inside a job (tests/ is no package): ship their functions by value.
            module = getattr(item, "module", None)
            if module is not None:
                cloudpickle.register_pickle_by_value(module)


def _bring_up() -> None:
    if os.geteuid() != 0:
        pytest.fail(f"SLURM is not running and starting it needs root: run `sudo bash {UP_SCRIPT}` "
                    "(or set CRATESCALE_NO_SLURM=1 to skip the SLURM tests)", pytrace=False)
    t0 = time.monotonic()
    res = subprocess.run(["bash", str(UP_SCRIPT)], capture_output=True, text=True, timeout=600)
    if res.returncode != 0:
        pytest.fail(f"{UP_SCRIPT} failed (rc {res.returncode}):\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}",
                    pytrace=False)
    print(f"\n[slurm] started the dev cluster in {time.monotonic() - t0:.1f} s (it stays up: make slurm-down)")


@pytest.fixture(scope="session", autouse=True)
def slurm_cluster():
    """The running dev cluster's partitions; starts it if `sinfo` does not answer."""
    if os.environ.get("CRATESCALE_NO_SLURM") == "1":
        pytest.skip("CRATESCALE_NO_SLURM=1: SLURM tests skipped on purpose")
    if not slurm_helpers.cluster_available():
        _bring_up()
        if not slurm_helpers.cluster_available():
            pytest.fail("slurm_up.sh succeeded but sinfo still does not answer", pytrace=False)
    parts = slurm_tools.partitions()
    missing = [p for p in PARTITIONS if p not in parts]
    if missing:
        pytest.fail(f"SLURM answers but has no partition(s) {missing} (has {sorted(parts)}): these tests need "
                    f"the dev cluster of {UP_SCRIPT}, not a real cluster", pytrace=False)
    if not Path(sys.executable).exists():
        pytest.fail(f"python {sys.executable} not found", pytrace=False)
    return parts


@pytest.fixture(scope="session")
def mn_cluster():
    """The multi-node dev cluster (cluster/dev/mn_up.sh) for the multinode tier: started here when it is not up,
    stopped (by pid) at the end of the session if this session started it."""
    from multinode import NODES, mn_down, mn_up, up_nodes

    started = up_nodes() < NODES
    if started:
        if os.geteuid() != 0:
            pytest.fail("the multi-node cluster is not up and starting it needs root", pytrace=False)
        t0 = time.monotonic()
        mn_up(NODES)
        print(f"\n[slurm] started the {NODES}-node dev cluster in {time.monotonic() - t0:.1f} s")
    yield
    if started:
        mn_down()


@pytest.fixture
def mn_conf(mn_cluster, monkeypatch):
    """sbatch/scontrol/sacct (and submitit, the launcher, Ray's sbatch) talk to the multi-node cluster in this
    test only; the other tiers keep the single-node one."""
    from multinode import MN_CONF

    monkeypatch.setenv("SLURM_CONF", MN_CONF)


# ---------------------------------------------------------------------------------------------- shared helpers
def scontrol_job(job_id: str) -> dict[str, str]:
    """`scontrol show job` as a dict ({} once SLURM forgot the job)."""
    return slurm_tools.job_info(job_id)


def sacct_states(job_id: str) -> list[str]:
    """Every recorded state of a job, oldest first (-D keeps requeued runs): e.g. ["REQUEUED", "COMPLETED"]."""
    out = subprocess.run(["sacct", "-D", "-X", "-n", "-P", "-o", "State", "-j", str(job_id)],
                         capture_output=True, text=True, check=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def wait_sacct(job_id: str, state: str, timeout: float = 20) -> list[str]:
    """Wait until sacct's last state of the job is `state` (slurmdbd gets it a moment after the job ends)."""
    t0 = time.monotonic()
    while True:
        states = sacct_states(job_id)
        if states and states[-1] == state:
            return states
        assert time.monotonic() - t0 < timeout, f"job {job_id}: sacct says {states}, expected last {state}"
        time.sleep(0.5)


def wait_done_kicking(job, timeout: float = 120) -> None:
    """Wait for a submitit job, starting a requeued one early.

    SLURM holds a requeued job for cred_expire s (Reason=BeginTime; 10 s in our slurm.conf). Releasing it is safe
    only >= 2 s after the requeue (same second: "Job credential revoked", job FAILED): release_if_held checks that.
    """
    t0 = time.monotonic()
    info: dict[str, str] = {}
    while not job.done():
        slurm_helpers.release_if_held(job.job_id, min_held_s=2)
        info = scontrol_job(job.job_id)
        assert time.monotonic() - t0 < timeout, \
            f"job {job.job_id} not done after {timeout} s: {info.get('JobState')} {info.get('Reason')}"
        time.sleep(0.3)


def wait_for(predicate, timeout: float, what: str) -> None:
    t0 = time.monotonic()
    while not predicate():
        assert time.monotonic() - t0 < timeout, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.2)


def progress_steps(path: Path) -> list[int]:
    """Steps written by a job as "step=N" lines."""
    if not path.exists():
        return []
    return [int(m) for m in re.findall(r"step=(\d+)", path.read_text())]


@pytest.fixture
def slurm():
    """The helpers above as one object, so test files need not import conftest."""
    return SimpleNamespace(scontrol_job=scontrol_job, sacct_states=sacct_states, wait_sacct=wait_sacct,
                           wait_done_kicking=wait_done_kicking, wait_for=wait_for, progress_steps=progress_steps)


# ---------------------------------------------------------------------------------------------- training jobs
@pytest.fixture(scope="session")
def tiny_manifest(tmp_path_factory) -> Path:
    """The 2-process tests' synthetic data (tests/dist/tiny.yaml), ingested once, inline (no Ray)."""
    from data_pipeline.ingest import ingest

    out = tmp_path_factory.mktemp("tiny_data")
    return Path(ingest("synthetic://shapes?n=192&classes=4&size=32&seed=1", out, workers=0))


def queued(name: str) -> list[str]:
    """Ids of the cluster's jobs called `name`, in any state SLURM still lists (pending, running, completing)."""
    out = subprocess.run(["squeue", "-h", "-n", name, "-o", "%i"], capture_output=True, text=True, timeout=30)
    return out.stdout.split()


class JobNames:
    """Unique SLURM job names for one test; whatever still runs under them is cancelled at teardown."""

    def __init__(self, test_name: str) -> None:
        self.prefix = f"cs{os.getpid()}-{re.sub(r'[^A-Za-z0-9]+', '-', test_name)[:30]}"
        self.names: list[str] = []

    def new(self, tag: str) -> str:
        name = f"{self.prefix}-{tag}"[:64]
        self.names.append(name)
        return name

    def cancel_all(self) -> None:
        # Plain scancel = SIGTERM: our ranks save and exit without requeueing themselves (a pending job just
        # goes). SIGKILL of everything if that did not end them within KillWait.
        for name in self.names:
            if queued(name):
                subprocess.run(["scancel", "-n", name], capture_output=True)
        t0 = time.monotonic()
        while any(queued(n) for n in self.names) and time.monotonic() - t0 < 20:
            time.sleep(0.5)
        for name in self.names:
            for job_id in queued(name):
                subprocess.run(["scancel", "--full", "--signal=KILL", job_id], capture_output=True)
                subprocess.run(["scancel", job_id], capture_output=True)


@pytest.fixture
def job_names(request):
    names = JobNames(request.node.name)
    yield names
    names.cancel_all()


@pytest.fixture
def processes():
    """Popen objects a test starts (the launcher CLI); stopped at teardown: SIGINT first, so Ray shuts down."""
    started: list[subprocess.Popen] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)   # the CLI detaches on Ctrl-C without a terminal, and stops its Ray
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=30)
