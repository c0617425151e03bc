"""One preflight for `--dry-run` and the launch: everything that can be checked before Ray or SLURM start.

The dry-run prints the plan and then every problem found; the launch stops at the first. Both exit 2, so a
dry-run that passes means the launch will not be refused for any of these reasons.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from cratescale.config import ConfigError, JobConfig, ProfileConfig, RunPaths, identity_change, job_identity
from cratescale.launch.datacheck import job_ingest_settings

CWD_NOTE = "relative paths resolve against the directory the launcher runs in"


def _where(given: str, resolved: Path | str) -> str:
    """The path as resolved, and why, when the job or command line gave it relative."""
    if "://" in str(given) or Path(os.path.expanduser(given)).is_absolute():
        return str(resolved)
    return f"{resolved} ({given!r}: {CWD_NOTE}, {os.getcwd()})"


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


def _check_creatable(field: str, path: Path, given: str) -> None:
    existing = next((p for p in [path, *path.parents] if p.exists()), None)
    if existing is None or not existing.is_dir() or not os.access(existing, os.W_OK):
        raise ConfigError(f"{field}: {_where(given, path)} cannot be created ({existing} is not a writable "
                          f"directory)")


class Preflight:
    """The checks of one job, given the paths as the job file and the command line wrote them (`given`)."""

    def __init__(self, job: JobConfig, profile: ProfileConfig, paths: RunPaths, stages: list[str],
                 given: dict[str, str]) -> None:
        from data_pipeline.manifest import manifest_action

        self.job, self.profile, self.paths, self.stages, self.given = job, profile, paths, stages, given
        self.manifest, self.manifest_why = manifest_action(paths.manifest, job.data.source, paths.data_root,
                                                           job_ingest_settings(job))

    def checks(self) -> list[Callable[[], None]]:
        return [lambda: check_profile_fit(self.job, self.profile), self.data_source, self.weights,
                self.transfer_sets, self.writable, self.resume_identity, self.slurm_request]

    def problems(self) -> list[str]:
        """Every problem, one line each (the dry-run lists them all)."""
        found = []
        for check in self.checks():
            try:
                check()
            except ConfigError as err:
                found.append(str(err))
        return found

    def data_source(self) -> None:
        source = self.job.data.source
        if "ingest" in self.stages and self.manifest == "build" and "://" not in source \
                and not Path(source).exists():
            raise ConfigError(f"data.source: {_where(self.given['data.source'], source)} does not exist")
        if "ingest" not in self.stages and "pretrain" in self.stages and self.manifest != "keep":
            raise ConfigError(f"data.root: {self.manifest_why}, and the ingest stage is not in the job")

    def weights(self) -> None:
        weights = self.job.checkpoint.start_fresh_from_weights
        if "pretrain" in self.stages and weights and not (Path(weights) / "export.json").is_file():
            raise ConfigError(f"checkpoint.start_fresh_from_weights: {_where(weights, Path(weights).resolve())} is "
                              f"not an export (no export.json)")

    def transfer_sets(self) -> None:
        if "extract" not in self.stages:
            return
        missing = [f"extract.datasets.{i}.source: {_where(ds.source, Path(ds.source).expanduser().resolve())}"
                   for i, ds in enumerate(self.job.extract.datasets)
                   if "://" not in ds.source and not Path(ds.source).expanduser().exists()]
        if missing:
            raise ConfigError(f"{'; '.join(missing)} {'does' if len(missing) == 1 else 'do'} not exist")

    def writable(self) -> None:
        _check_creatable("run_dir", self.paths.run_dir, self.given["run_dir"])
        if "ingest" in self.stages and self.manifest != "keep":
            _check_creatable("data.root", self.paths.data_root, self.given["data.root"])

    def resume_identity(self) -> None:
        """The ranks' own rule (engine/state.py), applied to the newest commit's record before anything is queued:
        another seed, model or global batch is refused here, not after a queue wait. The commit's files are
        verified by the ranks (a damaged newest commit is passed over there, and the older one may differ)."""
        from cratescale.checkpoint import CheckpointStore
        from data_pipeline.manifest import manifest_fingerprint

        if "pretrain" not in self.stages:
            return
        store = CheckpointStore(self.paths.checkpoints)
        newest = store.newest_first()
        if not newest:
            return
        try:
            commit = store.load(newest[0])
        except (OSError, ValueError):
            return  # unreadable record: the ranks pass over it (or stop with their own line)
        batch = commit.meta.get("global_batch")
        if batch != self.job.schedule.global_batch:
            raise ConfigError(f"schedule.global_batch: {self.job.schedule.global_batch}, but {commit.path} was saved "
                              f"with {batch}; the data order would change. Start fresh from its weights "
                              f"(checkpoint.start_fresh_from_weights=PATH) in a new run_dir")
        if self.job.checkpoint.allow_config_change:
            return
        saved = commit.meta.get("identity") or {}
        # A manifest still to be (re)built has no fingerprint yet: its fields are compared, the ranks check the rest.
        content = manifest_fingerprint(self.paths.manifest) if self.manifest in ("keep", "rebase") \
            else saved.get("manifest")
        why = identity_change(commit.meta, job_identity(self.job, content))
        if why is not None:
            raise ConfigError(f"run_dir: {commit.path}: {why}. Use checkpoint.allow_config_change=true to continue "
                              f"anyway, or start a new run_dir")

    def slurm_request(self) -> None:
        if self.job.cluster.executor != "slurm" or "pretrain" not in self.stages:
            return
        from cratescale.launch.executors import slurm_parameters
        from cratescale.launch.slurm_tools import SlurmError, validate_request

        slurm_parameters(self.job, self.profile)  # raises ConfigError on a profile that cannot go into sbatch
        partition = self.job.cluster.partition or self.profile.partition
        try:
            validate_request(partition, self.job.cluster.nodes, self.job.cluster.tasks_per_node,
                             self.profile.cpus_per_task, self.profile.gpus_per_node)
        except SlurmError as err:  # no SLURM here: the launch could not submit either
            raise ConfigError(f"cluster: partition {partition!r} not checked: {err}") from None
        except ValueError as err:
            raise ConfigError(f"cluster: {err}") from None


def preflight(job: JobConfig, profile: ProfileConfig, paths: RunPaths, stages: list[str],
              given: dict[str, str] | None = None) -> None:
    """The launch: the first problem, as one line (ConfigError, exit 2)."""
    given = given or {"run_dir": job.run_dir, "data.source": job.data.source, "data.root": str(paths.data_root)}
    if problems := Preflight(job, profile, paths, stages, given).problems():
        raise ConfigError(problems[0])
