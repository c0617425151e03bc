"""Local CPU ranks for the 2-rank benchmarks (engine_overhead.py, scaling_check.py): `world` processes of a
script's --worker mode, a gloo rendezvous on a free loopback port, one thread each; every rank prints one JSON
line last, which is what comes back."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_cpu_ranks(script: str, worker_args: list[str], world: int, timeout: float) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
        procs.append(subprocess.Popen([sys.executable, script, "--worker", *worker_args], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    results = []
    for proc in procs:
        out, _ = proc.communicate(timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"{Path(script).name} worker exited {proc.returncode}:\n{out[-3000:]}")
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results
