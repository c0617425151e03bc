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
from cratescale.config import JobConfig, identity_hash, job_identity, schedule_note
from cratescale.distributed import WorldInfo, deepspeed_config, init_distributed
from cratescale.distributed.wrap import (apply_activation_checkpointing, apply_mssa_kernel, compile_model,
                                        select_attention_backend)
from cratescale.engine import optim
from cratescale.engine.data_budget import BadDataBudget, BadDataError
from cratescale.engine.metrics import MetricsWriter, StepTimer, memory_gb, mfu
from cratescale.engine.commit_async import AsyncCommitter
from cratescale.engine.state import (any_rank, check_decoder, claim_run, collective_device, load_state, plan_resume,
                                     save_state)
from cratescale.models import create_model, train_flops_per_image
from data_pipeline.loader import choose_decoder, make_train_loader
from data_pipeline.manifest import manifest_fingerprint
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
    if job.parallel.attention == "mssa_triton":
        apply_mssa_kernel(model)
    if job.parallel.activation_checkpointing:
        apply_activation_checkpointing(model)
    if job.parallel.compile:
        compile_model(model, None if job.parallel.compile_mode == "default" else job.parallel.compile_mode)
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


def _check_data(budget: BadDataBudget, loader, writer: MetricsWriter | None, step: int) -> None:
    """Every rank agrees on the step's bad samples; past the budget every rank raises here together, before
    the step trains and with the last commit untouched. The one line goes to metrics.jsonl and the console."""
    try:
        budget.check(loader.bad)
    except BadDataError as exc:
        if writer:
            writer.write({"kind": "end", "step": step, "status": "bad_data", "error": str(exc)})
            writer.close()
            print(f"[cratescale] {exc}", flush=True)
        raise


def _commit_logger(writer: MetricsWriter | None) -> Callable[[dict], None]:
    """One metrics row and one console line per finished (or skipped) asynchronous commit, rank 0."""
    def log(record: dict) -> None:
        if writer is None:
            return
        writer.write(record)
        if record["kind"] == "commit":
            print(f"[cratescale] committed step {record['step']} in {record['seconds']:.2f}s "
                  f"(training stalled {record['stall_s']:.2f}s)", flush=True)
        else:
            print(f"[cratescale] skipped the commit of step {record['step']}: step {record['writing']} is still "
                  f"being written (checkpoint.when_busy=skip; {record['skipped']} skipped)", flush=True)
    return log


