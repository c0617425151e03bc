"""Job arrays: one job file, N independent runs (a sweep of mask ratios, say) from `cluster.array`.

Each entry is a mapping of dotted overrides; member i gets run_dir `<run_dir>/array-<i>`, name `<name>-<i>`,
and shares the parent's data. Members are submitted together and trained concurrently (one SLURM job each, each
requeued and resumed on its own); the later stages then run member by member.
"""
from __future__ import annotations

import json
import time
from typing import Any

import ray

from cratescale.config import JobConfig, RunPaths, dump_job
from cratescale.config.load import apply_override, validate
from cratescale.launch.display import StageError, console
from cratescale.launch.supervisor import Supervisor


def expand_array(job: JobConfig, paths: RunPaths) -> list[tuple[JobConfig, RunPaths]]:
    members = []
    for i, entry in enumerate(job.cluster.array):
        tree = job.model_dump(mode="json")
        tree["cluster"]["array"] = []
        tree["name"] = f"{job.name}-{i}"
        tree["run_dir"] = str(paths.run_dir / f"array-{i:03d}")
        tree["data"]["root"] = str(paths.data_root)
        for key, value in entry.items():  # JSON is YAML: the value round-trips with its type
            apply_override(tree, f"{key}={json.dumps(value)}", source=f"cluster.array[{i}]")
        member = validate(JobConfig, tree, f"cluster.array[{i}]")
        members.append((member, RunPaths.of(member)))
    return members


def write_members(members: list[tuple[JobConfig, RunPaths]]) -> None:
    for member, member_paths in members:
        member_paths.run_dir.mkdir(parents=True, exist_ok=True)
        dump_job(member, member_paths.config)


def pretrain_array(members: list[tuple[JobConfig, RunPaths]], interval_s: float = 2.0) -> list[dict[str, Any]]:
    """Submits every member, then follows them all until each is done."""
    supervisors = [Supervisor.remote(str(p.config), str(p.manifest)) for _, p in members]
    job_ids = ray.get([s.submit.remote() for s in supervisors])
    console.log(f"pretrain: submitted {len(job_ids)} array members: {', '.join(job_ids)}")
    states: list[dict[str, Any] | None] = [None] * len(members)
    while True:
        for i, supervisor in enumerate(supervisors):
            if states[i] is None or not states[i]["done"]:
                status = ray.get(supervisor.poll.remote())
                if states[i] is None or status["state"] != states[i]["state"]:
                    console.log(f"  {members[i][0].name}: job {status['job_id']} {status['state']} "
                                f"(step {status['step']}/{status['total_steps']})")
                states[i] = status
        if all(s["done"] for s in states):
            break
        time.sleep(interval_s)
    failed = [members[i][0].name for i, s in enumerate(states) if s["state"] != "COMPLETED" or not s["finished"]]
    if failed:
        raise StageError(f"pretrain: array members {failed} did not finish (logs in their submitit/ folders)")
    return states

