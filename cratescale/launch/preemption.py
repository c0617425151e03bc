"""Preemption: signal handlers only set a flag; the engine agrees on it at a step boundary and saves."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from types import FrameType

# Signals a stopping rank must not die of while `scontrol requeue` runs: the child inherits the blocked mask.
_STOP_SIGNALS = (signal.SIGUSR2, signal.SIGTERM)


class PreemptionFlag:
    """USR2 (SLURM's `--signal=USR2@lead`, preemption with preempt_send_user_signal) and SIGTERM set it."""

    def __init__(self, signals: tuple[int, ...] = _STOP_SIGNALS) -> None:
        self.signum: int | None = None
        self.received: set[int] = set()
        for sig in signals:
            # Replaces submitit's USR2 handler: it checkpoints on rank 0 only, inside the handler; a
            # sharded ZeRO save needs every rank, at a step boundary.
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received.add(signum)
        if self.signum is None:
            self.signum = signum
            print(f"[cratescale] received {signal.Signals(signum).name}: stopping at the next step boundary",
                  file=sys.stderr, flush=True)

    def __call__(self) -> bool:
        return self.signum is not None

    @property
    def wants_requeue(self) -> bool:
        """Whether the job should requeue itself after saving.

        USR2 (time limit, preemption, `scancel --signal=USR2`) asks for it. SIGTERM alone comes from `scancel`
        or an outside `scontrol requeue`: SLURM already decides the job's fate, and a self-requeue would undo a
        user's cancel. A stop agreed from another rank's signal (none here) requeues too.
        """
        return signal.SIGUSR2 in self.received or signal.SIGTERM not in self.received


def _job_cancelled(job_id: str) -> bool:
    """Best effort: sacct says the job was cancelled (a USR2 stop that a user's scancel overtook)."""
    try:
        out = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "State", "-j", job_id], capture_output=True,
                             text=True, timeout=15).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    return out.strip().startswith("CANCELLED")


def requeue_slurm_job(attempts: int = 3) -> bool:
    """Rank 0 requeues its own SLURM job (same id); the restarted job resumes from the newest commit."""
    job_id = os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID") and \
        f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    job_id = job_id or os.environ.get("SLURM_JOB_ID")
    if not job_id:
        return False
    # More USR2/TERM may still arrive (preemption sends both, people signal twice); SLURM signals every process
    # of the step, so without this the `scontrol` child would die of them (default action: terminate).
    signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    if _job_cancelled(job_id):
        print(f"[cratescale] job {job_id} was cancelled: not requeueing", file=sys.stderr, flush=True)
        return False
    for attempt in range(attempts):
        result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True)
        if result.returncode == 0:
            return True
        # Preemption with PreemptMode=REQUEUE requeues the job by itself; scontrol then refuses. Retry only
        # when the controller did not answer.
        print(f"[cratescale] scontrol requeue {job_id}: {result.stderr.strip()}", file=sys.stderr, flush=True)
        if "timed out" not in result.stderr.lower() and "unable to contact" not in result.stderr.lower():
            return False
        time.sleep(1 + attempt)
    return False
