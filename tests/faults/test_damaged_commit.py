"""A damaged newest commit (issue 29.2): resume checks its sizes and crc32 once (rank 0) before DeepSpeed loads it,
passes over it with one line naming the file and the commit used instead (in the start record and on the console),
and resumes from the one before; with no commit that verifies, every rank stops with one line, and the failure is
deterministic (no requeue)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.faults.conftest import TINY_JOB

pytestmark = pytest.mark.dist


def _starts(run_dir: Path) -> list[dict]:
    rows = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    return [r for r in rows if r["kind"] == "start"]


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-100])


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def test_a_damaged_newest_commit_is_passed_over_and_none_left_stops(fault_manifest, tmp_path, rank_server):
    from cratescale.checkpoint import CheckpointCorruptError, CheckpointStore
    from cratescale.launch.failures import DETERMINISTIC_ERRORS
    from tests.dist.harness import write_config

    run_dir = tmp_path / "run"
    base = ["checkpoint.every_steps=2", "checkpoint.keep_last=2"]
    job = rank_server.start(write_config(TINY_JOB, run_dir, [*base, "schedule.steps=4"]), fault_manifest, 2)
    assert job.wait() == [0, 0], job.output(0)
    store = CheckpointStore(run_dir / "checkpoints")
    assert [c.step for c in store.commits()] == [2, 4]
    newest = store.load(4).path / "ds"
    model = newest / "mp_rank_00_model_states.pt"
    optim = sorted(newest.glob("*optim_states.pt"))[-1]  # rank 1's partition
    _truncate(model)
    _flip(optim)

    # Training longer: the damaged step 4 is passed over, the run resumes from step 2 and finishes.
    job = rank_server.start(write_config(TINY_JOB, run_dir, [*base, "schedule.steps=6"]), fault_manifest, 2)
    assert job.wait() == [0, 0], job.output(0) + job.output(1)
    start = _starts(run_dir)[-1]
    assert start["step"] == 2 and start["resumed"]
    [line] = start["passed_over"]
    assert line.startswith("resume: passed over checkpoint step 4: ") and line.endswith(
        "; resuming from step 2 instead"), line
    assert "ds/mp_rank_00_model_states.pt" in line or optim.name in line, line
    assert f"[cratescale] {line}" in job.output(0)
    latest = store.latest()
    assert latest.step == 6
    for commit in store.commits():  # the re-save of step 4 replaced the damaged copy
        store.verify(commit)

    # Every commit damaged: one line on every rank, exit 1, nothing loaded, and no requeue would cure it.
    for commit in store.commits():
        _flip(commit.path / "ds" / "mp_rank_00_model_states.pt")
    job = rank_server.start(write_config(TINY_JOB, run_dir, [*base, "schedule.steps=8"]), fault_manifest, 2)
    codes = job.wait()
    assert codes[0] != 0 and codes[1] != 0, codes
    for rank in (0, 1):
        last = job.output(rank).splitlines()[-1]
        assert "CheckpointCorruptError: resume: no commit in " in last and "verifies (2 tried); newest: " \
            "checkpoint step 6: " in last and "mp_rank_00_model_states.pt crc32" in last, last
    assert issubclass(CheckpointCorruptError, DETERMINISTIC_ERRORS)
    assert [c.step for c in store.commits()] == [4, 6]  # nothing deleted, nothing committed


def test_the_synchronous_seal_refuses_a_commit_without_a_rank_s_file(fault_manifest, tmp_path, rank_server):
    """Rank 1's optimizer partition is gone when rank 0 seals step 4 (what a stale writer's clean-up did): the seal
    checks every rank's own list of files, so both ranks stop with one line and step 2 stays the newest commit.
    Before, the synchronous seal took whatever was in the directory: a commit without that file, which verified."""
    from cratescale.checkpoint import CheckpointStore
    from tests.dist.harness import write_config

    run_dir = tmp_path / "run"
    lost = "ds/bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"
    config = write_config(TINY_JOB, run_dir, ["schedule.steps=6", "checkpoint.every_steps=2"])
    job = rank_server.start(config, fault_manifest, 2, faults={"mode": "lose", "step": 4, "file": lost})
    codes = job.wait()
    assert codes[0] != 0 and codes[1] != 0, codes
    for rank in (0, 1):
        last = job.output(rank).splitlines()[-1]
        assert "CheckpointWriteError: checkpoint step 4" in last and f"{lost}: missing; its writer wrote " in last, last
    store = CheckpointStore(run_dir / "checkpoints")
    assert [c.step for c in store.commits()] == [2] and store.latest_pointer() == "step_000000002"
    store.verify(store.latest())
    assert not list((run_dir / "checkpoints").glob("step_000000004*"))
