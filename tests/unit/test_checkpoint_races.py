"""Races on one checkpoint folder (issue 29.1): claimants that start together never hold one number, in threads
and in processes; a stale writer's begin() of the live job's step between its writes and its seal leaves the live
commit whole; a claim made meanwhile by a newer incarnation withdraws the older claimant's."""
from __future__ import annotations

import json
import multiprocessing
import threading
import zlib
from pathlib import Path

import pytest

from cratescale.checkpoint import CheckpointStore, StaleIncarnationError
from cratescale.checkpoint import claims

CLAIMANTS = 8


def _claim(root: str, attempt: int = 0) -> int:
    return CheckpointStore(root).claim_incarnation(job=None, restart=0, attempt=attempt)


def test_claimants_racing_in_threads_never_hold_one_number(tmp_path: Path) -> None:
    for round_ in range(5):
        root = tmp_path / f"r{round_}"
        start, numbers = threading.Barrier(CLAIMANTS), []

        def claim() -> None:
            start.wait()  # all at once: the same scheduling cycle
            numbers.append(_claim(str(root)))

        threads = [threading.Thread(target=claim) for _ in range(CLAIMANTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(numbers) == list(range(1, CLAIMANTS + 1))  # before: (1, 1, ...) read, add one, write
        assert CheckpointStore(root).claim()["incarnation"] == CLAIMANTS


def _claim_in_process(root: str, start, out) -> None:
    start.wait()
    out.put(_claim(root))


def test_claimants_racing_in_processes_never_hold_one_number(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    for round_ in range(3):
        root = str(tmp_path / f"r{round_}")
        start, out = ctx.Barrier(CLAIMANTS), ctx.Queue()
        procs = [ctx.Process(target=_claim_in_process, args=(root, start, out)) for _ in range(CLAIMANTS)]
        for p in procs:
            p.start()
        numbers = [out.get(timeout=60) for _ in procs]
        for p in procs:
            p.join(timeout=60)
            assert p.exitcode == 0
        assert sorted(numbers) == list(range(1, CLAIMANTS + 1))


def _write(path: Path, rel: str, data: bytes) -> dict[str, dict[str, int]]:
    (path / rel).parent.mkdir(parents=True, exist_ok=True)
    (path / rel).write_bytes(data)
    return {rel: {"size": len(data), "crc32": zlib.crc32(data)}}


def test_a_stale_begin_between_the_live_writes_and_the_seal_leaves_the_live_commit_whole(tmp_path: Path) -> None:
    stale, live = CheckpointStore(tmp_path), CheckpointStore(tmp_path)
    assert stale.claim_incarnation(job="1") == 1       # the partitioned node's rank 0, still running
    assert live.claim_incarnation(job="2") == 2        # the resubmitted job
    tmp = live.begin(10)
    sums = {**_write(tmp, "ds/model.pt", b"m" * 5000), **_write(tmp, "rank0_rng.pt", b"r" * 70)}
    stale.begin(10)  # before: the same `step_000000010.tmp`, emptied under the live job
    stale.abort(10)
    commit = live.commit(10, {"world_size": 1}, sealed=sums)
    assert set(commit.files) == {"ds/model.pt", "rank0_rng.pt", "meta.json"}  # never a commit of meta.json only
    live.verify(live.latest())
    assert (live.latest().path / "ds" / "model.pt").read_bytes() == b"m" * 5000
    assert live.tmp_path(10).name == "step_000000010.tmp-i2" and not stale.tmp_path(10).exists()
    # The stale writer's own save of that step is refused, and `latest` stays the live one.
    stale_tmp = stale.begin(10)
    with pytest.raises(StaleIncarnationError, match="a newer job claimed the run"):
        stale.commit(10, {}, sealed=_write(stale_tmp, "ds/model.pt", b"x"))
    assert live.latest_pointer() == "step_000000010" and live.latest().files["ds/model.pt"]["size"] == 5000


def test_a_seal_refuses_a_listed_file_that_is_gone(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    store.claim_incarnation()
    tmp = store.begin(3)
    sums = _write(tmp, "ds/rank1.pt", b"1" * 100)
    (tmp / "ds" / "rank1.pt").unlink()  # what another writer's clean-up did before
    with pytest.raises(Exception, match=r"ds/rank1.pt: missing; its writer wrote 100 bytes"):
        store.commit(3, {}, sealed=sums)
    assert store.latest() is None


def test_an_older_claimant_that_raced_a_newer_one_withdraws(tmp_path: Path) -> None:
    newer = CheckpointStore(tmp_path)
    assert newer.claim_incarnation(job="9", attempt=2) == 1
    # An attempt-1 job read the run as unclaimed (seen 0) just before: it takes number 2, then sees claim 1 is a
    # newer incarnation's and withdraws, so the newer job's commits stay accepted.
    with pytest.raises(LookupError):
        claims.take_next(tmp_path, {"job": "8", "restart": 0, "attempt": 1}, floor=1, seen=0)
    assert json.loads((tmp_path / "incarnation" / "000000002.json").read_text())["withdrawn"] is True
    assert newer.claim()["incarnation"] == 1
    commit = newer.save(5, lambda p: (p / "w.bin").write_bytes(b"w"))
    assert commit.step == 5 and newer.latest_pointer() == "step_000000005"
    assert CheckpointStore(tmp_path).claim_incarnation(job="10", attempt=3) == 3  # a withdrawn number is not reused


def test_a_run_from_before_keeps_its_claim_number(tmp_path: Path) -> None:
    (tmp_path / "incarnation").write_text(json.dumps({"job": "5", "restart": 0, "attempt": 4, "incarnation": 7}))
    assert CheckpointStore(tmp_path).claim()["incarnation"] == 7
    with pytest.raises(StaleIncarnationError, match="refusing to start"):
        CheckpointStore(tmp_path).claim_incarnation(job="6", attempt=3)
    assert CheckpointStore(tmp_path).claim_incarnation(job="6", attempt=5) == 8
    assert sorted(p.name for p in (tmp_path / "incarnation").iterdir()) == ["000000007.json", "000000008.json"]
