"""The training loop: DeepSpeed ZeRO over the sampler-driven loader, collective checkpoints, clean stops.

    train(job, run_dir, manifest, world, peak_flops, should_stop, task) -> TrainOutcome

runs one `Trainer` of a task (engine/task.py: pretraining by default, or a fine-tune run): setup() builds
everything before the first step (process group, resume plan, engine, loader), run() repeats step / log / eval /
commit until the schedule ends or a stop is asked, and close() ends the loader's workers, the sample log and the
metrics writer in `finally`, also when a step raised.
"""
from __future__ import annotations

import json
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from cratescale.checkpoint import CheckpointStore
from cratescale.config import JobConfig, RunPaths, schedule_note
from cratescale.config.batching import describe_split, split_for_world
from cratescale.distributed import WorldInfo, deepspeed_config, init_distributed
from cratescale.engine import optim
from cratescale.engine.agreement import Agreed, agree
from cratescale.engine.commit_async import AsyncCommitter
from cratescale.engine.data_budget import BadDataBudget, BadDataError
from cratescale.engine.metrics import (MetricsWriter, StepTimer, commit_line, memory_gb, mfu, say,
                                       unrecorded_commits)
from cratescale.engine.finetune_recipe import set_lr
from cratescale.engine.model_build import count_train_samples, wrap_for_training
from cratescale.engine.records import CommitRecord, CommitSkippedRecord
from cratescale.engine.task import PretrainTask, TrainingTask
from cratescale.engine.state import (check_decoder, checkpoint_meta, claim_run, load_state,
                                     mean_over_ranks, plan_resume, save_state)
from cratescale.models import train_flops_per_image
from data_pipeline.loader import choose_decoder, make_train_loader
from data_pipeline.sampler import LoaderState


@dataclass
class TrainOutcome:
    status: str  # "completed" | "preempted"
    step: int
    total_steps: int


