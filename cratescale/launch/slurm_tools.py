"""Small SLURM helpers for the launcher: parse `scontrol`/`sinfo` output and check a request before submitting.

Parsers are pure functions (tested without a cluster); the rest are thin subprocess calls to scontrol/sinfo.
The tests' own SLURM helpers (is the dev cluster up, release a held requeue) are tests/slurm/slurm_helpers.py.
"""
from __future__ import annotations

import re
import shutil
import subprocess

__all__ = ["SlurmError", "SlurmRequestError", "check_request", "job_history", "job_info", "node_info", "parse_gpus",
           "parse_records", "partitions", "partitions_from", "queue_state", "validate_request"]

# A key starts a token: "Key=" at the start or after whitespace. Keys look like JobId, CPUs/Task, AllocNode:Sid.
_KEY = re.compile(r"(?:^|(?<=\s))([A-Za-z][\w/:.\-]*)=")


class SlurmError(RuntimeError):
    """A SLURM command failed or is missing."""


class SlurmRequestError(ValueError):
    """A resource request the cluster cannot satisfy (one line: what was asked, what exists)."""


# ---------------------------------------------------------------------------------------------- pure parsers
def parse_kv(line: str) -> dict[str, str]:
    """One `scontrol show -o` record -> {key: value}. Values may contain spaces (OS=Linux 6.1 #1 SMP ...)."""
    matches = list(_KEY.finditer(line))
    out: dict[str, str] = {}
    for i, m in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(line)
        out[m.group(1)] = line[m.end():end].strip()
    return out


def parse_records(text: str) -> list[dict[str, str]]:
    """`scontrol show -o <entity>` output (one record per line) -> list of dicts."""
    return [parse_kv(line) for line in text.splitlines() if "=" in line]


def parse_gpus(gres: str) -> int:
    """GPUs in a node's Gres string: "gpu:8", "gpu:h100:8(S:0-1)", "gpu:a:2,gpu:b:2", "(null)" -> 0."""
    total = 0
    for item in gres.split(","):
        parts = re.sub(r"\(.*?\)", "", item).split(":")
        if parts[0] == "gpu" and len(parts) >= 2 and parts[-1].isdigit():
            total += int(parts[-1])
    return total


def partitions_from(node_records: list[dict[str, str]],
                    part_records: list[dict[str, str]]) -> dict[str, dict]:
    """Partition summary from `scontrol show -o node` and `scontrol show -o partition` records.

    {name: {nodes, cpus, state, cpus_per_node, gpus_per_node}}; per-node numbers are the largest node of the
    partition (a request larger than that can never start).
    """
    out: dict[str, dict] = {}
    for p in part_records:
        name = p.get("PartitionName", "")
        members = [n for n in node_records if name in n.get("Partitions", "").split(",")]
        out[name] = {
            "nodes": int(p.get("TotalNodes", len(members)) or 0),
            "cpus": int(p.get("TotalCPUs", 0) or 0),
            "state": p.get("State", "UNKNOWN"),
            "cpus_per_node": max((int(n.get("CPUTot", 0) or 0) for n in members), default=0),
            "gpus_per_node": max((parse_gpus(n.get("Gres", "")) for n in members), default=0),
        }
    return out


def check_request(parts: dict[str, dict], partition: str, nodes: int, tasks_per_node: int,
                  cpus_per_task: int, gpus_per_node: int = 0) -> None:
    """Raise SlurmRequestError (one line) if the request cannot fit `parts` (the output of partitions())."""
    where = f"request partition={partition} nodes={nodes} tasks_per_node={tasks_per_node} " \
            f"cpus_per_task={cpus_per_task} gpus_per_node={gpus_per_node}"
    for field, value, low in (("nodes", nodes, 1), ("tasks_per_node", tasks_per_node, 1),
                              ("cpus_per_task", cpus_per_task, 1), ("gpus_per_node", gpus_per_node, 0)):
        if not isinstance(value, int) or value < low:
            raise SlurmRequestError(f"{where}: {field} must be an integer >= {low}, got {value!r}")
    if partition not in parts:
        raise SlurmRequestError(f"{where}: unknown partition {partition!r}; the cluster has {sorted(parts)}")
    p = parts[partition]
    if nodes > p["nodes"]:
        raise SlurmRequestError(f"{where}: {nodes} nodes asked, partition {partition!r} has {p['nodes']}")
    cpus = tasks_per_node * cpus_per_task
    if cpus > p["cpus_per_node"]:
        raise SlurmRequestError(f"{where}: {tasks_per_node} tasks x {cpus_per_task} cpus = {cpus} CPUs per node "
                                f"asked, the largest node of {partition!r} has {p['cpus_per_node']}")
    if gpus_per_node > p["gpus_per_node"]:
        raise SlurmRequestError(f"{where}: {gpus_per_node} GPUs per node asked, the largest node of "
                                f"{partition!r} has {p['gpus_per_node']}")


