"""Rank-to-GPU binding and the no-silent-CPU stop (cratescale/distributed/device.py): plain rules tested with env
dicts, and the stop itself in a process with CUDA hidden."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cratescale.config import load_job, load_profile
from cratescale.distributed import device
from cratescale.distributed.device import GpuSetupError, check_cuda, gpu_for_rank, gpus_expected

REPO = Path(__file__).resolve().parents[2]


def test_which_env_asks_for_gpus():
    assert gpus_expected({}) is None
    assert gpus_expected({"SLURM_GPUS_ON_NODE": "0", "SLURM_GPUS_PER_NODE": "gpu:0"}) is None
    assert gpus_expected({"SLURM_GPUS_ON_NODE": "8"}) == "SLURM_GPUS_ON_NODE=8"
    assert gpus_expected({"SLURM_GPUS_PER_NODE": "h100:8"}) == "SLURM_GPUS_PER_NODE=h100:8"
    assert gpus_expected({"SLURM_JOB_GPUS": "0"}) == "SLURM_JOB_GPUS=0"  # a list of indices: GPU 0 allocated
    assert gpus_expected({"CRATESCALE_EXPECT_GPUS": "8"}) == "CRATESCALE_EXPECT_GPUS=8"


def test_a_site_binding_one_gpu_per_task_is_used():
    # SLURM --gpus-per-task=1: every task sees its own single GPU as device 0, whatever its local rank
    assert gpu_for_rank(5, 1, {"CUDA_VISIBLE_DEVICES": "5"}) == 0
    assert gpu_for_rank(0, 1, {"CUDA_VISIBLE_DEVICES": "0"}) == 0
    # node-wide visibility: one GPU per local rank
    assert gpu_for_rank(5, 8, {"CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"}) == 5
    assert gpu_for_rank(3, 8, {}) == 3


def test_more_local_ranks_than_gpus_is_an_error_not_a_modulo():
    with pytest.raises(GpuSetupError, match=r"local rank 5 sees 4 GPUs \(CUDA_VISIBLE_DEVICES='0,1,2,3'\)"):
        gpu_for_rank(5, 4, {"CUDA_VISIBLE_DEVICES": "0,1,2,3"})  # 5 % 4 would share GPU 1 with rank 1
    with pytest.raises(GpuSetupError, match="no CUDA device visible"):
        gpu_for_rank(0, 0, {"CUDA_VISIBLE_DEVICES": ""})


def test_bind_gpu_sets_the_bound_device(monkeypatch):
    """Stands in for a GPU node with one GPU bound to this task: torch's device count and set_device are
    recorded, not real."""
    import torch

    calls = []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", calls.append)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "6")
    assert device.bind_gpu(6) == 0 and calls == [0]  # and init_distributed exports LOCAL_RANK=0 for DeepSpeed


def test_no_cuda_with_gpus_asked_stops_with_one_line():
    assert check_cuda("auto", {}, cuda_available=False) is None  # a CPU machine, nothing asked: gloo
    assert check_cuda("auto", {"SLURM_GPUS_ON_NODE": "8"}, cuda_available=True) is None
    for backend, env, why in [("auto", {"SLURM_GPUS_ON_NODE": "8"}, "SLURM_GPUS_ON_NODE=8"),
                              ("gloo", {"CRATESCALE_EXPECT_GPUS": "8"}, "CRATESCALE_EXPECT_GPUS=8"),
                              ("nccl", {}, "parallel.backend=nccl")]:
        with pytest.raises(GpuSetupError) as err:
            check_cuda(backend, env, cuda_available=False)
        line = str(err.value)
        assert "\n" not in line and line.startswith(f"{why} asks for GPUs but this process sees no CUDA device")
        assert "torch " in line and "driver" in line


def test_the_line_names_the_build_and_the_driver(tmp_path):
    proc = tmp_path / "version"
    proc.write_text("NVRM version: NVIDIA UNIX x86_64 Kernel Module  580.65.06  Sun Jul 27 07:09:29 UTC 2025\n"
                    "GCC version:  gcc version 12.2.0\n")
    assert device.driver_version(str(proc)) == "580.65.06"
    assert device.driver_version(str(tmp_path / "absent")) is None
    line = device.no_cuda_line("X=1", "2.13.0+cu130", "13.0", "535.104.05", "")
    assert "torch 2.13.0+cu130 built for CUDA 13.0; NVIDIA driver 535.104.05; CUDA_VISIBLE_DEVICES=''" in line
    assert "CPU-only build" in device.no_cuda_line("X=1", "2.13.0+cpu", None, None, None)


def test_a_rank_with_cuda_hidden_stops_at_start_up():
    """The start-up path itself (init_distributed) in a process with CUDA hidden whose allocation has GPUs; before,
    it started a gloo process group and trained on the CPU."""
    code = ("from cratescale.distributed import init_distributed\n"
            "from cratescale.distributed.world import WorldInfo\n"
            "init_distributed(WorldInfo(0, 1, 0, '127.0.0.1', 29999, 't'))\n")
    env = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": "", "SLURM_GPUS_ON_NODE": "1"}
    env.pop("CRATESCALE_EXPECT_GPUS", None)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("cratescale.distributed.device.GpuSetupError: SLURM_GPUS_ON_NODE=1 asks for GPUs"), last
    assert "torch " in last and "driver" in last and "CUDA_VISIBLE_DEVICES=''" in last


def test_a_gpu_profile_tells_its_ranks_to_expect_gpus():
    from cratescale.launch.executors import slurm_parameters

    job = load_job(str(REPO / "jobs" / "imagenet21k.yaml"))
    assert "export CRATESCALE_EXPECT_GPUS=8" in slurm_parameters(job, load_profile("example_h100"))["setup"]
    assert not any("CRATESCALE_EXPECT_GPUS" in line for line in slurm_parameters(job, load_profile("local"))["setup"])
