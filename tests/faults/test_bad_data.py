"""The bad-data budget in the real 2-rank trainer: data made unreadable mid-run stops the run within a few
steps with one line (how many, which paths, why) and the last commit intact; a dataset with 0.1% corrupt
files trains to the end and counts them; the same file over a budget of 0 stops at once, named by the rank
that read it."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.faults.conftest import TINY_JOB

pytestmark = pytest.mark.dist


def _ingest(tmp_path: Path, n: int) -> Path:
    from data_pipeline.ingest import ingest

    return Path(ingest(f"synthetic://shapes?n={n}&classes=4&size=32&seed=1", tmp_path / "data", workers=0,
                       progress=False))


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _latest_step(run_dir: Path) -> int:
    from cratescale.checkpoint import CheckpointStore

    commit = CheckpointStore(run_dir / "checkpoints").latest()
    return -1 if commit is None else commit.step


def test_data_unreadable_mid_run_stops_within_a_few_steps(tmp_path, rank_server):
    from cratescale.checkpoint import CheckpointStore
    from tests.dist.harness import write_config

    manifest = _ingest(tmp_path, 192)
    run_dir = tmp_path / "run"
    config = write_config(TINY_JOB, run_dir, ["schedule.steps=60", "checkpoint.every_steps=2",
                                              "logging.every_steps=1"])
    job = rank_server.start(config, manifest, 2)
    deadline = time.monotonic() + 240
    while _latest_step(run_dir) < 2 and job.alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    # The filesystem under the dataset goes away: every shard now reads short (open descriptors see it too).
    for shard in set(pq.read_table(manifest, columns=["path"])["path"].to_pylist()):
        open(shard, "r+b").truncate(0)
    committed_then = _latest_step(run_dir)
    assert committed_then >= 2, job.output(0)
    codes = job.wait()
    assert codes[0] != 0 and codes[1] != 0, codes
    end = _metrics(run_dir)[-1]
    assert end["kind"] == "end" and end["status"] == "bad_data", end
    # Stopped within a few steps of the loss (the loader may have read a step or two ahead before it).
    assert end["step"] - committed_then <= 6, (end["step"], committed_then)
    line = end["error"]
    assert line.startswith("bad data: ") and "found no decodable replacement" in line
    assert "(read error, no decodable replacement)" in line and ".tar@" in line and "\n" not in line
    assert f"BadDataError: {line}" in job.output(0) and f"[cratescale] {line}" in job.output(0)
    # Nothing was committed past the stop, and the last commit is whole.
    commit = CheckpointStore(run_dir / "checkpoints").latest(verify=True)
    assert commit is not None and committed_then <= commit.step <= end["step"]
    assert not [m for m in _metrics(run_dir) if m["kind"] == "train" and m["step"] > end["step"]]


def _corrupt_one(manifest: Path, rank: int) -> tuple[str, int]:
    """Overwrite (same size, no JPEG markers) the sample `rank` reads first in step 0 (tiny.yaml: seed 3, B 16)."""
    from data_pipeline.sampler import GlobalSampler

    rows = pq.read_table(manifest).to_pylist()
    row = rows[int(GlobalSampler(len(rows), 3, 16).permutation(0)[rank * 8])]
    with open(row["path"], "r+b") as f:
        f.seek(row["offset"])
        f.write(b"\0" * row["size"])
    return row["path"], row["offset"]


def test_one_in_a_thousand_corrupt_trains_to_the_end_and_counts(tmp_path, rank_server):
    from tests.dist.harness import write_config

    manifest = _ingest(tmp_path, 1024)
    path, offset = _corrupt_one(manifest, rank=1)  # 1 of 1024 files: 0.1%
    run_dir = tmp_path / "run"
    config = write_config(TINY_JOB, run_dir, ["schedule.steps=12", "checkpoint.every_steps=100",
                                              "logging.every_steps=4"])
    job = rank_server.start(config, manifest, 2)
    assert job.wait() == [0, 0], job.output(0) + job.output(1)
    train = [m for m in _metrics(run_dir) if m["kind"] == "train"]
    assert [m["step"] for m in train] == [4, 8, 12] and [m["bad_samples"] for m in train] == [1, 1, 1]
    assert _metrics(run_dir)[-1] == {**_metrics(run_dir)[-1], "kind": "end", "status": "completed"}

    # The same file with no budget at all: the run stops at step 1, and rank 0 names rank 1's file.
    run_dir = tmp_path / "strict"
    config = write_config(TINY_JOB, run_dir, ["schedule.steps=12", "data.max_bad_fraction=0",
                                              "data.bad_window_steps=1"])
    job = rank_server.start(config, manifest, 2)
    codes = job.wait()
    assert codes[0] != 0 and codes[1] != 0, codes
    end = _metrics(run_dir)[-1]
    assert end["status"] == "bad_data" and end["step"] == 0
    assert end["error"] == (f"bad data: 1 of 16 samples failed (6.25%), over data.max_bad_fraction=0.0; "
                            f"first: {path}@{offset} (decode error)")
    assert _latest_step(run_dir) == -1  # nothing committed
