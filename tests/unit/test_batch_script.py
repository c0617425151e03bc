"""The sbatch setup lines that recover a job in its allocation (issue 28, launch/recover.py), run by bash as SLURM
would run them, with srun, sinfo and scontrol replaced by scripts on PATH (what they were asked is recorded): the
node count chosen from the allocation, the one line and the stop or the wait when no count splits the batch, and
the grow-back (USR2 to the step, a note of the allocation's size) when idle nodes allow more. The real SLURM runs
of the same lines: tests/slurm (the 3 -> 1 -> 3 node-loss test, the kill tests)."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from cratescale.config import dump_job, load_job
from cratescale.launch.recover import GROWN, RECORD, batch_lines

REPO = Path(__file__).resolve().parents[2]
# srun: records its arguments, then runs until USR2 (a step that trains until stopped) or exits at once (rc).
FAKE_SRUN = """#!/bin/bash
echo "srun $*" >> "$LOG"
[ -n "$SRUN_RC" ] && exit "$SRUN_RC"
trap 'echo "srun got USR2" >> "$LOG"; exit 0' USR2
for i in $(seq 600); do sleep 0.1; done
exit 3
"""
FAKE_SINFO = """#!/bin/bash
echo "sinfo $*" >> "$LOG"
echo "${IDLE:-0}"
"""
FAKE_SCONTROL = """#!/bin/bash
echo "scontrol $*" >> "$LOG"
kill -TERM $PPID   # SLURM ends the batch script of a requeued job
"""


def run_script(tmp_path: Path, overrides: list[str], allocated: int, env: dict[str, str]) -> tuple[int, str, str]:
    """The setup lines + `srun step` in bash; returns (rc, stderr, what the fakes were asked)."""
    job = load_job(REPO / "tests" / "dist" / "tiny.yaml", [f"run_dir={tmp_path / 'run'}", "cluster.tasks_per_node=1",
                                                          "cluster.slurm_poll_s=10", *overrides])
    (tmp_path / "run").mkdir(exist_ok=True)
    dump_job(job, tmp_path / "run" / "config.yaml")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in (("srun", FAKE_SRUN), ("sinfo", FAKE_SINFO), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "asked.log"
    script = "\n".join([*batch_lines(job), "srun --unbuffered step-command"])
    proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "LOG": str(log),
                               "SLURM_JOB_NUM_NODES": str(allocated), "SLURM_JOB_ID": "77",
                               "SLURM_JOB_PARTITION": "debug", "PYTHONPATH": str(REPO), **env})
    return proc.returncode, proc.stderr, log.read_text() if log.exists() else ""


# 3 nodes x 1 rank, global batch 9: it splits over 3 ranks and 1, not 2
NINE = ["cluster.nodes=3", "schedule.global_batch=9", "schedule.micro_batch=3"]


def test_the_step_runs_on_the_largest_count_of_the_allocation_that_splits_the_batch(tmp_path):
    rc, err, asked = run_script(tmp_path, [*NINE, "cluster.min_nodes=1"], allocated=2, env={"SRUN_RC": "0"})
    assert rc == 0, err
    assert "cratescale: 2 nodes allocated; training on 1 (the global batch splits over: 1 3)" in err
    assert "srun --kill-on-bad-exit=1 --nodes=1 --ntasks=1 --ntasks-per-node=1 --unbuffered step-command" in asked
    rc, err, asked = run_script(tmp_path, [*NINE, "cluster.min_nodes=1"], allocated=3, env={"SRUN_RC": "0"})
    assert rc == 0 and "--nodes=3 --ntasks=3" in asked and "allocated" not in err


def test_no_count_that_splits_the_batch_stops_with_one_line_when_asked_to(tmp_path):
    rc, err, asked = run_script(tmp_path, [*NINE, "cluster.min_nodes=2", "cluster.when_no_fit=stop"], allocated=2,
                                env={})
    assert rc == 1 and "srun" not in asked, asked
    assert "cratescale: stop: 2 node(s) in this allocation; schedule.global_batch 9 splits over 3 node count(s)" in err, err
    record = json.loads((tmp_path / "run" / RECORD).read_text())
    assert record["verdict"] == "stop" and record["job"] == "77"   # the follower does not resubmit it


def test_no_count_that_splits_the_batch_waits_for_idle_nodes_then_requeues(tmp_path):
    rc, err, asked = run_script(tmp_path, [*NINE, "cluster.min_nodes=2"], allocated=2, env={"IDLE": "1"})
    assert "cratescale: wait: 2 node(s) in this allocation" in err
    assert "srun " not in asked and "sinfo -h -p debug -t idle -o %D" in asked and "scontrol requeue 77" in asked


def test_idle_nodes_that_allow_more_stop_the_step_to_grow_back_once(tmp_path):
    rc, err, asked = run_script(tmp_path, [*NINE, "cluster.min_nodes=1"], allocated=2, env={"IDLE": "1"})
    assert rc == 0, err   # the step saw USR2 (its ranks commit and rank 0 requeues the job)
    assert "cratescale: idle nodes allow 3 nodes: stopping with a commit to requeue on them" in err
    assert asked.index("srun --kill-on-bad-exit=1 --nodes=1") < asked.index("srun got USR2")
    assert (tmp_path / "run" / GROWN).read_text().strip() == "2"
    # the requeued job got 2 nodes again (others took the idle one): it trains on 1 and does not try again
    rc, err, asked = run_script(tmp_path, [*NINE, "cluster.min_nodes=1"], allocated=2, env={"IDLE": "1", "SRUN_RC": "0"})
    assert rc == 0 and "idle nodes allow" not in err and not (tmp_path / "run" / GROWN).exists()


@pytest.mark.parametrize("rc_of_step, verdict", [(137, "retry")])
def test_a_failed_step_asks_for_a_verdict(tmp_path, rc_of_step, verdict):
    rc, err, asked = run_script(tmp_path, [*NINE, "cluster.min_nodes=1"], allocated=3,
                                env={"SRUN_RC": str(rc_of_step)})
    assert f"cratescale: training step ended with rc {rc_of_step}: {verdict}" in err, err
