"""A rank that fails with one of the project's own errors ends the stage at once (issue 14.2), and the console
shows that rank's own last error line under its log path (issue 13.6): the launcher, Ray's supervisor actor,
submitit's local executor and 2 real DeepSpeed ranks. The SLURM twin is in tests/slurm/test_train_slurm.py."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from tests.faults.conftest import REPO, TINY_JOB


def fake_export(tmp_path):
    """An export directory that passes the launcher's preflight (export.json exists) and that every rank
    refuses when it loads it: ExportError, a ValueError, the same on every attempt."""
    export = tmp_path / "bad_export"
    export.mkdir()
    (export / "export.json").write_text("{}")
    return export


def test_deterministic_rank_error_is_not_retried_and_its_line_is_shown(tmp_path, fault_manifest):
    run_dir = tmp_path / "run"
    export = fake_export(tmp_path)
    t0 = time.monotonic()
    res = subprocess.run([sys.executable, "-m", "cratescale.launch", str(TINY_JOB), f"run_dir={run_dir}",
                          f"data.root={fault_manifest.parent}", "stages=[pretrain]", "cluster.max_requeues=5",
                          f"checkpoint.start_fresh_from_weights={export}"],
                         capture_output=True, text=True, timeout=600, cwd=tmp_path, stdin=subprocess.DEVNULL)
    elapsed = time.monotonic() - t0
    assert res.returncode == 1, res.stdout[-3000:] + res.stderr[-3000:]
    lines = res.stdout.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("error: pretrain: job"))
    assert "ended FAILED, not retried" in lines[head] and str(run_dir / "submitit") in lines[head], lines[head]
    assert lines[head + 1].startswith("  rank 0: ExportError: export: ") and "export.json has format" in \
        lines[head + 1], lines[head:head + 2]
    # One submission: no requeue of an error that repeats (before: 3 submissions, REQUEUED twice).
    assert len(json.loads((run_dir / "launch.json").read_text())["job_ids"]) == 1
    assert elapsed < 300, elapsed


def test_a_gpu_profile_without_cuda_stops_under_the_local_executor(tmp_path, fault_manifest):
    """Issue 29.8: the profile's GPU expectation reaches the ranks of the local executor as it does SLURM's
    (before: a GPU profile trained to the end on the CPU, exit 0, MFU 0.0%)."""
    run_dir = tmp_path / "run"
    res = subprocess.run([sys.executable, "-m", "cratescale.launch", str(TINY_JOB), f"run_dir={run_dir}",
                          f"data.root={fault_manifest.parent}", "stages=[pretrain]", "cluster.profile=example_h100",
                          "cluster.executor=local"],
                         capture_output=True, text=True, timeout=600, cwd=tmp_path, stdin=subprocess.DEVNULL,
                         env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert res.returncode == 1, res.stdout[-3000:] + res.stderr[-3000:]
    lines = res.stdout.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("error: pretrain: job"))
    assert "ended FAILED, not retried" in lines[head], lines[head]
    assert lines[head + 1].startswith("  rank 0: GpuSetupError: CRATESCALE_EXPECT_GPUS=8 asks for GPUs but this "
                                      "process sees no CUDA device: torch "), lines[head:head + 2]
    assert len(json.loads((run_dir / "launch.json").read_text())["job_ids"]) == 1
    assert not (run_dir / "checkpoints" / "latest").exists()
