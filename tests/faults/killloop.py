"""The kill loop shared by tests/faults/test_kill_loop.py and bench/soak.py.

A 2-rank job is started, SIGKILLed at a seeded-random moment of a seeded-random kind, checked, restarted,
again and again; then it is let run to the end. Kinds of kill:
  startup       a random delay after the start (process-group init, DeepSpeed init, checkpoint load)
  step          a random delay after a given step committed (lands mid-step or mid-save)
  tmp           the moment `step_<N>.tmp-i<claim>/` appears (the ranks are writing their shards)
  seal          planted: after COMMITTED is written, before the rename to step_<N>
  after_rename  planted: after the rename, before the `latest` pointer moves
  retention     planted: mid-delete of the previous commit (marker gone, half its files removed)
  pointer       planted: the new pointer written to its tmp name, not yet renamed over `latest`
  writing       planted: rank 0's background writer is inside a file of step N (asynchronous commit: the
                ranks train the next step meanwhile); the writer is a thread of the rank, killed with it
After every kill the store is checked as a reader would: latest() loads and verifies, it never goes back,
every commit verifies, `latest` (the hint) names a valid commit.
"""
from __future__ import annotations

import json
import os
import random
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from cratescale.checkpoint import CheckpointStore
from tests.faults.ranks import RankJob, RankServer

EXTERNAL = ("startup", "step", "tmp")
PLANTED = ("seal", "after_rename", "retention", "pointer", "writing")
MODES = EXTERNAL + PLANTED
STEP_DIR = re.compile(r"^step_(\d{9})$")
TMP_DIR = re.compile(r"^step_\d{9}\.tmp(?:-i\d+)?$")


@dataclass
class KillReport:
    kills: int = 0
    restarts: int = 0
    completed_step: int | None = None
    by_mode: Counter = field(default_factory=Counter)
    during_write: int = 0            # kills that left a step_N.tmp behind (a save was in flight)
    checks: int = 0                  # store inspections after kills
    problems: list[str] = field(default_factory=list)   # unreadable / unverifiable commits, regressions
    steps_redone: int = 0            # optimizer steps trained again after kills (from rank 0's sample log)
    seconds: float = 0.0


def tmp_dirs(root: Path, step: str = "*") -> list[Path]:
    """The unfinished saves of `step` (a glob), whichever incarnation wrote them (`step_N.tmp-i<claim>`)."""
    return [p for p in root.glob(f"step_{step}.tmp*") if TMP_DIR.match(p.name) and p.is_dir()]


def committed_dirs(root: Path) -> list[int]:
    try:
        return sorted(int(m.group(1)) for name in os.listdir(root) if (m := STEP_DIR.match(name)))
    except FileNotFoundError:
        return []


def check_store(root: Path, last: int | None) -> tuple[int | None, list[str]]:
    """What a reader sees right after a crash; returns (latest step, problems)."""
    problems = []
    store = CheckpointStore(root)
    try:
        commit = store.latest()
        if commit is not None:
            store.verify(commit)
        for c in store.commits():
            store.verify(c)
    except Exception as exc:  # noqa: BLE001 - any failure to read is what we count
        return last, [f"unreadable: {type(exc).__name__}: {exc}"]
    step = None if commit is None else commit.step
    if last is not None and (step is None or step < last):
        problems.append(f"latest went back from {last} to {step}")
    pointer = store.latest_pointer()
    if pointer is not None and pointer not in {c.path.name for c in store.commits()}:
        problems.append(f"`latest` names {pointer}, which is not a valid commit")
    return step, problems


