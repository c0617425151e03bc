"""Ranks of a stale incarnation that keep running (SLURM_MULTINODE.md pitfall 15: a partitioned node's ranks run
on next to the resubmitted job; SLURM's own requeue of the job the supervisor replaced) cannot corrupt or replace
a newer commit. Through the path the ranks take: the supervisor numbers each submission (next_attempt), the task
exports it (TrainTask.env -> CRATESCALE_ATTEMPT), the trainer claims the run with it (engine.state.claim_run),
and the commit path refuses the older writer (checkpoint.commit). One process, rank 0: the rule is rank 0's."""
from __future__ import annotations

from pathlib import Path

import pytest

from cratescale.checkpoint import CheckpointStore, CheckpointWriteError
from cratescale.checkpoint.commit import StaleIncarnationError
from cratescale.engine.state import claim_run
from cratescale.launch.entry import TrainTask
from cratescale.launch.supervisor import next_attempt


def _save(store: CheckpointStore, step: int) -> None:
    store.save(step, lambda p: (p / "w.bin").write_bytes(bytes([step]) * 10), {"world_size": 1})


def _rank0(ckpt: Path, job_id: str, task: TrainTask, restart: int = 0) -> CheckpointStore:
    """What a job's rank 0 does at start: claim the run with its SLURM ids and the task's attempt."""
    store = CheckpointStore(ckpt, keep_last=5)
    env = {"SLURM_JOB_ID": job_id, "SLURM_RESTART_COUNT": str(restart), **task.env()}
    claim_run(store, rank=0, env=env)
    return store


def test_a_resubmission_outranks_every_job_before_it_and_their_writers_are_refused(tmp_path: Path) -> None:
    ckpt = tmp_path / "checkpoints"
    first = TrainTask("job.yaml", "m.parquet", 1.0, attempt=next_attempt(ckpt, 0))
    assert first.env() == {"CRATESCALE_ATTEMPT": "0"}
    old = _rank0(ckpt, "101", first)                  # job 101 on node[1-2]
    _save(old, 5)

    # node2 lost: the supervisor resubmits on the node left (a new job id, the next attempt)
    second = TrainTask("job.yaml", "m.parquet", 1.0, attempt=next_attempt(ckpt, 1))
    assert second.attempt == 1
    new = _rank0(ckpt, "102", second)
    assert new.latest().step == 5                     # it resumes from the newest commit
    _save(new, 10)

    # job 101's rank 0, partitioned rather than dead, keeps training and commits: refused before the rename,
    # also for the step the new job holds; `latest` stays the new job's
    for step in (15, 10):
        with pytest.raises(StaleIncarnationError, match="a newer job claimed the run"):
            _save(old, step)
    assert [c.step for c in new.commits()] == [5, 10] and new.latest_pointer() == "step_000000010"
    assert not old.tmp_path(15).exists()

    # SLURM requeued job 101 itself (NODE_FAIL, JobRequeue=1) and it starts late: its claim is refused, though
    # its restart count is higher than the new job's; without the attempt it would claim the run and win
    with pytest.raises(CheckpointWriteError, match="refusing to start"):
        _rank0(ckpt, "101", first, restart=1)
    assert CheckpointStore(ckpt).claim()["job"] == "102"

    # A later launcher on the same run (its own count starts at 0) still numbers above the run's claim
    assert next_attempt(ckpt, 0) == 2
