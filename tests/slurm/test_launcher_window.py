"""The launcher is a window on the job (issue 28 item 2), on the real dev SLURM cluster: --detach, a second launch
that follows the queued job, a SIGKILLed launcher and `attach`, with one job in SLURM's accounting."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import wait_sacct
from cratescale.launch.recover import read_record
from tests.dist.harness import consumed_samples
from train_helpers import (BASE_JOB, RESTART_TIMEOUT, job_overrides, last_step, launcher_job_ids, rows,
                           wait_until)


def _launcher(run_dir: Path, argv: list[str], log_name: str, processes: list) -> subprocess.Popen:
    log = (run_dir.parent / log_name).open("w")
    proc = subprocess.Popen([sys.executable, "-m", "cratescale.launch", *argv], stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, cwd=run_dir.parent)
    processes.append(proc)
    return proc


def _state(job_id: str) -> str:
    return subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True,
                          timeout=30).stdout.strip()


def test_the_launcher_is_a_window_detach_attach_and_a_killed_launcher_change_nothing(tmp_path, tiny_manifest,
                                                                                    job_names, processes):
    """Issue 28 item 2: --detach returns with the job submitted; the same command launched again while the job
    is queued follows it and submits nothing; that launcher SIGKILLed while the job trains changes nothing; `attach
    RUN_DIR` follows the job to its end. One job in SLURM's accounting, the same samples and weights as the
    uninterrupted run.

    Timing: a job that waits for nothing raced the second launcher, and with two busy loops on the 2 cores the
    launcher's start (50 s) outlasted the whole job (400 steps in 28 s): it found the run finished. A blocker job
    holding the node keeps the job pending until the second launcher follows it; the job then trains only once the
    blocker is cancelled."""
    run_dir = tmp_path / "run"
    name = job_names.new("window")
    # 400 steps, so the kill lands mid-run; the samples are checked against the sampler's sequence
    args = [str(BASE_JOB), *job_overrides(run_dir, tiny_manifest, name, ["checkpoint.every_steps=20",
                                                                         "schedule.steps=400"])]
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    blocker = subprocess.check_output(["sbatch", "--parsable", "-c", "2", "-J", job_names.new("blocker"),
                                       "-o", "/dev/null", "--wrap", "sleep 600"], text=True).strip()
    wait_until(lambda: _state(blocker) == "RUNNING", RESTART_TIMEOUT, "the blocker to hold the node", run_dir, blocker)
    detached = _launcher(run_dir, [*args, "--detach"], "detached.log", processes)
    assert detached.wait(timeout=RESTART_TIMEOUT) == 0, (tmp_path / "detached.log").read_text()[-2000:]
    job_id = launcher_job_ids(run_dir)[0]
    assert "detached: nothing left to run" in (tmp_path / "detached.log").read_text()   # stages=[pretrain]
    second = _launcher(run_dir, args, "second.log", processes)
    following = "is already training this run: following it, nothing submitted"
    wait_until(lambda: following in (tmp_path / "second.log").read_text(), RESTART_TIMEOUT,
               "the second launcher to follow the job", run_dir, job_id)
    assert _state(job_id) == "PENDING" and not rows(run_dir, "start")
    subprocess.run(["scancel", blocker], check=True)
    wait_until(lambda: rows(run_dir, "commit"), RESTART_TIMEOUT, "the first commit", run_dir, job_id)
    second.kill()   # SIGKILL: no handler runs
    # every rank SIGKILLed with no launcher alive: the job's own recovery retries the step in its allocation
    subprocess.run(["scancel", "--signal=KILL", f"{job_id}.0"], check=True)
    killed_at = last_step(run_dir)
    second.wait(timeout=30)
    assert wait_sacct(job_id, "COMPLETED", timeout=2 * RESTART_TIMEOUT) == ["COMPLETED"]
    assert killed_at < 400 and rows(run_dir, "end")[-1]["status"] == "completed"
    assert read_record(run_dir)["verdict"] == "retry" and len(rows(run_dir, "start")) == 2
    third = _launcher(run_dir, ["attach", str(run_dir)], "attach.log", processes)
    assert third.wait(timeout=RESTART_TIMEOUT) == 0, (tmp_path / "attach.log").read_text()[-3000:]
    assert "the whole schedule: nothing submitted" in (tmp_path / "attach.log").read_text()
    assert launcher_job_ids(run_dir) == [job_id]
    named = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "JobID", "--name", name], capture_output=True,
                           text=True, timeout=30).stdout.split()
    assert named == [job_id], named   # no second job was ever submitted
    starts = rows(run_dir, "start")
    assert starts[1]["resumed"] and starts[1]["job_id"] == job_id and starts[1]["step"] >= 20
    consumed = consumed_samples(run_dir)   # every step trained, the ones after the last commit twice
    assert sorted(consumed) == list(range(400)) and all(len(set(ids)) == 16 for ids in consumed.values())
