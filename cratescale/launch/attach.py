"""A run's live training job, read from launch.json: a second launch of the run follows it instead of submitting
another (issue 28 item 2). The launcher is a window on the job, not its owner."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cratescale.config import ConfigError, RunPaths
from cratescale.launch.slurm_tools import SlurmError, queue_state

_LIVE = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "SUSPENDED",
         "RESIZING", "SIGNALING", "STAGE_OUT"}


@dataclass
class LiveJob:
    job_id: str
    executor: str
    state: str
    record: dict[str, Any]  # launch.json as the launcher that submitted it left it


def launch_record(paths: RunPaths) -> dict[str, Any] | None:
    try:
        return json.loads(paths.launch_state.read_text())
    except (OSError, ValueError):
        return None


def _local_alive(pid: str) -> bool:
    """submitit's local job id is its controller's pid: alive and still submitit's (not a reused pid)."""
    try:
        os.kill(int(pid), 0)
        return b"submitit" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return False


def live_job(paths: RunPaths) -> LiveJob | None:
    """The run's newest job when SLURM (or this machine, for the local executor) still has it, else None."""
    record = launch_record(paths)
    if not record or not record.get("job_ids"):
        return None
    job_id, executor = str(record["job_ids"][-1]), record.get("executor", "local")
    if executor == "local":
        return LiveJob(job_id, executor, "RUNNING", record) if _local_alive(job_id) else None
    try:
        queued = queue_state(job_id)
    except SlurmError:
        return None  # no SLURM here (a run dir copied off its cluster): nothing to attach to
    state = queued[0] if queued else None
    return LiveJob(job_id, executor, state, record) if state in _LIVE else None


def check_attachable(live: LiveJob, paths: RunPaths, config_text: str) -> None:
    """A live job trains with the run's saved config: a launch that asks for something else is refused (its
    config would replace the one the job rereads at its next restart)."""
    if live.executor == "local":
        raise ConfigError(f"run_dir: {paths.run_dir} is being trained by local job {live.job_id} of another "
                          f"launcher on this machine; wait for it to end (local jobs cannot be attached to)")
    saved = paths.config.read_text() if paths.config.exists() else None
    if saved is not None and saved != config_text:
        raise ConfigError(f"run_dir: {paths.run_dir} is being trained by SLURM job {live.job_id} ({live.state}) "
                          f"with its saved config.yaml, and this launch asks for another; attach with "
                          f"`python -m cratescale.launch attach {paths.run_dir}`, or cancel the job first")
