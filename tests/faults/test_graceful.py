"""SIGTERM / SIGUSR2 at random moments (the preemption path): the ranks agree at the next step boundary, save
one commit together and exit with the preempted status (3). No step is lost (the commit holds every step
trained) and none is trained twice (the sample log holds each step exactly once); the resumed run ends
bitwise equal to an uninterrupted one."""
from __future__ import annotations

import json
import random
import signal
import time
from pathlib import Path

import pytest

from tests.dist.harness import assert_same_tree, final_weights, optimizer_files, write_config
from tests.faults.conftest import KILL_OVERRIDES, KILL_STEPS, TINY_JOB
from tests.faults.killloop import check_store, tmp_dirs
from tests.faults.ranks import PREEMPTED_EXIT

pytestmark = pytest.mark.dist
STOPS = 8
# (signal, ranks that get it, when): SLURM signals every task; a signal on one rank alone tests the agreement.
PLANS = [(signal.SIGTERM, None, "step"), (signal.SIGUSR2, None, "step"), (signal.SIGUSR2, [0], "step"),
         (signal.SIGTERM, [1], "step"), (signal.SIGUSR2, None, "twice"), (signal.SIGTERM, None, "save"),
         (signal.SIGUSR2, [1], "save"), (signal.SIGTERM, None, "startup")]


def _steps_logged(run_dir: Path) -> list[int]:
    path = run_dir / "samples" / "rank0.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.exists() else []


def _count_starts(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return path.read_text().count('"kind": "start"') if path.exists() else 0


def _last_end(run_dir: Path) -> dict:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["kind"] == "end"][-1]


def _wait(cond, job, timeout=180.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        if not job.alive():
            return False
        time.sleep(0.003)
    raise TimeoutError(job.output(0))


def test_sigterm_usr2_save_and_stop_without_losing_a_step(tmp_path, fault_manifest, rank_server, reference_run):
    run_dir = tmp_path / "preempted"
    # Periodic commits every 7 steps only: between them, the stop commit is all that keeps the progress.
    overrides = [o for o in KILL_OVERRIDES if not o.startswith("checkpoint.")] + \
        ["checkpoint.every_steps=7", "checkpoint.keep_last=2"]
    config = write_config(TINY_JOB, run_dir, overrides)
    root, rng, stops, latest = run_dir / "checkpoints", random.Random(3), 0, None
    for signum, ranks, when in PLANS[:STOPS]:
        base = len(_steps_logged(run_dir))
        job = rank_server.start(config, fault_manifest, 2)
        if when == "startup":  # right after start-up (its `start` row: checkpoint loaded, loop not yet at speed)
            starts = _count_starts(run_dir)
            reached = _wait(lambda: _count_starts(run_dir) > starts, job)
        elif when == "save":   # while the ranks write the next periodic commit
            nxt = (base // 7 + 1) * 7
            reached = nxt < KILL_STEPS and _wait(lambda: bool(tmp_dirs(root, f"{nxt:09d}")), job)
        else:
            target = base + rng.randint(1, 4)
            reached = _wait(lambda: len(_steps_logged(run_dir)) >= target, job)
            time.sleep(rng.uniform(0.0, 0.05))
        assert reached, f"the ranks exited before the signal:\n{job.output(0)}"
        job.signal(signum, ranks)
        if when == "twice":
            time.sleep(rng.uniform(0.0, 0.02))
            job.signal(signum, ranks)
        codes = job.wait()
        assert codes == [PREEMPTED_EXIT] * 2, f"{signal.Signals(signum).name} to {ranks}: exit {codes}\n" \
                                              f"{job.output(0)}\n{job.output(1)}"
        stops += 1
        trained = _steps_logged(run_dir)
        end = _last_end(run_dir)
        assert end["status"] == "preempted" and end["step"] == len(trained) >= base
        step, problems = check_store(root, latest)
        assert problems == [] and step == len(trained), (step, len(trained), problems)  # nothing lost
        assert sorted(trained) == list(range(len(trained)))                            # nothing repeated
        latest = step
    job = rank_server.start(config, fault_manifest, 2)
    assert job.wait() == [0, 0], job.output(0)
    assert job.result(0) == {"status": "completed", "step": KILL_STEPS, "rank": 0}
    assert _steps_logged(run_dir) == list(range(KILL_STEPS))  # each step exactly once over 9 starts
    step, weights = final_weights(run_dir)
    assert stops == STOPS and step == KILL_STEPS
    assert_same_tree(reference_run["weights"], weights)
    assert_same_tree(reference_run["optim"], optimizer_files(run_dir))
