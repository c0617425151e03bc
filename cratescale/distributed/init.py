"""Process-group start: gloo on CPU, nccl on GPU, through DeepSpeed's comm layer."""
from __future__ import annotations

import datetime
import os
import sys

import torch

from cratescale.compat.deepspeed import skip_shm_op_build
from cratescale.distributed.device import bind_gpu, check_cuda
from cratescale.distributed.rendezvous import bind_gloo_to_master_route
from cratescale.distributed.world import WorldInfo


def pick_backend(requested: str = "auto", env: dict[str, str] | None = None) -> str:
    """nccl where CUDA is usable, else gloo; stops (device.GpuSetupError, one line) instead of falling back to
    gloo when the allocation asked for GPUs or nccl was asked for and this process has no CUDA."""
    cuda = torch.cuda.is_available()
    check_cuda(requested, dict(os.environ) if env is None else env, cuda)
    if requested != "auto":
        return requested
    return "nccl" if cuda else "gloo"


def init_distributed(world: WorldInfo, backend: str = "auto", timeout_s: int = 600) -> str:
    """Export the rendezvous env and start the default process group; returns the backend used."""
    backend = pick_backend(backend)
    os.environ.update(RANK=str(world.rank), WORLD_SIZE=str(world.world_size), LOCAL_RANK=str(world.local_rank),
                      MASTER_ADDR=world.master_addr, MASTER_PORT=str(world.master_port))
    if backend == "gloo":
        bind_gloo_to_master_route(world.rank, world.master_addr, world.master_port)
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        skip_shm_op_build()  # DeepSpeed JIT-compiles a shared-memory op (~30 s) at its first init; gloo needs none
    else:
        os.environ["LOCAL_RANK"] = str(bind_gpu(world.local_rank))  # DeepSpeed's engine takes it as the device
    import deepspeed

    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    return backend


def shutdown_distributed() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def exit_without_teardown(code: int = 0) -> None:
    """Leave a finished rank now: flush, then skip C++ static teardown. There a native thread still joinable
    (DeepSpeed/gloo, intermittently) aborted finished ranks with "terminate called without an active
    exception", which srun reports as a failed task of a completed job."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
