"""The training loop: DeepSpeed ZeRO over the sampler-driven loader, collective checkpoints, clean stops."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pyarrow.parquet as pq
import torch
import torch.distributed as dist

from cratescale.checkpoint import CheckpointStore
from cratescale.config import JobConfig, config_hash
from cratescale.distributed import WorldInfo, deepspeed_config, init_distributed
from cratescale.distributed.wrap import apply_activation_checkpointing, compile_model, select_attention_backend
from cratescale.engine import optim
from cratescale.engine.metrics import MetricsWriter, StepTimer, memory_gb, mfu
from cratescale.engine.state import any_rank, collective_device, load_state, plan_resume, save_state
from cratescale.models import create_model, train_flops_per_image
from data_pipeline.loader import make_train_loader
from data_pipeline.sampler import LoaderState


@dataclass
class TrainOutcome:
    status: str  # "completed" | "preempted"
    step: int
    total_steps: int


def count_train_samples(manifest: Path) -> int:
    splits = pq.read_table(manifest, columns=["split"]).column("split").to_pylist()
    return sum(1 for s in splits if s == "train")


def build_model(job: JobConfig) -> torch.nn.Module:
    torch.manual_seed(job.seed)  # identical init on every rank
    overrides = dict(job.model.overrides)
    overrides.setdefault("img_size", job.data.image_size)
    return create_model(job.model.name, **overrides)


def wrap_for_training(model: torch.nn.Module, job: JobConfig) -> torch.nn.Module:
    """What only training wants (export, planning and extraction take the plain model)."""
    select_attention_backend(job.parallel.attention)
    if job.parallel.activation_checkpointing:
        apply_activation_checkpointing(model)
    if job.parallel.compile:
        compile_model(model)
    return model


def _open_sample_log(run_dir: Path, rank: int):
    (run_dir / "samples").mkdir(parents=True, exist_ok=True)
    return (run_dir / "samples" / f"rank{rank}.jsonl").open("a", buffering=1)


def _mean_over_ranks(values: list[float]) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=collective_device())
    if dist.is_initialized():
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t.tolist()


def train(job: JobConfig, run_dir: Path, manifest: Path, world: WorldInfo, peak_flops: float,
          should_stop: Callable[[], bool] = lambda: False) -> TrainOutcome:
    import deepspeed

    run_dir = Path(run_dir)
    entered = time.perf_counter()
    init_distributed(world, job.parallel.backend, timeout_s=job.parallel.collective_timeout_s)
    sched = job.schedule
    steps_per_epoch = count_train_samples(manifest) // sched.global_batch
    if steps_per_epoch < 1:
        raise ValueError(f"{manifest}: fewer training samples than one global batch ({sched.global_batch})")
    total = optim.total_steps(job, steps_per_epoch)
    warmup = optim.warmup_steps(job, steps_per_epoch)
    peak = optim.peak_lr(job)

    store = CheckpointStore(run_dir / "checkpoints", job.checkpoint.keep_last, job.checkpoint.keep_every)
    chash = config_hash(job)
    plan = plan_resume(store, chash, sched.global_batch, world.world_size, job.checkpoint.allow_config_change)
    model = build_model(job)
    if plan.commit is None and job.checkpoint.start_fresh_from_weights:
        from cratescale.checkpoint.export import load_export

        state_dict, _, _ = load_export(Path(job.checkpoint.start_fresh_from_weights))
        model.load_state_dict(state_dict)
    wrap_for_training(model, job)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optim.make_optimizer(model, job),
                                           config=deepspeed_config(job, world.world_size, plan.elastic))
    step = 0
    writer = MetricsWriter(run_dir, job.logging.tensorboard) if world.is_main else None
    if plan.commit is not None:
        step = int(load_state(engine, plan, world.rank)["step"])
    if writer:
        writer.write({"kind": "start", "step": step, "world_size": world.world_size, "elastic": plan.elastic,
                      "resumed": plan.commit is not None, "total_steps": total, "job_id": world.job_id,
                      "setup_s": round(time.perf_counter() - entered, 3),  # process group, model, engine, resume
                      "speed": job.parallel.model_dump(include={"compile", "activation_checkpointing", "attention"})})

    loader = make_train_loader(
        manifest, state=LoaderState.from_step(step, steps_per_epoch, sched.global_batch, job.seed),
        rank=world.rank, world_size=world.world_size, global_batch=sched.global_batch,
        micro_batch=sched.micro_batch, image_size=job.data.image_size, num_patches=model.num_patches,
        kind=job.data.loader, num_threads=job.data.num_threads, hw_decoder_load=job.data.hw_decoder_load,
        prefetch_depth=job.data.prefetch_depth)
    batches = iter(loader)
    # From the live world, as deepspeed_config does: a job requeued onto fewer nodes than its config names (a
    # lost node, an elastic -N1-2 allocation) keeps its global batch with more accumulation.
    accum = sched.global_batch // (sched.micro_batch * world.world_size)
    dtype = torch.bfloat16 if job.parallel.precision == "bf16" else torch.float32
    flops_per_image = train_flops_per_image(model)

    last_commit = step if plan.commit is not None else -1

    def commit(at_step: int) -> None:
        nonlocal last_commit
        if at_step == last_commit:
            return
        meta = {"step": at_step, "samples_seen": at_step * sched.global_batch, "world_size": world.world_size,
                "global_batch": sched.global_batch, "config_hash": chash, "job_name": job.name,
                "loader_state": LoaderState.from_step(at_step, steps_per_epoch, sched.global_batch,
                                                      job.seed).to_dict()}
        t0 = time.perf_counter()
        save_state(engine, store, at_step, meta, world.rank)
        last_commit = at_step
        if writer:
            writer.write({"kind": "commit", "step": at_step, "seconds": time.perf_counter() - t0})
            print(f"[cratescale] committed step {at_step} in {time.perf_counter() - t0:.2f}s", flush=True)

    sample_log = _open_sample_log(run_dir, world.rank) if job.logging.sample_log else None
    timer, window_loss, window_steps = StepTimer(), 0.0, 0
    status = "completed"
    first_step = step + 1
    while step < total:
        if any_rank(should_stop()):
            status = "preempted"
            break
        lr = optim.lr_at(step, peak, warmup, total)
        for group in engine.optimizer.param_groups:
            group["lr"] = lr
        for _ in range(accum):
            t0 = time.perf_counter()
            batch = next(batches)
            timer.data_wait += time.perf_counter() - t0
            images = batch["images"].to(engine.device, dtype, non_blocking=True)
            loss, _, _ = engine(images, batch["mask_noise"].to(engine.device, non_blocking=True))
            engine.backward(loss)
            engine.step()
            window_loss += loss.detach().float() / accum  # stays on the device: no sync per micro-step
            if sample_log:
                sample_log.write(json.dumps({"step": step, "ids": batch["sample_ids"].tolist()}) + "\n")
            timer.images += batch["images"].shape[0] * world.world_size
        step += 1
        window_steps += 1
        if writer and step == first_step:
            # this process's first step: loader start-up and (with parallel.compile) the compile
            writer.write({"kind": "first_step", "step": step, "seconds_since_start": time.perf_counter() - entered})
        if step % job.logging.every_steps == 0 or step == total:
            elapsed, wait, images = timer.window()
            loss_mean, wait_frac, bad_mean = _mean_over_ranks(
                [float(window_loss) / window_steps, wait / elapsed, float(getattr(loader, "bad_samples", 0))])
            rate = images / elapsed
            if writer:
                record = {"kind": "train", "step": step, "loss": loss_mean, "lr": lr, "images_per_s": rate,
                          "data_wait": wait_frac, "mfu": mfu(rate, flops_per_image, peak_flops, world.world_size),
                          "memory_gb": memory_gb(), "epoch": step / steps_per_epoch,
                          "bad_samples": round(bad_mean * world.world_size)}  # summed over ranks
                writer.write(record)
                print(f"[cratescale] step {step}/{total} loss {loss_mean:.4f} lr {lr:.2e} {rate:.0f} img/s "
                      f"wait {wait_frac:.0%}", flush=True)
            timer.reset()
            window_loss, window_steps = 0.0, 0
        if step % job.checkpoint.every_steps == 0 and step < total:
            commit(step)
    commit(step)
    loader.close()  # its worker processes and threads end here, not in interpreter teardown
    if sample_log:
        sample_log.close()
    if writer:
        writer.write({"kind": "end", "step": step, "status": status})
        writer.close()
    return TrainOutcome(status, step, total)
