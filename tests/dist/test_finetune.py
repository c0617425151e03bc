"""The finetune stage through the launcher (issue 32): local Ray, the supervisor, submitit's local executor with 2
ranks, DeepSpeed ZeRO-2 over gloo, DALI on the CPU, bf16, a tiny CRATE-MAE at 32 px. Both arms train from where
they should (the export's encoder; the seeded initialization), write loss, lr and top-1 rows, and export; a
fine-tune preempted by SIGUSR2 to its ranks resumes and ends bitwise where an uninterrupted one ends, and within a
measured bound of it when it resumes on 1 rank (elastic)."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import psutil
import pytest
import torch

from cratescale.checkpoint.classifier_export import load_classifier
from cratescale.checkpoint.export import load_export
from cratescale.config import RunPaths, load_job
from cratescale.engine.finetune_task import manifest_class_names
from cratescale.engine.model_build import build_model
from cratescale.evaluation.finetune_report import read_curves, summarize
from cratescale.launch.followups import report_inputs
from tests.dist.harness import assert_within_elastic_bound, consumed_samples, final_weights

REPO = Path(__file__).resolve().parents[2]
BASE_JOB = REPO / "tests" / "dist" / "tiny.yaml"
pytestmark = pytest.mark.dist

STEPS, EVERY_EVAL, EVERY_COMMIT = 120, 40, 20
OVERRIDES = ["data.val_per_class=8", "schedule.steps=4", f"checkpoint.every_steps={EVERY_COMMIT}",
             "stages=[ingest,pretrain,export,finetune]", "finetune.enabled=true", f"finetune.steps={STEPS}",
             "finetune.global_batch=16", "finetune.micro_batch=8", "finetune.warmup_steps=4",
             f"finetune.eval_every_steps={EVERY_EVAL}", "logging.progress=false",
             # every random draw of a fine-tune step is in play for the resume: drop path, mixup and cutmix
             "finetune.drop_path=0.2", "finetune.mixup=0.8", "finetune.cutmix=1.0"]
ENCODER = ("patch_embed.", "cls_token", "pos_embed", "blocks.")


def _launch(run_dir: Path, extra: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cratescale.launch", str(BASE_JOB), f"run_dir={run_dir}",
                             *OVERRIDES, *extra], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=cwd, env=dict(os.environ, PYTHONPATH=str(REPO)))


def _rows(arm_dir: Path, kind: str | None = None) -> list[dict]:
    path = arm_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return [r for r in rows if kind is None or r.get("kind") == kind]


def _crc(t: torch.Tensor) -> int:
    return zlib.crc32(t.detach().float().contiguous().numpy().tobytes())


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("finetune")
    run_dir = base / "run"
    proc = _launch(run_dir, [], base)
    out, _ = proc.communicate(timeout=1500)
    assert proc.returncode == 0, out[-5000:]
    return run_dir


def test_both_arms_train_from_their_start_evaluate_and_export(finetuned):
    run_dir = finetuned
    job = load_job(run_dir / "config.yaml")
    export_state, _, _ = load_export(run_dir / "export")
    init_state = build_model(job).state_dict()  # where pretraining started: the job's seed
    names = manifest_class_names(run_dir / "data" / "manifest.parquet")
    assert len(names) == 4
    starts = {}
    for arm in ("pretrained", "scratch"):
        arm_dir = run_dir / "finetune" / "pretrain" / arm
        train = _rows(arm_dir, "train")
        assert [r["step"] for r in train] == list(range(2, STEPS + 1, 2)), train  # logging.every_steps 2
        assert all(r["loss"] > 0 and r["lr"] > 0 for r in train)
        evals = _rows(arm_dir, "eval")
        assert [r["step"] for r in evals] == list(range(EVERY_EVAL, STEPS + 1, EVERY_EVAL)), evals
        assert all(r["n"] == 32 and 0.0 <= r["top1"] <= 1.0 for r in evals), evals  # 8 val images x 4 classes
        start = _rows(arm_dir, "finetune_start")
        assert len(start) == 1 and start[0]["arm"] == arm
        starts[arm] = start[0]["weights_crc32"]
        model, info = load_classifier(arm_dir / "export")
        assert (info["arm"], info["step"], tuple(model.class_names)) == (arm, STEPS, names)
        step, weights = final_weights(arm_dir)
        assert step == STEPS
        exported = model.state_dict()
        assert all(torch.equal(weights[k].float(), exported[k]) for k in exported)
        assert any(_crc(exported[k]) != starts[arm][k] for k in exported)  # it trained
    encoder = [k for k in starts["pretrained"] if k.startswith(ENCODER)]
    assert len(encoder) > 4
    for name in encoder:  # the pretrained arm starts from the export, the scratch arm from the seeded init
        assert starts["pretrained"][name] == _crc(export_state[name]), name
        assert starts["scratch"][name] == _crc(init_state[name]), name
    assert any(starts["pretrained"][k] != starts["scratch"][k] for k in encoder)
    head = [k for k in starts["pretrained"] if k.startswith(("head.", "fc_norm."))]
    assert head and all(starts["pretrained"][k] == starts["scratch"][k] for k in head)  # one seeded head


def test_the_report_reads_both_arms_and_follows_their_exports(finetuned):
    run_dir = finetuned
    summary = summarize(read_curves(run_dir / "finetune", "pretrain"))
    for arm in ("pretrained", "scratch"):
        last = _rows(run_dir / "finetune" / "pretrain" / arm, "eval")[-1]
        assert (summary[arm]["step"], summary[arm]["top1"], summary[arm]["n"]) == (STEPS, last["top1"], 32)
    expected = 100 * (summary["pretrained"]["top1"] - summary["scratch"]["top1"])
    assert summary["difference"]["points"] == pytest.approx(expected)
    job = load_job(run_dir / "config.yaml")
    paths = RunPaths.of(job)
    header = paths.finetune / "pretrain" / "scratch" / "export" / "export.json"
    key = report_inputs(job, paths, "pretrain", paths.manifest)["key"]
    saved = header.read_bytes()
    try:  # a re-exported arm makes the report stale: evaluate writes it again
        header.write_bytes(saved + b" ")
        assert report_inputs(job, paths, "pretrain", paths.manifest)["key"] != key
    finally:
        header.write_bytes(saved)
    assert report_inputs(job, paths, "pretrain", paths.manifest)["key"] == key


def _rank_processes(submitit_dir: Path) -> list[psutil.Process]:
    """submitit's local ranks of one run: the children of its controller (`python -m submitit.local._local
    <its folder>`); their own children (the loader's feed workers) carry the ranks' command line too."""
    for proc in psutil.process_iter(["cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if "submitit.local._local" in cmd and str(submitit_dir) in cmd:
            try:
                return proc.children()
            except psutil.NoSuchProcess:
                return []
    return []


def _arm_run(finetuned: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A run directory holding the fixture's pretraining export, and its pretrained arm's directory."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copytree(finetuned / "export", run_dir / "export")
    return run_dir, run_dir / "finetune" / "pretrain" / "pretrained"


def _arm_only(finetuned: Path) -> list[str]:
    return [f"data.root={finetuned / 'data'}", "finetune.arms=[pretrained]", "--stages", "finetune"]


def _preempt_after_a_commit(proc: subprocess.Popen, arm_dir: Path) -> list[int]:
    """SIGUSR2 to both ranks once the arm has a commit; returns the commits' steps then ([]: never signalled)."""
    deadline = time.time() + 900
    while proc.poll() is None and time.time() < deadline:
        commits = [r["step"] for r in _rows(arm_dir, "commit")]
        ranks = _rank_processes(arm_dir / "submitit")
        if commits and len(ranks) == 2:
            for rank in ranks:
                rank.send_signal(signal.SIGUSR2)
            return commits
        time.sleep(0.1)
    return []


def test_preempted_fine_tune_resumes_bitwise(finetuned, tmp_path):
    """SIGUSR2 to both ranks mid-fine-tune: they commit and stop, the supervisor resubmits, the run resumes from
    the commit and ends with the weights of the uninterrupted fine-tune, bit for bit."""
    run_dir, arm_dir = _arm_run(finetuned, tmp_path)
    proc = _launch(run_dir, _arm_only(finetuned), tmp_path)
    signalled = _preempt_after_a_commit(proc, arm_dir)
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-5000:]
    assert signalled, "the fine-tune ended before it could be signalled"
    ends = _rows(arm_dir, "end")
    assert [e["status"] for e in ends] == ["preempted", "completed"], ends
    starts = _rows(arm_dir, "start")
    assert [s["resumed"] for s in starts] == [False, True]
    assert 0 < starts[1]["step"] < STEPS  # resumed mid-fine-tune
    step, weights = final_weights(arm_dir)
    ref_step, reference = final_weights(finetuned / "finetune" / "pretrain" / "pretrained")
    assert step == ref_step == STEPS
    assert weights.keys() == reference.keys()
    assert all(torch.equal(weights[k], reference[k]) for k in reference)
    assert [r["top1"] for r in _rows(arm_dir, "eval")][-1] == \
        [r["top1"] for r in _rows(finetuned / "finetune" / "pretrain" / "pretrained", "eval")][-1]


# An elastic fine-tune (2 -> 1 ranks) against the uninterrupted one, measured by bench/finetune_elastic_drift.py
# (this file's fine-tune, 2-core AMD EPYC): largest weight difference 3.0e-08 after stops at steps 5, 20 and 60,
# 1.5e-08 after 100 (bench/results/finetune_elastic.json); two 2-rank fine-tunes are bitwise equal. With the draws
# seeded per rank (before issue 32's elastic work) a stop at 20 ended 4.8e-04 away, 8% of the change training made
# (finetune_elastic_before.json). The bound is 33x the worst measured and 480x below the per-rank seeding's.
FINETUNE_ELASTIC_MAX_ABS = 1e-6


def test_a_fine_tune_stopped_on_two_ranks_resumes_on_one(finetuned, tmp_path):
    """Elastic fine-tune: preempted on 2 ranks with no requeue left, the launch stops with one line; relaunched on
    1 rank, it resumes from the commit through the universal form, takes the same samples with the same draws
    (seeded per sample, not per rank) and ends within a measured bound of the uninterrupted 2-rank fine-tune."""
    run_dir, arm_dir = _arm_run(finetuned, tmp_path)
    proc = _launch(run_dir, [*_arm_only(finetuned), "cluster.max_requeues=0"], tmp_path)
    signalled = _preempt_after_a_commit(proc, arm_dir)
    out, _ = proc.communicate(timeout=900)
    assert signalled, "the fine-tune ended before it could be signalled"
    assert proc.returncode != 0 and "finetune pretrain/pretrained" in out, out[-3000:]
    proc = _launch(run_dir, [*_arm_only(finetuned), "cluster.tasks_per_node=1"], tmp_path)
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-5000:]
    starts = [(s["step"], s["world_size"], s["elastic"]) for s in _rows(arm_dir, "start")]
    assert len(starts) == 2 and starts[0] == (0, 2, False) and starts[1][1:] == (1, True), starts
    assert 0 < starts[1][0] < STEPS
    assert [e["status"] for e in _rows(arm_dir, "end")] == ["preempted", "completed"]
    reference_dir = finetuned / "finetune" / "pretrain" / "pretrained"
    assert consumed_samples(arm_dir) == consumed_samples(reference_dir)
    step, weights = final_weights(arm_dir)
    ref_step, reference = final_weights(reference_dir)
    assert step == ref_step == STEPS
    assert_within_elastic_bound(weights, reference, f"2 -> 1 rank fine-tune from step {starts[1][0]}",
                                FINETUNE_ELASTIC_MAX_ABS)


def test_each_extract_dataset_is_a_transfer_set(finetuned, tmp_path):
    """With extract.datasets, each named set is fine-tuned on (ingested on first use), not the pretraining data."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copytree(finetuned / "export", run_dir / "export")
    source = "synthetic://shapes?n=96&classes=3&size=32&seed=5"
    proc = _launch(run_dir, [f"data.root={finetuned / 'data'}", "finetune.arms=[scratch]", "finetune.steps=8",
                             f"extract.datasets=[{{name: shapes3, source: '{source}', val_per_class: 4}}]",
                             "--stages", "finetune"], tmp_path)
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-5000:]
    assert sorted(p.name for p in (run_dir / "finetune").iterdir()) == ["shapes3"]
    arm_dir = run_dir / "finetune" / "shapes3" / "scratch"
    assert [(r["step"], r["n"]) for r in _rows(arm_dir, "eval")] == [(8, 12)]  # 4 val images x 3 classes
    model, info = load_classifier(arm_dir / "export")
    assert (info["set"], info["step"]) == ("shapes3", 8)
    assert tuple(model.class_names) == manifest_class_names(run_dir / "transfer" / "shapes3" / "manifest.parquet")
