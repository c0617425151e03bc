"""The Ray side of extraction: size the pool from the nodes (memory.py), ask Ray for each actor's memory and
GPUs, and bound the restarts (issue 14.3-14.4).

Ray Data restarts a dead actor forever by default (max_restarts=-1): an actor that Ray's memory monitor kills
at every batch loops with no error. Here each actor is restarted at most `max_restarts` times and each task
retried as often; past that the run stops with one line (extract.run_extraction adds the knobs), and every
shard committed so far stays committed: a rerun with smaller settings resumes.
"""
from __future__ import annotations

import sys
from typing import Any

from cratescale.embeddings.memory import DataCost, MemoryPlan, available_memory, cluster_nodes, plan_extraction

# Every actor of the fixed pool is up before the first task goes out (Ray Data's default hands tasks to whichever
# actor is ready: on a cluster the actors on the driver's busy node started seconds later and got no shard, so
# "spread over every node" held only by luck). Bounded: past it the run stops with one line (ActorsFailed).
ACTOR_START_TIMEOUT_S = 600


class ActorsFailed(RuntimeError):
    """The actor pool gave up: the cause in one line."""


def init_ray(address: str | None = None) -> None:
    """Join `address` (or $RAY_ADDRESS inside an allocation), or start a small local Ray: the project's one
    start-or-join (data_pipeline/local_ray.py), with its one runtime_env policy."""
    from data_pipeline.local_ray import start_or_join_ray

    start_or_join_ray(address, log_to_driver=True)


def plan_for(config: dict[str, Any], image_size: int | None, batch_size: int | str, actors: int | str,
             address: str | None, cpus_per_actor: float, gpus_per_actor: float, data: DataCost) -> MemoryPlan:
    """The memory plan on this process's machine (actors=0) or on the Ray cluster; one line when it cannot fit."""
    from cratescale.embeddings.extract import ExtractionError

    device = "cuda" if gpus_per_actor else "cpu"
    if actors == 0:
        nodes: tuple[list[float], list[int]] = ([available_memory()], [1])
    else:
        init_ray(address)
        nodes = cluster_nodes(cpus_per_actor, gpus_per_actor)
    try:
        plan = plan_extraction(config, image_size, batch_size, actors or 1, node_memory=nodes[0],
                               node_slots=nodes[1], device=device, data=data)
    except ValueError as err:
        raise ExtractionError(f"extract: {err}") from None
    if actors not in (0, "auto") and plan.actors < int(actors):
        print(f"extract: the nodes' memory and CPUs (GPUs) hold {plan.actors} of the {actors} actors asked "
              f"({plan.per_actor / 2**30:.2f} GiB each): running {plan.actors} (extract.actors)", file=sys.stderr)
    elif actors != 0:
        print(f"extract: {plan.describe()}", file=sys.stderr)
    return plan


def run_pool(groups: list[list[int]], kwargs: dict, plan: MemoryPlan, num_cpus: float, num_gpus: float,
             max_restarts: int) -> list[dict]:
    """Tasks of shard groups through a fixed pool of ShardWorker actors; returns their records."""
    import ray

    from cratescale.embeddings.extract import ShardWorker

    # One block per task, so the pool hands tasks to actors one at a time (dynamic load balance).
    items = [{"shards": ",".join(map(str, g))} for g in groups]
    ray.data.DataContext.get_current().wait_for_min_actors_s = ACTOR_START_TIMEOUT_S
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    # Ray 2.60 takes max_restarts / max_task_retries only through ray_remote_args (deprecated for 2.64, which
    # pyproject's pin excludes): without them Ray Data restarts a dead actor forever.
    ds = ds.map_batches(
        ShardWorker, fn_constructor_kwargs=kwargs, batch_size=1, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=min(plan.actors, len(groups)), max_tasks_in_flight_per_actor=1),
        num_cpus=num_cpus, num_gpus=num_gpus or None, memory=plan.per_actor,
        max_restarts=max_restarts, max_task_retries=max_restarts, scheduling_strategy="SPREAD")  # every node
    try:
        return ds.take_all()
    except Exception as err:  # noqa: BLE001 - whatever ended the pool, the run stops with its cause
        raise ActorsFailed(failure_cause(err)) from err


def failure_cause(err: BaseException) -> str:
    """One line for what ended the pool: killed for memory, or the last error line of the actor's traceback."""
    text = str(err)
    if "OutOfMemoryError" in text or "memory monitor" in text or "OOM" in text:
        return "actors were killed for memory (over their RSS limit, by Ray's memory monitor or by the OOM killer)"
    if "ActorDiedError" in text or "actor died" in text.lower():
        return "actors died (killed, or their worker process exited)"
    if "ActorUnavailableError" in text:   # seen when a worker node was lost mid-extraction
        return "an actor became unreachable (its node was lost or cut off)"
    lines = [line.strip() for line in text.splitlines() if "Error" in line and ":" in line]
    return (lines[-1] if lines else type(err).__name__)[:300]
