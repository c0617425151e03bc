"""The Ray supervisor actor: submits the training through submitit and follows it to the end.

Training ranks never depend on Ray: the actor only submits, polls and resubmits. On SLURM the job requeues
itself under the same id; with the local executor the supervisor resubmits after a preemption or a crash.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import ray

from cratescale.checkpoint import CheckpointStore
from cratescale.config import RunPaths, dump_job, load_job, load_profile
from cratescale.distributed.rendezvous import free_port
from cratescale.files import replace_durable
from cratescale.launch.entry import TrainTask
from cratescale.launch.executors import make_executor
from cratescale.launch.failures import RankFailure, classify_failure, clear_failures, job_failure, may_retry
from cratescale.launch.progress import RunProgress

_DONE = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "DEADLINE", "BOOT_FAIL"}
# Ends that a resubmission may cure (kill -9, OOM killer, a lost node, a save that outlived the time limit).
# CANCELLED is someone's decision: never resubmitted.
_CRASHED = {"FAILED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL"}


def next_attempt(checkpoints: Path, submitted: int) -> int:
    """The attempt number of the next submission: above every earlier one, this launcher's (`submitted` so far)
    and an earlier launcher's (the run's claim). A job of an older attempt that still runs (ranks on a
    partitioned node, SLURM's own requeue of a job we replaced) is then refused at its claim and at every
    commit (checkpoint.commit, incarnations)."""
    claim = CheckpointStore(checkpoints).claim()
    return max(submitted, claim.get("attempt", 0) + 1 if claim else 0)


@ray.remote(num_cpus=0)
class Supervisor:
    def __init__(self, config_path: str, manifest: str) -> None:
        self.job = load_job(config_path)
        self.paths = RunPaths.of(self.job)
        self.profile = load_profile(self.job.cluster.profile)
        self.task = TrainTask(config_path, manifest, self.profile.peak_flops_per_gpu,
                              expect_gpus=self.profile.gpus_per_node)
        self.submitit_job = None
        self.submissions: list[str] = []
        self.resubmits = 0
        self.stalled = 0
        self.progress = RunProgress(self.paths.run_dir)
        self.step_at_submit = 0
        self.failure: RankFailure | None = None
        self.node_failures = 0

    def submit(self) -> str:
        executor = make_executor(self.job, self.profile, self.paths.submitit_dir / "%j")
        clear_failures(self.paths.run_dir)
        self.failure = None
        self.step_at_submit = self.progress.update()["step"]
        if self.job.cluster.executor == "local":
            self.task.master_port = free_port()
        self.task.attempt = next_attempt(self.paths.checkpoints, len(self.submissions))
        self.submitit_job = executor.submit(self.task)
        self.submissions.append(str(self.submitit_job.job_id))
        self._save_state()
        return str(self.submitit_job.job_id)

    def _save_state(self) -> None:
        state = {"executor": self.job.cluster.executor, "job_ids": self.submissions, "resubmits": self.resubmits,
                 "node_failures": self.node_failures, "nodes": self.job.cluster.nodes,
                 "submitit_dir": str(self.paths.submitit_dir)}
        replace_durable(self.paths.launch_state, json.dumps(state, indent=1))

    def _state(self) -> str:
        job = self.submitit_job
        if job is None:
            return "UNSUBMITTED"
        if self.job.cluster.executor == "local":
            if self._some_rank_failed():
                job.cancel(check=False)  # the other ranks would wait for the dead one until the timeout
                return "FAILED"
            return "COMPLETED" if job.done() and self._result_ok() else ("FAILED" if job.done() else "RUNNING")
        try:
            return str(job.get_info(mode="force").get("State", "UNKNOWN")).split()[0]
        except Exception:  # noqa: BLE001 - sacct hiccups: report, poll again
            return "UNKNOWN"

    def _some_rank_failed(self) -> bool:
        for rank in range(self.job.world_size):
            task = self.submitit_job.task(rank)
            if task.done() and task.exception() is not None:
                return True
        return False

    def _result_ok(self) -> bool:
        try:
            self.submitit_job.results()
            return True
        except Exception:  # noqa: BLE001
            return False

    def poll(self) -> dict[str, Any]:
        state = self._state()
        summary = self.progress.update()
        if state not in ("RUNNING", "COMPLETED", "UNSUBMITTED") and self._lost_a_node():
            state = self._resume_on_nodes_left(summary)
        elif state in _CRASHED and not self._old_job_gone():
            state = "COMPLETING"  # look again at the next poll
        elif state in _CRASHED and self._may_resubmit(summary):
            # SLURM requeues a job that stops on a signal under the same id; a job that died (kill -9 of its
            # ranks, a crash) ends here instead and gets a new one.
            self.resubmits += 1
            self.submit()
            state = "REQUEUED"
        return {"state": state, "job_id": self.submissions[-1] if self.submissions else None,
                "done": state in _DONE, "requeues": self.resubmits, "node_failures": self.node_failures,
                "nodes": self.job.cluster.nodes, **summary}

    def _old_job_gone(self) -> bool:
        """Never two jobs on one run_dir: SLURM must have finished the old one (sacct can run ahead of it)."""
        if self.job.cluster.executor != "slurm":
            return True
        from cratescale.launch.slurm_tools import SlurmError, job_info

        try:
            info = job_info(self.submitit_job.job_id)
        except SlurmError:
            return False
        if info.get("JobState") in ("PENDING", "RUNNING", "REQUEUED", "SUSPENDED"):
            self.submitit_job.cancel(check=False)  # sacct said it ended, SLURM has it again: ours now
            return False
        return not info or info.get("JobState") in _DONE

    def _lost_a_node(self) -> bool:
        """SLURM ended the job NODE_FAIL. It requeues such a job itself, for the full node count, and then
        submitit (and plain sacct) report PENDING or a final NODE_FAIL (SLURM_MULTINODE.md pitfall 13): ask
        sacct for the job's whole history instead."""
        if self.job.cluster.executor != "slurm":
            return False
        from cratescale.launch.slurm_tools import SlurmError, job_history

        try:
            return "NODE_FAIL" in job_history(self.submitit_job.job_id)
        except SlurmError:
            return False

    def _resume_on_nodes_left(self, summary: dict[str, Any]) -> str:
        """Take over a job that lost a node: cancel SLURM's requeue (it would wait for the dead node) and
        resubmit on the nodes that are left. The run resumes elastically from its newest commit: same global
        batch and sample sequence on fewer ranks."""
        from cratescale.launch.slurm_tools import SlurmError, job_info, usable_nodes

        waiting = ("PENDING", "RUNNING", "REQUEUED", "SUSPENDED", "CONFIGURING")
        try:
            if job_info(self.submitit_job.job_id).get("JobState") in waiting:
                self.submitit_job.cancel(check=False)
                return "COMPLETING"  # resubmit once SLURM has let go of it (next poll)
            left = usable_nodes(self.job.cluster.partition or self.profile.partition)
        except SlurmError:
            return "COMPLETING"  # sacct/scontrol hiccup: look again at the next poll
        if summary["finished"] or self.resubmits >= self.job.cluster.max_requeues:
            return "NODE_FAIL"
        if left < 1:
            return "PENDING"  # no node to run on: wait for one to come back
        self.job.cluster.nodes = min(self.job.cluster.nodes, left)
        dump_job(self.job, self.paths.config)  # the run's record says what it runs on now
        self.node_failures += 1
        self.resubmits += 1
        self.submit()
        return "REQUEUED"

    def _may_resubmit(self, summary: dict[str, Any]) -> bool:
        # Resubmit after a preemption or a transient crash, as SLURM's requeue would; never after an error
        # that the same config and data repeat (the console gets that rank's reason instead).
        if summary["finished"]:
            return False
        self.failure = job_failure(self.paths.run_dir, self.submitit_job, self.job.world_size)
        retry, self.stalled = may_retry(classify_failure(self.failure), summary["step"] > self.step_at_submit,
                                        self.stalled, self.resubmits, self.job.cluster.max_requeues)
        return retry

    def error(self) -> dict[str, Any] | None:
        """The failing rank's reason (rank, line, deterministic, log), once the job ended without success."""
        if self.submitit_job is None:
            return None
        failure = self.failure or job_failure(self.paths.run_dir, self.submitit_job, self.job.world_size)
        return asdict(failure) if failure else None

    def cancel(self) -> None:
        if self.submitit_job is not None:
            self.submitit_job.cancel(check=False)


def follow(supervisor: Any, on_update: Any, interval_s: float = 1.0) -> dict[str, Any]:
    """Polls until the job is done; on_update(status) draws progress."""
    while True:
        status = ray.get(supervisor.poll.remote())
        on_update(status)
        if status["done"]:
            return status
        time.sleep(interval_s)
