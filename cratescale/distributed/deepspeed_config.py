"""The DeepSpeed config, generated from the job (never written by hand)."""
from __future__ import annotations

from typing import Any

from cratescale.config import JobConfig
from cratescale.config.batching import split_for_world


def deepspeed_config(job: JobConfig, world_size: int, load_universal: bool = False) -> dict[str, Any]:
    """For the live world: a run restarted on fewer ranks keeps its global batch (config/batching.py)."""
    sched = job.schedule
    split = split_for_world(sched.global_batch, world_size, sched.micro_batch)
    if split is None:
        raise ValueError(f"schedule.global_batch {sched.global_batch} cannot be split over {world_size} ranks")
    micro, accum = split
    config: dict[str, Any] = {
        "train_batch_size": sched.global_batch,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "zero_optimization": {"stage": job.parallel.zero_stage},
        "bf16": {"enabled": job.parallel.precision == "bf16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "checkpoint": {"load_universal": load_universal},
    }
    if job.parallel.overlap_comm is not None:
        config["zero_optimization"]["overlap_comm"] = job.parallel.overlap_comm
    if job.parallel.zero_stage == 3:
        config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = False
    if job.optim.grad_clip is not None:
        config["gradient_clipping"] = job.optim.grad_clip
    return config
