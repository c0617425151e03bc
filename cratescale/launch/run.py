"""The launcher: validate everything first, then start (or join) Ray and run the job's stages in order."""
from __future__ import annotations

import sys
from pathlib import Path

from cratescale.config import (ConfigError, JobConfig, ProfileConfig, RunPaths, dump_job, job_warnings, job_yaml,
                               load_job, load_profile)
from cratescale.launch.array import expand_array, pretrain_array, write_members
from cratescale.launch.datacheck import check_data
from cratescale.launch.display import StageError, console
from cratescale.launch.attach import check_attachable, live_job
from cratescale.launch.failures import clear_stage_failure, record_stage_failure
from cratescale.launch.followups import compare_members
from cratescale.launch.order import check_stage_order
from cratescale.launch.preflight import Preflight, check_model, check_profile_fit, preflight
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


def dry_run_report(job: JobConfig, profile: ProfileConfig, paths: RunPaths, stages: list[str],
                   given: dict[str, str]) -> int:
    """The plan, then every problem the launch's preflight would stop at: exit 2 when there is one."""
    from cratescale.launch.plan import render_plan

    check_profile_fit(job, profile)  # a world the profile cannot hold has no plan to print
    print(render_plan(job, profile, paths))
    problems = Preflight(job, profile, paths, stages, given).problems()
    if problems:
        print(f"preflight: {len(problems)} problem(s); the launch would stop at the first", file=sys.stderr)
        for problem in problems:
            print(f"error: {problem}", file=sys.stderr)
    return 2 if problems else 0


def launch(job_path: str, overrides: list[str], dry_run: bool = False, stages: str | None = None,
           print_config: bool = False, detach: bool = False) -> int:
    job = load_job(job_path, overrides)
    given = {"run_dir": job.run_dir, "data.source": job.data.source, "data.root": job.data.root or job.run_dir}
    job, paths = resolve(job)
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
    if dry_run:
        return dry_run_report(job, profile, paths, chosen, given)
    preflight(job, profile, paths, chosen, given)
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
                    console.log(f"{stage}: array member {member.name} ({member_paths.run_dir})")
                    STAGES[stage](member, member_paths, profile)
                if stage == "evaluate":
                    compare_members(members, paths)
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
