"""Ray across the nodes of one allocation (issue 17 item 5, issue 13 item 5): cluster/ray_in_allocation.sbatch
starts a head on the first node and a worker on the other, token auth on, each bound to its node's own address
on eth0, each with its own temp dir, stopped by pid (its srun steps) when the driver ends. The driver joins that
cluster through $RAY_ADDRESS (data_pipeline.local_ray.start_or_join_ray, the one way to start or join Ray), and
ingest spreads its tasks over both nodes.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cratescale.launch import slurm_tools

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "cluster" / "ray_in_allocation.sbatch"


pytestmark = [pytest.mark.multinode, pytest.mark.usefixtures("mn_conf"),
              # Not yet passing (issue 17 item 5, open): in its first run on the merged tree (2026-12-01) the
              # multi-node cluster's slurmctld and slurmds were gone a second after job step 1 started, and the
              # test then waited on the job forever. Skipped, visibly, until that is understood.
              pytest.mark.skip(reason="issue 17 item 5: the multi-node Ray test lost the cluster's daemons in its "
                                      "first full run; not yet passing")]


def test_ray_head_and_worker_on_two_nodes_and_ingest_and_extraction_spread_over_both(tmp_path):
    import torch

    from cratescale.checkpoint.export import export_weights
    from cratescale.models import create_model

    torch.manual_seed(0)
    model = create_model("crate_mae_debug")
    export_weights(model.state_dict(), model.config, {"step": 0, "run_name": "mn-ray"}, tmp_path / "export")
    out = tmp_path / "manifest"
    env = dict(os.environ, RAY_INTERFACE="eth0", RAY_OBJECT_STORE_BYTES="100000000", PYTHON=sys.executable,
               RAY_RUN_DIR=str(tmp_path / "ray"), PYTHONPATH=str(REPO))
    py = sys.executable
    driver = ["bash", "-c",   # the driver joins the allocation's Ray through $RAY_ADDRESS: no --ray-address
              f"{py} -m data_pipeline.ingest 'synthetic://shapes?n=384&classes=4&size=32&seed=2' {out} "
              f"--shard-size 8 --workers 4 --no-progress && {py} -m cratescale.embeddings extract "
              f"{tmp_path / 'export'} {out} {tmp_path / 'store'} --actors 2 --shard-rows 16 --shards-per-task 1 "
              f"--batch-size 16 --loader pil"]
    job_id = subprocess.run(["sbatch", "--parsable", "-N", "2", "--ntasks-per-node=1", "--cpus-per-task=1",
                             "-o", str(tmp_path / "ray-%j.out"), str(SCRIPT), *driver],
                            capture_output=True, text=True, env=env, check=True, cwd=tmp_path).stdout.strip()
    t0 = time.monotonic()
    while slurm_tools.job_info(job_id).get("JobState") in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING"):
        assert time.monotonic() - t0 < 300, f"ray job {job_id} still running after 300 s"
        time.sleep(1)
    log = (tmp_path / f"ray-{job_id}.out").read_text()
    assert slurm_tools.job_history(job_id)[-1] == "COMPLETED", log[-3000:]
    assert "ray cluster ready: 2 node(s): ['10.77.0.11', '10.77.0.12']" in log, log[-3000:]
    hosts = next(line for line in log.splitlines() if line.startswith("units per host:"))
    counts = dict(item.split() for item in hosts.removeprefix("units per host: ").split(", "))
    # Enough units that node2's first worker (a cold Python start, seconds here) is up before node1 has done
    # them all: Ray reuses a busy node's leased worker for short tasks of the same kind.
    assert set(counts) == {"node1", "node2"} and sum(map(int, counts.values())) == 48, hosts
    assert (out / "manifest.parquet").exists()
    shards = next(line for line in log.splitlines() if line.startswith("shards per host:"))
    counts = dict(item.split() for item in shards.removeprefix("shards per host: ").split(", "))
    # 24 one-shard tasks: the actor whose (cold) start finishes first must not have done them all
    assert set(counts) == {"node1", "node2"} and sum(map(int, counts.values())) == 24, shards
    # nothing left behind: no Ray process in either node, no temp dir
    for n in (1, 2):
        pids = subprocess.run(["ip", "netns", "pids", f"csmn-node{n}"], capture_output=True, text=True).stdout.split()
        comms = [Path(f"/proc/{p}/comm").read_text().strip() for p in pids if Path(f"/proc/{p}").exists()]
        assert not [c for c in comms if c.startswith(("raylet", "gcs_server", "ray::"))], comms
    assert not list(Path("/tmp").glob(f"ray-{job_id}-*"))
