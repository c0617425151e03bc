"""kill -9 of a real writer process at three places of a save: the previous commit stays the newest
(or, once the rename happened, the new one is found by the scan despite the stale `latest` pointer); and of a
re-save of a committed step between its two renames."""
from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from cratescale.checkpoint import CheckpointStore

REPO = Path(__file__).resolve().parents[2]

# Commits step 1, then saves step 2 (a 96 MiB file in 1 MiB writes) and dies by SIGKILL at `mode`:
# "writing" (the parent kills it mid-write), "before_rename" / "after_rename" (it kills itself around the rename: tests/kill_points.py).
WRITER = r"""
import os, signal, sys, time
from pathlib import Path
from cratescale.checkpoint import CheckpointStore
from cratescale.checkpoint import commit as commit_mod
root, mode = sys.argv[1], sys.argv[2]
store = CheckpointStore(root)
store.save(1, lambda p: (p / "w.bin").write_bytes(b"one" * 1000), {"world_size": 1})
block = os.urandom(1 << 20)

def big(path):
    (path / "ds").mkdir()
    with open(path / "ds" / "big.bin", "wb") as f:
        for i in range(96):
            f.write(block)
            if mode == "writing" and i == 16:
                f.flush()
                print("WRITING", flush=True)
                time.sleep(60)  # the parent SIGKILLs us here, mid-file

if mode != "writing":
    from tests.kill_points import kill_around_rename
    commit_mod.CheckpointStore._rename_into_place = kill_around_rename(
        commit_mod.CheckpointStore._rename_into_place, mode.split("_")[0], lambda: os.kill(os.getpid(), signal.SIGKILL))
store.save(2, big, {"world_size": 1})
print("NOT KILLED", flush=True)
"""


def _run_and_kill(root: Path, mode: str) -> None:
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(root), mode], cwd=REPO, stdout=subprocess.PIPE,
                            text=True)
    try:
        if mode == "writing":
            assert proc.stdout.readline().strip() == "WRITING"
            proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("mode", ["writing", "before_rename"])
def test_kill9_before_commit_keeps_previous(tmp_path: Path, mode: str) -> None:
    _run_and_kill(tmp_path, mode)
    partial = tmp_path / "step_000000002.tmp"
    assert (partial / "ds" / "big.bin").stat().st_size > 0  # the half-written save is there ...
    if mode == "before_rename":
        assert (partial / "COMMITTED").exists()  # ... even sealed, but never renamed
    store = CheckpointStore(tmp_path)
    latest = store.latest()
    assert latest.step == 1 and [c.step for c in store.commits()] == [1]  # ... and ignored
    store.verify(latest)
    assert (tmp_path / "latest").read_text() == "step_000000001"
    # The restarted job saves step 2 again: the leftover is replaced, the new commit verifies.
    commit = store.save(2, lambda p: (p / "w.bin").write_bytes(b"two"))
    store.verify(commit)
    assert store.latest().step == 2 and not partial.exists()


def test_kill9_between_rename_and_latest_pointer(tmp_path: Path) -> None:
    _run_and_kill(tmp_path, "after_rename")
    assert (tmp_path / "latest").read_text() == "step_000000001"  # the pointer never moved ...
    store = CheckpointStore(tmp_path)
    latest = store.latest()
    assert latest.step == 2  # ... but the commit was complete and the scan finds it
    store.verify(latest)
    assert latest.files["ds/big.bin"]["size"] == 96 << 20
    store.save(3, lambda p: (p / "w.bin").write_bytes(b"three"))
    assert store.catalog().column("step").to_pylist() == [1, 2, 3]  # the missed catalog row is recovered


# Commits step 4 with keep_last 1, then saves step 4 again and dies by SIGKILL between the two renames of the
# swap (the old copy moved aside, the new one not yet in place): tests/kill_points.py kill_after_rename_to.
RESAVER = r"""
import os, signal, sys
from cratescale.checkpoint import CheckpointStore
from tests.kill_points import kill_after_rename_to
store = CheckpointStore(sys.argv[1], keep_last=1)
store.save(4, lambda p: (p / "w.bin").write_bytes(b"old" * 1000), {"world_size": 1})
os.rename = kill_after_rename_to(os.rename, ".replaced.tmp", lambda: os.kill(os.getpid(), signal.SIGKILL))
store.save(4, lambda p: (p / "w.bin").write_bytes(b"new" * 1000), {"world_size": 1})
print("NOT KILLED", flush=True)
"""


def test_kill9_between_the_two_renames_of_a_resave_keeps_step_n(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", RESAVER, str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    assert not (tmp_path / "step_000000004").exists()  # the moment the swap opens: neither copy at the name
    store = CheckpointStore(tmp_path, keep_last=1)
    latest = store.latest()
    assert latest is not None and latest.step == 4  # before: None, and the resume started from step 0
    store.verify(latest)
    assert (latest.path / "w.bin").read_bytes() == b"old" * 1000
    # The resume's tidy puts the complete copy back under its name and retention leaves nothing else behind
    store.tidy()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("step_")) == ["step_000000004"]
    assert store.latest().path == tmp_path / "step_000000004"
    store.verify(store.latest())
    store.save(5, lambda p: (p / "w.bin").write_bytes(b"five"))
    assert [c.step for c in store.commits()] == [5]
