"""Following a submitted training run to its end from the launcher (pretraining and each fine-tune run): the
progress display, Ctrl-C (cancel or detach), and the one-line failure with the failing rank's reason."""
from __future__ import annotations

import sys
from typing import Any

import ray

from cratescale.config import JobConfig, RunPaths
from cratescale.launch.display import StageError, TrainingDisplay, console
from cratescale.launch.supervisor import follow


def follow_training(job: JobConfig, paths: RunPaths, supervisor: Any, job_id: str, label: str) -> dict[str, Any]:
    """Follows the supervisor's job until it ends; a job that did not complete its schedule is a StageError naming
    `label` (the stage, or the fine-tune run)."""
    try:
        with TrainingDisplay(console, bar=job.logging.progress) as display:
            status = follow(supervisor, display.update)
    except KeyboardInterrupt:
        if _ask_cancel():
            ray.get(supervisor.cancel.remote())
            raise StageError(f"{label}: job {job_id} cancelled") from None
        console.log(f"detached from job {job_id}; follow it again with: python -m cratescale.launch attach "
                    f"{paths.run_dir}")
        raise SystemExit(0) from None
    if status["state"] != "COMPLETED" or not status["finished"]:
        raise StageError(failure_message(status, ray.get(supervisor.error.remote()), paths, label))
    return status


def failure_message(status: dict[str, Any], failure: dict[str, Any] | None, paths: RunPaths,
                    label: str = "pretrain") -> str:
    """How the job ended, where its logs are, and under that the failing rank's own last error line."""
    head = f"{label}: job {status['job_id']} ended {status['state']}"
    if failure is None:
        return f"{head} (logs: {paths.submitit_dir})"
    why = ", not retried: the same config and data fail the same way" if failure["deterministic"] else ""
    return f"{head}{why} (logs: {failure['log'] or paths.submitit_dir})\n  rank {failure['rank']}: {failure['line']}"


def _ask_cancel() -> bool:
    if not sys.stdin.isatty():
        return False  # a batch terminal detaches by default
    answer = input("\ncancel the training job? [y/N] (N detaches) ").strip().lower()
    return answer in ("y", "yes")
