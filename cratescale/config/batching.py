"""How the global batch is cut over a world of ranks, and which node counts a run can restart on.

The global batch defines the sample sequence (DESIGN.md section 4), so it never changes; a restart on fewer nodes
(a lost node) keeps it and cuts each rank's share into micro-batches of at most `schedule.micro_batch`, more of
them accumulated when the share grows, smaller ones when it does not divide (issue 28).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cratescale.config.schema import JobConfig


def split_for_world(global_batch: int, world_size: int, max_micro: int) -> tuple[int, int] | None:
    """(micro_batch, accum) with micro_batch x accum x world_size == global_batch, micro_batch <= max_micro and
    the fewest accumulation steps; None when the global batch does not split evenly over the ranks."""
    per_rank, rest = divmod(global_batch, world_size)
    if rest or per_rank < 1:
        return None
    accum = -(-per_rank // max_micro)  # ceil: the fewest micro-batches that fit
    while per_rank % accum:
        accum += 1  # ends at per_rank at the latest (micro-batches of one)
    return per_rank // accum, accum


def resumable_node_counts(job: "JobConfig") -> list[int]:
    """Node counts from cluster.min_nodes to cluster.nodes (ascending) whose ranks split the global batch."""
    sched, cluster = job.schedule, job.cluster
    return [n for n in range(cluster.min_nodes, cluster.nodes + 1)
            if split_for_world(sched.global_batch, n * cluster.tasks_per_node, sched.micro_batch) is not None]


def no_fit_line(job: "JobConfig", usable: int, what: str = "usable node(s) in the partition") -> str:
    """One line naming the numbers, when no node count fits."""
    counts = resumable_node_counts(job)
    return (f"{usable} {what}; schedule.global_batch {job.schedule.global_batch} splits "
            f"over {', '.join(map(str, counts)) or 'no'} node count(s) of {job.cluster.tasks_per_node} ranks between "
            f"cluster.min_nodes {job.cluster.min_nodes} and cluster.nodes {job.cluster.nodes}")


def describe_split(job: "JobConfig", world_size: int) -> str | None:
    """A note when the micro-batch on this world differs from schedule.micro_batch, else None."""
    sched = job.schedule
    split = split_for_world(sched.global_batch, world_size, sched.micro_batch)
    if split is None or split[0] == sched.micro_batch:
        return None
    micro, accum = split
    return (f"{world_size} ranks: micro-batch {micro} x {accum} accumulated (schedule.micro_batch "
            f"{sched.micro_batch} does not divide the {sched.global_batch // world_size} samples per rank); the "
            f"global batch {sched.global_batch} and the sample sequence are unchanged")
