"""Issue 12 on the product path: 2 real ranks (gloo) train the tiny job in bf16 under ZeRO 1/2/3 through the
trainer; the launcher's export stage then writes DeepSpeed's own fp32 consolidation of the same commit, bitwise
(not the bf16 module weights), says in export.json that the run trained in bf16, and extraction from the export
equals encoding with those weights."""
import numpy as np
import pytest
import torch

from cratescale.checkpoint import CheckpointStore
from cratescale.checkpoint.export import load_export
from cratescale.config import RunPaths, load_job
from cratescale.embeddings.extract import extract
from cratescale.embeddings.store import EmbeddingStore
from cratescale.engine.model_build import build_model
from cratescale.launch.stages import export_stage
from data_pipeline.loader import make_eval_loader
from tests.dist.conftest import BASE_JOB
from tests.dist.harness import run_ranks, write_config

pytestmark = pytest.mark.dist
STEPS, BATCH = 4, 64


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_bf16_export_is_deepspeeds_fp32_consolidation(stage, tmp_path, tiny_manifest):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    run_dir = tmp_path / "run"
    config = write_config(BASE_JOB, run_dir, [f"parallel.zero_stage={stage}", "parallel.precision=bf16",
                                              f"schedule.steps={STEPS}"])
    assert all(r == {"status": "completed", "step": STEPS} for r in run_ranks(config, tiny_manifest, 2))
    job = load_job(config)
    commit = CheckpointStore(run_dir / "checkpoints").latest()
    reference = get_fp32_state_dict_from_zero_checkpoint(str(commit.path), tag="ds")

    paths = RunPaths(run_dir.resolve(), tiny_manifest.parent)
    export_stage(job, paths, None)
    state, _, provenance = load_export(paths.export)
    for name, tensor in reference.items():
        assert state[name].dtype == torch.float32 and torch.equal(state[name], tensor), name
    # ZeRO-1 saves no frozen parameters with its partitions, so DeepSpeed's consolidation lacks the fixed position
    # tables; the export takes them from the model states (never trained: the bf16 values the run used).
    frozen = {"pos_embed", "decoder_pos_embed"}
    assert set(state) - set(reference) == (frozen if stage == 1 else set())
    for name in frozen:
        assert torch.equal(state[name], state[name].bfloat16().float()) and state[name].abs().max() > 0, name
        if stage > 1:
            assert torch.equal(state[name], reference[name]), name
    assert (provenance["precision"], provenance["weights"], provenance["step"]) == ("bf16", "fp32 master", STEPS)
    assert any(not torch.equal(t, t.bfloat16().float()) for t in state.values()), "weights are bf16-rounded"

    store = EmbeddingStore(extract(paths.export, tiny_manifest, tmp_path / "store", dtype="float32", actors=0,
                                   batch_size=BATCH, loader_kind="pil", shard_rows=BATCH, chunk_rows=BATCH))
    model = build_model(job)
    model.load_state_dict({**state, **reference})  # DeepSpeed's weights (+ the frozen tables under ZeRO-1)
    model.eval()
    rows = np.arange(store.info.num_rows)
    with torch.no_grad():
        outs = [model.encode(b["images"]) for b in make_eval_loader(tiny_manifest, rows, BATCH, 32, kind="pil")]
    for feature in ("cls", "mean"):
        want = torch.cat([o[feature] for o in outs]).numpy()
        np.testing.assert_array_equal(store.read(feature), want, err_msg=feature)
