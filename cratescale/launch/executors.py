"""submitit executors: local processes here, SLURM on a cluster; the same TrainTask either way."""
from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import submitit

from cratescale.compat.submitit import range_executor_class, sbatch_text, with_node_range
from cratescale.config import ConfigError, JobConfig, ProfileConfig
from cratescale.launch.recover import batch_lines


_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def time_limit_min(job: JobConfig, profile: ProfileConfig) -> int:
    """The job's time limit, the same for the local and the SLURM executor: `cluster.time_min`, else the profile's."""
    return job.cluster.time_min or profile.time_min


def slurm_parameters(job: JobConfig, profile: ProfileConfig, nodes: int | None = None) -> dict[str, Any]:
    """sbatch parameters (submitit.SlurmExecutor names) for the job on this profile; `nodes`: the count this
    submission runs on (a restart after a lost node: fewer than cluster.nodes)."""
    # Values are shell-quoted below; a name cannot be quoted in `export NAME=...`, so it must be a plain one.
    bad = [key for key in profile.env if not _ENV_NAME.match(key)]
    if bad:
        raise ConfigError(f"cluster.profile: {profile.name!r} env name {bad[0]!r} is not a shell variable name")
    params: dict[str, Any] = {
        "job_name": job.name,
        "nodes": nodes or job.cluster.nodes,
        "ntasks_per_node": job.cluster.tasks_per_node,
        "cpus_per_task": profile.cpus_per_task,
        "time": time_limit_min(job, profile),
        "partition": job.cluster.partition or profile.partition,
        "signal_delay_s": profile.signal_lead_s,
        "setup": [f"export {key}={shlex.quote(value)}" for key, value in sorted(profile.env.items())],
    }
    params["setup"] += batch_lines(job)  # a failed step is retried in the allocation, a lost node shrinks it (issue 28)
    params["additional_parameters"] = {"requeue": True}  # SLURM's own requeue after NODE_FAIL and preemption
    if profile.gpus_per_node:  # ranks stop at start-up when they see no CUDA (distributed/device.py)
        params["setup"].append(f"export CRATESCALE_EXPECT_GPUS={profile.gpus_per_node}")
    optional = {"gpus_per_node": profile.gpus_per_node or None, "account": profile.account, "qos": profile.qos,
                "constraint": profile.constraint, "mem": f"{int(profile.mem_gb)}GB" if profile.mem_gb else None}
    params.update({key: value for key, value in optional.items() if value is not None})
    return params


def make_executor(job: JobConfig, profile: ProfileConfig, folder: Path, nodes: int | None = None) -> submitit.Executor:
    if job.cluster.executor == "local":
        executor = submitit.LocalExecutor(folder=str(folder))
        executor.update_parameters(tasks_per_node=job.world_size, timeout_min=time_limit_min(job, profile),
                                   name=job.name)
        return executor
    # max_num_timeout bounds how many USR2 stops submitit tolerates; our own requeue path counts separately.
    executor = range_executor_class()(folder=str(folder), max_num_timeout=job.cluster.max_requeues)
    executor.update_parameters(**slurm_parameters(job, profile, nodes))
    executor.node_range = node_range(job, nodes)
    return executor


def node_range(job: JobConfig, nodes: int | None = None) -> tuple[int, int, int]:
    """(min, max, tasks per node) of the allocation: cluster.min_nodes to the count asked (cluster.nodes)."""
    top = nodes or job.cluster.nodes
    return min(job.cluster.min_nodes, top), top, job.cluster.tasks_per_node


def sbatch_script(job: JobConfig, profile: ProfileConfig, folder: Path) -> str:
    """The sbatch file submitit would write for this job (shown by --dry-run; nothing is submitted)."""
    return with_node_range(sbatch_text(folder, slurm_parameters(job, profile)), *node_range(job))
