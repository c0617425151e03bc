"""The stages of a job, in order: ingest -> pretrain -> export -> finetune -> extract -> evaluate."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import ray

from cratescale.checkpoint import CheckpointStore
from cratescale.checkpoint.commit import Commit
from cratescale.checkpoint.export import consolidate, export_weights, holds_commit, training_provenance
from cratescale.config import JobConfig, ProfileConfig, RunPaths
from cratescale.launch.attach import LiveJob
from cratescale.launch.datacheck import job_ingest_settings
from cratescale.launch.display import StageError, console
from cratescale.launch.finetune_stage import finetune_stage
from cratescale.launch.follow_training import follow_training
from cratescale.launch.quiet import library_output, native_lines_to_log
from cratescale.launch.followups import run_evaluate, run_extract
from cratescale.launch.supervisor import Supervisor


def ingest_stage(job: JobConfig, paths: RunPaths, profile: ProfileConfig) -> None:
    """Builds the manifest unless the one under data.root is of this source and was made with the job's ingest
    settings; one moved with its root is rebased (same content, new paths), one whose split alone differs is
    re-split. A manifest of another or an unrecorded source, or of other settings, is rebuilt, never trained from."""
    from data_pipeline.ingest import run_ingest
    from data_pipeline.manifest import manifest_action, rebase_manifest, resplit_manifest

    action, why = manifest_action(paths.manifest, job.data.source, paths.data_root, job_ingest_settings(job))
    if action == "keep":
        console.log(f"ingest: {why}, skipping")
        return
    if action == "rebase":
        console.log(f"ingest: {why}: {rebase_manifest(paths.manifest, paths.data_root)} paths rebased")
        return
    if action == "resplit":  # the same samples: only the split is computed again
        fingerprint = resplit_manifest(paths.manifest, job.data.val_per_class)
        console.log(f"ingest: {why}: re-split with val_per_class {job.data.val_per_class} (fingerprint {fingerprint})")
        return
    console.log(f"ingest: {why}: building it")
    result = run_ingest(job.data.source, paths.data_root, reshard=job.data.reshard, shard_size=job.data.shard_size,
                        val_per_class=job.data.val_per_class, workers=job.data.ingest_workers,
                        progress=job.logging.progress)
    console.log(result.summary())


def trained_commit(job: JobConfig, paths: RunPaths) -> Commit | None:
    """The run's newest commit when it already holds this job's whole schedule, trained on what the job trains
    (same identity: a changed model, seed or data is submitted, and the ranks say what differs)."""
    from cratescale.config.identity import identity_hash, job_identity
    from cratescale.engine.model_build import count_train_samples
    from cratescale.engine.optim import total_steps
    from data_pipeline.manifest import manifest_fingerprint

    commit = CheckpointStore(paths.checkpoints).latest()
    if commit is None:
        return None
    total = total_steps(job, count_train_samples(paths.manifest) // job.schedule.global_batch)
    identity = identity_hash(job_identity(job, manifest_fingerprint(paths.manifest)))
    return commit if commit.step >= total and commit.meta.get("config_hash") == identity else None


def pretrain_stage(job: JobConfig, paths: RunPaths, profile: ProfileConfig, live: LiveJob | None = None,
                   detach: bool = False) -> dict[str, Any]:
    """Submits the training, or follows the run's live job (`live`: an earlier launch's, nothing submitted), to its
    end; with `detach`, returns once it is submitted or found."""
    if live is None and (done := trained_commit(job, paths)) is not None:
        console.log(f"pretrain: step {done.step} is committed ({done.path}), the whole schedule: nothing submitted")
        return {"state": "COMPLETED", "step": done.step, "finished": True, "submitted": False}
    supervisor = Supervisor.remote(str(paths.config), str(paths.manifest))
    if live is not None:
        job_id = ray.get(supervisor.adopt.remote(live.job_id, live.record))
        console.log(f"pretrain: job {job_id} ({live.state}) is already training this run: following it, nothing "
                    f"submitted")
    else:
        job_id = ray.get(supervisor.submit.remote())
        console.log(f"pretrain: submitted job {job_id} ({job.cluster.executor} executor, {job.world_size} ranks); "
                    f"logs in {paths.submitit_dir}")
    if detach:
        return {"state": "SUBMITTED", "job_id": job_id, "detached": True}
    status = follow_training(job, paths, supervisor, job_id, "pretrain")
    console.log(f"pretrain: done at step {status['step']}, {status['restarts']} restarts, "
                f"{status['lost_steps']} steps lost, {status['commits']} commits, first step after "
                f"{status['first_step_s']} s")
    return status


def export_stage(job: JobConfig, paths: RunPaths, profile: ProfileConfig) -> Path:
    from cratescale.engine.model_build import build_model

    commit = CheckpointStore(paths.checkpoints).latest()
    if commit is None:
        raise StageError(f"export: no committed checkpoint in {paths.checkpoints}")
    if holds_commit(paths.export, commit):
        console.log(f"export: step {commit.step} is already exported to {paths.export}, skipping")
        return paths.export
    with library_output(paths.run_dir):  # zero_to_fp32 prints and draws a bar: into logs/launcher.log
        found = consolidate(commit)
    model = build_model(job)
    model.load_state_dict(found.state_dict)
    provenance = {"run": job.name, "step": commit.step, "config_hash": commit.meta.get("config_hash"),
                  "time": time.time(), "checkpoint": str(commit.path), **training_provenance(found)}
    export_weights(model.state_dict(), model.config, provenance, paths.export, overwrite=True)  # history kept
    _save_reconstructions(job, paths, model)
    console.log(f"export: step {commit.step} ({found.precision} run, fp32 master weights) -> {paths.export}")
    return paths.export


def _save_reconstructions(job: JobConfig, paths: RunPaths, model: Any) -> None:
    from cratescale.evaluation.plots import plot_reconstructions
    from cratescale.evaluation.report import diagnostic_batch

    images = diagnostic_batch(paths.manifest, 8, job.data.image_size, loader_kind=job.data.loader)
    plot_reconstructions(model, images, paths.export / "reconstructions.png", seed=job.seed)


def extract_stage(job: JobConfig, paths: RunPaths, profile: ProfileConfig) -> None:
    with native_lines_to_log(paths.run_dir):  # Ray's core worker line at each extraction pool start
        run_extract(job, paths)


def evaluate_stage(job: JobConfig, paths: RunPaths, profile: ProfileConfig) -> None:
    run_evaluate(job, paths)


STAGES: dict[str, Callable[..., Any]] = {"ingest": ingest_stage, "pretrain": pretrain_stage, "export": export_stage,
                                         "finetune": finetune_stage, "extract": extract_stage,
                                         "evaluate": evaluate_stage}
