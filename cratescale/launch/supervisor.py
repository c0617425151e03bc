"""The Ray supervisor actor: submits the training through submitit and follows it to the end.

Training ranks never depend on Ray: the actor only submits, polls and resubmits. On SLURM the job recovers by itself
under the same id (its own requeue on preemption, its retries and requeue after a crashed rank, SLURM's requeue
after a lost node onto fewer nodes: launch/recover.py); the supervisor resubmits only a job that ended for good
(and the local executor's, after a preemption or a crash).
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import ray

from cratescale.checkpoint import CheckpointStore
from cratescale.config import RunPaths, load_job, load_profile
from cratescale.distributed.rendezvous import free_port
from cratescale.files import replace_durable
from cratescale.launch.entry import TrainTask
from cratescale.launch.executors import make_executor
from cratescale.launch.failures import RankFailure, classify_failure, clear_failures, job_failure, may_retry
from cratescale.launch.progress import RunProgress
from cratescale.launch.slurm_watch import SlurmWatch

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
    def __init__(self, config_path: str, manifest: str, finetune: dict | None = None) -> None:
        self.job = load_job(config_path)
        self.paths = RunPaths.of(self.job)
        self.profile = load_profile(self.job.cluster.profile)
        self.task = TrainTask(config_path, manifest, self.profile.peak_flops_per_gpu,
                              expect_gpus=self.profile.gpus_per_node, finetune=finetune)
        self.submitit_job = None
        self.submissions: list[str] = []
        self.resubmits = 0
        self.stalled = 0
        self.progress = RunProgress(self.paths.run_dir)
        self.step_at_submit = 0
        self.failure: RankFailure | None = None
        self.node_failures = 0
        self.nodes = self.job.cluster.nodes  # what the current submission runs on (fewer after a lost node)
        self.watch: SlurmWatch | None = None
        self.slurm_queries: list[float] = []  # when the watches of every submission asked SLURM (monotonic s)
        self.saved_queries = 0

    def submit(self) -> str:
        executor = make_executor(self.job, self.profile, self.paths.submitit_dir / "%j", nodes=self.nodes)
        clear_failures(self.paths.run_dir)
        self.failure = None
        self.step_at_submit = self.progress.update()["step"]
        if self.job.cluster.executor == "local":
            self.task.master_port = free_port()
        self.task.attempt = next_attempt(self.paths.checkpoints, len(self.submissions))
        self.submitit_job = executor.submit(self.task)
        self.submissions.append(str(self.submitit_job.job_id))
        if self.job.cluster.executor == "slurm":
            if self.watch is not None:
                self.slurm_queries += self.watch.asked_at
            self.watch = SlurmWatch(self.submitit_job.job_id, self.job.cluster.slurm_poll_s)
            self.saved_queries = 0
        self._save_state()
        return str(self.submitit_job.job_id)

    def adopt(self, job_id: str, record: dict[str, Any]) -> str:
        """Follow a live SLURM job that an earlier launcher submitted (its launch.json record): nothing is
        submitted; a later crash or lost node is handled as for a job of this launcher."""
        import submitit

        self.submissions = [str(j) for j in record.get("job_ids", [])] or [str(job_id)]
        self.resubmits, self.node_failures = record.get("resubmits", 0), record.get("node_failures", 0)
        self.nodes = record.get("nodes", self.nodes)
        self.slurm_queries = list(record.get("slurm_queries", []))
        self.submitit_job = submitit.SlurmJob(folder=self.paths.submitit_dir / "%j", job_id=str(job_id),
                                              tasks=range(self.world_size))
        self.watch = SlurmWatch(job_id, self.job.cluster.slurm_poll_s)
        self.saved_queries = 0
        self.step_at_submit = self.progress.update()["step"]
        self._save_state()
        return str(job_id)

    def _save_state(self) -> None:
        state = {"executor": self.job.cluster.executor, "job_ids": self.submissions, "resubmits": self.resubmits,
                 "node_failures": self.node_failures, "nodes": self.nodes, "configured_nodes": self.job.cluster.nodes,
                 "submitit_dir": str(self.paths.submitit_dir), "slurm_queries": self.queries_made()}
        replace_durable(self.paths.launch_state, json.dumps(state, indent=1))

    def queries_made(self) -> list[float]:
        """When this follower asked SLURM about its jobs (monotonic seconds), every submission's questions."""
        return self.slurm_queries + (self.watch.asked_at if self.watch else [])

    def _state(self) -> str:
        job = self.submitit_job
        if job is None:
            return "UNSUBMITTED"
        if self.job.cluster.executor == "local":
            if self._some_rank_failed():
                job.cancel(check=False)  # the other ranks would wait for the dead one until the timeout
                return "FAILED"
            return "COMPLETED" if job.done() and self._result_ok() else ("FAILED" if job.done() else "RUNNING")
        return self.watch.poll()

    def _some_rank_failed(self) -> bool:
        for rank in range(self.world_size):
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

    @property
    def world_size(self) -> int:
        return self.nodes * self.job.cluster.tasks_per_node

    def poll(self) -> dict[str, Any]:
        state = self._state()
        if self.watch is not None and self.watch.queries != self.saved_queries:
            self.saved_queries = self.watch.queries
            self._save_state()  # launch.json records when this follower asked SLURM (once a period at most)
        summary = self.progress.update()
        if self.watch is not None and self.watch.lost_a_node:
            self._follow_node_loss(summary)
            state = "REQUEUED" if state in ("PENDING", "REQUEUED") else state
        if state in _CRASHED and self._may_resubmit(summary):
            # SLURM requeues a job that stops on a signal or loses a node under the same id; a job that died (kill
            # -9 of its ranks past the job's own retries, a NODE_FAIL without --requeue) ends here instead and gets
            # a new one, on the full node count if the nodes are back.
            self.resubmits += 1
            self.nodes = self.job.cluster.nodes  # asked as a range from cluster.min_nodes: SLURM gives what it can
            self.submit()
            state = "REQUEUED"
        return {"state": state, "job_id": self.submissions[-1] if self.submissions else None,
                "done": state in _DONE, "requeues": self.resubmits, "node_failures": self.node_failures,
                "nodes": self.nodes, **summary}

    def _follow_node_loss(self, summary: dict[str, Any]) -> None:
        """SLURM requeued the job that lost a node (--requeue) onto the nodes it can get (--nodes=MIN-MAX), and the
        job's batch script trains on the largest count there that splits the global batch (recover.py): nothing is
        decided here. What the follower shows: how many node failures, and the node count of the latest start."""
        failures = self.watch.history.count("NODE_FAIL")
        start = summary.get("start") or {}
        if start.get("world_size"):
            self.nodes = max(1, start["world_size"] // self.job.cluster.tasks_per_node)
        if failures != self.node_failures:
            self.node_failures = failures
            self._save_state()

    def _may_resubmit(self, summary: dict[str, Any]) -> bool:
        # Resubmit after a preemption or a transient crash, as SLURM's requeue would; never after an error
        # that the same config and data repeat (the console gets that rank's reason instead).
        if summary["finished"]:
            return False
        if self.job.cluster.executor == "slurm":
            from cratescale.launch.recover import read_record

            record = read_record(self.paths.run_dir)
            if record.get("job") == str(self.submitit_job.job_id) and record.get("verdict") == "stop":
                self.failure = job_failure(self.paths.run_dir, self.submitit_job, self.world_size)
                return False  # the job's own recovery stopped it (launch/recover.py): not undone from outside
        self.failure = job_failure(self.paths.run_dir, self.submitit_job, self.world_size)
        retry, self.stalled = may_retry(classify_failure(self.failure), summary["step"] > self.step_at_submit,
                                        self.stalled, self.resubmits, self.job.cluster.max_requeues)
        return retry

    def error(self) -> dict[str, Any] | None:
        """The failing rank's reason (rank, line, deterministic, log), once the job ended without success."""
        if self.submitit_job is None:
            return None
        failure = self.failure or job_failure(self.paths.run_dir, self.submitit_job, self.world_size)
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
