"""The finetune stage's pieces without ranks (issue 32): the fine-tune run's job, its resume identity, the transfer
set check, the stage order, the classifier's FLOPs. The stage itself runs in tests/dist/test_finetune.py."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cratescale.checkpoint.export import export_weights
from cratescale.config import ConfigError, job_warnings, load_job
from cratescale.engine.finetune_task import FinetuneSpec, FinetuneTask, manifest_class_names
from cratescale.config import RunPaths, dump_job
from cratescale.launch.display import StageError
from cratescale.launch.finetune_stage import check_transfer_set, finetune_job, live_arm
from cratescale.models import create_model, scratch_classifier, train_flops_per_image
from cratescale.models.flops import forward_macs_per_image

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "tests" / "dist" / "tiny.yaml"
FINETUNE = ["finetune.enabled=true", "finetune.steps=10", "finetune.global_batch=8", "finetune.micro_batch=4",
            "finetune.base_lr=1e-3", "finetune.seed=11"]


@pytest.fixture(scope="module")
def manifests(tmp_path_factory) -> dict[str, Path]:
    from data_pipeline.ingest import ingest

    base = tmp_path_factory.mktemp("ft_sets")
    source = "synthetic://shapes?n=48&classes=4&size=32&seed=2"
    return {"val": Path(ingest(source, base / "val", val_per_class=2, workers=1)),
            "noval": Path(ingest(source, base / "noval", workers=1))}


def _export(path: Path, seed: int) -> str:
    torch.manual_seed(seed)
    model = create_model("crate_mae_debug", img_size=32, patch_size=8)
    export_weights(model.state_dict(), model.config, {"step": 1}, path)
    return str(path)


def test_the_fine_tune_job_takes_schedule_optimizer_and_seed_from_finetune(tmp_path):
    job = load_job(TINY, [f"run_dir={tmp_path}/run", *FINETUNE, "checkpoint.start_fresh_from_weights=/x"])
    ft = finetune_job(job, tmp_path / "run" / "finetune" / "s" / "pretrained")
    assert (ft.schedule.global_batch, ft.schedule.micro_batch, ft.schedule.steps) == (8, 4, 10)
    assert (ft.optim.base_lr, ft.optim.betas, ft.optim.grad_clip, ft.optim.weight_decay) == (1e-3, (0.9, 0.999),
                                                                                              None, 0.05)
    assert ft.seed == 11 and ft.checkpoint.start_fresh_from_weights is None
    assert ft.run_dir.endswith("finetune/s/pretrained") and ft.model == job.model and ft.data == job.data


def test_enabled_without_the_stage_is_a_warning(tmp_path):
    job = load_job(TINY, [f"run_dir={tmp_path}/run", *FINETUNE])
    assert job_warnings(job) == ["finetune.enabled is true but the finetune stage is not among the job's stages "
                                 "['pretrain']: nothing is fine-tuned; add finetune after export"]
    assert job_warnings(load_job(TINY, [f"run_dir={tmp_path}/run", *FINETUNE, "stages=[pretrain,finetune]"])) == []


def test_identity_is_what_the_fine_tune_continues_with(tmp_path, manifests):
    job = finetune_job(load_job(TINY, [f"run_dir={tmp_path}/run", *FINETUNE]), tmp_path / "ft")
    names = manifest_class_names(manifests["val"])
    a, b = _export(tmp_path / "a", 0), _export(tmp_path / "b", 1)  # same architecture, other weights

    def identity(export: str, arm: str, *overrides: str) -> dict:
        changed = finetune_job(load_job(TINY, [f"run_dir={tmp_path}/run", *FINETUNE, *overrides]), tmp_path / "ft")
        return FinetuneTask(changed, manifests["val"], FinetuneSpec(arm, "s", export, names)).identity()

    base = identity(a, "pretrained")
    assert FinetuneTask(job, manifests["val"], FinetuneSpec("pretrained", "s", a, names)).identity() == base
    assert identity(a, "pretrained", "finetune.steps=20", "finetune.eval_every_steps=5") == base  # length: free
    assert identity(a, "pretrained", "finetune.layer_decay=0.5") != base
    assert identity(b, "pretrained") != base  # other pretrained weights
    assert identity(a, "scratch") != base
    assert identity(a, "scratch") == identity(b, "scratch")  # the scratch arm reads only the architecture


def test_a_transfer_set_needs_a_val_split_and_a_global_batch(manifests):
    assert len(manifest_class_names(manifests["val"])) == 4
    check_transfer_set("pretrain", manifests["val"], 8)
    with pytest.raises(ConfigError, match="no val split to measure top-1 on; set data.val_per_class"):
        check_transfer_set("pretrain", manifests["noval"], 8)
    with pytest.raises(ConfigError, match=r"fewer than one global batch \(64, finetune.global_batch\)"):
        check_transfer_set("cifar", manifests["val"], 64)
    with pytest.raises(ValueError, match="arm 'both'"):
        FinetuneSpec("both", "s", "x", ("a",))


def test_zero_stage_3_is_refused_before_anything_is_queued(tmp_path):
    from cratescale.config import RunPaths
    from cratescale.launch.datacheck import check_data

    job = load_job(TINY, [f"run_dir={tmp_path}/run", *FINETUNE, "parallel.zero_stage=3"])
    with pytest.raises(ConfigError, match="stage 3 is not supported there yet"):
        check_data(job, RunPaths.of(job), ["finetune"])


def test_finetune_without_an_export_names_the_stage_to_run_first(tmp_path):
    run = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "cratescale.launch", str(TINY), f"run_dir={run}",
                           "stages=[pretrain,export,finetune]", *FINETUNE, "--stages", "finetune"],
                          cwd=REPO, text=True, capture_output=True, timeout=120,
                          env={"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin",
                               "RAY_ADDRESS": "127.0.0.1:1"})  # a Ray start would fail loudly
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip() == f"error: --stages: finetune needs what export makes (no export in {run}/export); " \
                                  f"run export first: --stages export,finetune", done.stderr


def test_classifier_flops_count_every_token_through_the_encoder_and_the_head():
    torch.manual_seed(0)
    mae = create_model("crate_mae_debug", img_size=32, patch_size=8)
    small, large = scratch_classifier(mae.config, 4), scratch_classifier(mae.config, 1004)
    d = mae.config["embed_dim"]
    assert forward_macs_per_image(large) - forward_macs_per_image(small) == 1000 * d  # the head
    assert 0 < train_flops_per_image(small) < train_flops_per_image(mae)  # no decoder; all 1 + L tokens
    deeper = scratch_classifier({**mae.config, "depth": 2 * mae.config["depth"]}, 4)
    patch = mae.num_patches * mae.config["patch_size"] ** 2 * mae.config["in_chans"] * d
    assert forward_macs_per_image(deeper) - patch - 4 * d == 2 * (forward_macs_per_image(small) - patch - 4 * d)


def test_status_reads_each_fine_tune_run(tmp_path):
    import json

    from cratescale.checkpoint.classifier_export import classifier_from_export, export_classifier
    from cratescale.checkpoint.export import export_fingerprint
    from cratescale.launch.stage_state import stage_states

    run = tmp_path / "run"
    job = load_job(TINY, [f"run_dir={run}", *FINETUNE, "stages=[pretrain,export,finetune]"])
    _export(run / "export", 0)
    arm = run / "finetune" / "pretrain" / "pretrained"
    model = classifier_from_export(run / "export", 4)
    export_classifier(model, {"arm": "pretrained", "step": 10,
                              "source_export_fingerprint": export_fingerprint(run / "export")}, arm / "export")
    (arm / "metrics.jsonl").write_text(json.dumps({"kind": "eval", "step": 10, "top1": 0.625, "n": 32}) + "\n")

    def finetune_rows() -> dict[str, tuple[str, str]]:
        return {r["stage"]: (r["state"], r["detail"]) for r in stage_states(job, run, "COMPLETED", 8, 8)
                if r["stage"].startswith("finetune")}

    assert finetune_rows() == {"finetune pretrain/pretrained": ("done", "step 10, top-1 62.5% of 32"),
                               "finetune pretrain/scratch": ("not run", "")}
    (run / "export").rename(tmp_path / "old_export")
    _export(run / "export", 1)  # pretraining's export changed since: the pretrained arm is stale
    assert finetune_rows()["finetune pretrain/pretrained"][0] == "stale"


def test_a_live_arm_job_is_never_submitted_again(tmp_path):
    """A second launch while an arm's job is live: a local job (its controller is a real process whose command
    line names submitit, as submitit's local controller's does) is refused in one line; none live, or a dead pid,
    lets the launch submit. The SLURM case follows the job through Supervisor.adopt, as pretraining's does."""
    job = load_job(TINY, [f"run_dir={tmp_path}/run", *FINETUNE])
    ft_job = finetune_job(job, tmp_path / "run" / "finetune" / "pretrain" / "scratch")
    ft_paths = RunPaths.of(ft_job)
    ft_paths.run_dir.mkdir(parents=True)
    dump_job(ft_job, ft_paths.config)
    assert live_arm(ft_job, ft_paths, "finetune pretrain/scratch") is None  # never launched
    controller = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "submitit.local._local"])
    try:
        while b"submitit" not in Path(f"/proc/{controller.pid}/cmdline").read_bytes():  # forked, not yet exec'd
            time.sleep(0.01)
        ft_paths.launch_state.write_text(f'{{"executor": "local", "job_ids": ["{controller.pid}"]}}')
        with pytest.raises(StageError, match=rf"^finetune pretrain/scratch: run_dir: {ft_paths.run_dir} is being "
                                             rf"trained by local job {controller.pid} of another launcher"):
            live_arm(ft_job, ft_paths, "finetune pretrain/scratch")
    finally:
        controller.kill()
        controller.wait()
    assert live_arm(ft_job, ft_paths, "finetune pretrain/scratch") is None  # its job ended: submit again
