"""Tiny DeepSpeed-on-CPU harness for the checkpoint tests: a 2-layer MLP, torch AdamW, gloo ranks.

Workers run in `torch.multiprocessing` spawn children; results go to files in the test's tmp dir.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cratescale.compat.deepspeed import skip_shm_op_build
from cratescale.distributed.rendezvous import free_port

GLOBAL_BATCH, MICRO, DIM_IN, DIM_H, DIM_OUT = 8, 4, 16, 32, 8


def init_dist(rank: int, world: int, port: int) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    skip_shm_op_build()  # DeepSpeed's ~30 s shared-memory op build; gloo does not need it (ENVIRONMENT.md)
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")


def spawn(worker, out: Path, world: int = 2, *args: Any) -> None:
    """Run `worker(rank, world, port, out, *args)` on `world` spawned gloo ranks and wait for them."""
    import torch.multiprocessing as mp

    os.environ["DS_ACCELERATOR"] = "cpu"
    mp.spawn(worker, args=(world, free_port(), str(out), *args), nprocs=world, join=True)


def finish() -> None:
    """A spawned worker's end: wait for the other ranks, then leave without C++ teardown (as ranks do)."""
    import torch.distributed as dist

    from cratescale.distributed import exit_without_teardown

    dist.barrier()
    dist.destroy_process_group()
    exit_without_teardown(0)


def make_engine(stage: int, world: int, load_universal: bool = False, bf16: bool = False):
    import deepspeed

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(DIM_IN, DIM_H), nn.GELU(), nn.Linear(DIM_H, DIM_OUT))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)
    config = {"train_batch_size": GLOBAL_BATCH, "train_micro_batch_size_per_gpu": MICRO,
              "gradient_accumulation_steps": GLOBAL_BATCH // (MICRO * world),
              "zero_optimization": {"stage": stage}, "steps_per_print": 10**9,
              "checkpoint": {"load_universal": load_universal}, "bf16": {"enabled": bf16}}
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine


def train_step(engine, step: int, rank: int, world: int) -> None:
    """One optimizer step on the global batch of `step`, split into this rank's micro-batches (the same
    samples whatever the world size, so a resumed run on another world size sees the same data)."""
    g = torch.Generator().manual_seed(1000 + step)
    x, y = torch.randn(GLOBAL_BATCH, DIM_IN, generator=g), torch.randn(GLOBAL_BATCH, DIM_OUT, generator=g)
    per_rank = GLOBAL_BATCH // world
    for i in range(rank * per_rank, (rank + 1) * per_rank, MICRO):
        # Inputs in the module's dtype (a bf16 engine casts the module, not its inputs); the loss in fp32.
        out = engine(x[i:i + MICRO].to(next(engine.module.parameters()).dtype))
        loss = nn.functional.mse_loss(out.float(), y[i:i + MICRO])
        engine.backward(loss)
        engine.step()


def full_weights(engine) -> dict[str, torch.Tensor]:
    """Full fp32 weights on every rank (ZeRO-3 gathers its partitions)."""
    import deepspeed

    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=engine.zero_optimization_stage() == 3):
        return {k: v.detach().clone().float() for k, v in engine.module.state_dict().items()}


def adam_steps(engine) -> list[float]:
    """AdamW's `step` counters of the wrapped torch optimizer (one per parameter/flat group)."""
    opt = engine.optimizer
    base = getattr(opt, "optimizer", opt)
    return sorted({float(s["step"]) for s in base.state.values() if "step" in s})

