"""Which GPU a rank takes, and the start-up stop when GPUs were asked for but this process has no CUDA.

Both are plain functions of the environment (and of what torch reports), so the rules are tested with env dicts;
init.py applies them. A silent CPU fallback would train a 64-GPU job on 64 CPU ranks (gloo, CPU DALI)."""
from __future__ import annotations

import os
from pathlib import Path

# Variables that say this process's allocation has GPUs: ours (exported by the launcher from the cluster
# profile's gpus_per_node) and SLURM's. Counts first; the *_GPUS lists hold device indices.
_GPU_COUNTS = ("CRATESCALE_EXPECT_GPUS", "SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE", "SLURM_GPUS_PER_TASK",
               "SLURM_GPUS")
_GPU_LISTS = ("SLURM_JOB_GPUS", "SLURM_STEP_GPUS")


class GpuSetupError(RuntimeError):
    """GPUs asked for and not usable as asked: one line, raised at start-up."""


def gpus_expected(env: dict[str, str]) -> str | None:
    """The NAME=value that asks this process for GPUs, or None. SLURM counts may carry a type ("h100:8")."""
    for name in _GPU_COUNTS:
        value = env.get(name, "").strip()
        counts = [part.rsplit(":", 1)[-1] for part in value.split(",") if part]
        if any(c.isdigit() and int(c) > 0 for c in counts):
            return f"{name}={value}"
    for name in _GPU_LISTS:
        if env.get(name, "").strip():
            return f"{name}={env[name].strip()}"
    return None


def driver_version(proc_file: str = "/proc/driver/nvidia/version") -> str | None:
    """The loaded NVIDIA kernel driver's version, or None when no driver is loaded."""
    try:
        first = Path(proc_file).read_text().splitlines()[0]
    except (OSError, IndexError):
        return None
    words = [w for w in first.split() if w[:1].isdigit() and "." in w]
    return words[0] if words else first.strip()


def no_cuda_line(why: str, torch_version: str, torch_cuda: str | None, driver: str | None,
                 visible: str | None) -> str:
    """One line naming what asked for GPUs, torch's build and the driver."""
    build = f"torch {torch_version} built for CUDA {torch_cuda}" if torch_cuda else \
        f"torch {torch_version} is a CPU-only build (install a CUDA wheel)"
    drv = f"NVIDIA driver {driver}" if driver else "no NVIDIA driver loaded (/proc/driver/nvidia/version absent)"
    hidden = f"; CUDA_VISIBLE_DEVICES={visible!r}" if visible is not None else ""
    return f"{why} asks for GPUs but this process sees no CUDA device: {build}; {drv}{hidden}"


def check_cuda(requested_backend: str, env: dict[str, str], cuda_available: bool) -> None:
    """Stop (GpuSetupError) when GPUs are expected (by the allocation, or backend nccl) and CUDA is not usable."""
    if cuda_available:
        return
    why = gpus_expected(env) or ("parallel.backend=nccl" if requested_backend == "nccl" else None)
    if why is None:
        return
    import torch

    raise GpuSetupError(no_cuda_line(why, torch.__version__, torch.version.cuda, driver_version(),
                                     env.get("CUDA_VISIBLE_DEVICES")))


def gpu_for_rank(local_rank: int, device_count: int, env: dict[str, str]) -> int:
    """The CUDA device index this rank uses. One visible device: the site bound one GPU to this task (SLURM
    --gpus-per-task=1, CUDA_VISIBLE_DEVICES=<one>), whatever the local rank. Several: one per local rank; more
    local ranks than visible devices is an error (a modulo would put two ranks on one GPU, quietly)."""
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if device_count < 1:
        raise GpuSetupError(f"local rank {local_rank}: no CUDA device visible (CUDA_VISIBLE_DEVICES={visible!r})")
    if device_count == 1:
        return 0
    if local_rank < device_count:
        return local_rank
    raise GpuSetupError(f"local rank {local_rank} sees {device_count} GPUs (CUDA_VISIBLE_DEVICES={visible!r}): "
                        f"more tasks on this node than GPUs; set cluster.tasks_per_node <= GPUs per node or bind "
                        f"one GPU per task")


def bind_gpu(local_rank: int) -> int:
    """Make this rank's GPU torch's current device; returns its index (what DeepSpeed must see as LOCAL_RANK:
    its engine calls set_device(LOCAL_RANK), which is out of range under a per-task binding)."""
    import torch

    index = gpu_for_rank(local_rank, torch.cuda.device_count(), dict(os.environ))
    torch.cuda.set_device(index)
    return index