def _wait_for(job: RankJob, cond: Callable[[], bool], timeout: float = 180, poll: float = 0.002) -> bool:
    """True when cond() holds; False when the ranks exited first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        if not job.alive():
            return cond()
        time.sleep(poll)
    raise TimeoutError(f"no progress in {timeout} s: {job.output(0)}")


def _kill_once(server: RankServer, config: Path, manifest: Path, root: Path, mode: str, base: int, total: int,
               rng: random.Random) -> tuple[RankJob, bool]:
    """Start the ranks and kill them the `mode` way; returns (job, whether the kill happened)."""
    target = min(total, base + rng.randint(1, 2))
    if mode == "retention":
        target = max(target, 2)  # the commit of `target` must have an older one to delete
    faults = {"mode": mode, "step": target} if mode in PLANTED else None
    job = server.start(config, manifest, 2, faults=faults)
    if mode == "startup":  # a random delay, cut short if the ranks get past start-up fast (a quiet machine)
        deadline = time.monotonic() + rng.uniform(0.05, 1.5)
        _wait_for(job, lambda: time.monotonic() >= deadline or max(committed_dirs(root), default=-1) > base + 1,
                  poll=0.01)
    elif mode == "step":
        if _wait_for(job, lambda: max(committed_dirs(root), default=-1) >= target):
            time.sleep(rng.uniform(0.0, 0.2))
    elif mode == "tmp":
        if _wait_for(job, lambda: bool(tmp_dirs(root, f"{target:09d}"))):
            time.sleep(rng.choice([0.0, rng.uniform(0.0, 0.03)]))
    if mode in PLANTED:
        codes = job.wait()
        return job, codes != [0, 0]
    alive = job.alive()
    job.kill()
    codes = job.wait()
    return job, alive and codes != [0, 0]


def read_sample_log(run_dir: Path) -> tuple[dict[int, set[int]], int]:
    """step -> the sample ids logged for it (over all ranks and attempts); and the number of torn lines."""
    steps: dict[int, set[int]] = {}
    torn = 0
    for path in sorted((run_dir / "samples").glob("rank*.jsonl")):
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                torn += 1  # a rank killed inside its write of this line
                continue
            steps.setdefault(row["step"], set()).update(row["ids"])
    return steps, torn


def run_kill_loop(server: RankServer, config: Path, manifest: Path, run_dir: Path, total: int, kills: int,
                  seed: int = 0, log: Callable[[str], None] | None = None, every: int = 10) -> KillReport:
    """Kill + restart `kills` times, then let the job finish; see the module docstring."""
    rng, report, t0 = random.Random(seed), KillReport(), time.monotonic()
    root = run_dir / "checkpoints"
    modes: list[str] = []
    latest: int | None = None
    while report.kills < kills:
        if not modes:
            modes = list(MODES)
            rng.shuffle(modes)
        mode = modes.pop()
        base = latest or 0
        job, killed = _kill_once(server, config, manifest, root, mode, base, total, rng)
        report.restarts += 1
        if not killed:
            result = job.result(0)
            if result and result.get("status") == "completed":
                report.completed_step = result["step"]
                break  # it finished before the kill landed; stop here (the caller checks the count)
            raise AssertionError(f"ranks exited {job.codes} without a kill ({mode}):\n{job.output(0)}")
        report.kills += 1
        report.by_mode[mode] += 1
        report.during_write += bool(tmp_dirs(root))
        step, problems = check_store(root, latest)
        report.checks += 1
        report.problems += [f"kill {report.kills} ({mode} @ {base}): {p}" for p in problems]
        latest = step if step is not None else latest
        if log and report.kills % every == 0:
            log(f"kills {report.kills:4d}  restarts {report.restarts:4d}  latest step {latest}  "
                f"{time.monotonic() - t0:6.0f} s  problems {len(report.problems)}")
    if report.completed_step is None:
        job = server.start(config, manifest, 2)
        codes = job.wait()
        report.restarts += 1
        result = job.result(0)
        if codes != [0, 0] or not result:
            raise AssertionError(f"the final run exited {codes}:\n{job.output(0)}\n{job.output(1)}")
        report.completed_step = result["step"]
    step, problems = check_store(root, latest)
    report.checks += 1
    report.problems += [f"after the final run: {p}" for p in problems]
    log_path = run_dir / "samples" / "rank0.jsonl"
    if log_path.exists():
        report.steps_redone = len(log_path.read_text().splitlines()) - report.completed_step
    report.seconds = time.monotonic() - t0
    return report


def leftovers(root: Path, final_step: int) -> list[str]:
    """Anything in the checkpoint root besides the final commit, the pointer, the catalog and the claim."""
    expected = {f"step_{final_step:09d}", "latest", "catalog.parquet", "incarnation"}
    return sorted(set(os.listdir(root)) - expected)
