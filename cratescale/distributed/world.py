"""Who am I in the job: rank, world size and rendezvous, from SLURM, torchrun or submitit's env."""
from __future__ import annotations

import os
import subprocess
import zlib
from dataclasses import dataclass

from cratescale.distributed.rendezvous import master_address


@dataclass(frozen=True)
class WorldInfo:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    job_id: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _first_host(nodelist: str) -> str:
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             timeout=30, check=True).stdout.split()
        return out[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return nodelist.split(",")[0]


def _port_for(job_id: str) -> int:
    # Same job id (also after a requeue) -> same port; distinct jobs spread over 20000..59999.
    return 20000 + zlib.crc32(job_id.encode()) % 40000


def world_from_env(env: dict[str, str] | None = None) -> WorldInfo:
    """torchrun/exported vars win, then SLURM's, then submitit's local executor, else a single process."""
    env = dict(os.environ if env is None else env)
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world, local = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
        job_id = env.get("SLURM_JOB_ID") or env.get("SUBMITIT_LOCAL_JOB_ID") or "torchrun"
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        rank, world, local = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
        job_id = env.get("SLURM_ARRAY_JOB_ID", "") + env.get("SLURM_JOB_ID", "slurm")
    elif "SUBMITIT_LOCAL_GLOBALID" in env:
        rank, world = int(env["SUBMITIT_LOCAL_GLOBALID"]), int(env["SUBMITIT_LOCAL_NTASKS"])
        local, job_id = int(env.get("SUBMITIT_LOCAL_LOCALID", rank)), env.get("SUBMITIT_LOCAL_JOB_ID", "local")
    else:
        rank, world, local, job_id = 0, 1, 0, "single"
    addr = env.get("MASTER_ADDR")
    if addr is None:
        # the step's nodes: a step may run on fewer nodes than the job holds (a batch that splits over fewer)
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        addr = master_address(_first_host(nodelist)) if nodelist else "127.0.0.1"
    port = int(env.get("MASTER_PORT", _port_for(job_id)))
    return WorldInfo(rank, world, local, addr, port, job_id)
