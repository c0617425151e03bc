"""The launcher: validate everything first, then start (or join) Ray and run the job's stages in order."""
from __future__ import annotations

import os
from pathlib import Path

from cratescale.config import (ConfigError, JobConfig, ProfileConfig, RunPaths, dump_job, job_warnings, job_yaml,
                               load_job, load_profile)
from cratescale.launch.array import expand_array, pretrain_array, write_members
from cratescale.launch.datacheck import check_data, job_ingest_settings
from cratescale.launch.display import StageError, console
from cratescale.launch.attach import check_attachable, live_job
from cratescale.launch.failures import clear_stage_failure, record_stage_failure
from cratescale.launch.order import check_stage_order
from cratescale.launch.quiet import route_library_logs
from cratescale.launch.stages import STAGES
from data_pipeline.local_ray import start_or_join_ray as start_ray  # joins $RAY_ADDRESS inside an allocation


def resolve(job: JobConfig) -> tuple[JobConfig, RunPaths]:
    """Absolute paths everywhere: ranks and Ray workers may start in another directory."""
    paths = RunPaths.of(job)
    job.run_dir = str(paths.run_dir)
    job.data.root = str(paths.data_root)
    if "://" not in job.data.source:
        job.data.source = str(Path(job.data.source).expanduser().resolve())
    return job, paths


def check_profile_fit(job: JobConfig, profile: ProfileConfig) -> None:
    if job.cluster.nodes > profile.max_nodes:
        raise ConfigError(f"cluster.nodes: {job.cluster.nodes} nodes asked, profile {profile.name!r} allows "
                          f"{profile.max_nodes}")
    if job.cluster.executor == "slurm" and profile.scheduler != "slurm":
        raise ConfigError(f"cluster.profile: {profile.name!r} is not a SLURM profile (scheduler: {profile.scheduler})")


def check_model(job: JobConfig) -> None:
    """The job's model builds (on the meta device: no memory, no time) and takes the data's image size."""
    import torch

    from cratescale.engine.model_build import build_model

    try:
        with torch.device("meta"):
            model = build_model(job)
    except (ValueError, TypeError) as err:  # ModelConfigError: unknown name or setting, bad sizes
        raise ConfigError(f"model: {err}") from None
    if model.img_size != job.data.image_size:
        raise ConfigError(f"data.image_size: {job.data.image_size}, but {job.model.name} takes {model.img_size} px "
                          f"images (model.overrides.img_size)")


def _check_creatable(field: str, path: Path) -> None:
    existing = next((p for p in [path, *path.parents] if p.exists()), None)
    if existing is None or not existing.is_dir() or not os.access(existing, os.W_OK):
        raise ConfigError(f"{field}: {path} cannot be created ({existing} is not a writable directory)")


def preflight(job: JobConfig, profile: ProfileConfig, paths: RunPaths, stages: list[str]) -> None:
    """Everything that can be checked before anything is started or queued."""
    check_profile_fit(job, profile)
    from data_pipeline.manifest import manifest_action

    manifest, why = manifest_action(paths.manifest, job.data.source, paths.data_root, job_ingest_settings(job))
    if "ingest" in stages and manifest == "build" and "://" not in job.data.source \
            and not Path(job.data.source).exists():
        raise ConfigError(f"data.source: {job.data.source} does not exist")
    if "ingest" not in stages and "pretrain" in stages and manifest != "keep":
        raise ConfigError(f"data.root: {why}, and the ingest stage is not in the job")
    weights = job.checkpoint.start_fresh_from_weights
    if "pretrain" in stages and weights and not (Path(weights) / "export.json").is_file():
        raise ConfigError(f"checkpoint.start_fresh_from_weights: {weights} is not an export (no export.json)")
    if "extract" in stages:
        for i, ds in enumerate(job.extract.datasets):
            if "://" not in ds.source and not Path(ds.source).expanduser().exists():
                raise ConfigError(f"extract.datasets.{i}.source: {ds.source} does not exist")
    _check_creatable("run_dir", paths.run_dir)
    if "ingest" in stages and manifest != "keep":
        _check_creatable("data.root", paths.data_root)
    if job.cluster.executor == "slurm" and "pretrain" in stages:
        from cratescale.launch.executors import slurm_parameters

        slurm_parameters(job, profile)  # raises ConfigError on a profile that cannot go into the sbatch file
        from cratescale.launch.slurm_tools import validate_request

        try:
            validate_request(job.cluster.partition or profile.partition, job.cluster.nodes,
                             job.cluster.tasks_per_node, profile.cpus_per_task, profile.gpus_per_node)
        except ValueError as err:
            raise ConfigError(f"cluster: {err}") from None


