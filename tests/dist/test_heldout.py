"""The held-out reconstruction loss inside pretraining (issue 32.4) on 2 ranks as the jobs run (gloo, DALI on the
CPU, bf16; tests/dist/tiny.yaml): a row at each asked step over the whole val split, the value one process computes
from the same weights, and training unchanged by it (final weights bitwise equal to the run without it)."""
from pathlib import Path

import math

import pytest
import torch

from cratescale.config import load_job
from cratescale.engine.metrics import read_metrics
from cratescale.engine.model_build import build_model
from cratescale.engine.task import PretrainTask
from data_pipeline.loader import choose_decoder
from tests.dist.harness import final_weights, run_ranks, write_config

REPO = Path(__file__).resolve().parents[2]
BASE_JOB = REPO / "tests" / "dist" / "tiny.yaml"
pytestmark = pytest.mark.dist


@pytest.fixture(scope="module")
def val_manifest(tmp_path_factory) -> Path:
    from data_pipeline.ingest import ingest

    out = tmp_path_factory.mktemp("heldout_data")
    return Path(ingest("synthetic://shapes?n=192&classes=4&size=32&seed=1", out, workers=1, val_per_class=5))


def test_heldout_loss_rows_match_one_process_and_leave_training_unchanged(tmp_path, val_manifest):
    plain = write_config(BASE_JOB, tmp_path / "plain" / "run", [])
    measured = write_config(BASE_JOB, tmp_path / "heldout" / "run", ["logging.heldout_every_steps=4"])
    for config in (plain, measured):
        assert all(r == {"status": "completed", "step": 8} for r in run_ranks(config, val_manifest, 2))
    rows = [r for r in read_metrics(tmp_path / "heldout" / "run") if r.get("kind") == "heldout"]
    assert [(r["step"], r["n"]) for r in rows] == [(4, 20), (8, 20)], rows  # 5 val images x 4 classes, both ranks
    assert all(math.isfinite(r["recon_loss"]) and r["recon_loss"] > 0 for r in rows)
    assert not [r for r in read_metrics(tmp_path / "plain" / "run") if r.get("kind") == "heldout"]
    step, weights = final_weights(tmp_path / "heldout" / "run")
    _, reference = final_weights(tmp_path / "plain" / "run")
    assert step == 8 and all(torch.equal(weights[k], reference[k]) for k in reference)  # evaluation is read-only
    # One process, all 20 images, the ranks' bf16 weights (the fp32 masters rounded, as DeepSpeed's bf16 module):
    # the same loss up to the order of the ranks' sums
    job = load_job(measured)
    model = build_model(job)
    model.load_state_dict(weights)
    alone = PretrainTask(job, val_manifest).evaluate(model.to(torch.bfloat16), 8, choose_decoder("dali", "cpu"), 1, 0)
    assert alone["n"] == 20
    assert alone["recon_loss"] == pytest.approx(rows[-1]["recon_loss"], rel=1e-6)