class Trainer:
    """One training process of a job; the state a commit saves is owned by the engine (DeepSpeed, RNG) and the
    loader (`loader.state()`), and `commit` asks them for it."""

    def __init__(self, job: JobConfig, run_dir: Path, manifest: Path, world: WorldInfo, peak_flops: float,
                 task: TrainingTask | None = None) -> None:
        self.job, self.world, self.peak_flops = job, world, peak_flops
        self.manifest = Path(manifest)
        self.task = task or PretrainTask(job, self.manifest)
        self.paths = RunPaths(Path(run_dir), self.manifest.parent)
        self.entered = time.perf_counter()
        self.closing = ExitStack()  # what setup opened, closed in reverse order by close(), even after an error
        self.writer: MetricsWriter | None = None  # rank 0 only
        self.sample_log = None

    def setup(self) -> None:
        import deepspeed

        job, world, sched = self.job, self.world, self.job.schedule
        backend = init_distributed(world, job.parallel.backend, timeout_s=job.parallel.collective_timeout_s)
        # From the live world: a job restarted on fewer nodes than its config names (a lost node, an elastic -N1-2
        # allocation) keeps its global batch with more accumulation, or smaller micro-batches.
        split = split_for_world(sched.global_batch, world.world_size, sched.micro_batch)
        if split is None:
            raise ValueError(f"schedule.global_batch {sched.global_batch} cannot be split over {world.world_size} "
                             f"ranks; restart on a node count that divides it")
        self.micro, self.accum = split
        self.steps_per_epoch = count_train_samples(self.manifest) // sched.global_batch
        if self.steps_per_epoch < 1:
            raise ValueError(f"{self.manifest}: fewer training samples than one global batch ({sched.global_batch})")
        self.total = optim.total_steps(job, self.steps_per_epoch)
        self.warmup = optim.warmup_steps(job, self.steps_per_epoch)
        self.peak = optim.peak_lr(job)
        self.store = CheckpointStore(self.paths.checkpoints, job.checkpoint.keep_last, job.checkpoint.keep_every)
        self.identity = self.task.identity()
        claim_run(self.store, world.rank)  # before resuming: a stale incarnation (partitioned node) is refused here
        self.plan = plan_resume(self.store, self.identity, sched.global_batch, world.world_size,
                                job.checkpoint.allow_config_change)
        self.decoder = choose_decoder(job.data.loader, "gpu" if backend == "nccl" else "cpu")  # never a quiet CPU route
        self.decoder_was = check_decoder(self.plan.commit, self.decoder.identity, self.decoder.why,
                                         job.checkpoint.allow_decoder_change)
        fresh = self.plan.commit is None
        model = wrap_for_training(self.task.build_model(fresh, world.rank), job)
        start_record = self.task.start_record(model, fresh)  # before DeepSpeed casts the weights (bf16)
        optimizer = optim.make_optimizer(model, job, self.task.param_groups(model))
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                                    config=deepspeed_config(job, world.world_size, self.plan.elastic))
        if world.is_main:
            self.writer = MetricsWriter(self.paths.run_dir, job.logging.tensorboard)
            self.closing.callback(self.writer.close)
            if start_record:
                self.writer.write(start_record)
        self.step = self.resume()
        self.loader = make_train_loader(
            self.manifest, state=LoaderState.from_step(self.step, self.steps_per_epoch, sched.global_batch, job.seed),
            rank=world.rank, world_size=world.world_size, global_batch=sched.global_batch,
            micro_batch=self.micro, image_size=job.data.image_size, num_patches=model.num_patches,
            kind=self.decoder.kind, device=self.decoder.device, num_threads=job.data.num_threads,
            hw_decoder_load=job.data.hw_decoder_load, prefetch_depth=job.data.prefetch_depth,
            gpu_decode=job.data.gpu_decode, py_workers=job.data.feed_workers)
        self.closing.callback(self.loader.close)  # its worker processes and threads end here, not at exit
        self._log_start()
        if job.logging.sample_log:
            path = self.paths.sample_log(world.rank)
            path.parent.mkdir(parents=True, exist_ok=True)
            self.sample_log = self.closing.enter_context(path.open("a", buffering=1))
        # The model casts its input to its own dtype; the pixels it is given are also the loss's target, so a bf16
        # run hands over fp32 pixels unless parallel.bf16_target asks for the bf16-quantised target.
        bf16_input = job.parallel.precision == "bf16" and job.parallel.bf16_target == "bf16"
        self.dtype = torch.bfloat16 if bf16_input else torch.float32
        self.flops_per_image = train_flops_per_image(model)
        self.last_commit = self.step if self.plan.commit is not None else -1
        self.committer = AsyncCommitter(self.engine, self.store, world.rank, job.checkpoint.when_busy,
                                        on_done=self._on_commit)
        self.budget = BadDataBudget(job.data.max_bad_fraction, job.data.bad_window_steps, sched.global_batch)

    def resume(self) -> int:
        """The step to continue after: the planned commit's (its DeepSpeed state and RNG streams), else 0."""
        if self.plan.commit is None:
            return 0
        return int(load_state(self.engine, self.plan, self.world.rank)["step"])

    def _log_start(self) -> None:
        decoder, was, world, route = self.decoder, self.decoder_was, self.world, self.loader.decode_route
        route = {**route, "fallbacks": round(mean_over_ranks([route["fallbacks"]])[0] * world.world_size)}  # sum
        note = schedule_note(self.plan.commit.meta, self.total, self.warmup) if self.plan.commit else None
        if not self.writer:
            return
        for record in unrecorded_commits(self.paths.run_dir, self.store.sealed_times()):
            self.writer.write(record)
            say(f"committed step {record['step']} (sealed by the process before, which ended before recording it)")
        speed = self.job.parallel.model_dump(include={"compile", "compile_mode", "activation_checkpointing",
                                                      "attention"})
        self.writer.write({"kind": "start", "step": self.step, "world_size": world.world_size,
                           "elastic": self.plan.elastic, "resumed": self.plan.commit is not None,
                           "total_steps": self.total, "job_id": world.job_id,
                           "setup_s": round(time.perf_counter() - self.entered, 3), "speed": speed,
                           "decoder": decoder.identity, "decoder_why": decoder.why, "decoder_changed_from": was,
                           "gpu_decode": route, "schedule_note": note, "passed_over": self.plan.passed_over,
                           "micro_batch": self.micro, "accum": self.accum})
        for line in self.plan.passed_over:
            say(line)
        if note:
            say(note)
        if split_note := describe_split(self.job, world.world_size):
            say(split_note)
        say(f"decoder: {decoder.identity} ({decoder.why})"
             + (f"; resumed from a run decoded by {was} (checkpoint.allow_decoder_change)" if was else ""))
        if route["fallbacks"]:
            say(f"data.gpu_decode: {route['fallbacks']} rank(s) fell back to full decode + GPU slice "
                 f"(rank 0: {route.get('reason', 'ok')})")

    def run(self, should_stop: Callable[[], bool]) -> TrainOutcome:
        job, first_step, status = self.job, self.step + 1, "completed"
        self.batches = iter(self.loader)
        self.timer, self.window_loss, self.window_steps = StepTimer(), 0.0, 0
        while self.step < self.total:
            micro_batches = self._fetch()
            agreed = agree(should_stop(), *self.budget.local_counts(self.loader.bad), *self.committer.flags())
            if agreed.stop:  # the fetched batches are not trained: the commit's loader state is the step's
                status = "preempted"
                break
            self._check_data(agreed)
            # a background write that failed on any rank raises here, on every rank
            self.committer.poll((agreed.commit_busy, agreed.commit_failed))
            lr = optim.lr_at(self.step, self.peak, self.warmup, self.total, floor=self.task.floor_lr)
            self.train_step(micro_batches, lr)
            if self.writer and self.step == first_step:
                # this process's first step: loader start-up and (with parallel.compile) the compile
                self.writer.write({"kind": "first_step", "step": self.step,
                                   "seconds_since_start": time.perf_counter() - self.entered})
            if self.step % job.logging.every_steps == 0 or self.step == self.total:
                self.log(lr)
            if self.task.eval_due(self.step, self.total):
                self.evaluate()
            if self.step % job.checkpoint.every_steps == 0 and self.step < self.total:
                self.commit()
        self.commit(final=True)  # waits for the write in flight first, then for its own
        if self.writer:
            self.writer.write({"kind": "end", "step": self.step, "status": status})
        return TrainOutcome(status, self.step, self.total)

    def _fetch(self) -> list[dict]:
        """The step's micro-batches, fetched before the step agreement so that their bad samples are counted in it."""
        t0 = time.perf_counter()
        micro_batches = [next(self.batches) for _ in range(self.accum)]
        self.timer.data_wait += time.perf_counter() - t0
        return micro_batches

    def train_step(self, micro_batches: list[dict], lr: float) -> None:
        set_lr(self.engine.optimizer, lr)  # times each group's lr_scale (layer decay); pretraining's groups: 1
        for micro, batch in enumerate(micro_batches):
            images = batch["images"].to(self.engine.device, self.dtype, non_blocking=True)
            loss = self.task.loss(self.engine, batch, images, self.step, micro)
            self.engine.backward(loss)
            self.engine.step()
            self.window_loss += loss.detach().float() / self.accum  # stays on the device: no sync per micro-step
            if self.sample_log:
                self.sample_log.write(json.dumps({"step": self.step, "ids": batch["sample_ids"].tolist()}) + "\n")
            self.timer.images += batch["images"].shape[0] * self.world.world_size
        self.step += 1
        self.window_steps += 1

    def _check_data(self, agreed: Agreed) -> None:
        """Every rank has the step's bad samples summed over ranks; past the budget every rank raises here together,
        before the step trains and with the last commit untouched. The one line goes to metrics.jsonl and the
        console."""
        try:
            self.budget.apply(agreed.bad, agreed.lost, self.loader.bad)
        except BadDataError as exc:
            if self.writer:
                self.writer.write({"kind": "end", "step": self.step, "status": "bad_data", "error": str(exc)})
                say(str(exc))
            raise

    def log(self, lr: float) -> None:
        """The logging window's means over ranks: one metrics row and one console line on rank 0."""
        elapsed, wait, images = self.timer.window()
        loss, wait_frac = mean_over_ranks([float(self.window_loss) / self.window_steps, wait / elapsed])
        rate = images / elapsed
        if self.writer:
            self.writer.write({"kind": "train", "step": self.step, "loss": loss, "lr": lr, "images_per_s": rate,
                               "data_wait": wait_frac, "epoch": self.step / self.steps_per_epoch,
                               "mfu": mfu(rate, self.flops_per_image, self.peak_flops, self.world.world_size),
                               "memory_gb": memory_gb(), "bad_samples": self.budget.total})  # summed over ranks
            say(f"step {self.step}/{self.total} loss {loss:.4f} lr {lr:.2e} {rate:.0f} img/s wait {wait_frac:.0%}")
        self.timer.reset()
        self.window_loss, self.window_steps = 0.0, 0

    def evaluate(self) -> None:
        """The task's evaluation after this step (every rank), one metrics row on rank 0; the time it takes is
        left out of the next logging window's img/s."""
        t0 = time.perf_counter()
        row = self.task.evaluate(self.engine.module, self.step, self.decoder, self.world.world_size, self.world.rank)
        if self.writer:
            self.writer.write(row)
            say(f"step {self.step}/{self.total} eval " + " ".join(f"{k} {v:.4f}" for k, v in row.items()
                                                                  if isinstance(v, float)))
        self.timer.exclude(time.perf_counter() - t0)

    def commit(self, final: bool = False) -> None:
        """Commit the state after the current step, once per step; final also waits until it is durable."""
        at_step = self.step
        if at_step == self.last_commit:
            if final:
                self.committer.drain()  # a stop right after this step's commit started: it must land first
            return
        meta = checkpoint_meta(self.job, at_step, self.world.world_size, self.identity, self.total, self.warmup,
                               self.decoder.identity, self._loader_state(at_step))
        if self.job.checkpoint.async_commit:
            if self.committer.commit(at_step, meta, final=final):
                self.last_commit = at_step
            return
        t0 = time.perf_counter()
        save_state(self.engine, self.store, at_step, meta, self.world.rank)
        self.last_commit, seconds = at_step, time.perf_counter() - t0
        self._on_commit({"kind": "commit", "step": at_step, "seconds": seconds, "stall_s": seconds, "write_s": 0.0,
                         "async": False})

    def _loader_state(self, step: int) -> dict[str, int]:
        """The loader's state after `step` (a function of the step: batches fetched for a step that a stop kept from
        training are not in it)."""
        sched = self.job.schedule
        return LoaderState.from_step(step, self.steps_per_epoch, sched.global_batch, self.job.seed).to_dict()

    def _on_commit(self, record: CommitRecord | CommitSkippedRecord) -> None:
        """One metrics row and one console line per finished (or skipped) commit, rank 0."""
        if self.writer:
            self.writer.write(record)
            say(commit_line(record))

    def close(self) -> None:
        self.closing.close()  # ExitStack: each callback runs even when an earlier one raised


def train(job: JobConfig, run_dir: Path, manifest: Path, world: WorldInfo, peak_flops: float,
          should_stop: Callable[[], bool] = lambda: False, task: TrainingTask | None = None) -> TrainOutcome:
    trainer = Trainer(job, run_dir, manifest, world, peak_flops, task)
    try:
        trainer.setup()
        return trainer.run(should_stop)
    finally:
        trainer.close()