# ---------------------------------------------------------------------------------------------- subprocess calls
def _run(*cmd: str, timeout: float = 20) -> subprocess.CompletedProcess:
    if shutil.which(cmd[0]) is None:
        raise SlurmError(f"{cmd[0]} not found on PATH (is SLURM installed? cluster/dev/slurm_up.sh)")
    try:
        return subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise SlurmError(f"{' '.join(cmd)} did not answer within {timeout} s") from e


def _check(*cmd: str) -> str:
    res = _run(*cmd)
    if res.returncode != 0:
        raise SlurmError(f"{' '.join(cmd)} failed (rc {res.returncode}): {res.stderr.strip()}")
    return res.stdout


def node_info() -> dict[str, dict]:
    """{node: {cpus, gpus, state, partitions}} from `scontrol show -o node`."""
    out = {}
    for n in parse_records(_check("scontrol", "show", "-o", "node")):
        out[n["NodeName"]] = {"cpus": int(n.get("CPUTot", 0) or 0), "gpus": parse_gpus(n.get("Gres", "")),
                              "state": n.get("State", "UNKNOWN"),
                              "partitions": [p for p in n.get("Partitions", "").split(",") if p]}
    return out


def partitions() -> dict[str, dict]:
    """{partition: {nodes, cpus, state, cpus_per_node, gpus_per_node}} (state is UP/DOWN/DRAIN/INACTIVE)."""
    node_recs = parse_records(_check("scontrol", "show", "-o", "node"))
    part_recs = parse_records(_check("scontrol", "show", "-o", "partition"))
    return partitions_from(node_recs, part_recs)


def job_info(job_id: str | int) -> dict[str, str]:
    """`scontrol show -o job <id>` as a dict (JobState, Reason, Restarts, NodeList, ...).

    {} when the controller no longer knows the job (finished more than MinJobAge ago: ask sacct instead).
    """
    res = _run("scontrol", "show", "-o", "job", str(job_id))
    if res.returncode != 0:
        if "Invalid job id" in res.stderr:
            return {}
        raise SlurmError(f"scontrol show job {job_id} failed (rc {res.returncode}): {res.stderr.strip()}")
    recs = parse_records(res.stdout)
    return next((r for r in recs if r.get("JobId") == str(job_id)), recs[0] if recs else {})


def queue_state(job_id: str | int) -> tuple[str, str] | None:
    """(state, reason) of the job in the controller's queue (squeue: no accounting database), None once it left
    the queue. The reason says why a pending job waits (BeginTime after a requeue, ReqNodeNotAvail, ...)."""
    res = _run("squeue", "-h", "-j", str(job_id), "-o", "%T|%r")
    if res.returncode != 0:
        if "Invalid job id" in res.stderr:
            return None
        raise SlurmError(f"squeue -j {job_id} failed (rc {res.returncode}): {res.stderr.strip()}")
    line = res.stdout.strip().splitlines()[0] if res.stdout.strip() else ""
    if not line:
        return None
    state, _, reason = line.partition("|")
    return state.strip(), reason.strip()


def job_history(job_id: str | int) -> list[str]:
    """Every recorded state of a job, oldest first (sacct -D keeps the runs a requeue replaced), e.g.
    ["NODE_FAIL", "PENDING"]: SLURM requeues a job that lost a node, and then plain sacct shows only PENDING."""
    out = _check("sacct", "-D", "-X", "-n", "-P", "-o", "State", "-j", str(job_id))
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def validate_request(partition: str, nodes: int, tasks_per_node: int, cpus_per_task: int,
                     gpus_per_node: int = 0) -> None:
    """Raise SlurmRequestError (a ValueError) if the live cluster cannot run this request."""
    check_request(partitions(), partition, nodes, tasks_per_node, cpus_per_task, gpus_per_node)

