"""What every rank runs (pickled by submitit): the same entry for the local and the SLURM executor."""
from __future__ import annotations

import atexit
import os
from pathlib import Path

from cratescale.config import JobConfig, load_job
from cratescale.distributed import exit_without_teardown, shutdown_distributed, world_from_env
from cratescale.engine.task import TrainingTask
from cratescale.engine.trainer import train
from cratescale.launch.failures import arm_crash_record, record_failure
from cratescale.launch.preemption import PreemptionFlag, requeue_slurm_job

PREEMPTED_EXIT = 3


class TrainTask:
    """Trains the job saved at `config_path`; on a stop request saves, requeues (SLURM) and exits."""

    def __init__(self, config_path: str, manifest: str, peak_flops: float, master_port: int | None = None,
                 attempt: int = 0, expect_gpus: int = 0, finetune: dict | None = None) -> None:
        self.config_path = config_path
        self.manifest = manifest
        self.peak_flops = peak_flops
        self.master_port = master_port  # local executor: a port known to be free at submission
        # The supervisor's submission number (CRATESCALE_ATTEMPT, the incarnation rule): pickled with the task,
        # so SLURM's own requeue of a job keeps it and only the restart count grows.
        self.attempt = attempt
        # The profile's gpus_per_node, carried by the task so that every executor (local processes as well as
        # SLURM) tells its ranks to stop at start-up when they see no CUDA (distributed/device.py).
        self.expect_gpus = expect_gpus
        # A fine-tune run (engine/finetune_task.py FinetuneSpec as a dict); None: the job's pretraining.
        self.finetune = finetune

    def env(self) -> dict[str, str]:
        """What this submission tells its ranks beyond SLURM's variables."""
        out = {"CRATESCALE_ATTEMPT": str(self.attempt)}
        if self.master_port is not None:
            out["MASTER_PORT"] = str(self.master_port)
        if self.expect_gpus:
            out["CRATESCALE_EXPECT_GPUS"] = str(self.expect_gpus)
        return out

    def _task(self, job: JobConfig) -> TrainingTask | None:
        if self.finetune is None:
            return None  # the trainer's default: pretraining
        from cratescale.engine.finetune_task import FinetuneSpec, FinetuneTask

        spec = FinetuneSpec(**{**self.finetune, "class_names": tuple(self.finetune["class_names"])})
        return FinetuneTask(job, Path(self.manifest), spec)

    def __call__(self) -> dict:
        flag = PreemptionFlag()
        os.environ.update(self.env())
        world = world_from_env()
        arm_crash_record(Path(self.config_path).parent, world.rank)  # a signal is reported with its name
        try:
            job = load_job(self.config_path)
            outcome = train(job, Path(job.run_dir), Path(self.manifest), world, self.peak_flops, should_stop=flag,
                            task=self._task(job))
        except Exception as err:
            # The supervisor reads this rank's reason from here (both executors) and stops or requeues on it.
            record_failure(Path(self.config_path).parent, world.rank, err)
            raise
        shutdown_distributed()
        if outcome.status == "preempted":
            # USR2: requeue ourselves. SIGTERM alone (scancel, an outside `scontrol requeue`): SLURM decides.
            if world.is_main and os.environ.get("SLURM_JOB_ID") and flag.wants_requeue:
                requeue_slurm_job()
            # No result file: submitit (and our supervisor) must not take this for a finished job.
            exit_without_teardown(PREEMPTED_EXIT)
        # Once submitit has written our result and returns (atexit), leave without C++ static teardown.
        atexit.register(exit_without_teardown, 0)
        return {"status": outcome.status, "step": outcome.step, "rank": world.rank}
