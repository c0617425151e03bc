"""The finetune stage (after export): for each transfer set (each `extract.datasets` entry, or the pretraining
set's labelled split when there is none) and each arm (`finetune.arms`), one training run of the classifier,
submitted through the Supervisor like pretraining (same trainer, commits, preemption, requeue, exact resume), then
exported.

A fine-tune run lives in `<run_dir>/finetune/<set>/<arm>/` with its own config.yaml, checkpoints, metrics.jsonl,
submitit logs and `export/`. Its config is the job with `schedule`, `optim` and `seed` taken from `finetune.*`
(`finetune_job`), so the trainer, DeepSpeed's config and `status` read it as any run's; what it trains (arm, set,
pretraining export, class names) travels with the rank task (engine/finetune_task.py FinetuneSpec).
"""
from __future__ import annotations

import time
from pathlib import Path

import ray

from cratescale.checkpoint import CheckpointStore
from cratescale.checkpoint.classifier_export import export_classifier
from cratescale.checkpoint.commit import Commit
from cratescale.checkpoint.export import consolidate, export_fingerprint, holds_commit, training_provenance
from cratescale.config import ConfigError, JobConfig, ProfileConfig, RunPaths, dump_job, job_yaml
from cratescale.config.identity import identity_hash
from cratescale.engine.finetune_task import FinetuneSpec, FinetuneTask, build_classifier, manifest_class_names
from cratescale.engine.model_build import count_train_samples
from cratescale.engine.optim import total_steps
from cratescale.launch.attach import LiveJob, check_attachable, live_job
from cratescale.launch.display import StageError, console
from cratescale.launch.follow_training import follow_training
from cratescale.launch.followups import dataset_manifests
from cratescale.launch.quiet import library_output
from cratescale.launch.supervisor import Supervisor
from data_pipeline.manifest_index import count_split


def finetune_job(job: JobConfig, run_dir: Path) -> JobConfig:
    """The fine-tune run's job: the pretraining job (data, parallel, checkpoint, cluster, logging settings) with
    the fine-tune's batches, length, warm-up, learning rate, betas, clipping and seed."""
    ft = job.finetune
    data = job.model_dump()
    data.update(run_dir=str(run_dir), seed=job.finetune_seed, stages=["pretrain"])
    data["schedule"] = {"global_batch": ft.global_batch, "micro_batch": ft.micro_batch, "steps": ft.steps,
                        "epochs": ft.epochs, "warmup_steps": ft.warmup_steps, "warmup_epochs": ft.warmup_epochs}
    data["optim"] = {"base_lr": ft.base_lr, "weight_decay": ft.weight_decay, "betas": ft.betas,
                     "grad_clip": ft.grad_clip}
    data["checkpoint"]["start_fresh_from_weights"] = None
    data["cluster"]["array"] = []
    return JobConfig.model_validate(data)


def run_dir_of(paths: RunPaths, set_name: str, arm: str) -> Path:
    return paths.finetune / set_name / arm


def check_transfer_set(name: str, manifest: Path, global_batch: int) -> None:
    """A set to fine-tune on has a training split of at least one global batch and a val split to measure on."""
    train, val = count_split(manifest, "train"), count_split(manifest, "val")
    where = "data.val_per_class" if name == "pretrain" else f"extract.datasets ({name}).val_per_class"
    if train < global_batch:
        raise ConfigError(f"finetune: {train} training samples in {manifest} ({name}), fewer than one global batch "
                          f"({global_batch}, finetune.global_batch)")
    if val == 0:
        raise ConfigError(f"finetune: {manifest} ({name}) has no val split to measure top-1 on; set {where}")


def finetune_stage(job: JobConfig, paths: RunPaths, profile: ProfileConfig) -> list[Path]:
    """Every set x arm trained (or found trained) and exported; returns the exports."""
    if not job.finetune.enabled:
        console.log("finetune: finetune.enabled is false: nothing to fine-tune")
        return []
    if not (paths.export / "export.json").is_file():
        raise StageError(f"finetune: no export in {paths.export}; run the export stage first")
    exports = []
    for set_name, manifest in dataset_manifests(job, paths).items():
        check_transfer_set(set_name, manifest, job.finetune.global_batch)
        names = manifest_class_names(manifest)
        for arm in job.finetune.arms:
            spec = FinetuneSpec(arm, set_name, str(paths.export), names)
            exports.append(run_arm(job, paths, profile, manifest, spec))
    return exports


