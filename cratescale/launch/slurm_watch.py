"""What SLURM says of one job, asked at most once every `period_s` (cluster.slurm_poll_s, 30 s by default).

Following a weeks-long run must not load the controller or slurmdbd: squeue while the job is in the queue (the
controller's memory), sacct only once it left it (in the same round as the squeue that found it gone: the end is
known at once), or once when a job that ran is pending again (a requeue: after a preemption, or SLURM's own after a
lost node, which only the job's history tells apart). Between two rounds the last answer stands; the run directory
(metrics, commits) is what a follower reads every second.
"""
from __future__ import annotations

import time
from typing import Callable

from cratescale.launch.slurm_tools import SlurmError, job_history, queue_state

# squeue's states of a job that has ended (it keeps them for MinJobAge): the end itself comes from sacct.
# (PREEMPTED is not here: a preempted job with --requeue is queued again.)
# Why a pending job waits when SLURM requeued it: held after the requeue, or waiting for a node that went down.
_REQUEUED_REASONS = ("BeginTime", "ReqNodeNotAvail", "NodeDown", "are DOWN")
_ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "DEADLINE", "BOOT_FAIL"}


class SlurmWatch:
    def __init__(self, job_id: str, period_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.job_id, self.period_s, self.clock = str(job_id), period_s, clock
        self.asked_at: list[float] = []  # when each round of questions was asked (clock seconds)
        self.state = "PENDING"
        self.history: list[str] = []  # every recorded state, oldest first (sacct -D), once asked
        self.left_queue = False
        self._ran = False  # seen RUNNING since the last history question
        self._ask_history = False

    def poll(self) -> str:
        """The job's state: asks SLURM when the last question is `period_s` old, else the last answer."""
        now = self.clock()
        if self.asked_at and now - self.asked_at[-1] < self.period_s:
            return self.state
        self.asked_at.append(now)
        try:
            if self.left_queue or self._ask_history:
                self._from_history()
            else:
                self._from_queue()
        except SlurmError:
            self.state = "UNKNOWN"  # a hiccup: asked again next period
        return self.state

    def _from_queue(self) -> None:
        queued = queue_state(self.job_id)
        if queued is None or queued[0] in _ENDED:
            self.left_queue = True
            self._from_history()  # its end is sacct's to say
            return
        live, reason = queued
        if live == "RUNNING":
            self._ran = True
        elif live == "PENDING" and (self._ran or any(r in reason for r in _REQUEUED_REASONS)):
            # requeued (seen running, or waiting as only a requeued job does): the next question asks why, even
            # when it ran and lost its node between two questions
            self._ran, self._ask_history = False, not self.lost_a_node
        self.state = live

    def _from_history(self) -> None:
        self._ask_history = False
        self.history = job_history(self.job_id)
        if self.left_queue:
            # sacct can lag behind the controller: no row yet means ask again next period
            self.state = self.history[-1] if self.history else "COMPLETING"

    @property
    def lost_a_node(self) -> bool:
        """SLURM ended a run of this job NODE_FAIL (it may have requeued it: then it waits for the dead node)."""
        return "NODE_FAIL" in self.history

    @property
    def queries(self) -> int:
        return len(self.asked_at)
