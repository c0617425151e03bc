"""Helpers of the multi-node tier (tests/slurm/test_multinode*.py): the N-node dev cluster of cluster/dev/mn_up.sh.

Its nodes are network namespaces of this machine (own IP on bridge csmnbr0, own hostname), with their own
slurmctld/slurmdbd/munged, so the single-node cluster the other tiers use keeps running beside it. Clients reach
it through SLURM_CONF; the tier's fixture sets that for each test only.
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEV = REPO / "cluster" / "dev"
MN_DIR = Path(os.environ.get("MN", "/var/lib/cratescale-slurm-mn"))
MN_CONF = str(MN_DIR / "etc" / "slurm.conf")
HOSTS = MN_DIR / "etc" / "hosts"
NODES = 3   # the node-loss test shrinks a 3-node job and grows it back


def mn_env() -> dict[str, str]:
    return dict(os.environ, SLURM_CONF=MN_CONF)


def up_nodes() -> int:
    """Nodes of the multi-node cluster that can take a job now (0 when it does not answer)."""
    try:
        out = subprocess.run(["sinfo", "-h", "-p", "debug", "-t", "idle,mixed,allocated", "-o", "%D"],
                             capture_output=True, text=True, timeout=15, env=mn_env()).stdout
    except subprocess.TimeoutExpired:
        return 0
    return sum(int(x) for x in out.split() if x.isdigit())


def mn_up(nodes: int = NODES) -> str:
    res = subprocess.run(["bash", str(DEV / "mn_up.sh")], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, NODES=str(nodes)))
    assert res.returncode == 0, f"mn_up.sh failed:\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}"
    return res.stdout


def mn_down() -> None:
    subprocess.run(["bash", str(DEV / "mn_down.sh")], capture_output=True, text=True, timeout=120)


def on_node(n: int, *cmd: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(DEV / "node.sh"), str(n), *cmd], capture_output=True, text=True,
                          timeout=timeout, env=mn_env())


def kill_node(n: int, down: bool = True) -> str:
    args = ["bash", str(DEV / "node_kill.sh"), str(n)] + (["--down"] if down else [])
    res = subprocess.run(args, capture_output=True, text=True, timeout=60, env=mn_env())
    assert res.returncode == 0, res.stderr
    return res.stdout


def rendezvous_lines(log_dir: Path) -> list[str]:
    """The `rendezvous:` line each rank printed (cratescale.distributed.rendezvous), over all its logs."""
    return [line for p in sorted(log_dir.rglob("*_log.err")) for line in p.read_text().splitlines()
            if line.startswith("rendezvous: rank")]
