"""Pieces of the asynchronous commit on real files and tensors: the host snapshot, crc32 while writing, a
commit sealed from the writers' own sums, and the incarnation rule (DESIGN.md section 5). The collective
protocol on 2 real DeepSpeed ranks is tests/dist/test_commit_async.py."""
from __future__ import annotations

import io
import json
import zlib
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from cratescale.checkpoint import CheckpointStore, StaleIncarnationError
from cratescale.checkpoint.commit import checksum_file
from cratescale.checkpoint.durable import ChecksumWriter
from cratescale.engine.commit_async import snapshot
from cratescale.engine.state import incarnation_from_env


def _state() -> dict:
    flat = torch.arange(24, dtype=torch.float32)
    return OrderedDict(flat=flat, view=flat[4:10].view(2, 3), other=[torch.ones(3, dtype=torch.bfloat16)],
                       empty=[torch.empty(0), torch.empty(0, 3)],  # data_ptr 0 both, yet separate storages
                       param=torch.nn.Parameter(torch.zeros(2)), meta={"step": 3, "name": "x"}, pair=(1, flat[:2]))


def _bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def test_snapshot_is_a_copy_that_serialises_to_the_same_bytes() -> None:
    state = _state()
    snap = snapshot(state)
    assert _bytes(snap) == _bytes(state)              # views and shared storage kept: same file
    assert type(snap) is OrderedDict and isinstance(snap["param"], torch.nn.Parameter)
    assert snap["view"].untyped_storage().data_ptr() == snap["flat"].untyped_storage().data_ptr()
    before = _bytes(snap)
    state["flat"].add_(100)                           # training goes on in place
    state["other"][0].zero_()
    assert _bytes(snap) == before and snap["view"][0, 0].item() == 4.0
    assert snap["flat"].untyped_storage().data_ptr() != state["flat"].untyped_storage().data_ptr()


def test_checksum_writer_sums_while_writing(tmp_path: Path) -> None:
    path = tmp_path / "f.pt"
    with ChecksumWriter(path) as f:
        torch.save(_state(), f)
    size, crc = f.close()
    data = path.read_bytes()
    assert (size, crc) == (len(data), zlib.crc32(data)) == checksum_file(path)


def test_commit_takes_the_writers_sums_and_seals_the_rest(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    tmp = store.begin(1)
    (tmp / "ds").mkdir()
    with ChecksumWriter(tmp / "ds" / "big.pt") as f:
        torch.save(_state(), f)
    sums = {"ds/big.pt": dict(zip(("size", "crc32"), f.close()))}
    (tmp / "latest").write_text("ds")                 # written without sums: sealed by the commit
    commit = store.commit(1, {"world_size": 1}, sealed=sums)
    assert commit.files["ds/big.pt"] == sums["ds/big.pt"] and set(commit.files) == {"ds/big.pt", "latest",
                                                                                     "meta.json"}
    store.verify(commit)
    # A writer's sums that do not match the disk (a file cut short) fail the commit; step 1 stays.
    tmp = store.begin(2)
    (tmp / "x.bin").write_bytes(b"abc")
    with pytest.raises(Exception, match="x.bin: 3 bytes on disk, its writer wrote 4"):
        store.commit(2, sealed={"x.bin": {"size": 4, "crc32": 0}})
    assert store.latest().step == 1 and not store.tmp_path(2).exists()


def _save(store: CheckpointStore, step: int) -> None:
    store.save(step, lambda p: (p / "w.bin").write_bytes(bytes([step]) * 10), {"world_size": 1})


def test_a_stale_incarnation_can_neither_commit_nor_move_latest(tmp_path: Path) -> None:
    old = CheckpointStore(tmp_path, keep_last=5)      # the partitioned node's rank 0, still running
    assert old.claim_incarnation(job="42", restart=0) == 1
    _save(old, 10)
    new = CheckpointStore(tmp_path, keep_last=5)      # the requeued job (same id, restart count 1)
    assert new.claim_incarnation(job="42", restart=1) == 2
    assert new.latest().step == 10                    # it resumes from what the old one committed
    with pytest.raises(StaleIncarnationError, match="incarnation 1, a newer job claimed the run .incarnation 2"):
        _save(old, 20)                                # refused before the rename: nothing visible
    assert [c.step for c in new.commits()] == [10] and not old.tmp_path(20).exists()
    _save(new, 11)
    assert new.latest().step == 11 and new.latest_pointer() == "step_000000011"
    # The same step saved again by the stale writer cannot replace the newer commit.
    with pytest.raises(StaleIncarnationError):
        _save(old, 11)
    assert json.loads((tmp_path / "step_000000011" / "COMMITTED").read_text())["incarnation"] == 2
    # A late start of the old incarnation is refused; a new job id (a resubmission) or a higher
    # supervisor attempt takes over.
    with pytest.raises(StaleIncarnationError, match="refusing to start"):
        CheckpointStore(tmp_path).claim_incarnation(job="42", restart=0)
    assert CheckpointStore(tmp_path).claim_incarnation(job="77", restart=0) == 3
    with pytest.raises(StaleIncarnationError):
        CheckpointStore(tmp_path).claim_incarnation(job="78", restart=0, attempt=-1)


def test_readers_order_by_incarnation_so_a_raced_stale_commit_is_not_newest(tmp_path: Path) -> None:
    old = CheckpointStore(tmp_path, keep_last=5)
    old.claim_incarnation()
    new = CheckpointStore(tmp_path, keep_last=5)
    new.claim_incarnation()
    _save(new, 11)
    old.incarnation = None  # as if its check passed just before the new job claimed the run
    _save(old, 20)          # (a marker without incarnation: an older writer)
    assert new.latest().step == 11
    assert CheckpointStore(tmp_path).tidy() is not None and new.latest_pointer() == "step_000000011"


def test_incarnation_from_env() -> None:
    assert incarnation_from_env({}) == {"job": None, "restart": 0, "attempt": 0}
    env = {"SLURM_JOB_ID": "7", "SLURM_RESTART_COUNT": "2", "CRATESCALE_ATTEMPT": "1"}
    assert incarnation_from_env(env) == {"job": "7", "restart": 2, "attempt": 1}
    with pytest.raises(ValueError, match="SLURM_RESTART_COUNT='x'"):
        incarnation_from_env({"SLURM_RESTART_COUNT": "x"})