def launch(job_path: str, overrides: list[str], dry_run: bool = False, stages: str | None = None,
           print_config: bool = False, detach: bool = False) -> int:
    job, paths = resolve(load_job(job_path, overrides))
    if print_config:
        print(job_yaml(job), end="")
        return 0
    profile = load_profile(job.cluster.profile)
    for warning in job_warnings(job):
        console.print(f"warning: {warning}", style="yellow", markup=False, highlight=False, soft_wrap=True)
    chosen = [s for s in job.stages if stages is None or s in stages.split(",")]
    if stages and (unknown := set(stages.split(",")) - set(STAGES)):
        raise ConfigError(f"--stages: unknown stage(s) {sorted(unknown)}; known: {list(STAGES)}")
    if stages and (outside := [s for s in stages.split(",") if s not in job.stages]):
        # Before: they were left out silently and the launch ran nothing.
        raise ConfigError(f"--stages: {','.join(outside)} not among the job's stages {list(job.stages)} "
                          f"(the job's `stages` field)")
    check_model(job)
    if dry_run:  # at target scale, away from the cluster: its paths and partitions are not checked here
        check_profile_fit(job, profile)
        from cratescale.launch.plan import render_plan

        print(render_plan(job, profile, paths))
        return 0
    preflight(job, profile, paths, chosen)
    check_stage_order(job, paths, chosen)
    live = live_job(paths) if "pretrain" in chosen else None
    if live is not None:
        check_attachable(live, paths, job_yaml(job))
    members = expand_array(job, paths) if job.cluster.array else []
    try:
        paths.run_dir.mkdir(parents=True, exist_ok=True)
        dump_job(job, paths.config)
        write_members(members)
    except OSError as err:  # e.g. root passes os.access where the file system still refuses
        raise ConfigError(f"run_dir: {paths.run_dir} cannot be created: {err.strerror or err}") from None
    route_library_logs(paths.run_dir)  # Ray's, Ray Data's and DeepSpeed's own lines: logs/launcher.log
    start_ray(job.cluster.ray_address)
    data_checked = False
    for stage in chosen:
        if stage != "ingest" and not data_checked:  # after ingest, before anything is queued (ConfigError: exit 2)
            check_data(job, paths, chosen)
            data_checked = True
        console.rule(f"[bold]{stage}")
        try:
            if members and stage == "pretrain":
                pretrain_array(members)
            elif members and stage != "ingest":  # the data is shared; the rest is per member
                for member, member_paths in members:
                    STAGES[stage](member, member_paths, profile)
            elif stage == "pretrain":
                if (STAGES[stage](job, paths, profile, live=live, detach=detach) or {}).get("detached"):
                    later = chosen[chosen.index(stage) + 1:]
                    console.log(f"detached: {', '.join(later) or 'nothing'} left to run; the job goes on without "
                                f"this launcher. Follow it (and run the rest): python -m cratescale.launch attach "
                                f"{paths.run_dir}")
                    return 0
            else:
                STAGES[stage](job, paths, profile)
        except StageError as err:
            # One line per fact, never re-wrapped at the terminal width, brackets in messages taken literally.
            console.print(f"error: {err}", style="red", markup=False, highlight=False, soft_wrap=True)
            record_stage_failure(paths.run_dir, stage, str(err))  # for `status`, after this console is gone
            return 1
        clear_stage_failure(paths.run_dir, stage)
    console.rule(f"done: {paths.run_dir}")
    return 0