def run_arm(job: JobConfig, paths: RunPaths, profile: ProfileConfig, manifest: Path, spec: FinetuneSpec) -> Path:
    label = f"finetune {spec.set_name}/{spec.arm}"
    ft_job = finetune_job(job, run_dir_of(paths, spec.set_name, spec.arm))
    ft_paths = RunPaths(Path(ft_job.run_dir), paths.data_root)
    task = FinetuneTask(ft_job, manifest, spec)
    live = live_arm(ft_job, ft_paths, label)
    commit = trained(ft_job, ft_paths, manifest, task) if live is None else None
    if commit is not None:
        console.log(f"{label}: step {commit.step} is committed ({commit.path}), the whole schedule: nothing "
                    f"submitted")
    else:
        if live is None:  # a live job rereads its saved config at each restart: never replaced under it
            dump_job(ft_job, ft_paths.config)
        supervisor = Supervisor.remote(str(ft_paths.config), str(manifest), spec.to_dict())
        try:
            if live is not None:
                job_id = ray.get(supervisor.adopt.remote(live.job_id, live.record))
                console.log(f"{label}: job {job_id} ({live.state}) is already fine-tuning this arm: following it, "
                            f"nothing submitted")
            else:
                job_id = ray.get(supervisor.submit.remote())
                console.log(f"{label}: submitted job {job_id} ({len(spec.class_names)} classes, "
                            f"{ft_job.cluster.executor} executor, {ft_job.world_size} ranks); logs in "
                            f"{ft_paths.submitit_dir}")
            status = follow_training(ft_job, ft_paths, supervisor, job_id, label)
        finally:
            ray.kill(supervisor)
        console.log(f"{label}: done at step {status['step']}, {status['restarts']} restarts, "
                    f"{status['commits']} commits")
        commit = CheckpointStore(ft_paths.checkpoints).latest()
        if commit is None:
            raise StageError(f"{label}: the job completed but {ft_paths.checkpoints} holds no commit")
    return export_arm(ft_job, ft_paths, spec, commit, label)


def live_arm(ft_job: JobConfig, ft_paths: RunPaths, label: str) -> LiveJob | None:
    """The arm's job that an earlier launch submitted and SLURM still has: followed, not submitted again (two
    jobs would write one run's commits). A live local job cannot be followed, and a launch that asks for another
    fine-tune than the live job's is refused: StageError, one line."""
    live = live_job(ft_paths)
    if live is not None:
        try:
            check_attachable(live, ft_paths, job_yaml(ft_job))
        except ConfigError as err:
            raise StageError(f"{label}: {err}") from None
    return live


def trained(ft_job: JobConfig, ft_paths: RunPaths, manifest: Path, task: FinetuneTask) -> Commit | None:
    """The run's newest commit when it holds the whole fine-tune schedule of this identity."""
    commit = CheckpointStore(ft_paths.checkpoints).latest()
    if commit is None:
        return None
    total = total_steps(ft_job, count_train_samples(manifest) // ft_job.schedule.global_batch)
    same = commit.meta.get("config_hash") == identity_hash(task.identity())
    return commit if commit.step >= total and same else None


def export_arm(ft_job: JobConfig, ft_paths: RunPaths, spec: FinetuneSpec, commit: Commit, label: str) -> Path:
    """The commit's fp32 weights as a classifier export in `<fine-tune run>/export`, with where they came from."""
    if holds_commit(ft_paths.export, commit):
        console.log(f"{label}: step {commit.step} is already exported to {ft_paths.export}, skipping")
        return ft_paths.export
    with library_output(ft_paths.run_dir):  # zero_to_fp32 prints and draws a bar: into the run's logs
        found = consolidate(commit)
    model = build_classifier(spec, ft_job)  # the architecture; its weights are replaced by the commit's
    model.load_state_dict(found.state_dict)
    provenance = {"run": ft_job.name, "arm": spec.arm, "set": spec.set_name, "step": commit.step,
                  "config_hash": commit.meta.get("config_hash"), "time": time.time(), "checkpoint": str(commit.path),
                  "source_export": spec.export, "source_export_fingerprint": export_fingerprint(spec.export),
                  **training_provenance(found)}
    export_classifier(model, provenance, ft_paths.export, overwrite=True)
    console.log(f"{label}: step {commit.step} ({found.precision} run, fp32 master weights) -> {ft_paths.export}")
    return ft_paths.export
