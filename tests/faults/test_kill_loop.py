"""kill -9 at random moments, again and again: nothing committed is ever lost or torn, and the run still ends
bitwise where an uninterrupted one ends (weights, optimizer state, data order).

Training: 2 ranks (gloo, ZeRO-2), a commit every step with keep_last=1 (so every commit also deletes), killed
>= 21 times: during start-up, mid-step, while the ranks write step_N.tmp, and at planted points of the commit
protocol (between COMMITTED and the rename, after the rename, mid-retention delete, mid pointer swap, and
inside the asynchronous commit's background write while the next step trains: the default commit path).
Extraction: `python -m cratescale.embeddings extract` SIGKILLed several times mid-way, rerun, byte-identical.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.dist.harness import assert_same_tree, final_weights, optimizer_files, write_config
from tests.faults.conftest import KILL_OVERRIDES, KILL_STEPS, REPO, TINY_JOB
from tests.faults.killloop import MODES, leftovers, read_sample_log, run_kill_loop

pytestmark = pytest.mark.dist
KILLS = 21


def test_kill9_loop_loses_nothing(tmp_path, fault_manifest, rank_server, reference_run):
    run_dir = tmp_path / "killed"
    config = write_config(TINY_JOB, run_dir, KILL_OVERRIDES)
    report = run_kill_loop(rank_server, config, fault_manifest, run_dir, KILL_STEPS, KILLS, seed=8)
    print(f"\nkill loop: {report.kills} kills, {report.restarts} restarts, {dict(report.by_mode)}, "
          f"{report.during_write} mid-write, {report.steps_redone} steps redone, {report.seconds:.0f} s")

    assert report.kills >= KILLS and set(report.by_mode) == set(MODES), report.by_mode
    assert report.problems == [], report.problems           # every check: latest() loads and verifies
    assert report.during_write >= 3                          # kills really landed inside saves
    assert report.completed_step == KILL_STEPS
    # At most two steps trained again per kill (commit every step, asynchronous: the step in flight, and the
    # one whose commit was still being written in the background).
    assert 0 <= report.steps_redone <= 2 * report.kills

    step, weights = final_weights(run_dir)
    assert step == reference_run["step"] == KILL_STEPS
    assert_same_tree(reference_run["weights"], weights)
    assert_same_tree(reference_run["optim"], optimizer_files(run_dir))
    # The data order survived too: every step saw exactly the reference's samples (repeats after kills).
    got, torn = read_sample_log(run_dir)
    want, _ = read_sample_log(reference_run["run_dir"])
    assert got == want and torn <= report.kills
    # Nothing left behind: no torn step dir, no stray pointer/catalog tmp file, no unfinished save.
    assert leftovers(run_dir / "checkpoints", KILL_STEPS) == []


# ---- extraction -----------------------------------------------------------------------------------------
N_ROWS = 64          # 16 shards of 4 rows
EXTRACT_KILLS = 6
COMMON = ["--actors", "0", "--layers", "1", "--shard-rows", "1", "--chunk-rows", "1", "--batch-size", "4",
          "--loader", "pil", "--dtype", "float32"]


def _extract_cmd(export: Path, manifest: Path, store: Path) -> list[str]:
    return [sys.executable, "-m", "cratescale.embeddings", "extract", str(export), str(manifest), str(store), *COMMON]


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def extract_setup(tmp_path_factory):
    from cratescale.checkpoint.export import export_weights
    from cratescale.models import create_model
    from data_pipeline.ingest import ingest

    root = tmp_path_factory.mktemp("extract_kill")
    manifest = ingest(f"synthetic://shapes?n={N_ROWS}&classes=4&size=32&seed=2", root / "data", workers=0,
                      progress=False)
    torch.manual_seed(0)
    model = create_model("crate_mae_debug")
    export_weights(model.state_dict(), model.config, {"step": 1, "run_name": "kill"}, root / "export")
    return root, Path(manifest)


def test_extraction_killed_repeatedly_ends_byte_identical(extract_setup):
    from cratescale.embeddings.store import EmbeddingStore

    from cratescale.embeddings.extract import extract

    root, manifest = extract_setup
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    # One-row shards: a shard commits every few ms, so kills need many shards to land between them.
    opts = dict(actors=0, layers=(1,), shard_rows=1, chunk_rows=1, batch_size=4, loader_kind="pil", dtype="float32")
    extract(root / "export", manifest, root / "ref", **opts)  # the uninterrupted store, in-process (same code)

    store_dir, rng, kills, progress = root / "killed", np.random.default_rng(8), 0, []
    while kills < EXTRACT_KILLS:
        p = subprocess.Popen(_extract_cmd(root / "export", manifest, store_dir), env=env, cwd=REPO,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        before = len(EmbeddingStore(store_dir).committed()) if (store_dir / "store.json").exists() else 0
        # Kill once 1-2 more shards are committed, plus a random delay (mid-shard, mid-marker, ...).
        want = before + int(rng.integers(1, 3))
        deadline = time.time() + 240
        while p.poll() is None and time.time() < deadline:
            if (store_dir / "store.json").exists() and len(list((store_dir / "commits").glob("*.json"))) >= want:
                time.sleep(float(rng.uniform(0, 0.005)))
                break
            time.sleep(0.005)
        if p.poll() is not None:
            assert p.returncode == 0, p.stderr.read().decode()[-2000:]
            break
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=60)
        kills += 1
        store = EmbeddingStore(store_dir)
        assert store.verify() == [], "a committed shard does not match its marker after kill -9"
        assert len(store.committed()) >= (progress[-1] if progress else 0), "committed shards were lost"
        progress.append(len(store.committed()))
    print(f"\nextraction: {kills} kills, committed shards after each: {progress}")
    assert kills == EXTRACT_KILLS, f"the extraction finished after only {kills} kills: {progress}"
    extract(root / "export", manifest, store_dir, **opts)  # the last rerun
    store = EmbeddingStore(store_dir)
    assert store.is_complete() and store.verify() == []
    ref_files, got_files = _files(root / "ref"), _files(store_dir)
    assert sorted(ref_files) == sorted(got_files)  # no stray tmp files either
    assert [k for k in ref_files if ref_files[k] != got_files[k]] == []


def test_retention_removes_what_a_crash_left(tmp_path):
    """What the kill loop found: a delete or pointer swap cut short left a torn step dir and tmp files that no
    later commit removed. The next retention pass now does (a newer save in progress is left alone)."""
    from cratescale.checkpoint import CheckpointStore

    store = CheckpointStore(tmp_path, keep_last=1)
    store.save(2, lambda p: (p / "w.bin").write_bytes(b"two"))
    torn = tmp_path / "step_000000001"           # marker already unlinked, half its files gone
    (torn / "ds").mkdir(parents=True)
    (torn / "ds" / "half.pt").write_bytes(b"half")
    (tmp_path / "latest.4242.tmp").write_text("step_000000002")
    (tmp_path / "catalog.parquet.4242.tmp").write_bytes(b"PAR1")
    (tmp_path / "step_000000009.tmp").mkdir()    # a save in progress (another step) must survive
    assert store.latest().step == 2              # the torn dir was never visible
    store.save(3, lambda p: (p / "w.bin").write_bytes(b"three"))
    assert sorted(os.listdir(tmp_path)) == ["catalog.parquet", "latest", "step_000000003", "step_000000009.tmp"]


def test_resume_tidies_when_the_last_commit_was_cut_short(tmp_path):
    """A job killed inside the retention pass of its final commit resumes at its last step and commits
    nothing more: the resume itself (rank 0, plan_resume) clears what the crash left."""
    from cratescale.checkpoint import CheckpointStore
    from cratescale.checkpoint import commit as commit_mod
    from cratescale.engine.state import plan_resume

    store = CheckpointStore(tmp_path, keep_last=1)
    identity = {"version": 2, "fields": {}, "manifest": "h"}
    meta = {"identity": identity, "global_batch": 16, "world_size": 2}
    store.save(7, lambda p: (p / "w.bin").write_bytes(b"seven"), meta)
    real = commit_mod.CheckpointStore._retain
    commit_mod.CheckpointStore._retain = lambda self, newest: []  # the crash: no retention after commit 8
    try:
        store.save(8, lambda p: (p / "w.bin").write_bytes(b"eight"), meta)
    finally:
        commit_mod.CheckpointStore._retain = real
    (tmp_path / "latest.4242.tmp").write_text("step_000000008")
    (tmp_path / "latest").write_text("step_000000007")  # the pointer swap of commit 8 never happened
    assert [c.step for c in store.commits()] == [7, 8]
    plan = plan_resume(store, identity, 16, 2)
    assert plan.commit.step == 8 and store.latest_pointer() == "step_000000008"  # never names a deleted step
    assert sorted(os.listdir(tmp_path)) == ["catalog.parquet", "latest", "step_000000008"]
