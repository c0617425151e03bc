"""What the SLURM training tests share: the tiny job's overrides, its metrics rows, waits that release requeued
jobs held by SLURM and fail fast with the rank's log, the launcher as a subprocess."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from cratescale.engine.metrics import read_metrics
from cratescale.launch import slurm_tools
import slurm_helpers

REPO = Path(__file__).resolve().parents[2]
BASE_JOB = REPO / "tests" / "dist" / "tiny.yaml"
STEPS = 100   # ~50 ms a step here: a few seconds of training after each restart, time for a signal to land
# cluster.slurm_poll_s at its floor (10 s): the follower asks SLURM once a period (issue 28), 30 s by default
COMMON = [f"schedule.steps={STEPS}", "logging.every_steps=1", "checkpoint.keep_last=2", "cluster.slurm_poll_s=10"]
RESTART_TIMEOUT = 240   # a restart is ~15-45 s of imports and DeepSpeed setup on a loaded 2-core machine


def rows(run_dir: Path, kind: str | None = None) -> list[dict]:
    return [r for r in read_metrics(run_dir) if kind is None or r.get("kind") == kind]


def last_step(run_dir: Path) -> int:
    train = rows(run_dir, "train")
    return train[-1]["step"] if train else -1


def mid_run(run_dir: Path, starts: int, ahead: int = 2) -> bool:
    """The `starts`-th start has trained `ahead` steps (and has not finished)."""
    s = rows(run_dir, "start")
    return len(s) == starts and last_step(run_dir) >= s[-1]["step"] + ahead


def restarted(run_dir: Path, starts: int) -> bool:
    """The run has started `starts` times; fails at once if it finished before a stop landed."""
    if len(rows(run_dir, "start")) >= starts:
        return True
    ends = rows(run_dir, "end")
    assert not (ends and ends[-1]["status"] == "completed"), "the run finished before the stop landed"
    return False


def log_tail(run_dir: Path, lines: int = 25) -> str:
    logs = sorted((run_dir / "submitit").glob("*/*_0_log.err"), key=lambda p: p.stat().st_mtime)
    return "\n".join(logs[-1].read_text().splitlines()[-lines:]) if logs else "(no log)"


def wait_until(predicate, timeout: float, what: str, run_dir: Path, job_id=None) -> None:
    """Poll `predicate`, starting the job early when SLURM holds it after a requeue; fail fast if it died."""
    t0 = time.monotonic()
    while not predicate():
        jid = job_id() if callable(job_id) else job_id
        if jid:
            slurm_helpers.release_if_held(jid, min_held_s=2)
        assert time.monotonic() - t0 < timeout, \
            f"timed out after {timeout} s waiting for {what}; job {jid}: " \
            f"{slurm_tools.job_info(jid).get('JobState') if jid else '-'}\n{log_tail(run_dir)}"
        time.sleep(0.1)


def job_overrides(run_dir: Path, manifest: Path, name: str, extra: list[str]) -> list[str]:
    return [f"run_dir={run_dir}", f"name={name}", f"data.root={manifest.parent}", "cluster.executor=slurm",
            "cluster.profile=local", "stages=[pretrain]", *COMMON, *extra]



def launch_cli(run_dir: Path, manifest: Path, name: str, extra: list[str], processes: list) -> subprocess.Popen:
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    log = (run_dir.parent / f"{run_dir.name}-launcher.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "cratescale.launch", str(BASE_JOB),
                             *job_overrides(run_dir, manifest, name, extra)],
                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=run_dir.parent)
    processes.append(proc)
    return proc


def launcher_job_ids(run_dir: Path) -> list[str]:
    state = run_dir / "launch.json"
    try:
        return json.loads(state.read_text())["job_ids"] if state.exists() else []
    except json.JSONDecodeError:   # replaced atomically, but read it again to be safe
        return []
