"""Fixtures of the fault tests: a tiny ingested dataset, the fork server of ranks, an uninterrupted reference."""
from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TINY_JOB = REPO / "tests" / "dist" / "tiny.yaml"
KILL_STEPS = 64
# Commit every step and keep one: every commit also deletes the previous one (retention under fire). The
# asynchronous commit: kills land inside its background writes too (mode "writing").
KILL_OVERRIDES = ["checkpoint.every_steps=1", "checkpoint.keep_last=1", f"schedule.steps={KILL_STEPS}",
                  "checkpoint.async_commit=true"]


@pytest.fixture(scope="session")
def fault_manifest(tmp_path_factory) -> Path:
    from data_pipeline.ingest import ingest

    out = tmp_path_factory.mktemp("fault_data")
    return Path(ingest("synthetic://shapes?n=192&classes=4&size=32&seed=1", out, workers=0, progress=False))


@pytest.fixture(scope="session")
def rank_server():
    from tests.faults.ranks import RankServer

    with RankServer() as server:
        yield server


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory, fault_manifest):
    """The uninterrupted run (fresh `python train_worker.py` processes, not the fork server): the baseline
    every killed/preempted run must match bitwise."""
    from tests.dist.harness import final_weights, optimizer_files, run_ranks, write_config

    run_dir = tmp_path_factory.mktemp("reference") / "run"
    config = write_config(TINY_JOB, run_dir, KILL_OVERRIDES)
    results = run_ranks(config, fault_manifest, 2)
    assert all(r == {"status": "completed", "step": KILL_STEPS} for r in results), results
    step, weights = final_weights(run_dir)
    return {"run_dir": run_dir, "step": step, "weights": weights, "optim": optimizer_files(run_dir)}
