"""Decode identity in the real 2-rank trainer: a run decoded by DALI (CPU) is not resumed under PIL (other
pixels) unless the job says checkpoint.allow_decoder_change; the start record and console name the decoder."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.faults.conftest import TINY_JOB

pytestmark = pytest.mark.dist


def _records(run_dir: Path, kind: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def test_resume_under_pil_of_a_dali_run_is_refused_unless_allowed(fault_manifest, tmp_path, rank_server):
    from cratescale.checkpoint import CheckpointStore
    from data_pipeline.loader import choose_decoder
    from tests.dist.harness import write_config

    dali, pil = choose_decoder("dali", "cpu"), choose_decoder("pil")
    run_dir = tmp_path / "run"
    base = ["schedule.steps=6", "checkpoint.every_steps=2"]
    # Killed while committing step 4 (before its rename): step 2 is the commit to resume from.
    job = rank_server.start(write_config(TINY_JOB, run_dir, [*base, "data.loader=dali"]), fault_manifest, 2,
                            faults={"mode": "seal", "step": 4})
    assert job.wait() == [-9, -9], job.output(0)
    assert _records(run_dir, "start")[0]["decoder"] == dali.identity == f"DALI {dali.identity.split()[1]} cpu"
    assert f"[cratescale] decoder: {dali.identity} (data.loader=dali)" in job.output(0)
    store = CheckpointStore(run_dir / "checkpoints")
    assert store.latest().step == 2 and store.latest().meta["decoder"] == dali.identity

    # Requeued onto a node without DALI: the job now decodes with PIL. Refused, one line naming both.
    job = rank_server.start(write_config(TINY_JOB, run_dir, [*base, "data.loader=pil"]), fault_manifest, 2)
    codes = job.wait()
    assert codes[0] != 0 and codes[1] != 0, codes
    want = (f"{store.latest().path}: its samples were decoded by {dali.identity}, this job decodes "
            f"with {pil.identity} (data.loader=pil); pixels differ between decoders. Use "
            f"checkpoint.allow_decoder_change=true to continue anyway, or run where the same decoder is installed")
    assert job.output(0).splitlines()[-1].endswith(f"ResumeError: {want}"), job.output(0)
    assert store.latest().step == 2

    job = rank_server.start(write_config(TINY_JOB, run_dir, [*base, "data.loader=pil",
                                                             "checkpoint.allow_decoder_change=true"]),
                            fault_manifest, 2)
    assert job.wait() == [0, 0], job.output(0)
    start = _records(run_dir, "start")[-1]
    assert (start["decoder"], start["decoder_changed_from"], start["resumed"]) == (pil.identity, dali.identity, True)
    assert (f"[cratescale] decoder: {pil.identity} (data.loader=pil); resumed from a run decoded by "
            f"{dali.identity} (checkpoint.allow_decoder_change)") in job.output(0)
    assert store.latest().step == 6 and store.latest().meta["decoder"] == pil.identity