def train(job: JobConfig, run_dir: Path, manifest: Path, world: WorldInfo, peak_flops: float,
          should_stop: Callable[[], bool] = lambda: False) -> TrainOutcome:
    import deepspeed

    run_dir = Path(run_dir)
    entered = time.perf_counter()
    backend = init_distributed(world, job.parallel.backend, timeout_s=job.parallel.collective_timeout_s)
    sched = job.schedule
    steps_per_epoch = count_train_samples(manifest) // sched.global_batch
    if steps_per_epoch < 1:
        raise ValueError(f"{manifest}: fewer training samples than one global batch ({sched.global_batch})")
    total = optim.total_steps(job, steps_per_epoch)
    warmup = optim.warmup_steps(job, steps_per_epoch)
    peak = optim.peak_lr(job)

    store = CheckpointStore(run_dir / "checkpoints", job.checkpoint.keep_last, job.checkpoint.keep_every)
    identity = job_identity(job, manifest_fingerprint(manifest))
    chash = identity_hash(identity)
    claim_run(store, world.rank)  # before resuming: a stale incarnation (partitioned node) is refused here
    plan = plan_resume(store, identity, sched.global_batch, world.world_size, job.checkpoint.allow_config_change)
    note = schedule_note(plan.commit.meta, total, warmup) if plan.commit is not None else None
    decoder = choose_decoder(job.data.loader, "gpu" if backend == "nccl" else "cpu")  # never a quiet CPU route
    decoder_was = check_decoder(plan.commit, decoder.identity, decoder.why, job.checkpoint.allow_decoder_change)
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
    loader = make_train_loader(
        manifest, state=LoaderState.from_step(step, steps_per_epoch, sched.global_batch, job.seed),
        rank=world.rank, world_size=world.world_size, global_batch=sched.global_batch,
        micro_batch=sched.micro_batch, image_size=job.data.image_size, num_patches=model.num_patches,
        kind=decoder.kind, device=decoder.device, num_threads=job.data.num_threads,
        hw_decoder_load=job.data.hw_decoder_load, prefetch_depth=job.data.prefetch_depth,
        gpu_decode=job.data.gpu_decode, py_workers=job.data.feed_workers)
    route = {**loader.decode_route, "fallbacks": round(_mean_over_ranks([loader.decode_route["fallbacks"]])[0]
                                                       * world.world_size)}  # summed over ranks
    if writer:
        writer.write({"kind": "start", "step": step, "world_size": world.world_size, "elastic": plan.elastic,
                      "resumed": plan.commit is not None, "total_steps": total, "job_id": world.job_id,
                      # process group, model, engine, resume, loader
                      "setup_s": round(time.perf_counter() - entered, 3),
                      "speed": job.parallel.model_dump(include={"compile", "compile_mode", "activation_checkpointing",
                                                                "attention"}),
                      "decoder": decoder.identity, "decoder_why": decoder.why, "decoder_changed_from": decoder_was,
                      "gpu_decode": route, "schedule_note": note})
        if note:
            print(f"[cratescale] {note}", flush=True)
        was = f"; resumed from a run decoded by {decoder_was} (checkpoint.allow_decoder_change)" if decoder_was else ""
        print(f"[cratescale] decoder: {decoder.identity} ({decoder.why}){was}", flush=True)
        if route["fallbacks"]:
            print(f"[cratescale] data.gpu_decode: {route['fallbacks']} rank(s) fell back to full decode + GPU "
                  f"slice (rank 0: {route.get('reason', 'ok')})", flush=True)

    batches = iter(loader)
    # From the live world, as deepspeed_config does: a job requeued onto fewer nodes than its config names (a
    # lost node, an elastic -N1-2 allocation) keeps its global batch with more accumulation.
    accum = sched.global_batch // (sched.micro_batch * world.world_size)
    # The model casts its input to its own dtype; the pixels it is given are also the loss's target, so a bf16
    # run hands over fp32 pixels unless parallel.bf16_target asks for the bf16-quantised target.
    bf16_input = job.parallel.precision == "bf16" and job.parallel.bf16_target == "bf16"
    dtype = torch.bfloat16 if bf16_input else torch.float32
    flops_per_image = train_flops_per_image(model)

    last_commit = step if plan.commit is not None else -1
    committer = AsyncCommitter(engine, store, world.rank, job.checkpoint.when_busy, on_done=_commit_logger(writer))

    def commit(at_step: int, final: bool = False) -> None:
        nonlocal last_commit
        if at_step == last_commit:
            if final:
                committer.drain()  # a stop right after this step's commit started: it must land first
            return
        meta = {"step": at_step, "samples_seen": at_step * sched.global_batch, "world_size": world.world_size,
                "global_batch": sched.global_batch, "config_hash": chash, "identity": identity,
                "total_steps": total, "warmup_steps": warmup, "job_name": job.name, "decoder": decoder.identity,
                "loader_state": LoaderState.from_step(at_step, steps_per_epoch, sched.global_batch,
                                                      job.seed).to_dict()}
        if job.checkpoint.async_commit:
            if committer.commit(at_step, meta, final=final):
                last_commit = at_step
            return
        t0 = time.perf_counter()
        save_state(engine, store, at_step, meta, world.rank)
        last_commit, seconds = at_step, time.perf_counter() - t0
        if writer:
            writer.write({"kind": "commit", "step": at_step, "seconds": seconds, "stall_s": seconds, "write_s": 0.0,
                          "async": False})
            print(f"[cratescale] committed step {at_step} in {seconds:.2f}s", flush=True)

    sample_log = _open_sample_log(run_dir, world.rank) if job.logging.sample_log else None
    timer, window_loss, window_steps = StepTimer(), 0.0, 0
    budget = BadDataBudget(job.data.max_bad_fraction, job.data.bad_window_steps, sched.global_batch)
    status = "completed"
    first_step = step + 1
    while step < total:
        if any_rank(should_stop()):
            status = "preempted"
            break
        lr = optim.lr_at(step, peak, warmup, total)
        for group in engine.optimizer.param_groups:
            group["lr"] = lr
        t0 = time.perf_counter()
        micro_batches = [next(batches) for _ in range(accum)]  # the step's data, checked before any of it trains
        timer.data_wait += time.perf_counter() - t0
        _check_data(budget, loader, writer, step)
        for batch in micro_batches:
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
            loss_mean, wait_frac = _mean_over_ranks([float(window_loss) / window_steps, wait / elapsed])
            rate = images / elapsed
            if writer:
                record = {"kind": "train", "step": step, "loss": loss_mean, "lr": lr, "images_per_s": rate,
                          "data_wait": wait_frac, "mfu": mfu(rate, flops_per_image, peak_flops, world.world_size),
                          "memory_gb": memory_gb(), "epoch": step / steps_per_epoch,
                          "bad_samples": budget.total}  # summed over ranks
                writer.write(record)
                print(f"[cratescale] step {step}/{total} loss {loss_mean:.4f} lr {lr:.2e} {rate:.0f} img/s "
                      f"wait {wait_frac:.0%}", flush=True)
            timer.reset()
            window_loss, window_steps = 0.0, 0
        committer.poll()  # a background write that failed on any rank raises here, on every rank
        if step % job.checkpoint.every_steps == 0 and step < total:
            commit(step)
    commit(step, final=True)  # waits for the write in flight first, then for its own
    loader.close()  # its worker processes and threads end here, not in interpreter teardown
    if sample_log:
        sample_log.close()
    if writer:
        writer.write({"kind": "end", "step": step, "status": status})
        writer.close()
    return TrainOutcome(status, step, total)
