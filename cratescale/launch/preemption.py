"""Preemption: signal handlers only set a flag; the engine agrees on it at a step boundary and saves."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from types import FrameType


class PreemptionFlag:
    """USR2 (SLURM's `--signal=USR2@lead`, preemption with preempt_send_user_signal) and SIGTERM set it."""

    def __init__(self, signals: tuple[int, ...] = (signal.SIGUSR2, signal.SIGTERM)) -> None:
        self.signum: int | None = None
        for sig in signals:
            # Replaces submitit's USR2 handler: it checkpoints on rank 0 only, inside the handler; a
            # sharded ZeRO save needs every rank, at a step boundary.
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is None:
            self.signum = signum
            print(f"[cratescale] received {signal.Signals(signum).name}: stopping at the next step boundary",
                  file=sys.stderr, flush=True)

    def __call__(self) -> bool:
        return self.signum is not None


def requeue_slurm_job() -> bool:
    """Rank 0 requeues its own SLURM job (same id); the restarted job resumes from the newest commit."""
    job_id = os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID") and \
        f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    job_id = job_id or os.environ.get("SLURM_JOB_ID")
    if not job_id:
        return False
    result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True)
    if result.returncode != 0:
        # Preemption with PreemptMode=REQUEUE requeues the job by itself; scontrol then refuses.
        print(f"[cratescale] scontrol requeue {job_id}: {result.stderr.strip()}", file=sys.stderr, flush=True)
    return result.returncode == 0
