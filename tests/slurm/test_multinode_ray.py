"""Ray across the nodes of one allocation (issue 17 item 5, issue 13 item 5): cluster/ray_in_allocation.sbatch
starts a head on the first node and a worker on the other, token auth on, each bound to its node's own address
on eth0, each with its own temp dir, stopped by pid (its srun steps) when the driver ends. The driver joins that
cluster through $RAY_ADDRESS (data_pipeline.local_ray.start_or_join_ray, the one way to start or join Ray);
ingest and extraction spread their tasks over both nodes. Then node2 is killed in the middle of a second
extraction: no committed shard is lost and the store ends byte-identical to the uninterrupted one.

One allocation for both parts (a Ray cluster takes ~20 s to start here): `--no-kill` keeps it after node2 dies,
as a job that handles its own node loss would ask.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cratescale.launch import slurm_tools
from multinode import NODES, kill_node, mn_up

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "cluster" / "ray_in_allocation.sbatch"

pytestmark = [pytest.mark.multinode, pytest.mark.usefixtures("mn_conf")]


def wait_job(job_id: str, log: Path, timeout: float) -> None:
    """Wait for the job to end; past `timeout` cancel it (nothing left running for the next test) and fail with
    the end of its log."""
    t0 = time.monotonic()
    while slurm_tools.job_info(job_id).get("JobState") in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING"):
        if time.monotonic() - t0 > timeout:
            subprocess.run(["scancel", job_id], capture_output=True)
            tail = log.read_text()[-3000:] if log.exists() else "(no log)"
            pytest.fail(f"ray job {job_id} still running after {timeout:.0f} s (cancelled):\n{tail}")
        time.sleep(1)


def store_files(root: Path) -> dict[str, bytes]:
    """Every file of an embedding store but store.json (it names the store's own path)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != "store.json"}


def markers(root: Path) -> dict[str, tuple[int, int]]:
    """Commit markers -> (inode, mtime): a shard done again gets a new marker file (atomic rename)."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (root / "commits").glob("shard_*.json")}


def per_host(log: str, prefix: str) -> dict[str, int]:
    line = next(line for line in log.splitlines() if line.startswith(prefix))
    return {host: int(n) for host, n in (item.split() for item in line.removeprefix(prefix).split(", "))}


def test_ray_on_two_nodes_spreads_ingest_and_extraction_and_a_lost_node_loses_no_shard(tmp_path):
    import torch

    from cratescale.checkpoint.export import export_weights
    from cratescale.models import create_model

    torch.manual_seed(0)
    # crate_mae_tiny at 224 px: about 1-3 s a shard of 32 images per actor, so the kill after 4 shards lands
    # mid-extraction. With crate_mae_debug (60 ms a shard) all 24 were done before the kill on a quiet machine,
    # once a leaked guard thread (issue 27) no longer slowed the suite.
    model = create_model("crate_mae_tiny")
    export_weights(model.state_dict(), model.config, {"step": 0, "run_name": "mn-ray"}, tmp_path / "export")
    out, ref, killed = tmp_path / "manifest", tmp_path / "store", tmp_path / "killed"
    env = dict(os.environ, RAY_INTERFACE="eth0", RAY_OBJECT_STORE_BYTES="100000000", PYTHON=sys.executable,
               RAY_RUN_DIR=str(tmp_path / "ray"), PYTHONPATH=str(REPO))
    py = sys.executable
    extract = (f"{py} -m cratescale.embeddings extract {tmp_path / 'export'} {out} {{}} --actors 2 --shard-rows 32 "
               f"--shards-per-task 1 --batch-size 16 --loader pil")
    # The driver joins the allocation's Ray through $RAY_ADDRESS (no --ray-address). The second extraction is the
    # one node2 dies in: Ray may finish it on node1 (actor restarted there), else it stops and the rerun resumes.
    driver = ["bash", "-c",
              f"{py} -m data_pipeline.ingest 'synthetic://shapes?n=768&classes=4&size=32&seed=2' {out} "
              f"--shard-size 8 --workers 4 --no-progress && {extract.format(ref)} && echo 'second extraction' && "
              f"{{ {extract.format(killed)} || {{ echo \"rerun after rc $?\"; {extract.format(killed)}; }}; }}"]
    job_id = subprocess.run(["sbatch", "--parsable", "--no-kill", "-N", "2", "--ntasks-per-node=1",
                             "--cpus-per-task=1", "-o", str(tmp_path / "ray-%j.out"), str(SCRIPT), *driver],
                            capture_output=True, text=True, env=env, check=True, cwd=tmp_path).stdout.strip()
    log_path = tmp_path / f"ray-{job_id}.out"
    try:
        t0 = last = time.monotonic()
        while len(markers(killed) if (killed / "commits").is_dir() else {}) < 4:
            if time.monotonic() - last > 1:   # the job's state once a second, the store's markers every 50 ms
                last, state = time.monotonic(), slurm_tools.job_info(job_id).get("JobState")
                assert state in (None, "PENDING", "RUNNING", "CONFIGURING"), \
                    f"job {job_id} {state} before 4 shards of the second extraction:\n{log_path.read_text()[-3000:]}"
                assert last - t0 < 400, "no 4 shards of the second extraction after 400 s"
            time.sleep(0.05)
        kill_node(2, down=True)   # raylet, actor, slurmd, step: SIGKILL; DOWN at once (pitfall 14)
        at_kill = markers(killed)
        wait_job(job_id, log_path, timeout=300)
    finally:
        subprocess.run(["scancel", job_id], capture_output=True)   # a failed wait leaves nothing running
        mn_up(NODES)              # node2 back for the next test
    log = log_path.read_text()
    assert slurm_tools.job_history(job_id)[-1] == "COMPLETED", log[-3000:]
    assert "ray cluster ready: 2 node(s): ['10.77.0.11', '10.77.0.12']" in log, log[-3000:]
    # Enough units that node2's first worker (a cold Python start, seconds here) is up before node1 has done
    # them all: Ray reuses a busy node's leased worker for short tasks of the same kind.
    units = per_host(log, "units per host: ")
    assert set(units) == {"node1", "node2"} and sum(units.values()) == 96, units
    assert (out / "manifest.parquet").exists()
    # 24 one-shard tasks; every actor of the pool is up before the first (cratescale.embeddings.pool)
    shards = per_host(log, "shards per host: ")
    assert set(shards) == {"node1", "node2"} and sum(shards.values()) == 24, shards

    # node2 died mid-extraction: what was committed stays as it was, the store ends byte-identical
    assert 4 <= len(at_kill) < 24, f"node2 was killed after {len(at_kill)} of 24 shards: not mid-extraction"
    after = markers(killed)
    assert {k: after.get(k) for k in at_kill} == at_kill, "a shard committed before the kill was lost or redone"
    ref_files, got_files = store_files(ref), store_files(killed)
    assert sorted(ref_files) == sorted(got_files)   # no stray tmp file of the killed actor either
    assert [k for k in ref_files if ref_files[k] != got_files[k]] == []
    if "rerun after rc" in log:   # the first run stopped on one line: the cause, what was committed and kept
        stop = next(line for line in log.splitlines() if line.startswith("error: extract: stopped, "))
        assert "shards committed and kept in" in stop, stop
    print(f"node2 killed after {len(at_kill)}/24 shards; "
          f"{'rerun' if 'rerun after rc' in log else 'Ray finished it on node1'}; store byte-identical")
    # nothing left behind: no Ray process in either node, no temp dir
    for n in (1, 2):
        pids = subprocess.run(["ip", "netns", "pids", f"csmn-node{n}"], capture_output=True, text=True).stdout.split()
        comms = [Path(f"/proc/{p}/comm").read_text().strip() for p in pids if Path(f"/proc/{p}").exists()]
        assert not [c for c in comms if c.startswith(("raylet", "gcs_server", "ray::"))], comms
    assert not list(Path("/tmp").glob(f"ray-{job_id}-*"))
